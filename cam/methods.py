"""The CAM methods, each a short class on a template of :mod:`cam.explainers`.

A new method is a class here and one line in ``cam.METHODS`` (``cam/__init__.py``); the
command line, :func:`cam.explain` and ``cam.__all__`` pick it up from there.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
from keras import ops

from . import backend as B
from . import combine as C
from . import maps as M
from . import targets as T
from .explainers import (AblationExplainer, Explainer, GradientExplainer,
                         check_batch_size, per_row, score_rows)
from .graph import LayerGraph, Split


class GradCAM(GradientExplainer):
    """Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2): channel k's weight is its gradient
    averaged over the grid, w_k = mean_ij dy/dA_ij^k; the map is sum_k w_k A_k."""

    name = "Grad-CAM"

    def channel_weights(self, activation, gradients):
        return C.gradcam_weights(gradients)


class AblationCAM(AblationExplainer):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    Each channel k of the target layer is set to ``ablation_value`` in turn; its weight is the
    relative drop of the class score, w_k = (y - y_k) / y, and the map is sum_k w_k A_k.
    C evaluations of the head per image.
    """

    name = "Ablation-CAM"

    def masks(self, grid_shape):
        channels = grid_shape[-1]
        return np.eye(channels, dtype=bool)[:, None, None, :]

    def combine(self, activation, scores, ablated, masks):
        return C.weighted_channel_sum(activation, C.ablation_weights(scores, ablated))


