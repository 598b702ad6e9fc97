"""The arithmetic of class activation maps, as small pure numpy functions.

Kept apart from the explainers so each step can be checked against numbers worked out by hand
(tests/test_maps.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: |y| below this counts as zero when Ablation-CAM divides by the unablated score.
SCORE_EPS = 1e-6


def weighted_channel_sum(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k A_k: (B, h, w, C) activations and (B, C) weights -> (B, h, w) maps.

    ``weights`` may also be (B, h, w, C), a weight per cell and channel (LayerCAM, HiResCAM):
    the map is then sum_k w_ij^k A_ij^k, cell by cell.
    """
    weights = np.asarray(weights)
    if weights.ndim == 2:
        return np.einsum("bhwc,bc->bhw", activations, weights)
    if weights.shape == np.shape(activations):
        return np.einsum("bhwc,bhwc->bhw", activations, weights)
    raise ValueError(f"weights must be (B, C) or the activations' shape {np.shape(activations)}, "
                     f"got {weights.shape}")


def gradcam_weights(gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM channel weights: the gradients averaged over the grid, (B, h, w, C) -> (B, C)."""
    return gradients.mean(axis=(1, 2))


def gradcampp_weights(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ channel weights (Chattopadhay et al., WACV 2018, eq. 19), (B, C).

    With g = dy/dA and the exponential score of the paper's Sec. 3.3, the higher derivatives
    are powers of g and the coefficients have the closed form
    alpha_ij^k = g_ij^2 / (2 g_ij^2 + sum_ab A_ab^k g_ij^3) (alpha = 0 where the denominator
    is 0); the weights are w_k = sum_ij alpha_ij^k relu(g_ij^k). Activations and gradients are
    (B, h, w, C).
    """
    a = np.asarray(activations, np.float64)
    g = np.asarray(gradients, np.float64)
    g2 = g * g
    denominator = 2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g2 * g
    alpha = np.divide(g2, denominator, out=np.zeros_like(g2), where=denominator != 0)
    return (alpha * np.maximum(g, 0)).sum(axis=(1, 2)).astype(np.float32)


def xgradcam_weights(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """XGrad-CAM channel weights (Fu et al., BMVC 2020, eq. 14), (B, C): the gradients averaged
    over the grid weighted by the activation, w_k = sum_ij (A_ij^k / sum_ab A_ab^k) g_ij^k
    (0 for a channel whose activations sum to 0)."""
    a = np.asarray(activations, np.float64)
    g = np.asarray(gradients, np.float64)
    total = a.sum(axis=(1, 2))
    weighted = (a * g).sum(axis=(1, 2))
    return np.divide(weighted, total, out=np.zeros_like(total),
                     where=total != 0).astype(np.float32)


def layercam_weights(gradients: np.ndarray) -> np.ndarray:
    """LayerCAM weights (Jiang et al., IEEE TIP 2021, eq. 5): one per cell and channel, the
    positive part of the gradient relu(g_ij^k), (B, h, w, C) -> (B, h, w, C)."""
    return np.maximum(gradients, 0)


def ablation_weights(score: np.ndarray, ablated: np.ndarray, eps: float = SCORE_EPS) -> np.ndarray:
    """Ablation-CAM weights w_k = (y - y_k) / y (Desai & Ramaswamy, WACV 2020).

    ``score``: (B,) unablated class scores y; ``ablated``: (B, C) scores y_k with channel k set
    to the ablation value. When |y| < ``eps`` the division would blow up, so y is replaced by
    ``eps`` with y's sign (``+eps`` for y == 0): the weights keep their ordering and sign.
    """
    score = np.asarray(score, dtype=np.float64)[:, None]
    safe = np.where(np.abs(score) < eps, np.where(score < 0, -eps, eps), score)
    return ((score - np.asarray(ablated, dtype=np.float64)) / safe).astype(np.float32)


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Start indices of windows of ``window`` cells stepping by ``stride`` along an axis of
    ``n`` cells; the last window is shifted back to end at the edge so every cell is covered."""
    if not 1 <= window <= n or stride < 1:
        raise ValueError(f"need 1 <= window <= {n} and stride >= 1, got window={window}, "
                         f"stride={stride}")
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] != n - window:
        starts.append(n - window)
    return starts


def window_masks(grid: tuple[int, int], window: int, stride: int) -> np.ndarray:
    """One boolean (h, w) mask per window position, in row-major order: (N, h, w)."""
    h, w = grid
    rows, cols = window_starts(h, window, stride), window_starts(w, window, stride)
    masks = np.zeros((len(rows) * len(cols), h, w), dtype=bool)
    for n, (i, j) in enumerate((i, j) for i in rows for j in cols):
        masks[n, i:i + window, j:j + window] = True
    return masks


def spread_window_drops(drops: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Turn per-window score drops into a cell map: each cell gets the mean drop of the
    windows that cover it. ``drops`` (B, N), ``masks`` (N, h, w) -> (B, h, w)."""
    masks = masks.astype(np.float64)
    total = np.einsum("bn,nhw->bhw", drops.astype(np.float64), masks)
    count = masks.sum(axis=0)
    if (count == 0).any():
        raise ValueError("some cells are covered by no window")
    return (total / count).astype(np.float32)


def scorecam_masks(activation: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Score-CAM's masks H^k for one image (Wang et al., CVPR Workshops 2020, Sec. 3):
    each channel of ``activation`` (h, w, K) upsampled bilinearly to ``size`` (H, W) as
    :func:`upsample_maps` does, then min-max normalised to [0, 1],
    H^k = (U^k - min U^k) / (max U^k - min U^k). A constant channel (nothing to normalise)
    becomes all zeros. Returns (K, H, W) float32."""
    a = np.asarray(activation, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"activation must be (h, w, channels), got shape {a.shape}")
    up = upsample_maps(np.moveaxis(a, -1, 0), size)  # (K, H, W)
    flat = up.reshape(len(up), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    grid = a.reshape(-1, a.shape[-1])
    constant = (high <= low) | (grid.min(axis=0) == grid.max(axis=0))
    span = np.where(constant, 1, high - low).astype(np.float32)
    masks = (up - low[:, None, None]) / span[:, None, None]
    masks[constant] = 0
    return masks.astype(np.float32, copy=False)


def top_variance_channels(activation: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` channels of ``activation`` (h, w, C) whose values vary most over
    the grid (largest variance first; among equal variances the lower index first): the
    channel selection of Faster Score-CAM."""
    a = np.asarray(activation, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"activation must be (h, w, channels), got shape {a.shape}")
    if not 1 <= n <= a.shape[-1]:
        raise ValueError(f"n must be between 1 and {a.shape[-1]} (the channels), got {n}")
    variance = a.reshape(-1, a.shape[-1]).var(axis=0)
    return np.argsort(-variance, kind="stable")[:n]


def scorecam_weights(scores: np.ndarray) -> np.ndarray:
    """Score-CAM channel weights from the class scores of the masked images, (..., K) ->
    (..., K): a softmax over the channels (the last axis), as in the paper's Algorithm 1,
    which applies it to the increases of confidence f(X o H^k) - f(X_b). The baseline score
    f(X_b) is the same for every channel and a softmax ignores a common shift, so the
    weights need only the masked scores."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


#: ReciproCAM's 3x3 Gaussian keep weights: 1/4 at the kept cell, 1/8 at its four edge
#: neighbours, 1/16 at its four corner neighbours (the authors' reference implementation).
GAUSSIAN_KEEP = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 16


def keep_weights(grid: tuple[int, int], gaussian: bool = False) -> np.ndarray:
    """ReciproCAM's spatial masks G: one (h, w) keep-weight map per kept cell, (h*w, h, w).

    Mask n = i*w + j (row-major) keeps cell (i, j): one-hot, G[n, i, j] = 1 and 0 elsewhere;
    with ``gaussian`` the 3x3 :data:`GAUSSIAN_KEEP` kernel centred on (i, j) instead,
    truncated at the grid border and not renormalised (the full kernel sums to 1, the part
    left at a corner of the grid to 1/4 + 2/8 + 1/16 = 9/16), as the reference
    implementation does.
    """
    h, w = (int(d) for d in grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid!r}")
    kernel = GAUSSIAN_KEEP if gaussian else np.pad([[1.0]], 1)
    padded = np.zeros((h * w, h + 2, w + 2))
    for n, (i, j) in enumerate((i, j) for i in range(h) for j in range(w)):
        padded[n, i:i + 3, j:j + 3] = kernel  # centred on padded (i + 1, j + 1)
    return padded[:, 1:-1, 1:-1].astype(np.float32)


def keep_masks(grid: tuple[int, int], gaussian: bool = False) -> np.ndarray:
    """ReciproCAM's masks as float ablation amounts 1 - G, (h*w, h, w) in [0, 1]: what the
    ablation template sets to ``ablation_value`` (see :func:`keep_weights` for G). With
    ``ablation_value=0`` the masked activation is A * G: cell (i, j) kept (or spread by the
    Gaussian), every other cell zeroed."""
    return (1 - keep_weights(grid, gaussian)).astype(np.float32)


@dataclass(frozen=True)
class Quantile:
    """A threshold given as a quantile of each map's own values: ``Quantile(0.8)`` keeps the
    top 20% of cells. ``"q0.8"`` is the same written as a string (handy on a command line)."""

    q: float

    def __post_init__(self):
        if not 0 <= float(self.q) <= 1:
            raise ValueError(f"a quantile must be between 0 and 1, got {self.q!r}")


def as_threshold(threshold) -> float | Quantile:
    """A float, or a :class:`Quantile`, from a float, a Quantile, or a string "0.2" / "q0.8"."""
    if isinstance(threshold, Quantile):
        return threshold
    if isinstance(threshold, str):
        text = threshold.strip().lower()
        try:
            return Quantile(float(text[1:])) if text.startswith("q") else float(text)
        except ValueError:
            pass
        raise ValueError(f"threshold must be a number, or 'q' and a quantile in [0, 1] such as "
                         f"'q0.8'; got {threshold!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, a cam.maps.Quantile or a string "
                         f"like 'q0.8'; got {threshold!r}")
    return float(threshold)


def threshold_levels(maps: np.ndarray, threshold=0.0) -> np.ndarray:
    """The threshold of each map as a number, (B,): the value itself, or the quantile of
    that map's values."""
    maps = np.asarray(maps, dtype=np.float32)
    threshold = as_threshold(threshold)
    if isinstance(threshold, Quantile):
        return np.quantile(maps.reshape(len(maps), -1), threshold.q, axis=1).astype(np.float32)
    return np.full(len(maps), threshold, np.float32)


def normalize_maps(maps: np.ndarray, threshold=0.0) -> np.ndarray:
    """Threshold, then scale each map to [0, 1]: (max(m, t) - t) / (max(m) - t).

    With the default ``threshold=0`` this is ReLU followed by dividing by the maximum. A
    ``threshold`` t replaces ReLU's 0 as the level below which evidence is dropped: a float
    is an absolute level on the maps' scale (negative keeps some negative evidence), and
    ``Quantile(q)`` or ``"q0.8"`` is the q-quantile of each map's own values. A map whose
    maximum is at or below t becomes all zeros.
    """
    maps = np.asarray(maps, dtype=np.float32)
    levels = threshold_levels(maps, threshold).reshape((-1,) + (1,) * (maps.ndim - 1))
    shifted = np.maximum(maps, levels) - levels
    peak = shifted.reshape(len(maps), -1).max(axis=1)
    scale = np.where(peak > 0, peak, 1).astype(np.float32)
    return shifted / scale.reshape((-1,) + (1,) * (maps.ndim - 1))


def minmax_maps(maps: np.ndarray, threshold=0.0) -> np.ndarray:
    """pytorch-grad-cam's scaling: ReLU (or ``threshold``, as in :func:`normalize_maps`),
    then each map min-max scaled, (m - min m) / (max m - min m + 1e-7).

    It differs from :func:`normalize_maps` where a map's minimum after ReLU is above 0 (every
    cell has some evidence): min-max sends that minimum to 0, dividing by the maximum keeps it.
    The 1e-7 is pytorch-grad-cam's, so a constant map becomes all zeros.
    """
    maps = np.asarray(maps, dtype=np.float32)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    clipped = np.maximum(maps, threshold_levels(maps, threshold).reshape(shape))
    flat = clipped.reshape(len(maps), -1)
    low, high = flat.min(axis=1).reshape(shape), flat.max(axis=1).reshape(shape)
    return ((clipped - low) / (high - low + np.float32(1e-7))).astype(np.float32)


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (B, h, w) maps to (B, H, W), pixel-centre aligned.

    OpenCV's INTER_LINEAR maps output pixel centre x + 0.5 to input position
    (x + 0.5) * w / W - 0.5 (the 'half-pixel' convention, align_corners=False), so each cell's
    value sits at the centre of the image patch it covers and edges are clamped.
    """
    height, width = size
    maps = np.asarray(maps, dtype=np.float32)
    out = np.empty((len(maps), height, width), np.float32)
    # OpenCV resizes many channels in one call, up to 512 in 4.x but only 128 in 5.x.
    for start in range(0, len(maps), 128):
        stack = np.ascontiguousarray(maps[start:start + 128].transpose(1, 2, 0))
        resized = cv2.resize(stack, (width, height), interpolation=cv2.INTER_LINEAR)
        out[start:start + 128] = resized.reshape(height, width, -1).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------- drawing


def as_display(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) float image in [0, 1] from uint8 / [0, 255] / [0, 1] / one-channel input."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    lo, hi = float(image.min()), float(image.max())
    if hi > 1.0:
        image = image / 255.0 if lo >= 0 and hi <= 255 else (image - lo) / max(hi - lo, 1e-12)
    return np.clip(image, 0, 1)


def blend(image: np.ndarray, saliency: np.ndarray, colours: np.ndarray, alpha: float = 0.5,
          threshold: float = 0.0) -> np.ndarray:
    """``colours`` (H, W, 3) in [0, 1] (a colour map applied to the (H, W) ``saliency`` in
    [0, 1]) laid over the display ``image`` (H, W, 3) in [0, 1] with opacity ``alpha``.

    With ``threshold`` > 0 the opacity ramps from 0 at the threshold to ``alpha`` at 1, so
    cells at or below it stay uncoloured.
    """
    if alpha < 0 or alpha > 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    weight = np.clip((saliency - threshold) / max(1 - threshold, 1e-6), 0, 1) if threshold > 0 \
        else np.ones_like(saliency)
    weight = (alpha * weight)[..., None]
    # a convex combination of values in [0, 1]; float rounding can step past 1 by 1e-8
    return np.clip((1 - weight) * image + weight * colours, 0, 1)
