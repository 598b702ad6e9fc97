"""POLEN23E: find, decode and split the images.

The raw files have traps (see the dataset's SOURCE.md): 91 files named ``.jpg`` are TIFF,
some file names contain spaces and parentheses, and there are duplicate pairs. Every image is
therefore decoded by its content (Pillow reads the magic bytes, not the extension), and the
folds are built from groups of duplicates so that no picture sits on both sides of a split.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from . import paths

#: The 23 pollen types of POLEN23E, in label order (the prefixes the Kaggle copy uses).
POLEN23E_CLASSES: tuple[str, ...] = (
    "anadenanthera", "arecaceae", "arrabidaea", "cecropia", "chromolaena", "combretum",
    "croton", "dipteryx", "eucalipto", "faramea", "hyptis", "mabea", "matayba", "mimosa",
    "myrcia", "protium", "qualea", "schinus", "senegalia", "serjania", "syagrus", "tridax",
    "urochloa",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
N_FOLDS = 5
FOLD_SEED = 0
#: Perceptual hashes (64-bit pHash) this close are treated as the same picture. On POLEN23E the
#: known pairs sit at 0 (mimosa_23/25, serjania_16/29) and 4 (croton_22/29, same grain refocused);
#: at 6 the first cross-class pairs appear (serjania vs matayba), so 4 is the largest safe value.
NEAR_DUPLICATE_MAX_DISTANCE = 4

_CLASS_FROM_NAME = re.compile(r"^(?P<cls>[a-z]+?)(?:_\d+| \(\d+\))$")


class DatasetError(RuntimeError):
    """The dataset on disk is not what it should be (missing, unreadable or incomplete files)."""


@dataclass(frozen=True)
class ImageRecord:
    file: str  # path relative to the dataset root, with forward slashes
    label: str


def class_from_filename(path: Path) -> str | None:
    """Class prefix of a flat-layout name: ``anadenanthera_16.jpg``, ``senegalia (1).jpg``."""
    match = _CLASS_FROM_NAME.match(path.stem.lower())
    return match.group("cls") if match else None


def list_images(root: str | Path, classes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """List the images of a dataset in either layout, one row per file (``file``, ``class``).

    Reads the one-folder-per-class layout (the figshare original, the shared copy) and the flat
    Kaggle layout (class prefix in the file name). Files are sorted by class then name, so the
    order does not depend on the file system. ``classes``, when given, must match the folders
    or prefixes found exactly.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in files if "masks" not in p.relative_to(root).parts[:-1]]
    if not files:
        raise DatasetError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    rows = []
    for path in files:
        rel = path.relative_to(root)
        if len(rel.parts) >= 2:
            label = rel.parts[-2].lower()
        else:
            label = class_from_filename(path)
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


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image by its content (JPEG, TIFF, PNG ... whatever its name says) to RGB uint8."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"cannot decode {path}: {err}") from err
    if array.size == 0 or min(array.shape[:2]) < 2:
        raise DatasetError(f"{path} decodes to an empty image of shape {array.shape}")
    return array


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pad an image to a square with its median border colour, then resize to ``size``.

    Padding keeps the grain's aspect ratio (a plain resize would squash oblong grains); the
    median border colour is the slide background in these microscope images.
    """
    h, w = image.shape[:2]
    side = max(h, w)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    fill = np.median(border, axis=0).astype(image.dtype).tolist()
    top, left = (side - h) // 2, (side - w) // 2
    padded = cv2.copyMakeBorder(
        image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=fill
    )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(padded, (size, size), interpolation=interpolation)


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
        except DatasetError as err:
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

    Returns one row per file with ``group`` (an int shared by all copies of one picture) and
    ``duplicate_of`` (the first file of its group when the group has more than one member).
    Near-duplicates are chained (union-find), so A~B and B~C put A, B and C in one group.
    """
    root = Path(root)
    files = list(files)
    digests, hashes = [], []
    for rel in tqdm(files, desc="hashing images for duplicates", disable=not progress, leave=False):
        image = read_rgb(root / rel)
        digests.append(pixel_digest(image))
        hashes.append(imagehash.phash(Image.fromarray(image)))
    parent = list(range(len(files)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first_by_digest: dict[str, int] = {}
    for i, digest in enumerate(digests):
        union(i, first_by_digest.setdefault(digest, i))
    bits = np.stack([h.hash.ravel() for h in hashes])  # (N, 64) bool
    distances = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    for i, j in zip(*np.nonzero(np.triu(distances <= max_distance, k=1))):
        union(int(i), int(j))
    roots = [find(i) for i in range(len(files))]
    group_ids = {r: g for g, r in enumerate(dict.fromkeys(roots))}
    sizes = pd.Series(roots).value_counts()
    return pd.DataFrame({
        "file": files,
        "group": [group_ids[r] for r in roots],
        "duplicate_of": [files[r] if sizes[r] > 1 and r != i else "" for i, r in enumerate(roots)],
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
        raise DatasetError(f"fold table {path} is missing; rebuild it with `python -m cam.data folds`")
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cam.data", description=__doc__)
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
