"""cam.study.speed: the rows the speed study produces, their counts, extrapolation and memory sampling.

Times are never asserted (they depend on the machine); what is asserted is that every method,
mode and layer gets its row, with the right number of evaluations and an honest ``measured``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cam.study import speed
from conftest import random_images


@pytest.fixture(scope="module")
def study(dense_concat_model):
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    return speed.SpeedStudy(dense_concat_model, images, repeats=1, batch_size=4, budget_s=60,
                            progress=False)


def test_run_has_every_method_mode_and_window(study, dense_concat_model):
    table = study.run(["relu1"], windows=(1, 2), peer=False)
    assert list(table.columns) == speed.COLUMNS
    got = set(zip(table["method"], table["mode"]))
    expected = {("forward pass", ""), ("Grad-CAM", "head"), ("Grad-CAM", "full")}
    expected |= {(m, mode) for m in ("Ablation-CAM", "FastAblationCAM w1", "FastAblationCAM w2")
                 for mode in speed.MODES}
    assert got == expected
    h, w, c = dense_concat_model.get_layer("relu1").output.shape[1:]
    rows = table.set_index(["method", "mode"])
    assert rows.loc[("Ablation-CAM", "head"), "evaluations/image"] == c
    assert rows.loc[("FastAblationCAM w1", "full"), "evaluations/image"] == h * w
    # window 2 on a 5x5 grid: starts 0, 2, 3 in each direction
    assert rows.loc[("FastAblationCAM w2", "per-mask"), "evaluations/image"] == 9
    assert (rows.xs("per-mask", level="mode")["batch size"] == 1).all()
    assert (table["ms/image"] > 0).all() and (table["peak MB"] > 0).all()
    assert (table["measured"] == "all").all()  # a generous budget runs every row completely


def test_rows_over_budget_are_extrapolated_and_say_so(dense_concat_model):
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    study = speed.SpeedStudy(dense_concat_model, images, repeats=1, batch_size=2, budget_s=0,
                             sample_masks=2, progress=False)
    study.forward()
    row = study.ablation("Ablation-CAM", "relu1", "full")
    assert row["measured"].startswith("extrapolated: 2 of ")
    assert row["ms/image"] > study.forward_ms  # the trunk pass plus every mask's share


def test_speed_ups_divide_full_and_per_mask_by_head():
    table = pd.DataFrame({
        "layer": ["a"] * 4, "method": ["Ablation-CAM"] * 3 + ["tf-keras-vis Scorecam"],
        "mode": ["head", "full", "per-mask", "peer"], "ms/image": [2.0, 10.0, 40.0, 500.0]})
    ups = speed.speed_ups(table)
    assert ups.loc[0, "full / head"] == 5 and ups.loc[0, "per-mask / head"] == 20
    assert ups.loc[0, "Scorecam / head"] == 250


def test_batch_sweep_rows_leave_the_main_table_alone(study):
    before = len(study.rows)
    sweep = study.batch_sweep("relu1", batch_sizes=(1, 3))
    assert len(study.rows) == before
    assert sorted(sweep["batch size"]) == [1, 1, 3, 3]
    assert set(sweep["mode"]) == {"head"}


def test_peer_rows_time_the_layer_asked_for(dense_concat_model):
    pytest.importorskip("tf_keras_vis", reason="tf-keras-vis is the optional [peer] extra")
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    study = speed.SpeedStudy(dense_concat_model, images, repeats=1, sample_masks=3,
                             progress=False)
    study.forward()
    gradcam, scorecam = study.peer("relu1")
    channels = dense_concat_model.get_layer("relu1").output.shape[-1]
    assert gradcam["grid"] == scorecam["grid"] == "5x5x" + str(channels)
    assert scorecam["evaluations/image"] == channels
    assert scorecam["measured"].startswith(f"extrapolated: 3 of {channels} channels")


def test_study_layers_fall_back_to_distinct_grids(dense_concat_model):
    layers = speed.study_layers(dense_concat_model)
    shapes = {layer.name: layer.output.shape for layer in dense_concat_model.layers}
    grids = [shapes[name][1:3] for name in layers]
    assert len(set(grids)) == len(grids) >= 1


def test_peak_memory_sees_a_large_allocation():
    with speed.PeakMemory() as quiet:
        pass
    with speed.PeakMemory() as busy:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block.sum()
    del block
    assert busy.peak_mb >= quiet.peak_mb + 32


def test_bad_arguments_are_named(dense_concat_model):
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        speed.SpeedStudy(dense_concat_model, random_images(dense_concat_model.input_shape[1:]),
                         repeats=0)
    with pytest.raises(ValueError, match="non-empty"):
        speed.SpeedStudy(dense_concat_model, np.zeros((0, 10, 10, 3)))
    study = speed.SpeedStudy(dense_concat_model, random_images(dense_concat_model.input_shape[1:]),
                             progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        study.ablation("Ablation-CAM", "relu1", "fast")
    with pytest.raises(ValueError, match="method must be"):
        study.ablation("ScoreCAM", "relu1", "head")


def test_extrapolation_counts_the_masks_actually_run(dense_concat_model, monkeypatch):
    """25 masks in one batch of 25 (batch size 64): a row costs the trunk pass plus 25 mask
    evaluations, not a padded 64. Every timing is stubbed to 100 ms to make that exact."""
    monkeypatch.setattr(speed, "median_ms", lambda fn, repeats: (fn(), 100.0)[1])
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    study = speed.SpeedStudy(dense_concat_model, images, repeats=1, batch_size=64, budget_s=0,
                             progress=False)
    study.forward()
    assert study.forward_ms == 50.0  # 100 ms per call of 2 images
    row = study.ablation("FastAblationCAM", "relu1", "full")
    assert row["evaluations/image"] == 25 and row["measured"].startswith("extrapolated: 25 of 25")
    assert row["ms/image"] == 50.0 + 100.0  # trunk + 25 masks at 100/25 ms each


def test_forward_is_settled_at_the_end(dense_concat_model, monkeypatch):
    timings = iter([400.0, 400.0] + [100.0] * 200)  # a slow first forward timing, then fast
    monkeypatch.setattr(speed, "median_ms", lambda fn, repeats: (fn(), next(timings))[1])
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    study = speed.SpeedStudy(dense_concat_model, images, repeats=1, progress=False)
    table = study.run(["relu1"], windows=(1,), peer=False)
    assert table.loc[0, "ms/image"] == 50.0 and study.forward_ms == 50.0
    assert np.allclose(table["x forward"], table["ms/image"] / 50.0)
    assert (table["method"] == "forward pass").sum() == 1
