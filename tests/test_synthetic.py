"""Tests for cam.study.synthetic: the synthetic pollen generator with ground-truth masks."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cam.study.synthetic import (
    MIN_SIZE,
    SYNTHETIC_CLASSES,
    SyntheticSample,
    make_dataset,
    make_sample,
    write_dataset,
)

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

N_CLASSES = len(SYNTHETIC_CLASSES)
BORDER = 2  # the generator promises this many grain-free pixels on every side


@pytest.fixture(scope="module")
def small_dataset():
    """A dataset at the smallest allowed size, where staying inside the frame is hardest."""
    return make_dataset(n_per_class=12, size=MIN_SIZE, seed=3)


@pytest.fixture(scope="module")
def dataset_96():
    return make_dataset(n_per_class=8, size=96, seed=11)


# --------------------------------------------------------------------------- API shape


def test_classes_constant():
    assert 4 <= N_CLASSES <= 8
    assert len(set(SYNTHETIC_CLASSES)) == N_CLASSES
    assert all(isinstance(c, str) and c for c in SYNTHETIC_CLASSES)


@pytest.mark.parametrize("label", range(N_CLASSES))
def test_make_sample_types(label):
    s = make_sample(label, np.random.default_rng(label), size=80)
    assert isinstance(s, SyntheticSample)
    assert s.image.shape == (80, 80, 3) and s.image.dtype == np.uint8
    assert s.grain_mask.shape == (80, 80) and s.grain_mask.dtype == np.bool_
    assert s.feature_mask.shape == (80, 80) and s.feature_mask.dtype == np.bool_
    assert s.label == label and isinstance(s.label, int)
    assert s.class_name == SYNTHETIC_CLASSES[label]
    with pytest.raises(AttributeError):
        s.label = 0  # frozen dataclass


def test_make_dataset_shapes_and_order(dataset_96):
    images, labels, grain, feature = dataset_96
    n = 8 * N_CLASSES
    assert images.shape == (n, 96, 96, 3) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert grain.shape == (n, 96, 96) and grain.dtype == np.bool_
    assert feature.shape == (n, 96, 96) and feature.dtype == np.bool_
    # classes in order, each exactly n_per_class times
    np.testing.assert_array_equal(labels, np.repeat(np.arange(N_CLASSES), 8))
    np.testing.assert_array_equal(np.bincount(labels, minlength=N_CLASSES), np.full(N_CLASSES, 8))


# --------------------------------------------------------------------------- mask properties


@pytest.mark.parametrize("which", ["small_dataset", "dataset_96"])
def test_masks_consistent_and_inside_frame(which, request):
    images, labels, grain, feature = request.getfixturevalue(which)
    size = images.shape[1]
    # feature_mask is a subset of grain_mask
    assert not np.any(feature & ~grain)
    # every image has a grain and some class features
    assert np.all(grain.reshape(len(grain), -1).any(axis=1))
    assert np.all(feature.reshape(len(feature), -1).any(axis=1))
    # the grain is a proper object, not the whole frame
    assert np.all(grain.mean(axis=(1, 2)) < 0.9)
    # nothing touches the border (and the promised margin is kept)
    frame = np.ones((size, size), bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    assert not np.any(grain[:, frame])


def test_grain_is_one_connected_object(dataset_96):
    _, _, grain, _ = dataset_96
    for m in grain:
        n_labels, _ = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        assert n_labels - 1 == 1


def _n_components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def test_aperture_counts_match_class_definition(dataset_96):
    """Furrows and pores are separate objects: their number is part of the class."""
    _, labels, _, feature = dataset_96
    expected = {"tricolpate": 3, "triangular": 3, "monosulcate": 1}
    for name, count in expected.items():
        label = SYNTHETIC_CLASSES.index(name)
        for m in feature[labels == label]:
            assert _n_components(m) == count, name
    # periporate grains carry more pores than the three of a triangular grain
    per = SYNTHETIC_CLASSES.index("periporate")
    assert all(_n_components(m) > expected["triangular"] for m in feature[labels == per])


def test_features_are_visible_in_the_image(dataset_96):
    """Feature pixels are darker than the rest of the grain in every image."""
    images, _, grain, feature = dataset_96
    gray = np.array([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in images], dtype=np.float64)
    background = ~grain
    for g, gm, fm, bm in zip(gray, grain, feature, background):
        plain = gm & ~fm
        assert g[fm].mean() < g[plain].mean()
        # light background, darker grain
        assert g[bm].mean() > g[gm].mean()


def test_grain_appears_at_different_places(dataset_96):
    _, _, grain, _ = dataset_96
    centres = []
    for m in grain:
        y, x = np.nonzero(m)
        centres.append((y.mean(), x.mean()))
    centres = np.array(centres)
    assert np.unique(np.round(centres), axis=0).shape[0] > len(centres) // 2


# --------------------------------------------------------------------------- determinism


def test_make_sample_deterministic():
    a = make_sample(2, np.random.default_rng(7), size=64)
    b = make_sample(2, np.random.default_rng(7), size=64)
    c = make_sample(2, np.random.default_rng(8), size=64)
    for field in ("image", "grain_mask", "feature_mask"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_make_dataset_deterministic_by_seed():
    a = make_dataset(2, size=48, seed=5)
    b = make_dataset(2, size=48, seed=5)
    c = make_dataset(2, size=48, seed=6)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    np.testing.assert_array_equal(a[1], c[1])  # same labels
    for x, y in zip((a[0], a[2], a[3]), (c[0], c[2], c[3])):
        assert x.tobytes() != y.tobytes()


def test_smaller_dataset_is_per_class_prefix():
    small = make_dataset(2, size=40, seed=9)
    large = make_dataset(3, size=40, seed=9)
    keep = np.tile(np.arange(3) < 2, N_CLASSES)
    for x, y in zip(small, large):
        np.testing.assert_array_equal(x, y[keep])


# --------------------------------------------------------------------------- learnability


def _invariant_features(images: np.ndarray) -> np.ndarray:
    """Position/rotation-invariant image statistics: grey-level and gradient histograms."""
    rows = []
    for im in images:
        g = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).astype(np.float32)
        grad = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
        h_grey = np.histogram(g, bins=16, range=(0, 256))[0]
        h_grad = np.histogram(grad, bins=16, range=(0, 400))[0]
        rows.append(np.concatenate([h_grey, h_grad]) / g.size)
    return np.asarray(rows)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_classes_are_distinguishable_from_pixels():
    """A nearest-centroid classifier on simple image statistics, trained on one seed and
    tested on another, does far better than chance. Would fail if classes looked alike."""
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, _, _ = make_dataset(20, size=64, seed=100)
    x_test, y_test, _, _ = make_dataset(20, size=64, seed=101)
    clf = make_pipeline(StandardScaler(), NearestCentroid())
    clf.fit(_invariant_features(x_train), y_train)
    accuracy = float(np.mean(clf.predict(_invariant_features(x_test)) == y_test))
    chance = 1 / N_CLASSES
    assert accuracy > 2.5 * chance, f"accuracy {accuracy:.2f} vs chance {chance:.2f}"


def test_feature_area_differs_between_classes(dataset_96):
    _, labels, grain, feature = dataset_96
    ratio = feature.sum(axis=(1, 2)) / grain.sum(axis=(1, 2))
    means = np.array([ratio[labels == c].mean() for c in range(N_CLASSES)])
    stds = np.array([ratio[labels == c].std() for c in range(N_CLASSES)])
    # the most and least feature-dense classes are separated by more than their spreads
    hi, lo = means.argmax(), means.argmin()
    assert means[hi] - means[lo] > 2 * (stds[hi] + stds[lo])


# --------------------------------------------------------------------------- write_dataset


def test_write_dataset_layout_and_dataframe(tmp_path: Path):
    root = tmp_path / "synth"
    df = write_dataset(root, n_per_class=2, size=48, seed=4)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["file", "class", "label", "grain_mask", "feature_mask"]
    assert len(df) == 2 * N_CLASSES
    assert df["label"].tolist() == np.repeat(np.arange(N_CLASSES), 2).tolist()
    assert (df["class"] == df["label"].map(lambda i: SYNTHETIC_CLASSES[i])).all()

    # folders: one per class plus masks/
    assert sorted(p.name for p in root.iterdir()) == sorted([*SYNTHETIC_CLASSES, "masks"])
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    listed = set(df["file"]) | set(df["grain_mask"]) | set(df["feature_mask"])
    assert on_disk == listed
    for row in df.itertuples(index=False):
        assert re.fullmatch(rf"{row[1]}/{row[1]}_\d{{2,}}\.png", row.file)
        stem = Path(row.file).stem
        assert row.grain_mask == f"masks/{stem}_grain.png"
        assert row.feature_mask == f"masks/{stem}_feature.png"

    # the files hold exactly what make_dataset returns (RGB order preserved)
    images, labels, grain, feature = make_dataset(2, size=48, seed=4)
    for i, row in enumerate(df.itertuples(index=False)):
        bgr = cv2.imread(str(root / row.file), cv2.IMREAD_UNCHANGED)
        assert bgr.shape == (48, 48, 3)
        np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), images[i])
        for col, ref in (("grain_mask", grain[i]), ("feature_mask", feature[i])):
            m = cv2.imread(str(root / getattr(row, col)), cv2.IMREAD_UNCHANGED)
            assert m.shape == (48, 48) and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 255}
            np.testing.assert_array_equal(m == 255, ref)


def test_written_layout_is_read_by_the_polen23e_loader(tmp_path: Path):
    """cam.study.data.list_images reads the class folders and skips masks/."""
    from cam.study.data import list_images

    df = write_dataset(tmp_path, n_per_class=1, size=MIN_SIZE, seed=0)
    listed = list_images(tmp_path, classes=SYNTHETIC_CLASSES)
    assert sorted(listed["file"]) == sorted(df["file"])
    merged = listed.merge(df, on="file", suffixes=("_loader", ""))
    assert (merged["class_loader"] == merged["class"]).all()
    assert (merged["label_loader"] == merged["label"]).all()


# --------------------------------------------------------------------------- progress bar


def test_progress_only_for_large_datasets(capsys):
    make_dataset(2, size=MIN_SIZE, seed=0)
    assert "synthetic pollen" not in capsys.readouterr().err
    n_per_class = 200 // N_CLASSES + 1  # N > 200
    make_dataset(n_per_class, size=MIN_SIZE, seed=0)
    assert "synthetic pollen" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("label", [-1, N_CLASSES, 1.0, True, "0"])
def test_bad_label(label):
    with pytest.raises(ValueError, match=r"label.*0\.\." + str(N_CLASSES - 1)) as info:
        make_sample(label, np.random.default_rng(0))
    assert SYNTHETIC_CLASSES[0] in str(info.value)


@pytest.mark.parametrize("size", [MIN_SIZE - 1, 0, -5, 64.0])
def test_bad_size(size, tmp_path):
    pattern = rf"size.*>= {MIN_SIZE}"
    with pytest.raises(ValueError, match=pattern):
        make_sample(0, np.random.default_rng(0), size=size)
    with pytest.raises(ValueError, match=pattern):
        make_dataset(1, size=size)
    with pytest.raises(ValueError, match=pattern):
        write_dataset(tmp_path, 1, size=size)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_n_per_class(n, tmp_path):
    with pytest.raises(ValueError, match=r"n_per_class.*>= 1"):
        make_dataset(n)
    with pytest.raises(ValueError, match=r"n_per_class.*>= 1"):
        write_dataset(tmp_path / "out", n)
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_bad_seed_and_rng():
    with pytest.raises(ValueError, match=r"seed.*>= 0"):
        make_dataset(1, seed=-1)
    with pytest.raises(TypeError, match="Generator"):
        make_sample(0, 42)  # type: ignore[arg-type]


def test_minimum_size_is_accepted():
    s = make_sample(0, np.random.default_rng(0), size=MIN_SIZE)
    assert s.image.shape == (MIN_SIZE, MIN_SIZE, 3)
