"""Token layers (batch, tokens, channels): the grid layout, head-only == full model on a tiny
ViT with and without a class token, grayscale input, and the errors for layouts that are not
a square grid."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam import backend
from cam.graph import Split
from cam.tokens import TokenGrid
from cam.study.vit import build_vit
from conftest import assert_rel_close, raw

METHODS = {"gradcam": cam.GradCAM, "ablationcam": cam.AblationCAM,
           "fastablationcam": cam.FastAblationCAM}




def tiny_vit(class_token: bool, channels: int = 3) -> keras.Model:
    """8x8 images, 2x2 patches: a 4x4 grid of 8-wide tokens (+1 class token), one block."""
    keras.utils.set_random_seed(1)
    return build_vit(3, image_size=8, channels=channels, patch_size=2, dim=8, depth=1,
                     heads=2, mlp_dim=16, class_token=class_token, conv_stem=False)


@pytest.fixture(scope="module")
def vits():
    return {True: tiny_vit(True), False: tiny_vit(False, channels=1)}


def images_for(model, n=2, seed=0):
    shape = model.input_shape[1:]
    return np.random.default_rng(seed).uniform(0, 255, (n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def fifteen_tokens():
    """6x10 image -> 2x2 patches -> 3x5 = 15 tokens (not a square), a token-wise MLP, mean."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 10, 3), name="image")
    x = L.Conv2D(4, 2, strides=2, name="patch_embed")(inputs)
    x = L.Reshape((15, 4), name="tokens")(x)
    x = L.Dense(4, activation="tanh", name="mix")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="fifteen")


# --------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("tokens, reshape, expected", [
    (16, None, TokenGrid(4, 4, 0)),
    (17, None, TokenGrid(4, 4, 1)),  # a class token first
    (15, (3, 5), TokenGrid(3, 5, 0)),
    (16, (3, 5), TokenGrid(3, 5, 1)),  # the extra token is taken to come first
    (18, TokenGrid(4, 4, 1, 1), TokenGrid(4, 4, 1, 1)),
])
def test_token_grid_infer(tokens, reshape, expected):
    assert TokenGrid.infer(tokens, reshape) == expected


@pytest.mark.parametrize("tokens, reshape, message", [
    (15, None, "15 tokens, which is neither a square grid"),
    (18, None, "18 tokens, which is neither a square grid"),
    (15, (4, 4), r"reshape=\(4, 4\) needs 16 tokens but .* outputs 15"),
    (17, TokenGrid(4, 4), "covers 16 tokens but .* outputs 17"),
    (17, 4.0, "reshape must be None, \\(height, width\\), a number of special tokens or a "
              "cam.TokenGrid"),
    (17, True, "reshape must be None"),  # a bool is not a count
])
def test_token_grid_errors(tokens, reshape, message):
    with pytest.raises(ValueError, match=message):
        TokenGrid.infer(tokens, reshape)


@pytest.mark.parametrize("tokens, special, expected", [
    (18, 2, TokenGrid(4, 4, 2)),  # DeiT: a class and a distillation token, then 4x4
    (16, 0, TokenGrid(4, 4, 0)),  # no special tokens: the grid alone
    (21, 5, TokenGrid(4, 4, 5)),  # DINOv2 with 4 registers after its class token: 1 + 4
    (13, 4, TokenGrid(3, 3, 4)),
])
def test_a_count_of_special_tokens_comes_first(tokens, special, expected):
    assert TokenGrid.infer(tokens, special) == expected
    assert TokenGrid.infer(tokens, np.int64(special)) == expected  # a NumPy int counts too


@pytest.mark.parametrize("tokens, special, message", [
    # 18 - 1 = 17 is not a square; 18 - 2 = 16 (4x4) and 18 - 9 = 9 (3x3) are
    (18, 1, r"reshape=1 special tokens: layer 'x' outputs 18 tokens, and the other 17 tokens "
            r"are not a square grid \(g\*g\); valid counts: 2 \(a 4x4 grid\), 9 \(a 3x3 "
            r"grid\)"),
    # 17 - 17 = 0 tokens left: an empty grid
    (17, 17, r"that leaves 0 patch tokens, too few for a grid of 2x2 or more; valid counts: "
             r"1 \(a 4x4 grid\), 8 \(a 3x3 grid\), 13 \(a 2x2 grid\)"),
    (17, 20, "that leaves 0 patch tokens"),  # more special tokens than tokens
    (17, 14, "that leaves 3 patch tokens"),  # a 1x1 grid or less is no grid
    (5, -1, r"cannot be negative; valid counts: 1 \(a 2x2 grid\)"),
    (3, 0, "no count leaves a square grid of 2x2 or more"),
])
def test_a_count_that_leaves_no_square_grid_says_which_would(tokens, special, message):
    with pytest.raises(ValueError, match=message):
        TokenGrid.infer(tokens, special, "layer 'x'")


def test_token_grid_round_trip_by_hand():
    # 1 class token, a 2x3 grid, 1 register token: token t holds the value t in every channel.
    grid = TokenGrid(2, 3, prefix=1, suffix=1)
    tokens = np.repeat(np.arange(8, dtype=np.float32)[None, :, None], 2, axis=2)  # (1, 8, 2)
    cells, carried = grid.to_grid(tokens)
    np.testing.assert_array_equal(np.asarray(cells)[0, ..., 0], [[1, 2, 3], [4, 5, 6]])
    assert [np.asarray(c)[0, :, 0].tolist() for c in carried] == [[0.0], [7.0]]
    np.testing.assert_array_equal(np.asarray(grid.from_grid(cells, carried)), tokens)


