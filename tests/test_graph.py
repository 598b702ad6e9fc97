"""cam.graph: candidate layers, layer lookup, and the trunk/head split against model(x)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam.graph import Split, needed_calls
from cam.layers import LayerTable


def _np(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


def assert_rel_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.fixture(scope="module")
def pyramid():
    """conv1, relu1 (8x8) -> pool1 (4x4) -> conv2, relu2 -> pool2 (2x2) -> pool3 (1x1) ->
    flatten -> dense -> out. Only the first six have a spatial grid."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = L.ReLU(name="relu1")(x)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(5, 3, padding="same", name="conv2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.MaxPooling2D(2, name="pool2")(x)
    x = L.MaxPooling2D(2, name="pool3")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(6, name="dense")(x)
    outputs = L.Dense(3, name="out")(x)
    return keras.Model(inputs, outputs, name="pyramid")


PYRAMID_CANDIDATES = [
    ("conv1", (None, 8, 8, 4)),
    ("relu1", (None, 8, 8, 4)),
    ("pool1", (None, 4, 4, 4)),
    ("conv2", (None, 4, 4, 5)),
    ("relu2", (None, 4, 4, 5)),
    ("pool2", (None, 2, 2, 5)),
]


# --------------------------------------------------------------------------- candidates


def test_candidate_layers_order_and_contents(pyramid):
    found = cam.candidate_layers(pyramid)
    assert [(n, tuple(s)) for n, s in found] == PYRAMID_CANDIDATES
    names = [n for n, _ in found]
    for excluded in ("image", "pool3", "flatten", "dense", "out"):
        assert excluded not in names


def test_candidate_layers_of_nested_model_use_plain_names(nested_backbone_model):
    names = [n for n, _ in cam.candidate_layers(nested_backbone_model)]
    # the backbone's inner layers come before anything after the backbone
    for inner in ("conv_a", "relu_a", "conv_b", "relu_b"):
        assert inner in names
    assert names.index("conv_a") < names.index("relu_a") < names.index("relu_b")
    assert "gap" not in names and "logits" not in names


def test_candidate_layers_non_square(non_square_model):
    found = dict(cam.candidate_layers(non_square_model))
    assert tuple(found["relu2"]) == (None, 6, 8, 5)


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize(
    "layer, expected",
    [
        ("relu1", "relu1"),
        ("pool2", "pool2"),
        (0, "conv1"),
        (2, "pool1"),
        (5, "pool2"),
        (-1, "pool2"),
        (-6, "conv1"),
        (-2, "relu2"),
        (None, "pool2"),  # None: the last candidate, the one nearest the output
    ],
)
def test_resolve_layer(pyramid, layer, expected):
    split = Split(pyramid, layer)
    assert split.layer == expected
    assert split.target_shape == dict(PYRAMID_CANDIDATES)[expected][1:]


def test_resolve_unknown_name_lists_close_candidates(pyramid):
    with pytest.raises(ValueError, match="no layer named 'relu_2'") as info:
        Split(pyramid, "relu_2")
    assert "relu2" in str(info.value)


def test_resolve_unknown_name_without_close_match_still_lists_candidates(pyramid):
    with pytest.raises(ValueError, match="closest candidate layers") as info:
        Split(pyramid, "zzzzzz")
    assert "pool2" in str(info.value)  # falls back to the candidates nearest the output


@pytest.mark.parametrize("layer", ["flatten", "dense", "pool3"])
def test_resolve_layer_without_grid_says_why(pyramid, layer):
    with pytest.raises(ValueError, match="no spatial grid") as info:
        Split(pyramid, layer)
    message = str(info.value)
    assert repr(layer) in message
    assert "(batch, h, w, channels)" in message


@pytest.mark.parametrize("index", [6, 100, -7])
def test_resolve_index_out_of_range(pyramid, index):
    with pytest.raises(ValueError, match=f"layer index {index} is out of range"):
        Split(pyramid, index)


@pytest.mark.parametrize("layer", [1.5, True, ["relu1"]])
def test_resolve_wrong_type(pyramid, layer):
    with pytest.raises(TypeError, match="layer must be a name, an index or None"):
        Split(pyramid, layer)


@pytest.fixture(scope="module")
def twin_backbones():
    """Two nested backbones, each with layers named conv_a, relu_a, ...: plain names clash."""
    a = cam_backbone("bb_a", seed=2)
    b = cam_backbone("bb_b", seed=3)
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.Concatenate(name="cat")([a(inputs), b(inputs)])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="twins")


