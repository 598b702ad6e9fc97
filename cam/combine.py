"""The maps' arithmetic in ``keras.ops``, run on the device inside one explain call.

Each function here is the device twin of the NumPy function of the same name in
:mod:`cam.maps`, which is checked against numbers worked out by hand; tests/test_combine.py
checks each twin against it on random tensors. Inputs and outputs are backend tensors
(float32); nothing here copies to the host.
"""

from __future__ import annotations

from keras import ops

from .maps import SCORE_EPS


def weighted_channel_sum(activations, weights):
    """sum_k w_k A_k: (B, h, w, C) and (B, C) -> (B, h, w); (B, h, w, C) weights: cell by cell."""
    if len(ops.shape(weights)) == 2:
        return ops.einsum("bhwc,bc->bhw", activations, weights)
    return ops.sum(activations * weights, axis=-1)


def gradcam_weights(gradients):
    return ops.mean(gradients, axis=(1, 2))


def _safe_divide(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0."""
    zero = ops.equal(denominator, 0)
    return ops.where(zero, 0.0, numerator / ops.where(zero, 1.0, denominator))


def gradcampp_weights(activations, gradients):
    g2 = gradients * gradients
    denominator = 2 * g2 + ops.sum(activations, axis=(1, 2), keepdims=True) * g2 * gradients
    alpha = _safe_divide(g2, denominator)
    return ops.sum(alpha * ops.relu(gradients), axis=(1, 2))


def xgradcam_weights(activations, gradients):
    return _safe_divide(ops.sum(activations * gradients, axis=(1, 2)),
                        ops.sum(activations, axis=(1, 2)))


def layercam_weights(gradients):
    return ops.relu(gradients)


def ablation_weights(score, ablated, eps: float = SCORE_EPS):
    """(B,) scores y and (B, C) ablated scores -> (B, C) weights (y - y_k) / y, with |y| < eps
    replaced by eps of y's sign (+eps for 0)."""
    score = ops.expand_dims(score, 1)
    sign = ops.where(score < 0, -eps, eps)
    safe = ops.where(ops.abs(score) < eps, sign, score)
    return (score - ablated) / safe


def spread_window_drops(drops, masks):
    """(B, N) drops and (N, h, w) masks -> (B, h, w): each cell's mean drop over the windows
    covering it (every cell is covered: the masks are checked when they are made)."""
    masks = ops.cast(masks, "float32")
    return ops.einsum("bn,nhw->bhw", drops, masks) / ops.sum(masks, axis=0)


def scorecam_weights(scores):
    return ops.softmax(scores, axis=-1)
