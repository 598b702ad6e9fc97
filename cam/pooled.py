"""The pooled-head shortcut: ablations scored through a head that begins with global average
pooling, without writing the ablated feature maps.

Ablating with a mask m sets the target activation A to A (1 - m) + v m = A + (v - A) m. When
the head's first step is a global average pooling of the target, and nothing else in the head
reads the target, the ablation only moves the pooled vector p = mean_ij A_ij, by

    shift = mean_ij (v - A_ij) m_ij

which is ``(v - p) m`` for a channel mask (N, 1, 1, C) and one matrix product of the masks
with the activation for a cell mask (N, h, w, 1), whole or fractional. The rest of the head,
whatever it is (an MLP, a softmax, dropout, a normalisation, several outputs), then runs on
rows of moved vectors, which are tiny next to the feature map.

Where a Dense layer reads the pooled vector (through inference-time identities: Dropout) and
every mask ablates one channel k (Ablation-CAM), that layer's output moves by one row of its
kernel: x W + b becomes z + (v - p_k) W_k with z = p W + b computed once per image, so the
C ablations of an image cost C D for the Dense layer instead of C^2 D, and a row gathers
D + 1 numbers, not the C of a pooled vector; the layer's activation and the rest of the head
run per row.

:mod:`cam.perturbation` takes this path when the explainer's own mask kind (decided in
Python, never from traced shapes) is "channel" or "cell" and :func:`find` recognises the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from .graph import Call, Split, calls_bytes_per_row

#: The mask kinds the shortcut has a closed form for.
KINDS = ("channel", "cell")
#: Inference-time identities between the pooling and a Dense layer.
IDENTITIES = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.GaussianNoise,
              keras.layers.GaussianDropout, keras.layers.AlphaDropout)


@dataclass(frozen=True)
class PooledHead:
    """A head whose first step is global average pooling of the target, which nothing else
    reads: the pooling call, and the calls after it (:meth:`scores` runs them)."""

    split: Split
    pool: Call
    rest: tuple
    #: The Dense call that reads the pooled vector (through identities), which one-channel
    #: ablations update a kernel row at a time; None where there is none.
    dense: Call | None = None

    @property
    def key(self):
        """Where the moved pooled vectors go in the head's values."""
        return self.pool.out_keys[0]

    def bytes_per_row(self) -> int:
        """Bytes one row costs: its moved vector, the rest of the head and the bypass."""
        specs = self.split.graph.specs
        live = [self.key, *self.split.bypass]
        return calls_bytes_per_row(self.rest, specs, live)

    def scores(self, moved, bypass, after_dense: bool = False) -> object:
        """The model's outputs (as the split scores them) from rows of moved pooled vectors
        (R, C), or with ``after_dense`` of the :attr:`dense` layer's moved outputs before its
        activation (R, D), and the rows' bypass tensors."""
        values = dict(zip(self.split.bypass, bypass))
        if after_dense:
            op = self.dense.operation
            removed = id(self.dense) in self.split.overrides  # the logits: no activation
            values[self.dense.out_keys[0]] = moved if removed or op.activation is None \
                else op.activation(moved)
            return self.split.run(self.rest[self.rest.index(self.dense) + 1:], values)
        if self.pool.operation.keepdims:
            moved = ops.reshape(moved, (-1, 1, 1, ops.shape(moved)[-1]))
        values[self.key] = moved
        return self.split.run(self.rest, values)

    def dense_outputs(self, pooled):
        """The :attr:`dense` layer's outputs before its activation, p W + b, (k, D)."""
        op = self.dense.operation
        out = ops.matmul(pooled, ops.cast(op.kernel, pooled.dtype))
        return out + ops.cast(op.bias, pooled.dtype) if op.use_bias else out


