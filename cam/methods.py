"""The CAM methods, each a short class on a template: :mod:`cam.gradient` for Grad-CAM and
its family, :mod:`cam.perturbation` for the methods that perturb the layer or the input.

A new method is a class here (or anywhere) and one entry in ``cam.METHODS``
(:func:`cam.register_method`); the command line, the explorer, :func:`cam.explain` and
``cam.__all__`` pick it up from there. A method declares its tunable settings
(:attr:`~cam.explainers.Explainer.SETTINGS`) and its cost
(:attr:`~cam.explainers.Explainer.evaluations_per_image`).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from . import backend as B
from . import combine as C
from . import maps as M
from .checks import check_int, is_int
from .explainers import Setting
from .gradient import GradientExplainer
from .perturbation import AblationExplainer, PerturbationExplainer


class GradCAM(GradientExplainer):
    """Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2): channel k's weight is its gradient
    averaged over the grid, w_k = mean_ij dy/dA_ij^k; the map is sum_k w_k A_k."""

    name = "Grad-CAM"

    def channel_weights(self, activation, gradients):
        return C.gradcam_weights(gradients)


class GradCAMPlusPlus(GradientExplainer):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19): w_k = sum_ij alpha_ij^k
    relu(dy/dA_ij^k), with the closed-form alpha_ij^k = g^2 / (2 g^2 + sum_ab A_ab^k g^3),
    g = dy/dA_ij^k (alpha = 0 where its denominator is 0); the map is sum_k w_k A_k.

    The paper derives alpha for the exponential score exp(y), whose second and third
    derivatives are powers of the first (Sec. 3.3); exp(y) cancels from alpha and only scales
    every weight of an image by the same factor, so, as the common implementations do, the
    weights are computed from the first-order gradient of the explainer's ``score`` alone
    (the logit by default, the probability with ``score="probability"``).

    Against pytorch-grad-cam: it adds 1e-6 to alpha's denominator (and sets alpha to 0 where
    the gradient is 0); this class uses the exact closed form. At realistic gradient sizes
    (|g| around 1e-3 to 1e-2, g^2 around 1e-6 to 1e-4) that epsilon is comparable to the
    denominator itself, so the two weightings differ by more than rounding; pass the same
    gradients to both to compare.
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


class AblationCAM(AblationExplainer):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    Each channel k of the target layer is set to ``ablation_value`` in turn; its weight is the
    relative drop of the class score, w_k = (y - y_k) / y, and the map is sum_k w_k A_k.
    C evaluations of the head per image.
    """

    name = "Ablation-CAM"
    MASK_KIND = "channel"

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

    SETTINGS = (Setting("window", int, 1, "side of the ablated block, in grid cells", low=1),
                Setting("stride", int, None, "step between blocks (None: the window)", low=1))
    MASK_KIND = "cell"

    def __init__(self, model, layer=None, score="logit", window=1, stride=None, batch_size=None,
                 ablation_value=0.0, mode="head", reshape=None, fuse=None):
        window = check_int("window", window)
        stride = check_int("stride", window if stride is None else stride, high=window,
                           why=f" (the window is {window}) so that every cell is ablated at "
                               f"least once")
        super().__init__(model, layer=layer, score=score, batch_size=batch_size,
                         ablation_value=ablation_value, mode=mode, reshape=reshape, fuse=fuse)
        grid = [d for d in self.split.target_shape[:2] if d is not None]
        if grid and window > min(grid):
            h, w = self.split.target_shape[:2]
            raise ValueError(f"window {window} is larger than layer {self.layer!r}'s "
                             f"{h}x{w} grid; use 1..{min(grid)}")
        self.window, self.stride = window, stride

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
    SETTINGS = (Setting("gaussian", bool, False, "spread each kept cell with a 3x3 Gaussian"),)
    MASK_KIND = "cell"

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




