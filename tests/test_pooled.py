"""The pooled-head shortcut (cam/pooled.py): after a global average pooling of the target,
ablations are scored on moved pooled vectors through whatever head follows, equal to the
whole network; the path is chosen in Python from the explainer's mask kind, whatever ran
before on the layer."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam import perturbation, pooled
from conftest import random_images

SHAPE = (10, 10, 3)
ABLATIONS = ((cam.AblationCAM, {}), (cam.FastAblationCAM, {"window": 2, "stride": 1}),
             (cam.ReciproCAM, {"gaussian": True}))


def _trunk(seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input(SHAPE)
    a = L.Conv2D(4, 3, padding="same", name="conv1")(x)
    a = L.ReLU(name="relu1")(a)
    b = L.Conv2D(6, 3, strides=2, padding="same", name="conv2")(a)
    return x, a, L.ReLU(name="relu2")(b)


def seed_head():
    """The FastAblationCAM reference's head: pooling, Dense, Dense with softmax."""
    x, _, t = _trunk(1)
    p = L.GlobalAveragePooling2D(name="pool")(t)
    h = L.Dense(8, name="fc")(p)
    return keras.Model(x, L.Dense(5, activation="softmax", name="predictions")(h), name="seed")


def mlp_head():
    """An MLP with dropout and two normalisations of vectors."""
    x, _, t = _trunk(2)
    p = L.GlobalAveragePooling2D(keepdims=True, name="pool")(t)
    h = L.Flatten(name="flat")(p)
    h = L.Dense(12, activation="gelu", name="fc1")(h)
    h = L.Dropout(0.3, name="drop")(h)
    h = L.LayerNormalization(name="norm")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.UnitNormalization(name="unit")(L.Dense(7, name="fc2")(h))
    return keras.Model(x, L.Dense(4, name="logits")(h), name="mlp")


def two_outputs():
    """Two heads on the pooled vector, and a third input to one of them from the trunk (a
    bypass tensor that the rest of the head reads per row)."""
    x, a, t = _trunk(3)
    p = L.GlobalAveragePooling2D(name="pool")(t)
    side = L.GlobalMaxPooling2D(name="side")(a)
    first = L.Dense(3, name="species")(L.Concatenate(name="cat")([p, side]))
    second = L.Dense(2, activation="sigmoid", name="quality")(p)
    return keras.Model(x, [first, second], name="two")


@pytest.mark.parametrize("build, score, targets", [
    (seed_head, "logit", None), (seed_head, "probability", [1, 2, 0]),
    (mlp_head, "logit", [3, 0, 1]),
    (two_outputs, "logit", cam.targets.Output("species", cam.targets.Class(2))),
    (two_outputs, "probability", cam.targets.Output("quality", cam.targets.Class(1))),
])
def test_every_pooled_head_equals_the_whole_network(build, score, targets):
    model = build()
    images = random_images(SHAPE, 3, seed=11)
    for method, options in ABLATIONS:
        for value in (0.0, 0.7):
            head = method(model, "relu2", score=score, ablation_value=value, **options)
            assert head.path == "pooled", (model.name, method.name)
            full = method(model, "relu2", score=score, ablation_value=value, mode="full",
                          **options)
            got, want = head.explain(images, targets), full.explain(images, targets)
            assert np.ptp(want.raw) > 0
            np.testing.assert_allclose(got.raw, want.raw, rtol=1e-4,
                                       atol=1e-4 * np.abs(want.raw).max())


def test_the_shortcut_runs_whatever_ran_before_on_the_layer():
    """FastAblationCAM, then Ablation-CAM, then ReciproCAM on one layer, and the reverse: each
    explain call takes the pooled path, counted, through its own compiled function."""
    model = seed_head()
    images = random_images(SHAPE, 2, seed=12)
    for order in (ABLATIONS, ABLATIONS[::-1]):
        for method, options in order:
            explainer = method(model, "relu2", **options)
            before, calls = perturbation.PATHS["pooled"], explainer.scorer.calls
            explainer(images)
            assert perturbation.PATHS["pooled"] - before == 1, method.name
            assert explainer.scorer.calls > calls, method.name


def test_no_shortcut_where_the_head_does_more_than_pool_the_target():
    x, _, t = _trunk(4)
    both = L.Concatenate()([L.GlobalAveragePooling2D()(t), L.GlobalMaxPooling2D()(t)])
    two_readers = keras.Model(x, L.Dense(3)(both))
    conv = keras.Model(x, L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(2, 1)(t))))
    for model in (two_readers, conv):
        explainer = cam.AblationCAM(model, "relu2")
        assert pooled.find(explainer.split) is None and explainer.path == "head"
    # a method whose masks are neither channels nor cells takes the general head path
    assert cam.ScoreCAM(seed_head(), "relu2").path == "input"


def test_a_pooled_row_costs_a_vector_not_a_feature_map():
    model = seed_head()
    explainer = cam.AblationCAM(model, "relu2")
    # the moved vector (6, live throughout) and the rest of the head's largest call, its
    # inputs and outputs (Dense 6 -> 8 is larger than 8 -> 5)
    assert explainer.bytes_per_row() == 4 * (6 + (6 + 8))
    assert explainer.bytes_per_row() < explainer.split.bytes_per_row("head")
