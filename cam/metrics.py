"""How much two saliency maps agree: rank correlation and overlap of their top regions.

Pure numpy/scipy functions over batches of maps (B, H, W); tests/test_metrics.py checks them
against values worked out by hand.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps must be two (B, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each pair of maps, (B,); NaN where a map is constant."""
    a, b = _pair(a, b)
    out = np.full(len(a), np.nan)
    for i, (x, y) in enumerate(zip(a, b)):
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = spearmanr(x, y).statistic
    return out


def top_mask(maps, fraction: float) -> np.ndarray:
    """Boolean masks of each map's top ``fraction`` of pixels (ties at the cut included)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    cut = -np.partition(-flat, k - 1, axis=1)[:, k - 1:k]  # the k-th largest value per map
    return (flat >= cut).reshape(maps.shape)


def top_iou(a, b, fraction: float = 0.2) -> np.ndarray:
    """Intersection over union of the two maps' top-``fraction`` regions, (B,)."""
    a, b = _pair(a, b)
    ma, mb = top_mask(a, fraction), top_mask(b, fraction)
    union = (ma | mb).sum(1)
    return (ma & mb).sum(1) / np.maximum(union, 1)
