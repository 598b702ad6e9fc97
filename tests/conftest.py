"""Tiny Keras models shared by test_graph.py and test_explainers.py.

Every model is built in code with named layers, seeded, float32, and small enough (10x10 to
12x16 inputs, a handful of channels) that the whole explainer suite runs in seconds per test
on two cores. The five "shapes" of model the trunk/head split must handle are:

* ``tiny_sequential``: a plain ``keras.Sequential`` chain (nothing bypasses the target);
* ``dense_concat_model``: DenseNet-like, the target's input is concatenated past it;
* ``residual_add_model``: ResNet-like, the target sits inside a residual branch;
* ``nested_backbone_model``: a functional backbone nested as one layer of an outer model, with
  the target inside the backbone;
* ``non_square_model``: a 12x16 input (6x8 target grid).

Use them directly as fixtures, or through ``model_case(name)`` which also says which layer to
target and whether that target is bypassed.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dataclasses import dataclass  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras import layers as L  # noqa: E402

SEED = 0



@pytest.fixture(autouse=True)
def _seed_everything():
    """Python, numpy, TF and Keras seeds reset before every test."""
    keras.utils.set_random_seed(SEED)
    yield


# --------------------------------------------------------------------------- helpers


def random_images(shape, n: int = 2, seed: int = 0) -> np.ndarray:
    """``n`` float32 images of ``shape`` (H, W, C) drawn from N(0, 1)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32)


def raw(explainer, images, **kwargs) -> np.ndarray:
    """The map before ReLU/normalisation, on the target layer's grid."""
    return explainer(images, normalize=False, upsample=False, **kwargs)


def assert_rel_close(actual, expected, rtol=1e-4):
    """max |actual - expected| <= rtol * max |expected| (a relative error on the map's scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol} (scale {scale:.3g})"


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> None:
    """Give every BatchNormalization non-trivial gamma, beta and moving statistics, so that a
    BN layer run in training mode (batch statistics) would visibly differ from inference."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, c).astype(np.float32),  # gamma
                rng.normal(0, 0.2, c).astype(np.float32),  # beta
                rng.normal(0, 0.3, c).astype(np.float32),  # moving mean
                rng.uniform(0.5, 2.0, c).astype(np.float32),  # moving variance
            ])


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


# --------------------------------------------------------------------------- builders


def build_tiny_sequential(seed: int = SEED) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((10, 10, 3), name="image"),
        L.Conv2D(4, 3, padding="same", name="conv1"),
        L.ReLU(name="relu1"),
        L.MaxPooling2D(2, name="pool1"),  # 5x5
        L.Conv2D(6, 3, padding="same", name="conv2"),
        L.ReLU(name="relu2"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(3, name="logits"),
    ], name="tiny_sequential")


def build_dense_concat_model(seed: int = SEED) -> keras.Model:
    """DenseNet-like: relu0 is concatenated with the target relu1, so it bypasses relu1.
    BatchNorm and Dropout check that the head runs in inference mode; softmax output."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3), name="image")
    x0 = L.Conv2D(4, 3, strides=2, padding="same", name="conv0")(inputs)  # 5x5
    x0 = L.BatchNormalization(name="bn0")(x0)
    x0 = L.ReLU(name="relu0")(x0)
    x1 = L.Conv2D(4, 3, padding="same", name="conv1")(x0)
    x1 = L.BatchNormalization(name="bn1")(x1)
    x1 = L.ReLU(name="relu1")(x1)
    x = L.Concatenate(name="concat")([x0, x1])
    x = L.Conv2D(6, 1, name="conv2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.5, name="dropout")(x)
    outputs = L.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="dense_concat")
    randomize_batchnorm(model, seed)
    return model


def build_residual_add_model(seed: int = SEED) -> keras.Model:
    """ResNet-like: relu_a is inside the branch; relu_in is the shortcut that bypasses it."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.Conv2D(4, 3, strides=2, padding="same", name="conv_in")(inputs)  # 5x5
    shortcut = L.ReLU(name="relu_in")(x)
    y = L.Conv2D(4, 3, padding="same", name="conv_a")(shortcut)
    y = L.ReLU(name="relu_a")(y)
    y = L.Conv2D(4, 3, padding="same", name="conv_b")(y)
    x = L.Add(name="add")([shortcut, y])
    x = L.ReLU(name="relu_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="residual_add")


def build_backbone(name: str = "backbone", seed: int = SEED) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3), name=f"{name}_input")
    x = L.Conv2D(4, 3, strides=2, padding="same", name="conv_a")(inputs)  # 5x5
    x = L.ReLU(name="relu_a")(x)
    x = L.Conv2D(5, 3, padding="same", name="conv_b")(x)
    x = L.ReLU(name="relu_b")(x)
    return keras.Model(inputs, x, name=name)


