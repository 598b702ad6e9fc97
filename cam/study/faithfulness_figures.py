"""The figures of notebook 05 (:mod:`cam.study.faithfulness`): :func:`perturbation_figure`
(deletion and insertion curves), :func:`road_figure` (ROAD curves), :func:`cost_figure`
(ROAD's LeRF - MoRF against milliseconds per image, one labelled point per method),
:func:`sanity_figure` (Spearman per stage of the randomisation check)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import metrics, road


def _spread(positions: np.ndarray, gap: float) -> np.ndarray:
    """Positions moved apart to at least ``gap`` from each other, staying close to where they
    were (labels next to points that would overlap). Keeps the input order."""
    order = np.argsort(positions, kind="stable")
    placed = positions[order].astype(float)
    for _ in range(100):
        moved = False
        for i in range(1, len(placed)):
            overlap = gap - (placed[i] - placed[i - 1])
            if overlap > 1e-12:
                placed[i - 1] -= overlap / 2
                placed[i] += overlap / 2
                moved = True
        if not moved:
            break
    out = np.empty_like(placed)
    out[order] = placed
    return out


def cost_figure(table: pd.DataFrame, reference: tuple | str | None = None,
                score: str = "LeRF - MoRF", title: str = "", highlight: str | None = None,
                label_gap: float = 0.045):
    """Faithfulness against cost: ``table[score]`` with its 95% interval (``"<score> CI low"``,
    ``"<score> CI high"``) against ``table["ms/image"]`` on a log axis, one labelled point per
    method (rows with no cost are skipped; a label says ``n=`` where the ``images`` column is
    below its maximum). ``reference`` (mean, low, high), or the name of a row of ``table`` to
    take them from (e.g. ``"random"``: random maps), is drawn as a horizontal line with its
    interval shaded; ``highlight`` names a method drawn in red. Returns the figure."""
    if isinstance(reference, str):
        row = table.loc[reference]
        reference = (row[score], row[f"{score} CI low"], row[f"{score} CI high"])
    shown = table.dropna(subset=["ms/image"])
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    if reference is not None:
        mean, low, high = reference
        ax.axhspan(low, high, color="grey", alpha=0.15, lw=0)
        ax.axhline(mean, color="grey", ls="--", lw=1)
        ax.annotate("random maps", (0.005, mean), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", color="dimgrey", fontsize=8)
    x, y = shown["ms/image"].to_numpy(float), shown[score].to_numpy(float)
    low, high = shown[f"{score} CI low"].to_numpy(float), shown[f"{score} CI high"].to_numpy(float)
    colours = ["tab:red" if name == highlight else "tab:blue" for name in shown.index]
    for xi, yi, lo, hi, colour in zip(x, y, low, high, colours):
        ax.errorbar(xi, yi, yerr=[[yi - lo], [hi - yi]], fmt="o", ms=6, capsize=3, color=colour,
                    elinewidth=1, alpha=0.9)
    ax.set_xscale("log")
    ax.set_xlim(x.min() / 2, x.max() * 8)  # room for the labels right of the costliest point
    ax.set(xlabel="cost: milliseconds per image (one image per call, median; log scale)",
           ylabel=f"ROAD {score} (higher is more faithful)")
    ax.set_title(title, fontsize=10)
    names = list(shown.index)
    if "images" in shown:
        most = shown["images"].max()
        names = [f"{name} (n={n})" if n < most else name for name, n in zip(names, shown["images"])]
    # Labels right of their points; points within a fifth of the width share a column of labels,
    # pushed apart vertically (in axes units) where they would overlap.
    fig.canvas.draw()
    to_axes = ax.transData + ax.transAxes.inverted()
    points = to_axes.transform(np.column_stack([x, y]))
    labels = points[:, 1].copy()
    order = np.argsort(points[:, 0])
    groups = np.split(order, np.flatnonzero(np.diff(points[order, 0]) > 0.2) + 1)
    for group in groups:
        labels[group] = _spread(points[group, 1], label_gap)
    for (px, py), ly, name, colour in zip(points, labels, names, colours):
        ax.annotate(name, (px, py), xycoords="axes fraction", xytext=(px + 0.025, ly),
                    textcoords="axes fraction", va="center", fontsize=9,
                    color="tab:red" if colour == "tab:red" else "black",
                    fontweight="bold" if colour == "tab:red" else "normal",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.5, shrinkA=0, shrinkB=3)
                    if abs(ly - py) > 0.01 else None)
    ax.grid(True, which="both", axis="x", alpha=0.2)
    fig.tight_layout()
    return fig


def perturbation_figure(curves: Mapping, title: str = ""):
    """The mean deletion (black substrate) and insertion (blurred substrate) curve of each
    method of ``curves`` (:func:`score_maps`), side by side, each labelled with its mean AUC;
    random maps dashed. Returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, metrics.PERTURBATION_MODES):
        for name, c in curves.items():
            ax.plot(np.linspace(0, 1, c[mode].shape[1]), c[mode].mean(axis=0), marker=".",
                    ls="--" if name == "random" else "-",
                    label=f"{name} (AUC {metrics.auc(c[mode]).mean():.3f})")
        ax.set(title=f"{mode} ({'black' if mode == 'deletion' else 'blurred'} substrate)",
               xlabel=f"fraction of pixels {'deleted' if mode == 'deletion' else 'inserted'}",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("probability of the predicted class (mean)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def road_figure(results: Mapping, title: str = ""):
    """The mean ROAD curves of each method of ``results`` (:func:`road_scores`), MoRF and
    LeRF side by side, each labelled with its mean AUC; random maps dashed and black, the
    others in alternate colours of ``tab20``. Returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    palette = itertools.cycle(plt.cm.tab20(np.linspace(0, 1, 20))[::2])
    colours = {name: "black" if name == "random" else next(palette) for name in results}
    last = max(float(r["fractions"][-1]) for r in results.values())
    for ax, order, label in zip(axes, road.ROAD_ORDERS, ["MoRF", "LeRF"]):
        for name, r in results.items():
            ax.plot(np.concatenate([[0.0], r["fractions"]]), r[order].mean(axis=0), marker=".",
                    ls="--" if name == "random" else "-", color=colours[name],
                    label=f"{name} ({r[f'{order}_auc'].mean():.3f})")
        ax.set(title=f"ROAD {label}: {'most' if order == 'morf' else 'least'} relevant pixels "
                     f"removed first ({'lower' if order == 'morf' else 'higher'} is better)",
               xlabel="fraction of pixels removed and imputed", xlim=(0, last), ylim=(0, 1))
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7)
    axes[0].set_ylabel("probability of the predicted class (mean)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sanity_figure(sanity: pd.DataFrame, title: str = "", seed: int = 0):
    """The rows of :func:`cam.sanity.randomisation_check` (as a DataFrame) as the mean
    Spearman correlation with the original map per stage (in the order of the stages) and
    method, with seaborn's 95% bootstrap interval (``seed``). Returns the figure."""
    order = sanity.sort_values("stage", kind="stable").drop_duplicates("stage")["reinitialised"]
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.pointplot(data=sanity, x="reinitialised", y="spearman", hue="method",
                  order=order.tolist(), errorbar=("ci", 95), dodge=0.3, ax=ax, seed=seed)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="re-initialised cumulatively, from the output down",
           ylabel="Spearman vs original map", ylim=(-1.05, 1.05), title=title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
