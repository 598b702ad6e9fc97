"""A saliency atlas of a whole dataset (notebook 09), read from the Parquet dataset that
:func:`cam.bulk` writes (one row per image and method, the raw map on the layer's grid).

Pure pandas and NumPy on that table, each function checked by hand in tests/test_atlas.py:

* :func:`link_images` and :func:`bulk_folder`: what the run reads (a folder of links to the
  chosen images, named as in the fold table) and where it writes (under ``build/``, git-ignored);
* :func:`read_maps`: the rows joined with the fold table (class, label, fold) on the path;
* :func:`maps_of` / :func:`normalised`: the maps of one method as an (N, h, w) array, raw or
  scaled as the study shows them (ReLU, then divided by the maximum: ``cam.maps.normalize_maps``);
* :func:`class_maps`: per class, the mean normalised map and its spread (the standard
  deviation of each cell over the class's images);
* :func:`disagreement` and :func:`agreement_table`: per image and per pair of methods, the
  Spearman correlation of the raw maps, the Pearson correlation and the cosine distance of the
  normalised maps;
* :func:`misclassified`: every misclassified image's map against its own class's mean (leaving
  the image out) and against the mean of the class it was taken for;
* :func:`run_table`: a :class:`cam.bulk.Summary` as a one-row table (counts, seconds per stage).

Figures: :func:`class_maps_figure` (an example of each class under its mean map, the mean and
the spread on the layer's grid).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import maps as M
from .. import metrics, plot
from . import paths

#: Where notebook 09's runs write (git-ignored): build/atlas/<its results folder, flattened>.
BULK_ROOT = paths.ROOT / "build" / "atlas"
#: The Parquet dataset inside a cam.bulk output folder (cam.bulk.MAPS).
MAPS = "maps"


def bulk_folder(results: str | Path) -> Path:
    """The folder a notebook writing to ``results`` gives :func:`cam.bulk`:
    ``build/atlas/results-polen23e`` for ``results/polen23e``, so that a CI run
    (``build/ci-notebooks/polen23e``) and the study's run never share one."""
    name = paths.relative(results).strip("/").replace("/", "-").replace(":", "")
    return BULK_ROOT / name


