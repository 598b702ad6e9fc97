"""POLEN23E: find, decode and split the images.

The raw files have traps (see the dataset's SOURCE.md): 91 files named ``.jpg`` are TIFF,
some file names contain spaces and parentheses, and there are duplicate pairs. Every image is
therefore decoded by its content (Pillow reads the magic bytes, not the extension), and the
folds are built from groups of duplicates so that no picture sits on both sides of a split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import pdist, squareform
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from ..images import ImageError, read_rgb, square_resize  # noqa: F401  (re-exported)
from . import paths
from .download import IMAGE_EXTENSIONS, class_from_name

#: The 23 pollen types of POLEN23E, in label order (the prefixes the Kaggle copy uses).
POLEN23E_CLASSES: tuple[str, ...] = (
    "anadenanthera", "arecaceae", "arrabidaea", "cecropia", "chromolaena", "combretum",
    "croton", "dipteryx", "eucalipto", "faramea", "hyptis", "mabea", "matayba", "mimosa",
    "myrcia", "protium", "qualea", "schinus", "senegalia", "serjania", "syagrus", "tridax",
    "urochloa",
)
N_FOLDS = 5
FOLD_SEED = 0
#: Perceptual hashes (64-bit pHash) this close are treated as the same picture. On POLEN23E the
#: known pairs sit at 0 (mimosa_23/25, serjania_16/29) and 4 (croton_22/29, same grain refocused);
#: at 6 the first cross-class pairs appear (serjania vs matayba), so 4 is the largest safe value.
NEAR_DUPLICATE_MAX_DISTANCE = 4

class DatasetError(RuntimeError):
    """The dataset on disk is not what it should be (missing, unreadable or incomplete files)."""


def list_images(root: str | Path, classes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """List the images of a dataset in either layout, one row per file (``file``, ``class``).

    Reads the one-folder-per-class layout (the figshare original, the shared copy) and the flat
    Kaggle layout (class prefix in the file name, old labels such as ``acacia`` mapped as the
    downloader maps them). A top-level ``masks/`` folder (the synthetic stand-in's ground
    truth) is not part of the images. Files are sorted by class then name, so the
    order does not depend on the file system. ``classes``, when given, must match the folders
    or prefixes found exactly.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    # The synthetic stand-in keeps its ground-truth masks in a top-level masks/ folder.
    files = [p for p in files if p.relative_to(root).parts[0] != "masks"]
    if not files:
        raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    rows = []
    for path in files:
        rel = path.relative_to(root)
        if len(rel.parts) >= 2:
            label = rel.parts[-2].lower()
        else:
            label = class_from_name(path.name)
            if label is None:
                raise DatasetError(
                    f"cannot tell the class of {rel}: flat-layout names must look like "
                    f"'<class>_<n>.jpg' or '<class> (<n>).jpg'"
                )
        rows.append((rel.as_posix(), label))
    frame = pd.DataFrame(rows, columns=["file", "class"])
    found = tuple(sorted(frame["class"].unique()))
    if classes is not None and set(found) != set(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DatasetError(
            f"classes under {root} do not match the expected {len(classes)}: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    order = {c: i for i, c in enumerate(classes or found)}
    frame["label"] = frame["class"].map(order).astype("int64")
    return frame.sort_values(["label", "file"], ignore_index=True)


def image_sizes(root: str | Path, files) -> pd.DataFrame:
    """Width and height of each file, read from its header (no decoding)."""
    root = Path(root)
    sizes = []
    for rel in files:
        with Image.open(root / rel) as img:
            sizes.append(img.size)
    return pd.DataFrame(sizes, columns=["width", "height"])


def load_images(root: str | Path, files, size: int, progress: bool = True) -> np.ndarray:
    """Decode ``files`` (relative to ``root``) to a (N, size, size, 3) uint8 array.

    Every file is tried; if any cannot be read, one error lists all of them by name instead of
    continuing with fewer images than were asked for.
    """
    root = Path(root)
    files = list(files)
    out = np.empty((len(files), size, size, 3), np.uint8)
    bad = []
    for i, rel in enumerate(tqdm(files, desc=f"decoding {len(files)} images at {size}px",
                                 disable=not progress, leave=False)):
        try:
            out[i] = square_resize(read_rgb(root / rel), size)
        except ImageError as err:
            bad.append(str(err))
    if bad:
        raise DatasetError(f"{len(bad)} of {len(files)} images could not be read:\n  " + "\n  ".join(bad))
    return out


def pixel_digest(image: np.ndarray) -> str:
    """SHA-256 of decoded pixels: equal for the same picture saved as JPEG twice, or copied."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def duplicate_groups(root: str | Path, files, max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE,
                     progress: bool = True) -> pd.DataFrame:
    """Group exact (same pixels) and near duplicates (pHash within ``max_distance`` bits).

    Returns one row per file with ``group`` (an int shared by all copies of one picture,
    numbered in file order) and ``duplicate_of`` (the first file of its group, for the other
    members). Near-duplicates chain: A~B and B~C put A, B and C in one group (connected
    components of the "same picture" graph).
    """
    root = Path(root)
    files = list(files)
    digests, bits, bad = [], [], []
    for rel in tqdm(files, desc="hashing images for duplicates", disable=not progress, leave=False):
        try:
            image = read_rgb(root / rel)
        except ImageError as err:
            bad.append(str(err))
            continue
        digests.append(pixel_digest(image))
        bits.append(imagehash.phash(Image.fromarray(image)).hash.ravel())
    if bad:
        raise DatasetError(f"{len(bad)} of {len(files)} images could not be read:\n  " + "\n  ".join(bad))
    bits = np.stack(bits)
    hamming = squareform(pdist(bits, metric="hamming")) * bits.shape[1]
    same = (hamming <= max_distance) | (np.array(digests)[:, None] == np.array(digests)[None, :])
    _, labels = connected_components(csr_matrix(same), directed=False)
    first = {}
    for i, label in enumerate(labels):
        first.setdefault(label, i)
    group_of = {label: g for g, label in enumerate(first)}  # numbered by first member
    return pd.DataFrame({
        "file": files,
        "group": [group_of[label] for label in labels],
        "duplicate_of": [files[first[label]] if first[label] != i else "" for i, label in enumerate(labels)],
    })


def make_folds(frame: pd.DataFrame, n_folds: int = N_FOLDS, seed: int = FOLD_SEED) -> pd.Series:
    """Assign each row a fold with ``StratifiedGroupKFold`` so no duplicate group is split."""
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(frame), -1, dtype=np.int64)
    for k, (_, test) in enumerate(splitter.split(frame["file"], frame["label"], frame["group"])):
        fold[test] = k
    return pd.Series(fold, index=frame.index, name="fold")


def build_fold_table(root: str | Path, classes: tuple[str, ...] | None = POLEN23E_CLASSES,
                     n_folds: int = N_FOLDS, seed: int = FOLD_SEED) -> pd.DataFrame:
    """The split as a table: file, class, label, group, duplicate_of, fold."""
    frame = list_images(root, classes)
    groups = duplicate_groups(root, frame["file"])
    frame = frame.merge(groups, on="file", validate="one_to_one")
    frame["fold"] = make_folds(frame, n_folds, seed)
    return frame[["file", "class", "label", "group", "duplicate_of", "fold"]]


def read_fold_table(path: str | Path = paths.POLEN23E_FOLDS_CSV) -> pd.DataFrame:
    """Read the committed split (``data/polen23e-folds.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"fold table {path} is missing; rebuild it with `python -m cam.study.data folds`")
    return pd.read_csv(path, keep_default_na=False)


def polen23e_root() -> Path:
    """The POLEN23E folder, or a clear error saying how to get one."""
    root = paths.polen23e_dir()
    if root is None:
        raise DatasetError(
            f"POLEN23E not found: set {paths.POLEN23E_ENV} to a copy of the dataset, or run "
            f"`make data` to download it into {paths.POLEN23E_DEFAULT_DIR}"
        )
    return root


def held_out_sample(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` held-out POLEN23E images (fold 0, a seeded sample) at ``size`` px as float32,
    with a line saying what they are; seeded random pixels when the dataset is absent (the
    benchmarks run anywhere)."""
    try:
        root = polen23e_root()
    except DatasetError as error:
        pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3))
        return pixels.astype(np.float32), f"{n} random images (seed {seed}); {error}"
    folds = read_fold_table()
    rows = folds[folds["fold"] == 0].sample(n, random_state=seed).sort_index()
    images = load_images(root, rows["file"], size, progress=False)
    return images.astype(np.float32), f"{n} held-out POLEN23E images (fold 0, seed {seed})"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cam.study.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    folds = sub.add_parser("folds", help="rebuild data/polen23e-folds.csv from the images")
    folds.add_argument("--root", type=Path, default=None, help="dataset folder (default: $POLEN23E_DIR)")
    folds.add_argument("--out", type=Path, default=paths.POLEN23E_FOLDS_CSV)
    args = parser.parse_args(argv)
    try:
        table = build_fold_table(args.root or polen23e_root())
    except DatasetError as err:
        print(f"error: {err}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    dups = table[table["duplicate_of"] != ""]
    print(f"wrote {args.out}: {len(table)} images, {table['group'].nunique()} groups, "
          f"{len(dups)} duplicates, fold sizes {table['fold'].value_counts().sort_index().tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
