"""FastAblationCAM over a grid of layers and ablation windows, scored against Grad-CAM and
Ablation-CAM at the same layer (notebook 06).

Ablations at an early layer rerun most of the network per ablation, so every setting is
run on as many images as its cost allows: ``images`` for cheap settings, ``few`` for
those above ``max_evaluations`` ablations per image (and for Ablation-CAM on grids larger
than ``ablation_grid``). Each row says how many images it used.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from .. import maps as M
from .. import metrics
from ..methods import AblationCAM, FastAblationCAM, GradCAM


def _warm_up(explainer, images, targets) -> None:
    """Compile the explainer's functions for this batch and layer first, so that the timed call
    measures the explanation and not the tracing of the network (tens of seconds for
    DenseNet-169, once per layer and shape): one untimed call on the same batch."""
    explainer(images, targets=targets, upsample=False, normalize=False)


def _timed(explainer, images, targets):
    _warm_up(explainer, images, targets)
    start = time.perf_counter()
    result = explainer.explain(images, targets=targets, upsample=False, normalize=False)
    return result, (time.perf_counter() - start) / len(images)


def _explainer(model, layer, window, batch_size):
    """(explainer, method) for one setting of the sweep; (None, method) for a window larger
    than the layer's grid. A new FastAblationCAM per window: explainers at one layer share
    its compiled trunk and scoring, so this compiles nothing again."""
    if window == "Grad-CAM":
        return GradCAM(model, layer), "Grad-CAM"
    if window == "Ablation-CAM":
        return AblationCAM(model, layer, batch_size=batch_size), "Ablation-CAM"
    if window > min(GradCAM(model, layer).split.target_shape[:2]):
        return None, "FastAblationCAM"
    return (FastAblationCAM(model, layer, window=int(window), batch_size=batch_size),
            "FastAblationCAM")


def _agreement(other: str, ref, raw, upsampled, top_fraction: float) -> dict:
    """Spearman and top-``top_fraction`` IoU of a setting's maps with ``other``'s maps
    ``ref`` (NaN without them), on the images both have."""
    if ref is None:
        return {f"Spearman vs {other}": np.nan, f"IoU vs {other}": np.nan}
    m = min(len(ref), len(raw))
    size = upsampled.shape[1:3]
    return {f"Spearman vs {other}": float(np.nanmean(metrics.spearman(raw[:m], ref[:m]))),
            f"IoU vs {other}": float(np.mean(metrics.top_iou(
                upsampled[:m], M.upsample_maps(M.normalize_maps(ref[:m]), size),
                top_fraction))),
            f"images vs {other}": m}


def layer_window_sweep(model, images, targets, layers, windows=(1, 2, 3, 4), few: int = 2,
                       max_evaluations: int = 300, ablation_grid: int = 7,
                       deletion_steps: int = 8, top_fraction: float = 0.2, batch_size: int = 64,
                       confidence: float = 0.95, resamples: int = 2000,
                       progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Score every (layer, window) FastAblationCAM setting, with Grad-CAM and Ablation-CAM rows.

    Returns a table with one row per (layer, method, window) and the raw maps by the same
    key. Columns: grid, evaluations per image, images used, seconds per image (timed after a
    warm-up call that compiles the functions), the fraction
    of all-zero maps after ReLU, the median largest score drop relative to |score| (how much
    the most important window moves the logit), Spearman and top-``top_fraction`` IoU with
    Grad-CAM and with Ablation-CAM (on the images both have), and the deletion AUC (RISE,
    ``deletion_steps`` steps, class probability) with its bootstrap CI.
    """
    images = np.asarray(images, dtype=np.float32)
    targets = np.asarray(targets)
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if few < 1:
        raise ValueError(f"few must be >= 1, got {few}")
    size = images.shape[1:3]
    # Softmax probabilities from one compiled forward pass per batch: calling the model
    # eagerly on a batch of 32 DenseNet-169 images at 224 px held 8.7 GB resident (every
    # concatenation alive at once); compiled, a batch of 16 peaks near 1.3 GB.
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    predict = lambda x: forward(tf.constant(x, tf.float32)).numpy()  # noqa: E731
    records, raws = [], {}
    settings = [(layer, w) for layer in layers for w in ("Grad-CAM", "Ablation-CAM", *windows)]
    bar = tqdm(settings, desc="layer x window", disable=not progress)
    reference = {}
    for layer, window in bar:
        bar.set_postfix_str(f"{layer} {window}")
        explainer, method = _explainer(model, layer, window, batch_size)
        if explainer is None:
            continue
        grid = explainer.split.target_shape
        evaluations = explainer.evaluations_per_image
        if method == "Ablation-CAM":
            n = len(images) if max(grid[:2]) <= ablation_grid else min(few, len(images))
        else:
            n = len(images) if evaluations <= max_evaluations else min(few, len(images))
        result, seconds = _timed(explainer, images[:n], targets[:n])
        raw = result.raw
        scores = result.scores[np.arange(n), targets[:n]]
        if method != "FastAblationCAM":
            reference[layer, method] = raw
        key = (layer, method, window if method == "FastAblationCAM" else "")
        raws[key] = raw
        unit = M.normalize_maps(raw)
        upsampled = M.upsample_maps(unit, size)
        curves = metrics.perturbation_curves(predict, images[:n], upsampled, targets[:n],
                                             mode="deletion", steps=deletion_steps,
                                             batch_size=16, progress=False)
        mean, low, high = metrics.bootstrap_ci(metrics.auc(curves), confidence, resamples)
        drop = raw.reshape(n, -1).max(axis=1) / np.maximum(np.abs(scores), 1e-6)
        row = {"layer": layer, "method": method, "window": key[2],
               "grid": f"{grid[0]}x{grid[1]}x{grid[2]}", "evaluations/image": evaluations,
               "images": n, "s/image": seconds,
               "all-zero maps": float((unit.reshape(n, -1).max(axis=1) == 0).mean()),
               "max drop / |score|": float(np.median(drop)) if method == "FastAblationCAM"
               else np.nan,
               "deletion AUC": mean, "deletion AUC low": low, "deletion AUC high": high}
        for other in ("Grad-CAM", "Ablation-CAM"):
            ref = reference.get((layer, other))
            row.update(_agreement(other, None if other == method else ref, raw, upsampled,
                                  top_fraction))
        records.append(row)
    table = pd.DataFrame(records).set_index(["layer", "method", "window"])
    return table, raws


