"""cam.study.atlas (notebook 09): class means and spread, disagreement between methods and the
misclassified images' maps, on four images with 2x2 maps worked out by hand, read back from a
Parquet dataset written with cam.bulk's own schema."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cam.study import atlas, paths

matplotlib.use("Agg")
pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

FOLDS = pd.DataFrame({"file": ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "b/3.png"],
                      "class": ["a", "a", "b", "b", "b"], "label": [0, 0, 1, 1, 1],
                      "fold": [0, 1, 0, 1, 2]})
#: Raw maps on a 2x2 grid. Grad-CAM normalised: a/1 [[1,0],[0,0]], a/2 [[1,1],[0,0]],
#: b/1 [[0,0],[0,1]], b/2 [[0,0],[1,1]]. b/1 is taken for class a (misclassified).
GRADCAM = {"a/1.png": [[4, 0], [0, 0]], "a/2.png": [[2, 2], [0, 0]],
           "b/1.png": [[0, 0], [0, 1]], "b/2.png": [[0, 0], [3, 3]]}
#: FastAblationCAM: the same on a/*, b/1 negated (all zeros once normalised), b/2 flipped.
FASTABLATION = {**GRADCAM, "b/1.png": [[0, 0], [0, -1]], "b/2.png": [[3, 3], [0, 0]]}
PREDICTED = {"a/1.png": 0, "a/2.png": 0, "b/1.png": 0, "b/2.png": 1}


def _rows() -> list[dict]:
    rows = []
    for method, maps in (("gradcam", GRADCAM), ("fastablationcam", FASTABLATION)):
        for path, raw in maps.items():
            raw = np.asarray(raw, np.float32)
            rows.append({"path": path, "sha256": path, "height": 20, "width": 30,
                         "predicted": PREDICTED[path], "predicted_score": 2.0,
                         "target": "predicted", "target_class": PREDICTED[path],
                         "target_score": 1.5, "method": method, "layer": "relu",
                         "map": raw.ravel().tolist(), "map_height": 2, "map_width": 2,
                         "map_min": float(raw.min()), "map_max": float(raw.max()),
                         "seconds": 0.1})
    return rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> pd.DataFrame:
    """The hand-made rows written as cam.bulk writes them (its schema, a shard under maps/)
    and read back with the fold table joined."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from cam import bulk

    out = tmp_path_factory.mktemp("atlas")
    (out / "maps").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows()[::-1], schema=bulk.schema()),
                   out / "maps" / "part-0.parquet")
    return atlas.read_maps(out, FOLDS)


def test_read_maps_joins_the_fold_table_and_marks_the_misclassified(rows):
    assert len(rows) == 8
    assert rows[["path", "method"]].values.tolist()[:2] == [["a/1.png", "fastablationcam"],
                                                          ["a/1.png", "gradcam"]]
    gradcam = rows[rows["method"] == "gradcam"].set_index("path")
    assert gradcam["class"].tolist() == ["a", "a", "b", "b"]
    assert gradcam["fold"].tolist() == [0, 1, 0, 1]
    assert gradcam["correct"].tolist() == [True, True, False, True]
    np.testing.assert_array_equal(atlas.maps_of(rows, "gradcam")[3], [[0, 0], [3, 3]])


def test_a_row_outside_the_fold_table_or_a_second_grid_is_an_error(rows):
    stray = pd.DataFrame(_rows()[:1]).assign(path="c/9.png")
    with pytest.raises(ValueError, match="1 path.*not in the fold table, e.g. c/9.png"):
        atlas.join_folds(stray, FOLDS)
    bigger = rows.copy()
    bigger.loc[0, ["map_height", "map_width"]] = [1, 4]
    with pytest.raises(ValueError, match="several grids"):
        atlas.maps_of(bigger)
    with pytest.raises(ValueError, match="no rows for method 'layercam'"):
        atlas.class_maps(rows, "layercam")


