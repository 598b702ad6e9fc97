"""How much two saliency maps agree, and how faithful and well placed a map is.

* agreement: :func:`spearman`, :func:`top_mask`, :func:`top_iou`;
* faithfulness: :func:`average_drop`, :func:`increase_in_confidence` (Chattopadhyay et al.
  2018, Grad-CAM++), :func:`perturbation_curves` and :func:`auc` (deletion and insertion,
  Petsiuk et al. 2018, RISE);
* localisation against a ground-truth mask: :func:`pointing_game`, :func:`energy_in_mask`;
* :func:`bootstrap_ci` for the mean of any per-image metric.

Pure NumPy functions (with OpenCV and SciPy, ``cam[metrics]``) over batches of maps (B, H, W);
those that need a model take it as a ``predict`` function (images -> class probabilities), so
nothing here imports Keras. ROAD is in :mod:`cam.road`, the model-randomisation sanity check,
which runs Keras models, in :mod:`cam.sanity`. tests/test_metrics.py checks them against values
worked out by hand.
"""

from __future__ import annotations

import cv2
import numpy as np
from tqdm.auto import tqdm

from ._optional import require
from .checks import check_int


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps must be two (B, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each pair of maps, (B,); NaN where a map is constant."""
    stats = require("scipy.stats", "cam.metrics.spearman")
    a, b = _pair(a, b)
    out = np.full(len(a), np.nan)
    for i, (x, y) in enumerate(zip(a, b)):
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = stats.spearmanr(x, y).statistic
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


# --------------------------------------------------------------------------- faithfulness
#
# The maps these functions take are (N, H, W) at image resolution, non-negative where it
# matters (normalised maps: ReLU then divided by the maximum, as the explainers return them).
# "Probability" below is the class probability of the model's softmax output, whatever score
# the maps explained (the study explains logits and measures faithfulness on probabilities).


def images_and_maps(images, maps) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, H, W, C) batch, got shape {images.shape}")
    if maps.shape != images.shape[:3]:
        raise ValueError(f"maps must be (N, H, W) = {images.shape[:3]} to match the images "
                         f"(upsample them to the image size first), got {maps.shape}")
    return images.astype(np.float32, copy=False), maps


def _scores_pair(scores, masked_scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(scores, dtype=np.float64)
    o = np.asarray(masked_scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != o.shape:
        raise ValueError(f"scores and masked_scores must be two (N,) arrays of one shape, "
                         f"got {y.shape} and {o.shape}")
    return y, o


def explanation_masked(images, maps) -> np.ndarray:
    """The images multiplied pixel-wise by their maps: what Average Drop and Increase in
    Confidence feed the model (Chattopadhyay et al. 2018, Grad-CAM++, eq. 20).

    The models of this repository take raw pixels in [0, 255] and rescale them inside the
    network, so multiplying the raw pixels is the product the paper means: where the map is 0
    the pixel becomes 0, i.e. black (the rescaling layer turns it into -1, not 0), and where
    the map is 1 the pixel is unchanged.

    Parameters
    ----------
    images : array (N, H, W, C)
        Raw pixels as the model takes them.
    maps : array (N, H, W)
        Saliency maps at image resolution with values in [0, 1] (``normalize=True``).

    Returns
    -------
    float32 array (N, H, W, C).
    """
    images, maps = images_and_maps(images, maps)
    if maps.size and (np.nanmin(maps) < 0 or np.nanmax(maps) > 1 or np.isnan(maps).any()):
        raise ValueError(f"maps must lie in [0, 1] (normalised maps), got values in "
                         f"[{np.nanmin(maps):.3g}, {np.nanmax(maps):.3g}]"
                         + (" with NaNs" if np.isnan(maps).any() else ""))
    return images * maps[..., None]


def average_drop(scores, masked_scores) -> np.ndarray:
    """Per-image Average Drop in percent, ``100 * max(0, y - o) / y`` (Chattopadhyay et al.).

    ``y``: probability of the explained class on the image; ``o``: on the image multiplied by
    its map (:func:`explanation_masked`). Lower is better; average over images yourself.
    Raises if any ``y <= 0``.
    """
    y, o = _scores_pair(scores, masked_scores)
    if (y <= 0).any():
        raise ValueError(f"scores must be positive class probabilities; image "
                         f"{int(np.argmax(y <= 0))} has {y[y <= 0][0]}")
    return 100.0 * np.maximum(0.0, y - o) / y


def increase_in_confidence(scores, masked_scores) -> np.ndarray:
    """Per image, whether the probability rose on the masked image (``o > y``), bool (N,).
    Its mean times 100 is Chattopadhyay et al.'s "% Increase in Confidence"."""
    y, o = _scores_pair(scores, masked_scores)
    return o > y


PERTURBATION_MODES = ("deletion", "insertion")
#: RISE blurs the insertion start with an 11x11 Gaussian kernel of sigma 5 (Petsiuk et al.).
BLUR_SIGMA, BLUR_SIZE = 5.0, 11


def blurred(images, sigma: float = BLUR_SIGMA, size: int = BLUR_SIZE) -> np.ndarray:
    """Each image blurred with a ``size`` x ``size`` Gaussian kernel of standard deviation
    ``sigma`` (OpenCV, reflected borders): the substrate RISE's insertion starts from."""
    images = np.asarray(images, dtype=np.float32)
    if sigma <= 0 or size < 1 or size % 2 == 0:
        raise ValueError(f"blur needs sigma > 0 and an odd size >= 1, got sigma={sigma}, size={size}")
    return np.stack([cv2.GaussianBlur(im, (size, size), sigma) for im in images]).reshape(images.shape)


def perturbation_order(maps) -> np.ndarray:
    """Pixel indices (N, H*W) in order of decreasing saliency; ties keep raster order
    (row-major, top-left first), so the order is deterministic (a stable sort)."""
    maps = np.asarray(maps, dtype=np.float64)
    return np.argsort(-maps.reshape(len(maps), -1), axis=1, kind="stable")


def perturbation_counts(pixels: int, steps: int) -> np.ndarray:
    """How many pixels are deleted (inserted) after each of the ``steps`` steps, (steps + 1,):
    ``round(k * pixels / steps)`` for k = 0..steps, so the first entry is 0 and the last all."""
    return np.rint(np.linspace(0, pixels, steps + 1)).astype(np.int64)


def perturbation_curves(predict, images, maps, targets=None, mode: str = "deletion",
                        steps: int = 16, batch_size: int = 32, substrate=None,
                        blur_sigma: float = BLUR_SIGMA, blur_size: int = BLUR_SIZE,
                        progress: bool = True) -> np.ndarray:
    """Deletion or insertion curves (Petsiuk et al. 2018, RISE).

    Deletion starts from the image and replaces its pixels by the substrate (default zeros:
    black, for this repository's raw-pixel models) in order of decreasing saliency; insertion
    starts from the substrate (default the image blurred as in RISE, see :func:`blurred`) and
    puts the image's pixels back in the same order. After step k of ``steps``,
    :func:`perturbation_counts` pixels have been moved; ties are broken in raster order
    (:func:`perturbation_order`). All (image, step) pairs are pushed through ``predict`` in
    batches of ``batch_size``.

    Parameters
    ----------
    predict : callable
        images (B, H, W, C) float32 -> class probabilities (B, classes), e.g.
        ``lambda x: model.predict(x, verbose=0)``.
    images : array (N, H, W, C)
        Raw pixels as the model takes them.
    maps : array (N, H, W)
        Saliency maps at image resolution (only their order matters).
    targets : None, int or (N,) ints
        Class whose probability is traced; None: each image's predicted class.
    mode : "deletion" or "insertion"
    steps : int
        Number of steps; the curve has ``steps + 1`` points, x = 0, 1/steps, ..., 1.
    substrate : None, scalar or array broadcastable to images
        What deleted pixels become (deletion) or what insertion starts from.
    blur_sigma, blur_size : float, int
        The insertion blur when ``substrate`` is None.
    progress : bool
        Show a tqdm bar over the batches.

    Returns
    -------
    float64 array (N, steps + 1): the target's probability after each step.
    """
    if mode not in PERTURBATION_MODES:
        raise ValueError(f"mode must be one of {PERTURBATION_MODES}, got {mode!r}")
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    images, maps = images_and_maps(images, maps)
    n, h, w, c = images.shape
    if substrate is None:
        substrate = np.zeros_like(images) if mode == "deletion" else blurred(images, blur_sigma, blur_size)
    try:
        substrate = np.broadcast_to(np.asarray(substrate, dtype=np.float32), images.shape)
    except ValueError:
        raise ValueError(f"substrate must be a scalar or broadcast to the images' shape "
                         f"{images.shape}, got shape {np.shape(substrate)}") from None
    if targets is None:
        targets = predict_batches(predict, images, batch_size).argmax(axis=1)
    targets = np.broadcast_to(np.asarray(targets), (n,))
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be None, an int or {n} ints, got {targets!r}")

    # Rank of every pixel in the deletion order: pixel p is moved at step k iff rank < count_k.
    order = perturbation_order(maps)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(h * w)[None].repeat(n, 0), axis=1)
    rank = rank.reshape(n, h, w)
    counts = perturbation_counts(h * w, steps)
    start, end = (images, substrate) if mode == "deletion" else (substrate, images)

    pairs = [(i, k) for i in range(n) for k in range(steps + 1)]
    curves = np.empty((n, steps + 1))
    batches = range(0, len(pairs), batch_size)
    for b in tqdm(batches, desc=f"{mode}, {n} images x {steps + 1} steps", disable=not progress,
                  leave=False):
        chunk = pairs[b:b + batch_size]
        idx = np.array([i for i, _ in chunk])
        moved = rank[idx] < counts[[k for _, k in chunk]][:, None, None]
        batch = np.where(moved[..., None], end[idx], start[idx])
        probs = predict_batches(predict, batch, len(batch))
        curves[idx, [k for _, k in chunk]] = probs[np.arange(len(chunk)), targets[idx]]
    return curves


