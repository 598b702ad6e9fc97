"""POLEN23E loading, duplicate grouping and the committed fold table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cam.study import data, paths

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


def _grain(seed: int, size=(40, 48)) -> np.ndarray:
    """A distinct picture per seed: a bright disc on a noisy background."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.integers(12, h - 12), rng.integers(12, w - 12), rng.integers(6, 11)
    img = rng.integers(150, 220, (h, w, 3)).astype(np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(30, 120, 3)
    img[: h // 3, : w // 4] = rng.integers(0, 255, 3)  # a patch that makes pHashes differ
    return img


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """Two classes, one folder each; one TIFF saved under .jpg and one exact duplicate."""
    root = tmp_path / "tree"
    for c, cls in enumerate(["alpha", "beta"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(_grain(10 * c + i)).save(root / cls / f"{cls}_{i:02d}.jpg", "JPEG", quality=95)
    Image.fromarray(_grain(99)).save(root / "beta" / "beta_04.jpg", format="TIFF")  # TIFF named .jpg
    (root / "alpha" / "alpha_04.jpg").write_bytes((root / "alpha" / "alpha_00.jpg").read_bytes())
    (root / "alpha" / "notes.txt").write_text("not an image")
    return root


def test_tiff_named_jpg_is_decoded_by_content(class_tree):
    path = class_tree / "beta" / "beta_04.jpg"
    assert path.read_bytes()[:2] in (b"II", b"MM")  # really a TIFF
    image = data.read_rgb(path)
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, _grain(99))


def test_folder_layout_lists_every_image_with_labels(class_tree):
    frame = data.list_images(class_tree)
    assert list(frame.columns) == ["file", "class", "label"]
    assert len(frame) == 10
    assert frame.groupby("class").size().to_dict() == {"alpha": 5, "beta": 5}
    assert (frame.loc[frame["class"] == "beta", "label"] == 1).all()
    assert not frame["file"].str.endswith(".txt").any()


def test_flat_kaggle_layout_reads_both_name_styles(tmp_path):
    for name, seed in [("anadenanthera_16.jpg", 1), ("senegalia (1).jpg", 2), ("senegalia (12).jpg", 3)]:
        Image.fromarray(_grain(seed)).save(tmp_path / name, "JPEG")
    frame = data.list_images(tmp_path)
    assert dict(zip(frame["file"], frame["class"])) == {
        "anadenanthera_16.jpg": "anadenanthera",
        "senegalia (1).jpg": "senegalia",
        "senegalia (12).jpg": "senegalia",
    }


def test_flat_layout_with_unparseable_name_is_an_error(tmp_path):
    Image.fromarray(_grain(1)).save(tmp_path / "IMG0001.jpg", "JPEG")
    with pytest.raises(data.DatasetError, match="cannot tell the class of IMG0001.jpg"):
        data.list_images(tmp_path)


def test_expected_classes_must_match(class_tree):
    with pytest.raises(data.DatasetError, match=r"missing \['gamma'\]"):
        data.list_images(class_tree, classes=("alpha", "beta", "gamma"))
    frame = data.list_images(class_tree, classes=("beta", "alpha"))
    assert (frame.loc[frame["class"] == "beta", "label"] == 0).all()


def test_unreadable_and_empty_files_are_reported_by_name(class_tree):
    (class_tree / "alpha" / "alpha_05.jpg").write_bytes(b"\xff\xd8 truncated")
    (class_tree / "beta" / "beta_05.jpg").write_bytes(b"")
    files = data.list_images(class_tree)["file"]
    with pytest.raises(data.DatasetError) as err:
        data.load_images(class_tree, files, 32, progress=False)
    message = str(err.value)
    assert "2 of 12 images could not be read" in message
    assert "alpha_05.jpg" in message and "beta_05.jpg" in message


def test_square_resize_keeps_aspect_by_padding_with_background():
    image = np.full((20, 40, 3), 200, np.uint8)
    image[5:15, 15:25] = 0
    out = data.square_resize(image, 40)
    assert out.shape == (40, 40, 3)
    assert (out[:10] == 200).all() and (out[30:] == 200).all()  # padding is the background
    assert out[20, 20].max() == 0  # the dark square is still in the middle, unsquashed
    assert (out[20, 15:25] == 0).all() and (out[15:25, 20] == 0).all()


def test_duplicates_grouped_exact_and_near(class_tree):
    # a near duplicate: the same picture re-encoded with strong JPEG compression
    Image.open(class_tree / "beta" / "beta_01.jpg").save(class_tree / "beta" / "beta_06.jpg", quality=40)
    files = data.list_images(class_tree)["file"].tolist()
    groups = data.duplicate_groups(class_tree, files, progress=False).set_index("file")
    assert groups.loc["alpha/alpha_04.jpg", "group"] == groups.loc["alpha/alpha_00.jpg", "group"]
    assert groups.loc["alpha/alpha_04.jpg", "duplicate_of"] == "alpha/alpha_00.jpg"
    assert groups.loc["beta/beta_06.jpg", "group"] == groups.loc["beta/beta_01.jpg", "group"]
    assert groups["group"].nunique() == len(files) - 2
    singles = groups.drop(["alpha/alpha_04.jpg", "alpha/alpha_00.jpg", "beta/beta_06.jpg", "beta/beta_01.jpg"])
    assert (singles["duplicate_of"] == "").all()


def test_folds_keep_groups_together_and_stratify():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"file": [f"f{i}" for i in range(100)], "label": np.repeat(np.arange(4), 25)})
    frame["group"] = np.arange(100)
    frame.loc[[0, 1, 2], "group"] = 0  # one group of three
    frame.loc[[50, 51], "group"] = 50
    folds = data.make_folds(frame, n_folds=5, seed=0)
    assert folds[[0, 1, 2]].nunique() == 1 and folds[[50, 51]].nunique() == 1
    per_class = pd.crosstab(frame["label"], folds)
    assert per_class.to_numpy().min() >= 4 and per_class.to_numpy().max() <= 6
    assert (data.make_folds(frame, 5, 0) == folds).all()  # deterministic
    del rng


def test_committed_fold_table_is_consistent():
    table = data.read_fold_table()
    assert list(table.columns) == ["file", "class", "label", "group", "duplicate_of", "fold"]
    assert len(table) == 805 and table["file"].is_unique
    assert tuple(sorted(table["class"].unique())) == tuple(sorted(data.POLEN23E_CLASSES))
    assert (table["label"] == table["class"].map(data.POLEN23E_CLASSES.index)).all()
    assert (table.groupby("group")["fold"].nunique() == 1).all()  # no group straddles folds
    assert (pd.crosstab(table["class"], table["fold"]) == 7).all().all()
    pairs = table.set_index("file")["group"]
    for a, b in [("mimosa/mimosa_23.jpg", "mimosa/mimosa_25.jpg"),
                 ("serjania/serjania_16.jpg", "serjania/serjania_29.jpg"),
                 ("croton/croton_22.jpg", "croton/croton_29.jpg")]:
        assert pairs[a] == pairs[b], f"{a} and {b} are the same picture but in different groups"


polen = pytest.mark.skipif(paths.polen23e_dir() is None,
                           reason="POLEN23E not available (set POLEN23E_DIR)")


@polen
def test_real_dataset_matches_the_committed_fold_table():
    """Rebuilding the split from the images gives the committed CSV, row for row."""
    root = paths.polen23e_dir()
    rebuilt = data.build_fold_table(root)
    committed = data.read_fold_table()
    pd.testing.assert_frame_equal(rebuilt.reset_index(drop=True), committed, check_dtype=False)


@polen
def test_real_dataset_decodes_every_file_including_tiff():
    root = paths.polen23e_dir()
    frame = data.list_images(root, data.POLEN23E_CLASSES)
    assert len(frame) == 805 and (frame.groupby("class").size() == 35).all()
    tiffs = [f for f in frame["file"] if (root / f).read_bytes()[:2] in (b"II", b"MM")]
    assert len(tiffs) == 91
    images = data.load_images(root, tiffs[:5] + frame["file"].tolist()[:5], 64, progress=False)
    assert images.shape == (10, 64, 64, 3) and images.std() > 5


def test_sixteen_bit_tiff_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # up to 65520
    Image.fromarray(ramp).save(tmp_path / "deep_01.jpg", format="TIFF")
    image = data.read_rgb(tmp_path / "deep_01.jpg")
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert image.max() == 255 and image.min() == 0
    assert len(np.unique(image[..., 0])) > 200  # a ramp, not a white square


def test_duplicate_grouping_reports_every_unreadable_file(class_tree):
    (class_tree / "alpha" / "alpha_05.jpg").write_bytes(b"broken")
    (class_tree / "beta" / "beta_05.jpg").write_bytes(b"")
    files = data.list_images(class_tree)["file"]
    with pytest.raises(data.DatasetError, match="2 of 12 images could not be read") as err:
        data.duplicate_groups(class_tree, files, progress=False)
    assert "alpha_05.jpg" in str(err.value) and "beta_05.jpg" in str(err.value)


def test_image_sizes_read_from_headers(class_tree):
    sizes = data.image_sizes(class_tree, ["alpha/alpha_00.jpg", "beta/beta_04.jpg"])
    assert sizes.to_dict("list") == {"width": [48, 48], "height": [40, 40]}


def test_held_out_sample_without_the_dataset_is_seeded_random_pixels(monkeypatch):
    monkeypatch.setattr(data, "polen23e_root",
                        lambda: (_ for _ in ()).throw(data.DatasetError("POLEN23E not found")))
    images, source = data.held_out_sample(3, 16, seed=4)
    again, _ = data.held_out_sample(3, 16, seed=4)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images, again)
    assert source == "3 random images (seed 4); POLEN23E not found"


@polen
def test_held_out_sample_takes_fold_zero_images():
    images, source = data.held_out_sample(2, 32)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32 and images.std() > 5
    assert source == "2 held-out POLEN23E images (fold 0, seed 0)"