def cam_backbone(name, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(3, 3, strides=2, padding="same", name="conv_a")(inputs)
    x = L.ReLU(name="relu_a")(x)
    return keras.Model(inputs, x, name=name)


def test_resolve_ambiguous_name(twin_backbones):
    with pytest.raises(ValueError, match="ambiguous") as info:
        Split(twin_backbones, "relu_a")
    assert "bb_a/relu_a" in str(info.value) and "bb_b/relu_a" in str(info.value)
    # the qualified name picks one; candidate_layers lists the qualified names
    assert Split(twin_backbones, "bb_b/relu_a").layer == "bb_b/relu_a"
    names = [n for n, _ in cam.candidate_layers(twin_backbones)]
    assert "bb_a/relu_a" in names and "bb_b/relu_a" in names and "relu_a" not in names


def test_split_twin_backbone_head_matches_model(twin_backbones):
    x = np.random.default_rng(0).standard_normal((2, 10, 10, 3)).astype(np.float32)
    split = Split(twin_backbones, "bb_a/relu_a")
    assert len(split.bypass) == 1  # the other backbone's output
    assert_rel_close(_np(split.head(*split.trunk(x))), _np(twin_backbones(x)))


def test_unbuilt_sequential_is_rejected():
    model = keras.Sequential([L.Conv2D(2, 3), L.GlobalAveragePooling2D(), L.Dense(2)])
    with pytest.raises(TypeError, match="not a functional or Sequential"):
        Split(model, None)


def test_a_multi_output_model_splits_into_every_output(tiny_sequential):
    """Each output is computed by the head (or carried past the cut when the layer does not
    reach it); cam.targets.Output picks the one to explain."""
    inputs = keras.Input((10, 10, 3))
    out = tiny_sequential(inputs)
    side = L.GlobalAveragePooling2D(name="side")(L.Conv2D(2, 1, name="side_conv")(inputs))
    model = keras.Model(inputs, [out, out * 2.0, side])
    split = Split(model, "relu2")
    assert len(split.outputs) == 3 and split.num_classes is None
    x = np.random.default_rng(0).standard_normal((2, 10, 10, 3)).astype(np.float32)
    activation, bypass = split.trunk(x)
    for got, want in zip(split.head(activation, bypass), model(x)):
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- head == model


def test_head_of_trunk_equals_model(case):
    """head(trunk(x)) == model(x) == full(x) on every model shape."""
    model, x = case.model, case.images(3, seed=1)
    # the concat model ends in softmax: its model(x) are probabilities
    score = "probability" if case.name == "dense_concat_model" else "logit"
    split = Split(model, case.layer, score)
    assert split.layer.rsplit("/", 1)[-1] == case.layer
    assert split.target_shape[:2] == case.grid
    activation, bypass = split.trunk(x)
    assert tuple(activation.shape) == (3, *split.target_shape)
    expected = _np(model(x, training=False))
    assert_rel_close(_np(split.head(activation, bypass)), expected)
    assert_rel_close(_np(split.full(x)), expected)
    # training=False is honoured: with Dropout/BatchNorm in training mode the output differs
    if case.name == "dense_concat_model":
        assert not np.allclose(_np(model(x, training=True)), expected, atol=1e-4)


def test_bypass_only_when_the_target_is_carried_past(case):
    split = Split(case.model, case.layer)
    if case.bypassed:
        assert split.bypass, "a concatenation/addition reads an earlier tensor: it must bypass"
        # DenseNet concat and ResNet add both carry the 5x5x4 tensor feeding the target's conv
        assert split.bypass_shapes == [(5, 5, 4)]
    else:
        assert split.bypass == []
        assert split.bypass_shapes == []


def test_bypass_is_the_tensor_before_the_target(dense_concat_model, residual_add_model):
    x = np.random.default_rng(2).standard_normal((2, 10, 10, 3)).astype(np.float32)
    for model, before in ((dense_concat_model, "relu0"), (residual_add_model, "relu_in")):
        split = Split(model, "relu1" if before == "relu0" else "relu_a")
        _, bypass = split.trunk(x)
        reference = keras.Model(model.input, model.get_layer(before).output)(x)
        np.testing.assert_allclose(_np(bypass[0]), _np(reference), rtol=1e-5, atol=1e-6)


def test_head_on_a_changed_activation_equals_full_with_replace(case):
    """What ablations rely on: head(f(T), bypass) == full(x, replace=f)."""
    x = case.images(2, seed=3)
    split = Split(case.model, case.layer)
    activation, bypass = split.trunk(x)

    def f(t):
        return t * 0.5 + 0.25

    head = _np(split.head(f(activation), bypass))
    full = _np(split.full(x, replace=f))
    assert_rel_close(head, full)
    assert not np.allclose(head, _np(split.head(activation, bypass)), atol=1e-6)


def test_nested_backbone_target_by_plain_name(nested_backbone_model):
    split = Split(nested_backbone_model, "relu_a")
    assert split.layer == "backbone/relu_a"
    # the rescaling outside the backbone is in the trunk, everything after relu_a in the head
    x = np.random.default_rng(4).standard_normal((2, 10, 10, 3)).astype(np.float32)
    backbone = nested_backbone_model.get_layer("backbone")
    relu_a = keras.Model(backbone.input, backbone.get_layer("relu_a").output)
    activation, _ = split.trunk(x)
    np.testing.assert_allclose(_np(activation), _np(relu_a(x * 0.5 + 0.1)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- scores


def _features(model, x, layer="gap"):
    return _np(keras.Model(model.input, model.get_layer(layer).output)(x))


def test_logit_of_softmax_dense_is_pre_softmax(gap_head_softmax_model, images_like):
    model, x = gap_head_softmax_model, images_like(gap_head_softmax_model, 3)
    dense = model.get_layer("logits")
    kernel, bias = (w.numpy() for w in dense.weights)
    expected = _features(model, x) @ kernel + bias
    split = Split(model, "relu", "logit")
    assert split.output_activation == "softmax"
    logits = _np(split.head(*split.trunk(x)))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(split.full(x)), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits.sum(axis=1), 1.0, atol=1e-3)
    # the model itself is untouched: still softmax, still sums to one
    assert dense.activation is keras.activations.softmax
    probabilities = _np(model(x))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, _np(keras.ops.softmax(expected)), rtol=1e-5,
                               atol=1e-6)
    # and the probability score gives the model's output
    prob = Split(model, "relu", "probability")
    np.testing.assert_allclose(_np(prob.head(*prob.trunk(x))), probabilities, rtol=1e-5,
                               atol=1e-7)


def test_logit_of_sigmoid_dense_is_pre_sigmoid():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, activation="sigmoid", name="out")(x)
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(5).standard_normal((2, 6, 6, 2)).astype(np.float32)
    kernel, bias = (w.numpy() for w in model.get_layer("out").weights)
    split = Split(model, "conv", "logit")
    assert split.output_activation == "sigmoid"
    np.testing.assert_allclose(_np(split.head(*split.trunk(images))),
                               _features(model, images) @ kernel + bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("final", ["activation", "softmax_layer", "ops_softmax",
                                   "dense_softmax_then_linear"])
def test_logit_with_separate_softmax_layer(final):
    keras.utils.set_random_seed(6)
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    if final == "dense_softmax_then_linear":  # the mixed-precision idiom: a float32 cast last
        dense = L.Dense(3, activation="softmax", name="dense")
        logits = keras.Model(inputs, dense(x)).output  # built; logits computed by hand below
        model = keras.Model(inputs, L.Activation("linear", dtype="float32", name="act")(logits))
        kernel, bias = (w.numpy() for w in dense.weights)
        expected = _np(keras.Model(inputs, x)(np.zeros((1, 6, 6, 3), np.float32)))  # shape only
    else:
        logits = L.Dense(3, name="dense")(x)
        if final == "ops_softmax":
            model = keras.Model(inputs, keras.ops.softmax(logits))
        else:
            head = L.Activation("softmax", name="act") if final == "activation" \
                else L.Softmax(name="act")
            model = keras.Model(inputs, head(logits))
    images = np.random.default_rng(6).standard_normal((2, 6, 6, 3)).astype(np.float32)
    if final == "dense_softmax_then_linear":
        expected = _np(keras.Model(inputs, x)(images)) @ kernel + bias
    else:
        expected = _np(keras.Model(inputs, logits)(images))
    split = Split(model, "relu", "logit")
    assert split.output_activation == "softmax"
    np.testing.assert_allclose(_np(split.head(*split.trunk(images))), expected, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(_np(split.full(images)), expected, rtol=1e-5, atol=1e-6)
    assert split.num_classes == 3
    prob = Split(model, "relu", "probability")
    np.testing.assert_allclose(_np(prob.head(*prob.trunk(images))), _np(model(images)),
                               rtol=1e-5, atol=1e-7)


def test_probability_without_softmax_raises(gap_head_model):
    with pytest.raises(ValueError, match="score='probability' needs a model whose last layer"):
        Split(gap_head_model, "relu", "probability")


@pytest.mark.parametrize("score", ["prob", "logits", None, "LOGIT"])
def test_invalid_score_raises(gap_head_model, score):
    with pytest.raises(ValueError, match="score must be 'logit' or 'probability'"):
        Split(gap_head_model, "relu", score)


class _HiddenSoftmaxHead(keras.layers.Layer):
    """A custom layer that applies softmax inside, where cam cannot see it."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], 3), initializer="glorot_uniform")

    def call(self, x):
        return keras.ops.softmax(keras.ops.matmul(x, self.w))


def test_hidden_softmax_is_refused_rather_than_explained_as_logits():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="relu")(inputs)
    model = keras.Model(inputs, _HiddenSoftmaxHead(name="hidden_head")(L.GlobalAveragePooling2D()(x)))
    images = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="sum to 1 like probabilities"):
        cam.GradCAM(model, "relu")(images)


def test_a_segmentation_output_splits_but_has_no_classes_to_predict():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="seg")(x))
    split = Split(model, "conv")
    assert split.num_classes is None and split.output_shapes == [(None, 6, 6, 2)]
    with pytest.raises(ValueError, match=r"needs a \(batch, classes\) output"):
        cam.GradCAM(model, "conv")(np.zeros((1, 6, 6, 3), np.float32))


# --------------------------------------------------------------------------- layer table


def test_layer_table_rows_str_and_frame(pyramid):
    table = cam.layer_table(pyramid)
    assert isinstance(table, list) and isinstance(table, LayerTable)
    assert [r["index"] for r in table] == list(range(len(PYRAMID_CANDIDATES)))
    assert [(r["layer"], tuple(r["output shape"])) for r in table] == PYRAMID_CANDIDATES
    assert all(list(r) == list(table.columns) for r in table)
    relu2 = table[4]
    assert relu2["grid"] == "4x4" and relu2["head-only"] is True and relu2["note"] == ""
    head, total = (int(v) for v in relu2["head layers"].split("/"))
    assert head == len(Split(pyramid, "relu2").head_calls) and total == 10
    lines = str(table).splitlines()
    assert lines[0].split() == ["layer", "output", "shape", "grid", "head-only", "head",
                                "layers", "note"]
    assert len(lines) == 1 + len(PYRAMID_CANDIDATES)
    assert lines[5].split()[:2] == ["4", "relu2"] and " (None, 4, 4, 5) " in lines[5]
    assert lines[5].rstrip().endswith("True  " + relu2["head layers"].rjust(11))
    # columns line up: every row's layer name starts where the header's "layer" does
    start = lines[0].index("layer")
    assert all(line[start:].split()[0] == name
               for line, (name, _) in zip(lines[1:], PYRAMID_CANDIDATES))
    frame = table.to_frame()
    assert frame.index.name == "index" and list(frame.index) == list(range(6))
    assert list(frame.columns) == ["layer", "output shape", "grid", "head-only", "head layers",
                                   "note"]
    assert frame.loc[4, "layer"] == "relu2" and frame.loc[4, "head layers"] == \
        relu2["head layers"]


def test_layer_table_splits_two_outputs_and_notes_two_inputs(tiny_sequential):
    inputs = keras.Input((10, 10, 3))
    out = tiny_sequential(inputs)
    two_outputs = keras.Model(inputs, [out, out * 2.0])  # cam.targets.Output picks one
    assert all(r["head-only"] is True for r in cam.layer_table(two_outputs) if r["grid"])
    other = keras.Input((10, 10, 3))
    two_inputs = keras.Model([inputs, other], tiny_sequential(inputs + other))
    table = cam.layer_table(two_inputs)
    assert table and all(r["head-only"] is False and r["grid"] == "" for r in table)
    assert all("2 inputs" in r["note"] for r in table)
    assert "2 inputs" in str(table)


def test_needed_calls_keeps_only_what_the_wanted_keys_need(residual_add_model):
    split = Split(residual_add_model, "relu_a")
    names = [c.name for c in needed_calls(split.graph.calls, {split.target})]
    assert names == ["conv_in", "relu_in", "conv_a", "relu_a"]
    # keys nobody in the list produces (here the target, given to the head) are taken as given
    assert [c.name for c in needed_calls(split.head_calls, {split.outputs[0]})] == \
        [c.name for c in split.head_calls] == ["conv_b", "add", "relu_out", "gap", "logits"]
    assert needed_calls(split.graph.calls, set()) == []
