"""Layers only a ``call`` reaches (cam.intercept): a subclassed model's layers and blocks
inside a custom layer, explained by intercepting their output during the model's own call.

The reference for every registered method is the same layer objects rebuilt as a functional
model, explained head-only through the graph split: the intercepted whole-model run must
equal it to 1e-4. Runs on whichever backend KERAS_BACKEND names (the suite runs all three).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam.intercept import InterceptedSplit, reachable
from conftest import assert_rel_close, random_images, raw

METHODS = {key: cam.method_class(key) for key in cam.METHODS}
SHAPE = (8, 8, 3)


class Net(keras.Model):
    """conv -> relu -> conv (stride 2) -> relu -> GAP -> Dense: the layers are attributes
    whose names differ from the layers' own names."""

    def __init__(self, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.c1 = L.Conv2D(4, 3, padding="same", name="conv_one")
        self.r1 = L.ReLU(name="relu_one")
        self.c2 = L.Conv2D(5, 3, strides=2, padding="same", name="conv_two")  # 4x4
        self.r2 = L.ReLU(name="relu_two")
        self.unused = L.Conv2D(2, 1, name="never_called")
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.head = L.Dense(3, activation=activation, name="logits")

    def call(self, x):
        x = self.r2(self.c2(self.r1(self.c1(x))))
        return self.head(self.gap(x))

    def functional(self) -> keras.Model:
        """The same layer objects (the same weights) as a functional model."""
        inputs = keras.Input(SHAPE)
        x = self.r2(self.c2(self.r1(self.c1(inputs))))
        return keras.Model(inputs, self.head(self.gap(x)), name=f"{self.name}_functional")


class Encoder(L.Layer):
    """A custom layer holding its blocks in a list: only its call reaches them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [L.Conv2D(4, 3, padding="same", activation="relu", name=f"block_{i}")
                       for i in range(3)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Shared(keras.Model):
    """One convolution called twice (shared weights)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(3, 3, padding="same", name="shared_conv")
        self.gap = L.GlobalAveragePooling2D()
        self.head = L.Dense(2)

    def call(self, x):
        return self.head(self.gap(self.conv(self.conv(x))))


class TokenNet(keras.Model):
    """A tiny ViT-like model: 2x2 patches of an 8x8 image (16 tokens) and a class token, one
    token-mixing block, then the classifier reads the class token (``pool="token"``) or the
    mean of every token (``pool="mean"``)."""

    def __init__(self, pool="token", **kwargs):
        super().__init__(**kwargs)
        self.pool = pool
        self.patches = L.Conv2D(6, 2, strides=2, name="patches")
        self.reshape = L.Reshape((16, 6))
        self.cls = self.add_weight(shape=(1, 1, 6), initializer="random_normal", name="cls")
        self.mix = L.Dense(6, name="mix")
        self.block = L.LayerNormalization(name="block_norm")
        self.final = L.LayerNormalization(name="final_norm")
        self.head = L.Dense(3, name="logits")

    def call(self, x):
        tokens = self.reshape(self.patches(x))
        batch = keras.ops.shape(tokens)[0]
        tokens = keras.ops.concatenate(
            [keras.ops.broadcast_to(self.cls, (batch, 1, 6)), tokens], axis=1)  # 17 tokens
        mixed = tokens + keras.ops.mean(self.mix(tokens), axis=1, keepdims=True)
        tokens = self.final(self.block(mixed))
        pooled = tokens[:, 0] if self.pool == "token" else keras.ops.mean(tokens, axis=1)
        return self.head(pooled)


def built(model):
    with warnings.catch_warnings():  # Keras warns of Net's layer that call never builds
        warnings.filterwarnings("ignore", "`build\\(\\)` was called on layer")
        model(np.zeros((1, *SHAPE), np.float32))  # a subclassed model is built by a call
    return model


@pytest.fixture(scope="module")
def net():
    keras.utils.set_random_seed(1)
    return built(Net(name="net"))


@pytest.fixture(scope="module")
def encoder_model():
    """A functional model whose custom Encoder layer is a leaf of the graph."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input(SHAPE)
    encoder = Encoder(name="encoder")
    x = L.GlobalAveragePooling2D(name="gap")(encoder(inputs))
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="with_encoder")


def images(n=2, seed=0):
    return random_images(SHAPE, n, seed)


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_on_a_subclassed_model_equals_the_functional_rebuild(net, key):
    reference = net.functional()
    explainer = METHODS[key](net, "r2")
    assert isinstance(explainer.split, InterceptedSplit) and explainer.mode == "full"
    assert explainer.whole_network
    oracle = METHODS[key](reference, "relu_two")
    assert isinstance(oracle.split, cam.Split) and oracle.mode == "head"
    x = images(3)
    full_calls = explainer._full.calls
    assert_rel_close(raw(explainer, x), raw(oracle, x))
    assert explainer._full.calls == full_calls  # the trunk pass gave the scores too
    for layer in net.layers:  # every intercepted call was put back
        assert "call" not in vars(layer)


@pytest.mark.parametrize("key", ["gradcam", "fastablationcam", "scorecam"])
def test_blocks_inside_a_custom_layer_of_a_functional_model(encoder_model, key):
    """encoder/blocks/1 is reached only inside Encoder.call; the reference chains the same
    block objects in a functional model."""
    blocks = encoder_model.get_layer("encoder").blocks
    inputs = keras.Input(SHAPE)
    x = inputs
    for block in blocks:
        x = block(x)
    x = encoder_model.get_layer("gap")(x)
    reference = keras.Model(inputs, encoder_model.get_layer("logits")(x))
    explainer = METHODS[key](encoder_model, "encoder/blocks/1")
    assert isinstance(explainer.split, InterceptedSplit)
    assert explainer.layer == "encoder/blocks/1"
    assert_rel_close(raw(explainer, images()), raw(METHODS[key](reference, "block_1"),
                                                   images()))


def test_functional_layers_keep_the_graph_split(encoder_model):
    """Interception is the fallback: a layer of the graph (Encoder itself) splits head-only."""
    explainer = cam.FastAblationCAM(encoder_model, "encoder")
    assert isinstance(explainer.split, cam.Split) and explainer.mode == "head"
    assert cam.GradCAM(encoder_model, encoder_model.get_layer("encoder")).split.head_only


# --------------------------------------------------------------------------- names


def test_names_paths_layer_names_and_layer_objects(net, encoder_model):
    assert cam.GradCAM(net, "c2").layer == "c2"
    assert cam.GradCAM(net, "conv_two").layer == "c2"  # a unique plain layer name
    assert cam.GradCAM(net, net.c2).layer == "c2"  # the Layer object
    assert cam.GradCAM(net).layer == "r2"  # None: the candidate nearest the output
    assert cam.GradCAM(net, 0).layer == "c1"
    block = encoder_model.get_layer("encoder").blocks[2]
    for name in ("encoder/blocks/2", "encoder/block_2", "block_2", block):
        assert cam.GradCAM(encoder_model, name).layer == "encoder/blocks/2"
    paths = [e.path for e in reachable(net) if not e.alias]
    assert paths == ["c1", "r1", "c2", "r2", "unused", "gap", "head"]


def test_an_unknown_name_lists_the_nearest_paths(net):
    with pytest.raises(ValueError, match="no layer named 'c3' in model 'net'") as info:
        cam.GradCAM(net, "c3")
    assert "c2" in str(info.value)


def test_layer_table_lists_call_only_layers(net, encoder_model):
    table = cam.layer_table(net)
    assert [row["layer"] for row in table] == ["c1", "r1", "c2", "r2"]
    assert [row["index"] for row in table] == [0, 1, 2, 3]
    assert all(row["note"] == "intercepted: whole model per evaluation" and
               not row["head-only"] for row in table)
    assert table[2]["grid"] == "4x4" and table[2]["output shape"] == (None, 4, 4, 5)
    assert "intercepted" in str(table)
    assert cam.candidate_layers(net) == [(row["layer"], row["output shape"]) for row in table]
    mixed = cam.layer_table(encoder_model)
    graph_rows = [row for row in mixed if row["head-only"]]
    call_rows = [row for row in mixed if not row["head-only"]]
    assert [row["layer"] for row in graph_rows] == ["encoder"]
    # blocks/2 returns the same tensor as the encoder, but only its call reaches it
    assert [row["layer"] for row in call_rows] == [f"encoder/blocks/{i}" for i in range(3)]
    assert all(row["index"] is None for row in call_rows)  # named, not indexed


def test_token_layer_of_a_subclassed_model_is_explained_on_its_patch_grid():
    keras.utils.set_random_seed(3)
    model = built(TokenNet(pool="mean", name="tokens_mean"))
    explainer = cam.FastAblationCAM(model, "block")
    assert explainer.split.target_shape == (4, 4, 6)
    assert explainer.split.tokens.prefix == 1  # the class token is carried, never ablated
    assert raw(explainer, images()).shape == (2, 4, 4)
    assert cam.layer_table(model)[-1]["grid"] == "4x4 +1 token"


class PairBlock(L.Layer):
    """A block that returns (output, None), as KerasHub's DeiT blocks do when the attention
    scores are not asked for."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 3, padding="same", activation="relu", name="pair_conv")

    def call(self, x):
        return self.conv(x), None


class PairNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = PairBlock(name="pair")
        self.gap = L.GlobalAveragePooling2D()
        self.head = L.Dense(3, name="logits")

    def call(self, x):
        y, _ = self.block(x)
        return self.head(self.gap(y))


@pytest.mark.parametrize("key", ["gradcam", "fastablationcam"])
def test_a_block_returning_its_output_and_none_is_explained_on_its_output(key):
    """The interception replaces the one tensor of (output, None), and the map equals the
    same convolution explained head-only in a functional model."""
    keras.utils.set_random_seed(10)
    model = built(PairNet(name="pair_net"))
    inputs = keras.Input(SHAPE)
    conv = model.block.conv
    reference = keras.Model(inputs, model.head(model.gap(conv(inputs))))
    explainer = METHODS[key](model, "block")
    assert explainer.split.target_shape == (8, 8, 4)
    assert_rel_close(raw(explainer, images()), raw(METHODS[key](reference, conv.name),
                                                   images()))


# --------------------------------------------------------------------------- errors


def test_a_layer_called_twice_is_refused():
    keras.utils.set_random_seed(4)
    model = built(Shared(name="shared"))
    with pytest.raises(ValueError, match=r"'conv' is called 2 times .*shared layer"):
        cam.GradCAM(model, "conv")
    assert cam.layer_table(model) == []  # no layer called once with a grid


def test_a_layer_never_called_is_refused(net):
    with pytest.raises(ValueError, match="'unused' is never called when the model runs"):
        cam.AblationCAM(net, "unused")


@pytest.mark.parametrize("layer", ["gap", "head"])
def test_a_layer_without_a_grid_is_refused(net, layer):
    with pytest.raises(ValueError, match=f"'{layer}' outputs shape .* no spatial grid"):
        cam.GradCAM(net, layer)


def test_an_unbuilt_subclassed_model_says_how_to_build_it():
    with pytest.raises(ValueError, match=r"has not been built.*model.build"):
        cam.GradCAM(Net(name="unbuilt"), "c2")


def test_logits_cannot_be_read_past_a_softmax_inside_call():
    """cam cannot remove a softmax that only the call applies: score='logit' refuses, and
    score='probability' explains the output."""
    keras.utils.set_random_seed(5)
    model = built(Net(activation="softmax", name="net_softmax"))
    with pytest.raises(ValueError, match="score='logit'.*probabilities"):
        cam.GradCAM(model, "c2")(images())
    maps = cam.GradCAM(model, "c2", score="probability")(images())
    assert maps.shape == (2, 8, 8) and np.isfinite(maps).all()


# --------------------------------------------------------------------------- no silent zeros


@pytest.mark.parametrize("key", ["gradcam", "fastablationcam", "ablationcam", "reciprocam"])
def test_a_map_the_score_does_not_depend_on_warns(key):
    """A token-pooled classifier explained at its last token layer: only the class token
    reaches the score, so every gradient and every drop of a patch token is zero."""
    keras.utils.set_random_seed(6)
    model = built(TokenNet(pool="token", name="tokens_cls"))
    with pytest.warns(cam.ZeroMapWarning, match=r"does not depend on .*\[0, 1\].*earlier "
                                                r"layer.*average"):
        result = METHODS[key](model, "final").explain(images(), normalize=False)
    if key != "reciprocam":  # ReciproCAM's map is the (unchanged) score in every cell
        assert np.abs(result.raw).max() == 0
    with warnings.catch_warnings():  # an earlier layer, or average pooling, depends on them
        warnings.simplefilter("error", cam.ZeroMapWarning)
        METHODS[key](model, "patches").explain(images())
        mean = built(TokenNet(pool="mean", name="tokens_mean_pool"))
        METHODS[key](mean, "final").explain(images())


def test_the_zero_map_warning_on_a_functional_token_pooled_model():
    """The head-only path too: the class-token classifier as a functional graph."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((17, 6))
    x = L.LayerNormalization(name="final")(L.Dense(6, name="mix")(inputs))
    outputs = L.Dense(3, name="logits")(x[:, 0])
    model = keras.Model(inputs, outputs)
    tokens = np.random.default_rng(0).standard_normal((2, 17, 6)).astype(np.float32)
    for method in (cam.GradCAM, cam.FastAblationCAM):
        explainer = method(model, "final")
        assert explainer.mode == "head"
        with pytest.warns(cam.ZeroMapWarning):
            explainer.explain(tokens, upsample=False)


def test_cam_keeps_nothing_of_a_subclassed_model_alive():
    import gc
    import weakref

    keras.utils.set_random_seed(8)
    model = built(Net(name="net_dropped"))
    cam.FastAblationCAM(model, "c2")(images())
    assert cam.cache.holds(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_the_explorer_starts_at_the_last_head_only_layer(encoder_model, net):
    """The call-only rows come after the graph's in a functional model's table: the explorer
    still starts where the graph splits (head-only), and on a subclassed model at its last."""
    from cam.widgets import explainable_rows

    rows, start = explainable_rows(cam.layer_table(encoder_model), "with_encoder")
    assert start == "encoder" and rows[-1]["layer"] == "encoder/blocks/2"
    assert explainable_rows(cam.layer_table(net), "net")[1] == "r2"


def test_a_method_with_its_own_raw_maps_keeps_it(net):
    """A method that overrides raw_maps on a template: its maps are used (and it says nothing
    about sensitivity, so it never warns)."""

    class Flat(cam.GradientExplainer):
        name = "flat"

        def raw_maps(self, images, activation, bypass, target, params, scores):
            return keras.ops.ones(keras.ops.shape(activation)[:3])

    class FlatDrops(cam.AblationExplainer):
        name = "flat drops"

        def raw_maps(self, images, activation, bypass, target, params, scores):
            return keras.ops.zeros(keras.ops.shape(activation)[:3])

    with warnings.catch_warnings():
        warnings.simplefilter("error", cam.ZeroMapWarning)
        assert np.all(raw(Flat(net, "c2"), images()) == 1)
        assert np.all(raw(FlatDrops(net, "c2"), images()) == 0)


# --------------------------------------------------------------------------- KerasHub


@pytest.fixture(scope="module")
def hub_vit():
    """KerasHub's ViT classifier built from a config (no weights): its transformer blocks
    live inside the vit_encoder layer, where only its call reaches them."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(9)
    backbone = keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=4,
                                            num_layers=2, num_heads=2, hidden_dim=8,
                                            mlp_dim=16)
    model = keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=3,
                                                preprocessor=None)
    model(np.zeros((1, 16, 16, 3), np.float32))
    return model


