"""What cam keeps per model: one split per layer and the compiled functions built on it.

Explainers on the same model, layer, score and token layout share one split
(:class:`cam.graph.Split`, or :class:`cam.intercept.InterceptedSplit` for a layer only a
``call`` reaches) and its compiled functions, so a second explainer (another method,
another window) does not trace or compile the network again (seconds for DenseNet-169).

The store is keyed weakly by the model and holds only the model's name (the split's
:class:`cam.graph.LayerGraph` holds no model, an intercepted split holds it weakly): cam keeps
nothing alive once the model is dropped. :func:`release` frees a model's entries early.
"""

from __future__ import annotations

import weakref

from . import backend as B
from .intercept import split_model

#: model -> {(layer, score, reshape): Shared}
_STORE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Shared:
    """A split and the compiled functions that depend only on it (and on the model's
    weights, which every backend reads at call time): the graph's :class:`cam.graph.Split`
    where the functional graph reaches the layer, else :class:`cam.intercept.InterceptedSplit`
    (:func:`cam.intercept.split_model`)."""

    def __init__(self, model, layer, score, reshape):
        self.split = split_model(model, layer, score, reshape)
        self.functions: dict = {}

    def get(self, key, build):
        """The function stored under ``key``, built by ``build()`` the first time."""
        if key not in self.functions:
            self.functions[key] = build()
        return self.functions[key]

    def compiled(self, key, make_fn, part: str = "full", gradient: bool = False,
                 fuse: bool = False) -> B.Compiled:
        """``make_fn()`` compiled once under ``key``, reading the variables of ``part`` of the
        model (on JAX those are passed in on every call, so a head-only function passes the
        head's few). ``gradient``: the gradient of its scores with respect to its first
        argument; ``fuse``: compile with XLA on TensorFlow too (:func:`cam.backend.compiled`)."""
        variables = self.split.variables
        if gradient:
            return self.get(("gradient", key, part),
                            lambda: B.gradient(make_fn(), variables(part)))
        return self.get((key, part, fuse), lambda: B.compiled(make_fn(), variables(part), fuse))


def shared(model, layer, score, reshape) -> Shared:
    """The :class:`Shared` entry of ``model`` at ``layer``, made on first use."""
    key = (layer, score, repr(reshape))
    per_model = _STORE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = Shared(model, layer, score, reshape)
    return per_model[key]


def holds(model) -> bool:
    """Whether cam keeps anything for ``model``."""
    return model in _STORE


def release(model, layer=None) -> int:
    """Drop what cam keeps for ``model`` (every layer, or only ``layer``): its splits and
    compiled functions, which hold traced copies of the network (tens of MB for a large
    model). Explainers built before keep working and compile again when called. cam keeps
    nothing alive once the model is dropped, so this is for freeing memory early. Returns
    how many layers were released."""
    per_model = _STORE.get(model, {})
    keys = [k for k in per_model if layer is None or k[0] == layer or
            per_model[k].split.layer == layer]
    for key in keys:
        del per_model[key]
    if not per_model:
        _STORE.pop(model, None)
    return len(keys)
