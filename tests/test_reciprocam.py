"""ReciproCAM: the keep masks by hand, the map by hand on a GAP head, head-only == full model
on the five model shapes and on a ViT token layer (class token carried, never masked), float
masks in the ablation template, and the error table."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import cam
from cam import backend
from cam import maps as M
from cam.study.vit import build_vit
from conftest import assert_rel_close, raw

G = M.GAUSSIAN_KEEP  # [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16


def activation_of(model, layer, images) -> np.ndarray:
    return backend.numpy(keras.Model(model.input, model.get_layer(layer).output)(images))


def dense_weights(model, name="logits"):
    kernel, bias = model.get_layer(name).weights
    return kernel.numpy().astype(np.float64), bias.numpy().astype(np.float64)


# --------------------------------------------------------------------------- the masks


def test_gaussian_kernel_by_hand():
    np.testing.assert_array_equal(G, [[1 / 16, 1 / 8, 1 / 16],
                                      [1 / 8, 1 / 4, 1 / 8],
                                      [1 / 16, 1 / 8, 1 / 16]])
    assert G.sum() == 1


def test_keep_weights_on_a_3x3_grid_by_hand():
    one_hot = M.keep_weights((3, 3))
    assert one_hot.shape == (9, 3, 3) and one_hot.dtype == np.float32
    np.testing.assert_array_equal(one_hot, np.eye(9).reshape(9, 3, 3))  # row-major order

    gauss = M.keep_weights((3, 3), gaussian=True)
    assert gauss.shape == (9, 3, 3) and gauss.dtype == np.float32
    # the centre cell (1, 1) = mask 4 holds the whole kernel
    np.testing.assert_array_equal(gauss[4], G)
    # the corner (0, 0) = mask 0: the kernel's lower-right 2x2, truncated, not renormalised
    np.testing.assert_array_equal(gauss[0], [[1 / 4, 1 / 8, 0],
                                             [1 / 8, 1 / 16, 0],
                                             [0, 0, 0]])
    assert gauss[0].sum() == 9 / 16
    # the corner (2, 2) = mask 8 mirrors it
    np.testing.assert_array_equal(gauss[8], gauss[0][::-1, ::-1])
    # the edge cell (0, 1) = mask 1: the kernel's lower two rows
    np.testing.assert_array_equal(gauss[1], [[1 / 8, 1 / 4, 1 / 8],
                                             [1 / 16, 1 / 8, 1 / 16],
                                             [0, 0, 0]])
    assert gauss[1].sum() == 12 / 16
    # every mask keeps its own cell at 1/4
    np.testing.assert_array_equal(gauss.reshape(9, 9).diagonal(), np.full(9, 0.25))


def test_keep_masks_are_the_ablated_fraction():
    for gaussian in (False, True):
        masks = M.keep_masks((3, 3), gaussian)
        assert masks.dtype == np.float32 and masks.min() >= 0 and masks.max() <= 1
        np.testing.assert_array_equal(masks, 1 - M.keep_weights((3, 3), gaussian))
    # one-hot: everything ablated but the kept cell
    expected = np.ones((3, 3), np.float32)
    expected[1, 2] = 0
    np.testing.assert_array_equal(M.keep_masks((3, 3))[5], expected)
    np.testing.assert_array_equal(M.keep_masks((3, 3), True)[4], 1 - G)


def test_keep_weights_on_non_square_and_degenerate_grids():
    gauss = M.keep_weights((2, 3), gaussian=True)
    assert gauss.shape == (6, 2, 3)
    # (1, 2) = mask 5, the lower-right corner of a 2x3 grid
    np.testing.assert_array_equal(gauss[5], [[0, 1 / 16, 1 / 8], [0, 1 / 8, 1 / 4]])
    # a 1x1 grid keeps only the centre weight; a 1xw row the kernel's middle row
    np.testing.assert_array_equal(M.keep_weights((1, 1), True), [[[0.25]]])
    np.testing.assert_array_equal(M.keep_weights((1, 3), True)[1], [[1 / 8, 1 / 4, 1 / 8]])
    with pytest.raises(ValueError, match="grid must be"):
        M.keep_weights((0, 3))


# --------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("gaussian", [False, True], ids=["one-hot", "gaussian"])
@pytest.mark.parametrize("value", [0.0, 0.5])
def test_map_by_hand_on_a_gap_head(gap_head_model, images_like, gaussian, value):
    """conv -> relu -> GAP -> Dense: keeping cell (i, j) alone gives
    y_c = b_c + W_c . sum_ab G_ij(a, b) A_ab / (h w) (+ the ablation value elsewhere)."""
    x = images_like(gap_head_model, 3, seed=2)
    targets = [0, 3, 1]
    a = activation_of(gap_head_model, "relu", x).astype(np.float64)  # (3, 8, 8, 5)
    kernel, bias = dense_weights(gap_head_model)
    h, w = a.shape[1:3]
    keep = M.keep_weights((h, w), gaussian).astype(np.float64)  # (64, 8, 8)
    # the masked activation A G + value (1 - G), averaged over the grid: (B, 64, C)
    pooled = (np.einsum("nhw,bhwc->bnc", keep, a)
              + value * (1 - keep).sum(axis=(1, 2))[None, :, None]) / (h * w)
    logits = pooled @ kernel + bias  # (B, 64, classes)
    expected = logits[np.arange(3), :, targets].reshape(3, h, w)
    explainer = cam.ReciproCAM(gap_head_model, "relu", gaussian=gaussian, ablation_value=value)
    assert explainer.evaluations_per_image == h * w == 64
    got = raw(explainer, x, targets=targets)
    assert got.shape == (3, h, w)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if not gaussian and value == 0:  # the closed form of the one-hot case
        cells = bias[targets][:, None, None] + np.einsum("bhwc,cb->bhw", a, kernel[:, targets]) \
            / (h * w)
        np.testing.assert_allclose(got, cells, rtol=1e-5, atol=1e-6)


def test_one_hot_map_minus_the_bias_is_the_cam_on_a_gap_head(gap_head_model, images_like):
    """On GAP + Dense, ReciproCAM's cell score is b_c plus the cell's own CAM contribution,
    which is FastAblationCAM's drop and Grad-CAM's map there."""
    x = images_like(gap_head_model, 2, seed=5)
    _, bias = dense_weights(gap_head_model)
    recipro = raw(cam.ReciproCAM(gap_head_model, "relu"), x, targets=2)
    fast = raw(cam.FastAblationCAM(gap_head_model, "relu"), x, targets=2)
    assert_rel_close(recipro - bias[2], fast, rtol=1e-4)


def test_probability_score_by_hand(gap_head_softmax_model, images_like):
    """score='probability' (the paper's choice): the softmax of the masked logits."""
    model = gap_head_softmax_model
    x = images_like(model, 2, seed=3)
    a = activation_of(model, "relu", x).astype(np.float64)
    kernel, bias = dense_weights(model)
    h, w = a.shape[1:3]
    keep = M.keep_weights((h, w), True).astype(np.float64)
    logits = np.einsum("nhw,bhwc->bnc", keep, a) / (h * w) @ kernel + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = probs[:, :, 1].reshape(2, h, w)
    got = raw(cam.ReciproCAM(model, "relu", score="probability", gaussian=True), x, targets=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_min_max_normalisation_is_threshold_q0(gap_head_model, images_like):
    """The paper's (m - min) / (max - min) is the quantile-0 threshold."""
    x = images_like(gap_head_model, 2, seed=4)
    explainer = cam.ReciproCAM(gap_head_model, "relu", gaussian=True)
    rawmap = raw(explainer, x).astype(np.float64)
    lo = rawmap.min(axis=(1, 2), keepdims=True)
    hi = rawmap.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(explainer(x, upsample=False, threshold="q0"),
                               (rawmap - lo) / (hi - lo), atol=1e-6)


# --------------------------------------------------------------------------- head == full


@pytest.mark.parametrize("kwargs", [{"batch_size": 7}, {"gaussian": True, "batch_size": 16},
                                    {"gaussian": True, "ablation_value": -0.5}],
                         ids=["one-hot", "gaussian", "gaussian-value"])
def test_head_only_equals_full_model(case, kwargs):
    x = case.images(2, seed=11)
    targets = [0, 2]
    head = cam.ReciproCAM(case.model, case.layer, mode="head", **kwargs)
    full = cam.ReciproCAM(case.model, case.layer, mode="full", **kwargs)
    assert head.evaluations_per_image == case.grid[0] * case.grid[1]
    head_maps = raw(head, x, targets=targets)
    full_maps = raw(full, x, targets=targets)
    assert head_maps.shape == (2, *case.grid)
    assert np.abs(full_maps).max() > 0 and np.ptp(full_maps) > 0
    assert_rel_close(head_maps, full_maps, rtol=1e-4)
    np.testing.assert_allclose(head(x, targets=targets), full(x, targets=targets), atol=1e-4)


@pytest.mark.parametrize("gaussian", [False, True])
def test_head_only_equals_full_model_probability_score(dense_concat_model, gaussian):
    x = np.random.default_rng(3).standard_normal((2, 10, 10, 3)).astype(np.float32)
    kwargs = {"score": "probability", "gaussian": gaussian, "batch_size": 8}
    head = raw(cam.ReciproCAM(dense_concat_model, "relu1", **kwargs), x)
    full = raw(cam.ReciproCAM(dense_concat_model, "relu1", mode="full", **kwargs), x)
    assert np.ptp(full) > 0
    assert_rel_close(head, full, rtol=1e-4)


def test_maps_do_not_depend_on_batch_size(residual_add_model):
    x = np.random.default_rng(6).standard_normal((2, 10, 10, 3)).astype(np.float32)
    maps = [raw(cam.ReciproCAM(residual_add_model, "relu_a", gaussian=True, batch_size=b), x)
            for b in (1, 4, 25, 64)]  # 25 cells: padded batches, one exact batch, one big one
    for m in maps[1:]:
        assert_rel_close(m, maps[0], rtol=1e-5)


# --------------------------------------------------------------------------- a ViT


@pytest.fixture(scope="module")
def vit():
    """8x8 images, 2x2 patches: a 4x4 grid of 8-wide tokens after a class token, one block."""
    keras.utils.set_random_seed(1)
    return build_vit(3, image_size=8, patch_size=2, dim=8, depth=1, heads=2, mlp_dim=16,
                     class_token=True, conv_stem=False)


def vit_images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("gaussian", [False, True], ids=["one-hot", "gaussian"])
def test_vit_map_keeps_one_patch_token_and_the_class_token(vit, gaussian):
    """Oracle by hand: the ViT rerun from its `tokens` layer with every patch token but one
    (or its Gaussian neighbourhood) scaled to zero, the class token (token 0) untouched."""
    x = vit_images(2)
    explainer = cam.ReciproCAM(vit, "tokens", gaussian=gaussian, batch_size=5)
    assert explainer.split.tokens.prefix == 1  # the class token is carried past the cut
    assert explainer.evaluations_per_image == 16  # 16 patches; the class token is not a cell
    result = explainer.explain(x, upsample=False, normalize=False)
    tokens = activation_of(vit, "tokens", x)  # (2, 17, 8)
    after = keras.Model(vit.get_layer("tokens").output, vit.output)
    keep = M.keep_weights((4, 4), gaussian).reshape(16, 16)  # mask n -> weight per patch
    expected = np.zeros((2, 16), np.float32)
    for b in range(2):
        masked = np.repeat(tokens[b:b + 1], 16, axis=0)  # (16, 17, 8)
        masked[:, 1:] *= keep[:, :, None]
        np.testing.assert_array_equal(masked[:, 0], np.broadcast_to(tokens[b, 0], (16, 8)))
        expected[b] = backend.numpy(after(masked))[:, result.targets[b]]
    assert np.ptp(expected) > 0
    assert_rel_close(result.raw, expected.reshape(2, 4, 4), rtol=1e-4)
    # zeroing the class token as well gives another map: the carried token matters
    zeroed = []
    for b in range(2):
        masked = np.repeat(tokens[b:b + 1], 16, axis=0)
        masked[:, 1:] *= keep[:, :, None]
        masked[:, 0] = 0
        zeroed.append(backend.numpy(after(masked))[:, result.targets[b]])
    assert not np.allclose(np.stack(zeroed).reshape(2, 4, 4), result.raw, atol=1e-3)


@pytest.mark.parametrize("gaussian", [False, True], ids=["one-hot", "gaussian"])
def test_vit_head_only_equals_full_model(vit, gaussian):
    x = vit_images(2, seed=1)
    head = cam.ReciproCAM(vit, "block0_norm1", gaussian=gaussian)
    full = cam.ReciproCAM(vit, "block0_norm1", gaussian=gaussian, mode="full")
    assert head.split.target_shape == (4, 4, 8)
    full_maps = raw(full, x)
    assert np.ptp(full_maps) > 0
    assert_rel_close(raw(head, x), full_maps, rtol=1e-4)


# --------------------------------------------------------------------------- float masks


def concat_explainer(model, value=0.0, mode="head"):
    return cam.FastAblationCAM(model, "relu1", batch_size=4, ablation_value=value, mode=mode)


@pytest.fixture(scope="module")
def concat_split(dense_concat_model):
    """A model with a bypass, one image, and a set of boolean masks: random cells, windows
    through every channel, nothing and everything."""
    image = np.random.default_rng(7).standard_normal((1, 10, 10, 3)).astype(np.float32)
    rng = np.random.default_rng(8)
    masks = np.concatenate([
        rng.random((6, 5, 5, 4)) < 0.4,
        np.repeat(M.window_masks((5, 5), 2, 1)[..., None], 4, axis=-1),
        np.zeros((1, 5, 5, 4), bool), np.ones((1, 5, 5, 4), bool),
    ])
    return dense_concat_model, image, masks  # 24: 6 calls of 4


@pytest.mark.parametrize("mode", ["head", "full"])
@pytest.mark.parametrize("value", [0.0, 1.25])
def test_float_masks_of_0_and_1_equal_boolean_masks(concat_split, mode, value):
    model, image, masks = concat_split
    explainer = concat_explainer(model, value, mode)
    features = explainer.features(image)
    boolean = explainer.perturbed_scores(features, 1, masks)
    as_float = explainer.perturbed_scores(features, 1, masks.astype(np.float32))
    as_float64 = explainer.perturbed_scores(features, 1, masks.astype(np.float64))
    assert boolean.shape == (1, 24) and np.ptp(boolean) > 0
    np.testing.assert_array_equal(as_float, boolean)
    np.testing.assert_array_equal(as_float64, boolean)


def test_a_float_mask_blends_towards_the_ablation_value(concat_split):
    """m = 0.25 everywhere: A' = 0.75 A + 0.25 v, the same as handing the head that tensor."""
    model, image, _ = concat_split
    explainer = concat_explainer(model, 2.0)
    features = explainer.features(image)
    got = explainer.perturbed_scores(features, 0, np.full((1, 1, 1, 1), 0.25, np.float32))
    expected = explainer.split.head(0.75 * features.activation + 0.25 * 2.0, features.bypass)
    np.testing.assert_allclose(got[0], backend.numpy(expected)[:, 0], rtol=1e-6)


def test_padding_rows_are_dropped(concat_split):
    """5 masks at 4 rows a call: 2 calls, the second padded with repeats of the last image's
    masks, which are dropped; the scores equal those of one call of 5."""
    model, image, masks = concat_split
    features = concat_explainer(model).features(image)
    four = concat_explainer(model).perturbed_scores(features, 1, masks[:5])
    five = cam.FastAblationCAM(model, "relu1", batch_size=5).perturbed_scores(features, 1,
                                                                           masks[:5])
    assert four.shape == (1, 5)
    np.testing.assert_allclose(four, five, rtol=1e-6)


@pytest.mark.parametrize("masks, exc, phrase", [
    (np.full((2, 1, 1, 1), 1.5), ValueError, r"must lie in \[0, 1\]"),
    (np.full((2, 1, 1, 1), -0.1), ValueError, r"must lie in \[0, 1\]"),
    (np.full((2, 1, 1, 1), np.nan), ValueError, r"must lie in \[0, 1\]"),
    (np.ones((2, 1, 1, 1), int), TypeError, "masks must be boolean or float"),
])
def test_perturbed_scores_refuse_other_masks(concat_split, masks, exc, phrase):
    model, image, _ = concat_split
    explainer = concat_explainer(model)
    with pytest.raises(exc, match=phrase):
        explainer.perturbed_scores(explainer.features(image), 0, masks)


# --------------------------------------------------------------------------- registry, errors


def test_registered():
    assert cam.METHODS["reciprocam"] == "ReciproCAM"
    assert cam.method_class("ReciproCAM") is cam.ReciproCAM is cam.method_class("recipro-cam")
    assert issubclass(cam.ReciproCAM, cam.AblationExplainer)
    assert cam.ReciproCAM.name == "ReciproCAM"


def test_evaluations_per_image(non_square_model):
    assert cam.ReciproCAM(non_square_model, "relu2").evaluations_per_image == 6 * 8
    assert cam.ReciproCAM(non_square_model, "relu2", gaussian=True).evaluations_per_image == 48


@pytest.mark.parametrize("gaussian", [1, 0, 1.0, "yes", "False", None, [True]])
def test_gaussian_must_be_a_bool(gap_head_model, gaussian):
    with pytest.raises(ValueError, match="gaussian must be True or False"):
        cam.ReciproCAM(gap_head_model, "relu", gaussian=gaussian)


def test_gaussian_accepts_numpy_bools(gap_head_model):
    assert cam.ReciproCAM(gap_head_model, "relu", gaussian=np.bool_(True)).gaussian is True


@pytest.mark.parametrize("kwargs, phrase", [
    ({"batch_size": 0}, "batch_size must be None .* or an int >= 1"),
    ({"batch_size": 2.5}, "batch_size must be None .* or an int >= 1"),
    ({"batch_size": True}, "batch_size must be None .* or an int >= 1"),
    ({"ablation_value": float("nan")}, "ablation_value must be finite"),
    ({"mode": "fast"}, "mode must be one of"),
])
def test_bad_ablation_arguments(gap_head_model, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        cam.ReciproCAM(gap_head_model, "relu", **kwargs)


def test_masks_kept_on_the_device_follow_the_window(dense_concat_model):
    """The masks are made once per grid and settings: a window changed in place is seen."""
    x = np.random.default_rng(12).standard_normal((2, 10, 10, 3)).astype(np.float32)
    explainer = cam.FastAblationCAM(dense_concat_model, "relu1", window=1)
    explainer(x)
    explainer.window = explainer.stride = 2
    changed = explainer(x, normalize=False, upsample=False)
    fresh = cam.FastAblationCAM(dense_concat_model, "relu1", window=2)(x, normalize=False,
                                                                         upsample=False)
    np.testing.assert_array_equal(changed, fresh)
