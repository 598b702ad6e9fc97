"""The explorer's state, without a browser (tests/test_browser.py drives it in Chromium)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("ipywidgets", reason="the explorer needs the widgets extra")

import cam  # noqa: E402
from cam import combine as C  # noqa: E402
from cam import widgets as W  # noqa: E402
from cam.widgets import Explorer, overlay_png  # noqa: E402
from conftest import build_dense_concat_model, random_images  # noqa: E402
from keras import ops  # noqa: E402


@pytest.fixture(scope="module")
def explorer():
    model = build_dense_concat_model()
    return Explorer(model, random_images((10, 10, 3), 3, seed=2), class_names=["a", "b", "c"],
                    targets={"b minus a": lambda out: out[:, 1] - out[:, 0]}, ask_above=60)


def test_the_first_map_is_built_and_shown(explorer):
    assert explorer.picture.value[:4] == b"\x89PNG"
    assert explorer.last["method"] == "Grad-CAM" and explorer.last["map"].shape == (10, 10)
    assert explorer.layer.value == "relu2"  # the last layer with a grid
    assert explorer.layer.options[0] == ("relu2" + W.HEAD_ONLY_MARK, "relu2")  # listed first
    assert "predicted" in explorer.info.value and "explained" in explorer.info.value
    assert explorer.settings_box.children == ()  # Grad-CAM has no settings


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
    explorer.settings["fastablationcam"]["window"].value = 2
    assert explorer.explainer().window == 2 and explorer.last["raw"].shape == (5, 5)


def test_the_selected_methods_settings_come_from_its_declaration(explorer):
    explorer.layer.value = "relu1"
    explorer.method.value = "fastablationcam"
    window, stride = (explorer.settings["fastablationcam"][k] for k in ("window", "stride"))
    assert list(explorer.settings_box.children) == [window.widget, stride.widget]
    # stride's default is None (the window): an "auto" box, ticked, with the number disabled
    assert stride.value is None and stride.auto.value and stride.input.disabled
    window.value, stride.value = 3, 1
    assert explorer.last["settings"] == {"window": 3, "stride": 1}
    assert explorer.evaluations(explorer.explainer()) == 9  # 3x3 positions on 5x5
    window.value = 6  # larger than the 5x5 grid: the constructor's error, the map kept
    assert "Cannot explain" in explorer.info.value and "5x5" in explorer.info.value
    window.value, stride.value = 1, None
    assert explorer.setting_values() == {"window": 1, "stride": None}
    assert explorer.last["settings"] == {"window": 1, "stride": 1}  # None: the window
    explorer.method.value = "reciprocam"
    gaussian = explorer.settings["reciprocam"]["gaussian"]
    assert list(explorer.settings_box.children) == [gaussian.widget]
    gaussian.value = True
    assert explorer.last["method"] == "ReciproCAM" and explorer.last["settings"] == {
        "gaussian": True}
    explorer.method.value = "occlusion"
    assert [c.name for c in explorer.settings["occlusion"].values()] == [
        "window", "stride", "baseline"]
    assert explorer.settings["occlusion"]["baseline"].input.value == 0.0
    assert explorer.last["method"] == "Occlusion"
    explorer.method.value = "gradcam"
    assert explorer.settings_box.children == ()


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
    assert explorer.costs.seconds_per_evaluation is not None
    explorer.ask_above = 0.0
    shown = bytes(explorer.picture.value)
    explorer.method.value = "ablationcam"
    assert explorer.compute.layout.display is None and "press <b>Compute</b>" in explorer.info.value
    assert bytes(explorer.picture.value) == shown and explorer.last["method"] == "FastAblationCAM"
    explorer.compute.click()
    assert explorer.last["method"] == "Ablation-CAM" and explorer.compute.layout.display == "none"
    explorer.ask_above = 60


def test_estimates_follow_each_methods_declared_cost(explorer):
    explorer.costs.seconds_per_evaluation = 0.01
    gradcam, occlusion = explorer.explainer("gradcam"), explorer.explainer("occlusion")
    assert explorer.estimate_seconds(gradcam) == pytest.approx(0.01)  # one evaluation
    # a whole-network evaluation costs more than one of the head
    assert occlusion.whole_network and explorer.work_per_evaluation(occlusion) > 1
    assert explorer.estimate_seconds(occlusion) == pytest.approx(
        0.01 * occlusion.evaluations_per_image * explorer.work_per_evaluation(occlusion))


def test_the_layer_list_filters_by_name_nearest_the_output_first(explorer):
    explorer.method.value = "gradcam"
    explorer.layer.value = "relu2"
    last = explorer.last
    explorer.layer_filter.value = "relu"
    assert [v for _, v in explorer.layer.options] == ["relu2", "relu1", "relu0"]
    assert explorer.layer.value == "relu2" and explorer.last is last  # kept: no new map
    assert "3 of" in explorer.layer_count.value
    explorer.layer_filter.value = "BN"  # case-insensitive; relu2 is not among them
    assert [v for _, v in explorer.layer.options] == ["bn1", "bn0"]
    assert explorer.layer.value == "bn1" and explorer.last["layer"] == "bn1"
    explorer.layer_filter.value = "nothing like it"
    assert "no layer name contains" in explorer.layer_count.value
    assert explorer.layer.value == "bn1"
    explorer.layer_filter.value = ""
    assert len(explorer.layer.options) == len(explorer.layer_options)


class RowAblation(cam.AblationExplainer):
    """A method the explorer has never heard of: ablate ``band`` rows (or columns) of the
    grid at a time; each cell gets the score drop of its band."""

    name = "Row-Ablation"
    SETTINGS = (cam.Setting("band", int, 1, "rows ablated together", low=1, high=4),
                cam.Setting("columns", bool, False, "ablate columns instead"),
                cam.Setting("shift", float, 0.0, "added to the map (a float setting)"))

    def __init__(self, model, layer=None, band=1, columns=False, shift=0.0, **kwargs):
        super().__init__(model, layer, **kwargs)
        self.band, self.columns, self.shift = band, columns, shift

    def mask_settings(self):
        return (self.band, self.columns)

    def masks(self, grid_shape):
        h, w = grid_shape[:2]
        starts = range(0, w if self.columns else h, self.band)
        masks = np.zeros((len(starts), h, w, 1), bool)
        for n, s in enumerate(starts):
            (masks[n, :, s:s + self.band] if self.columns else masks[n, s:s + self.band])[:] = True
        return masks

    def combine(self, activation, scores, ablated, masks):
        drops = C.spread_window_drops(ops.expand_dims(scores, 1) - ablated, masks[..., 0])
        return drops + self.shift


@pytest.fixture
def row_ablation():
    key = cam.register_method(RowAblation)
    try:
        yield key
    finally:
        cam.METHODS.pop(key)


def test_a_registered_method_appears_with_its_settings(row_ablation):
    assert row_ablation == "rowablation"
    model = build_dense_concat_model()
    explorer = Explorer(model, random_images((10, 10, 3), 2, seed=3), layer="relu1",
                        ask_above=60)
    assert ("Row-Ablation", "rowablation") in explorer.method.options
    explorer.method.value = "rowablation"
    band, columns, shift = explorer.settings["rowablation"].values()
    assert list(explorer.settings_box.children) == [band.widget, columns.widget, shift.widget]
    assert (band.input.min, band.input.max, band.value) == (1, 4, 1)  # the declared bounds
    assert type(columns.input).__name__ == "Checkbox" and columns.auto is None
    assert type(shift.input).__name__ == "FloatText"
    assert explorer.last["method"] == "Row-Ablation"
    assert explorer.last["settings"] == {"band": 1, "columns": False, "shift": 0.0}
    assert explorer.evaluations(explorer.explainer()) == 5  # 5 rows of the 5x5 grid
    band.value = 2
    assert explorer.explainer().band == 2 and explorer.evaluations(explorer.explainer()) == 3
    rows = explorer.last["raw"]
    assert (rows[0] == rows[0, 0]).all()  # a band's cells share its drop
    columns.value = True
    cols = explorer.last["raw"]
    assert (cols[:, 0] == cols[0, 0]).all() and explorer.last["settings"]["columns"]
    shift.value = 1.5
    np.testing.assert_allclose(explorer.last["raw"], cols + 1.5, rtol=1e-5, atol=1e-5)
    assert "band=2, columns=True, shift=1.5" in explorer.info.value
    assert "Row-Ablation" in explorer.show_all_methods()


def test_the_explorer_knows_no_method_by_name():
    source = inspect.getsource(W)
    names = [*cam.METHODS, *(cam.method_class(k).__name__ for k in cam.METHODS)]
    assert not [n for n in names if n in source], "cam/widgets.py names a method"
    assert "hasattr" not in source and "__name__" not in source


def test_overlay_png_and_bad_input():
    image = np.zeros((8, 8, 3), np.float32)
    png = overlay_png(image, np.eye(8, dtype=np.float32), size=32)
    assert png[:4] == b"\x89PNG"
    model = build_dense_concat_model()
    with pytest.raises(ValueError, match="non-empty"):
        Explorer(model, np.zeros((0, 10, 10, 3)))
    with pytest.raises(ValueError, match="is not one cam can explain"):
        Explorer(model, random_images((10, 10, 3), 1), layer="nope")
