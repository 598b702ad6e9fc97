"""Targets beyond a class index (cam.targets): segmentation regions, regression, multi-label,
multi-output models and plain callables; every method, head-only equal to the whole network."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam import backend as B
from cam import targets as T
from conftest import assert_rel_close, random_images

METHODS = [cam.method_class(key) for key in cam.METHODS]
#: Methods that keep only positive gradients (a map of zeros is a valid answer there).
GATED = ("GradCAMPlusPlus", "LayerCAM")
OPTIONS = {"FastAblationCAM": {"window": 2, "stride": 1}, "Occlusion": {"window": 3, "stride": 2}}


def _trunk(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv0")(inputs)
    x = L.Conv2D(5, 3, padding="same", name="conv1")(x)
    return inputs, L.ReLU(name="relu")(x), x


@pytest.fixture(scope="module")
def segmenter():
    """(B, 8, 8, 3) per-pixel logits; a bypass from conv0 reaches the output past relu."""
    inputs, relu, _ = _trunk(1)
    skip = L.Conv2D(3, 1, name="skip")(inputs)
    out = L.Add(name="pixels")([L.Conv2D(3, 3, padding="same", name="seg")(relu), skip])
    return keras.Model(inputs, L.Softmax(name="softmax")(out), name="segmenter")


@pytest.fixture(scope="module")
def regressor():
    inputs, relu, _ = _trunk(2)
    x = L.GlobalAveragePooling2D()(relu)
    return keras.Model(inputs, L.Dense(1, name="value")(x), name="regressor")


@pytest.fixture(scope="module")
def two_heads():
    inputs, relu, _ = _trunk(3)
    x = L.GlobalAveragePooling2D()(relu)
    classes = L.Dense(4, activation="softmax", name="kind")(x)
    age = L.Dense(1, name="age")(L.Dense(6, activation="relu", name="hidden")(x))
    return keras.Model(inputs, [classes, age], name="two_heads")


@pytest.fixture(scope="module")
def multilabel():
    inputs, relu, _ = _trunk(4)
    x = L.GlobalAveragePooling2D()(relu)
    return keras.Model(inputs, L.Dense(5, activation="sigmoid", name="labels")(x),
                       name="multilabel")


def _head_equals_full(model, target, images, methods=METHODS, score="logit"):
    for method in methods:
        options = OPTIONS.get(method.__name__, {})
        head = method(model, "relu", score=score, **options).explain(
            images, target, normalize=False, upsample=False)
        full = method(model, "relu", score=score, mode="full", **options).explain(
            images, target, normalize=False, upsample=False)
        assert head.raw.shape == (len(images), 8, 8)
        if method.__name__ not in GATED:  # a gated method may leave a map all zeros
            assert np.abs(head.raw).max() > 0, method.__name__
        assert_rel_close(head.raw, full.raw, rtol=1e-4)
        np.testing.assert_allclose(head.target_scores, full.target_scores, rtol=1e-5, atol=1e-6)


def test_region_on_a_segmentation_model_every_method(segmenter):
    images = random_images((8, 8, 3), 3, seed=5)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    _head_equals_full(segmenter, T.Region(1, mask), images)
    # the score is the class's logit summed over the region, by hand
    logits = keras.Model(segmenter.input, segmenter.get_layer("pixels").output)(images)
    expected = (B.numpy(logits)[..., 1] * mask).sum(axis=(1, 2))
    result = cam.GradCAM(segmenter, "relu").explain(images, T.Region(1, mask))
    np.testing.assert_allclose(result.target_scores, expected, rtol=1e-5)
    assert result.targets is None and result.scores.shape == (3, 8, 8, 3)


def test_one_region_per_image_and_a_new_mask_compiles_nothing(segmenter):
    images = random_images((8, 8, 3), 2, seed=6)
    masks = np.zeros((2, 8, 8), np.float32)
    masks[0, :4], masks[1, 4:] = 1, 1
    explainer = cam.FastAblationCAM(segmenter, "relu")
    together = explainer.explain(images, [T.Region(2, masks[0]), T.Region(2, masks[1])],
                                 normalize=False)
    stacked = explainer.explain(images, T.Region(2, masks), normalize=False)
    np.testing.assert_allclose(together.raw, stacked.raw, rtol=1e-6)
    for i in range(2):
        # one image against two in a call: float32 convolutions round by batch size (PyTorch
        # 2.13 on the CPU moves a drop of 0.025 by 1.9e-6), so the maps are compared on
        # their own scale, as everywhere else
        alone = explainer.explain(images[i:i + 1], T.Region(2, masks[i]), normalize=False)
        assert_rel_close(together.raw[i], alone.raw[0], rtol=1e-5)
    scorer = explainer.scoring_function(T.Region(2, masks[0]))
    traces = scorer.traces
    explainer.explain(images, T.Region(2, 1 - masks))  # new parameters, same kind
    assert scorer.traces == traces


def test_regression(regressor):
    images = random_images((8, 8, 3), 3, seed=7)
    _head_equals_full(regressor, T.Regression(), images)
    value = B.numpy(regressor(images))[:, 0]
    result = cam.AblationCAM(regressor, "relu").explain(images, T.Regression())
    np.testing.assert_allclose(result.target_scores, value, rtol=1e-5)


def test_multi_output_model(two_heads):
    images = random_images((8, 8, 3), 3, seed=8)
    _head_equals_full(two_heads, T.Output("age", T.Regression()), images)
    _head_equals_full(two_heads, T.Output(0, T.Class(2)), images,
                      methods=[cam.GradCAM, cam.AblationCAM, cam.ReciproCAM])
    by_name = cam.GradCAM(two_heads, "relu").explain(images, T.Output("kind", 2),
                                                     normalize=False)
    by_index = cam.GradCAM(two_heads, "relu").explain(images, T.Output(0, 2), normalize=False)
    np.testing.assert_allclose(by_name.raw, by_index.raw)
    assert len(by_name.scores) == 2 and by_name.scores[0].shape == (3, 4)


def test_multilabel_logit_and_probability(multilabel):
    images = random_images((8, 8, 3), 3, seed=9)
    _head_equals_full(multilabel, T.MultiLabel(3), images,
                      methods=[cam.GradCAM, cam.FastAblationCAM, cam.ScoreCAM])
    _head_equals_full(multilabel, T.MultiLabel(3), images, score="probability",
                      methods=[cam.GradCAM, cam.AblationCAM])
    logit = cam.GradCAM(multilabel, "relu").explain(images, T.MultiLabel(3)).target_scores
    probability = cam.GradCAM(multilabel, "relu", score="probability").explain(
        images, T.MultiLabel(3)).target_scores
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-logit)), rtol=1e-5)


def test_a_callable_target_on_every_backend(multilabel):
    """A callable in keras.ops runs inside the compiled functions: label 3 minus label 0."""
    images = random_images((8, 8, 3), 2, seed=10)

    def margin(outputs):
        return outputs[:, 3] - outputs[:, 0]

    _head_equals_full(multilabel, margin, images,
                      methods=[cam.GradCAM, cam.FastAblationCAM, cam.Occlusion])
    a = cam.GradCAM(multilabel, "relu").explain(images, margin, normalize=False).raw
    b = cam.GradCAM(multilabel, "relu").explain(images, 3, normalize=False).raw
    c = cam.GradCAM(multilabel, "relu").explain(images, 0, normalize=False).raw
    np.testing.assert_allclose(a, b - c, rtol=1e-4, atol=1e-5)


def test_class_targets_equal_ints(multilabel):
    images = random_images((8, 8, 3), 3, seed=11)
    explainer = cam.FastAblationCAM(multilabel, "relu")
    ints = explainer.explain(images, [1, 4, 2], normalize=False)
    classes = explainer.explain(images, T.Class([1, 4, 2]), normalize=False)
    listed = explainer.explain(images, [T.Class(1), T.Class(4), T.Class(2)], normalize=False)
    np.testing.assert_array_equal(ints.raw, classes.raw)
    np.testing.assert_array_equal(ints.raw, listed.raw)
    np.testing.assert_array_equal(classes.targets, [1, 4, 2])


@pytest.mark.parametrize("model_name, target, phrase", [
    ("segmenter", None, r"predicted class, which needs a \(batch, classes\) output"),
    ("segmenter", 1, r"Class scores a \(batch, classes\) output"),
    ("segmenter", T.Region(1, np.ones((4, 4))), r"mask is \(4, 4\), the output's grid is"),
    ("segmenter", T.Region(3, np.ones((8, 8))), "class 3 is out of range"),
    ("regressor", T.Regression(2), r"index < D"),
    ("regressor", T.Region(0, np.ones((8, 8))), "segmentation output"),
    ("two_heads", T.Output("height", T.Regression()), r"no output named 'height'"),
    ("two_heads", T.Output(2, T.Regression()), "out of range: the model has 2 outputs"),
    ("two_heads", T.Output(0, 7), "target 7 is out of range"),
    ("multilabel", [T.Class(1), T.Region(0, np.ones((8, 8)))], "of one kind"),
    ("multilabel", [T.Class(1)], "one per image: 2 images, 1 targets"),
    ("multilabel", "cat", "targets must be None, an int"),
])
def test_bad_targets_are_refused_clearly(request, model_name, target, phrase):
    model = request.getfixturevalue(model_name)
    with pytest.raises(ValueError, match=phrase):
        cam.GradCAM(model, "relu").explain(random_images((8, 8, 3), 2), target)


def test_bad_target_settings():
    with pytest.raises(ValueError, match="takes a class index"):
        T.Class(1.5)
    with pytest.raises(ValueError, match="mask is empty"):
        T.Region(0, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="index must be None or an int"):
        T.Regression(-1)
