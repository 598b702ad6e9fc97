"""Every private Keras access cam makes, in one place.

:mod:`cam.graph` splits a model at a layer by walking the graph that ``keras.Model.__call__``
executes. Keras 3 has no public API for that graph, so a few of its internals are read here,
each behind one small function whose docstring states the assumption and why no public API
serves. When an assumption fails (a newer Keras renamed or moved something), the function
raises :class:`KerasInternalsError` naming the internal and the installed Keras version,
instead of letting cam compute maps from a misread graph. ``tests/test_keras_internals.py``
checks every assumption against the installed Keras.

:mod:`cam.intercept` explains a layer that only a ``call`` reaches (inside a subclassed model
or layer) by intercepting that layer's ``call`` for the length of one model call, and finds
such layers by their attributes: :func:`call_intercepted`, :func:`layer_attributes` and
:func:`built_input_shape` are here for that.

This module imports only keras and the standard library and has no import-time side effects.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import keras

__all__ = [
    "KerasInternalsError",
    "GraphNode",
    "functional_graph",
    "graph_nodes",
    "fill_in_arguments",
    "call_takes_training",
    "activation_swapped",
    "built_input_shape",
    "call_intercepted",
    "layer_attributes",
]


class KerasInternalsError(RuntimeError):
    """A Keras internal that cam relies on is missing or changed in the installed Keras."""


def _supported_keras() -> str:
    """The Keras requirement cam was installed with (from its metadata), for error messages."""
    try:
        from importlib.metadata import PackageNotFoundError, requires
        for requirement in requires("cam") or ():
            if ";" not in requirement and re.match(r"keras(?![\w.-])", requirement.strip()):
                return f"{requirement.strip()} (the range pinned in pyproject.toml)"
    except (ImportError, PackageNotFoundError):  # pragma: no cover - not installed
        pass
    return "the Keras range pinned in pyproject.toml"  # pragma: no cover


def _broken(internal: str, err: BaseException | None = None) -> KerasInternalsError:
    """The error for a failed assumption about the Keras internal ``internal``."""
    reason = f" ({type(err).__name__}: {err})" if err is not None else ""
    return KerasInternalsError(
        f"cam relies on the Keras internal {internal}, which the installed Keras "
        f"{keras.__version__} does not provide as expected{reason}. cam supports "
        f"{_supported_keras()}; install a Keras version in that range (cam does not guess at "
        f"a changed internal, which could produce wrong maps)."
    )


# --------------------------------------------------------------------------- the graph


def _functional_class() -> type:
    """``keras.src.models.functional.Functional``: the class of models built with the
    functional API (what ``keras.Model(inputs, outputs)`` returns).

    No public API serves: Keras exports no name for it, and ``keras.Model`` is also the base
    of subclassed models, which have no graph to walk.
    """
    try:
        from keras.src.models.functional import Functional
    except ImportError as err:
        raise _broken("keras.src.models.functional.Functional", err) from err
    return Functional


def functional_graph(model: Any) -> Any | None:
    """The functional graph behind ``model``: the model itself for a functional model, the
    functional model a ``keras.Sequential`` built on an ``Input`` keeps (``Sequential._functional``),
    and None for anything else (a layer, a subclassed model, a Sequential never built on an
    Input), which cam treats as a leaf that cannot be split inside.

    Assumes a built Sequential model runs through a functional model kept in its
    ``_functional`` attribute (None until it is built on an Input). No public API serves:
    ``Sequential.inputs`` / ``.outputs`` are public, but wrapping them in a new
    ``keras.Model`` would create a model (and use up an auto-generated name) on every call.
    """
    if isinstance(model, keras.Sequential):
        try:
            graph = model._functional
        except AttributeError as err:
            raise _broken("Sequential._functional", err) from err
        if graph is not None and not isinstance(graph, _functional_class()):
            raise _broken("Sequential._functional (expected a Functional model, got "
                          f"{type(graph).__name__})")
        return graph
    if isinstance(model, _functional_class()):
        return model
    return None


@dataclass(frozen=True, eq=False)
class GraphNode:
    """One call of an operation in a functional graph.

    ``operation``: the layer or op called; ``inputs``: the KerasTensors it reads, in the order
    of :func:`fill_in_arguments`' mapping; ``outputs``: the KerasTensors it returns, flattened;
    ``arguments``: the recorded call arguments, for :func:`fill_in_arguments`.
    """

    operation: Any
    inputs: list
    outputs: list
    arguments: Any


def graph_nodes(functional: Any) -> list[GraphNode]:
    """The calls of a functional model's graph in topological order (every node after the
    nodes whose outputs it reads), input placeholders left out.

    Assumes ``Functional._nodes_by_depth`` maps a depth to the graph's nodes (depth 0 at the
    outputs, so running them by decreasing depth is a topological order: exactly how
    ``Functional.call`` runs them), and that a node has ``operation``, ``is_input``,
    ``input_tensors``, ``outputs`` and ``arguments``. No public API serves: ``model.layers`` /
    ``model.operations`` list the operations but not their calls, i.e. not which tensors each
    call reads and returns, nor the extra arguments (``axis=``, ``training=``) it was called
    with; a shared layer has several calls.
    """
    try:
        by_depth = functional._nodes_by_depth
    except AttributeError as err:
        raise _broken("Functional._nodes_by_depth", err) from err
    nodes = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            try:
                operation = node.operation
                if operation is None or node.is_input:
                    continue
                nodes.append(GraphNode(operation, list(node.input_tensors),
                                       list(node.outputs), node.arguments))
            except AttributeError as err:
                raise _broken("Node.operation / .is_input / .input_tensors / .outputs / "
                              ".arguments", err) from err
    return nodes


def fill_in_arguments(arguments: Any, values: dict) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` to call a node's operation with, its recorded arguments with
    every KerasTensor ``t`` replaced by ``values[id(t)]``.

    Assumes the node's ``arguments`` (``keras.src.ops.symbolic_arguments.SymbolicArguments``)
    has ``fill_in(tensor_dict)`` keyed by ``id(KerasTensor)``, the method ``Functional.call``
    itself uses. No public API serves: the non-tensor arguments of a call (``axis=-1``, a
    constant operand, ``training=True``) are recorded only there.
    """
    try:
        fill_in = arguments.fill_in
    except AttributeError as err:
        raise _broken("SymbolicArguments.fill_in", err) from err
    return fill_in(values)


