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

:mod:`cam.perturbation` takes this path when the explainer's own mask kind (decided in
Python, never from traced shapes) is "channel" or "cell" and :func:`find` recognises the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops

from .graph import Call, Split, calls_bytes_per_row

#: The mask kinds the shortcut has a closed form for.
KINDS = ("channel", "cell")


@dataclass(frozen=True)
class PooledHead:
    """A head whose first step is global average pooling of the target, which nothing else
    reads: the pooling call, and the calls after it (:meth:`scores` runs them)."""

    split: Split
    pool: Call
    rest: tuple

    @property
    def key(self):
        """Where the moved pooled vectors go in the head's values."""
        return self.pool.out_keys[0]

    def bytes_per_row(self) -> int:
        """Bytes one row costs: its moved vector, the rest of the head and the bypass."""
        specs = self.split.graph.specs
        live = [self.key, *self.split.bypass]
        return calls_bytes_per_row(self.rest, specs, live)

    def scores(self, moved, bypass) -> object:
        """The model's outputs (as the split scores them) from rows of moved pooled vectors
        (R, C) and the rows' bypass tensors."""
        if self.pool.operation.keepdims:
            moved = ops.reshape(moved, (-1, 1, 1, ops.shape(moved)[-1]))
        values = {self.key: moved, **dict(zip(self.split.bypass, bypass))}
        return self.split.run(self.rest, values)


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
    return PooledHead(split, first, tuple(rest))


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
