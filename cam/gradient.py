"""The gradient template: Grad-CAM and its family.

One forward and backward pass per batch of images, through the head only (``mode="head"``:
the gradient of the target's score with respect to the target activation, from the trunk's
output) or the whole network (``mode="full"``: a zero tensor added to the target activation,
whose gradient is the activation's). A method implements
:meth:`GradientExplainer.channel_weights`; the map is sum_k w_k A_k.
"""

from __future__ import annotations

from keras import ops

from . import backend as B
from . import combine as C
from . import targets as T
from .explainers import Explainer, chunked


class GradientExplainer(Explainer):
    """Template of the gradient methods: one backward pass per image batch, through the head
    only (``mode="head"``) or the whole network (``mode="full"``).

    A method implements :meth:`channel_weights`; the map is sum_k w_k A_k over the channels.
    """

    def __init__(self, model, layer=None, score="logit", mode="head", reshape=None):
        super().__init__(model, layer, score, mode, reshape)
        # shared by every gradient method on this model, layer and mode: they differ only in
        # what they make of the gradient
        self._gradients = self.gradient_function(T.Class(0))

    @property
    def scorer(self) -> B.Compiled:
        """The compiled gradient function that :meth:`explain` calls for a class target."""
        return self.gradient_function(T.Class(0))

    def gradient_function(self, target) -> B.Compiled:
        """The compiled gradient of ``target``'s scores, shared by every gradient method on
        this model, layer and mode (they differ only in what they make of the gradient)."""
        split, mode = self.split, self.mode
        score = _head_scores if mode == "head" else _full_scores
        return self.shared_compiled(
            ("gradients", mode, target.key), lambda: lambda *a: score(split, target, *a),
            gradient=True, part="head" if mode == "head" else "full")

    def channel_weights(self, activation, gradients):
        """The hook: weights from the target activation A (B, h, w, C) and the gradient of
        each image's class score dy/dA (same shape), backend tensors (write it with
        ``keras.ops``; :mod:`cam.combine` has the common ones). Return (B, C) channel
        weights, or (B, h, w, C) for a weight per cell and channel."""
        raise NotImplementedError

    def raw_maps(self, images, activation, bypass, target, params, scores):
        return self.raw_maps_and_sensitivity(images, activation, bypass, target, params,
                                             scores)[0]

    def raw_maps_and_sensitivity(self, images, activation, bypass, target, params, scores):
        """The maps and each image's largest |dy/dA| (0: the score ignores the layer)."""
        if type(self).raw_maps is not GradientExplainer.raw_maps:  # a method's own raw_maps says nothing
            return super().raw_maps_and_sensitivity(images, activation, bypass, target,
                                                    params, scores)
        rows = min(self.rows_per_call("head" if self.mode == "head" else "full", backward=True),
                   ops.shape(activation)[0])
        gradients = self.gradient_function(target)
        names = sorted(params)

        def one_call(activation, images, *rest):
            bypass, values = rest[:len(rest) - len(names)], rest[len(rest) - len(names):]
            start = activation if self.mode == "head" else ops.zeros_like(activation)
            watched, grads = gradients(start, list(bypass), images, dict(zip(names, values)))
            return (C.weighted_channel_sum(watched, self.channel_weights(watched, grads)),
                    ops.max(ops.abs(grads), axis=(1, 2, 3)))

        return chunked(one_call, rows, activation, images, *bypass,
                        *(params[n] for n in names))


def _head_scores(split, target, activation, bypass, images, params):
    # the gradient is taken with respect to the first argument, the target activation
    return target.score(split.head(activation, bypass), params), activation


def _full_scores(split, target, delta, bypass, images, params):
    # the whole network, with a zero ``delta`` added to the target activation: the gradient
    # with respect to it is the gradient with respect to the activation
    seen = []

    def add(t):
        seen.append(t)
        return t + delta

    return target.score(split.full(images, replace=add), params), seen[0]