def find(split: Split) -> PooledHead | None:
    """The :class:`PooledHead` of ``split``, or None where the head does not begin with a
    channels-last ``GlobalAveragePooling2D`` of the target that is the target's only reader
    (a token layer, a convolution after the layer, a skip connection reading the target)."""
    if split.tokens is not None or not split.head_calls:
        return None
    first, *rest = split.head_calls
    op = first.operation
    if not isinstance(op, keras.layers.GlobalAveragePooling2D) or \
            op.data_format != "channels_last" or first.arg_keys != [split.target] or \
            len(first.out_keys) != 1:
        return None
    if any(split.target in call.arg_keys for call in rest):
        return None
    return PooledHead(split, first, tuple(rest), _dense_after(first, rest))


def _dense_after(pool: Call, rest: list) -> Call | None:
    """The plain Dense call that reads the pooled vector through identities, where nothing
    else reads the pooled vector or those identities' outputs; None otherwise."""
    if pool.operation.keepdims:
        return None
    chain = {pool.out_keys[0]}
    for call in rest:
        if not any(k in chain for k in call.arg_keys):
            continue
        if len(call.arg_keys) != 1 or sum(k in chain for c in rest for k in c.arg_keys) > 1:
            return None  # the chain forks, or the call reads more than the chain
        if isinstance(call.operation, IDENTITIES):
            chain = set(call.out_keys)
            continue
        op = call.operation
        plain = type(op) is keras.layers.Dense and not op.lora_enabled and \
            op.quantization_mode is None
        return call if plain else None
    return None


def cell_shifts(activation, masks, value):
    """(k N, C) shifts of the pooled vector for k images' activations (k, h, w, C) and N cell
    masks (N, h, w, 1), row i N + n for image i and mask n: mean_ij (v - A_ij) m_ij."""
    k, h, w, c = (ops.shape(activation)[i] for i in range(4))
    n = ops.shape(masks)[0]
    cells = ops.reshape(ops.cast(masks, activation.dtype), (n, h * w))
    moved = ops.cast(value, activation.dtype) - ops.reshape(activation, (k, h * w, c))
    shifts = ops.einsum("nq,bqc->bnc", cells, moved) / ops.cast(h * w, activation.dtype)
    return ops.reshape(shifts, (k * n, c))


def channel_moved(pooled, masks, value):
    """Rows' pooled vectors (R, C) moved by their channel masks (R, 1, 1, C): p + (v - p) m."""
    m = ops.cast(masks[:, 0, 0, :], pooled.dtype)
    return pooled + (ops.cast(value, pooled.dtype) - pooled) * m


def cell_moved(pooled, shifts, value):
    """Rows' pooled vectors (R, C) moved by their precomputed shifts (R, C)."""
    return pooled + shifts


def one_channel(masks) -> "np.ndarray | None":
    """The channel each of N boolean channel masks (N, 1, 1, C) ablates, (N,) int32, where
    each ablates exactly one (Ablation-CAM's); None otherwise. NumPy, decided once per grid."""
    flat = np.asarray(masks).reshape(len(masks), -1)
    if masks.dtype != bool or masks.shape[1:3] != (1, 1) or (flat.sum(axis=1) != 1).any():
        return None
    return flat.argmax(axis=1).astype(np.int32)


def dense_moved(pooled, dense_outputs, image, channels, value, kernel):
    """The :attr:`PooledHead.dense` layer's outputs before its activation, (R, D), for rows
    that ablate channel ``channels`` (R,) of image ``image`` (R,) to ``value``:
    z + (v - p_k) W_k, from each image's pooled vector p (k, C) and z = p W + b (k, D).
    Only a scalar and two rows of width D are gathered per row."""
    c = ops.shape(pooled)[1]
    p_k = ops.take(ops.reshape(pooled, (-1,)), image * c + channels, axis=0)
    moved = ops.cast(value, pooled.dtype) - p_k
    return ops.take(dense_outputs, image, axis=0) + ops.expand_dims(moved, 1) * ops.take(
        ops.cast(kernel, pooled.dtype), channels, axis=0)
