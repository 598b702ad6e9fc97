"""What to explain: a scalar per image from the model's outputs.

``targets=`` of every explainer takes None (each image's predicted class), an int or one int
per image (a class), or a target from this module, or any callable ``score(outputs) -> (N,)``
written with ``keras.ops`` on the model's batched outputs (a list of them for a multi-output
model)::

    cam.GradCAM(model, "relu")(images, targets=cam.targets.Class(3))
    cam.FastAblationCAM(seg, "enc")(images, targets=cam.targets.Region(1, grain_mask))
    cam.AblationCAM(two_heads, "relu")(images, targets=cam.targets.Output("age",
                                                                          cam.targets.Regression()))

A target is a kind (its class and settings, traced into the compiled functions once) plus
per-image parameters (:meth:`Target.params`: arrays whose first axis is the image), which
are passed to the compiled functions as arguments: a new class index or region mask does not
compile anything again. A list with one target per image is merged into one target when the
targets are of one kind (``[Region(1, m0), Region(1, m1)]``); a plain callable is traced as it
is, so a new callable compiles again.

Softmax and sigmoid outputs: with ``score="logit"`` (the default) cam removes a final softmax
or sigmoid, so ``outputs`` are the logits and a target scores logits; with
``score="probability"`` it scores what the model outputs. This holds for callables too.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
from keras import ops

from . import backend as B
from .checks import check_int, is_int


class Target:
    """Base class: a kind of target with per-image parameters."""

    def params(self, count: int) -> dict:
        """Per-image parameters as arrays (or backend tensors) of first axis ``count``."""
        return {}

    def score(self, outputs, params: dict):
        """(N,) scores from N rows of outputs and the parameters of each row's image."""
        raise NotImplementedError

    @property
    def key(self) -> tuple:
        """What the compiled functions depend on: the kind and its settings."""
        return (type(self).__name__,)

    def check(self, split) -> None:
        """A clear error when this target cannot score the model's outputs."""

    def merge(self, others: list["Target"], count: int) -> dict:
        """Parameters of a list of targets of this kind, one per image."""
        if any(t.key != self.key for t in others):
            raise ValueError(
                f"one target per image must be of one kind with the same settings "
                f"(got {sorted({repr(t.key) for t in others})}); pass one target, or ints")
        parts = [t.params(1) for t in others]
        return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}


def _single(outputs, split_or_name: str = "target"):
    if isinstance(outputs, (list, tuple)):
        raise ValueError(f"{split_or_name} scores a single output, but the model has "
                         f"{len(outputs)}: wrap it in cam.targets.Output(name_or_index, ...)")
    return outputs


class Class(Target):
    """The score of class ``k`` (one int, or one per image) of a (batch, classes) output."""

    def __init__(self, k):
        array = np.asarray(k)
        if not np.issubdtype(array.dtype, np.integer) or array.ndim > 1 \
                or isinstance(k, (bool, np.bool_)):
            raise ValueError(f"{type(self).__name__} takes a class index (an int, or one per "
                             f"image), got {k!r}")
        self.k = array.astype(np.int64)

    @property
    def key(self):
        return ("Class",)  # MultiLabel and Predicted score the same way: one compiled function

    def params(self, count):
        if self.k.ndim == 1 and len(self.k) != count:
            raise ValueError(f"{type(self).__name__} has {len(self.k)} classes for {count} "
                             f"images")
        return {"k": np.broadcast_to(self.k, (count,)).astype(np.int32)}

    def score(self, outputs, params):
        outputs = _single(outputs, type(self).__name__)
        return B.take_targets(outputs, params["k"])

    def check(self, split):
        shapes = split.output_shapes
        if len(shapes) == 1 and len(shapes[0]) != 2:
            raise ValueError(f"{type(self).__name__} scores a (batch, classes) output; the model "
                             f"outputs {shapes[0]}: use Region for a segmentation output, or a "
                             f"callable score(outputs) -> (N,)")
        classes = shapes[0][-1] if len(shapes) == 1 else None
        if classes is not None and ((self.k < 0) | (self.k >= classes)).any():
            bad = int(self.k[(self.k < 0) | (self.k >= classes)][0])
            raise ValueError(f"target {bad} is out of range: the model has {classes} classes, "
                             f"valid targets are 0..{classes - 1}")

    def __repr__(self):
        return f"{type(self).__name__}({self.k.tolist()!r})"