class FastAblationCAM(AblationExplainer):
    """FastAblationCAM: ablate every channel in one window of the grid at a time.

    All channels in a ``window`` x ``window`` block of cells are set to ``ablation_value``;
    blocks step by ``stride`` (default ``window``), the last block in each direction is shifted
    back to end at the edge, and each cell gets the mean score drop y - y_ablated of the blocks
    that cover it. That drop is the map itself (no channel weighting). About
    (h / stride) * (w / stride) evaluations of the head per image instead of C. On a token
    layer (a ViT) a cell is a patch token, so ``window=1`` ablates one token at a time.
    """

    name = "FastAblationCAM"

    def __init__(self, model, layer=None, score="logit", window=1, stride=None, batch_size=None,
                 ablation_value=0.0, mode="head", reshape=None, fuse=None):
        super().__init__(model, layer=layer, score=score, batch_size=batch_size,
                         ablation_value=ablation_value, mode=mode, reshape=reshape, fuse=fuse)
        h, w = self.split.target_shape[:2]
        for name, value in (("window", window), ("stride", stride)):
            if (value is not None or name == "window") and \
                    (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        grid = [d for d in (h, w) if d is not None]
        if grid and window > min(grid):
            raise ValueError(f"window {window} is larger than layer {self.layer!r}'s "
                             f"{h}x{w} grid; use 1..{min(grid)}")
        stride = window if stride is None else stride
        if not 1 <= stride <= window:
            raise ValueError(f"stride must be between 1 and window ({window}) so that every "
                             f"cell is ablated at least once, got {stride}")
        self.window, self.stride = int(window), int(stride)

    def mask_settings(self):
        return (self.window, self.stride)

    def masks(self, grid_shape):
        h, w = grid_shape[:2]
        if self.window > min(h, w):
            raise ValueError(f"window {self.window} is larger than the {h}x{w} grid of layer "
                             f"{self.layer!r} for these images")
        return M.window_masks((h, w), self.window, self.stride)[..., None]

    def combine(self, activation, scores, ablated, masks):
        return C.spread_window_drops(ops.expand_dims(scores, 1) - ablated, masks[..., 0])


class GradCAMPlusPlus(GradientExplainer):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19): w_k = sum_ij alpha_ij^k
    relu(dy/dA_ij^k), with the closed-form alpha_ij^k = g^2 / (2 g^2 + sum_ab A_ab^k g^3),
    g = dy/dA_ij^k (alpha = 0 where its denominator is 0); the map is sum_k w_k A_k.

    The paper derives alpha for the exponential score exp(y), whose second and third
    derivatives are powers of the first (Sec. 3.3); exp(y) cancels from alpha and only scales
    every weight of an image by the same factor, so, as the common implementations do, the
    weights are computed from the first-order gradient of the explainer's ``score`` alone
    (the logit by default, the probability with ``score="probability"``).
    """

    name = "Grad-CAM++"

    def channel_weights(self, activation, gradients):
        return C.gradcampp_weights(activation, gradients)


class XGradCAM(GradientExplainer):
    """XGrad-CAM (Fu et al., BMVC 2020, eq. 14): channel k's gradient averaged over the grid
    with the activation's share of the channel as weight, w_k = sum_ij (A_ij^k / sum_ab A_ab^k)
    dy/dA_ij^k (0 for a channel that sums to 0); the map is sum_k w_k A_k."""

    name = "XGrad-CAM"

    def channel_weights(self, activation, gradients):
        return C.xgradcam_weights(activation, gradients)


class LayerCAM(GradientExplainer):
    """LayerCAM (Jiang et al., IEEE TIP 2021, eq. 5-6): a weight per cell and channel, the
    positive gradient relu(dy/dA_ij^k); the map is sum_k relu(dy/dA_ij^k) A_ij^k."""

    name = "LayerCAM"

    def channel_weights(self, activation, gradients):
        return C.layercam_weights(gradients)


class HiResCAM(GradientExplainer):
    """HiResCAM (Draelos & Carin, 2020): the gradient times the activation, element-wise, summed
    over the channels: sum_k dy/dA_ij^k A_ij^k (Grad-CAM without averaging the gradient over
    the grid)."""

    name = "HiResCAM"

    def channel_weights(self, activation, gradients):
        return gradients


# --------------------------------------------------------------------------- perturbation
# Methods that perturb the input image and score every perturbed copy with the whole model.


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class _InputTarget(LayerGraph):
    """A model's layer graph whose target is the model input itself: the :class:`Split` it
    gives has the identity as its trunk and the whole model as its head."""

    def resolve(self, layer):
        return "input", self.input_keys[0]


class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus, ECCV 2014, Sec. 4.2): the score drop when a patch of the
    input image is hidden.

    A ``window`` x ``window`` patch of pixels (every channel) is set to ``baseline``; patches
    step by ``stride`` (default ``window``), the last one in each direction shifted back to end
    at the image's edge, and each pixel gets the mean score drop y - y_occluded of the patches
    that cover it. Every occluded image goes through the whole model, in fixed-size batches of
    ``batch_size``. About (H / stride) * (W / stride) evaluations per image
    (:attr:`evaluations_per_image`).

    The map is on the input's grid: ``upsample=False`` returns (B, H, W) maps, and
    ``Explanation.layer`` is ``"input"``.

    Parameters
    ----------
    window : None or int
        Side of the square patch in pixels. None (the default) picks the shorter image side
        divided by 14, at least 1: 16 pixels at 224 x 224, a 14 x 14 grid of patches.
    stride : None or int
        Step between patches, 1..window (None: ``window``, non-overlapping patches).
    baseline : float or sequence of floats
        What hidden pixels are set to, in the units of the model's input (one number, or one
        per input channel): 0 is black for a model that takes raw pixels and rescales inside,
        the dataset mean is a grey patch for a model that takes mean-subtracted input.
    layer, mode, reshape
        Accepted so every method is built the same way and checked as for every method (the
        base class splits the model at ``layer``, so the model needs one layer with a spatial
        grid), but not used: the occlusion perturbs pixels and always runs the whole model.
    """

    name = "Occlusion"
    #: With ``window=None`` the patch is the shorter image side divided by this (16 at 224).
    PATCHES_PER_SIDE = 14

    def __init__(self, model, layer=None, window=None, stride=None, baseline=0.0,
                 score="logit", batch_size=None, mode="head", reshape=None):
        super().__init__(model, layer=layer, score=score, mode=mode, reshape=reshape)
        # Explain on the input: the trunk is the identity and the head the whole model.
        graph = self.split.graph
        self.split = Split(model, None, score,
                           graph=_InputTarget(**{f.name: getattr(graph, f.name)
                                                 for f in fields(graph)}))
        self.layer = self.split.layer
        #: Occluded images per compiled call at most (None: from the memory budget).
        self.batch_size = check_batch_size(batch_size) or self.rows_per_call("full")
        self._device_masks: dict = {}
        if window is not None and (not _is_int(window) or window < 1):
            raise ValueError(f"window must be None (automatic) or an int >= 1, got {window!r}")
        if stride is not None and (not _is_int(stride) or stride < 1
                                   or window is not None and stride > window):
            bound = "window" if window is None else f"window ({window})"
            raise ValueError(f"stride must be None or an int between 1 and {bound} so that "
                             f"every pixel is occluded at least once, got {stride!r}")
        self.window = None if window is None else int(window)
        self.stride = None if stride is None else int(stride)
        channels = self.split.graph.input_specs[0].shape[-1]
        self.baseline = self._check_baseline(baseline, channels)
        size = tuple(self.split.graph.input_specs[0].shape[1:3])
        if None not in size:
            self.geometry(size)  # a window that cannot fit the model's input fails here
        self._occluded = self.occluding_function(T.Class(0))

    @staticmethod
    def _check_baseline(baseline, channels):
        wanted = (f"a finite number or {channels} finite numbers (one per input channel)"
                  if channels is not None else "a finite number or one per input channel")
        try:
            if isinstance(baseline, (str, bytes, bool)):
                raise TypeError
            value = np.asarray(baseline, dtype=np.float64)
        except (TypeError, ValueError):
            value = None
        if value is None or value.ndim > 1 or not np.isfinite(value).all() or (
                value.ndim == 1 and (len(value) == 0 or channels is not None
                                     and len(value) != channels)):
            raise ValueError(f"baseline must be {wanted}, got {baseline!r}")
        return float(value) if value.ndim == 0 else tuple(float(v) for v in value)

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, window={self.window!r}, stride={self.stride!r}, "
                f"baseline={self.baseline!r})")

    def geometry(self, size: tuple[int, int]) -> tuple[int, int]:
        """(window, stride) in pixels for images of ``size`` (H, W)."""
        h, w = size
        window = self.window if self.window is not None else \
            max(1, min(h, w) // self.PATCHES_PER_SIDE)
        if window > min(h, w):
            raise ValueError(f"window {window} is larger than the {h}x{w} input images; use "
                             f"1..{min(h, w)}")
        stride = window if self.stride is None else self.stride
        if stride > window:
            raise ValueError(f"stride must be between 1 and window ({window}) so that every "
                             f"pixel is occluded at least once, got {stride}")
        return window, stride

    def masks(self, size: tuple[int, int]) -> np.ndarray:
        """One boolean (H, W) mask per occluded patch, (N, H, W); True pixels are occluded."""
        return M.window_masks(tuple(size), *self.geometry(size))

    @property
    def evaluations_per_image(self) -> int:
        """Occluded images scored per image (whole-model passes)."""
        return self.evaluations(tuple(self.split.graph.input_specs[0].shape[1:3]))

    def evaluations(self, size: tuple[int, int]) -> int:
        """Occlusions per image for images of ``size`` (H, W)."""
        if any(d is None for d in size):
            raise ValueError(f"model {self.model.name!r} takes images of any size, so the number "
                             f"of occlusions depends on the image size; call "
                             f"evaluations((H, W)) with a known size")
        h, w = size
        window, stride = self.geometry(size)
        return len(M.window_starts(h, window, stride)) * len(M.window_starts(w, window, stride))

    def occluding_function(self, target) -> B.Compiled:
        """The compiled scoring of occluded images for ``target``'s kind, shared by every
        Occlusion on the model."""
        split = self.split
        return self.shared_compiled(("occluded", target.key),
                                    lambda: lambda *a: _occluded_scores(split, target, *a))

    def device_masks(self, size: tuple[int, int]):
        """The :meth:`masks` for images of ``size`` on the device, made once per size."""
        key = (tuple(int(d) for d in size), self.window, self.stride)
        if key not in self._device_masks:
            self._device_masks[key] = B.tensor(self.masks(key[0]))
        return self._device_masks[key]

    def _baseline(self, images):
        """The baseline as one value per input channel (one shape for every Occlusion, which
        share a compiled function)."""
        channels = ops.shape(images)[-1]
        return B.tensor(np.broadcast_to(np.asarray(self.baseline, np.float32), (channels,)))

    def occluded_scores(self, images, masks, targets) -> np.ndarray:
        """The class scores of each image with each of ``masks`` (N, H, W) occluded, (B, N) on
        the host, ``batch_size`` occluded images a call: for timing and inspecting."""
        images = self._check_images(images)
        masks = B.tensor(np.asarray(masks, bool))
        return B.numpy(score_rows(self._occluded, len(images), ops.shape(masks)[0],
                                  self.batch_size, B.tensor(images), masks,
                                  self._baseline(images),
                                  {"k": B.tensor(np.asarray(targets), "int32")}))

    def raw_maps(self, images, activation, bypass, target, params, scores):
        masks = self.device_masks(ops.shape(images)[1:3])
        occluded = score_rows(self.occluding_function(target), ops.shape(images)[0],
                              ops.shape(masks)[0], self.batch_size, images, masks,
                              self._baseline(images), params, desc=self.name)
        return C.spread_window_drops(ops.expand_dims(scores, 1) - occluded, masks)


def _occluded_scores(split, target, images, masks, baseline, params, index):
    # images (k, H, W, C); masks (N, H, W) bool; baseline () or (C,); index (R,) rows of the
    # (image, mask) list: the class score of each occluded image, (R,)
    count, n = ops.shape(images)[0], ops.shape(masks)[0]
    image, mask = ops.minimum(index // n, count - 1), index % n
    occluded = ops.where(ops.take(masks, mask, axis=0)[..., None],
                         ops.cast(baseline, images.dtype), ops.take(images, image, axis=0))
    return target.score(split.full(occluded), per_row(params, image))


class ScoreCAM(Explainer):
    """Score-CAM (Wang et al., CVPR Workshops 2020, Algorithm 1): channels weighted by the
    class score of the image masked with them.

    Each channel A_k of the target layer is upsampled bilinearly to the image size
    (pixel-centre aligned, :func:`cam.maps.upsample_maps`) and min-max normalised to a mask
    H_k in [0, 1] (a constant channel gives an all-zero mask); the image times H_k goes
    through the whole model, in fixed-size batches of ``batch_size``, and its class score s_k
    is channel k's evidence. As in the paper's Algorithm 1, the weights are a softmax over
    the channels, w = softmax_k(s_k) (the paper subtracts the score of a baseline image first,
    the same for every channel, which a softmax ignores); the map is sum_k w_k A_k, and
    normalising applies the paper's ReLU. C evaluations per image, or ``channels``.

    ``score`` is the library's default, the logit, unless ``score="probability"``. The
    paper's score f is the model's softmax output; the authors' code (haofanwang/Score-CAM)
    takes the probability of the masked image as the weight directly, with no softmax over
    channels, while pytorch-grad-cam applies the channel softmax to the logit, as this class
    does by default. Probabilities lie in [0, 1], so their channel softmax gives nearly even
    weights (exp(p) is between 1 and e); the logits keep the channels apart.

    Parameters
    ----------
    channels : None or int
        None uses every channel. An int N keeps, per image, only the N channels whose
        activation varies most over the grid (largest spatial variance, as Faster Score-CAM
        does); the others get weight 0 and the softmax runs over the N kept channels.
        :attr:`channels_used` and ``repr`` state it.
    mode : "head" or "full"
        Checked as for every method; the masked images always run through the whole model
        (``"full"`` takes the unmasked scores from the whole model as well).
    """

    name = "Score-CAM"

    def __init__(self, model, layer=None, score="logit", batch_size=None, channels=None,
                 mode="head", reshape=None):
        super().__init__(model, layer=layer, score=score, mode=mode, reshape=reshape)
        #: Masked images per compiled call at most (None: from the memory budget).
        self.batch_size = check_batch_size(batch_size) or self.rows_per_call("full")
        total = self.split.target_shape[-1]
        if channels is not None and (not _is_int(channels) or channels < 1
                                     or total is not None and channels > total):
            raise ValueError(f"channels must be None (every channel) or an int between 1 and "
                             f"{total} (layer {self.layer!r} has {total} channels), "
                             f"got {channels!r}")
        self.channels = None if channels is None else int(channels)
        self._masked = self.masking_function(T.Class(0))
        self._resize: dict = {}

    @property
    def channels_used(self) -> int:
        """Channels scored per image: ``channels``, or every channel of the target layer."""
        return self.channels if self.channels is not None else self.split.target_shape[-1]

    @property
    def evaluations_per_image(self) -> int:
        """Masked images scored per image (whole-model passes): one per channel used."""
        return self.channels_used

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, channels={self.channels_used} of "
                f"{self.split.target_shape[-1]})")

    def selected_channels(self, activation):
        """Indices of the channels scored per image, (B, channels used), on the device: every
        channel, or the ``channels`` of largest spatial variance (largest first; the NumPy
        reference is :func:`cam.maps.top_variance_channels`)."""
        count, total = ops.shape(activation)[0], ops.shape(activation)[-1]
        if self.channels is None:
            return ops.broadcast_to(ops.arange(total, dtype="int32")[None], (count, total))
        variance = ops.var(ops.reshape(activation, (count, -1, total)), axis=1)
        return ops.cast(ops.top_k(variance, self.channels, sorted=True)[1], "int32")

    def masking_function(self, target) -> B.Compiled:
        """The compiled scoring of masked images for ``target``'s kind, shared by every
        Score-CAM on the model and layer."""
        split = self.split
        return self.shared_compiled(("masked", target.key),
                                    lambda: lambda *a: _masked_scores(split, target, *a))

    def resize_matrices(self, grid: tuple[int, int], size: tuple[int, int]) -> tuple:
        """(H x h, W x w) matrices that upsample an (h, w) map to (H, W) as R_h A R_w^T, on the
        device: exactly :func:`cam.maps.upsample_maps` (bilinear, pixel-centre aligned), which
        builds them by upsampling the unit maps. Made once per grid and size."""
        key = (tuple(int(d) for d in grid), tuple(int(d) for d in size))
        if key not in self._resize:
            matrices = []
            for cells, pixels in zip(*key):
                units = np.eye(cells, dtype=np.float32)[:, :, None]  # unit maps (cells, 1)
                matrices.append(B.tensor(M.upsample_maps(units, (pixels, 1))[:, :, 0].T))
            self._resize[key] = tuple(matrices)
        return self._resize[key]

    def raw_maps(self, images, activation, bypass, target, params, scores):
        count, total = ops.shape(activation)[0], ops.shape(activation)[-1]
        chosen = self.selected_channels(activation)
        used = ops.shape(chosen)[1]
        rows_h, rows_w = self.resize_matrices(ops.shape(activation)[1:3], ops.shape(images)[1:3])
        channels = ops.reshape(ops.transpose(activation, (0, 3, 1, 2)),
                               (count * total, *ops.shape(activation)[1:3]))
        flat = ops.reshape(chosen + ops.arange(count, dtype="int32")[:, None] * total, (-1,))
        masked = score_rows(self.masking_function(target), count, used, self.batch_size, images,
                            channels, flat, rows_h, rows_w, params, desc=self.name)
        weights = ops.einsum("bk,bkc->bc", C.scorecam_weights(masked),
                             ops.one_hot(chosen, total, dtype="float32"))
        return C.weighted_channel_sum(activation, weights)


def _masked_scores(split, target, images, channels, flat, rows_h, rows_w, params, index):
    # images (k, H, W, C); channels (k * C', h, w) every image's channels; flat (k * used,)
    # the channel of each (image, mask) row; index (R,) this call's rows: the class score of
    # each image times its channel's upsampled, min-max normalised map, (R,)
    count = ops.shape(images)[0]
    used = ops.shape(flat)[0] // count
    image = ops.minimum(index // used, count - 1)
    grid = ops.take(channels, ops.take(flat, ops.minimum(index, count * used - 1), axis=0),
                    axis=0)
    up = ops.einsum("Hh,rhw,Ww->rHW", rows_h, grid, rows_w)
    low = ops.min(up, axis=(1, 2), keepdims=True)
    high = ops.max(up, axis=(1, 2), keepdims=True)
    flat_grid = ops.reshape(grid, (ops.shape(grid)[0], -1))
    constant = ops.logical_or(high <= low, ops.reshape(
        ops.min(flat_grid, axis=1) == ops.max(flat_grid, axis=1), (-1, 1, 1)))
    mask = ops.where(constant, 0.0, (up - low) / ops.where(constant, 1.0, high - low))
    masked = ops.take(images, image, axis=0) * mask[..., None]
    return target.score(split.full(masked), per_row(params, image))


class ReciproCAM(AblationExplainer):
    """ReciproCAM (Byun & Lee, "ReciproCAM: Lightweight Gradient-free Class Activation Map for
    Post-hoc Explanations", CVPR Workshops 2024; arXiv 2209.14074): keep one cell, drop the
    rest.

    The complement of FastAblationCAM's ``window=1``: for every cell (i, j) of the target's
    h x w grid the head is run on the spatially masked activation A * G_ij (element-wise,
    over all channels), which keeps cell (i, j) and sets every other cell to
    ``ablation_value`` (0, as in the paper); the map at (i, j) is the class score of that
    masked activation, y_c(A * G_ij).
    G_ij is one-hot at (i, j), or with ``gaussian=True`` the 3x3 Gaussian 1/4 (the cell),
    1/8 (edge neighbours), 1/16 (corner neighbours) centred on it, truncated at the grid
    border (:func:`cam.maps.keep_weights`); in general the activation becomes
    A G_ij + ablation_value (1 - G_ij). h * w evaluations of the head per image, in batches
    of ``batch_size``.

    Choices against the paper and the authors' reference implementation: the score follows
    the explainer's ``score``, the logit by default, where the paper takes the softmax
    probability (``score="probability"``); and the map is normalised like every method here
    (ReLU, then divide by the maximum), where the paper min-max normalises each map,
    (m - min m) / (max m - min m): pass ``threshold="q0"`` (each map's own minimum as the
    level) to get exactly that. The raw map (``normalize=False``) is the score per kept cell.

    On a token layer (a ViT) a cell is a patch token: each masked copy keeps one patch token
    (or its Gaussian neighbourhood on the patch grid) and zeroes the other patches, while the
    carried tokens (a class token, register tokens) pass unchanged and are never masked. That
    is the setting of ViT-ReciproCAM (Byun & Lee, arXiv 2310.02588), whose reference
    implementation keeps the class token in every masked copy by default.
    """

    name = "ReciproCAM"

    def __init__(self, model, layer=None, score="logit", gaussian=False, batch_size=None,
                 ablation_value=0.0, mode="head", reshape=None, fuse=None):
        super().__init__(model, layer=layer, score=score, batch_size=batch_size,
                         ablation_value=ablation_value, mode=mode, reshape=reshape, fuse=fuse)
        if not isinstance(gaussian, (bool, np.bool_)):
            raise ValueError(f"gaussian must be True or False, got {gaussian!r}")
        self.gaussian = bool(gaussian)

    def mask_settings(self):
        return (self.gaussian,)

    def masks(self, grid_shape):
        h, w = grid_shape[:2]
        return M.keep_masks((h, w), self.gaussian)[..., None]

    def combine(self, activation, scores, ablated, masks):
        return ops.reshape(ablated, ops.shape(activation)[:3])


def explain(method: str, model, images, **kwargs) -> np.ndarray:
    """Shortcut: ``explain("gradcam", model, images, layer=..., targets=...)``."""
    call_args = {k: kwargs.pop(k) for k in ("targets", "upsample", "normalize", "threshold")
                 if k in kwargs}
    return method_class(method)(model, **kwargs)(images, **call_args)


def method_class(method: str) -> type:
    """The explainer class registered in ``cam.METHODS`` under ``method`` (any spelling that
    :func:`cam.method_key` accepts)."""
    from . import METHODS, method_key

    return globals()[METHODS[method_key(method)]]
