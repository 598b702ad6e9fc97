"""cam.sanity: the cascading model-randomisation check on a small CNN built here, on every Keras
backend (the DenseNet grouping of the study is tested in test_models.py)."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

import cam
from cam import sanity


def small_cnn(width: int = 4, size: int = 16) -> keras.Model:
    """The study's small CNN in miniature: three conv-BN-ReLU-pool blocks, then ``conv4``,
    ``bn``, ``relu`` (a ``size / 8`` grid), global average pooling and a softmax
    ``predictions``."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    for block, filters in enumerate((width, 2 * width, 4 * width), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{block}")(x)
    x = keras.layers.Conv2D(4 * width, 3, padding="same", use_bias=False, name="conv4")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def test_randomisation_stages_one_per_weighted_layer_with_its_batchnorm():
    stages = sanity.randomisation_stages(small_cnn(2))
    assert stages == [("predictions", ["predictions"]), ("conv4", ["bn", "conv4"]),
                      ("conv3", ["bn3", "conv3"]), ("conv2", ["bn2", "conv2"]),
                      ("conv1", ["bn1", "conv1"])]
    # ``group`` replaces the default: consecutive layers with one key are one stage
    halves = sanity.randomisation_stages(
        small_cnn(2), lambda layer, previous: "top" if layer.name in ("conv4", "bn", "predictions")
        else "bottom")
    assert halves == [("top", ["predictions", "bn", "conv4"]),
                      ("bottom", ["bn3", "conv3", "bn2", "conv2", "bn1", "conv1"])]


def test_randomisation_check_on_a_small_cnn():
    # 32 px: a 4x4 grid at relu. On a 2x2 grid a rank correlation takes 5 values, and two
    # random maps rank their 4 cells alike often enough (1 in 24) to read as "still 1.0".
    model = small_cnn(size=32)
    before = [w.copy() for w in model.get_weights()]
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    methods = {"Grad-CAM": cam.GradCAM,
               "FastAblationCAM": lambda m, layer: cam.FastAblationCAM(m, layer, batch_size=16)}
    frame = pd.DataFrame(sanity.randomisation_check(model, methods, images, "relu",
                                                    progress=False))
    assert list(frame.columns) == ["stage", "reinitialised", "layers", "method", "image", "spearman"]
    assert len(frame) == 6 * 2 * 3  # (original + 5 stages) x methods x images
    assert frame["reinitialised"].unique().tolist() == ["none", "predictions", "conv4", "conv3",
                                                       "conv2", "conv1"]
    assert frame.groupby("stage")["layers"].first().tolist() == [0, 1, 3, 5, 7, 9]
    original = frame[frame["stage"] == 0]
    np.testing.assert_allclose(original["spearman"], 1.0, atol=1e-6)  # the copy reproduces the maps
    assert (frame[frame["stage"] == 5]["spearman"].fillna(0) < 0.999).all()  # fully random
    for a, b in zip(before, model.get_weights()):  # the caller's model is untouched
        np.testing.assert_array_equal(a, b)
    again = pd.DataFrame(sanity.randomisation_check(model, methods, images, "relu",
                                                    progress=False))
    np.testing.assert_array_equal(frame["spearman"].to_numpy(), again["spearman"].to_numpy())
    with pytest.raises(ValueError, match="stage 'x' names layers the model does not have: .'nope'."):
        sanity.randomisation_check(model, cam.GradCAM, images, "relu", stages=[("x", ["nope"])])