# --------------------------------------------------------------------------- the explainers


@pytest.mark.parametrize("class_token", [True, False], ids=["class-token", "no-class-token"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_head_only_equals_full_model_on_a_vit(vits, class_token, method):
    """Ablating a patch token through the head gives what rerunning the whole ViT gives."""
    model = vits[class_token]
    x = images_for(model)
    head = METHODS[method](model, "block0_norm1")
    full = METHODS[method](model, "block0_norm1", mode="full")
    assert head.split.target_shape == (4, 4, 8)
    assert (head.split.tokens.prefix == 1) is class_token
    full_maps = raw(full, x)
    assert np.abs(full_maps).max() > 0, "degenerate test: the oracle map is all zero"
    assert_rel_close(raw(head, x), full_maps)
    np.testing.assert_array_equal(head.explain(x).targets, full.explain(x).targets)


def test_fast_ablation_map_is_the_drop_of_each_token(vits):
    """window=1: cell (i, j) is y - y with token 1 + 4i + j zeroed, the class token untouched."""
    model = vits[True]
    x = images_for(model, n=1)
    explainer = cam.FastAblationCAM(model, "tokens")
    assert explainer.evaluations_per_image == 16  # 16 patches; the class token is not ablated
    result = explainer.explain(x, upsample=False, normalize=False)
    got = result.raw[0]
    target = int(result.targets[0])
    # Oracle by hand: the model rerun from the `tokens` output with one token set to zero.
    tokens = backend.numpy(keras.Model(model.input, model.get_layer("tokens").output)(x))
    expected = np.zeros((4, 4), np.float32)
    y_full = float(backend.numpy(model(x))[0, target])
    for i in range(4):
        for j in range(4):
            ablated = tokens.copy()
            ablated[0, 1 + 4 * i + j] = 0.0
            expected[i, j] = y_full - _vit_head(model, ablated)[0, target]
    assert np.abs(expected).max() > 0
    assert_rel_close(got, expected)


def _vit_head(model, tokens):
    """The one-block ViT after its `tokens` layer, written out layer by layer."""
    g = model.get_layer
    x = tokens
    y = g("block0_norm1")(x)
    x = g("block0_add1")([x, g("block0_attention")(y, y)])
    y = g("block0_mlp2")(g("block0_mlp1")(g("block0_norm2")(x)))
    x = g("block0_out")([x, y])
    return backend.numpy(g("logits")(g("cls")(g("final_norm")(x))))


def test_grayscale_vit_maps_have_the_image_size(vits):
    model = vits[False]  # one-channel input
    x = images_for(model, n=3)
    assert x.shape == (3, 8, 8, 1)
    for cls in METHODS.values():
        explainer = cls(model, "block0_norm1")
        maps = explainer(x)
        assert maps.shape == (3, 8, 8) and maps.dtype == np.float32
        assert maps.min() >= 0 and maps.max() <= 1
        assert np.abs(raw(explainer, x)).max() > 0


def test_threshold_reaches_the_explainer(vits):
    model = vits[True]
    x = images_for(model, n=2)
    explainer = cam.GradCAM(model, "block0_norm1")
    raw_maps = raw(explainer, x)
    top = explainer(x, upsample=False, threshold="q0.75")
    for r, t in zip(raw_maps, top):
        assert (t > 0).sum() <= 4 and (t > 0).sum() >= 1  # the top quarter of 16 cells
        assert t.max() == pytest.approx(1.0)
        assert (t[r <= np.quantile(r, 0.75)] == 0).all()


def test_candidates_and_table_include_token_layers(vits):
    names = dict(cam.candidate_layers(vits[True]))
    assert names["block0_norm1"] == (None, 17, 8) and names["patches"] == (None, 16, 8)
    table = cam.layer_table(vits[True]).to_frame()
    row = table[table["layer"] == "block0_norm1"].iloc[0]
    assert row["grid"] == "4x4 +1 token" and row["head-only"]
    head, total = (int(v) for v in row["head layers"].split("/"))
    assert head < total
    assert list(table.index) == list(range(len(names)))


# --------------------------------------------------------------------------- other layouts


def test_non_square_tokens_error_names_the_fix(fifteen_tokens):
    assert "tokens" not in dict(cam.candidate_layers(fifteen_tokens))
    with pytest.raises(ValueError, match=r"layer 'tokens' outputs 15 tokens.*reshape=\(height"):
        cam.FastAblationCAM(fifteen_tokens, "tokens")


@pytest.mark.parametrize("method", ["ablationcam", "fastablationcam", "gradcam"])
def test_reshape_lays_out_other_grids(fifteen_tokens, method):
    x = np.random.default_rng(3).standard_normal((2, 6, 10, 3)).astype(np.float32)
    head = METHODS[method](fifteen_tokens, "tokens", reshape=(3, 5))
    full = METHODS[method](fifteen_tokens, "tokens", reshape=(3, 5), mode="full")
    maps = raw(head, x)
    assert maps.shape == (2, 3, 5)
    assert np.abs(maps).max() > 0
    assert_rel_close(maps, raw(full, x))
    assert head(x).shape == (2, 6, 10)  # upsampled to the image


def test_reshape_on_a_grid_layer_is_refused(fifteen_tokens):
    with pytest.raises(ValueError, match="reshape is for \\(batch, tokens, channels\\) layers"):
        Split(fifteen_tokens, "patch_embed", reshape=(3, 5))
