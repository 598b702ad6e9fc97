"""How much two saliency maps agree, and how faithful and well placed a map is.

* agreement: :func:`spearman`, :func:`top_mask`, :func:`top_iou`;
* faithfulness: :func:`average_drop`, :func:`increase_in_confidence` (Chattopadhyay et al.
  2018, Grad-CAM++), :func:`perturbation_curves` and :func:`auc` (deletion and insertion,
  Petsiuk et al. 2018, RISE); :func:`road` and :func:`road_by_method` with :func:`road_curves`,
  :func:`road_auc` and :func:`noisy_linear_impute` (ROAD, Rong et al. 2022);
* localisation against a ground-truth mask: :func:`pointing_game`, :func:`energy_in_mask`;
* the model-randomisation sanity check: :func:`randomisation_check` (Adebayo et al. 2018);
* :func:`bootstrap_ci` for the mean of any per-image metric.

Pure numpy/scipy functions over batches of maps (B, H, W), except those that run a model;
tests/test_metrics.py checks them against values worked out by hand.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import cv2
import numpy as np
from tqdm.auto import tqdm

from ._optional import require


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


def _images_and_maps(images, maps) -> tuple[np.ndarray, np.ndarray]:
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
    images, maps = _images_and_maps(images, maps)
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
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    images, maps = _images_and_maps(images, maps)
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


# --------------------------------------------------------------------------- ROAD
#
# RemOve And Debias (Rong, Leemann, Borisov, Kasneci and Kasneci, "A Consistent and Efficient
# Evaluation Strategy for Attribution Methods", ICML 2022). Deletion curves that set pixels to
# black let the model see *where* pixels were removed: the mask's shape alone moves the score
# (what the paper calls class information leakage). ROAD instead fills the removed pixels by
# Noisy Linear Imputation, which hides the mask's shape and, unlike ROAR, needs no retraining.

ROAD_ORDERS = ("morf", "lerf")
#: The removal fractions 10%, 20%, ..., 90% (the defaults of pytorch-grad-cam's ROAD metrics).
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Default noise of :func:`noisy_linear_impute`, a fraction of each image's value range.
ROAD_NOISE = 0.01
#: The 8-neighbourhood stencil of the reference implementation (tleemann/road_evaluation,
#: ``road/imputations.py``): weight 1/6 for the 4 direct neighbours and 1/12 for the 4
#: diagonal ones, here times 12 (2 and 1) so that the coefficients are exact integers;
#: scaling an equation does not change its solution.
ROAD_STENCIL = (((-1, 0), 2.0), ((1, 0), 2.0), ((0, -1), 2.0), ((0, 1), 2.0),
                ((-1, -1), 1.0), ((-1, 1), 1.0), ((1, -1), 1.0), ((1, 1), 1.0))


def _linear_impute(image: np.ndarray, removed: np.ndarray, sparse, linalg) -> np.ndarray:
    """The linear part of :func:`noisy_linear_impute` for one image (H, W, C) float64:
    the solution (n_removed, C) for the removed pixels in raster order."""
    h, w = removed.shape
    unknown = np.flatnonzero(removed)
    n = unknown.size
    variable = np.full(h * w, -1, dtype=np.int64)
    variable[unknown] = np.arange(n)
    r, c = np.divmod(unknown, w)
    flat = image.reshape(h * w, -1)
    diagonal = np.zeros(n)
    rhs = np.zeros((n, flat.shape[1]))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for (dr, dc), weight in ROAD_STENCIL:
        rr, cc = r + dr, c + dc
        inside = np.flatnonzero((rr >= 0) & (rr < h) & (cc >= 0) & (cc < w))
        neighbour = rr[inside] * w + cc[inside]
        diagonal[inside] += weight  # the weights of the neighbours that exist: renormalised
        is_unknown = variable[neighbour] >= 0
        rows.append(inside[is_unknown])
        cols.append(variable[neighbour[is_unknown]])
        vals.append(np.full(int(is_unknown.sum()), -weight))
        # each equation appears at most once per offset, so the fancy += does not collide
        rhs[inside[~is_unknown]] += weight * flat[neighbour[~is_unknown]]
    a = sparse.csc_matrix((np.concatenate([diagonal] + vals),
                           (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # The matrix is symmetric (the stencil is) and diagonally dominant with a kept neighbour in
    # every connected group, so positive definite: a symmetric fill-reducing ordering without
    # pivoting factorises it stably, in about 60% of the time of spsolve's default (COLAMD
    # with partial pivoting) on 224 x 224 images; one factorisation serves every channel.
    lu = linalg.splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                     options={"SymmetricMode": True})
    return lu.solve(rhs).reshape(n, flat.shape[1])


def noisy_linear_impute(images, removed, noise: float = ROAD_NOISE, seed=0,
                        value_range=None) -> np.ndarray:
    """ROAD's Noisy Linear Imputation (Rong et al. 2022) of the removed pixels.

    Every removed pixel x_p becomes the weighted mean of its 8 neighbours,

        x_p = sum_q w_pq x_q / sum_q w_pq,   q over the neighbours of p inside the image,

    with w = 1/6 for the 4 direct neighbours and 1/12 for the 4 diagonal ones (the reference
    implementation's weights; see ``ROAD_STENCIL``). Kept neighbours enter as known constants,
    removed ones as unknowns, so the removed pixels of an image form one sparse, symmetric
    positive definite linear system, factorised once (``scipy.sparse.linalg.splu``, symmetric
    minimum-degree ordering) and solved for the C channels as C right-hand sides. At the
    image border the weights are renormalised over the neighbours that exist (dividing by
    ``sum_q w_pq``), as the reference does. The stencil is symmetric, so an image that is an
    affine function of (row, column) is reproduced exactly in a removed region away from the
    border; by the discrete maximum principle the imputed values lie within the kept values'
    range.

    Noise: Gaussian, independent per removed pixel and channel, standard deviation
    ``noise * range``, added to the imputed pixels only (kept pixels are returned bit for bit).
    ``range`` is ``value_range`` if given, else the image's own value range ``max - min`` over
    all its pixels and channels (the whole input image, so the noise does not change with the
    fraction removed). The reference adds noise of a fixed absolute 0.01 to ImageNet-standardised
    tensors; this repository's models take raw pixels, others [0, 1] or standardised ones, so a
    fraction of the range is the scale-free equivalent: imputing ``a * x + b`` (a > 0) gives
    exactly ``a`` times the imputation of ``x`` plus ``b``, noise included. The default 0.01 is
    1% of the range (2.55 grey levels on a full-range 8-bit image), about 4.4 times the
    reference's noise (0.01 of a channel's standard deviation of about 0.225, i.e. 0.00225 of
    the [0, 1] range); pass ``noise=0.00225`` to match it. A constant image gets no noise.
    Results are not clipped to the valid pixel range (neither does the reference).

    A removed region without a kept pixel among its neighbours would leave the system
    singular. A maximal 8-connected group of removed pixels borders a kept pixel unless it is
    the whole image, so this happens exactly when every pixel of an image is removed: that
    raises a ValueError (there is nothing to impute from). An image with nothing removed is
    returned unchanged, without noise.

    Parameters
    ----------
    images : array (N, H, W, C)
    removed : bool array (N, H, W)
        True where a pixel is removed and imputed.
    noise : float >= 0
        Noise standard deviation as a fraction of the value range; 0: plain linear imputation.
    seed : int, None or anything ``numpy.random.default_rng`` takes
        The noise of image 0, then image 1, ... is drawn in turn from one generator, per image
        as (removed pixels in raster order, channels).
    value_range : None or float > 0
        The range the noise is relative to (e.g. 255 for all images); None: each image's own.

    Returns
    -------
    array (N, H, W, C), float32 for float32 and 8/16-bit integer images, float64 for float64.
    """
    images = np.asarray(images)
    removed = np.asarray(removed)
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, H, W, C) batch, got shape {images.shape}")
    if removed.shape != images.shape[:3]:
        raise ValueError(f"removed must be a (N, H, W) = {images.shape[:3]} mask matching the "
                         f"images, got shape {removed.shape}")
    if removed.dtype != bool:
        raise TypeError(f"removed must be boolean, got dtype {removed.dtype}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if value_range is not None and not (np.isfinite(value_range) and value_range > 0):
        raise ValueError(f"value_range must be None or a finite number > 0, got {value_range!r}")
    n, h, w, c = images.shape
    full = removed.reshape(n, -1).all(axis=1) if h * w else np.zeros(n, bool)
    if full.any():
        raise ValueError(f"image {int(np.argmax(full))} has every pixel removed: noisy linear "
                         f"imputation needs at least one kept pixel to impute from")
    sparse = require("scipy.sparse", "cam.metrics.noisy_linear_impute")
    linalg = require("scipy.sparse.linalg", "cam.metrics.noisy_linear_impute")
    out = images.astype(np.result_type(images.dtype, np.float32), copy=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if not removed[i].any():
            continue
        image = images[i].astype(np.float64)
        values = _linear_impute(image, removed[i], sparse, linalg)
        if noise > 0:
            scale = noise * (float(np.ptp(image)) if value_range is None else float(value_range))
            values = values + scale * rng.standard_normal(values.shape)
        out[i][removed[i]] = values
    return out


def _workers(workers) -> int:
    return (os.cpu_count() or 1) if workers == -1 else int(workers)


def _road_arguments(images, maps, fractions, order, batch_size, seed, workers=1):
    if order not in ROAD_ORDERS:
        raise ValueError(f"order must be one of {ROAD_ORDERS} (most / least relevant first), "
                         f"got {order!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or \
            (workers < 1 and workers != -1):
        raise ValueError(f"workers must be an integer >= 1, or -1 for one per CPU, got {workers!r}")
    fractions = _road_fractions(fractions)
    images, maps = _images_and_maps(images, maps)
    pixels = images.shape[1] * images.shape[2]
    counts = np.rint(fractions * pixels).astype(np.int64)
    if (counts >= pixels).any():
        f = fractions[np.argmax(counts >= pixels)]
        raise ValueError(f"fraction {f:g} removes all {pixels} pixels of these "
                         f"{images.shape[1]}x{images.shape[2]} images, leaving nothing to impute "
                         f"from; use smaller fractions or larger images")
    return images, maps, fractions, counts


def _road_fractions(fractions) -> np.ndarray:
    try:
        f = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError):
        f = None
    if (f is None or f.ndim != 1 or f.size == 0 or not np.isfinite(f).all()
            or (f <= 0).any() or (f >= 1).any() or (np.diff(f) <= 0).any()):
        raise ValueError(f"fractions must be a non-empty sequence of numbers strictly increasing "
                         f"within (0, 1), e.g. {ROAD_FRACTIONS}, got {fractions!r}")
    return f


def road_curves(predict, images, maps, targets=None, fractions=ROAD_FRACTIONS,
                order: str = "morf", noise: float = ROAD_NOISE, seed: int | None = 0,
                batch_size: int = 32, progress: bool = True, workers: int = 1) -> np.ndarray:
    """ROAD curves (Rong et al. 2022): the target's probability as ever more pixels are
    removed and filled by :func:`noisy_linear_impute`.

    For each fraction f, the ``round(f * H * W)`` most relevant pixels (``order="morf"``,
    most relevant first) or least relevant pixels (``"lerf"``) of each map are removed from the
    *original* image and imputed; the model is run on the result. Ties are removed in raster
    order in both orders (a stable sort, as :func:`perturbation_order`). MoRF: a faithful map
    makes the curve fall fast (lower area is better); LeRF: it keeps the curve high (higher area
    is better). The imputed images are pushed through ``predict`` in batches of ``batch_size``;
    an image whose removed set is the same at two fractions (the unperturbed point, or a map
    so flat that rounding removes the same pixels) is imputed and scored once.

    Parameters
    ----------
    predict : callable
        images (B, H, W, C) float32 -> class probabilities (B, classes).
    images : array (N, H, W, C)
        Raw pixels as the model takes them.
    maps : array (N, H, W)
        Saliency maps at image resolution (only their order matters).
    targets : None, int or (N,) ints
        Class whose probability is traced; None: each image's predicted class.
    fractions : sequence of floats
        Strictly increasing, in (0, 1); default 0.1, 0.2, ..., 0.9 as in the paper. A fraction
        that would remove every pixel is refused (nothing would be left to impute from).
    order : "morf" or "lerf"
    noise : float
        :func:`noisy_linear_impute`'s noise, a fraction of each image's value range.
    seed : None or int >= 0
        The noise of image i at fraction k is drawn from ``default_rng([seed, i, k])``, so the
        curves do not depend on ``batch_size``; None: not reproducible.
    progress : bool
        Show a tqdm bar over the batches.
    workers : int
        Threads that impute (SciPy's sparse solver releases the GIL): 1 imputes in the calling
        thread; more impute the next batch while ``predict`` scores this one; -1 uses one per
        CPU. The result does not depend on it.

    Returns
    -------
    float64 array (N, len(fractions) + 1): the target's probability at fraction 0 (the
    unperturbed image) and after each fraction. :func:`road_auc` gives the areas.
    """
    images, maps, fractions, counts = _road_arguments(images, maps, fractions, order,
                                                      batch_size, seed, workers)
    targets = _road_targets(predict, images, targets, batch_size)
    return _road_evaluate(predict, images, [maps], (order,), targets, counts, noise, seed,
                          batch_size, progress, _workers(workers))[0, order]


def _road_targets(predict, images, targets, batch_size) -> np.ndarray:
    n = len(images)
    if targets is None:
        targets = predict_batches(predict, images, batch_size).argmax(axis=1)
    targets = np.broadcast_to(np.asarray(targets), (n,))
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be None, an int or {n} ints, got {targets!r}")
    return targets


def _removal_ranks(maps: np.ndarray, order: str) -> np.ndarray:
    """Each pixel's place in the removal order, (N, H*W): at count c, pixel p is removed iff
    its rank is below c."""
    order_ = perturbation_order(maps if order == "morf" else -maps)
    rank = np.empty_like(order_)
    np.put_along_axis(rank, order_, np.arange(order_.shape[1])[None].repeat(len(order_), 0),
                      axis=1)
    return rank


def _road_evaluate(predict, images, maps_list, orders, targets, counts, noise, seed,
                   batch_size, progress, workers) -> dict:
    """ROAD curves of every map set in ``maps_list`` in every order of ``orders``, as
    ``{(index in maps_list, order): (N, len(counts) + 1) curves}``.

    Step k of image i removes a set of pixels; the imputed image depends only on (i, k, that
    set) (the noise is seeded by (seed, i, k)), so each distinct triple is imputed and scored
    once and shared by every map and order that asks for it: the unperturbed image (k = 0),
    and the removed sets of maps that rank their pixels alike.
    """
    n, h, w, _ = images.shape
    counts = np.concatenate([[0], counts])
    slots: dict[tuple, int] = {}
    work = []  # (image, step, packed removed mask) for each distinct request
    where = {}
    for j, maps in enumerate(maps_list):
        for order in orders:
            rank = _removal_ranks(maps, order)
            index = np.empty((n, len(counts)), np.int64)
            for i in range(n):
                for k, count in enumerate(counts):
                    packed = np.packbits(rank[i] < count)
                    key = (i, k, hashlib.blake2b(packed.tobytes(), digest_size=16).digest())
                    index[i, k] = slots.setdefault(key, len(slots))
                    if index[i, k] == len(work):
                        work.append((i, k, packed))
            where[j, order] = index

    def impute(job):
        i, k, packed = job
        removed = np.unpackbits(packed, count=h * w).reshape(1, h, w).astype(bool)
        return noisy_linear_impute(images[i:i + 1], removed, noise,
                                   None if seed is None else [int(seed), i, k])[0]

    chunks = [work[b:b + batch_size] for b in range(0, len(work), batch_size)]
    scores = np.empty(len(work))
    asked = len(where) * n * len(counts)
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        # With threads, the next batch is imputed while ``predict`` scores this one.
        pending = [pool.submit(impute, job) for job in chunks[0]] if pool and chunks else None
        for c, chunk in enumerate(tqdm(chunks, disable=not progress, leave=False,
                                       desc=f"ROAD, {n} images: {len(work)} imputed images "
                                            f"for {asked} curve points")):
            if pool:
                batch = np.stack([future.result() for future in pending])
                if c + 1 < len(chunks):
                    pending = [pool.submit(impute, job) for job in chunks[c + 1]]
            else:
                batch = np.stack([impute(job) for job in chunk])
            probs = predict_batches(predict, batch, len(batch))
            idx = np.array([i for i, _, _ in chunk])
            start = c * batch_size
            scores[start:start + len(chunk)] = probs[np.arange(len(chunk)), targets[idx]]
    return {key: scores[index] for key, index in where.items()}


def road_auc(curves, fractions=ROAD_FRACTIONS) -> np.ndarray:
    """Area under each ROAD curve (N, len(fractions) + 1) at x = 0, *fractions*, by the
    trapezoid rule, divided by the last fraction: the curve's mean height over the fractions
    tested, so a constant curve of value v has area v (as :func:`auc`, which this equals for
    evenly spaced fractions f, 2f, 3f, ... such as the default). MoRF: lower is better; LeRF:
    higher is better."""
    f = _road_fractions(fractions)
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] != len(f) + 1:
        raise ValueError(f"curves must be (N, {len(f) + 1}): the unperturbed score and one per "
                         f"fraction of {len(f)}, got shape {curves.shape}")
    integrate = require("scipy.integrate", "cam.metrics.road_auc")
    return integrate.trapezoid(curves, x=np.concatenate([[0.0], f]), axis=1) / f[-1]


def road(predict, images, maps, targets=None, fractions=ROAD_FRACTIONS,
         noise: float = ROAD_NOISE, seed: int | None = 0, batch_size: int = 32,
         progress: bool = True, workers: int = 1) -> dict:
    """Both ROAD orders for the same images, maps and targets (see :func:`road_curves`).

    Returns a dict of (N,) or (N, K) float64 arrays: ``morf`` and ``lerf`` (the curves),
    ``morf_auc`` (lower is better), ``lerf_auc`` (higher is better) and ``lerf_minus_morf``
    (``lerf_auc - morf_auc``, the combined score: higher is better; positive where removing the
    map's most relevant pixels costs the model more than removing its least relevant ones),
    plus ``fractions`` (K - 1,) and
    ``targets`` (N,). pytorch-grad-cam's ``ROADCombined`` reports half this gap, from the mean
    of each curve over the fractions without the unperturbed point.
    """
    return road_by_method(predict, images, {"maps": maps}, targets, fractions, noise, seed,
                          batch_size, progress, workers)["maps"]


def road_by_method(predict, images, maps, targets=None, fractions=ROAD_FRACTIONS,
                   noise: float = ROAD_NOISE, seed: int | None = 0, batch_size: int = 32,
                   progress: bool = True, workers: int = 1) -> dict:
    """:func:`road` for several maps of the same images, e.g. one per method:
    ``{name: road(predict, images, maps[name], ...)}``, with the same targets for all.

    The result is the same as calling :func:`road` per map, but an imputed image is computed
    and scored once however many maps and orders ask for it: the unperturbed image, and every
    (image, fraction) at which two maps remove the same set of pixels (maps that rank their
    pixels alike, such as Grad-CAM's and a method equal to it up to rounding, often do at
    some fractions). ``maps`` is a dict ``{name: (N, H, W) array}``; ``targets`` None explains
    each image's predicted class; the other arguments are :func:`road_curves`'s.
    """
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError(f"maps must be a non-empty dict {{name: (N, H, W) maps}}, "
                         f"got {type(maps).__name__}")
    checked = {}
    for name, m in maps.items():
        images_, checked[name], f, counts = _road_arguments(images, m, fractions, "morf",
                                                            batch_size, seed, workers)
    targets = _road_targets(predict, images_, targets, batch_size)
    curves = _road_evaluate(predict, images_, list(checked.values()), ROAD_ORDERS, targets,
                            counts, noise, seed, batch_size, progress, _workers(workers))
    out = {}
    for j, name in enumerate(checked):
        result = {"fractions": f, "targets": targets}
        for order in ROAD_ORDERS:
            result[order] = curves[j, order]
            result[f"{order}_auc"] = road_auc(result[order], f)
        result["lerf_minus_morf"] = result["lerf_auc"] - result["morf_auc"]
        out[name] = result
    return out


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


# --------------------------------------------------------------------------- sanity check


def randomisation_stages(model, group=None) -> list[tuple[str, list[str]]]:
    """Groups of the model's weighted layers, from the output down, for the cumulative
    model-randomisation check: ``[(stage name, [layer names]), ...]``.

    By default each weighted layer is its own stage, and a BatchNormalization joins the layer
    before it (a small CNN gives ``predictions``, ``conv4``, ..., ``conv1``). ``group(layer,
    previous)`` overrides that: it gets each weighted layer in graph order and the stage key of
    the one before it (None for the first) and returns the layer's stage key; consecutive
    layers with one key form one stage, named by the key. A study passes its architecture's
    grouping here (DenseNet blocks: :func:`cam.study.models.randomisation_stages`).
    """
    group = group or _default_stage
    weighted = [layer for layer in _flat_layers(model) if layer.trainable_weights]
    keys, previous = [], None
    for layer in weighted:
        previous = group(layer, previous)
        keys.append(previous)
    stages: list[tuple[str, list[str]]] = []
    for layer, key in reversed(list(zip(weighted, keys))):
        if stages and stages[-1][0] == key:
            stages[-1][1].append(layer.name)
        else:
            stages.append((key, [layer.name]))
    return stages


def _default_stage(layer, previous: str | None) -> str:
    import keras

    if isinstance(layer, keras.layers.BatchNormalization) and previous is not None:
        return previous
    return layer.name


def _flat_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def reinitialise(layer, seed: int) -> None:
    """Redraw every weight of ``layer`` in place from the layer's own initializer
    (``kernel_initializer`` for ``kernel``, ``gamma_initializer`` for ``gamma``, ...), seeded
    ``seed``, ``seed + 1``, ... in weight order. BatchNormalization goes back to identity
    statistics, as at construction."""
    for offset, variable in enumerate(layer.weights):
        name = variable.name.split("/")[-1]
        init = getattr(layer, f"{name}_initializer", None)
        if init is None and name == "depthwise_kernel":
            init = getattr(layer, "depthwise_initializer", None)
        if init is None:
            raise ValueError(f"cannot re-initialise weight {variable.path!r} of layer "
                             f"{layer.name!r}: the layer has no {name}_initializer")
        config = init.get_config()
        if "seed" in config:
            config["seed"] = seed + offset
        fresh = type(init).from_config(config)
        variable.assign(fresh(tuple(variable.shape), dtype=variable.dtype))


def randomisation_check(model, explainers, images, layer=None, stages=None, targets=None,
                        seed: int = 0, normalize: bool = False, progress: bool = True):
    """Model-randomisation sanity check (Adebayo et al. 2018), cumulative from the top.

    A copy of the model (``keras.models.clone_model`` with the same weights; the caller's model
    is never touched) has the layers of each stage re-initialised in turn, keeping the earlier
    stages re-initialised. After each stage every explainer recomputes its maps of the same
    targets at the same layer, and each map is compared with the original model's map by
    Spearman rank correlation (:func:`spearman`). A method whose maps still correlate highly
    once the weights are random does not depend on what the model learned.

    Parameters
    ----------
    model : keras.Model
    explainers : dict or explainer class
        ``{method name: factory}``, a factory being an explainer class or any callable
        ``factory(model, layer)`` returning an explainer; or one class (named by its ``name``).
    images : array (N, H, W, C)
    layer : str, int or None
        The layer all maps are taken at.
    stages : list of (name, [layer names]) or None
        What to re-initialise, top first; None: :func:`randomisation_stages` (one stage
        per weighted layer).
    targets : None, int or (N,) ints
        Classes to explain on every stage; None: the original model's predicted classes.
    seed : int
        Layer i of stage s is re-initialised with seeds from ``seed + 1_000_000 * s + 100 * i``.
    normalize : bool
        Compare normalised maps (ReLU, divided by the max) instead of the raw maps; both on
        the layer's grid.

    Returns
    -------
    list of dicts, one row per (stage, method, image) (``pandas.DataFrame(rows)`` makes it a
    table): ``stage`` (0 = the unchanged copy,
    a check that the copy reproduces the maps), ``reinitialised`` (the stage's name),
    ``layers`` (how many layers are random so far), ``method``, ``image``, ``spearman``
    (NaN where a map is constant).
    """
    import keras

    if not isinstance(explainers, dict):
        explainers = {getattr(explainers, "name", getattr(explainers, "__name__", "explainer")): explainers}
    images = np.asarray(images, dtype=np.float32)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    if stages is None:
        stages = randomisation_stages(copy)
    known = {layer_.name: layer_ for layer_ in _flat_layers(copy)}
    for name, names in stages:
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"stage {name!r} names layers the model does not have: {missing[:5]}")

    def maps_of(methods) -> dict:
        return {m: e(images, targets=targets, upsample=False, normalize=normalize)
                for m, e in methods.items()}

    original = {m: f(model, layer) for m, f in explainers.items()}
    if targets is None:
        targets = next(iter(original.values())).explain(images, upsample=False).targets
    reference = maps_of(original)
    # One explainer per method on the copy: its compiled functions read the copy's variables,
    # so re-initialising them in place needs no retracing between stages.
    on_copy = {m: f(copy, layer) for m, f in explainers.items()}
    rows, count = [], 0
    plan = [("none", [])] + list(stages)
    for s, (name, names) in enumerate(tqdm(plan, desc="randomisation stages",
                                           disable=not progress, leave=False)):
        for i, layer_name in enumerate(names):
            reinitialise(known[layer_name], seed + 1_000_000 * s + 100 * i)
        count += len(names)
        for m, maps in maps_of(on_copy).items():
            for image, rho in enumerate(spearman(reference[m], maps)):
                rows.append({"stage": s, "reinitialised": name, "layers": count, "method": m,
                             "image": image, "spearman": rho})
    return rows
