"""Every path the project uses, defined once."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "data"
MODELS_DIR = ROOT / "models"
RESULTS_DIR = ROOT / "results"
NOTEBOOKS_DIR = ROOT / "notebooks"
#: Files made from others and remade when missing: decoded images, decompressed checkpoints.
CACHE_DIR = DATA_DIR / "cache"

#: Environment variable that points at a POLEN23E copy (one folder per class, or flat).
POLEN23E_ENV = "POLEN23E_DIR"
#: Where `make data` unpacks POLEN23E when the variable is not set.
POLEN23E_DEFAULT_DIR = DATA_DIR / "polen23e"
#: The committed, leak-free 5-fold split of POLEN23E.
POLEN23E_FOLDS_CSV = DATA_DIR / "polen23e-folds.csv"


def polen23e_dir() -> Path | None:
    """The POLEN23E folder to use: ``$POLEN23E_DIR``, else ``data/polen23e``, else None."""
    env = os.environ.get(POLEN23E_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{POLEN23E_ENV}={env!r} is not a directory. Point it at a POLEN23E copy "
                f"(23 class folders, or the flat Kaggle layout), or unset it and run `make data`."
            )
        return path
    if POLEN23E_DEFAULT_DIR.is_dir():
        return POLEN23E_DEFAULT_DIR
    return None


def resolve(path: str | Path) -> Path:
    """``path``, a relative one taken relative to the repository root rather than the working
    directory: notebooks get ``output_dir = "results/polen23e"``, the same on every machine."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path


def relative(path: str | Path) -> str:
    """``path`` relative to the repository root (``results/polen23e``) when it is inside it,
    else absolute: what :func:`resolve` turns back into ``path`` (the notebooks' parameters)."""
    path = resolve(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def shown(path: str | Path) -> str:
    """``path`` as a notebook prints it, with no machine's folders in it: relative to the
    repository root, or ``$POLEN23E_DIR/...`` under that folder; else absolute."""
    path = resolve(path).resolve()
    env = os.environ.get(POLEN23E_ENV)
    if env and not path.is_relative_to(ROOT):
        try:
            rest = path.relative_to(resolve(env).resolve())
        except ValueError:
            pass
        else:
            return "/".join(["$" + POLEN23E_ENV, *rest.parts])
    return relative(path)


class Results:
    """Where a notebook writes: ``figures/`` and ``tables/`` under ``output_dir`` (by default
    ``results/<dataset>``; a relative one is relative to the repository root), created on
    construction; tables go out as CSV and Markdown."""

    def __init__(self, dataset: str, output_dir: str | Path = ""):
        self.root = resolve(output_dir) if output_dir else RESULTS_DIR / dataset
        self.figures, self.tables = self.root / "figures", self.root / "tables"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.tables.mkdir(parents=True, exist_ok=True)

    def save_table(self, frame, name: str) -> None:
        """``frame`` (a pandas DataFrame) as ``tables/<name>.csv`` and ``tables/<name>.md``."""
        frame.to_csv(self.tables / f"{name}.csv")
        (self.tables / f"{name}.md").write_text(frame.to_markdown() + "\n")
