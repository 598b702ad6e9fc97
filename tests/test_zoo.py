"""The project's own zoo: one small member of every ``keras.applications`` family in the
installed Keras, the KerasHub image backbones that build offline from a config, and a
subclassed ``keras.Model``, all with random weights (``weights=None``, nothing downloaded)
on small images.

For each, Grad-CAM and FastAblationCAM at the last feature map and at one internal block
equal a whole-network reference to 1e-4 on the map's scale:

* a layer of the functional graph (head-only) against the same explainer with
  ``mode="full"``;
* a layer only a ``call`` reaches (intercepted: a transformer block inside an encoder layer, a
  subclassed model's attribute) against the same layer objects chained as a functional
  model, explained head-only through the graph split.

The zoo is data (:data:`ZOO`): each family runs on one backend (:attr:`Family.backend`) and
is skipped on the other two with a reason naming the backend that covers it, so the union of
the three suites (``make test`` runs the library's tests on TensorFlow, JAX and PyTorch)
covers every family within the test budget. docs/usage.md's "Which models" table is
generated from it (``python tests/test_zoo.py --table`` prints it, ``--write`` puts it in
place) and a test keeps the two equal.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers as L  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")
METHODS = ("GradCAM", "FastAblationCAM")


@dataclass(frozen=True)
class Probe:
    """One layer to explain: ``layer`` (a name, or a function of the model giving the Layer
    object), how cam explains it (``"head-only"``: the graph split; ``"intercepted"``: only a
    call reaches it), ``reshape`` for token layers, and for an intercepted layer
    ``reference(model) -> (functional model, layer name)``: the same layer objects chained
    as a functional graph, where the layer splits head-only."""

    label: str
    layer: Any
    how: str = "head-only"
    reshape: Any = None
    reference: Callable | None = None


@dataclass(frozen=True)
class Family:
    """A family of models: where it comes from (``source``), the member built (``member``),
    its ``build`` function, the last feature map and an internal block (``probes``), and the
    ``backend`` whose suite runs it."""

    name: str
    source: str
    member: str
    build: Callable[[], keras.Model]
    probes: tuple
    backend: str
    modules: tuple = field(default=())  # the keras.applications modules it stands for


# --------------------------------------------------------------------------- keras.applications


def application(constructor: str, size: int, **options) -> Callable[[], keras.Model]:
    """A keras.applications model with random weights, its classifier on three classes."""

    def build():
        return getattr(keras.applications, constructor)(
            weights=None, input_shape=(size, size, 3), classes=3, **options)

    return build


def builder(module: str, function: str, size: int, **options) -> Callable[[], keras.Model]:
    """A family's own builder (the function behind its public members, in
    ``keras.src.applications.<module>``) at a reduced depth or width: the same blocks and
    wiring as the members, in far fewer layers (what tracing the whole network costs)."""

    def build():
        import importlib

        make = getattr(importlib.import_module(f"keras.src.applications.{module}"), function)
        return make(weights=None, input_shape=(size, size, 3), classes=3, **options)

    return build


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if not callable(v))


def apps(family, constructor, size, last, internal, backend, modules, **options) -> Family:
    """A public keras.applications member."""
    member = f"`{constructor}({_options(options)})`, {size} px"
    return Family(family, "keras.applications", member, application(constructor, size, **options),
                  (_probe(last), _probe(internal)), backend, modules=tuple(modules))


def reduced(family, module, function, size, last, internal, backend, modules, shown,
            **options) -> Family:
    """A keras.applications family built by its own builder at a reduced size."""
    member = f"`{module}.{function}`: {shown}, {size} px"
    return Family(family, "keras.applications", member, builder(module, function, size, **options),
                  (_probe(last), _probe(internal)), backend, modules=tuple(modules))


def _probe(layer) -> Probe:
    """A layer of the graph; an int indexes ``cam.layer_table`` (for a layer Keras names by
    a global counter, ``add_3``, whose name depends on what was built before)."""
    if isinstance(layer, int):
        return Probe(f"`layer={layer}` (the last in `cam.layer_table`)", layer)
    return Probe(f"`{layer}`", layer)


def _resnet_stacks(version: int) -> Callable:
    """ResNet's four stacks (conv2..conv5) as ResNet50 and ResNet50V2 wire them, at 16..128
    filters, one residual block each (v1) or two (v2, whose stack strides in its last)."""

    def stack_fn(x):
        from keras.src.applications import resnet

        if version == 1:
            for i, filters in enumerate((16, 32, 64, 128)):
                x = resnet.stack_residual_blocks_v1(x, filters, 1, stride1=1 if i == 0 else 2,
                                                    name=f"conv{i + 2}")
            return x
        for i, filters in enumerate((16, 32, 64, 128)):
            x = resnet.stack_residual_blocks_v2(x, filters, 2, stride1=1 if i == 3 else 2,
                                                name=f"conv{i + 2}")
        return x

    return stack_fn


def _mobilenet_v3_stack(x, kernel, activation, se_ratio):
    """Six of MobileNetV3Small's eleven inverted residual blocks (ids kept): every stride,
    squeeze-excite, both activations, and two residual adds."""
    from keras.src.applications.mobilenet_v3 import _inverted_res_block, relu

    x = _inverted_res_block(x, 1, 16, 3, 2, se_ratio, relu, 0)
    x = _inverted_res_block(x, 72.0 / 16, 24, 3, 2, None, relu, 1)
    x = _inverted_res_block(x, 4, 40, kernel, 2, se_ratio, activation, 3)
    x = _inverted_res_block(x, 6, 40, kernel, 1, se_ratio, activation, 4)
    x = _inverted_res_block(x, 6, 96, kernel, 2, se_ratio, activation, 8)
    return _inverted_res_block(x, 6, 96, kernel, 1, se_ratio, activation, 9)


def small_inception_resnet() -> keras.Model:
    """InceptionResNetV2 has no builder to shrink (its 782 layers cost a minute to trace), so
    this chains its module's own blocks as its function does, one of each kind: a stem,
    block35, a reduction (mixed_6a), block17, a reduction (mixed_7a), block8 and the final
    block8 without activation, conv_7b, then pooling and Dense(3)."""
    from keras.src.applications.inception_resnet_v2 import conv2d_bn, inception_resnet_block

    inputs = keras.Input((64, 64, 3))
    x = conv2d_bn(inputs, 32, 3, strides=2, padding="valid")  # 31x31
    x = L.MaxPooling2D(3, strides=2)(x)  # 15x15
    x = inception_resnet_block(x, scale=0.17, block_type="block35", block_idx=1)
    x = L.Concatenate(name="mixed_6a")([conv2d_bn(x, 32, 3, strides=2, padding="valid"),
                                        L.MaxPooling2D(3, strides=2)(x)])  # 7x7
    x = inception_resnet_block(x, scale=0.1, block_type="block17", block_idx=1)
    x = L.Concatenate(name="mixed_7a")([conv2d_bn(x, 32, 3, strides=2, padding="valid"),
                                        L.MaxPooling2D(3, strides=2)(x)])  # 3x3
    x = inception_resnet_block(x, scale=0.2, block_type="block8", block_idx=1)
    x = inception_resnet_block(x, scale=1.0, activation=None, block_type="block8",
                               block_idx=10)
    x = conv2d_bn(x, 64, 1, name="conv_7b")
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, L.Dense(3, name="predictions")(x), name="inception_resnet")


# --------------------------------------------------------------------------- KerasHub


def classifier(backbone, tokens: bool = False, name: str = "classifier") -> keras.Model:
    """A backbone (which has no classifier) with a small head: global average pooling of its
    grid (or of every token, so the patch tokens reach the score) and Dense(3) logits."""
    inputs = keras.Input(backbone.input_shape[1:] if not isinstance(backbone.input, dict)
                         else backbone.input["images"].shape[1:], name="image")
    x = backbone(inputs)
    x = L.GlobalAveragePooling1D(name="gap")(x) if tokens else \
        L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name=name)


def hub():
    return pytest.importorskip("keras_hub")


def hub_resnet():
    return classifier(hub().models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16, 16, 16], stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        image_shape=(64, 64, 3), name="resnet"))


def hub_efficientnet():
    return classifier(hub().models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3], stackwise_num_repeats=[1, 1, 1],
        stackwise_input_filters=[8, 8, 16], stackwise_output_filters=[8, 16, 24],
        stackwise_expansion_ratios=[1, 4, 4], stackwise_squeeze_and_excite_ratios=[0, 0.25, 0.25],
        stackwise_strides=[2, 2, 2], stackwise_block_types=["fused", "unfused", "unfused"],
        stackwise_force_input_filters=[0] * 3, stackwise_nores_option=[False] * 3,
        width_coefficient=1.0, depth_coefficient=1.0, num_features=32,
        input_shape=(64, 64, 3), name="efficientnet"))


def hub_mobilenet():
    return classifier(hub().models.MobileNetBackbone(
        stackwise_expansion=[[1, 4], [4]], stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[8, 8], [16]], stackwise_kernel_size=[[3, 3], [5]],
        stackwise_num_strides=[[2, 1], [2]], stackwise_se_ratio=[[None, 0.25], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [2]], output_num_filters=32, depthwise_filters=8,
        depthwise_stride=2, depthwise_residual=False, last_layer_filter=32,
        squeeze_and_excite=0.5, image_shape=(64, 64, 3), name="mobilenet"))


def hub_cspnet():
    return classifier(hub().models.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=2, stackwise_depth=[1, 1, 1],
        stackwise_strides=2, stackwise_num_filters=[8, 16, 32], down_growth=True,
        bottle_ratio=(0.5,) + (1.0,), block_ratio=(1.0,) + (0.5,),
        expand_ratio=(2.0,) + (1.0,), block_type="dark_block", stage_type="csp",
        stem_padding="same", image_shape=(64, 64, 3), name="cspnet"))


def hub_densenet():
    return classifier(hub().models.DenseNetBackbone(
        stackwise_num_repeats=[1, 1, 1, 1], growth_rate=8, image_shape=(64, 64, 3),
        name="densenet"))


def hub_vit():
    return classifier(hub().models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=8,
        mlp_dim=16, name="vit"), tokens=True)


def hub_deit():
    return classifier(hub().models.DeiTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, name="deit"), tokens=True)


def hub_dinov2():
    return classifier(hub().models.DINOV2Backbone(
        patch_size=4, num_layers=2, hidden_dim=8, num_heads=2, intermediate_dim=16,
        num_register_tokens=2, image_shape=(16, 16, 3), position_embedding_shape=(16, 16, 3),
        name="dinov2"), tokens=True)


def hub_swin():
    return classifier(hub().models.SwinTransformerBackbone(
        image_shape=(32, 32, 3), embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4,
        patch_size=4, drop_path=0.0, name="swin"), tokens=True)


def block(encoder: str, attribute: str, index: int) -> Callable:
    """The ``index``-th transformer block held in ``attribute`` of the backbone's ``encoder``
    layer (only the encoder's call reaches it)."""
    return lambda model: getattr(_backbone(model).get_layer(encoder), attribute)[index]


def _backbone(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def unrolled(embed: Callable, blocks: Callable, finish: Callable,
             first_output: bool = False) -> Callable:
    """The reference for a block inside an encoder: ``embed(backbone, images)``, every block
    of ``blocks(backbone)`` in turn as a node of a functional graph, ``finish(backbone, x)``,
    then the classifier's own pooling and Dense layers."""

    def reference(model, layer):
        backbone = _backbone(model)
        inputs = keras.Input(model.input_shape[1:])
        x = embed(backbone, inputs)
        name = None
        for each in blocks(backbone):
            node = FirstOutput(each) if first_output else each
            x = node(x)
            name = node.name if each is layer else name
        x = finish(backbone, x)
        outputs = model.get_layer("logits")(model.get_layer("gap")(x))
        return keras.Model(inputs, outputs, name=f"{model.name}_unrolled"), name

    return reference


class FirstOutput(L.Layer):
    """A block whose call returns (output, None) (DeiT's: the attention scores it was not
    asked for), as a graph node of its output alone: Keras cannot trace a None output."""

    def __init__(self, block, **kwargs):
        super().__init__(name=f"{block.name}_output", **kwargs)
        self.block = block

    def call(self, x):
        return self.block(x)[0]


def _vit_embed(backbone, inputs):
    return backbone.get_layer("vit_patching_and_embedding")(inputs)


def _vit_finish(backbone, x):
    return backbone.get_layer("vit_encoder").layer_norm(x)


VIT_REFERENCE = unrolled(_vit_embed, lambda b: b.get_layer("vit_encoder").encoder_layers,
                         _vit_finish)
DEIT_REFERENCE = unrolled(
    lambda b, x: b.get_layer("deit_patching_and_embedding")(x),
    lambda b: b.get_layer("deit_encoder").encoder_layers,
    lambda b, x: b.get_layer("deit_encoder").layer_norm(x),
    first_output=True)
DINOV2_REFERENCE = unrolled(
    lambda b, x: b.get_layer("dinov2_embeddings")(x),
    lambda b: b.get_layer("dinov2_encoder").layers,
    lambda b, x: b.get_layer("dinov2_layernorm")(x))


# --------------------------------------------------------------------------- subclassed


class Net(keras.Model):
    """A subclassed model: a stem, two residual stages and a classifier, layers held as
    attributes (and a list), reached only through ``call``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")
        self.stages = [L.Conv2D(8, 3, padding="same", activation="relu", name="stage_0"),
                       L.Conv2D(16, 3, strides=2, padding="same", activation="relu",
                                name="stage_1")]
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.head = L.Dense(3, name="logits")

    def call(self, x):
        x = self.stem(x)
        x = x + self.stages[0](x)
        x = self.stages[1](x)
        return self.head(self.gap(x))

    def functional(self) -> keras.Model:
        """The same layer objects (the same weights) as a functional graph."""
        inputs = keras.Input((16, 16, 3))
        x = self.stem(inputs)
        x = L.Add()([x, self.stages[0](x)])
        x = self.stages[1](x)
        return keras.Model(inputs, self.head(self.gap(x)), name="net_functional")


def subclassed():
    net = Net(name="net")
    net(np.zeros((1, 16, 16, 3), np.float32))  # a subclassed model is built by a call
    return net


def net_reference(model, layer):
    return model.functional(), layer.name


# --------------------------------------------------------------------------- the zoo


def _attr(path: str) -> Callable:
    return lambda model: path


ZOO: list[Family] = [
    # keras.applications: every module of the installed Keras, one small member each, or
    # where every member is deep, the family's own builder at a reduced depth
    reduced("ResNet", "resnet", "ResNet", 64, "conv5_block1_out", "conv4_block1_out",
            "tensorflow", ["resnet", "resnet50"],
            "ResNet50's stacks, 1 block each, 16-128 filters",
            stack_fn=_resnet_stacks(1), preact=False, use_bias=True),
    reduced("ResNetV2", "resnet", "ResNet", 64, "post_relu", "conv4_block2_out", "torch",
            ["resnet_v2"], "ResNet50V2's stacks, 2 blocks each, 16-128 filters",
            stack_fn=_resnet_stacks(2), preact=True, use_bias=True),
    apps("VGG", "VGG16", 32, "block5_conv3", "block5_conv1", "torch", ["vgg16", "vgg19"]),
    apps("Xception", "Xception", 71, "block14_sepconv2_act", "block13_sepconv2_act",
         "tensorflow", ["xception"]),
    apps("InceptionV3", "InceptionV3", 107, "mixed10", "mixed9", "tensorflow", ["inception_v3"]),
    Family("InceptionResNetV2", "keras.applications", "`inception_resnet_v2`'s own blocks "
           "(`conv2d_bn`, `inception_resnet_block`): one block35, block17 and two block8, "
           "64 px", small_inception_resnet,
           (_probe("conv_7b_ac"), _probe("block8_1_ac")), "tensorflow",
           modules=("inception_resnet_v2",)),
    apps("MobileNet", "MobileNet", 64, "conv_pw_13_relu", "conv_pw_11_relu", "torch",
         ["mobilenet"], alpha=0.25),
    apps("MobileNetV2", "MobileNetV2", 64, "out_relu", "block_15_add", "torch", ["mobilenet_v2"],
         alpha=0.35),
    reduced("MobileNetV3", "mobilenet_v3", "MobileNetV3", 64, -1, "expanded_conv_4_add",
            "torch", ["mobilenet_v3"], "MobileNetV3Small's blocks 0, 1, 3, 4, 8, 9",
            stack_fn=_mobilenet_v3_stack, last_point_ch=256, model_type="small"),
    reduced("DenseNet", "densenet", "DenseNet", 64, "relu", "pool4_relu", "tensorflow",
            ["densenet"], "DenseNet121's blocks, 1-1-1-1 layers", blocks=[1, 1, 1, 1]),
    reduced("NASNet", "nasnet", "NASNet", 64, "normal_concat_3", "reduction_concat_reduce_2",
            "torch", ["nasnet"], "NASNetMobile's cells, 1 per stack, 96 filters",
            penultimate_filters=96, num_blocks=1, stem_block_filters=8, default_size=64),
    reduced("EfficientNet", "efficientnet", "EfficientNet", 64, "top_activation",
            "block5a_expand_activation", "torch", ["efficientnet"],
            "B0's blocks, 1 each, width 0.25", width_coefficient=0.25,
            depth_coefficient=0.1, default_size=64),
    reduced("EfficientNetV2", "efficientnet_v2", "EfficientNetV2", 64, "top_activation",
            "block5a_expand_activation", "tensorflow", ["efficientnet_v2"],
            "V2-B0's blocks, 1 each, width 0.25",
            width_coefficient=0.25, depth_coefficient=0.1, default_size=64,
            name="efficientnetv2-b0"),
    reduced("ConvNeXt", "convnext", "ConvNeXt", 64, -1, "convnext_stage_2_block_0_identity",
            "jax", ["convnext"], "1 block per stage, 8-64 channels", depths=[1, 1, 1, 1],
            projection_dims=[8, 16, 32, 64], layer_scale_init_value=1.0, default_size=64,
            name="convnext"),
    # KerasHub backbones built from a config, with a pooling + Dense head
    Family("ResNet", "KerasHub", "ResNetBackbone (basic blocks 1-1-1-1), 64 px", hub_resnet,
           (Probe("`stack3_block0_out`", "stack3_block0_out"),
            Probe("`stack2_block0_out`", "stack2_block0_out")), "torch"),
    Family("EfficientNet", "KerasHub", "EfficientNetBackbone (3 stages), 64 px",
           hub_efficientnet, (Probe("`top_activation`", "top_activation"),
                              Probe("`block2a_`", "block2a_")),
           "tensorflow"),
    Family("MobileNet", "KerasHub", "MobileNetBackbone (v3 blocks 2-1), 64 px", hub_mobilenet,
           (Probe("`block_3_0`", "block_3_0"), Probe("`block_1_1`", "block_1_1")), "jax"),
    Family("CSPNet", "KerasHub", "CSPNetBackbone (dark blocks 1-1-1), 64 px", hub_cspnet,
           (Probe("`stage_2_csp_transition_activation`", "stage_2_csp_transition_activation"),
            Probe("`stage_1_block_0_dark_block_add`", "stage_1_block_0_dark_block_add")),
           "torch"),
    Family("DenseNet", "KerasHub", "DenseNetBackbone (blocks 1-1-1-1), 64 px", hub_densenet,
           (Probe("`relu`", "relu"), Probe("`stack3_block1_concat`", "stack3_block1_concat")),
           "tensorflow"),
    Family("ViT", "KerasHub", "ViTBackbone (2 blocks, 4x4 patches + class token), 16 px",
           hub_vit,
           (Probe("`vit_encoder/encoder_layers/1`", block("vit_encoder", "encoder_layers", 1),
                  "intercepted", reference=VIT_REFERENCE),
            Probe("`vit_encoder/encoder_layers/0`", block("vit_encoder", "encoder_layers", 0),
                  "intercepted", reference=VIT_REFERENCE)), "torch"),
    Family("DeiT", "KerasHub", "DeiTBackbone (2 blocks, class + distillation token + 4x4 "
           "patches), 16 px", hub_deit,
           (Probe("`deit_encoder/encoder_layers/1`", block("deit_encoder", "encoder_layers", 1),
                  "intercepted", reshape=2, reference=DEIT_REFERENCE),
            Probe("`deit_encoder/encoder_layers/0`", block("deit_encoder", "encoder_layers", 0),
                  "intercepted", reshape=2, reference=DEIT_REFERENCE)), "torch"),
    Family("DINOv2", "KerasHub", "DINOV2Backbone (2 blocks, class token + 2 registers + 4x4 "
           "patches), 16 px", hub_dinov2,
           (Probe("`dinov2_encoder/layers/1`", block("dinov2_encoder", "layers", 1),
                  "intercepted", reshape=3, reference=DINOV2_REFERENCE),
            Probe("`dinov2_encoder/layers/0`", block("dinov2_encoder", "layers", 0),
                  "intercepted", reshape=3, reference=DINOV2_REFERENCE)), "tensorflow"),
    Family("Swin", "KerasHub", "SwinTransformerBackbone (stages of 1 block, window 4), 32 px",
           hub_swin, (Probe("`stage_1`", "stage_1"), Probe("`stage_0`", "stage_0")), "jax"),
    Family("Subclassed keras.Model", "subclassed", "Net(keras.Model), 16 px", subclassed,
           (Probe("`stages/1`", "stages/1", "intercepted", reference=net_reference),
            Probe("`stages/0`", "stages/0", "intercepted", reference=net_reference)),
           "tensorflow"),
]


def family_id(family: Family) -> str:
    return f"{family.source}-{family.name}".replace(" ", "_").replace(".", "_")


# --------------------------------------------------------------------------- the table

TABLE_START = "<!-- zoo table: generated by `python tests/test_zoo.py --write`; do not edit -->"
TABLE_END = "<!-- end of zoo table -->"


def table() -> str:
    """The "Which models" table of docs/usage.md, from :data:`ZOO`."""
    rows = ["| family | source | member built | last feature map | internal block | "
            "explained | backend |",
            "|---|---|---|---|---|---|---|"]
    for family in ZOO:
        last, internal = family.probes
        how = ", ".join(sorted({p.how for p in family.probes}))
        how += "".join(sorted({f", `reshape={p.reshape}`" for p in family.probes if p.reshape}))
        rows.append(f"| {family.name} | {family.source} | {family.member} | {last.label} | "
                    f"{internal.label} | {how} | {family.backend} |")
    return "\n".join([TABLE_START, *rows, TABLE_END])


# --------------------------------------------------------------------------- the tests


def _skip_unless_mine(family: Family):
    backend = keras.config.backend()
    if backend != family.backend:
        pytest.skip(f"{family.source} {family.name} runs on the {family.backend} suite "
                    f"(each family on one backend, to keep make test within its budget)")


def images_for(model, n=2, seed=0):
    from cam.intercept import model_input_shape

    shape = tuple(model_input_shape(model)[1:])
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("family", ZOO, ids=family_id)
def test_maps_equal_the_whole_network(family):
    import cam
    from conftest import assert_rel_close, raw

    _skip_unless_mine(family)
    keras.utils.set_random_seed(0)
    model = family.build()
    x = images_for(model)
    for probe in family.probes:
        layer = probe.layer(model) if callable(probe.layer) else probe.layer
        for method in METHODS:
            cls = getattr(cam, method)
            explainer = cls(model, layer, reshape=probe.reshape)
            if probe.how == "head-only":
                assert explainer.mode == "head", (probe.label, explainer.split)
                reference = cls(model, layer, reshape=probe.reshape, mode="full")
            else:
                assert explainer.mode == "full" and explainer.whole_network, probe.label
                if probe.reshape is not None:  # the special tokens cannot be guessed
                    with pytest.raises(ValueError, match="reshape="):
                        cls(model, layer)
                graph, name = probe.reference(model, explainer.split.target_layer)
                # the chained layers are the model: the same outputs
                assert_rel_close(cam.backend.numpy(graph(x)), cam.backend.numpy(model(x)),
                                 rtol=1e-5)
                reference = cls(graph, name, reshape=probe.reshape)
                assert reference.mode == "head"
            want = raw(reference, x)
            assert np.abs(want).max() > 0, f"degenerate: the reference map at {probe.label} is 0"
            got = raw(explainer, x)
            assert_rel_close(got, want)


def test_every_keras_applications_family_is_in_the_zoo():
    """A family a new Keras adds fails here until the zoo names it."""
    modules = {name for name in dir(keras.applications) if not name.startswith("_")
               and name[0].islower() and name != "imagenet_utils"}
    covered = {m for family in ZOO for m in family.modules}
    assert modules == covered, (f"not in the zoo: {sorted(modules - covered)}; "
                                f"not in keras.applications: {sorted(covered - modules)}")


def test_each_backend_runs_a_share_of_the_zoo():
    """The sampling: every family on exactly one backend, each backend with some."""
    assert {family.backend for family in ZOO} == set(BACKENDS)
    assert len({family_id(family) for family in ZOO}) == len(ZOO)


def test_the_which_models_table_in_the_docs_is_the_zoo():
    text = (ROOT / "docs" / "usage.md").read_text()
    assert TABLE_START in text and TABLE_END in text, \
        "docs/usage.md has no zoo table: paste `python tests/test_zoo.py --table` into it"
    start = text.index(TABLE_START)
    documented = text[start:text.index(TABLE_END) + len(TABLE_END)]
    assert documented == table(), ("docs/usage.md's 'Which models' table differs from the "
                                   "zoo: run `python tests/test_zoo.py --write`")


def write_table(path: Path = ROOT / "docs" / "usage.md") -> None:
    """Replace the table between the markers in docs/usage.md with :func:`table`."""
    text = path.read_text()
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    path.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(table())
    elif sys.argv[1:] == ["--write"]:
        write_table()
    else:
        sys.exit("usage: python tests/test_zoo.py --table (print) | --write (into "
                 "docs/usage.md)")
