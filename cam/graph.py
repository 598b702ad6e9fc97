"""Split a Keras 3 model at a layer into a trunk (run once) and a head (run per ablation).

A model is flattened into the calls of its leaf layers, in topological order, with nested
functional and Sequential models expanded in place, so a layer inside a backbone that is one
layer of a bigger model is reachable by name. Splitting at a target tensor T gives

* the **head**: every call that depends on T, directly or through other head calls;
* the **bypass**: tensors that head calls read but that do not depend on T (the earlier
  features a DenseNet concatenation carries past T, the shortcut of a ResNet addition);
* the **trunk**: the calls needed to compute T and the bypass.

``head(T, bypass) == model(x)`` exactly, because every value the head reads is either T or was
computed without T. Ablations change T only, so the trunk runs once per image and only the
head runs per ablation, with the bypass broadcast across the ablation batch.

This walks Keras' functional graph, the same structure ``keras.Model.__call__`` executes, so it
needs a functional or Sequential model; a subclassed model can only be a leaf call, not split
inside (a layer only its ``call`` reaches is explained by interception, :mod:`cam.intercept`).
Keras has no public API for that graph: every private access goes through
:mod:`cam.keras_internals`, which fails loudly on a Keras version it does not know.

Token layers (a Vision Transformer's (batch, tokens, channels) outputs) are explained on their
patch grid: :class:`cam.tokens.TokenGrid` says which tokens form the (h, w) grid and which ones (a class
token) are carried past the cut unchanged, like the bypass, and are never ablated.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

import keras
import numpy as np
from keras import tree

from .keras_internals import (call_takes_training, fill_in_arguments, functional_graph,
                              graph_nodes)
from .logits import PreActivation, is_passthrough, output_activation
from .tokens import TokenGrid, square_tokens

Key = tuple  # (call path, id of the KerasTensor in its own graph)


@dataclass(eq=False)
class Call:
    """One call of a leaf layer (or op) in the flattened graph."""

    operation: Any
    arguments: Any  # the node's recorded call arguments (see keras_internals.fill_in_arguments)
    arg_tensors: list  # the KerasTensors the call reads, in order
    arg_keys: list  # keys of arg_tensors, in order
    out_keys: list
    name: str  # qualified name: "outer/inner" for layers inside nested models
    out_specs: list  # KerasTensors of the outputs (shape, dtype)
    #: whether the operation's call takes ``training`` (Dropout, BatchNormalization, ...)
    takes_training: bool = field(init=False)

    def __post_init__(self):
        self.takes_training = call_takes_training(self.operation)

    def run(self, values: dict, operation: Any = None) -> None:
        """Call the layer on concrete tensors from ``values`` and store its outputs there."""
        local = {id(t): values[k] for t, k in zip(self.arg_tensors, self.arg_keys)}
        args, kwargs = fill_in_arguments(self.arguments, local)
        op = operation or self.operation
        # Explanations are of the deployed model: Dropout off, BatchNorm on moving statistics
        # (an explicit training=True in the model, e.g. Monte-Carlo dropout, is overridden too).
        # An override (PreActivation) runs its layer without ``training``.
        if operation is None and self.takes_training:
            kwargs["training"] = False
        outputs = tree.flatten(op(*args, **kwargs))
        for key, value in zip(self.out_keys, outputs):
            values[key] = value


@dataclass
class LayerGraph:
    """A model flattened into leaf calls in topological order. It holds the model's layers
    but not the model itself (only its name), so that what cam keeps per model (keyed weakly
    by the model) never keeps the model alive."""

    model_name: str
    calls: list[Call] = field(default_factory=list)
    input_keys: list = field(default_factory=list)
    output_keys: list = field(default_factory=list)
    input_specs: list = field(default_factory=list)
    #: qualified layer name -> keys of its outputs, one list per call of that layer
    layer_outputs: dict[str, list[list]] = field(default_factory=dict)
    #: key -> KerasTensor that describes it
    specs: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: keras.Model) -> "LayerGraph":
        graph = functional_graph(model)
        if graph is None:
            raise TypeError(
                f"{type(model).__name__} {getattr(model, 'name', '')!r} is not a functional or "
                f"Sequential Keras model (or is a Sequential model that was never built on an "
                f"Input), so its layers cannot be reached: cam needs the layer graph. Build the "
                f"model with the functional API or keras.Sequential([keras.Input(...), ...])."
            )
        self = cls(model_name=model.name)
        self.input_specs = list(graph.inputs)
        self.input_keys = [((), id(t)) for t in graph.inputs]
        alias: dict = {}
        self.output_keys = self._expand(graph, self.input_keys, (), "", alias)
        return self

    def _expand(self, graph, input_keys: list, path: tuple, prefix: str,
                alias: dict) -> list:
        def key(tensor) -> Key:
            k = (path, id(tensor))
            return alias.get(k, k)

        for tensor, outer in zip(graph.inputs, input_keys):
            if (path, id(tensor)) != outer:
                alias[(path, id(tensor))] = outer
            self.specs[outer] = tensor
        for node in graph_nodes(graph):  # topological order
            op = node.operation
            arg_keys = [key(t) for t in node.inputs]
            name = f"{prefix}{op.name}"
            inner = functional_graph(op)
            if inner is not None:
                calls_so_far = len(self.layer_outputs.get(name, []))
                inner_out = self._expand(inner, arg_keys, path + ((op.name, calls_so_far),),
                                         name + "/", alias)
                for tensor, k in zip(node.outputs, inner_out):
                    alias[(path, id(tensor))] = k
                out_keys = inner_out
            else:
                out_keys = [key(t) for t in node.outputs]
                self.calls.append(Call(op, node.arguments, list(node.inputs), arg_keys,
                                       out_keys, name, list(node.outputs)))
            for tensor, k in zip(node.outputs, out_keys):
                self.specs[k] = tensor
            self.layer_outputs.setdefault(name, []).append(out_keys)
        return [key(t) for t in graph.outputs]

    # -- layer lookup ---------------------------------------------------------------------

    def candidates(self) -> list[tuple[str, tuple]]:
        """Layers with one 4-D output (batch, h, w, channels) whose grid is not 1x1, or one
        token output (batch, tokens, channels) whose tokens form a square grid (after a class
        token, if any)."""
        out = []
        leaf_names = {c.name for c in self.calls}
        for name, calls in self.layer_outputs.items():
            # A nested model's output is its last inner layer's output: list that layer once.
            if name not in leaf_names or len(calls) != 1 or len(calls[0]) != 1:
                continue
            shape = tuple(self.specs[calls[0][0]].shape)
            if has_grid(shape) or square_tokens(shape):
                out.append((self.short_name(name), shape))
        return out

    def short_name(self, qualified: str) -> str:
        """The plain layer name when it is unique in the model, else the qualified path."""
        leaf = qualified.rsplit("/", 1)[-1]
        same = [n for n in self.layer_outputs if n.rsplit("/", 1)[-1] == leaf]
        return leaf if len(same) == 1 else qualified

    def has_layer(self, name: str) -> bool:
        """Whether a layer of the graph is called ``name`` (qualified, or its plain name)."""
        return any(n == name or n.rsplit("/", 1)[-1] == name for n in self.layer_outputs)

    def resolve(self, layer: str | int | None) -> tuple[str, Key]:
        """Name and output key of the target layer (a name, an index into candidates, None)."""
        candidates = self.candidates()
        if isinstance(layer, np.integer):
            layer = int(layer)
        if layer is None or isinstance(layer, int) and not isinstance(layer, bool):
            if not candidates:
                raise ValueError(
                    f"model {self.model_name!r} has no layer with a spatial (batch, h, w, "
                    f"channels) output with h, w > 1, so there is nothing to explain"
                )
            if layer is None:
                layer = len(candidates) - 1
            if not -len(candidates) <= layer < len(candidates):
                raise ValueError(
                    f"layer index {layer} is out of range: the model has {len(candidates)} "
                    f"candidate layers (see cam.candidate_layers(model)), valid indices "
                    f"are {-len(candidates)}..{len(candidates) - 1}"
                )
            layer = candidates[layer][0]
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a name, an index or None, not {type(layer).__name__}")
        matches = [n for n in self.layer_outputs if n == layer or n.rsplit("/", 1)[-1] == layer]
        if len(matches) > 1:
            exact = [n for n in matches if n == layer]
            if len(exact) != 1:
                raise ValueError(f"layer name {layer!r} is ambiguous: it matches {matches}; "
                                 f"pass the qualified name")
            matches = exact
        if not matches:
            names = [c[0] for c in candidates]
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5) or names[-5:]
            raise ValueError(f"no layer named {layer!r} in model {self.model_name!r}; "
                             f"closest candidate layers: {close}")
        name = matches[0]
        calls = self.layer_outputs[name]
        if len(calls) != 1:
            raise ValueError(f"layer {name!r} is called {len(calls)} times in the model "
                             f"(a shared layer), so its output is not one tensor; pick another")
        if len(calls[0]) != 1:
            raise ValueError(f"layer {name!r} has {len(calls[0])} outputs; a CAM target needs one")
        shape = tuple(self.specs[calls[0][0]].shape)
        if not (has_grid(shape) or len(shape) == 3):
            raise ValueError(
                f"layer {name!r} outputs shape {shape}, which has no spatial grid: CAM methods "
                f"need a (batch, h, w, channels) output with h, w > 1, or (batch, tokens, "
                f"channels) tokens. Candidates nearest the output: "
                f"{[c[0] for c in candidates[-5:]]}"
            )
        return name, calls[0][0]


def has_grid(shape: tuple) -> bool:
    return len(shape) == 4 and all(d is None or d > 1 for d in shape[1:3])


class Split:
    """Trunk and head of a model at a target layer. See the module docstring."""

    #: Whether the head runs alone (a layer only a ``call`` reaches has no head:
    #: :class:`cam.intercept.InterceptedSplit`).
    head_only = True

    def __init__(self, model: keras.Model, layer: str | int | None = None,
                 score: str = "logit", reshape=None, *, graph: "LayerGraph | None" = None):
        if score not in ("logit", "probability"):
            raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")
        if graph is None:
            graph = LayerGraph.from_model(model)
        self.graph = graph
        if len(graph.input_keys) != 1:
            raise ValueError(f"model {model.name!r} has {len(graph.input_keys)} inputs; cam "
                             f"explains single-input image models")
        self.layer, self.target = graph.resolve(layer)
        self.score = score
        self.overrides: dict[int, Any] = {}
        #: the key of each model output as cam scores it (logits: the final softmax or sigmoid
        #: removed, per ``score``), its final activation if any, and its shape
        self.outputs, self.output_activations = [], []
        for key in graph.output_keys:
            output, activation = self._scored_output(key, score, model, single=len(
                graph.output_keys) == 1)
            self.outputs.append(output)
            self.output_activations.append(activation)
        self.output_activation = self.output_activations[0]
        self.output_shapes = [tuple(graph.specs[k].shape) for k in self.outputs]
        #: output names for :class:`cam.targets.Output`: the producing layers' names
        self.output_names = [n.split("/")[-1] for n in _output_names(graph)]
        #: classes of a single (batch, classes) output; None for other outputs
        shape = self.output_shapes[0]
        self.num_classes = shape[-1] if len(self.outputs) == 1 and len(shape) == 2 else None

        depends = {self.target}
        self.head_calls = []
        for call in graph.calls:
            if any(k in depends for k in call.arg_keys):
                self.head_calls.append(call)
                depends.update(call.out_keys)
        if not any(output in depends for output in self.outputs):
            raise ValueError(f"the model output does not depend on layer {self.layer!r}")
        # Calls after the outputs that the outputs do not need (none in practice) are dropped.
        self.head_calls = needed_calls(self.head_calls, set(self.outputs))
        # what the head reads but the target does not reach (and any output it does not reach)
        self.bypass = list(dict.fromkeys(
            [k for c in self.head_calls for k in c.arg_keys if k not in depends]
            + [k for k in self.outputs if k not in depends]))
        trunk_ids = {id(c) for c in self.head_calls}
        self.trunk_calls = needed_calls([c for c in graph.calls if id(c) not in trunk_ids],
                                   {self.target, *self.bypass})
        shape = tuple(graph.specs[self.target].shape[1:])
        #: How a token layer's (tokens, C) output lays out on its grid; None for (h, w, C).
        self.tokens: TokenGrid | None = None
        if len(shape) == 2:
            self.tokens = TokenGrid.infer(shape[0], reshape, f"layer {self.layer!r}")
            shape = (self.tokens.height, self.tokens.width, shape[1])
        elif reshape is not None:
            raise ValueError(f"reshape is for (batch, tokens, channels) layers; layer "
                             f"{self.layer!r} already outputs a grid {('batch',) + shape}")
        #: The target's grid (h, w, C) that explainers see (for token layers, after reshaping).
        self.target_shape = shape
        self.bypass_shapes = [tuple(graph.specs[k].shape[1:]) for k in self.bypass]

    @property
    def input_shape(self) -> tuple:
        """The model's input, (None, H, W, C)."""
        return tuple(self.graph.input_specs[0].shape)

    def _scored_output(self, output, score, model, single: bool):
        """(key of the output as scored, its final activation or None) for one model output:
        with score='logit' a final softmax or sigmoid is looked through (trailing linear
        layers too) and removed."""
        graph = self.graph
        producers = {k: c for c in graph.calls for k in c.out_keys}
        last = producers.get(output)
        while last is not None and is_passthrough(last) and len(last.arg_keys) == 1:
            last = producers.get(last.arg_keys[0])  # look through trailing linear layers
        activation = output_activation(last) if last is not None else None
        if score == "probability" and activation is None and single:
            raise ValueError(
                "score='probability' needs a model whose last layer applies softmax or sigmoid; "
                "this model outputs raw scores, so use score='logit'"
            )
        if score == "logit" and activation is not None:
            op = last.operation
            if not hasattr(op, "activation") or isinstance(op, keras.layers.Activation):
                output = last.arg_keys[0]  # the logits are the activation's input
            else:
                self.overrides[id(last)] = PreActivation(op)
        return output, activation

    def part_calls(self, part: str) -> list[Call]:
        """The calls of ``part``: ``"trunk"`` (input to the target and the bypass tensors),
        ``"head"`` (target and bypass to the output) or ``"full"`` (every call)."""
        calls = {"trunk": self.trunk_calls, "head": self.head_calls, "full": self.graph.calls}
        if part not in calls:
            raise ValueError(f"part must be one of {', '.join(calls)}, got {part!r}")
        return calls[part]

    def variables(self, part: str) -> list:
        """The Keras variables the calls of ``part`` read, each once: what a compiled function
        of that part needs passed in (JAX passes them as arguments on every call)."""
        seen = {}
        for call in self.part_calls(part):
            for variable in getattr(call.operation, "variables", ()):
                seen.setdefault(id(variable), variable)
        return list(seen.values())

    def bytes_per_row(self, part: str, backward: bool = False) -> int:
        """Bytes one row (one image, or one perturbed copy) costs in ``part``, four per
        element, what the batching policy (:mod:`cam.batching`) divides its budget by.
        Unknown dimensions count as 1.

        * A forward pass frees each tensor once its last reader ran: the largest call's inputs
          and outputs together bound what is live; through the head, the row's own inputs
          (the ablated target and the bypass tensors) are live throughout as well.
        * ``backward=True``: a backward pass keeps every tensor the forward wrote."""
        live = [self.target, *self.bypass] if part == "head" else []
        return calls_bytes_per_row(self.part_calls(part), self.graph.specs, live, backward)

    def trunk(self, images) -> tuple[Any, list]:
        """Target activation and bypass tensors for a batch of images."""
        values = dict(zip(self.graph.input_keys, [images]))
        for call in self.trunk_calls:
            call.run(values)
        bypass = [values[k] for k in self.bypass]
        if self.tokens is None:
            return values[self.target], bypass
        grid, carried = self.tokens.to_grid(values[self.target])
        return grid, carried + bypass  # carried tokens travel with the bypass

    def head(self, activation, bypass: Sequence) -> Any:
        """Model scores (logits or probabilities, per ``score``) from the target activation."""
        bypass = list(bypass)
        if self.tokens is not None:
            carried, bypass = bypass[:self.tokens.carried], bypass[self.tokens.carried:]
            activation = self.tokens.from_grid(activation, carried)
        values = {self.target: activation, **dict(zip(self.bypass, bypass))}
        return self.run(self.head_calls, values)

    def run(self, calls: Sequence[Call], values: dict) -> Any:
        """Run ``calls`` (some of the head's, in order) on ``values`` (key -> tensor), with
        the output activation removed where ``score`` asks, and collect the model's outputs
        as scored: one tensor, or a list for a multi-output model (an output the target layer
        does not reach is still computed, in the head from the bypass tensors)."""
        for call in calls:
            call.run(values, self.overrides.get(id(call)))
        outputs = [_as_float32(values[k]) for k in self.outputs]
        return outputs[0] if len(outputs) == 1 else outputs

    def full(self, images, replace=None) -> Any:
        """The whole network, every layer in order, with the target activation T replaced by
        ``replace(T)`` as soon as it is computed.

        This path does not use the trunk/head split at all, which makes it the oracle the
        head-only path is tested against (and the baseline it is benchmarked against). For a
        token layer, ``replace`` sees the (B, h, w, C) grid, as the explainers do.
        """
        values = dict(zip(self.graph.input_keys, [images]))
        for call in self.graph.calls:
            call.run(values, self.overrides.get(id(call)))
            if replace is not None and self.target in call.out_keys:
                if self.tokens is None:
                    values[self.target] = replace(values[self.target])
                else:
                    grid, carried = self.tokens.to_grid(values[self.target])
                    values[self.target] = self.tokens.from_grid(replace(grid), carried)
        outputs = [_as_float32(values[k]) for k in self.outputs]
        return outputs[0] if len(outputs) == 1 else outputs


