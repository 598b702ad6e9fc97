"""cam.plot: overlays keep the image where the map is weak, figures save as PNG."""

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
