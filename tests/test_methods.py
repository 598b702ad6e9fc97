"""The Grad-CAM family next to Grad-CAM: Grad-CAM++, XGrad-CAM, LayerCAM and HiResCAM.

Their weights (cam.maps) against numbers worked out by hand; each class on models whose
gradient is known in closed form (a GAP + Dense head, a Flatten + Dense head); and head-only
against the full-model oracle on the five model shapes of conftest.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam import backend
from cam import maps as M
from conftest import CASE_NAMES, assert_rel_close, raw

NEW_METHODS = {
    "gradcamplusplus": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
}


# --------------------------------------------------------------------------- by hand

def tiny_tensors():
    """B = 1, a 2x2 grid, 2 channels.

    A_0 = [[1, 2], [3, 4]] (sum 10)    g_0 = [[0.5, -1], [0, 1]]
    A_1 = [[0, 1], [1, 0]] (sum 2)     g_1 = [[1, 2], [-1, 0]]
    """
    a = np.zeros((1, 2, 2, 2), np.float32)
    g = np.zeros((1, 2, 2, 2), np.float32)
    a[0, ..., 0] = [[1, 2], [3, 4]]
    a[0, ..., 1] = [[0, 1], [1, 0]]
    g[0, ..., 0] = [[0.5, -1], [0, 1]]
    g[0, ..., 1] = [[1, 2], [-1, 0]]
    return a, g


def test_gradcampp_weights_by_hand():
    a, g = tiny_tensors()
    # alpha = g^2 / (2 g^2 + S g^3) = 1 / (2 + S g) for g != 0, S the channel's sum.
    # channel 0 (S = 10): g = 0.5: alpha 1/7, relu(g) 0.5 -> 1/14; g = -1: relu 0 -> 0;
    #   g = 0: denominator 0 -> alpha 0 -> 0; g = 1: alpha 1/12 -> 1/12. w_0 = 1/14 + 1/12 = 13/84
    # channel 1 (S = 2): g = 1: 1/4; g = 2: alpha 1/6 -> 2/6 = 1/3; g = -1: denominator
    #   2 - 2 = 0 -> alpha 0 (not inf); g = 0 -> 0. w_1 = 1/4 + 1/3 = 7/12
    with np.errstate(all="raise"):  # the zero denominators are guarded, not divided by
        w = M.gradcampp_weights(a, g)
    assert w.shape == (1, 2) and w.dtype == np.float32
    np.testing.assert_allclose(w, [[13 / 84, 7 / 12]], rtol=1e-6)


def test_gradcampp_weights_on_constant_gradients():
    # g = c everywhere on an n-cell grid: w = n relu(c) / (2 + S c).
    a = np.zeros((2, 1, 3, 1), np.float32)
    a[0, 0, :, 0] = [1, 2, 3]  # S = 6
    a[1, 0, :, 0] = [0, 0, 2]  # S = 2
    g = np.empty_like(a)
    g[0], g[1] = 0.5, -0.25
    # image 0: 3 * 0.5 / (2 + 3) = 0.3; image 1: relu(-0.25) = 0 -> 0
    np.testing.assert_allclose(M.gradcampp_weights(a, g), [[0.3], [0.0]], rtol=1e-6)


def test_xgradcam_weights_by_hand():
    a, g = tiny_tensors()
    # channel 0: sum A g = 1*0.5 + 2*(-1) + 3*0 + 4*1 = 2.5, / 10 = 0.25
    # channel 1: 0*1 + 1*2 + 1*(-1) + 0*0 = 1, / 2 = 0.5
    # second image: channel 0 is all zero -> 0; channel 1 A = [[2, 0], [0, 2]] (sum 4),
    #   g = [[3, 5], [7, 1]]: (2*3 + 2*1) / 4 = 2
    a2 = np.zeros_like(a)
    a2[0, ..., 1] = [[2, 0], [0, 2]]
    g2 = np.ones_like(g)
    g2[0, ..., 1] = [[3, 5], [7, 1]]
    with np.errstate(all="raise"):
        w = M.xgradcam_weights(np.concatenate([a, a2]), np.concatenate([g, g2]))
    assert w.shape == (2, 2) and w.dtype == np.float32
    np.testing.assert_allclose(w, [[0.25, 0.5], [0.0, 2.0]], rtol=1e-6)


def test_layercam_weights_and_map_by_hand():
    a, g = tiny_tensors()
    w = M.layercam_weights(g)
    # relu(g_0) = [[0.5, 0], [0, 1]], relu(g_1) = [[1, 2], [0, 0]]
    np.testing.assert_array_equal(w[0, ..., 0], [[0.5, 0], [0, 1]])
    np.testing.assert_array_equal(w[0, ..., 1], [[1, 2], [0, 0]])
    # map = relu(g_0) A_0 + relu(g_1) A_1 = [[0.5 + 0, 0 + 2], [0 + 0, 4 + 0]]
    np.testing.assert_allclose(M.weighted_channel_sum(a, w)[0], [[0.5, 2], [0, 4]])


def test_weighted_channel_sum_with_a_weight_per_cell_is_hirescam():
    a, g = tiny_tensors()
    # g_0 A_0 + g_1 A_1 = [[0.5 + 0, -2 + 2], [0 - 1, 4 + 0]]
    out = M.weighted_channel_sum(a, g)
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out[0], [[0.5, 0], [-1, 4]])
    # (B, C) weights are still channel weights: 0.25 A_0 + 0.5 A_1
    np.testing.assert_allclose(M.weighted_channel_sum(a, np.array([[0.25, 0.5]]))[0],
                               [[0.25, 1.0], [1.25, 1.0]])


@pytest.mark.parametrize("shape", [(1, 2, 2), (1, 2, 2, 3), (2, 2, 2, 2), (2,)])
def test_weighted_channel_sum_refuses_other_weight_shapes(shape):
    a, _ = tiny_tensors()
    with pytest.raises(ValueError, match="weights must be"):
        M.weighted_channel_sum(a, np.ones(shape))


# --------------------------------------------------------------------------- registry


def test_the_new_methods_are_registered():
    for key, name in NEW_METHODS.items():
        assert cam.METHODS[key] == name
        assert cam.method_class(key) is getattr(cam, name)
        assert issubclass(getattr(cam, name), cam.GradientExplainer)
    assert [cam.method_class(k).name for k in NEW_METHODS] == \
        ["Grad-CAM++", "XGrad-CAM", "LayerCAM", "HiResCAM"]


# --------------------------------------------------------------------------- closed-form gradients


def expected_maps(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Each method's raw map from A and g (B, h, w, C), written out in numpy afresh (not
    through cam.maps)."""
    a, g = a.astype(np.float64), g.astype(np.float64)
    s = a.sum(axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
    if method == "gradcamplusplus":
        denominator = 2 * g**2 + s * g**3
        safe = np.where(denominator == 0, 1, denominator)
        alpha = np.where(denominator == 0, 0, g**2 / safe)
        w = (alpha * np.maximum(g, 0)).sum(axis=(1, 2), keepdims=True)
    elif method == "xgradcam":
        w = np.where(s == 0, 0, (a * g).sum(axis=(1, 2), keepdims=True) / np.where(s == 0, 1, s))
    elif method == "layercam":
        w = np.maximum(g, 0)
    elif method == "hirescam":
        w = g
    return (w * a).sum(axis=-1)


def activation_of(model, layer, images) -> np.ndarray:
    return backend.numpy(keras.Model(model.input, model.get_layer(layer).output)(images))


@pytest.mark.parametrize("method", list(NEW_METHODS))
def test_methods_on_a_gap_head(method, gap_head_model, images_like):
    """GAP + Dense: dy_c/dA_ij^k = W[k, c] / (h w) in every cell, so
    Grad-CAM++: w_k = h w relu(g_k) / (2 + S_k g_k);  XGrad-CAM: w_k = g_k (the Grad-CAM / CAM
    map); LayerCAM: sum_k relu(g_k) A_k;  HiResCAM: sum_k g_k A_k (= Grad-CAM again)."""
    x = images_like(gap_head_model, 3, seed=7)
    targets = [0, 3, 1]
    a = activation_of(gap_head_model, "relu", x).astype(np.float64)  # (3, 8, 8, 5)
    kernel = gap_head_model.get_layer("logits").kernel.numpy().astype(np.float64)  # (5, 4)
    h, w = a.shape[1:3]
    g_k = kernel[:, targets].T / (h * w)  # (B, C): the gradient, the same in every cell
    assert (g_k > 0).any() and (g_k < 0).any()  # both signs, so ReLU on g matters
    s = a.sum(axis=(1, 2))  # (B, C)
    by_hand = {
        "gradcamplusplus": h * w * np.maximum(g_k, 0) / np.where(g_k > 0, 2 + s * g_k, 1),
        "xgradcam": np.where(s == 0, 0, g_k),
        "layercam": np.maximum(g_k, 0),
        "hirescam": g_k,
    }[method]
    expected = np.einsum("bhwk,bk->bhw", a, by_hand)
    assert np.abs(expected).max() > 1e-3
    g = np.broadcast_to(g_k[:, None, None, :], a.shape)
    np.testing.assert_allclose(expected, expected_maps(method, a, g), rtol=1e-12, atol=1e-12)
    maps = raw(cam.method_class(method)(gap_head_model, "relu"), x, targets=targets)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
    if method in ("xgradcam", "hirescam"):  # both reduce to Grad-CAM on a GAP head
        gradcam = raw(cam.GradCAM(gap_head_model, "relu"), x, targets=targets)
        np.testing.assert_allclose(maps, gradcam, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def flatten_head_model():
    """conv -> ReLU ("relu", 4x4x3) -> Flatten -> Dense(3): dy_c/dA_ij^k = V[(i, j, k), c], a
    different gradient in every cell, so the per-cell methods differ from Grad-CAM."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 4, 2), name="image")
    x = L.ReLU(name="relu")(L.Conv2D(3, 3, padding="same", name="conv")(inputs))
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="flatten_head")


@pytest.mark.parametrize("method", list(NEW_METHODS))
def test_methods_on_a_flatten_head(method, flatten_head_model):
    model = flatten_head_model
    x = np.random.default_rng(4).standard_normal((2, 4, 4, 2)).astype(np.float32)
    targets = [2, 0]
    a = activation_of(model, "relu", x)  # (2, 4, 4, 3)
    kernel = model.get_layer("logits").kernel.numpy().astype(np.float64)  # (48, 3)
    g = kernel[:, targets].T.reshape(2, 4, 4, 3)  # Flatten is row-major over (i, j, k)
    expected = expected_maps(method, a, g)
    assert np.abs(expected).max() > 1e-3
    maps = raw(cam.method_class(method)(model, "relu"), x, targets=targets)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    gradcam = raw(cam.GradCAM(model, "relu"), x, targets=targets)
    assert not np.allclose(maps, gradcam, rtol=1e-3, atol=1e-4)  # not Grad-CAM in disguise


# --------------------------------------------------------------------------- head == full


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("method", list(NEW_METHODS))
def test_head_only_equals_full_model(method, name, model_case):
    case = model_case(name)
    x = case.images(2, seed=11)
    targets = [0, 2]
    cls = cam.method_class(method)
    head = cls(case.model, case.layer, mode="head")
    full = cls(case.model, case.layer, mode="full")
    head_maps, full_maps = raw(head, x, targets=targets), raw(full, x, targets=targets)
    assert head_maps.shape == (2, *case.grid)
    assert np.abs(full_maps).max() > 0, "degenerate test: the oracle map is all zero"
    assert_rel_close(head_maps, full_maps, rtol=1e-4)
    np.testing.assert_allclose(head(x, targets=targets), full(x, targets=targets), atol=1e-4)


@pytest.mark.parametrize("method", list(NEW_METHODS))
def test_head_only_equals_full_model_probability_score(method, dense_concat_model):
    x = np.random.default_rng(3).standard_normal((2, 10, 10, 3)).astype(np.float32)
    cls = cam.method_class(method)
    head = raw(cls(dense_concat_model, "relu1", score="probability"), x)
    full = raw(cls(dense_concat_model, "relu1", score="probability", mode="full"), x)
    assert np.abs(full).max() > 0
    assert_rel_close(head, full, rtol=1e-4)
