"""ROAD, RemOve And Debias (Rong, Leemann, Borisov, Kasneci and Kasneci, "A Consistent and
Efficient Evaluation Strategy for Attribution Methods", ICML 2022): how faithful a saliency map
is, measured without letting the model see where pixels were removed.

* :func:`road` and :func:`road_by_method` (several maps of the same images, each imputed image
  computed once): both orders' curves, their areas and the gap between them;
* :func:`road_curves` (one order) and :func:`road_auc` (the area under a curve);
* :func:`noisy_linear_impute`: the removed pixels filled from their neighbours, plus noise.

Deletion curves that set pixels to black (:func:`cam.metrics.perturbation_curves`) let the
model see *where* pixels were removed: the mask's shape alone moves the score (what the paper
calls class information leakage). ROAD instead fills the removed pixels by Noisy Linear
Imputation, which hides the mask's shape and, unlike ROAR, needs no retraining.

NumPy and SciPy (``cam[metrics]``) over batches of images and maps; the model enters only as a
``predict`` function (images -> class probabilities). tests/test_road.py checks them against
values worked out by hand.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
from tqdm.auto import tqdm

from ._optional import require
from .checks import check_int
from .metrics import images_and_maps, perturbation_order, predict_batches

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
    images, removed = _check_impute(images, removed, noise, value_range)
    n = len(images)
    sparse = require("scipy.sparse", "cam.road.noisy_linear_impute")
    linalg = require("scipy.sparse.linalg", "cam.road.noisy_linear_impute")
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


def _check_impute(images, removed, noise, value_range):
    """The arguments of :func:`noisy_linear_impute` as arrays, or a clear error."""
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
    n, h, w, _ = images.shape
    full = removed.reshape(n, -1).all(axis=1) if h * w else np.zeros(n, bool)
    if full.any():
        raise ValueError(f"image {int(np.argmax(full))} has every pixel removed: noisy linear "
                         f"imputation needs at least one kept pixel to impute from")
    return images, removed


def _workers(workers) -> int:
    return (os.cpu_count() or 1) if workers == -1 else int(workers)


def _road_arguments(images, maps, fractions, order, batch_size, seed, workers=1):
    if order not in ROAD_ORDERS:
        raise ValueError(f"order must be one of {ROAD_ORDERS} (most / least relevant first), "
                         f"got {order!r}")
    check_int("batch_size", batch_size)
    check_int("seed", seed, low=0, allow_none=True, none="fresh randomness")
    check_int("workers", workers, also=(-1,), why=" (-1: one per CPU)")
    fractions = _road_fractions(fractions)
    images, maps = images_and_maps(images, maps)
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
    order in both orders (a stable sort, as :func:`cam.metrics.perturbation_order`). MoRF: a
    faithful map makes the curve fall fast (lower area is better); LeRF: it keeps the curve high
    (higher area is better). The imputed images are pushed through ``predict`` in batches of
    ``batch_size``; an image whose removed set is the same at two fractions (the unperturbed
    point, or a map so flat that rounding removes the same pixels) is imputed and scored once.

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
    tested, so a constant curve of value v has area v (as :func:`cam.metrics.auc`, which this
    equals for evenly spaced fractions f, 2f, 3f, ... such as the default). MoRF: lower is
    better; LeRF: higher is better."""
    f = _road_fractions(fractions)
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] != len(f) + 1:
        raise ValueError(f"curves must be (N, {len(f) + 1}): the unperturbed score and one per "
                         f"fraction of {len(f)}, got shape {curves.shape}")
    integrate = require("scipy.integrate", "cam.road.road_auc")
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