def test_kerashub_vit_blocks_are_intercepted_exactly(hub_vit):
    """Intercepting vit_encoder (which the graph also reaches) gives the graph split's
    activation, and replacing it gives the graph head's scores: interception is exact."""
    encoder = hub_vit.backbone.get_layer("vit_encoder")
    graph, intercepted = cam.Split(hub_vit, "vit_encoder"), InterceptedSplit(hub_vit, encoder)
    x = random_images((16, 16, 3), 2)
    activation, bypass = graph.trunk(x)
    np.testing.assert_allclose(cam.backend.numpy(intercepted.trunk(x)[0]),
                               cam.backend.numpy(activation), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cam.backend.numpy(intercepted.full(x, lambda a: a * 0.5)),
                               cam.backend.numpy(graph.head(activation * 0.5, bypass)),
                               rtol=1e-5, atol=1e-6)
    block = encoder.encoder_layers[0]
    explainer = cam.FastAblationCAM(hub_vit, block)
    assert explainer.layer.endswith("vit_encoder/encoder_layers/0")
    assert explainer.split.target_shape == (4, 4, 8) and explainer.mode == "full"
    names = cam.GradCAM(hub_vit, f"{hub_vit.backbone.name}/vit_encoder/{block.name}")
    assert names.layer == explainer.layer  # a path of layer names names it too


def test_kerashub_vit_last_block_warns_and_an_earlier_one_does_not(hub_vit):
    """The classifier reads only the class token: after the last block's attention the
    patch tokens cannot move the score."""
    encoder = hub_vit.backbone.get_layer("vit_encoder")
    x = random_images((16, 16, 3), 2)
    for method in (cam.GradCAM, cam.FastAblationCAM):
        with pytest.warns(cam.ZeroMapWarning):
            method(hub_vit, encoder.encoder_layers[-1]).explain(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", cam.ZeroMapWarning)
            method(hub_vit, encoder.encoder_layers[0]).explain(x)
