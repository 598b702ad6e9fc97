"""Explain a layer that only a ``call`` reaches: a layer of a subclassed model
(``class Net(keras.Model)`` with a ``call``), or a block inside a custom layer.

Such a layer has no place in a functional graph, so the model cannot be split there into a
trunk and a head. Instead its output is intercepted while the model runs its own ``call``,
for the length of one model call (:func:`cam.keras_internals.call_intercepted`):

* the trunk keeps the layer's output (and the rest of the model, which it does not return,
  is pruned by ``tf.function`` and ``jax.jit``);
* the whole-model pass (:meth:`InterceptedSplit.full`) replaces it by ``replace(output)``: a
  zero tensor added for the gradient methods (its gradient is the layer's), a perturbed copy
  per row for the perturbation methods.

There is no head to run alone: every evaluation runs the whole model (``mode="full"``).
Functional graphs keep head-only execution; :func:`split_model` intercepts only where the
graph does not reach the layer.

**Names.** A layer is named by the path of attributes that leads to it from the model,
segments joined by ``/``: ``"c2"`` for ``self.c2``, ``"encoder/blocks/3"`` for
``self.encoder.blocks[3]`` (a list item by its index, a dict item by its key), and inside a
functional or Sequential model by layer name (``"backbone/conv_b"``). A path of Keras layer
names (``"vit_encoder/transformer_block_11"``) or a plain layer name that is unique in the
model works too, and so does the Layer object itself (``layer=model.encoder.blocks[3]``).
:func:`cam.layer_table` lists the attribute paths.
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from . import backend as B
from .checks import is_int
from .graph import LayerGraph, Split, has_grid
from .keras_internals import (built_input_shape, call_intercepted, functional_graph,
                              layer_attributes)
from .tokens import TokenGrid, square_tokens

#: How :func:`cam.layer_table` notes a layer explained by interception.
NOTE = "intercepted: whole model per evaluation"
#: How deep lists and dicts of layers are looked into (``self.stages[1][0]``).
NESTING = 3


def split_model(model, layer=None, score: str = "logit", reshape=None):
    """The split that explains ``layer`` of ``model``: the graph :class:`cam.graph.Split`
    (head-only execution) where the model's functional graph reaches the layer (a name,
    index or None it resolves, or a Layer object it calls), else an
    :class:`InterceptedSplit` (every evaluation runs the whole model)."""
    if functional_graph(model) is not None:
        graph = LayerGraph.from_model(model)
        if isinstance(layer, keras.layers.Layer):
            names = {call.name for call in graph.calls if call.operation is layer}
            if len(names) == 1:
                return Split(model, names.pop(), score, reshape, graph=graph)
        elif not isinstance(layer, str) or graph.has_layer(layer):
            return Split(model, layer, score, reshape, graph=graph)
    return InterceptedSplit(model, layer, score, reshape)


# --------------------------------------------------------------------------- finding layers


@dataclass(frozen=True)
class Reached:
    """A layer found by walking a model: its attribute ``path``, the path of its Keras layer
    ``names``, and whether an earlier path reached the same layer (``alias``)."""

    path: str
    names: str
    layer: Any
    alias: bool = False


def children(layer) -> list[tuple[str, Any]]:
    """``(segment, sub-layer)`` for the layers ``layer`` holds directly: a functional or
    Sequential model's layers by name; a subclassed model's or custom layer's by attribute,
    list index or dict key (and a model's layers held nowhere else by name). Keras' own
    layers are not looked into: their parts (MultiHeadAttention's projections) are not
    what a map is made of."""
    if functional_graph(layer) is not None:
        return [(child.name, child) for child in layer.layers
                if not isinstance(child, keras.layers.InputLayer)]
    if type(layer).__module__.split(".")[0] == "keras":
        return []
    found = []
    for name, value in layer_attributes(layer):
        found.extend(_layers_in(str(name), value, 0))
    if isinstance(layer, keras.Model):
        held = {id(child) for _, child in found}
        found.extend((child.name, child) for child in layer.layers
                     if id(child) not in held and not isinstance(child, keras.layers.InputLayer))
    return found


def _layers_in(prefix: str, value, depth: int) -> list[tuple[str, Any]]:
    if isinstance(value, keras.layers.Layer):
        return [(prefix, value)]
    if depth >= NESTING:
        return []
    if isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    else:
        return []
    return [found for key, item in items for found in _layers_in(f"{prefix}/{key}", item,
                                                                   depth + 1)]


def reachable(model) -> list[Reached]:
    """Every layer reachable from ``model`` by :func:`children`, depth first, attributes in
    the order they were set; a layer reached again is an ``alias`` (its sub-layers are
    listed under the first path only)."""
    out, seen = [], {id(model)}

    def visit(layer, path: str, names: str):
        for segment, child in children(layer):
            entry = Reached(f"{path}{segment}", f"{names}{child.name}", child,
                            alias=id(child) in seen)
            out.append(entry)
            if not entry.alias:
                seen.add(id(child))
                visit(child, entry.path + "/", entry.names + "/")

    visit(model, "", "")
    return out


def find_by_name(entries: list[Reached], name: str, model_name: str) -> Reached:
    """The layer called ``name``: an attribute path, a path of layer names, or a plain layer
    name unique in the model; a clear error listing the nearest paths otherwise."""
    for attribute in ("path", "names"):
        exact = [e for e in entries if getattr(e, attribute) == name]
        if exact:
            return next((e for e in exact if not e.alias), exact[0])
    plain = {id(e.layer): e for e in reversed(entries) if e.layer.name == name}
    if len(plain) > 1:
        paths = sorted(e.path for e in plain.values())
        raise ValueError(f"layer name {name!r} is ambiguous: it matches {paths}; pass the path")
    if plain:
        (entry,) = plain.values()
        return next(e for e in entries if e.layer is entry.layer and not e.alias)
    paths = [e.path for e in entries if not e.alias]
    spellings = list(dict.fromkeys(paths + [e.layer.name for e in entries]))
    close = difflib.get_close_matches(name, spellings, n=5, cutoff=0.5) or paths[-5:]
    raise ValueError(f"no layer named {name!r} in model {model_name!r}; closest candidate "
                     f"layers: {close}")


# --------------------------------------------------------------------------- the probe


@dataclass
class Seen:
    """What one layer did in the probe: how often it was called, the shapes of its first
    call's outputs (batch dimension left out) and the elements per row its inputs and
    outputs hold."""

    calls: int = 0
    shapes: list = field(default_factory=list)
    inputs: int = 0
    outputs: int = 0


def _elements(value) -> int:
    return sum(int(np.prod(tuple(t.shape)[1:])) for t in tree.flatten(value)
               if hasattr(t, "shape") and len(tuple(t.shape)) > 0)


def probe(model, input_shape: tuple, layers: list) -> tuple[dict, list, Any]:
    """Run ``model`` once on one zero image with every layer of ``layers`` intercepted:
    ``(seen, order, outputs)``, a :class:`Seen` per id of a layer that was called, the ids
    in the order their first call returned (nearest the output last) and the outputs."""
    seen: dict[int, Seen] = {}
    order: list[int] = []

    def recorder(layer):
        def hook(call, *args, **kwargs):
            out = call(*args, **kwargs)
            record = seen.setdefault(id(layer), Seen())
            if record.calls == 0:
                order.append(id(layer))
                record.shapes = [tuple(t.shape)[1:] for t in tree.flatten(out)
                                 if hasattr(t, "shape")]
                record.inputs, record.outputs = _elements((args, kwargs)), _elements(out)
            record.calls += 1
            return out
        return hook

    unique = list({id(layer): layer for layer in layers}.values())
    image = B.tensor(np.zeros((1, *input_shape[1:]), np.float32))
    if not all(layer.built for layer in unique):
        # A layer without a build method is built on its first call by tracing its call
        # symbolically: that run is not one of the forward pass's calls, so it comes first.
        model(image, training=False)
    with contextlib.ExitStack() as stack:
        for layer in unique:
            stack.enter_context(call_intercepted(layer, recorder(layer)))
        outputs = model(image, training=False)
    return seen, order, outputs


def model_input_shape(model) -> tuple:
    """The (batch, H, W, C) input of a model, from its graph or from how it was built."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        shape = built_input_shape(model)
    if shape is None:
        raise ValueError(f"model {model.name!r} has not been built, so cam cannot tell its "
                         f"input shape: call it on a batch of images first, or "
                         f"model.build((None, height, width, channels))")
    if isinstance(shape, list) or len(shape) != 4:
        raise ValueError(f"model {model.name!r} takes input of shape {shape}; cam explains "
                         f"single-input image models, (batch, height, width, channels)")
    if None in shape[1:]:
        raise ValueError(f"model {model.name!r} was built for images of shape {shape}; a "
                         f"layer reached only inside a call needs a fixed image size: "
                         f"build it with one, model.build((None, height, width, channels))")
    return (None, *shape[1:])


def candidates(entries: list[Reached], seen: dict, order: list) -> list[tuple[Reached, tuple]]:
    """``(entry, output shape)`` of the layers a CAM can target, in the order their call
    returned: called once, with one (batch, h, w, C) output or square tokens."""
    first = {id(e.layer): e for e in entries if not e.alias}
    out = []
    for key in order:
        record = seen[key]
        if key in first and record.calls == 1 and len(record.shapes) == 1:
            shape = (None, *record.shapes[0])
            if has_grid(shape) or square_tokens(shape):
                out.append((first[key], shape))
    return out


def call_only_candidates(model) -> list[tuple[str, tuple]]:
    """``(path, output shape)`` of the layers of ``model`` that a CAM can target and only
    interception reaches (those of its functional graph left out), nearest the output last."""
    entries = reachable(model)
    in_graph = set()
    if functional_graph(model) is not None:
        in_graph = {id(call.operation) for call in LayerGraph.from_model(model).calls}
        in_graph |= {id(e.layer) for e in entries if functional_graph(e.layer) is not None}
        if all(id(e.layer) in in_graph for e in entries):
            return []  # the graph reaches every layer: nothing to run the model for
    seen, order, _ = probe(model, model_input_shape(model), [e.layer for e in entries])
    return [(entry.path, shape) for entry, shape in candidates(entries, seen, order)
            if id(entry.layer) not in in_graph]


def on_tensor(output, hook) -> Any:
    """``hook`` applied to a layer's output tensor: the output itself, or the one tensor of
    an output structure whose other items are not tensors (a block that returns
    ``(output, None)``, as DeiT's do for the attention scores not asked for), repacked."""
    if hasattr(output, "shape"):
        return hook(output)
    flat = tree.flatten(output)
    (index,) = [i for i, item in enumerate(flat) if hasattr(item, "shape")]
    flat[index] = hook(flat[index])
    return tree.pack_sequence_as(output, flat)


# --------------------------------------------------------------------------- the split


class InterceptedSplit:
    """A layer that only a ``call`` reaches, explained by intercepting its output while the
    model runs (see the module docstring): the interface of :class:`cam.graph.Split` that
    the explainers use, with no head (every evaluation runs the whole model).

    Holds the model weakly (what :mod:`cam.cache` keeps per model must not keep it alive).
    The model is run once on one zero image when the split is made, to find how often the
    layer is called and the shapes of its output and of the model's outputs.
    """

    #: Whether the head can run alone: never here (:attr:`cam.Explainer.mode` is "full").
    head_only = False
    #: No head: no calls after the layer run apart from the model.
    head_calls = ()

    def __init__(self, model, layer=None, score: str = "logit", reshape=None):
        if score not in ("logit", "probability"):
            raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")
        self.score = score
        #: The model's input, (None, H, W, C).
        self.input_shape = model_input_shape(model)
        entries = reachable(model)
        named = find_by_name(entries, layer, model.name) if isinstance(layer, str) else None
        extra = [layer] if isinstance(layer, keras.layers.Layer) else []
        seen, order, outputs = probe(model, self.input_shape, [e.layer for e in entries] + extra)
        self.layer, self.target_layer = self._resolve(layer, named, entries, seen, order,
                                                      model.name)
        shape = self._check_target(seen.get(id(self.target_layer)))
        self.tokens: TokenGrid | None = None
        if len(shape) == 3:
            self.tokens = TokenGrid.infer(shape[1], reshape, f"layer {self.layer!r}")
            shape = (None, self.tokens.height, self.tokens.width, shape[2])
        elif reshape is not None:
            raise ValueError(f"reshape is for (batch, tokens, channels) layers; layer "
                             f"{self.layer!r} already outputs a grid {('batch',) + shape[1:]}")
        #: The target's grid (h, w, C) that explainers see (for token layers, after reshaping).
        self.target_shape = tuple(shape[1:])
        flat = tree.flatten(outputs)
        self.output_shapes = [(None, *tuple(o.shape)[1:]) for o in flat]
        self.outputs = list(range(len(flat)))
        self.output_names = sorted(outputs) if isinstance(outputs, dict) and len(
            outputs) == len(flat) else [f"output_{i}" for i in range(len(flat))]
        single = self.output_shapes[0]
        self.num_classes = single[-1] if len(flat) == 1 and len(single) == 2 else None
        self.bypass: list = []
        self._variables = list(model.variables)
        records = list(seen.values())
        self._forward = max(r.inputs + r.outputs for r in records) + _elements(outputs)
        self._backward = sum(r.outputs for r in records) + _elements(outputs)
        self._model = weakref.ref(model)

    @staticmethod
    def _resolve(layer, named, entries, seen, order, model_name) -> tuple[str, Any]:
        if named is not None:
            return named.path, named.layer
        if isinstance(layer, keras.layers.Layer):
            path = next((e.path for e in entries if e.layer is layer and not e.alias),
                        layer.name)
            return path, layer
        if layer is None or is_int(layer):
            found = candidates(entries, seen, order)
            if not found:
                raise ValueError(f"model {model_name!r} calls no layer with a spatial (batch, "
                                 f"h, w, channels) output with h, w > 1, so there is nothing "
                                 f"to explain")
            index = len(found) - 1 if layer is None else int(layer)
            if not -len(found) <= index < len(found):
                raise ValueError(f"layer index {index} is out of range: the model has "
                                 f"{len(found)} candidate layers (see cam.layer_table(model)), "
                                 f"valid indices are {-len(found)}..{len(found) - 1}")
            return found[index][0].path, found[index][0].layer
        raise TypeError(f"layer must be a name, an index, a Keras layer or None, not "
                        f"{type(layer).__name__}")

    def _check_target(self, record: Seen | None) -> tuple:
        """The target's output shape (batch first); a clear error for a layer the model never
        calls, calls more than once, or whose output is not a grid or tokens."""
        if record is None:
            raise ValueError(f"layer {self.layer!r} is never called when the model runs, so "
                             f"it has no output to explain; pick a layer the model's call "
                             f"uses (cam.layer_table(model) lists them)")
        if record.calls != 1:
            raise ValueError(f"layer {self.layer!r} is called {record.calls} times in one "
                             f"pass of the model (a shared layer), so its output is not one "
                             f"tensor; pick a layer called once")
        if len(record.shapes) != 1:
            raise ValueError(f"layer {self.layer!r} has {len(record.shapes)} outputs; a CAM "
                             f"target needs one")
        shape = (None, *record.shapes[0])
        if not (has_grid(shape) or len(shape) == 3):
            raise ValueError(
                f"layer {self.layer!r} outputs shape {shape}, which has no spatial grid: CAM "
                f"methods need a (batch, h, w, channels) output with h, w > 1, or (batch, "
                f"tokens, channels) tokens")
        return shape

    # -- what the explainers use ---------------------------------------------------------

    def variables(self, part: str) -> list:
        """Every variable of the model, whatever the ``part``: each part runs the model."""
        if part not in ("trunk", "head", "full"):
            raise ValueError(f"part must be one of trunk, head, full, got {part!r}")
        return list(self._variables)

    def bytes_per_row(self, part: str, backward: bool = False) -> int:
        """Bytes one row costs, four per element, measured in the probe: the largest layer
        call's inputs and outputs (or with ``backward``, every layer's outputs) plus the
        model's outputs. Every part is the whole model."""
        self.variables(part)  # checks the part
        return 4 * max(self._backward if backward else self._forward, 1)

    def trunk(self, images) -> tuple[Any, list]:
        """The target activation (its grid, for a token layer) for a batch of images; no
        bypass tensors. The model runs as far as the compiled function needs it."""
        return self.trunk_and_outputs(images)[0], []

    def trunk_and_outputs(self, images) -> tuple[Any, Any]:
        """The target activation (its grid, for a token layer) and the model's outputs, from
        one pass of the model (:meth:`cam.Explainer.forward` for this split)."""
        kept = []

        def keep(output):
            kept.append(output)
            return output

        outputs = self._run(images, keep)
        activation = kept[0] if self.tokens is None else self.tokens.to_grid(kept[0])[0]
        return activation, outputs

    def head(self, activation, bypass) -> Any:
        raise ValueError(f"layer {self.layer!r} is reached only inside a call, so there is no "
                         f"head to run after it: every evaluation runs the whole model "
                         f"(mode='full')")

    def full(self, images, replace=None) -> Any:
        """The whole model on a batch of images, with the layer's output T replaced by
        ``replace(T)`` (for a token layer, ``replace`` sees the (B, h, w, C) grid)."""
        if replace is None:
            return self._run(images, lambda output: output)
        if self.tokens is None:
            return self._run(images, replace)

        def on_grid(output):
            grid, carried = self.tokens.to_grid(output)
            return self.tokens.from_grid(replace(grid), carried)

        return self._run(images, on_grid)

    def _run(self, images, hook) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model this split belongs to was deleted")
        calls = []

        def intercept(call, *args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise ValueError(f"layer {self.layer!r} is called more than once in one pass "
                                 f"of the model (a shared layer); pick a layer called once")
            return on_tensor(call(*args, **kwargs), hook)

        with call_intercepted(self.target_layer, intercept):
            outputs = model(images, training=False)
        if not calls:
            raise ValueError(f"layer {self.layer!r} was not called in this pass of the model")
        # float32 under mixed precision too: ablation drops are small differences
        flat = [ops.cast(o, "float32") for o in tree.flatten(outputs)]
        return flat[0] if len(flat) == 1 else flat