def predict_batches(predict, images, batch_size: int = 32) -> np.ndarray:
    """``predict`` (images -> class probabilities) over ``images`` in batches of
    ``batch_size``, checked to return (B, classes) per batch; float64 (N, classes)."""
    images = np.asarray(images)
    out = []
    for b in range(0, len(images), batch_size):
        x = np.ascontiguousarray(images[b:b + batch_size], dtype=np.float32)
        p = np.asarray(predict(x), dtype=np.float64)
        if p.ndim != 2 or len(p) != len(x):
            raise ValueError(f"predict must return class probabilities of shape (B, classes) "
                             f"for B images; for {len(x)} images it returned shape {p.shape}")
        out.append(p)
    return np.concatenate(out)


def auc(curves) -> np.ndarray:
    """Area under each curve (N, K) with x evenly spaced from 0 to 1: the trapezoid rule,
    so a constant curve of value v has area v. Deletion: lower is better; insertion: higher."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves must be (N, K) with K >= 2 points each, got shape {curves.shape}")
    integrate = require("scipy.integrate", "cam.metrics.auc")
    return integrate.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), axis=1)


# --------------------------------------------------------------------------- localisation


def _maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps and masks must be two (N, H, W) arrays of one shape, "
                         f"got {maps.shape} and {masks.shape}")
    if masks.dtype != bool:
        raise TypeError(f"masks must be boolean, got dtype {masks.dtype}")
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    if empty.any():
        raise ValueError(f"mask of image {int(np.argmax(empty))} is empty; "
                         f"{int(empty.sum())} of {len(masks)} masks are empty")
    return maps, masks


def pointing_game(maps, masks, tolerance: int = 0) -> np.ndarray:
    """Whether each map's maximum falls inside its mask (Zhang et al. 2018), bool (N,).

    Ties: a hit needs *every* pixel where the map reaches its maximum to lie in the mask, so
    a constant (e.g. all-zero) map only scores where the mask covers the whole image, and a
    plateau straddling the mask border is a miss. ``tolerance`` > 0 first grows the mask by a
    disc of that many pixels (Zhang et al. use 15 px).
    """
    maps, masks = _maps_and_masks(maps, masks)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1,) * 2)
        masks = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in masks])
    peak = maps == maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
    return ~(peak & ~masks).reshape(len(maps), -1).any(axis=1)


def energy_in_mask(maps, masks) -> np.ndarray:
    """Fraction of each map's positive mass inside its mask, sum(relu(m) * mask) / sum(relu(m)),
    (N,) in [0, 1]; NaN for a map with no positive value."""
    maps, masks = _maps_and_masks(maps, masks)
    positive = np.maximum(maps, 0).reshape(len(maps), -1)
    total = positive.sum(axis=1)
    inside = (positive * masks.reshape(len(masks), -1)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean, ``(mean, low, high)``.

    NaNs are dropped first (explicitly: a NaN is an image the metric is undefined for, such as
    an all-zero map's energy). ``scipy.stats.bootstrap`` with ``method="percentile"``, which
    stays defined for constant and boolean data where BCa does not. Fewer than two values
    left gives NaN bounds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, np.nan, np.nan
    if np.ptp(x) == 0:
        return mean, mean, mean
    stats = require("scipy.stats", "cam.metrics.bootstrap_ci")
    result = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=confidence,
                       method="percentile", rng=np.random.default_rng(seed))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)
