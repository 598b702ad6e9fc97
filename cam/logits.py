"""Reading a model's logits past its final softmax or sigmoid (``score="logit"``), for the
graph split (:class:`cam.graph.Split`): which call applies one, which calls leave values
alone, and calling a layer without its activation."""

from __future__ import annotations

import keras

from .keras_internals import activation_swapped


def _is_activation(fn, name: str) -> bool:
    return fn is getattr(keras.activations, name) or getattr(fn, "__name__", "") == name


class PreActivation:
    """Calls a layer with its activation left out, sharing its weights (the model is untouched)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        kwargs.pop("training", None)
        # Swapped for the duration of one call, which leaves no trace on the user's model.
        with activation_swapped(self.layer, keras.activations.linear):
            return self.layer(*args, **kwargs)


def output_activation(call) -> str | None:
    """'softmax' / 'sigmoid' when the call applies one (as a layer, an activation, or an op)."""
    op = call.operation
    if isinstance(op, keras.layers.Softmax) or type(op).__name__ == "Softmax":
        return "softmax"
    if type(op).__name__ == "Sigmoid":
        return "sigmoid"
    fn = getattr(op, "activation", None)
    for name in ("softmax", "sigmoid"):
        if fn is not None and _is_activation(fn, name):
            return name
    return None


def is_passthrough(call) -> bool:
    """A layer that leaves values alone: Activation('linear'), e.g. the float32 cast that
    mixed-precision models put after the classifier, or Identity."""
    op = call.operation
    if isinstance(op, keras.layers.Identity):
        return True
    return isinstance(op, keras.layers.Activation) and _is_activation(op.activation, "linear")