class MultiLabel(Class):
    """Label ``k`` of a multi-label (sigmoid) output: its logit (``score="logit"``: the
    sigmoid removed) or its probability sigmoid(logit) (``score="probability"``); unlike a
    softmax class, a label's probability does not depend on the other labels."""


class Regression(Target):
    """A regression output: the value itself, of a (batch,) or (batch, 1) output, or entry
    ``index`` of a (batch, D) one."""

    def __init__(self, index: int | None = None):
        self.index = check_int("index", index, low=0, allow_none=True)

    @property
    def key(self):
        return ("Regression", self.index)

    def score(self, outputs, params):
        outputs = _single(outputs, "Regression")
        if len(ops.shape(outputs)) == 1:
            return outputs
        return outputs[:, self.index or 0]

    def check(self, split):
        shape = split.output_shapes[0] if len(split.output_shapes) == 1 else None
        if shape is None:
            return
        width = shape[-1] if len(shape) == 2 else 1
        if len(shape) > 2 or (self.index is None and width != 1) or \
                (self.index is not None and self.index >= width):
            raise ValueError(f"Regression({self.index!r}) needs a (batch,) or (batch, D) output "
                             f"with index < D (None for D = 1); the model outputs {shape}")

    def __repr__(self):
        return f"Regression({self.index!r})"


class Region(Target):
    """Segmentation: the per-pixel score of class ``k`` summed over a region,
    sum_ij mask_ij y_ij^k, on a (batch, H, W, classes) output. ``mask`` is (H, W) or one per
    image (B, H, W), boolean or weights, at the output's resolution."""

    def __init__(self, k: int, mask):
        check_int("Region's class", k, low=0)
        mask = np.asarray(mask)
        if mask.ndim not in (2, 3) or not (mask.dtype == bool
                                           or np.issubdtype(mask.dtype, np.number)):
            raise ValueError(f"Region's mask must be a numeric or boolean (H, W) or (B, H, W) "
                             f"array, got shape {mask.shape} of {mask.dtype}")
        if not mask.any():
            raise ValueError("Region's mask is empty: it selects no pixel")
        self.k, self.mask = int(k), mask.astype(np.float32)

    @property
    def key(self):
        return ("Region", self.k)

    def params(self, count):
        mask = self.mask if self.mask.ndim == 3 else self.mask[None]
        if len(mask) not in (1, count):
            raise ValueError(f"Region has {len(mask)} masks for {count} images")
        return {"mask": np.broadcast_to(mask, (count, *mask.shape[1:]))}

    def score(self, outputs, params):
        outputs = _single(outputs, "Region")
        return ops.sum(outputs[..., self.k] * params["mask"], axis=(1, 2))

    def check(self, split):
        if len(split.output_shapes) != 1:
            return
        shape = split.output_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"Region scores a (batch, H, W, classes) segmentation output; the "
                             f"model outputs {shape}")
        if tuple(self.mask.shape[-2:]) != tuple(shape[1:3]) and None not in shape[1:3]:
            raise ValueError(f"Region's mask is {self.mask.shape[-2:]}, the output's grid is "
                             f"{tuple(shape[1:3])}")
        if not 0 <= self.k < shape[-1]:
            raise ValueError(f"Region's class {self.k} is out of range: the output has "
                             f"{shape[-1]} classes")

    def __repr__(self):
        return f"Region({self.k}, mask of {self.mask.shape})"


class Output(Target):
    """For a multi-output model: ``target`` on one output, by its layer name or index."""

    def __init__(self, which: str | int, target: "Target | int"):
        self.which = which
        self.target = as_target(target)

    @property
    def key(self):
        return ("Output", self.which, self.target.key)

    def index(self, split) -> int:
        if isinstance(self.which, str):
            if self.which not in split.output_names:
                raise ValueError(f"no output named {self.which!r}; the model's outputs are "
                                 f"{split.output_names}")
            return split.output_names.index(self.which)
        if not 0 <= self.which < len(split.outputs):
            raise ValueError(f"output index {self.which} is out of range: the model has "
                             f"{len(split.outputs)} outputs")
        return int(self.which)

    def params(self, count):
        return self.target.params(count)

    def merge(self, others, count):
        return self.target.merge([o.target for o in others], count)

    def check(self, split):
        index = self.index(split)
        self._index = index
        self.target.check(_OneOutput(split, index))

    def score(self, outputs, params):
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return self.target.score(outputs[self._index], params)

    def __repr__(self):
        return f"Output({self.which!r}, {self.target!r})"