def link_images(root: str | Path, files, folder: str | Path) -> Path:
    """``folder`` (emptied first) holding a link to each of ``files`` (relative to ``root``)
    under the same relative name, so that :func:`cam.bulk` reads exactly these images and its
    ``path`` column is the fold table's ``file``; a copy where the system makes no links."""
    root, folder = Path(root).resolve(), Path(folder)
    files = list(files)
    if len(set(files)) != len(files):
        raise ValueError("files holds a name twice")
    shutil.rmtree(folder, ignore_errors=True)
    for name in files:
        source, target = root / name, folder / name
        if not source.is_file():
            raise FileNotFoundError(f"{name} is not in {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(source, target)
        except OSError:  # Windows without the privilege to link
            shutil.copyfile(source, target)
    return folder


def read_maps(out: str | Path, folds: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`cam.bulk`'s dataset ``out/maps`` with the fold table's ``class``,
    ``label`` and ``fold`` joined on ``path`` == ``file``, and ``correct`` (predicted ==
    label); sorted by path and method. Every row must find its image in ``folds``."""
    rows = pd.read_parquet(Path(out) / MAPS)
    return join_folds(rows, folds)


def join_folds(rows: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (cam.bulk's columns) with ``class``, ``label``, ``fold`` and ``correct``."""
    joined = rows.merge(folds[["file", "class", "label", "fold"]], how="left", left_on="path",
                        right_on="file", validate="many_to_one").drop(columns="file")
    unknown = joined.loc[joined["label"].isna(), "path"].unique()
    if len(unknown):
        raise ValueError(f"{len(unknown)} path(s) are not in the fold table, e.g. "
                         f"{', '.join(map(str, unknown[:3]))}")
    joined["label"] = joined["label"].astype(int)
    joined["correct"] = joined["predicted"] == joined["label"]
    return joined.sort_values(["path", "method"], ignore_index=True)


def maps_of(rows: pd.DataFrame, method: str | None = None) -> np.ndarray:
    """The raw maps of ``rows`` (those of ``method`` when given) as an (N, h, w) float32
    array, in the rows' order; every map must have the same grid."""
    if method is not None:
        rows = rows[rows["method"] == method]
    if rows.empty:
        raise ValueError(f"no rows{f' for method {method!r}' if method else ''}")
    grids = set(zip(rows["map_height"], rows["map_width"]))
    if len(grids) != 1:
        raise ValueError(f"the maps have several grids {sorted(grids)}; pick one layer")
    (h, w), = grids
    return np.stack([np.asarray(m, np.float32) for m in rows["map"]]).reshape(-1, h, w)


def normalised(rows: pd.DataFrame, method: str | None = None) -> np.ndarray:
    """:func:`maps_of` scaled as the study shows maps: ReLU, then each divided by its maximum
    (``cam.maps.normalize_maps``; a map with no positive cell stays all zeros)."""
    return M.normalize_maps(maps_of(rows, method))


def normalised_for(rows: pd.DataFrame, method: str, images) -> np.ndarray:
    """``method``'s normalised maps of ``images`` (paths), in their order, (N, h, w)."""
    return normalised(one_method(rows, method).loc[list(images)].reset_index())


def one_method(rows: pd.DataFrame, method: str) -> pd.DataFrame:
    """The rows of ``method``, one per image, indexed by path (in path order)."""
    picked = rows[rows["method"] == method]
    if picked.empty:
        raise ValueError(f"no rows for method {method!r}; the table has "
                         f"{sorted(rows['method'].unique())}")
    if picked["path"].duplicated().any():
        raise ValueError(f"method {method!r} has several rows for one image")
    return picked.set_index("path").sort_index()


@dataclass(frozen=True)
class ClassMaps:
    """Per class (in label order): how many images, the mean normalised map and the spread
    (population standard deviation of each cell over the class's images)."""

    method: str
    labels: np.ndarray   # (K,)
    classes: list        # (K,) names
    counts: np.ndarray   # (K,)
    mean: np.ndarray     # (K, h, w)
    std: np.ndarray      # (K, h, w)

    def of(self, label: int) -> int:
        """The position of ``label`` in the arrays."""
        where = np.flatnonzero(self.labels == label)
        if not len(where):
            raise KeyError(f"no images of label {label}")
        return int(where[0])

    def means_of(self, labels) -> np.ndarray:
        """The mean maps of ``labels`` (one per label, in their order), (N, h, w)."""
        return self.mean[[self.of(int(k)) for k in labels]]

    def table(self) -> pd.DataFrame:
        """One row per class: images, the mean map's peak and total, the mean spread over the
        cells, and where the mean map peaks (row, column of the grid)."""
        k, h, w = self.mean.shape
        mean = self.mean.reshape(k, -1).astype(np.float64)
        peak = mean.argmax(axis=1)
        return pd.DataFrame({
            "class": self.classes, "images": self.counts,
            "mean map max": mean.max(axis=1), "mean map sum": mean.sum(axis=1),
            "spread (mean cell std)": self.std.reshape(k, -1).astype(np.float64).mean(axis=1),
            "peak row": peak // w, "peak column": peak % w,
        }).set_index("class")


def class_maps(rows: pd.DataFrame, method: str) -> ClassMaps:
    """The mean and spread of ``method``'s normalised maps over each class's images."""
    picked = one_method(rows, method)
    maps = normalised(picked.reset_index())
    labels = picked["label"].to_numpy()
    order = np.unique(labels)
    mean = np.stack([maps[labels == k].mean(axis=0) for k in order])
    std = np.stack([maps[labels == k].std(axis=0) for k in order])
    names = [picked.loc[picked["label"] == k, "class"].iloc[0] for k in order]
    counts = np.array([(labels == k).sum() for k in order])
    return ClassMaps(method, order, names, counts, mean.astype(np.float32),
                     std.astype(np.float32))


def _flat(maps) -> np.ndarray:
    """(N, ...) maps as (N, cells) float64; N may be 0."""
    maps = np.asarray(maps, np.float64)
    return maps.reshape(len(maps), int(np.prod(maps.shape[1:])))


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps, (N,); NaN where a map is constant."""
    a, b = _flat(a), _flat(b)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1), np.nan)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of each pair of maps, (N,); NaN where a map is all zeros."""
    a, b = _flat(a), _flat(b)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norm > 0, 1 - (a * b).sum(axis=1) / np.where(norm > 0, norm, 1), np.nan)


def disagreement(rows: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per image, how far methods ``a`` and ``b`` disagree: ``spearman`` of the raw maps (the
    rank order of every cell, as notebook 03's agreement table), ``pearson`` and ``cosine
    distance`` of the normalised maps; with the image's class, label, predicted class and fold.
    Sorted from the most disagreeing (lowest Spearman; undefined ones, a constant map, first)."""
    ra, rb = one_method(rows, a), one_method(rows, b)
    if not ra.index.equals(rb.index):
        raise ValueError(f"methods {a!r} and {b!r} were not run on the same images")
    raw_a, raw_b = maps_of(ra.reset_index()), maps_of(rb.reset_index())
    norm_a, norm_b = M.normalize_maps(raw_a), M.normalize_maps(raw_b)
    table = ra[["class", "label", "predicted", "fold"]].copy()
    table["spearman"] = metrics.spearman(raw_a, raw_b)
    table["pearson"] = pearson(norm_a, norm_b)
    table["cosine distance"] = cosine_distance(norm_a, norm_b)
    return table.sort_values("spearman", na_position="first", kind="stable")


def agreement_table(rows: pd.DataFrame, methods) -> pd.DataFrame:
    """One row per pair of ``methods``: images, the mean, median and minimum Spearman of the
    raw maps, the mean Pearson and the mean and largest cosine distance of the normalised
    maps (NaNs, from constant maps, left out of each statistic and counted)."""
    records = []
    for a, b in combinations(methods, 2):
        d = disagreement(rows, a, b)
        records.append({"pair": f"{a} vs {b}", "images": len(d),
                        "undefined": int(d["spearman"].isna().sum()),
                        "spearman mean": d["spearman"].mean(),
                        "spearman median": d["spearman"].median(),
                        "spearman min": d["spearman"].min(),
                        "pearson mean": d["pearson"].mean(),
                        "cosine distance mean": d["cosine distance"].mean(),
                        "cosine distance max": d["cosine distance"].max()})
    return pd.DataFrame(records).set_index("pair")


def misclassified(rows: pd.DataFrame, atlas: ClassMaps) -> pd.DataFrame:
    """Every image of ``atlas.method`` whose predicted class is not its label: its class, the
    class it was taken for, its fold and scores, and the Pearson correlation of its
    normalised map with its own class's mean map leaving it out (``r own class``; NaN for a
    class of one image) and with the predicted class's mean map (``r predicted class``; NaN
    when no image of that class was explained). ``closer to``: which of the two is higher."""
    picked = one_method(rows, atlas.method)
    maps = normalised(picked.reset_index())
    wrong = np.flatnonzero(~picked["correct"].to_numpy())
    h, w = maps.shape[1:]
    own, taken = np.full((len(wrong), h, w), np.nan), np.full((len(wrong), h, w), np.nan)
    for j, i in enumerate(wrong):
        k = atlas.of(int(picked["label"].iloc[i]))
        n = atlas.counts[k]
        if n > 1:  # the class mean without this image
            own[j] = (n * atlas.mean[k] - maps[i]) / (n - 1)
        if int(picked["predicted"].iloc[i]) in atlas.labels:
            taken[j] = atlas.mean[atlas.of(int(picked["predicted"].iloc[i]))]
    names = dict(zip(atlas.labels, atlas.classes))
    table = picked.iloc[wrong][["class", "label", "predicted", "fold", "predicted_score",
                                "target_score"]].copy()
    table["predicted class"] = [names.get(int(p), str(p)) for p in table["predicted"]]
    table["r own class"] = pearson(maps[wrong], own)
    table["r predicted class"] = pearson(maps[wrong], taken)
    table["closer to"] = np.where(table["r predicted class"] > table["r own class"],
                                  "predicted class",
                                  np.where(table["r own class"] >= table["r predicted class"],
                                           "own class", "undefined"))
    return table


def run_table(summary, methods, layer: str) -> pd.DataFrame:
    """A :class:`cam.bulk.Summary` as one row: engine, methods, layer, the image counts, rows,
    wall seconds, images per second and the busy seconds of each stage."""
    row = {"engine": summary.engine, "methods": ", ".join(methods), "layer": layer,
           "images": summary.listed, "explained": summary.explained,
           "skipped": summary.skipped, "failed": summary.failed, "rows": summary.rows,
           "wall s": round(summary.seconds, 1),
           "images/s": round(summary.images_per_second, 2)}
    row.update({f"{stage} s": round(seconds, 1) for stage, seconds in summary.stages.items()})
    return pd.DataFrame([row])


def class_maps_figure(atlas: ClassMaps, examples: np.ndarray, columns: int = 2,
                      title: str = "", save=None):
    """Per class, three panels: an example image with the class's mean map over it, the mean
    map on the layer's grid (0 to 1) and its spread (the standard deviation per cell, on one
    scale for every class); ``columns`` classes side by side. ``examples``: one image per
    class, in ``atlas``'s order. Returns the figure."""
    k = len(atlas.classes)
    if len(examples) != k:
        raise ValueError(f"{len(examples)} examples for {k} classes")
    rows = -(-k // columns)
    height = 2.05 * rows + 1.1  # inches: the panels, the title above and the colour bars below
    fig, axes = plt.subplots(rows, 3 * columns, figsize=(2.0 * 3 * columns, height),
                             squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / height, bottom=0.75 / height,
                        wspace=0.08, hspace=0.3)
    top = float(atlas.std.max()) or 1.0
    for ax in axes.ravel():
        ax.set_axis_off()
    shown = {}
    for i in range(k):
        r, c = divmod(i, columns)
        image_ax, mean_ax, std_ax = axes[r, 3 * c:3 * c + 3]
        image_ax.imshow(plot.overlay(examples[i], atlas.mean[i] / (atlas.mean[i].max() or 1),
                                     alpha=0.5))
        image_ax.set_title(f"{atlas.classes[i]} (n={atlas.counts[i]})", fontsize=8)
        shown["mean of the normalised maps"] = mean_ax.imshow(atlas.mean[i], cmap="jet",
                                                              vmin=0, vmax=1)
        mean_ax.set_title("mean", fontsize=8)
        shown["spread: standard deviation per cell"] = std_ax.imshow(
            atlas.std[i], cmap="magma", vmin=0, vmax=top)
        std_ax.set_title("spread (std)", fontsize=8)
    for j, (label, image) in enumerate(shown.items()):  # two horizontal bars under the grid
        bar = fig.add_axes([0.08 + 0.47 * j, 0.3 / height, 0.37, 0.12 / height])
        fig.colorbar(image, cax=bar, orientation="horizontal").set_label(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    if save is not None:
        plot.save_figure(fig, save)
    return fig
