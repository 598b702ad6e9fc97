"""cam.keras_internals: one test per assumption cam makes about private Keras internals, the
clear error when one fails, and inference mode (Dropout off, BatchNorm on moving statistics)
in both the head-only and the full path, even where the model asks for training=True."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam import keras_internals as K
from cam.graph import LayerGraph, Split
from cam.keras_internals import KerasInternalsError

from conftest import build_dense_concat_model, raw, randomize_batchnorm


def _np(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


def _images(shape, n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _assert_clear_error(info, internal: str):
    message = str(info.value)
    assert internal in message
    assert f"Keras {keras.__version__}" in message
    assert "pyproject.toml" in message


@pytest.fixture
def diamond():
    """image -> stem -> (left, right) -> add -> gap -> logits, plus a keras.ops call."""
    inputs = keras.Input((6, 6, 3), name="image")
    stem = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    left = L.ReLU(name="left")(stem)
    right = L.Conv2D(4, 1, name="right")(stem)
    x = L.Add(name="add")([left, right])
    x = keras.ops.multiply(x, 0.5)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(2, name="logits")(x), name="diamond")


# --------------------------------------------------------------------------- the graph


def test_functional_graph_of_a_functional_model_is_the_model(diamond):
    assert K.functional_graph(diamond) is diamond


def test_sequential_built_on_an_input_exposes_its_functional_graph(tiny_sequential):
    graph = K.functional_graph(tiny_sequential)
    assert graph is not None and graph is not tiny_sequential
    assert list(graph.inputs) == list(tiny_sequential.inputs)
    assert list(graph.outputs) == list(tiny_sequential.outputs)
    ops = [n.operation for n in K.graph_nodes(graph)]
    assert ops == list(tiny_sequential.layers)  # the Sequential's layers, in order


def test_leaves_have_no_functional_graph():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    unbuilt = keras.Sequential([L.Dense(2)])
    for leaf in (L.Dense(2), Subclassed(), unbuilt, keras.activations.relu):
        assert K.functional_graph(leaf) is None


def test_graph_nodes_are_the_calls_in_topological_order(diamond):
    nodes = K.graph_nodes(diamond)
    assert all(isinstance(n, K.GraphNode) for n in nodes)
    names = [n.operation.name for n in nodes]
    # every call once, the input placeholder left out
    assert names[0] == "stem" and names[-2:] == ["gap", "logits"]
    assert {"left", "right", "add"} <= set(names) and len(names) == 7
    assert names.index("add") > max(names.index("left"), names.index("right"))
    multiply = nodes[names.index("add") + 1]
    assert isinstance(multiply.operation, keras.Operation)
    assert not isinstance(multiply.operation, keras.layers.Layer)  # a keras.ops call
    # topological: every node reads only the inputs or what an earlier node returned
    known = {id(t) for t in diamond.inputs}
    for node in nodes:
        assert node.inputs and all(id(t) in known for t in node.inputs), node.operation.name
        assert all(isinstance(t, keras.KerasTensor) for t in node.inputs + node.outputs)
        known.update(id(t) for t in node.outputs)
    assert [id(t) for t in nodes[-1].outputs] == [id(t) for t in diamond.outputs]


def test_graph_nodes_list_each_call_of_a_shared_layer():
    shared = L.Dense(3, name="shared")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, shared(shared(inputs)))
    nodes = K.graph_nodes(model)
    assert [n.operation for n in nodes] == [shared, shared]
    assert [id(t) for t in nodes[1].inputs] == [id(t) for t in nodes[0].outputs]


class _Scale(keras.layers.Layer):
    def call(self, x, scale=1.0, shift=None):
        return x * scale if shift is None else x * scale + shift


def test_fill_in_arguments_maps_tensors_and_keeps_the_other_arguments():
    inputs = keras.Input((4,))
    a = L.Dense(4, name="a")(inputs)
    scaled = _Scale(name="scale")(a, scale=2.0)
    dropped = L.Dropout(0.5, name="drop")(scaled, training=True)
    shifted = _Scale(name="shift")(dropped, scale=3.0, shift=a)
    cat = L.Concatenate(axis=1, name="cat")([shifted, scaled])
    model = keras.Model(inputs, cat)
    by_name = {n.operation.name: n for n in K.graph_nodes(model)}
    value, other = object(), object()
    args, kwargs = K.fill_in_arguments(by_name["scale"].arguments, {id(a): value})
    assert args[0] is value and kwargs == {"scale": 2.0}
    args, kwargs = K.fill_in_arguments(by_name["drop"].arguments, {id(scaled): value})
    assert args[0] is value and kwargs == {"training": True}  # the explicit training=True
    args, kwargs = K.fill_in_arguments(by_name["shift"].arguments,
                                       {id(dropped): value, id(a): other})
    assert args[0] is value and kwargs["scale"] == 3.0 and kwargs["shift"] is other
    assert by_name["shift"].inputs == [dropped, a]  # the tensors fill_in maps, in order
    args, kwargs = K.fill_in_arguments(by_name["cat"].arguments,
                                       {id(shifted): value, id(scaled): other})
    assert len(args) == 1 and list(args[0]) == [value, other] and kwargs == {}


# --------------------------------------------------------------------------- layer calls


class _WithTraining(keras.layers.Layer):
    def call(self, x, training=None):
        return x


class _WithoutTraining(keras.layers.Layer):
    def call(self, x, **kwargs):
        return x


@pytest.mark.parametrize("layer, expected", [
    (L.Dropout(0.5), True),
    (L.BatchNormalization(), True),
    (_WithTraining(), True),
    (L.Conv2D(2, 3), False),
    (L.ReLU(), False),
    (L.Add(), False),
    (L.GlobalAveragePooling2D(), False),
    (_WithoutTraining(), False),  # **kwargs is not a training argument, as in Keras
])
def test_call_takes_training(layer, expected):
    assert K.call_takes_training(layer) is expected
    # the same answer Keras itself computes (where the private attribute still exists)
    keras_says = getattr(layer, "_call_has_training_arg", None)
    if keras_says is not None:
        assert keras_says is expected


def test_call_takes_training_agrees_with_keras_on_every_layer(dense_concat_model, diamond):
    """Keras' own (private) answer, where it still has one, on every call of two models;
    e.g. Dense takes ``training`` in some Keras versions and not in others."""
    for model in (dense_concat_model, diamond):
        for node in K.graph_nodes(model):
            keras_says = getattr(node.operation, "_call_has_training_arg", None)
            if keras_says is not None:
                assert K.call_takes_training(node.operation) is keras_says, node.operation


def test_call_takes_training_of_ops_and_plain_callables(diamond):
    op = next(n.operation for n in K.graph_nodes(diamond)
              if not isinstance(n.operation, keras.layers.Layer))
    assert K.call_takes_training(op) is False
    assert K.call_takes_training(lambda x, training=None: x) is False  # not a Keras operation


def test_call_takes_training_refuses_an_operation_without_call():
    class NoCall(keras.Operation):
        call = None

    with pytest.raises(KerasInternalsError) as info:
        K.call_takes_training(NoCall())
    _assert_clear_error(info, "NoCall.call")


def test_activation_swapped_calls_the_layer_without_its_activation():
    dense = L.Dense(3, activation="softmax")
    x = _images((4,), 2)
    probabilities = _np(dense(x))
    with K.activation_swapped(dense, keras.activations.linear) as layer:
        assert layer is dense
        logits = _np(dense(x))
    kernel, bias = (w.numpy() for w in dense.weights)
    np.testing.assert_allclose(logits, x @ kernel + bias, rtol=1e-5, atol=1e-6)
    assert dense.activation is keras.activations.softmax
    np.testing.assert_allclose(_np(dense(x)), probabilities, rtol=1e-6)


def test_activation_swapped_restores_the_activation_when_the_call_raises():
    dense = L.Dense(3, activation="sigmoid")
    dense.build((None, 4))
    with pytest.raises(ValueError):
        with K.activation_swapped(dense, keras.activations.linear):
            assert dense.activation is keras.activations.linear
            dense(np.zeros((1, 5), np.float32))  # wrong input size: Keras raises
    assert dense.activation is keras.activations.sigmoid
    with pytest.raises(RuntimeError):
        with K.activation_swapped(dense, keras.activations.linear):
            raise RuntimeError
    assert dense.activation is keras.activations.sigmoid


# --------------------------------------------------------------------------- failures


def test_a_missing_functional_class_is_a_clear_error(monkeypatch, diamond):
    monkeypatch.setitem(sys.modules, "keras.src.models.functional", None)  # ImportError
    with pytest.raises(KerasInternalsError) as info:
        K.functional_graph(diamond)
    _assert_clear_error(info, "keras.src.models.functional.Functional")
    with pytest.raises(KerasInternalsError):  # not a TypeError about the model
        cam.GradCAM(diamond, "left")


def test_a_renamed_sequential_graph_is_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    try:
        object.__delattr__(model, "_functional")
    except AttributeError:  # PyTorch: a layer is a torch Module, which keeps it in _modules
        delattr(model, "_functional")
    with pytest.raises(KerasInternalsError) as info:
        K.functional_graph(model)
    _assert_clear_error(info, "Sequential._functional")


def test_renamed_graph_internals_are_clear_errors():
    class Renamed:  # what a functional model or a node would look like after a rename
        _nodes_by_depth_v2 = {}

    with pytest.raises(KerasInternalsError) as info:
        K.graph_nodes(Renamed())
    _assert_clear_error(info, "Functional._nodes_by_depth")

    class Node:
        operation = L.Dense(2)

    class Graph:
        _nodes_by_depth = {0: [Node()]}

    with pytest.raises(KerasInternalsError) as info:
        K.graph_nodes(Graph())
    _assert_clear_error(info, "Node.operation")
    with pytest.raises(KerasInternalsError) as info:
        K.fill_in_arguments(object(), {})
    _assert_clear_error(info, "SymbolicArguments.fill_in")
    with pytest.raises(KerasInternalsError) as info:
        with K.activation_swapped(L.ReLU(), keras.activations.linear):
            pass
    _assert_clear_error(info, "ReLU.activation")


def test_layer_graph_surfaces_the_error(monkeypatch, diamond):
    def broken(functional):
        raise K._broken("Functional._nodes_by_depth")

    monkeypatch.setattr("cam.graph.graph_nodes", broken)
    with pytest.raises(KerasInternalsError, match="Functional._nodes_by_depth"):
        LayerGraph.from_model(diamond)


# --------------------------------------------------------------------------- inference mode


def _split_scores(model, layer, score, x):
    split = Split(model, layer, score)
    return _np(split.head(*split.trunk(x))), _np(split.full(x))


@pytest.fixture(scope="module")
def bn_dropout_model():
    """The DenseNet-like model of conftest (randomised BatchNorm statistics, Dropout), a copy
    of its own: running it in training mode below updates its moving statistics."""
    return build_dense_concat_model(seed=4)


@pytest.mark.parametrize("mode", ["head", "full"])
@pytest.mark.parametrize("layer", ["relu0", "relu2"])  # bn1 in the head / in the trunk
def test_dropout_and_batchnorm_run_in_inference_mode(bn_dropout_model, layer, mode):
    """BatchNorm with non-trivial moving statistics and Dropout: scores and maps are those of
    model(x, training=False), deterministic, in both paths."""
    model, x = bn_dropout_model, _images((10, 10, 3), 4, seed=7)
    training = _np(model(x, training=True))  # (updates the moving statistics: call it first)
    expected = _np(model(x, training=False))
    assert not np.allclose(training, expected, atol=1e-4)
    head, full = _split_scores(model, layer, "probability", x)
    np.testing.assert_allclose(head, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-6)
    explainer = cam.GradCAM(model, layer, score="probability", mode=mode)
    first = explainer.explain(x, normalize=False, upsample=False)
    np.testing.assert_allclose(first.scores, expected, rtol=1e-5, atol=1e-6)
    again = explainer.explain(x, normalize=False, upsample=False)
    np.testing.assert_array_equal(first.raw, again.raw)
    other = cam.GradCAM(model, layer, score="probability",
                        mode="full" if mode == "head" else "head")
    np.testing.assert_allclose(raw(other, x), first.raw, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def explicit_training():
    """The same weights twice: ``model`` calls Dropout(0.5) and BatchNormalization with an
    explicit training=True (Monte-Carlo dropout style), ``clean`` has no Dropout and calls
    BatchNormalization plainly. Run in inference mode, the two are the same function."""
    keras.utils.set_random_seed(11)
    conv1, conv2 = L.Conv2D(4, 3, padding="same", name="conv1"), L.Conv2D(5, 3, name="conv2")
    bn1, bn2 = L.BatchNormalization(name="bn1"), L.BatchNormalization(name="bn2")
    relu1, relu2 = L.ReLU(name="relu1"), L.ReLU(name="relu2")
    gap, dense = L.GlobalAveragePooling2D(name="gap"), L.Dense(3, name="logits")

    inputs = keras.Input((8, 8, 3), name="image")
    x = relu1(conv1(inputs))
    x = L.Dropout(0.5, name="drop1")(x, training=True)
    x = bn1(x, training=True)
    x = relu2(conv2(x))
    x = L.Dropout(0.9, name="drop2")(x, training=True)
    x = bn2(x, training=True)
    model = keras.Model(inputs, dense(gap(x)), name="explicit_training")

    inputs = keras.Input((8, 8, 3), name="image")
    x = bn2(relu2(conv2(bn1(relu1(conv1(inputs))))))
    clean = keras.Model(inputs, dense(gap(x)), name="clean")
    randomize_batchnorm(model, seed=3)
    return model, clean


@pytest.mark.parametrize("layer", ["relu1", "relu2"])  # the Dropouts in the head / the trunk
def test_explicit_training_true_still_runs_in_inference_mode(explicit_training, layer):
    model, clean = explicit_training
    x = _images((8, 8, 3), 3, seed=5)
    # the model as written is stochastic: the explicit training=True drops units and uses
    # batch statistics (and updates the moving statistics: call it before the reference)
    as_written = _np(model(x))
    expected = _np(clean(x, training=False))
    assert not np.allclose(as_written, expected, atol=1e-4)
    head, full = _split_scores(model, layer, "logit", x)
    np.testing.assert_allclose(head, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-5)
    for mode in ("head", "full"):
        explanation = cam.GradCAM(model, layer, mode=mode).explain(x, normalize=False,
                                                                  upsample=False)
        reference = cam.GradCAM(clean, layer, mode=mode).explain(x, normalize=False,
                                                                upsample=False)
        np.testing.assert_allclose(explanation.scores, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(explanation.raw, reference.raw, rtol=1e-4, atol=1e-6)
        assert np.abs(reference.raw).max() > 1e-6  # a map, not all zeros
    ablation = cam.AblationCAM(model, layer)
    np.testing.assert_allclose(raw(ablation, x), raw(cam.AblationCAM(clean, layer), x),
                               rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- call-only layers


def test_call_intercepted_sees_and_replaces_the_output_and_restores_the_layer():
    layer = L.Dense(2, name="dense")
    x = np.ones((1, 3), np.float32)
    before = _np(layer(x))
    seen = []

    def hook(call, *args, **kwargs):
        out = call(*args, **kwargs)
        seen.append(tuple(out.shape))
        return out * 0

    with K.call_intercepted(layer, hook):
        assert np.all(_np(layer(x)) == 0)
    assert seen == [(1, 2)]
    assert "call" not in vars(layer)
    np.testing.assert_array_equal(_np(layer(x)), before)


def test_call_intercepted_reaches_a_layer_inside_a_model_call_and_restores_on_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = L.Dense(2)

        def call(self, x):
            return self.inner(x) + 1

    net, x = Net(), np.ones((1, 3), np.float32)
    net(x)

    def fail(call, *args, **kwargs):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        with K.call_intercepted(net.inner, fail):
            net(x)
    assert "call" not in vars(net.inner)
    with K.call_intercepted(net.inner, lambda call, *a, **k: call(*a, **k) * 0):
        np.testing.assert_array_equal(_np(net(x)), np.ones((1, 2)))  # nested in the call


def test_layer_attributes_are_the_sub_layers_code_set_in_order():
    class Block(L.Layer):
        def __init__(self):
            super().__init__()
            self.first = L.Dense(2)
            self.stack = [L.Dense(2), L.Dense(2)]
            self.table = {"a": L.ReLU()}
            self._private = L.ReLU()
            self.size = 3

        def call(self, x):
            return x

    block = Block()
    names = [name for name, _ in K.layer_attributes(block)]
    assert {"first", "stack", "table", "_private", "size"} <= set(names)
    assert not {"_tracker", "_layers", "name", "built"} & set(names)  # Keras' own
    ordered = [n for n in names if n in ("first", "stack", "table", "_private")]
    # torch keeps direct sub-layers apart from lists: the order holds within each kind
    assert ordered.index("stack") < ordered.index("table")
    assert ordered.index("first") < ordered.index("_private")
    assert dict(K.layer_attributes(block))["first"] is block.first


def test_built_input_shape_of_a_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = L.Dense(2)

        def call(self, x):
            return self.inner(x)

    net = Net()
    assert K.built_input_shape(net) is None
    net(np.ones((4, 3), np.float32))
    assert K.built_input_shape(net) == (4, 3)


def test_a_renamed_build_shapes_dict_is_a_clear_error():
    class Bare:
        pass

    with pytest.raises(KerasInternalsError) as info:
        K.built_input_shape(Bare())
    _assert_clear_error(info, "Layer._build_shapes_dict")
