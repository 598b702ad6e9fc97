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


def dropout_dense():
    """Pooling, Dropout, Dense with ReLU, Dense with softmax: one-channel ablations move the
    first Dense layer's output by a kernel row, through the Dropout."""
    x, _, t = _trunk(5)
    h = L.Dropout(0.5, name="drop")(L.GlobalAveragePooling2D(name="pool")(t))
    h = L.Dense(9, activation="relu", name="fc")(h)
    return keras.Model(x, L.Dense(4, activation="softmax", name="predictions")(h), name="drop")


def study_head():
    """The study's head: pooling and one Dense softmax layer (the logits read before it)."""
    x, _, t = _trunk(6)
    p = L.GlobalAveragePooling2D(name="pool")(t)
    return keras.Model(x, L.Dense(5, activation="softmax", name="predictions")(p), name="cam")


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
    (dropout_dense, "logit", [0, 3, 2]), (study_head, "logit", None),
    (study_head, "probability", [4, 4, 1]),
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


@pytest.mark.parametrize("build, dense", [(seed_head, "fc"), (dropout_dense, "fc"),
                                          (study_head, "predictions"), (mlp_head, None),
                                          (two_outputs, None)])
def test_one_channel_ablations_move_a_dense_output_by_a_kernel_row(build, dense):
    """Ablation-CAM's masks each ablate one channel: where a Dense layer reads the pooled
    vector (through Dropout), the rows move that layer's output by one kernel row ("dense");
    cell masks, and heads without such a layer, move the pooled vector."""
    model = build()
    found = pooled.find(cam.AblationCAM(model, "relu2").split)
    assert (found.dense.operation.name if found.dense else None) == dense
    kinds = {method.name: method(model, "relu2", **options).pooled_kind()
             for method, options in ABLATIONS}
    assert kinds == {"Ablation-CAM": "dense" if dense else "channel",
                     "FastAblationCAM": "cell", "ReciproCAM": "cell"}
    explainer = cam.AblationCAM(model, "relu2")
    features = explainer.features(random_images(SHAPE, 2, seed=13))
    # two channels at once are not one kernel row: the pooled vector moves instead
    two = np.zeros((1, 1, 1, 6), bool)
    two[..., :2] = True
    assert explainer.pooled_kind(two) == "channel"
    target = 0 if len(model.outputs) == 1 else \
        cam.targets.Output("species", cam.targets.Class(0))
    full = cam.AblationCAM(model, "relu2", mode="full")
    np.testing.assert_allclose(explainer.perturbed_scores(features, target, two),
                               full.perturbed_scores(full.features(
                                   random_images(SHAPE, 2, seed=13)), target, two),
                               rtol=1e-5, atol=1e-5)
