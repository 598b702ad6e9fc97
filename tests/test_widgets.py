"""The explorer's state, without a browser (tests/test_browser.py drives it in Chromium)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ipywidgets", reason="the explorer needs the widgets extra")

import cam  # noqa: E402
from cam.widgets import Explorer, overlay_png  # noqa: E402
from conftest import build_dense_concat_model, random_images  # noqa: E402


@pytest.fixture(scope="module")
def explorer():
    model = build_dense_concat_model()
    return Explorer(model, random_images((10, 10, 3), 3, seed=2), class_names=["a", "b", "c"],
                    targets={"b minus a": lambda out: out[:, 1] - out[:, 0]}, ask_above=60)


def test_the_first_map_is_built_and_shown(explorer):
    assert explorer.picture.value[:4] == b"\x89PNG"
    assert explorer.last["method"] == "Grad-CAM" and explorer.last["map"].shape == (10, 10)
    assert explorer.layer.value == "relu2"  # the last layer with a grid
    assert "(head-only)" in dict((v, k) for k, v in explorer.layer.options)["relu2"]
    assert "predicted" in explorer.info.value and "explained" in explorer.info.value


def test_changing_method_layer_and_image_changes_the_map(explorer):
    raw = explorer.last["raw"]
    trunk = explorer.explainer()._trunk
    traces = trunk.traces
    explorer.method.value = "fastablationcam"
    assert explorer.last["method"] == "FastAblationCAM"
    assert not np.array_equal(explorer.last["raw"], raw)
    assert explorer.explainer()._trunk is trunk and trunk.traces == traces  # shared, no retrace
    explorer.layer.value = "relu1"
    assert explorer.last["layer"] == "relu1" and explorer.last["raw"].shape == (5, 5)
    shown = bytes(explorer.picture.value)
    explorer.image.value = 2
    assert explorer.last["image"] == 2 and bytes(explorer.picture.value) != shown
    explorer.window.value = 2
    assert explorer.explainer().window == 2 and explorer.last["raw"].shape == (5, 5)


def test_raw_grid_targets_and_every_method(explorer):
    explorer.method.value = "gradcam"
    explorer.layer.value = "relu1"
    explorer.raw_grid.value = True
    assert explorer.last["map"].shape == (5, 5)
    explorer.raw_grid.value = False
    explorer.target.value = 2
    assert "explained 2 (c)" in explorer.info.value
    explorer.target.value = "extra:b minus a"
    assert "Function" in explorer.info.value
    explorer.target.value = "predicted"
    maps = explorer.show_all_methods()
    assert len(maps) == len(cam.METHODS) and len(explorer.multiples.children) == len(cam.METHODS)


def test_an_expensive_choice_waits_for_compute(explorer):
    explorer.method.value = "fastablationcam"  # measures the cost of one evaluation
    assert explorer._seconds_per_evaluation is not None
    explorer.ask_above = 0.0
    shown = bytes(explorer.picture.value)
    explorer.method.value = "ablationcam"
    assert explorer.compute.layout.display is None and "press <b>Compute</b>" in explorer.info.value
    assert bytes(explorer.picture.value) == shown and explorer.last["method"] == "FastAblationCAM"
    explorer.compute.click()
    assert explorer.last["method"] == "Ablation-CAM" and explorer.compute.layout.display == "none"
    explorer.ask_above = 60


def test_overlay_png_and_bad_input():
    image = np.zeros((8, 8, 3), np.float32)
    png = overlay_png(image, np.eye(8, dtype=np.float32), size=32)
    assert png[:4] == b"\x89PNG"
    model = build_dense_concat_model()
    with pytest.raises(ValueError, match="non-empty"):
        Explorer(model, np.zeros((0, 10, 10, 3)))
    with pytest.raises(ValueError, match="is not one cam can explain"):
        Explorer(model, random_images((10, 10, 3), 1), layer="nope")