# --------------------------------------------------------------------------- layer calls


def call_takes_training(layer: Any) -> bool:
    """Whether calling ``layer`` takes a ``training`` argument (Dropout, BatchNormalization,
    a subclassed model whose ``call`` has one), i.e. whether ``training=False`` must be passed
    to run it in inference mode.

    Computed the way Keras computes its private ``Layer._call_has_training_arg``
    (``"training" in inspect.signature(self.call).parameters``), but with public Python
    introspection of the public ``call`` method, so a renamed private attribute cannot make
    it silently answer False. An operation (any ``keras.Operation``) without a ``call``
    method breaks that assumption and raises :class:`KerasInternalsError`; an object that is
    not a Keras operation (a plain callable) takes no ``training`` argument.
    """
    call = getattr(layer, "call", None)
    if call is None:
        if isinstance(layer, getattr(keras, "Operation", ())):
            raise _broken(f"{type(layer).__name__}.call (every Keras operation has a call "
                          f"method)")
        return False
    try:
        parameters = inspect.signature(call).parameters
    except (TypeError, ValueError) as err:
        raise _broken(f"inspect.signature({type(layer).__name__}.call)", err) from err
    return "training" in parameters


@contextlib.contextmanager
def activation_swapped(layer: Any, fn: Callable) -> Iterator[Any]:
    """Within the ``with`` block, ``layer`` applies ``fn`` instead of its activation (e.g.
    ``keras.activations.linear`` to read a ``Dense(..., activation="softmax")``'s logits);
    the activation is restored on exit, also when the block raises.

    Assumes the layer reads its public ``activation`` attribute inside ``call`` (as Dense and
    the convolution layers do), and sets it with ``object.__setattr__`` so that Keras' and
    TensorFlow's attribute tracking does not record the temporary value. No public API
    serves: Keras has no way to call a layer without its activation, and a copy of the layer
    sharing its weights would need the layer's config to rebuild it.
    """
    try:
        saved = layer.activation
    except AttributeError as err:
        raise _broken(f"{type(layer).__name__}.activation", err) from err
    object.__setattr__(layer, "activation", fn)
    try:
        yield layer
    finally:
        object.__setattr__(layer, "activation", saved)