def calls_bytes_per_row(calls: Sequence[Call], specs: dict, live: Sequence = (),
                        backward: bool = False) -> int:
    """Bytes per row of running ``calls`` (see :meth:`Split.bytes_per_row`): the largest
    call's inputs and outputs, or with ``backward`` every output; plus the tensors of ``live``
    (keys into ``specs``), which stay live throughout."""
    def size(spec):
        return int(np.prod([d or 1 for d in spec.shape[1:]]))

    if backward:
        total = sum(size(spec) for call in calls for spec in call.out_specs)
    else:
        total = max((sum(size(specs[k]) for k in call.arg_keys if k in specs)
                     + sum(size(spec) for spec in call.out_specs) for call in calls), default=1)
    total += sum(size(specs[k]) for k in live)
    return 4 * max(total, 1)


def _output_names(graph: "LayerGraph") -> list[str]:
    """The name of the layer that produces each model output, in output order."""
    names = {}
    for name, calls in graph.layer_outputs.items():
        for keys in calls:
            for key in keys:
                names.setdefault(key, name)
    return [names.get(k, f"output_{i}") for i, k in enumerate(graph.output_keys)]


def _as_float32(scores):
    """Scores in float32 even under a mixed-precision policy: ablation drops are small
    differences of large scores, which float16 would round away."""
    return keras.ops.cast(scores, "float32")


def needed_calls(calls: list[Call], wanted: set) -> list[Call]:
    """The calls of ``calls`` (kept in order) needed to compute the keys in ``wanted``: those
    that produce a wanted key, and recursively those that produce what they read. Keys that
    no call in ``calls`` produces (the graph's inputs, or tensors given from outside such as
    the target and bypass of a :class:`Split`'s head) are taken as given."""
    wanted = set(wanted)
    kept = []
    for call in reversed(calls):
        if any(k in wanted for k in call.out_keys):
            kept.append(call)
            wanted.update(call.arg_keys)
    return kept[::-1]