def build_nested_backbone_model(seed: int = SEED) -> keras.Model:
    """A functional backbone called as one layer of the outer model; target relu_a inside."""
    backbone = build_backbone("backbone", seed)
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.Rescaling(0.5, offset=0.1, name="rescale")(inputs)
    x = backbone(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="nested")


def build_non_square_model(seed: int = SEED) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 16, 3), name="image")
    x = L.Conv2D(4, 3, strides=2, padding="same", name="conv1")(inputs)  # 6x8
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(5, 3, padding="same", name="conv2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="non_square")


def build_gap_head_model(activation: str | None = None, channels: int = 5,
                         classes: int = 4, shape=(8, 8, 3), seed: int = SEED) -> keras.Model:
    """conv -> ReLU ("relu", the target) -> GAP -> Dense(activation): the CAM architecture."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape, name="image")
    x = L.Conv2D(channels, 3, padding="same", name="conv")(inputs)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(classes, activation=activation, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"gap_head_{activation or 'linear'}")


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class ModelCase:
    name: str
    model: keras.Model
    layer: str  # the target layer, by plain name
    bypassed: bool  # whether some tensor carries the target's inputs past it
    grid: tuple  # (h, w) of the target layer

    @property
    def input_shape(self) -> tuple:
        return tuple(self.model.input_shape[1:])

    def images(self, n: int = 2, seed: int = 0) -> np.ndarray:
        return random_images(self.input_shape, n, seed)


#: name -> (builder, target layer, bypassed, target grid)
CASES = {
    "tiny_sequential": (build_tiny_sequential, "relu2", False, (5, 5)),
    "dense_concat_model": (build_dense_concat_model, "relu1", True, (5, 5)),
    "residual_add_model": (build_residual_add_model, "relu_a", True, (5, 5)),
    "nested_backbone_model": (build_nested_backbone_model, "relu_a", False, (5, 5)),
    "non_square_model": (build_non_square_model, "relu2", False, (6, 8)),
}
CASE_NAMES = list(CASES)


@pytest.fixture(scope="session")
def tiny_sequential():
    return build_tiny_sequential()


@pytest.fixture(scope="session")
def dense_concat_model():
    return build_dense_concat_model()


@pytest.fixture(scope="session")
def residual_add_model():
    return build_residual_add_model()


@pytest.fixture(scope="session")
def nested_backbone_model():
    return build_nested_backbone_model()


@pytest.fixture(scope="session")
def non_square_model():
    return build_non_square_model()


@pytest.fixture(scope="session")
def gap_head_model():
    """conv -> relu -> GAP -> Dense(4) with no activation (raw logits)."""
    return build_gap_head_model(None)


@pytest.fixture(scope="session")
def gap_head_softmax_model():
    return build_gap_head_model("softmax")


def _model_case(request, name: str) -> ModelCase:
    _, layer, bypassed, grid = CASES[name]
    return ModelCase(name, request.getfixturevalue(name), layer, bypassed, grid)


@pytest.fixture
def model_case(request):
    """``model_case(name)`` -> :class:`ModelCase` for one of :data:`CASE_NAMES`, built once."""
    return lambda name: _model_case(request, name)


@pytest.fixture
def case(request) -> ModelCase:
    """One :class:`ModelCase` per model shape: any test taking ``case`` runs on all five."""
    return _model_case(request, request.param)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASE_NAMES, indirect=True)


@pytest.fixture(scope="session")
def images_like():
    """``images_like(model, n=2, seed=0)``: N(0, 1) float32 images that fit ``model``."""
    return lambda model, n=2, seed=0: random_images(tuple(model.input_shape[1:]), n, seed)
