"""cam.plot: overlays keep the image where the map is weak, figures save as PNG or JPEG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cam import plot  # noqa: E402


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (16, 20, 3)).astype(np.uint8)


@pytest.fixture
def saliency():
    m = np.zeros((16, 20), np.float32)
    m[4:8, 5:10] = 1.0
    return m


def test_overlay_colours_only_above_threshold(image, saliency):
    out = plot.overlay(image, saliency, alpha=0.6, threshold=0.5)
    assert out.shape == (16, 20, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[saliency == 0], image[saliency == 0] / 255.0, atol=1e-6)
    assert not np.allclose(out[saliency == 1], image[saliency == 1] / 255.0)


def test_overlay_without_threshold_tints_everywhere(image, saliency):
    out = plot.overlay(image, saliency, alpha=0.5)
    assert not np.allclose(out[saliency == 0], image[saliency == 0] / 255.0)


def test_overlay_resizes_a_coarse_map_and_accepts_grayscale(saliency):
    gray = np.full((16, 20, 1), 128, np.uint8)
    coarse = saliency[::4, ::4]
    out = plot.overlay(gray, coarse, threshold=0.2, smooth=1.0)
    assert out.shape == (16, 20, 3)


def test_overlay_rejects_a_non_image():
    with pytest.raises(ValueError, match=r"image must be \(H, W\)"):
        plot.overlay(np.zeros((4, 4, 2)), np.zeros((4, 4)))


def test_figures_save_png(tmp_path, image, saliency):
    plot.show_overlay(image, saliency, title="t", save=tmp_path / "a.png")
    plot.show_raw(np.arange(12, dtype=np.float32).reshape(3, 4) - 5, save=tmp_path / "b.png")
    fig = plot.compare_methods(np.stack([image, image]),
                               {"Grad-CAM": np.stack([saliency, saliency]),
                                "FastAblationCAM": np.stack([saliency, 1 - saliency])},
                               row_titles=["x", "y"], save=tmp_path / "c.png")
    assert fig.axes[0].get_title() == "image" and len(fig.axes) == 6
    for name in "abc":
        with Image.open(tmp_path / f"{name}.png") as png:
            assert png.size[0] > 50 and png.size[1] > 50


def test_save_figure_writes_charts_as_png_and_photographs_as_narrow_jpeg(tmp_path, image):
    chart, ax = plot.plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [1, 0])
    plot.save_figure(chart, tmp_path / "figures" / "chart.png")
    grid = plot.image_grid(np.stack([image] * 30), columns=30)  # 42 inches wide
    plot.save_figure(grid, tmp_path / "grid.jpg")
    with Image.open(tmp_path / "figures" / "chart.png") as png:
        assert png.format == "PNG" and png.width <= 4 * plot.FIGURE_DPI
        assert png.info["dpi"] == pytest.approx((plot.FIGURE_DPI,) * 2, abs=0.1)
    with Image.open(tmp_path / "grid.jpg") as jpg:
        assert jpg.format == "JPEG" and 0.95 * plot.MAX_JPEG_WIDTH < jpg.width <= plot.MAX_JPEG_WIDTH


def test_compare_methods_checks_counts(image, saliency):
    with pytest.raises(ValueError, match=r"maps\['m'\] has 1 maps for 2 images"):
        plot.compare_methods(np.stack([image, image]), {"m": saliency[None]})


def test_image_grid_lays_out_rows(tmp_path, image):
    fig = plot.image_grid(np.stack([image] * 5), titles=list("abcde"), columns=3,
                          save=tmp_path / "g.png")
    assert len(fig.axes) == 6 and fig.axes[4].get_title() == "e"
    assert (tmp_path / "g.png").is_file()
    with pytest.raises(ValueError, match="2 titles for 5 images"):
        plot.image_grid(np.stack([image] * 5), titles=["a", "b"])


# --------------------------------------------------------------------------- threshold, gray


def test_overlay_quantile_threshold_equals_its_level(image):
    ramp = np.tile(np.linspace(0, 1, 20, dtype=np.float32), (16, 1))
    level = float(np.quantile(ramp, 0.75))
    by_quantile = plot.overlay(image, ramp, threshold="q0.75")
    np.testing.assert_allclose(by_quantile, plot.overlay(image, ramp, threshold=level))
    untouched = ramp <= level
    np.testing.assert_allclose(by_quantile[untouched], image[untouched] / 255.0, atol=1e-6)
    assert untouched.mean() == pytest.approx(0.75)


@pytest.mark.parametrize("shape", [(16, 20), (16, 20, 1)])
def test_grayscale_images_are_shown_in_gray(shape, saliency):
    gray = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    out = plot.overlay(gray, saliency, alpha=0.0)  # no colour at all: the image itself
    expected = gray.reshape(16, 20)[..., None].repeat(3, axis=-1) / 255.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    fig = plot.compare_methods(gray[None], {"m": saliency[None]})
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (16, 20, 3) and np.allclose(shown[..., 0], shown[..., 2])


def test_show_raw_writes_every_cell_value():
    raw_map = np.array([[-1.5, 0.0, 2.0], [0.25, 3.0, -0.5]], np.float32)
    fig = plot.show_raw(raw_map)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["-1.5", "0", "2", "0.25", "3", "-0.5"]


def test_show_explanation_puts_raw_grid_beside_overlay(tmp_path, image):
    raw_map = np.arange(12, dtype=np.float32).reshape(3, 4) - 4
    fig = plot.show_explanation(image, raw_map, title="t", threshold="q0.5",
                                save=tmp_path / "e.png")
    raw_ax, overlay_ax = fig.axes[:2]
    assert len(raw_ax.texts) == 12 and raw_ax.get_title() == "raw map 3x4"
    assert "threshold q0.5" in overlay_ax.get_title()
    shown = overlay_ax.get_images()[0].get_array()
    # The cells at or below the median (the top row and the first cell of the middle row,
    # upsampled) are dropped by the threshold, so the image shows through untinted there.
    np.testing.assert_allclose(shown[0, :], image[0, :] / 255.0, atol=1e-6)
    assert (tmp_path / "e.png").is_file()


def test_show_overlay_colorbar(image, saliency):
    assert len(plot.show_overlay(image, saliency, colorbar=True).axes) == 2
    assert len(plot.show_overlay(image, saliency).axes) == 1