def test_class_means_and_spread_by_hand(rows):
    maps = atlas.class_maps(rows, "gradcam")
    assert maps.classes == ["a", "b"] and maps.counts.tolist() == [2, 2]
    np.testing.assert_allclose(maps.mean[0], [[1, 0.5], [0, 0]])
    np.testing.assert_allclose(maps.std[0], [[0, 0.5], [0, 0]])  # population std
    np.testing.assert_allclose(maps.mean[1], [[0, 0], [0.5, 1]])
    np.testing.assert_allclose(maps.std[1], [[0, 0], [0.5, 0]])
    table = maps.table()
    assert table.loc["a", "mean map sum"] == pytest.approx(1.5)
    assert table.loc["b", "spread (mean cell std)"] == pytest.approx(0.125)
    assert table.loc["b", ["peak row", "peak column"]].tolist() == [1, 1]
    np.testing.assert_allclose(maps.means_of([1, 0, 1]), maps.mean[[1, 0, 1]])
    np.testing.assert_allclose(atlas.normalised_for(rows, "gradcam", ["b/2.png", "a/2.png"]),
                               [[[0, 0], [1, 1]], [[1, 1], [0, 0]]])


def test_pearson_and_cosine_distance_by_hand():
    a = np.array([[1, 2, 3, 4], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], float)
    b = np.array([[2, 4, 6, 8], [0, 1, 0, 0], [1, 2, 3, 4], [1, 0, 0, 0]], float)
    r = atlas.pearson(a, b)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1 / 3)
    assert np.isnan(r[2]) and np.isnan(r[3])  # a constant map
    d = atlas.cosine_distance(a, b)
    assert d[0] == pytest.approx(0.0) and d[1] == pytest.approx(1.0)
    assert d[2] == pytest.approx(1 - 10 / (2 * np.sqrt(30)))
    assert np.isnan(d[3])  # an all-zero map


def test_disagreement_ranks_the_images_where_the_methods_differ_first(rows):
    table = atlas.disagreement(rows, "gradcam", "fastablationcam")
    assert table.index.tolist() == ["b/1.png", "b/2.png", "a/1.png", "a/2.png"]
    # b/1: [0,0,0,1] against [0,0,0,-1] ranks reversed; negated, its normalised map is zeros
    assert table.loc["b/1.png", "spearman"] == pytest.approx(-1)
    assert np.isnan(table.loc["b/1.png", "pearson"])
    assert np.isnan(table.loc["b/1.png", "cosine distance"])
    # b/2: the bottom row against the top row
    assert table.loc["b/2.png", ["spearman", "pearson", "cosine distance"]].tolist() == \
        pytest.approx([-1, -1, 1])
    assert table.loc["a/1.png", ["spearman", "pearson", "cosine distance"]].tolist() == \
        pytest.approx([1, 1, 0])
    summary = atlas.agreement_table(rows, ["gradcam", "fastablationcam"])
    row = summary.loc["gradcam vs fastablationcam"]
    assert row["images"] == 4 and row["undefined"] == 0
    assert row["spearman mean"] == pytest.approx(0) and row["spearman min"] == pytest.approx(-1)
    assert row["pearson mean"] == pytest.approx(1 / 3)  # b/1's NaN left out
    assert row["cosine distance mean"] == pytest.approx(1 / 3)
    assert row["cosine distance max"] == pytest.approx(1)


def test_misclassified_against_its_class_mean_without_it_and_the_taken_class(rows):
    maps = atlas.class_maps(rows, "gradcam")
    table = atlas.misclassified(rows, maps)
    assert table.index.tolist() == ["b/1.png"]
    row = table.loc["b/1.png"]
    assert (row["class"], row["predicted class"], row["fold"]) == ("b", "a", 0)
    # [0,0,0,1] against b/2 alone [0,0,1,1]: 0.5 / sqrt(0.75 * 1)
    assert row["r own class"] == pytest.approx(1 / np.sqrt(3))
    # against class a's mean [1,0.5,0,0]: -0.375 / sqrt(0.75 * 0.6875)
    assert row["r predicted class"] == pytest.approx(-0.375 / np.sqrt(0.75 * 0.6875))
    assert row["closer to"] == "own class"


def test_misclassified_in_a_class_of_one_has_no_own_mean(rows):
    alone = rows[rows["path"] != "b/2.png"]
    table = atlas.misclassified(alone, atlas.class_maps(alone, "gradcam"))
    assert np.isnan(table.loc["b/1.png", "r own class"])
    assert table.loc["b/1.png", "closer to"] == "undefined"


def test_no_misclassified_image_gives_an_empty_table(rows):
    right = rows[rows["path"] != "b/1.png"]
    table = atlas.misclassified(right, atlas.class_maps(right, "gradcam"))
    assert table.empty and "closer to" in table.columns
    assert atlas.pearson(np.zeros((0, 2, 2)), np.zeros((0, 2, 2))).shape == (0,)