# --------------------------------------------------------------------------- call-only layers


@contextlib.contextmanager
def call_intercepted(layer: Any, hook: Callable) -> Iterator[Any]:
    """Within the ``with`` block, every call of ``layer`` runs ``hook(call, *args, **kwargs)``
    in place of ``call(*args, **kwargs)``, where ``call`` is the layer's own ``call``; the
    layer is restored on exit, also when the block raises. Blocks may nest on one layer.

    Assumes ``Layer.__call__`` (Keras' bookkeeping: building, masks, the ``training`` flag,
    autocasting) ends by looking up ``self.call`` on the instance, so that an instance
    attribute set with ``object.__setattr__`` (which neither Keras' nor PyTorch's attribute
    tracking records) takes its place; that lookup happens again at every call, so the hook
    also runs while ``tf.function``, ``jax.jit`` or autograd trace the model. No public API
    serves: Keras has no forward hooks (PyTorch's ``register_forward_hook`` exists on the
    torch backend only).
    """
    if not callable(getattr(layer, "call", None)):
        raise _broken(f"{type(layer).__name__}.call (every Keras layer has a call method)")
    own = vars(layer)
    had_own, saved = "call" in own, own.get("call")
    original = layer.call

    def intercepted(*args, **kwargs):
        return hook(original, *args, **kwargs)

    object.__setattr__(layer, "call", intercepted)
    try:
        yield layer
    finally:
        if had_own:
            object.__setattr__(layer, "call", saved)
        else:
            object.__delattr__(layer, "call")


def _keras_own_attributes() -> frozenset:
    """Names of the attributes a bare ``keras.layers.Layer`` and ``keras.Model`` set on
    themselves (trackers, flags, compiled functions): none of them is a user's sub-layer."""
    if not _OWN:
        names = set(vars(keras.layers.Layer(name="cam_bare_layer"))) | set(
            vars(keras.Model(name="cam_bare_model")))  # named: no auto-name is used up
        _OWN.append(frozenset(names))
    return _OWN[0]


_OWN: list = []


def layer_attributes(layer: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of the attributes a layer's own code set on it (``self.conv = ...``,
    ``self.blocks = [...]``), in the order they were set, leaving out those every Keras layer
    and model sets on itself (and TensorFlow's ``_self_*`` tracking attributes).

    Assumes that an attribute lives in the instance's ``__dict__`` (``vars``), except on the
    torch backend, where Keras layers are ``torch.nn.Module``s and a sub-layer set as an
    attribute is kept in the module registry that the public ``named_children`` lists (lists
    and dicts of layers stay in ``__dict__``). No public Keras API serves: ``Model.layers``
    lists a model's sub-layers without the attribute names, and a plain ``Layer`` has no
    public list of its sub-layers at all.
    """
    own = _keras_own_attributes()
    found = dict(vars(layer))
    named_children = getattr(layer, "named_children", None)
    if callable(named_children):  # torch: sub-layers live in the module registry
        for name, child in named_children():
            found.setdefault(name, child)
    # TensorFlow's trackable bookkeeping (``_self_unconditional_dependency_names``, set once
    # something is tracked) starts with "_self_"; "call" is set only by call_intercepted.
    return [(name, value) for name, value in found.items()
            if name not in own and not name.startswith(("__", "_self_")) and name != "call"]


def built_input_shape(model: Any) -> tuple | None:
    """The input shape a subclassed model was built with (``model.build(shape)``, or its
    first call on data), batch dimension included; None when it was never built, or built
    with several inputs.

    Assumes ``Layer._build_shapes_dict`` maps the ``build`` argument's name to the shape it
    was built with. No public API serves: ``model.input_shape`` exists only for models with
    a graph (functional, Sequential), not for a subclassed model called on data.
    """
    try:
        shapes = model._build_shapes_dict
    except AttributeError as err:
        raise _broken("Layer._build_shapes_dict", err) from err
    if not shapes or len(shapes) != 1:
        return None
    (shape,) = shapes.values()
    if not isinstance(shape, (tuple, list)) or not all(
            d is None or isinstance(d, int) for d in shape):
        return None
    return tuple(shape)
