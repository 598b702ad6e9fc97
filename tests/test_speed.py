"""cam.study.speed and its parts (speed_table, timing, speed_peer, seed_head): the rows the
speed study produces, their counts, extrapolation, sample reuse and memory sampling.

Times are never asserted (they depend on the machine); what is asserted is that every method,
mode and layer gets its row, with the right number of evaluations and an honest ``measured``,
and, with the clock stubbed, the extrapolation arithmetic.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cam
from cam.study import seed_head, speed, speed_table, timing
from conftest import random_images

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

#: Occlusion on the 10x10 test images: 4-pixel patches every 2 pixels, starts 0, 2, 4, 6.
OCCLUSION = (4, 2)
STUDY_MODULES = ["speed.py", "speed_table.py", "speed_peer.py", "timing.py", "seed_head.py"]


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
    """Every timed call takes the next of ``values`` ms (the function still runs once).
    Returns the list of (warm_up, traces) each timing was asked with."""
    calls = []

    def timings_ms(fn, repeats, warm_up=True, cap_ms=None, traces=None):
        calls.append((warm_up, traces))
        fn()
        return [next(values)] * repeats

    monkeypatch.setattr(timing, "timings_ms", timings_ms)
    return calls


def small_study(model, **options):
    images = random_images(model.input_shape[1:], n=2)
    return speed.SpeedStudy(model, images, **{"repeats": 1, "progress": False, **options})


# -- the whole table -----------------------------------------------------------------------

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
    # the library's path is named: relu1's head starts with a convolution, not a pooling
    assert rows.loc[("Ablation-CAM", "head"), "notes"].endswith("(path head)")
    assert rows.loc[("Ablation-CAM", "per-mask"), "notes"].endswith("(path full)")
    assert (table["ms/image"] > 0).all() and (table["peak MB"] > 0).all()
    assert (table["measured"] == "all").all()  # a generous budget runs every row completely
    assert np.allclose(table["x forward"], table["ms/image"] / study_forward(table))


def study_forward(table):
    return table.loc[table["method"] == "forward pass", "ms/image"].item()


def test_wall_times_cover_every_row(study, table):
    wall = study.wall_times()
    assert len(wall) == len(table) + 1  # and the forward pass timed again at the end
    assert (wall["seconds"] > 0).all()
    assert wall["method"].iloc[-1] == "forward pass (again)"


def test_forward_is_settled_at_the_end(dense_concat_model, monkeypatch):
    # a slow first forward timing (both clocks), then fast
    stub_clock(monkeypatch, itertools.chain([400.0, 400.0], itertools.repeat(100.0)))
    study = small_study(dense_concat_model)
    table = study.run(["relu1"], windows=(1,), peer=False, others=False)
    assert table.loc[0, "ms/image"] == 50.0 and study.forward_ms == 50.0
    assert np.allclose(table["x forward"], table["ms/image"] / 50.0)
    assert (table["method"] == "forward pass").sum() == 1


# -- the protocol: samples, extrapolation, reuse -------------------------------------------

def test_padded_rows_and_sample_sizes_by_hand():
    # 32 rows at most 5 a call: 7 calls of 5 (35 pushed); 50 at most 8: 7 calls of 8 (56)
    assert speed_table.padded_rows(32, 5) == 35 and speed_table.padded_rows(50, 8) == 56
    assert speed_table.padded_rows(25, 64) == 25 and speed_table.call_rows(25, 10) == 9
    assert speed_table.sample_size(1664, 64, 32) == 64  # one whole call at least
    assert speed_table.sample_size(1664, 8, 32) == 32  # whole calls, about sample_masks
    assert speed_table.sample_size(25, 64, 32) == 25  # never more than there are
    assert speed_table.sample_size(49, 1, 32, per_mask=True) == 16


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
    """25 masks of 2 images in one call of 50 (batch size 64): a row costs the trunk pass
    plus 25 rows per image, not a padded 64. Every timing is stubbed to 100 ms."""
    stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model, batch_size=64, budget_s=0)
    study.forward()
    assert study.forward_ms == 50.0  # 100 ms per call of 2 images
    row = study.ablation("FastAblationCAM", "relu1", "full")
    assert row["evaluations/image"] == 25 and row["measured"].startswith("extrapolated: 25 of 25")
    assert row["ms/image"] == 50.0 + 100.0  # trunk + 25 masks at 100/25 ms each
    row = study.scorecam("relu1", channels=3)
    assert row["evaluations/image"] == 3 and row["ms/image"] == 50.0 + 100.0
    row = study.scorecam("relu1")  # 4 channels a call, not 3: sampled anew
    assert row["measured"].startswith("extrapolated: 4 of 4 channels")
    assert row["ms/image"] == 50.0 + 100.0


def test_extrapolation_counts_the_padding_a_complete_run_pushes(dense_concat_model, monkeypatch):
    """The library scores both images' rows as one list in even calls: 2 x 16 occlusions at
    most 5 a call are 7 calls of 5, 35 rows, 17.5 per image; the sample is one call of 5
    (100 ms): 50 ms (forward) + 17.5 * 100 / 5 ms."""
    stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model, batch_size=5, budget_s=0, sample_masks=5)
    row = study.occlusion(*OCCLUSION)
    assert row["evaluations/image"] == 16 and row["batch size"] == 5
    assert row["measured"].startswith("extrapolated: 5 of 16 positions")
    assert row["ms/image"] == 50.0 + 17.5 * 100.0 / 5
    # ReciproCAM at batch size 8: 2 x 25 cells in 7 calls of 8 (28 rows per image), the
    # sample one call of 8
    study.sample_masks = 8
    row = study.ablation("ReciproCAM", "relu1", "head", batch_size=8)
    assert row["evaluations/image"] == 25 and row["measured"].startswith("extrapolated: 8 of 25")
    assert row["ms/image"] == 50.0 + 28 * 100.0 / 8


def test_the_same_passes_are_sampled_once(dense_concat_model, monkeypatch):
    """In the per-mask mode every mask is one whole-network pass at batch size 1, whichever
    method made it: FastAblationCAM window 2 and Ablation-CAM reuse window 1's sample (16
    masks, 100 ms) and say so. Calls of another size are sampled anew."""
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
    # the full mode's calls of 9 are sampled anew
    third = study.ablation("FastAblationCAM", "relu1", "full", window=2)
    assert len(calls) > timed and third["measured"].startswith("extrapolated: 9 of 9 masks")
    # ReciproCAM's 25 float masks in one call: the whole-network passes of window 1's full
    # row; after the layer the float masks' arithmetic counts, so it is sampled anew
    study.ablation("FastAblationCAM", "relu1", "full", window=1)
    timed = len(calls)
    row = study.ablation("ReciproCAM", "relu1", "full")
    assert len(calls) == timed and "for FastAblationCAM w1 full" in row["measured"]
    study.ablation("FastAblationCAM", "relu1", "head", window=1)
    timed = len(calls)
    row = study.ablation("ReciproCAM", "relu1", "head")
    assert len(calls) > timed and row["measured"].startswith("extrapolated: 25 of 25 masks")


def test_samples_and_complete_runs_watch_the_explainers_scoring(dense_concat_model,
                                                                  monkeypatch):
    """A sample and a complete run are timed without a warm-up call but with the traces of
    the explainer's compiled scoring (public: ``explainer.scorer``), so a first call that
    compiled is timed again rather than kept."""
    calls = stub_clock(monkeypatch, itertools.repeat(1.0))
    study = small_study(dense_concat_model, budget_s=60)
    study.forward()
    before = len(calls)
    row = study.ablation("FastAblationCAM", "relu1", "head", window=2, batch_size=9)
    assert row["evaluations/image"] == 9 and row["measured"] == "all"
    scorer = cam.FastAblationCAM(dense_concat_model, "relu1", window=2, batch_size=9).scorer
    assert len(calls) == before + 2  # the sample, then the complete run
    for warm_up, traces in calls[before:]:
        assert warm_up is False and traces() == scorer.traces >= 1


def test_a_slow_call_is_timed_once():
    calls = []
    assert len(timing.timings_ms(lambda: calls.append(1), 3, cap_ms=None)) == 3
    assert len(calls) == 4  # and the warm-up
    assert len(timing.timings_ms(lambda: calls.append(1), 3, warm_up=False, cap_ms=0)) == 1
    assert len(calls) == 5


def test_a_first_call_that_compiled_is_not_kept():
    traced = []
    fn = lambda: traced.append(1) if not traced else None  # noqa: E731 (compiles once)
    times = timing.timings_ms(fn, 3, warm_up=False, cap_ms=None, traces=lambda: len(traced))
    assert len(times) == 3 and len(traced) == 1
    calls = []
    times = timing.timings_ms(lambda: calls.append(1), 2, warm_up=False, traces=lambda: 0)
    assert len(times) == 2 and len(calls) == 2  # warm already: every call is kept


# -- rows of each kind -----------------------------------------------------------------

def test_gradient_methods_share_one_warm_compiled_gradient(dense_concat_model, monkeypatch):
    calls = stub_clock(monkeypatch, itertools.repeat(100.0))
    study = small_study(dense_concat_model)
    study.forward()
    rows = [study.gradient(m, "relu1") for m in ("Grad-CAM",) + speed.GRADIENT_METHODS]
    assert [r["method"] for r in rows] == ["Grad-CAM", *speed.GRADIENT_METHODS]
    warm_ups = [warm_up for warm_up, _ in calls[2:]]
    assert warm_ups == [True] + [False] * len(speed.GRADIENT_METHODS)  # one warm-up in all
    # one compiled gradient at the layer for all of them (the library shares it)
    target = cam.targets.Class(0)
    assert len({id(study.build(m, "relu1").gradient_function(target))
                for m in ("Grad-CAM",) + speed.GRADIENT_METHODS}) == 1
    study.gradient("Grad-CAM", "relu1", "full")  # another mode: its own gradient, warmed up
    assert calls[-1][0] is True


def test_the_study_explains_what_fresh_explainers_explain(dense_concat_model):
    """The study's explainers (shared compiled functions, its score) give the raw maps of the
    same explainer built on its own, and the sample scores the explainer's own rows."""
    study = small_study(dense_concat_model, batch_size=8, score="probability")
    images, raw = study.images, {"normalize": False, "upsample": False}
    for method, options in [("FastAblationCAM", {"window": 2}), ("ReciproCAM", {"gaussian": True})]:
        for mode in ("head", "per-mask"):
            explainer = study.ablation_explainer(method, "relu1", mode, **options)[0]
            assert explainer.score == "probability"
            fresh = cam.method_class(method)(dense_concat_model, "relu1", mode=explainer.mode,
                                             score="probability", **options)
            np.testing.assert_allclose(explainer(images, **raw), fresh(images, **raw),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{method} {mode}")
    study.forward()
    explainer = study.ablation_explainer("Ablation-CAM", "relu1", "head")[0]
    first = study.first_features(explainer)
    assert first.count == 1
    whole = explainer.perturbed_scores(explainer.features(images), study.targets)
    np.testing.assert_allclose(explainer.perturbed_scores(first, study.targets[:1]), whole[:1],
                               rtol=1e-5, atol=1e-6)


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
    sweep = speed.batch_sweep(study, "relu1", batch_sizes=(1, default))
    assert len(study.rows) == before
    assert sorted(sweep["batch size"]) == [1, 1, default, default]
    assert set(sweep["mode"]) == {"head"}
    main = table.set_index(["method", "mode"])
    ablation = table[(table["mode"] == "head") & table["method"].str.contains("Abl|Recipro")]
    assert len(ablation) >= 3 and (ablation["batch size"] == default).all()
    for _, row in sweep[sweep["batch size"] == default].iterrows():
        assert row["notes"].endswith("(the main table's row)")
        assert row["ms/image"] == main.loc[(row["method"], "head"), "ms/image"]
    assert not study.samples and not study.first  # the layer was released


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
    with timing.PeakMemory() as quiet:
        pass
    with timing.PeakMemory() as busy:
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


# -- the seed's head -----------------------------------------------------------------------

def test_seed_head_model_shares_the_trunk_and_adds_the_reference_head(dense_concat_model):
    model = seed_head.seed_head_model(dense_concat_model, "relu2")
    assert model.get_layer("conv2") is dense_concat_model.get_layer("conv2")  # shared, not copied
    dense = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    assert [d.units for d in dense] == [seed_head.WIDTH, 3]
    assert model.layers[-3].name == "seed_avg_pool"
    scores = np.asarray(model(random_images(model.input_shape[1:], n=2)))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # softmax probabilities
    # the library scores it through the pooled-head shortcut
    assert cam.AblationCAM(model, "relu2", score="probability").path == "pooled"
    assert cam.FastAblationCAM(model, "relu2", score="probability").path == "pooled"


def test_seed_head_rows_are_against_their_own_forward_pass(dense_concat_model, monkeypatch):
    stub_clock(monkeypatch, itertools.chain([100.0, 200.0], itertools.repeat(300.0)))
    images = random_images(dense_concat_model.input_shape[1:], n=2)
    rows, paths = seed_head.seed_head_rows(dense_concat_model, images, layer="relu2", repeats=1,
                                           budget_s=60)
    assert list(rows["method"]) == ["forward pass", "Ablation-CAM", "FastAblationCAM w1"]
    assert set(rows["mode"]) == {seed_head.MODE} and list(rows.columns) == speed.COLUMNS
    assert paths == {"Ablation-CAM": "pooled", "FastAblationCAM w1": "pooled"}
    # forward: 100 ms per 2 images (the faster of 100 and 200, then 300 at the end)
    assert rows["ms/image"].tolist() == [50.0, 150.0, 150.0]
    assert rows["x forward"].tolist() == [1.0, 3.0, 3.0]
    assert rows["evaluations/image"].tolist() == [1, 6, 25]
    assert rows["notes"].str.startswith("GlobalAveragePooling2D, Dense(1664, relu)").all()
    assert rows["notes"].iloc[1].endswith("(path pooled)")


def test_seed_goals_are_met_or_not_from_the_seed_rows():
    table = pd.DataFrame({"method": ["forward pass", "Ablation-CAM", "FastAblationCAM w1",
                                     "Ablation-CAM"],
                          "mode": [seed_head.MODE] * 3 + ["head"],
                          "x forward": [1.0, 1.31, 1.05, 0.5]})
    goals = seed_head.seed_goals(table).set_index("goal")
    assert goals.loc["seed head: Ablation-CAM <= 1.3x", "met"] == "no"  # not the head row's 0.5
    assert goals.loc["seed head: FastAblationCAM w1 <= 1.1x", "met"] == "yes"
    assert seed_head.seed_goals(table.iloc[:1])["met"].tolist() == ["n/a", "n/a"]


# -- public API only -----------------------------------------------------------------------

def test_the_study_reads_no_private_attribute():
    """The speed study asks cam through its public API: no ``obj._name`` in its modules."""
    root = Path(cam.__file__).parent / "study"
    private = []
    for name in STUDY_MODULES:
        tree = ast.parse((root / name).read_text())
        private += [f"{name}:{node.lineno} .{node.attr}" for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")]
    assert private == []
