"""cam.study.faithfulness: shared-trunk maps equal each explainer's own, the predict cache
runs each distinct image once, notebook 05's steps equal the library calls they stand for, and
the numbers of its tables and figures by hand."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import cam  # noqa: E402
from cam import metrics, road  # noqa: E402
from cam.study import faithfulness, faithfulness_figures, models  # noqa: E402

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


@pytest.fixture(scope="module")
def small_cnn():
    import keras

    keras.utils.set_random_seed(0)
    model = models.build_small_cnn(3, image_size=16, width=4)
    images = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3)).astype(np.float32)
    return model, images


def test_explain_together_gives_each_explainers_own_raw_maps(small_cnn):
    model, images = small_cnn
    explainers = {"Grad-CAM": cam.GradCAM(model, "relu"),
                  "Grad-CAM++": cam.GradCAMPlusPlus(model, "relu"),
                  "Ablation-CAM": cam.AblationCAM(model, "relu", batch_size=8),
                  "FastAblationCAM": cam.FastAblationCAM(model, "relu", batch_size=8),
                  "ReciproCAM": cam.ReciproCAM(model, "relu", gaussian=True, batch_size=8),
                  "Score-CAM": cam.ScoreCAM(model, "relu", channels=3, batch_size=4)}
    together = faithfulness.explain_together(explainers, images, batch_size=2, progress=False)
    raws, targets = together.raw, together.targets
    np.testing.assert_array_equal(together.batch_sizes, [2, 2, 1])
    for name, e in explainers.items():
        assert together.seconds[name].shape == (3,) and (together.seconds[name] > 0).all()
        # batches 2 and 3 (the first traces): trunk plus the method, per image
        per_image = (together.trunk_seconds + together.seconds[name])[1:] / [2, 1]
        assert together.ms_per_image(name) == pytest.approx(1000 * np.median(per_image))
        alone = e.explain(images, upsample=False, normalize=False)
        np.testing.assert_array_equal(targets, alone.targets)
        np.testing.assert_allclose(raws[name], alone.raw, rtol=1e-5,
                                   atol=1e-6 * np.abs(alone.raw).max())
    other = faithfulness.explain_together({"g": explainers["Grad-CAM"]}, images, targets=[1] * 5,
                                          progress=False, batch_size=5)
    np.testing.assert_array_equal(other.targets, 1)
    assert np.isnan(other.ms_per_image("g"))  # one batch: nothing timed after the warm-up
    with pytest.raises(ValueError, match="Occlusion in mode 'head' does not start from"):
        faithfulness.explain_together({"o": cam.Occlusion(model, "relu", window=8)}, images)
    with pytest.raises(ValueError, match="every explainer must share the first one's model"):
        faithfulness.explain_together({"a": explainers["Grad-CAM"],
                                       "b": cam.GradCAM(model, "conv4")}, images)


def test_explain_timed_keeps_the_maps_and_times_all_but_the_first_call(small_cnn):
    model, images = small_cnn
    explainer = cam.FastAblationCAM(model, "relu", batch_size=8)
    timed = faithfulness.explain_timed(explainer, images[:3])
    batch = explainer.explain(images[:3])
    np.testing.assert_allclose(timed.maps, batch.maps, atol=1e-5)
    np.testing.assert_array_equal(timed.targets, batch.targets)
    assert np.isnan(timed.seconds[0]) and (timed.seconds[1:] > 0).all()
    assert timed.ms_per_image == pytest.approx(1000 * np.median(timed.seconds[1:]))
    assert np.isnan(faithfulness.explain_timed(explainer, images[:1]).ms_per_image)


def test_cached_predict_runs_each_distinct_image_once():
    seen = []

    def predict(x):
        seen.append(len(x))
        m = x.reshape(len(x), -1).mean(axis=1)
        return np.stack([m, 1 - m], axis=1)

    cached = faithfulness.CachedPredict(predict)
    a, b = np.zeros((2, 2, 1), np.float32), np.full((2, 2, 1), 0.25, np.float32)
    out = cached(np.stack([a, b, a]))
    np.testing.assert_allclose(out, [[0, 1], [0.25, 0.75], [0, 1]])
    assert seen == [2] and (cached.asked, cached.computed) == (3, 2)
    np.testing.assert_allclose(cached(np.stack([b, b])), [[0.25, 0.75]] * 2)
    assert seen == [2] and (cached.asked, cached.computed) == (5, 2)  # nothing new to run
    cached(np.stack([a, -b]))
    assert seen == [2, 1] and cached.computed == 3


def test_mean_ci_and_road_table_by_hand():
    rows = faithfulness.mean_ci_rows({"a": [1.0, 3.0, np.nan], "b": [2.0, 2.0]})
    assert rows.loc["a", "mean"] == 2.0
    assert rows.loc["a", "images"] == 2 and rows.loc["a", "NaN"] == 1
    assert rows.loc["b", "95% CI low"] == rows.loc["b", "95% CI high"] == 2.0
    curves = np.array([[0.9, 0.5, 0.1], [0.7, 0.3, 0.1]])
    result = {"fractions": np.array([0.25, 0.75]), "targets": np.array([0, 1]),
              "morf": curves, "lerf": curves + 0.1, "morf_auc": np.array([0.2, 0.4]),
              "lerf_auc": np.array([0.5, 0.5]), "lerf_minus_morf": np.array([0.3, 0.1])}
    table = faithfulness.road_table({"m": result}, {"m": 12.5})
    row = table.loc["m"]
    assert row["images"] == 2 and row["ms/image"] == 12.5
    assert row["MoRF AUC"] == pytest.approx(0.3) and row["LeRF - MoRF"] == pytest.approx(0.2)
    assert row["MoRF 25%"] == pytest.approx(0.4) and row["LeRF 75%"] == pytest.approx(0.2)
    assert row["LeRF - MoRF CI low"] <= 0.2 <= row["LeRF - MoRF CI high"]


def mean_pixel_predict(x):
    """Class 0's probability is the image's mean pixel (values in [0, 1]); class 1 the rest."""
    m = x.reshape(len(x), -1).mean(axis=1)
    return np.stack([m, 1 - m], axis=1)


def test_image_metrics_by_hand():
    images = np.array([[[1.0, 1.0], [0.0, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])[..., None]
    maps = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.5, 1.0]]])
    masks = np.array([[[True, False], [False, False]], [[True, True], [False, False]]])
    # Image 0, class 0: y = 0.5; masked [[1, 0], [0, 0]] has o = 0.25, a drop of half.
    # Image 1, class 1: y = 0.8; masked [[0, 0], [0.1, 0.2]] has class 1 at 1 - 0.075 = 0.925.
    for batch_size in (1, 2):
        out = faithfulness.image_metrics(mean_pixel_predict, images, maps, masks, [0, 1],
                                         [0.5, 0.8], batch_size)
        assert list(out) == ["Average Drop %", "Increase in Confidence %", "pointing game %",
                             "energy in mask"]
        np.testing.assert_allclose(out["Average Drop %"], [50.0, 0.0])
        np.testing.assert_array_equal(out["Increase in Confidence %"], [0.0, 100.0])
        np.testing.assert_array_equal(out["pointing game %"], [100.0, 0.0])  # peak (1, 1) is out
        np.testing.assert_allclose(out["energy in mask"], [1.0, 0.0])
    # the scores given are what the drop is measured from
    halved = faithfulness.image_metrics(mean_pixel_predict, images, maps, masks, [0, 1],
                                        [1.0, 0.8])
    np.testing.assert_allclose(halved["Average Drop %"], [75.0, 0.0])


def test_cost_table_by_hand():
    explainers = {"A": SimpleNamespace(evaluations_per_image=49), "B": SimpleNamespace(),
                  "C": SimpleNamespace(evaluations_per_image=7)}
    table = faithfulness.cost_table({"A": 2.5, "B": 1.0, "C": 900.0}, explainers,
                                    {"C": 3, "B": 9, "A": 9}, whole_network={"C"})
    assert table.index.name == "method" and list(table.index) == ["A", "B", "C"]
    assert list(table.columns) == ["evaluations/image", "runs", "timed images", "ms/image"]
    assert table["evaluations/image"].tolist() == [49, 1, 7]  # 1 where the explainer has none
    assert table["runs"].tolist() == ["head (trunk once)", "head (trunk once)", "whole network"]
    assert table["timed images"].tolist() == [9, 9, 3]  # by method, not in timed_images' order
    assert table["ms/image"].tolist() == [2.5, 1.0, 900.0]


def test_metric_table_by_hand():
    per_image = {"a": {"x": np.array([1.0, 3.0, np.nan]), "y": np.array([2.0, 2.0])},
                 "b": {"x": np.array([0.0, 4.0, 8.0])}}
    table = faithfulness.metric_table(per_image, {"x": "lower", "y": "higher"})
    assert table.index.names == ["metric", "method"]
    assert list(table.index) == [("x", "a"), ("y", "a"), ("x", "b")]  # method by method
    assert list(table.columns) == ["better", "mean", "95% CI low", "95% CI high", "images", "NaN"]
    assert table["better"].tolist() == ["lower", "higher", "lower"]
    assert table["mean"].tolist() == [2.0, 2.0, 4.0]
    assert table["images"].tolist() == [2, 2, 3] and table["NaN"].tolist() == [1, 0, 0]
    assert table.loc[("y", "a"), "95% CI low"] == table.loc[("y", "a"), "95% CI high"] == 2.0
    low, high = table.loc[("x", "b"), ["95% CI low", "95% CI high"]]
    assert 0.0 <= low < 4.0 < high <= 8.0
    # the same numbers as mean_ci_rows gives per method, with the same seed
    again = faithfulness.mean_ci_rows(per_image["b"], seed=3)
    assert faithfulness.metric_table({"b": per_image["b"]}, {"x": "lower"}, seed=3).loc[
        ("x", "b"), "95% CI low"] == again.loc["x", "95% CI low"]


def test_summary_table_by_hand():
    table = pd.DataFrame(
        {"metric": ["x", "y", "x"], "method": ["a", "a", "b"], "better": ["lower", "higher", "lower"],
         "mean": [0.12345, -0.0, 12.5], "95% CI low": [0.1, -0.0004, 10.0],
         "95% CI high": [0.15, 0.0, 15.0], "images": [10, 10, 4], "NaN": [0, 0, 6]}
    ).set_index(["metric", "method"])
    wide = faithfulness.summary_table(table, {"y": "higher", "x": "lower"}, ["b", "a", "c"], 10)
    assert list(wide.index) == ["y (higher is better)", "x (lower is better)"]
    assert list(wide.columns) == ["b", "a", "c"]
    assert wide.loc["x (lower is better)", "a"] == "0.123 [0.1, 0.15]"
    assert wide.loc["y (higher is better)", "a"] == "0 [-0.0004, 0]"  # not "-0"
    assert wide.loc["x (lower is better)", "b"] == "12.5 [10, 15] n=4"  # fewer images than 10
    assert wide.loc["y (higher is better)", "b"] == "not run"
    assert (wide["c"] == "not run").all()


def test_road_summary_by_hand():
    def result(gaps):
        gaps = np.asarray(gaps, float)
        curves = np.zeros((len(gaps), 3))
        return {"fractions": np.array([0.25, 0.5]), "targets": np.zeros(len(gaps), int),
                "morf": curves, "lerf": curves + 0.5, "morf_auc": np.zeros(len(gaps)),
                "lerf_auc": gaps, "lerf_minus_morf": gaps}

    results = {"m": result([0.1, 0.3, 0.8, 0.8]), "costly": result([0.2, 0.4]),
               "random": result([0.0, -0.2, 0.1, 0.1])}
    cost = pd.DataFrame({"evaluations/image": [1, 49], "runs": ["head", "whole"],
                         "timed images": [3, 1], "ms/image": [4.0, 800.0]},
                        index=pd.Index(["m", "costly"], name="method"))
    table = faithfulness.road_summary(results, cost, 2)
    assert list(table.columns[:3]) == ["images", "evaluations/image", "ms/image"]
    assert table.columns[-1] == "LeRF - MoRF, first 2 images"
    assert table["images"].tolist() == [4, 2, 4]
    assert table.loc["costly", "evaluations/image"] == 49 and table.loc["m", "ms/image"] == 4.0
    assert np.isnan(table.loc["random", "evaluations/image"])  # no cost for random maps
    assert np.isnan(table.loc["random", "ms/image"])
    np.testing.assert_allclose(table["LeRF - MoRF"], [0.5, 0.3, 0.0])
    np.testing.assert_allclose(table["LeRF - MoRF, first 2 images"], [0.2, 0.3, -0.1])
    np.testing.assert_allclose(table["LeRF 50%"], 0.5)


def test_sanity_summary_by_hand():
    rows = [{"stage": s, "reinitialised": name, "layers": layers, "method": m, "image": i,
             "spearman": rho}
            for s, name, layers, values in [(0, "none", 0, {"B": [1.0, 1.0, 1.0], "A": [1.0] * 3}),
                                            (1, "top", 2, {"B": [0.5, np.nan, 0.1],
                                                           "A": [0.2, 0.4, 0.9]})]
            for m, rhos in values.items() for i, rho in enumerate(rhos)]
    summary = faithfulness.sanity_summary(pd.DataFrame(rows))
    assert summary.index.names == ["stage", "reinitialised", "layers"]
    assert list(summary.index) == [(0, "none", 0), (1, "top", 2)]
    assert list(summary.columns) == [(stat, m) for stat in ("mean", "std", "count")
                                     for m in ("A", "B")]
    top = summary.loc[(1, "top", 2)]
    assert top[("mean", "A")] == pytest.approx(0.5) and top[("mean", "B")] == pytest.approx(0.3)
    assert top[("count", "B")] == 2  # the NaN (a constant map) is not counted
    assert top[("std", "A")] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert summary.loc[(0, "none", 0), ("std", "A")] == 0.0


def test_spread_moves_overlapping_labels_apart_symmetrically():
    np.testing.assert_allclose(faithfulness_figures._spread(np.array([0.5, 0.0, 0.01]), 0.1),
                               [0.5, -0.045, 0.055])
    np.testing.assert_allclose(faithfulness_figures._spread(np.array([0.0, 0.3]), 0.1), [0.0, 0.3])


def test_cost_figure_labels_every_costed_method():
    table = pd.DataFrame({"ms/image": [10.0, 12.0, 5000.0, np.nan],
                          "LeRF - MoRF": [0.3, 0.31, 0.2, 0.0],
                          "LeRF - MoRF CI low": [0.2, 0.2, 0.1, 0.0],
                          "LeRF - MoRF CI high": [0.4, 0.4, 0.3, 0.0]},
                         index=["A", "B", "C", "random"])
    table["images"] = [20, 20, 8, 20]
    fig = faithfulness.cost_figure(table, reference=(0.0, -0.05, 0.05), title="t", highlight="B")
    texts = {t.get_text(): t for t in fig.axes[0].texts}
    assert sorted(texts) == ["A", "B", "C (n=8)", "random maps"]
    assert texts["B"].get_color() == "tab:red" and texts["A"].get_color() == "black"
    # A and B are close in cost and score: their labels are pushed apart, C's stays put
    a, b = texts["A"].xyann[1], texts["B"].xyann[1]
    assert b - a == pytest.approx(0.045)
    assert fig.axes[0].get_xscale() == "log"


def test_to_grid_takes_block_means():
    maps = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    out = faithfulness.to_grid(maps, (2, 2))
    np.testing.assert_allclose(out[0], [[2.5, 4.5], [10.5, 12.5]])  # (0 + 1 + 4 + 5) / 4, ...
    np.testing.assert_allclose(out[1], out[0] + 16)
    assert faithfulness.to_grid(maps, (4, 4)) is maps or \
        np.array_equal(faithfulness.to_grid(maps, (4, 4)), maps)  # already on the grid


# Notebook 05's steps.

def test_study_methods_names_settings_and_factories(small_cnn):
    model, _ = small_cnn
    factories = faithfulness.original_methods(window=2, batch_size=12)
    assert list(factories) == ["Grad-CAM", "Ablation-CAM", "FastAblationCAM"]
    fast = factories["FastAblationCAM"](model, "relu")
    assert isinstance(fast, cam.FastAblationCAM) and fast.window == 2 and fast.batch_size == 12
    assert factories["Ablation-CAM"](model, "conv4").layer == "conv4"  # built on what it is given
    layer_methods, costly = faithfulness.study_methods(model, "relu", factories, batch_size=12,
                                                       scorecam_channels=3, occlusion_window=8)
    assert list(layer_methods) == ["Grad-CAM", "Ablation-CAM", "FastAblationCAM", "Grad-CAM++",
                                   "XGrad-CAM", "LayerCAM", "HiResCAM", "ReciproCAM"]
    assert all(e.model is model and e.layer == "relu" for e in layer_methods.values())
    assert all(isinstance(e, faithfulness.SHARES_TRUNK) for e in layer_methods.values())
    assert layer_methods["ReciproCAM"].batch_size == 12
    assert list(costly) == ["Score-CAM (top 3 ch.)", "Occlusion (8 px)"]
    score, occlusion = costly.values()
    assert isinstance(score, cam.ScoreCAM) and score.channels == 3
    assert isinstance(occlusion, cam.Occlusion) and occlusion.window == 8


def test_round_robin_reaches_every_label_before_repeating_one():
    labels = [2, 0, 0, 1, 2, 0, 2]
    #          0  1  2  3  4  5  6   first of each label in label order: 1 (0), 3 (1), 0 (2);
    #          then the second of each: 2 (0), 4 (2); then the third: 5 (0), 6 (2)
    np.testing.assert_array_equal(faithfulness.round_robin(labels), [1, 3, 0, 2, 4, 5, 6])
    np.testing.assert_array_equal(faithfulness.round_robin(labels, 4), [1, 3, 0, 2])
    np.testing.assert_array_equal(faithfulness.round_robin(pd.Series(["b", "a", "b"]), 2), [1, 0])
    with pytest.raises(ValueError, match="n must be >= 0"):
        faithfulness.round_robin(labels, -1)


def test_maps_and_cost_gives_each_methods_own_maps(small_cnn):
    model, images = small_cnn
    layer_methods = {"Grad-CAM": cam.GradCAM(model, "relu"),
                     "FastAblationCAM": cam.FastAblationCAM(model, "relu", batch_size=8)}
    costly = {"Score-CAM": cam.ScoreCAM(model, "relu", channels=2, batch_size=4),
              "Occlusion": cam.Occlusion(model, "relu", window=8)}
    sample = np.array([3, 0, 4])
    maps, positions, targets, cost = faithfulness.maps_and_cost(layer_methods, costly, images,
                                                                sample, seed=5, progress=False)
    assert list(maps) == ["Grad-CAM", "FastAblationCAM", "random", "Score-CAM", "Occlusion"]
    assert list(positions) == ["Score-CAM", "Occlusion"]
    np.testing.assert_array_equal(positions["Occlusion"], sample)
    for name, e in layer_methods.items():
        alone = e.explain(images)  # normalised and upsampled
        np.testing.assert_array_equal(targets, alone.targets)
        np.testing.assert_allclose(maps[name], alone.maps, atol=1e-5)
    for name, e in costly.items():  # the layer's predicted classes, on the sample's images
        alone = e.explain(images[sample], targets=targets[sample])
        assert maps[name].shape == (3, 16, 16)
        np.testing.assert_allclose(maps[name], alone.maps, atol=1e-5)
    random = maps["random"]
    assert random.shape == (5, 16, 16) and random.dtype == np.float32
    assert 0 <= random.min() and random.max() <= 1 and random.std() > 0.2  # uniform, not constant
    again = faithfulness.maps_and_cost(layer_methods, {}, images, [], seed=5, progress=False)
    np.testing.assert_array_equal(again.maps["random"], random)  # the seed fixes them
    assert list(cost.index) == [*layer_methods, *costly]
    assert cost["timed images"].tolist() == [4, 4, 2, 2]  # all but the first (tracing) call
    assert cost["runs"].tolist() == ["head (trunk once)"] * 2 + ["whole network"] * 2
    assert cost.loc["Occlusion", "evaluations/image"] == costly["Occlusion"].evaluations_per_image
    assert (cost["ms/image"] > 0).all()


def test_all_zero_share_by_hand():
    maps = np.zeros((4, 2, 2))
    maps[1, 0, 1] = 0.5
    maps[3] = 1.0
    out = faithfulness.all_zero_share({"a": maps, "b": maps[1:2], "c": np.zeros((3, 2, 2))})
    assert out == {"a": 0.5, "b": 0.0, "c": 1.0}
    assert faithfulness.all_zero_share({"d": np.stack([maps[0]] * 2 + [maps[3]])}) == {"d": 0.667}


def test_study_masks_exact_for_the_synthetic_stand_in_else_segmented(tmp_path):
    from cam.study import segment, synthetic

    table = synthetic.write_dataset(tmp_path, n_per_class=1, size=32, seed=0)
    images = np.zeros((len(table), 32, 32, 3), np.float32)  # the masks come from the files
    masks, source = faithfulness.study_masks("synthetic", tmp_path, table["file"], images)
    assert source == "exact (synthetic)"
    np.testing.assert_array_equal(masks, segment.synthetic_masks(tmp_path, table["file"], 32))
    assert masks.any(axis=(1, 2)).all() and not masks.all(axis=(1, 2)).any()
    with pytest.raises(ValueError, match="square"):
        faithfulness.study_masks("synthetic", tmp_path, table["file"], images[:, :, :16])
    # any other dataset: segmented from the pixels; a dark disc on a pale slide
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 20) ** 2 <= 12 ** 2
    slide = np.where(disc[..., None], [90.0, 60.0, 40.0], [235.0, 230.0, 225.0])[None]
    masks, source = faithfulness.study_masks("polen23e", None, None, slide, progress=False)
    assert source == "segmented (Otsu + morphology)" and masks.dtype == bool
    assert (masks[0] == disc).mean() > 0.98


def test_score_maps_by_method_on_the_images_each_map_is_of():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 6, 6, 1)).astype(np.float32)
    maps = {"a": rng.uniform(0, 1, (4, 6, 6)), "b": rng.uniform(0, 1, (2, 6, 6)),
            "c": rng.uniform(0, 1, (4, 6, 6))}
    masks = rng.uniform(0, 1, (4, 6, 6)) > 0.5
    targets = np.array([0, 1, 1, 0])
    scores = mean_pixel_predict(images)[np.arange(4), targets]
    positions = {"b": np.array([2, 0])}
    per_image, curves = faithfulness.score_maps(mean_pixel_predict, images, maps, masks, targets,
                                                scores, positions, curved=["a", "b"], steps=3,
                                                batch_size=5, progress=False)
    assert list(per_image) == ["a", "b", "c"] and list(curves) == ["a", "b"]
    for name, pick in (("a", np.arange(4)), ("b", positions["b"]), ("c", np.arange(4))):
        expected = faithfulness.image_metrics(mean_pixel_predict, images[pick], maps[name],
                                              masks[pick], targets[pick], scores[pick])
        for metric, values in expected.items():
            np.testing.assert_allclose(per_image[name][metric], values)
    assert "deletion AUC" not in per_image["c"]
    b = curves["b"]
    assert b["deletion"].shape == b["insertion"].shape == (2, 4)
    np.testing.assert_allclose(b["deletion"][:, 0], scores[[2, 0]])  # nothing deleted yet
    np.testing.assert_allclose(b["insertion"][:, -1], scores[[2, 0]], rtol=1e-6)  # all back
    # deleted to black: class 0 (the mean pixel) reaches 0, class 1 reaches 1
    np.testing.assert_allclose(curves["a"]["deletion"][:, -1], targets, atol=1e-7)
    np.testing.assert_allclose(per_image["b"]["deletion AUC"], metrics.auc(b["deletion"]))
    with pytest.raises(ValueError, match=r"no maps for \['d'\]"):
        faithfulness.score_maps(mean_pixel_predict, images, maps, masks, targets, scores,
                                positions, curved=["d"])
    with pytest.raises(ValueError, match="b: 2 maps for 4 images"):
        faithfulness.score_maps(mean_pixel_predict, images, maps, masks, targets, scores)


def test_road_scores_equal_road_per_map_and_share_the_images_asked_twice():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (5, 8, 8, 1)).astype(np.float32)
    sample, first = np.array([4, 1, 3]), np.array([4, 1])
    maps = {"a": rng.uniform(0, 1, (5, 8, 8)), "costly": rng.uniform(0, 1, (2, 8, 8)),
            "b": rng.uniform(0, 1, (5, 8, 8))}
    targets = np.array([0, 1, 0, 1, 1])
    predict = faithfulness.CachedPredict(mean_pixel_predict)
    out = faithfulness.road_scores(predict, images, maps, targets, sample, [0.25, 0.5],
                                   {"costly": first}, batch_size=4, seed=3, progress=False)
    assert list(out) == ["a", "costly", "b"]
    for name, pick in (("a", sample), ("costly", first), ("b", sample)):
        m = maps[name] if name == "costly" else maps[name][sample]
        alone = road_alone(images[pick], m, targets[pick])
        assert set(out[name]) == set(alone)
        for key, value in alone.items():
            np.testing.assert_allclose(out[name][key], value, err_msg=f"{name} {key}")
    np.testing.assert_array_equal(out["costly"]["targets"], targets[first])
    # a and b share one call: each image's unperturbed copy is asked for once, not once each
    def asked(*groups):
        counting = faithfulness.CachedPredict(mean_pixel_predict)
        for names in groups:
            faithfulness.road_scores(counting, images, {n: maps[n] for n in names}, targets,
                                     sample, [0.25, 0.5], batch_size=4, seed=3, progress=False)
        return counting.asked

    # 3 images x (the unperturbed one + 2 maps x 2 orders x 2 fractions)
    assert asked(["a", "b"]) == 3 * (1 + 2 * 2 * 2)
    assert asked(["a"], ["b"]) == 2 * 3 * (1 + 2 * 2)


def road_alone(images, maps, targets):
    return road.road(mean_pixel_predict, images, maps, targets, [0.25, 0.5], seed=3,
                     batch_size=4, progress=False)


def test_with_road_adds_the_three_road_numbers():
    per_image = {"a": {"x": np.array([1.0])}, "b": {"x": np.array([2.0, 3.0])}}
    results = {"b": {"morf_auc": np.array([0.1, 0.2]), "lerf_auc": np.array([0.5, 0.4]),
                     "lerf_minus_morf": np.array([0.4, 0.2])}}
    out = faithfulness.with_road(per_image, results)
    assert list(out) == ["a", "b"] and list(out["a"]) == ["x"]  # no ROAD for a
    assert list(out["b"]) == ["x", "ROAD MoRF AUC", "ROAD LeRF AUC", "ROAD LeRF - MoRF"]
    np.testing.assert_array_equal(out["b"]["ROAD LeRF - MoRF"], [0.4, 0.2])
    assert list(per_image["b"]) == ["x"]  # the input is left as it was
    road_metrics = {f"ROAD {label}" for label in faithfulness.ROAD_SCORES.values()}
    assert road_metrics <= set(faithfulness.BETTER)  # each has a direction in the tables
    with pytest.raises(ValueError, match=r"ROAD results for \['c'\]"):
        faithfulness.with_road(per_image, {"c": results["b"]})


def test_stopwatch_times_parts_and_the_rest():
    ticks = iter([(0.0, 0.0), (1.0, 0.5), (4.0, 2.5), (4.5, 2.5), (5.0, 3.0), (10.0, 4.0),
                  (11.0, 5.0)])
    watch = faithfulness.Stopwatch(clock=lambda: next(ticks))  # started at (0, 0)
    with watch("load"):  # (1, 0.5) to (4, 2.5)
        pass
    assert watch.seconds == {"load": (3.0, 2.0)}
    with watch("fit") as same:  # (4.5, 2.5) to (5, 3)
        assert same is watch
    table = watch.table("rest")  # at (10, 4)
    assert list(table.index) == ["load", "fit", "rest"]
    assert list(table.columns) == ["wall s", "CPU s"]
    np.testing.assert_allclose(table["wall s"], [3.0, 0.5, 6.5])
    np.testing.assert_allclose(table["CPU s"], [2.0, 0.5, 1.5])
    with pytest.raises(ZeroDivisionError):  # a part that fails is not recorded
        with watch("broken"):
            1 / 0
    assert "broken" not in watch.seconds


def test_perturbation_and_road_figures_draw_every_method():
    curve = np.array([[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]])
    curves = {"A": {"deletion": curve, "insertion": curve[:, ::-1]},
              "random": {"deletion": curve * 0.5, "insertion": curve * 0.5}}
    fig = faithfulness.perturbation_figure(curves, "title")
    deletion, insertion = fig.axes
    assert [line.get_label() for line in deletion.lines] == ["A (AUC 0.500)", "random (AUC 0.250)"]
    np.testing.assert_allclose(deletion.lines[0].get_xdata(), [0, 0.5, 1])
    np.testing.assert_allclose(insertion.lines[0].get_ydata(), [0.25, 0.5, 0.75])
    assert deletion.lines[1].get_linestyle() == "--" and fig._suptitle.get_text() == "title"

    def result(level):
        return {"fractions": np.array([0.25, 0.5]), "morf": np.full((2, 3), level),
                "lerf": np.full((2, 3), 1 - level), "morf_auc": np.full(2, level),
                "lerf_auc": np.full(2, 1 - level)}

    results = {f"m{i}": result(i / 20) for i in range(11)} | {"random": result(0.5)}
    fig = faithfulness.road_figure(results, "road")
    morf, lerf = fig.axes
    assert len(morf.lines) == 12 and morf.get_xlim() == (0.0, 0.5)
    np.testing.assert_allclose(morf.lines[0].get_xdata(), [0, 0.25, 0.5])
    assert morf.lines[3].get_label() == "m3 (0.150)" and lerf.lines[3].get_label() == "m3 (0.850)"
    colours = [tuple(line.get_color()) for line in morf.lines[:11]]
    assert len(set(colours[:10])) == 10 and colours[10] == colours[0]  # ten colours, then again
    assert morf.lines[-1].get_color() == "black" and morf.lines[-1].get_linestyle() == "--"


def test_sanity_figure_keeps_the_stage_order():
    rows = [{"stage": s, "reinitialised": name, "method": m, "spearman": rho}
            for s, name in [(1, "top"), (0, "none"), (2, "all")] for m in ("A", "B")
            for rho in (1.0 - s / 2, 0.9 - s / 2)]
    fig = faithfulness.sanity_figure(pd.DataFrame(rows), "sanity", seed=0)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "top", "all"]
    assert ax.get_title() == "sanity" and ax.get_ylim() == (-1.05, 1.05)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["A", "B"]


def test_cost_figure_takes_its_reference_from_a_row():
    table = pd.DataFrame({"ms/image": [10.0, np.nan], "LeRF - MoRF": [0.3, 0.05],
                          "LeRF - MoRF CI low": [0.2, -0.02], "LeRF - MoRF CI high": [0.4, 0.1]},
                         index=["A", "random"])
    ax = faithfulness.cost_figure(table, reference="random").axes[0]
    assert ax.lines[0].get_ydata()[0] == 0.05  # the reference line at random's mean
    band = ax.patches[0]  # its interval, shaded
    assert band.get_y() == pytest.approx(-0.02) and band.get_height() == pytest.approx(0.12)
    assert [t.get_text() for t in ax.texts] == ["random maps", "A"]  # random: no cost, no point