def heatmaps(table: pd.DataFrame, columns, layers, save=None):
    """One seaborn heat map per column of the FastAblationCAM rows: layers down, windows
    across, each cell annotated with its value."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from ..plot import save_figure

    fast = table.xs("FastAblationCAM", level="method")
    fig, axes = plt.subplots(1, len(columns), figsize=(3.3 * len(columns), 0.5 * len(layers) + 1.6))
    for ax, column in zip(np.atleast_1d(axes), columns):
        grid = fast[column].unstack("window").reindex(layers)
        sns.heatmap(grid.astype(float), annot=True, fmt=".2f", cmap="viridis", cbar=False, ax=ax,
                    annot_kws={"fontsize": 7})
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("window")
        ax.set_ylabel("")
        if ax is not np.atleast_1d(axes)[0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    if save is not None:
        save_figure(fig, save)
    return fig


def verdicts(table: pd.DataFrame, agree: float = 0.7, partly: float = 0.3,
             auc_margin: float = 0.05) -> pd.DataFrame:
    """A verdict per FastAblationCAM (layer, window) row of :func:`layer_window_sweep`'s table.

    ``works``: no all-zero maps, Spearman with Grad-CAM at least ``agree`` and a deletion AUC
    no more than ``auc_margin`` above Grad-CAM's at that layer; ``partly``: Spearman at least
    ``partly``; ``fails`` otherwise. The reason quotes the numbers.
    """
    fast = table.xs("FastAblationCAM", level="method")
    grad = table.xs("Grad-CAM", level="method")["deletion AUC"].droplevel("window")
    out = []
    for (layer, window), r in fast.iterrows():
        rho, zero, auc = r["Spearman vs Grad-CAM"], r["all-zero maps"], r["deletion AUC"]
        ref = grad.get(layer, np.nan)
        reason = (f"Spearman {rho:.2f}, all-zero {zero:.0%}, deletion AUC {auc:.3f} "
                  f"(Grad-CAM {ref:.3f}), {int(r['images'])} images")
        if zero == 0 and rho >= agree and not auc > ref + auc_margin:
            word = "works"
        elif rho >= partly:
            word = "partly"
        else:
            word = "fails"
        out.append({"layer": layer, "window": window, "verdict": word, "numbers": reason})
    return pd.DataFrame(out).set_index(["layer", "window"])
