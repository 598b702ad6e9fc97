"""cam.study.faithfulness: shared-trunk maps equal each explainer's own, the predict cache
runs each distinct image once, and the numbers of notebook 05's tables by hand."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import cam  # noqa: E402
from cam.study import faithfulness, models  # noqa: E402

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
    np.testing.assert_allclose(faithfulness._spread(np.array([0.5, 0.0, 0.01]), 0.1),
                               [0.5, -0.045, 0.055])
    np.testing.assert_allclose(faithfulness._spread(np.array([0.0, 0.3]), 0.1), [0.0, 0.3])


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
