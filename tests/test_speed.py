"""cam.study.speed: the rows the speed study produces, their counts, extrapolation and memory sampling.

Times are never asserted (they depend on the machine); what is asserted is that every method,
mode and layer gets its row, with the right number of evaluations and an honest ``measured``,
and, with the clock stubbed, the extrapolation arithmetic.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

import cam
from cam.study import speed
from conftest import random_images

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

#: Occlusion on the 10x10 test images: 4-pixel patches every 2 pixels, starts 0, 2, 4, 6.
OCCLUSION = (4, 2)


@pytest.fixture(scope="module")
def study(dense_concat_model):
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    return speed.SpeedStudy(dense_concat_model, images, repeats=1, batch_size=4, budget_s=60,
                            progress=False)


@pytest.fixture(scope="module")
def table(study):
    return study.run(["relu1"], windows=(1, 2), peer=False, occlusion=OCCLUSION,
                     scorecam_channels=2)


def stub_clock(monkeypatch, values):
    """Every timed call takes the next of ``values`` ms (the function still runs once)."""
    calls = []

    def timings_ms(fn, repeats, warm_up=True):
        calls.append(warm_up)
        fn()
        return [next(values)] * repeats

    monkeypatch.setattr(speed, "timings_ms", timings_ms)
    return calls


def small_study(model, **options):
    images = random_images(model.input_shape[1:], n=2)
    return speed.SpeedStudy(model, images, **{"repeats": 1, "progress": False, **options})


def test_run_has_every_method_mode_and_window(table, dense_concat_model):
    assert list(table.columns) == speed.COLUMNS
    got = set(zip(table["method"], table["mode"]))
    expected = {("forward pass", ""), ("Grad-CAM", "head"), ("Grad-CAM", "full")}
    expected |= {(m, "head") for m in speed.GRADIENT_METHODS + ("ReciproCAM gaussian",)}
    expected |= {(m, mode) for m in ("Ablation-CAM", "FastAblationCAM w1", "FastAblationCAM w2",
                                     "ReciproCAM") for mode in speed.MODES}
    expected |= {("Score-CAM", "full"), ("Score-CAM top-2", "full"),
                 ("Occlusion 4 px, stride 2", "full")}
    assert got == expected and len(table) == len(expected)
    h, w, c = dense_concat_model.get_layer("relu1").output.shape[1:]
    rows = table.set_index(["method", "mode"])
    evaluations = rows["evaluations/image"]
    assert evaluations[("Ablation-CAM", "head")] == c
    assert evaluations[("FastAblationCAM w1", "full")] == h * w
    # window 2 on a 5x5 grid: starts 0, 2, 3 in each direction
    assert evaluations[("FastAblationCAM w2", "per-mask")] == 9
    assert (evaluations.xs("ReciproCAM", level="method") == h * w).all()  # one per kept cell
    assert evaluations[("ReciproCAM gaussian", "head")] == h * w
    assert evaluations[("Score-CAM", "full")] == c and evaluations[("Score-CAM top-2", "full")] == 2
    assert evaluations[("Occlusion 4 px, stride 2", "full")] == 4 * 4
    assert (evaluations[[m for m in rows.index if m[0] in ("Grad-CAM",) + speed.GRADIENT_METHODS]]
            == 1).all()
    occlusion = rows.loc[("Occlusion 4 px, stride 2", "full")]
    assert occlusion["layer"] == "input" and occlusion["grid"] == "10x10x3"
    assert (rows.xs("per-mask", level="mode")["batch size"] == 1).all()
    assert (table["ms/image"] > 0).all() and (table["peak MB"] > 0).all()
    assert (table["measured"] == "all").all()  # a generous budget runs every row completely


def test_wall_times_cover_every_row(study, table):
    wall = study.wall_times()
    assert len(wall) == len(table) + 1  # and the forward pass timed again at the end
    assert (wall["seconds"] > 0).all()
    assert wall["method"].iloc[-1] == "forward pass (again)"


def test_rows_over_budget_are_extrapolated_and_say_so(dense_concat_model):
    study = small_study(dense_concat_model, batch_size=2, budget_s=0, sample_masks=2)
    study.forward()
    row = study.ablation("Ablation-CAM", "relu1", "full")
    assert row["measured"].startswith("extrapolated: 2 of 4 masks timed on 1 image")
    assert row["ms/image"] > study.forward_ms  # the trunk pass plus every mask's share
    row = study.scorecam("relu1")
    assert row["measured"].startswith("extrapolated: 2 of 4 channels timed on 1 image")
    row = study.occlusion(*OCCLUSION)
    assert row["measured"].startswith("extrapolated: 2 of 16 positions timed on 1 image")
    row = study.ablation("ReciproCAM", "relu1", "per-mask")
    assert row["measured"].startswith("extrapolated: 2 of 25 masks")


def test_extrapolation_counts_the_masks_actually_run(dense_concat_model, monkeypatch):
    """25 masks in one batch of 25 (batch size 64): a row costs the trunk pass plus 25 mask
    evaluations, not a padded 64. Every timing is stubbed to 100 ms to make that exact."""
    stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model, batch_size=64, budget_s=0)
    study.forward()
    assert study.forward_ms == 50.0  # 100 ms per call of 2 images
    row = study.ablation("FastAblationCAM", "relu1", "full")
    assert row["evaluations/image"] == 25 and row["measured"].startswith("extrapolated: 25 of 25")
    assert row["ms/image"] == 50.0 + 100.0  # trunk + 25 masks at 100/25 ms each
    row = study.scorecam("relu1", channels=3)
    assert row["evaluations/image"] == 3 and row["ms/image"] == 50.0 + 100.0
    row = study.scorecam("relu1")  # 4 channels in one batch of 4: sampled anew
    assert row["measured"].startswith("extrapolated: 4 of 4 channels")
    assert row["ms/image"] == 50.0 + 100.0


def test_extrapolation_counts_the_padding_a_complete_run_pushes(dense_concat_model, monkeypatch):
    """16 occlusions in batches of 5 are 4 batches, 20 slots; the sample is one batch (5 slots,
    100 ms): 50 ms (forward) + 20 * 100 / 5 ms."""
    stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model, batch_size=5, budget_s=0, sample_masks=5)
    row = study.occlusion(*OCCLUSION)
    assert row["evaluations/image"] == 16 and row["batch size"] == 5
    assert row["measured"].startswith("extrapolated: 5 of 16 positions")
    assert row["ms/image"] == 50.0 + 20 * 100.0 / 5
    # ReciproCAM at batch size 10: 25 cells in 3 batches of 10 (30 slots), sampled 10.
    study.sample_masks = 10
    row = study.ablation("ReciproCAM", "relu1", "head", batch_size=10)
    assert row["evaluations/image"] == 25 and row["measured"].startswith("extrapolated: 10 of 25")
    assert row["ms/image"] == 50.0 + 30 * 100.0 / 10


def test_the_same_passes_are_sampled_once(dense_concat_model, monkeypatch):
    """In the per-mask mode every mask is one whole-network pass at batch size 1, whichever
    method made it: FastAblationCAM window 2 and Ablation-CAM reuse window 1's sample (16
    masks, 100 ms) and say so. Batches of another size are sampled anew."""
    calls = stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model, budget_s=0)
    study.forward()
    first = study.ablation("FastAblationCAM", "relu1", "per-mask", window=1)
    timed = len(calls)
    reuse = "extrapolated: cost per mask from the 16 masks timed on 1 image for " \
            "FastAblationCAM w1 per-mask, the same passes on batches of the same size"
    second = study.ablation("FastAblationCAM", "relu1", "per-mask", window=2)
    channels = study.ablation("Ablation-CAM", "relu1", "per-mask")
    assert len(calls) == timed  # nothing timed again
    assert first["measured"].startswith("extrapolated: 16 of 25 masks")
    assert second["measured"].startswith(reuse) and channels["measured"].startswith(reuse)
    assert second["ms/image"] == 50.0 + 9 * 100.0 / 16
    assert channels["ms/image"] == 50.0 + 4 * 100.0 / 16
    # the full mode's batches of 9 are sampled anew
    third = study.ablation("FastAblationCAM", "relu1", "full", window=2)
    assert len(calls) > timed and third["measured"].startswith("extrapolated: 9 of 9 masks")
    # ReciproCAM's 25 float masks in one batch: the whole-network passes of window 1's full
    # row; in the head mode the float mask's arithmetic counts, so it is sampled anew
    study.ablation("FastAblationCAM", "relu1", "full", window=1)
    timed = len(calls)
    row = study.ablation("ReciproCAM", "relu1", "full")
    assert len(calls) == timed and "for FastAblationCAM w1 full" in row["measured"]
    study.ablation("FastAblationCAM", "relu1", "head", window=1)
    timed = len(calls)
    row = study.ablation("ReciproCAM", "relu1", "head")
    assert len(calls) > timed and row["measured"].startswith("extrapolated: 25 of 25 masks")


def test_a_slow_call_is_timed_once():
    calls = []
    assert len(speed.timings_ms(lambda: calls.append(1), 3, cap_ms=None)) == 3
    assert len(calls) == 4  # and the warm-up
    assert len(speed.timings_ms(lambda: calls.append(1), 3, warm_up=False, cap_ms=0)) == 1
    assert len(calls) == 5


def test_gradient_methods_share_one_warm_compiled_gradient(dense_concat_model, monkeypatch):
    calls = stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model)
    study.forward()
    rows = [study.gradient(m, "relu1") for m in ("Grad-CAM",) + speed.GRADIENT_METHODS]
    assert [r["method"] for r in rows] == ["Grad-CAM", *speed.GRADIENT_METHODS]
    assert calls[2:] == [True] + [False] * len(speed.GRADIENT_METHODS)  # one warm-up in all
    # one compiled gradient at the layer for all of them (the library shares it)
    assert len({id(study._build(m, "relu1")._gradients)
                for m in ("Grad-CAM",) + speed.GRADIENT_METHODS}) == 1
    study.gradient("Grad-CAM", "relu1", "full")  # another mode: its own gradient, warmed up
    assert calls[-1] is True


@pytest.mark.parametrize("batch_size, grouped", [(9, False), (64, True)])
def test_a_complete_run_that_scores_images_together_is_warmed_up(dense_concat_model,
                                                                  monkeypatch, batch_size,
                                                                  grouped):
    """The sample scores one image per call; a complete run that scores both images' 9
    ablations in one call (batch 64) compiles that call first, so it gets a warm-up call."""
    calls = stub_clock(monkeypatch, itertools.repeat(1.0))
    study = small_study(dense_concat_model, budget_s=60)
    study.forward()
    before = len(calls)
    row = study.ablation("FastAblationCAM", "relu1", "head", window=2, batch_size=batch_size)
    assert row["evaluations/image"] == 9 and row["measured"] == "all"
    # the sample (warmed up on one batch), then the complete run: warmed up when grouped
    assert len(calls) == before + 2 and calls[-1] is grouped


def test_shared_compiled_functions_give_the_maps_of_fresh_explainers(dense_concat_model):
    """Sharing a trace must not change what is computed: every explainer the study builds
    gives the raw maps of the same explainer built on its own."""
    study = small_study(dense_concat_model, batch_size=8)
    images, raw = study.images, {"normalize": False, "upsample": False}
    cases = [("FastAblationCAM", {"window": 1}), ("FastAblationCAM", {"window": 2}),
             ("Ablation-CAM", {}), ("ReciproCAM", {}), ("ReciproCAM", {"gaussian": True})]
    for method, options in cases:
        for mode in ("head", "per-mask"):  # per-mask shares one trace across windows
            explainer = study._ablation_explainer(method, "relu1", mode, **options)[0]
            fresh = cam.method_class(method)(dense_concat_model, "relu1", mode=explainer.mode,
                                             batch_size=explainer.batch_size, **options)
            np.testing.assert_allclose(explainer(images, **raw), fresh(images, **raw),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{method} {mode}")
    for method in ("Grad-CAM",) + speed.GRADIENT_METHODS + ("Score-CAM",):
        for layer in ("relu0", "relu1"):
            explainer = study._build(method, layer)
            fresh = cam.method_class(method)(dense_concat_model, layer)
            np.testing.assert_allclose(explainer(images, **raw), fresh(images, **raw),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{method} {layer}")
    # explainers at one layer share the library's compiled trunk
    assert study._build("Grad-CAM", "relu1")._trunk is study._build("Ablation-CAM", "relu1")._trunk


def test_speed_ups_divide_full_and_per_mask_by_head():
    table = pd.DataFrame({
        "layer": ["a"] * 5, "method": ["Ablation-CAM"] * 3 + ["tf-keras-vis Scorecam", "HiResCAM"],
        "mode": ["head", "full", "per-mask", "peer", "head"],
        "ms/image": [2.0, 10.0, 40.0, 500.0, 3.0]})
    ups = speed.speed_ups(table)
    assert list(ups["method"]) == ["Ablation-CAM"]  # HiResCAM has nothing to compare with
    assert ups.loc[0, "full / head"] == 5 and ups.loc[0, "per-mask / head"] == 20
    assert ups.loc[0, "Scorecam / head"] == 250


def test_batch_sweep_takes_rows_the_main_table_has(study, table):
    before = len(study.rows)
    # head rows use the library's default batch, from the memory budget
    default = cam.AblationCAM(study.model, "relu1").batch_size
    sweep = study.batch_sweep("relu1", batch_sizes=(1, default))
    assert len(study.rows) == before
    assert sorted(sweep["batch size"]) == [1, 1, default, default]
    assert set(sweep["mode"]) == {"head"}
    main = table.set_index(["method", "mode"])
    ablation = table[(table["mode"] == "head") & table["method"].str.contains("Abl|Recipro")]
    assert len(ablation) >= 3 and (ablation["batch size"] == default).all()
    for _, row in sweep[sweep["batch size"] == default].iterrows():
        assert row["notes"].endswith("(the main table's row)")
        assert row["ms/image"] == main.loc[(row["method"], "head"), "ms/image"]


def test_peer_rows_time_the_layer_asked_for(dense_concat_model):
    pytest.importorskip("tf_keras_vis", reason="tf-keras-vis is the optional [peer] extra")
    study = small_study(dense_concat_model, sample_masks=3)
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
    study = small_study(dense_concat_model)
    with pytest.raises(ValueError, match="mode must be one of"):
        study.ablation("Ablation-CAM", "relu1", "fast")
    with pytest.raises(ValueError, match="method must be one of"):
        study.ablation("ScoreCAM", "relu1", "head")
    with pytest.raises(ValueError, match="not a gradient method"):
        study.gradient("ReciproCAM", "relu1")


def test_forward_is_settled_at_the_end(dense_concat_model, monkeypatch):
    # a slow first forward timing, then fast
    stub_clock(monkeypatch, itertools.chain([400.0, 400.0], itertools.repeat(100.0)))
    study = small_study(dense_concat_model)
    table = study.run(["relu1"], windows=(1,), peer=False, others=False)
    assert table.loc[0, "ms/image"] == 50.0 and study.forward_ms == 50.0
    assert np.allclose(table["x forward"], table["ms/image"] / 50.0)
    assert (table["method"] == "forward pass").sum() == 1