class Occlusion(PerturbationExplainer):
    """Occlusion (Zeiler & Fergus, ECCV 2014, Sec. 4.2): the score drop when a patch of the
    input image is hidden.

    A ``window`` x ``window`` patch of pixels (every channel) is set to ``baseline``; patches
    step by ``stride`` (default ``window``), the last one in each direction shifted back to end
    at the image's edge, and each pixel gets the mean score drop y - y_occluded of the patches
    that cover it. Every occluded image goes through the whole model, ``batch_size`` a call.
    About (H / stride) * (W / stride) evaluations per image (:attr:`evaluations_per_image`).

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
        Where the trunk pass that gives the model's scores is cut (a layer with a spatial
        grid; explainers at that layer can share it, ``explain(features=...)``); the
        occluded images always run through the whole model.
    """

    name = "Occlusion"
    SETTINGS = (Setting("window", int, None, "side of the patch, in pixels (None: H / 14)",
                        low=1),
                Setting("stride", int, None, "step between patches (None: the window)", low=1),
                Setting("baseline", float, 0.0, "what hidden pixels are set to"))
    APPLIES_TO = "input"
    #: With ``window=None`` the patch is the shorter image side divided by this (16 at 224).
    PATCHES_PER_SIDE = 14

    def __init__(self, model, layer=None, window=None, stride=None, baseline=0.0,
                 score="logit", batch_size=None, mode="head", reshape=None):
        window = check_int("window", window, allow_none=True, none="automatic")
        if stride is not None and (not is_int(stride) or stride < 1
                                   or window is not None and stride > window):
            bound = "window" if window is None else f"window ({window})"
            raise ValueError(f"stride must be None or an int between 1 and {bound} so that "
                             f"every pixel is occluded at least once, got {stride!r}")
        super().__init__(model, layer, score, mode, reshape, batch_size)
        self.window, self.stride = window, stride
        channels = self.split.input_shape[-1]
        self.baseline = _check_baseline(baseline, channels)
        size = tuple(self.split.input_shape[1:3])
        if None not in size:
            self.geometry(size)  # a window that cannot fit the model's input fails here
        self.layer = "input"

    def geometry(self, size: tuple) -> tuple[int, int]:
        """(window, stride) in pixels for images of ``size`` (H, W)."""
        h, w = size[:2]
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

    def mask_settings(self):
        return (self.window, self.stride)

    def masks(self, grid_shape: tuple) -> np.ndarray:
        """One boolean mask per occluded patch, (N, H, W, 1) for images of (H, W[, C]); True
        pixels are occluded."""
        return M.window_masks(tuple(grid_shape[:2]), *self.geometry(grid_shape))[..., None]

    def perturb_args(self, images, activation) -> tuple:
        """The baseline as one value per input channel (one shape for every Occlusion, which
        share a compiled function)."""
        channels = ops.shape(images)[-1]
        return (B.tensor(np.broadcast_to(np.asarray(self.baseline, np.float32), (channels,))),)

    @staticmethod
    def perturb(rows, masks, baseline):
        return ops.where(masks, ops.cast(baseline, rows.dtype), rows)

    def combine(self, activation, scores, perturbed, masks):
        return C.spread_window_drops(ops.expand_dims(scores, 1) - perturbed, masks[..., 0])


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