class _OneOutput:
    """A split seen through one of its outputs (for checking a target inside Output)."""

    def __init__(self, split, index):
        self.output_shapes = [split.output_shapes[index]]
        self.output_names = [split.output_names[index]]
        self.outputs = [split.outputs[index]]


class Function(Target):
    """A plain callable ``score(outputs) -> (N,)``, traced as it is (a new callable compiles
    again)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    @property
    def key(self):
        return ("Function", id(self.fn))

    def score(self, outputs, params):
        return self.fn(outputs)

    def __repr__(self):
        return f"Function({getattr(self.fn, '__name__', self.fn)!r})"


def as_target(target) -> Target:
    """An int (a class) or a callable as a :class:`Target`."""
    if isinstance(target, Target):
        return target
    if is_int(target):
        return Class(int(target))
    if callable(target):
        return Function(target)
    raise ValueError(f"a target must be an int (a class), a cam.targets target or a callable "
                     f"score(outputs) -> (N,), got {target!r}")


class Predicted(Class):
    """Each image's predicted class (the argmax of its scores), chosen on the device."""

    def __init__(self, k=None):
        self.k = np.zeros(0, np.int64)

    def check(self, split):
        if split.num_classes is None:
            raise ValueError(
                f"targets=None explains each image's predicted class, which needs a "
                f"(batch, classes) output; the model outputs "
                f"{split.output_shapes if len(split.output_shapes) > 1 else split.output_shapes[0]}"
                f": pass targets (cam.targets.Region, Regression, Output or a callable)")

    def __repr__(self):
        return "Predicted()"


def resolve(targets, count: int, split) -> Target:
    """``targets=`` as given to an explainer -> one checked :class:`Target` for ``count``
    images (a list of per-image targets merged into one)."""
    if targets is None:
        target = Predicted()
    elif isinstance(targets, (list, tuple)) and targets and all(
            isinstance(t, Target) or callable(t) and not isinstance(t, (int, np.integer))
            for t in targets):
        if len(targets) != count:
            raise ValueError(f"targets must be one per image: {count} images, {len(targets)} "
                             f"targets")
        parts = [as_target(t) for t in targets]
        if any(isinstance(t, Function) for t in parts):
            if len({t.key for t in parts}) > 1:
                raise ValueError("one callable target per image cannot share compiled "
                                 "functions: pass one callable for all images, or built-in "
                                 "targets of one kind (cam.targets)")
            target = parts[0]
        else:
            target = _Merged(parts[0], parts[0].merge(parts, count))
    elif isinstance(targets, Target) or callable(targets):
        target = as_target(targets)
    else:
        array = np.asarray(targets)
        if array.ndim == 0:
            array = np.full(count, array)
        if array.shape != (count,) or not np.issubdtype(array.dtype, np.integer) \
                or array.dtype == bool:
            got = f"{len(array)} values" if array.ndim == 1 else f"{targets!r}"
            raise ValueError(f"targets must be None, an int, {count} ints (one per image), a "
                             f"cam.targets target or a callable; got {got}")
        target = Class(array)
    target.check(split)
    return target


class _Merged(Target):
    """Targets of one kind, one per image, as that kind with stacked parameters."""

    def __init__(self, kind: Target, params: dict):
        self.kind, self._params = kind, params

    @property
    def key(self):
        return self.kind.key

    def params(self, count):
        return self._params

    def check(self, split):
        self.kind.check(split)

    def score(self, outputs, params):
        return self.kind.score(outputs, params)

    def __repr__(self):
        return f"[{self.kind!r}, ...]"


def __getattr__(name):  # detection targets live in cam/detection.py, which builds on Target
    if name in ("Box", "RetinaNet", "DFine"):
        return getattr(importlib.import_module(".detection", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