def test_link_images_holds_exactly_the_chosen_files(tmp_path):
    from cam import bulk

    root = tmp_path / "data"
    for name in ["a/1.png", "a/2.png", "b/1.png", "README.md"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    folder = atlas.link_images(root, ["a/2.png", "b/1.png"], tmp_path / "links")
    (folder / "stale.png").write_bytes(b"")  # a previous run's: removed by the next
    folder = atlas.link_images(root, ["a/2.png", "b/1.png"], tmp_path / "links")
    kind, sources = bulk.list_inputs(folder)
    assert kind == "folder" and [s.name for s in sources] == ["a/2.png", "b/1.png"]
    assert (folder / "b/1.png").read_bytes() == b"b/1.png"
    with pytest.raises(FileNotFoundError, match="c/1.png is not in"):
        atlas.link_images(root, ["c/1.png"], tmp_path / "links")


def test_bulk_folder_is_under_build_and_names_the_results_folder():
    assert atlas.bulk_folder("results/polen23e") == paths.ROOT / "build/atlas/results-polen23e"
    assert atlas.bulk_folder(paths.ROOT / "build/ci-notebooks/polen23e").name == \
        "build-ci-notebooks-polen23e"


def test_run_table_and_the_class_figure(rows, tmp_path):
    summary = SimpleNamespace(engine="local", listed=5, explained=4, skipped=0, failed=1,
                              rows=8, seconds=2.0, images_per_second=2.0,
                              stages={"decode": 0.5, "explain": 1.25, "write": 0.04})
    table = atlas.run_table(summary, ["gradcam", "fastablationcam"], "relu")
    assert table.iloc[0][["explained", "failed", "images/s", "explain s", "write s"]].tolist() \
        == [4, 1, 2.0, 1.2, 0.0]
    maps = atlas.class_maps(rows, "gradcam")
    examples = np.zeros((2, 8, 8, 3), np.uint8)
    fig = atlas.class_maps_figure(maps, examples, columns=2, save=tmp_path / "09-x.png")
    assert (tmp_path / "09-x.png").stat().st_size > 0
    titles = [ax.get_title() for ax in fig.axes if ax.images]  # three panels per class
    assert titles == ["a (n=2)", "mean", "spread (std)", "b (n=2)", "mean", "spread (std)"]
    with pytest.raises(ValueError, match="1 examples for 2 classes"):
        atlas.class_maps_figure(maps, examples[:1])


def test_a_real_cam_bulk_run_reads_back_into_the_atlas(tmp_path):
    """cam.bulk on four tiny images of two classes, read back: every image's rows joined, and
    at a layer followed by global average pooling and one dense layer FastAblationCAM (window
    1) is Grad-CAM, so the two agree on every image."""
    pytest.importorskip("pyarrow")
    import keras
    from keras import layers as L
    from PIL import Image

    import cam

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 3)), L.Rescaling(1 / 255),
                              L.Conv2D(4, 3, padding="same", activation="relu", name="relu"),
                              L.GlobalAveragePooling2D(), L.Dense(2, name="logits")])
    rng = np.random.default_rng(0)
    files = ["a/1.png", "a/2.png", "b/1.png", "b/2.png"]
    for name in files:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).save(tmp_path / "data" / name)
    folds = pd.DataFrame({"file": files, "class": ["a", "a", "b", "b"], "label": [0, 0, 1, 1],
                          "fold": [0, 1, 0, 1]})
    images = atlas.link_images(tmp_path / "data", files, tmp_path / "links")
    summary = cam.bulk(model, images, tmp_path / "out", layer="relu",
                       methods=["gradcam", "fastablationcam"], progress=False)
    assert (summary.explained, summary.failed, summary.rows) == (4, 0, 8)
    rows = atlas.read_maps(tmp_path / "out", folds)
    assert sorted(set(rows["path"])) == files and rows["label"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert atlas.maps_of(rows, "gradcam").shape == (4, 12, 12)
    agree = atlas.disagreement(rows, "gradcam", "fastablationcam")
    assert (agree["spearman"] > 0.999).all() and (agree["cosine distance"] < 1e-4).all()
    assert atlas.class_maps(rows, "gradcam").counts.tolist() == [2, 2]
