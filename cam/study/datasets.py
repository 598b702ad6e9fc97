"""The two datasets the study runs on, behind one call: POLEN23E and the synthetic stand-in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import data, paths, synthetic

DATASETS = ("polen23e", "synthetic")
#: The synthetic stand-in written by `make demo`: images per class, size and seed.
SYNTHETIC_PER_CLASS, SYNTHETIC_SIZE, SYNTHETIC_SEED = 40, 224, 0


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    classes: tuple[str, ...]
    folds: pd.DataFrame  # file, class, label, group, duplicate_of, fold

    def fold(self, k: int, per_class: int = 0) -> pd.DataFrame:
        """Rows of fold ``k``; ``per_class`` > 0 keeps the first that many of each class."""
        rows = self.folds[self.folds["fold"] == k]
        if rows.empty:
            raise ValueError(f"fold {k} is empty; folds are {sorted(self.folds['fold'].unique())}")
        if per_class > 0:
            rows = rows.groupby("label", sort=True).head(per_class)
        return rows.reset_index(drop=True)


def open_dataset(name: str, data_dir: str | Path = "") -> Dataset:
    """POLEN23E (from ``data_dir``, else ``$POLEN23E_DIR``, else ``data/polen23e``) with the
    committed folds; or the synthetic stand-in, written to ``data_dir`` (default
    ``data/synthetic``) the first time, with folds built from it. A relative ``data_dir`` is
    relative to the repository root."""
    if name == "polen23e":
        root = paths.resolve(data_dir) if data_dir else data.polen23e_root()
        return Dataset(name, root, data.POLEN23E_CLASSES, data.read_fold_table())
    if name == "synthetic":
        root = paths.resolve(data_dir) if data_dir else paths.DATA_DIR / "synthetic"
        folds_csv = root / "folds.csv"
        if not folds_csv.is_file():
            synthetic.write_dataset(root, SYNTHETIC_PER_CLASS, SYNTHETIC_SIZE, SYNTHETIC_SEED)
            data.build_fold_table(root, synthetic.SYNTHETIC_CLASSES).to_csv(folds_csv, index=False)
        return Dataset(name, root, tuple(synthetic.SYNTHETIC_CLASSES),
                       pd.read_csv(folds_csv, keep_default_na=False))
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