class ScoreCAM(PerturbationExplainer):
    """Score-CAM (Wang et al., CVPR Workshops 2020, Algorithm 1): channels weighted by the
    class score of the image masked with them.

    Each channel A_k of the target layer is upsampled bilinearly to the image size
    (pixel-centre aligned, :func:`cam.maps.upsample_maps`) and min-max normalised to a mask
    H_k in [0, 1] (a constant channel gives an all-zero mask); the image times H_k goes
    through the whole model, ``batch_size`` a call, and its class score s_k is channel k's
    evidence. As in the paper's Algorithm 1, the weights are a softmax over the channels,
    w = softmax_k(s_k) (the paper subtracts the score of a baseline image first, the same for
    every channel, which a softmax ignores); the map is sum_k w_k A_k, and normalising
    applies the paper's ReLU. C evaluations per image, or ``channels``.

    ``score`` is the library's default, the logit, unless ``score="probability"``. The
    paper's score f is the model's softmax output; the authors' code (haofanwang/Score-CAM)
    takes the probability of the masked image as the weight directly, with no softmax over
    channels, while pytorch-grad-cam applies the channel softmax to the logit, as this class
    does by default. Probabilities lie in [0, 1], so their channel softmax gives nearly even
    weights (exp(p) is between 1 and e); the logits keep the channels apart.

    Against pytorch-grad-cam: it upsamples the channels with ``UpsamplingBilinear2d``, which
    aligns the corners (align_corners=True: the corner cells' values sit on the corner
    pixels); this class aligns pixel centres, as every map here is upsampled. The masks, and
    so the weights, differ slightly, most on small grids (7x7 at 224 px).

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
    SETTINGS = (Setting("channels", int, None,
                        "score only the N channels of largest spatial variance (None: all)",
                        low=1),)
    APPLIES_TO = "input"
    per_image_masks = True

    def __init__(self, model, layer=None, score="logit", batch_size=None, channels=None,
                 mode="head", reshape=None):
        super().__init__(model, layer, score, mode, reshape, batch_size)
        total = self.split.target_shape[-1]
        self.channels = check_int("channels", channels, high=total, allow_none=True,
                                  none="every channel",
                                  why=f" (layer {self.layer!r} has {total} channels)")
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
        return super().__repr__().replace(
            f"channels={self.channels!r}",
            f"channels={self.channels_used} of {self.split.target_shape[-1]}")

    def selected_channels(self, activation):
        """Indices of the channels scored per image, (B, channels used), on the device: every
        channel, or the ``channels`` of largest spatial variance (largest first; the NumPy
        reference is :func:`cam.maps.top_variance_channels`)."""
        count, total = ops.shape(activation)[0], ops.shape(activation)[-1]
        if self.channels is None:
            return ops.broadcast_to(ops.arange(total, dtype="int32")[None], (count, total))
        variance = ops.var(ops.reshape(activation, (count, -1, total)), axis=1)
        return ops.cast(ops.top_k(variance, self.channels, sorted=True)[1], "int32")

    def row_masks(self, images, activation):
        """Each image's selected channels on the layer's grid, (B N, h, w): upsampled and
        normalised inside the compiled call (:meth:`perturb`)."""
        count, total = ops.shape(activation)[0], ops.shape(activation)[-1]
        stack = ops.reshape(ops.transpose(activation, (0, 3, 1, 2)),
                            (count * total, *ops.shape(activation)[1:3]))
        chosen = self.selected_channels(activation)
        flat = ops.reshape(chosen + ops.arange(count, dtype="int32")[:, None] * total, (-1,))
        return ops.take(stack, flat, axis=0), True

    def resize_matrices(self, grid: tuple, size: tuple) -> tuple:
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

    def perturb_args(self, images, activation) -> tuple:
        return self.resize_matrices(ops.shape(activation)[1:3], ops.shape(images)[1:3])

    @staticmethod
    def perturb(rows, grids, rows_h, rows_w):
        # rows (R, H, W, C) images; grids (R, h, w) their channels: each channel upsampled,
        # min-max normalised (0 for a constant channel) and multiplied into its image
        up = ops.einsum("Hh,rhw,Ww->rHW", rows_h, grids, rows_w)
        low = ops.min(up, axis=(1, 2), keepdims=True)
        high = ops.max(up, axis=(1, 2), keepdims=True)
        flat = ops.reshape(grids, (ops.shape(grids)[0], -1))
        constant = ops.logical_or(high <= low, ops.reshape(
            ops.min(flat, axis=1) == ops.max(flat, axis=1), (-1, 1, 1)))
        mask = ops.where(constant, 0.0, (up - low) / ops.where(constant, 1.0, high - low))
        return rows * ops.cast(mask, rows.dtype)[..., None]

    def combine(self, activation, scores, perturbed, masks):
        total = ops.shape(activation)[-1]
        weights = ops.einsum("bk,bkc->bc", C.scorecam_weights(perturbed),
                             ops.one_hot(self.selected_channels(activation), total,
                                         dtype="float32"))
        return C.weighted_channel_sum(activation, weights)


def explain(method: str, model, images, **kwargs) -> np.ndarray:
    """Shortcut: ``explain("gradcam", model, images, layer=..., targets=...)``."""
    call_args = {k: kwargs.pop(k) for k in ("targets", "upsample", "normalize", "threshold")
                 if k in kwargs}
    return method_class(method)(model, **kwargs)(images, **call_args)


def method_class(method: str) -> type:
    """The explainer class registered in ``cam.METHODS`` under ``method`` (any spelling that
    :func:`cam.method_key` accepts)."""
    from . import METHODS, method_key

    entry = METHODS[method_key(method)]
    return entry if isinstance(entry, type) else globals()[entry]
