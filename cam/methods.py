"""The CAM methods, each a short class on a template of :mod:`cam.explainers`.

A new method is a class here and one line in ``cam.METHODS`` (``cam/__init__.py``); the
command line, :func:`cam.explain` and ``cam.__all__`` pick it up from there.
"""

from __future__ import annotations

import numpy as np

from . import maps as M
from .explainers import AblationExplainer, GradientExplainer


class GradCAM(GradientExplainer):
    """Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2): channel k's weight is its gradient
    averaged over the grid, w_k = mean_ij dy/dA_ij^k; the map is sum_k w_k A_k."""

    name = "Grad-CAM"

    def channel_weights(self, activation, gradients):
        return M.gradcam_weights(gradients)


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
        weights = M.ablation_weights(scores, ablated)
        return M.weighted_channel_sum(activation, weights)


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

    def __init__(self, model, layer=None, score="logit", window=1, stride=None, batch_size=64,
                 ablation_value=0.0, mode="head", reshape=None):
        super().__init__(model, layer, score, batch_size, ablation_value, mode, reshape)
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

    def masks(self, grid_shape):
        h, w = grid_shape[:2]
        if self.window > min(h, w):
            raise ValueError(f"window {self.window} is larger than the {h}x{w} grid of layer "
                             f"{self.layer!r} for these images")
        return M.window_masks((h, w), self.window, self.stride)[..., None]

    def combine(self, activation, scores, ablated, masks):
        return M.spread_window_drops(scores[:, None] - ablated, masks[..., 0])


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
        return M.gradcampp_weights(activation, gradients)


class XGradCAM(GradientExplainer):
    """XGrad-CAM (Fu et al., BMVC 2020, eq. 14): channel k's gradient averaged over the grid
    with the activation's share of the channel as weight, w_k = sum_ij (A_ij^k / sum_ab A_ab^k)
    dy/dA_ij^k (0 for a channel that sums to 0); the map is sum_k w_k A_k."""

    name = "XGrad-CAM"

    def channel_weights(self, activation, gradients):
        return M.xgradcam_weights(activation, gradients)


class LayerCAM(GradientExplainer):
    """LayerCAM (Jiang et al., IEEE TIP 2021, eq. 5-6): a weight per cell and channel, the
    positive gradient relu(dy/dA_ij^k); the map is sum_k relu(dy/dA_ij^k) A_ij^k."""

    name = "LayerCAM"

    def channel_weights(self, activation, gradients):
        return M.layercam_weights(gradients)


class HiResCAM(GradientExplainer):
    """HiResCAM (Draelos & Carin, 2020): the gradient times the activation, element-wise, summed
    over the channels: sum_k dy/dA_ij^k A_ij^k (Grad-CAM without averaging the gradient over
    the grid)."""

    name = "HiResCAM"

    def channel_weights(self, activation, gradients):
        return gradients
