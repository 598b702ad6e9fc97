"""Occlusion and Score-CAM: the perturbation methods that score altered input images with the
whole model, checked against numbers worked out by hand on tiny models whose scores for any
input are known in closed form."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L

import cam
from cam import backend
from cam import maps as M
from conftest import assert_rel_close, raw


def relu(x):
    return np.maximum(x, 0)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def starts(n, window, stride):
    """Patch starts along an axis of n pixels, the last patch shifted back to the edge."""
    out = list(range(0, n - window + 1, stride))
    return out if out[-1] == n - window else out + [n - window]


def spread(drops_by_patch, shape, window):
    """Each pixel's mean drop over the patches {(i, j): drop} that cover it."""
    total, count = np.zeros(shape), np.zeros(shape)
    for (i, j), drop in drops_by_patch.items():
        total[i:i + window, j:j + window] += drop
        count[i:i + window, j:j + window] += 1
    assert count.min() >= 1
    return total / count


# =========================================================================== Occlusion


@pytest.fixture(scope="module")
def linear_model():
    """image (7x9x2) -> 3x3 conv (same padding, 3 channels, no activation) -> Flatten ->
    Dense(4): the logits are affine in the pixels, with seeded random weights."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((7, 9, 2), name="image")
    x = L.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="linear")


def conv_same(x, kernel):
    """3x3 cross-correlation with zero 'same' padding: (H, W, Cin), (3, 3, Cin, Cout)."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("hwc,co->hwo", padded[di:di + h, dj:dj + w], kernel[di, dj])
               for di in range(3) for dj in range(3))


def linear_drops(model, image, target, window, stride, baseline):
    """Occluding patch P with b lowers the logit by D . conv((x - b) 1_P), exactly (the
    biases cancel): the drop of every patch, spread over its pixels."""
    kernel = model.get_layer("conv").weights[0].numpy().astype(np.float64)
    dense = model.get_layer("logits").weights[0].numpy().astype(np.float64)[:, target]
    h, w = image.shape[:2]
    drops = {}
    for i in starts(h, window, stride):
        for j in starts(w, window, stride):
            delta = np.zeros(image.shape)
            delta[i:i + window, j:j + window] = image[i:i + window, j:j + window] - baseline
            drops[(i, j)] = conv_same(delta, kernel).reshape(-1) @ dense
    return spread(drops, (h, w), window)


def images_7x9(n=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 2, (n, 7, 9, 2)).astype(np.float32)


@pytest.mark.parametrize("window, stride", [(1, None), (2, 1), (3, None), (3, 2), (4, 3),
                                            (7, 2), (7, None)])
def test_occlusion_of_a_linear_model_by_hand(linear_model, window, stride):
    x = images_7x9()
    targets = [0, 3]
    explainer = cam.Occlusion(linear_model, window=window, stride=stride, batch_size=5)
    maps = raw(explainer, x, targets=targets)
    assert maps.shape == (2, 7, 9)  # the input's grid, even with upsample=False
    for m, image, t in zip(maps, x.astype(np.float64), targets):
        assert_rel_close(m, linear_drops(linear_model, image, t, window, stride or window, 0.0),
                         rtol=1e-5)


def test_occlusion_patches_end_at_the_edge(linear_model):
    """Window 3, stride 3 on 7x9: rows start at 0, 3, 4 and columns at 0, 3, 6; row 4 is the
    shifted-back last patch, so rows 4 and 5 are covered twice and average two drops."""
    assert starts(7, 3, 3) == [0, 3, 4] and starts(9, 3, 3) == [0, 3, 6]
    explainer = cam.Occlusion(linear_model, window=3)
    assert explainer.evaluations_per_image == 9
    masks = explainer.masks((7, 9))[..., 0]  # (N, H, W, 1): every channel of a pixel
    np.testing.assert_array_equal(masks.sum(axis=0)[:, 0], [1, 1, 1, 1, 2, 2, 1])
    np.testing.assert_array_equal(masks.sum(axis=0)[0], np.ones(9))
    x = images_7x9(1)
    drops = {}
    kernel = linear_model.get_layer("conv").weights[0].numpy().astype(np.float64)
    dense = linear_model.get_layer("logits").weights[0].numpy().astype(np.float64)[:, 1]
    for i in (0, 3, 4):
        for j in (0, 3, 6):
            delta = np.zeros((7, 9, 2))
            delta[i:i + 3, j:j + 3] = x[0, i:i + 3, j:j + 3]
            drops[(i, j)] = conv_same(delta, kernel).reshape(-1) @ dense
    result = explainer.explain(x, targets=1, upsample=False, normalize=False)
    maps = result.raw[0]
    # A drop is the difference of two float32 scores: its rounding error scales with the
    # score, not with the (smaller) drop, and differs between backends' convolutions.
    atol = 1e-6 * abs(result.scores[0, 1])
    np.testing.assert_allclose(maps[0, 0], drops[(0, 0)], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(maps[4, 4], (drops[(3, 3)] + drops[(4, 3)]) / 2, rtol=1e-5,
                               atol=atol)
    np.testing.assert_allclose(maps[6, 8], drops[(4, 6)], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("baseline", [0.5, -1.25, (-1.0, 2.0), [0.3, 0.3]])
def test_occlusion_sets_pixels_to_the_baseline(linear_model, baseline):
    x = images_7x9(2, seed=1)
    b = np.asarray(baseline, np.float64)
    explainer = cam.Occlusion(linear_model, window=2, stride=1, baseline=baseline)
    maps = raw(explainer, x, targets=2)
    for m, image in zip(maps, x.astype(np.float64)):
        assert_rel_close(m, linear_drops(linear_model, image, 2, 2, 1, b), rtol=1e-5)
    expected = float(b) if b.ndim == 0 else tuple(float(v) for v in b)
    assert explainer.baseline == expected and f"baseline={expected!r}" in repr(explainer)


def test_occlusion_of_probabilities_by_hand():
    """score='probability' on a softmax model: the drop is p_t(x) - p_t(x occluded), with
    the probabilities computed in numpy from the weights."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5, 6, 1), name="image")
    x = L.Conv2D(2, 1, name="conv")(inputs)
    x = L.Flatten(name="flatten")(x)
    model = keras.Model(inputs, L.Dense(3, activation="softmax", name="probs")(x))
    (k, kb), (d, db) = [[w.numpy().astype(np.float64) for w in model.get_layer(n).weights]
                        for n in ("conv", "probs")]

    def probabilities(image):  # (5, 6, 1)
        return softmax((image @ k[0, 0] + kb).reshape(-1) @ d + db)

    images = np.random.default_rng(2).uniform(0, 3, (2, 5, 6, 1)).astype(np.float32)
    targets = [2, 0]
    maps = raw(cam.Occlusion(model, window=2, stride=1, score="probability", baseline=1.0),
               images, targets=targets)
    for m, image, t in zip(maps, images.astype(np.float64), targets):
        drops = {}
        for i in starts(5, 2, 1):
            for j in starts(6, 2, 1):
                occluded = image.copy()
                occluded[i:i + 2, j:j + 2] = 1.0
                drops[(i, j)] = probabilities(image)[t] - probabilities(occluded)[t]
        assert_rel_close(m, spread(drops, (5, 6), 2), rtol=1e-5)


def test_occlusion_explains_the_input(linear_model):
    x = images_7x9(3, seed=4)
    explainer = cam.Occlusion(linear_model, "conv", window=3, stride=2)
    result = explainer.explain(x, upsample=False, normalize=False)
    assert result.layer == explainer.layer == "input" and result.method == "Occlusion"
    assert result.raw.shape == result.maps.shape == (3, 7, 9)
    np.testing.assert_allclose(result.scores, backend.numpy(linear_model(x)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(result.targets, result.scores.argmax(axis=1))
    assert explainer(x).shape == (3, 7, 9)
    # neither the batch size nor mode (the occluded images always run the whole model)
    # changes the map
    for other in (cam.Occlusion(linear_model, window=3, stride=2, batch_size=1),
                  cam.Occlusion(linear_model, window=3, stride=2, batch_size=64, mode="full")):
        assert_rel_close(raw(other, x), result.raw, rtol=1e-5)


def _occlusion_on(size):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*size, 1), name="image")
    x = L.Conv2D(2, 3, padding="same", activation="relu", name="relu")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(2, name="logits")(x))


@pytest.mark.parametrize("size, window, count", [((224, 224), 16, 196), ((28, 28), 2, 196),
                                                 ((10, 12), 1, 120), ((30, 45), 2, 15 * 23)])
def test_occlusion_default_window_is_a_fourteenth_of_the_image(size, window, count):
    explainer = cam.Occlusion(_occlusion_on(size))
    assert explainer.geometry(size) == (window, window)
    assert explainer.evaluations_per_image == count


def test_occlusion_evaluations_per_image(linear_model):
    # window 3, stride 2: rows [0, 2, 4], columns [0, 2, 4, 6]
    assert cam.Occlusion(linear_model, window=3, stride=2).evaluations_per_image == 12
    # window 2: rows [0, 2, 4, 5], columns [0, 2, 4, 6, 7]
    assert cam.Occlusion(linear_model, window=2).evaluations_per_image == 20
    assert cam.Occlusion(linear_model, window=1).evaluations_per_image == 63


def _dynamic_model():
    keras.utils.set_random_seed(13)
    inputs = keras.Input((None, None, 3), name="image")
    x = L.ReLU(name="relu")(L.Conv2D(3, 3, padding="same", name="conv")(inputs))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(2, name="logits")(x), name="dynamic")


def test_occlusion_on_a_model_of_any_image_size():
    explainer = cam.Occlusion(_dynamic_model(), window=5, stride=2)
    with pytest.raises(ValueError, match="depends on the image size"):
        explainer.evaluations_per_image
    assert explainer.evaluations((6, 9)) == 2 * 3
    assert explainer(np.ones((1, 6, 9, 3), np.float32)).shape == (1, 6, 9)
    with pytest.raises(ValueError, match="window 5 is larger than the 4x7 input images"):
        explainer(np.ones((1, 4, 7, 3), np.float32))


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"window": 0}, r"window must be None \(automatic\) or an int >= 1, got 0"),
        ({"window": -3}, r"window must be None \(automatic\) or an int >= 1"),
        ({"window": 2.0}, r"window must be None \(automatic\) or an int >= 1"),
        ({"window": True}, r"window must be None \(automatic\) or an int >= 1"),
        ({"window": "4"}, r"window must be None \(automatic\) or an int >= 1"),
        ({"window": 8}, r"window 8 is larger than the 7x9 input images; use 1..7"),
        ({"stride": 0}, "stride must be None or an int between 1 and window"),
        ({"window": 3, "stride": 4}, r"stride must be None or an int between 1 and window \(3\)"),
        ({"window": 3, "stride": 1.0}, r"between 1 and window \(3\)"),
        ({"stride": 2}, r"stride must be between 1 and window \(1\)"),  # automatic window 1
        ({"baseline": float("nan")}, "baseline must be a finite number or 2 finite numbers"),
        ({"baseline": float("inf")}, "baseline must be a finite number or 2 finite numbers"),
        ({"baseline": "0"}, "baseline must be a finite number or 2 finite numbers"),
        ({"baseline": True}, "baseline must be a finite number or 2 finite numbers"),
        ({"baseline": None}, "baseline must be a finite number or 2 finite numbers"),
        ({"baseline": [0.0, 1.0, 2.0]}, r"2 finite numbers \(one per input channel\)"),
        ({"baseline": []}, "baseline must be a finite number or 2 finite numbers"),
        ({"baseline": [[0.0, 1.0]]}, "baseline must be a finite number or 2 finite numbers"),
        ({"batch_size": 0}, "batch_size must be None .* or an int >= 1"),
        ({"batch_size": 2.5}, "batch_size must be None .* or an int >= 1"),
        ({"batch_size": True}, "batch_size must be None .* or an int >= 1"),
    ],
)
def test_occlusion_errors(linear_model, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        cam.Occlusion(linear_model, **kwargs)


# =========================================================================== Score-CAM


W = np.array([[1.0, 0.5], [2.0, -1.0], [0.5, 0.25]])
B = np.array([0.5, 0.0])
RAMP = np.arange(9, dtype=np.float64).reshape(3, 3)  # x = 0..8


def three_channel_model(softmax_output=False):
    """image (3x3x1) -> 1x1 conv -> ReLU ("relu", the target) -> GAP -> Dense(2).

    A_0 = relu(x), A_1 = relu(4 - x), A_2 = relu(1) = 1 (a constant channel); the logits are
    mean(A) @ W + B, so the score of any (masked) image is known in closed form.
    """
    inputs = keras.Input((3, 3, 1), name="image")
    conv = L.Conv2D(3, 1, name="conv")
    x = L.ReLU(name="relu")(conv(inputs))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    dense = L.Dense(2, activation="softmax" if softmax_output else None, name="logits")
    model = keras.Model(inputs, dense(x), name="three_channel")
    conv.set_weights([np.array([[[[1.0, -1.0, 0.0]]]], np.float32),
                      np.array([0.0, 4.0, 1.0], np.float32)])
    dense.set_weights([W.astype(np.float32), B.astype(np.float32)])
    return model


def activations_by_hand(x):
    return np.stack([relu(x), relu(4 - x), np.ones_like(x)], axis=-1)


def logits_by_hand(x):
    return activations_by_hand(x).mean(axis=(0, 1)) @ W + B


def test_scorecam_masks_by_hand():
    a = activations_by_hand(RAMP)
    masks = M.scorecam_masks(a, (3, 3))  # same size: upsampling changes nothing
    np.testing.assert_allclose(masks[0], RAMP / 8, rtol=1e-6)  # relu(x) spans 0..8
    np.testing.assert_allclose(masks[1], relu(4 - RAMP) / 4, rtol=1e-6)  # spans 0..4
    np.testing.assert_array_equal(masks[2], 0)  # constant: an all-zero mask
    # upsampled first: 2x2 -> 4x4 with pixel centres aligned puts input rows and columns at
    # 0, 0.25, 0.75, 1 (edges clamped), so [[0, 1], [2, 3]] becomes c + 2r, min 0, max 3
    frac = np.array([0, 0.25, 0.75, 1])
    grid = np.array([[0, 1], [2, 3]], np.float64)
    expected = (frac[None, :] + 2 * frac[:, None]) / 3
    two = np.stack([grid, -grid], axis=-1)
    masks = M.scorecam_masks(two, (4, 4))
    np.testing.assert_allclose(masks[0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(masks[1], 1 - expected, rtol=1e-6, atol=1e-7)  # min-max flips


def test_scorecam_weights_are_a_softmax_over_channels():
    s = np.array([[1.0, 2.0, 0.5], [-3.0, 0.0, 3.0]])
    w = M.scorecam_weights(s)
    np.testing.assert_allclose(w[0], np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum(),
                               rtol=1e-6)
    np.testing.assert_allclose(w.sum(axis=1), 1, rtol=1e-6)
    # a baseline score subtracted from every channel (the paper's f(X_b)) changes nothing
    np.testing.assert_allclose(M.scorecam_weights(s - 7.5), w, rtol=1e-6)
    np.testing.assert_allclose(M.scorecam_weights([1000.0, 1000.0]), [0.5, 0.5])  # no overflow


def recovered_weights(rawmap, activation):
    """The channel weights that make sum_k w_k A_k equal the map (the channels here are
    linearly independent, so they are unique)."""
    design = activation.reshape(-1, activation.shape[-1])
    weights, *_ = np.linalg.lstsq(design, rawmap.reshape(-1).astype(np.float64), rcond=None)
    return weights


@pytest.mark.parametrize("softmax_output", [False, True])
def test_scorecam_by_hand(softmax_output):
    model = three_channel_model(softmax_output)
    score = "probability" if softmax_output else "logit"
    x0 = RAMP
    x1 = np.random.default_rng(0).uniform(-2, 6, (3, 3))
    images = np.stack([x0, x1])[..., None].astype(np.float32)
    # the activation through Keras agrees with the closed form
    layer = keras.Model(model.input, model.get_layer("relu").output)
    np.testing.assert_allclose(backend.numpy(layer(images)),
                               np.stack([activations_by_hand(x0), activations_by_hand(x1)]),
                               rtol=1e-6, atol=1e-6)
    for targets in ([0, 1], [1, 0]):
        maps = raw(cam.ScoreCAM(model, "relu", score=score), images, targets=targets)
        for m, x, t in zip(maps, (x0, x1), targets):
            a = activations_by_hand(x)
            masks = [(a[..., k] - a[..., k].min()) / (a[..., k].max() - a[..., k].min())
                     for k in range(2)] + [np.zeros((3, 3))]  # channel 2 is constant
            scores = np.array([logits_by_hand(x * h) for h in masks])  # (3 channels, 2)
            if softmax_output:
                scores = softmax(scores)
            weights = softmax(scores[:, t])
            assert_rel_close(recovered_weights(m, a), weights, rtol=1e-5)
            assert_rel_close(m, a @ weights, rtol=1e-5)


def test_scorecam_first_image_worked_out():
    """Image 0..8, class 0: masks x/8, relu(4 - x)/4 and 0; masked images x^2/8,
    x relu(4 - x)/4 = (0, .75, 1, .75, 0, ...) and 0."""
    model = three_channel_model()
    m1 = RAMP ** 2 / 8
    m2 = RAMP * relu(4 - RAMP) / 4
    assert np.allclose(m2.reshape(-1)[:5], [0, 0.75, 1, 0.75, 0])
    s = np.array([relu(m).mean() * 1.0 + relu(4 - m).mean() * 2.0 + 0.5 + 0.5
                  for m in (m1, m2, np.zeros((3, 3)))])
    np.testing.assert_allclose(s[2], 4 * 2.0 + 0.5 + 0.5)  # the black image: A_1 = 4
    weights = np.exp(s) / np.exp(s).sum()
    expected = (weights[0] * RAMP + weights[1] * relu(4 - RAMP) + weights[2])
    result = cam.ScoreCAM(model, "relu").explain(RAMP[None, ..., None].astype(np.float32),
                                                 targets=0, upsample=False, normalize=False)
    np.testing.assert_allclose(result.raw[0], expected, rtol=1e-5)
    np.testing.assert_allclose(result.scores[0], logits_by_hand(RAMP), rtol=1e-6)


def test_scorecam_upsamples_a_coarser_grid():
    """A stride-2 2x2 conv makes a 3x3 grid on a 6x6 image: each mask is that channel
    upsampled to 6x6 and min-max normalised, and the scores of the masked images are worked
    out in numpy (the conv sums 2x2 blocks)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 1), name="image")
    conv = L.Conv2D(2, 2, strides=2, name="conv")
    x = L.ReLU(name="relu")(conv(inputs))
    dense = L.Dense(3, name="logits")
    model = keras.Model(inputs, dense(L.GlobalAveragePooling2D(name="gap")(x)))
    conv.set_weights([np.array([[1.0, -0.5], [0.25, 1.0], [0.5, -1.0], [-0.75, 0.5]],
                               np.float32).reshape(2, 2, 1, 2), np.array([0.0, 1.0], np.float32)])
    k, kb = [w.numpy().astype(np.float64) for w in conv.weights]
    d, db = [w.numpy().astype(np.float64) for w in dense.weights]

    def activation(image):  # (6, 6) -> (3, 3, 2)
        blocks = image.reshape(3, 2, 3, 2).transpose(0, 2, 1, 3)  # (3, 3, 2, 2)
        return relu(np.einsum("ijab,abo->ijo", blocks, k[..., 0, :]) + kb)

    images = np.random.default_rng(3).uniform(0, 2, (2, 6, 6, 1)).astype(np.float32)
    maps = raw(cam.ScoreCAM(model, "relu"), images, targets=2)
    for m, image in zip(maps, images[..., 0].astype(np.float64)):
        a = activation(image)
        up = M.upsample_maps(np.moveaxis(a, -1, 0), (6, 6)).astype(np.float64)
        assert np.ptp(a, axis=(0, 1)).min() > 0  # no constant channel here
        masks = [(u - u.min()) / (u.max() - u.min()) for u in up]
        scores = [activation(image * h).mean(axis=(0, 1)) @ d[:, 2] + db[2] for h in masks]
        assert_rel_close(m, a @ softmax(np.array(scores)), rtol=1e-5)


def test_top_variance_channels_by_hand():
    a = np.zeros((2, 2, 5))
    a[..., 0] = [[0, 1], [0, 1]]  # variance 0.25
    a[..., 1] = [[0, 4], [0, 0]]  # values 0, 4, 0, 0: mean 1, variance 3
    a[..., 2] = 7  # constant: 0
    a[..., 3] = [[1, 0], [0, 1]]  # 0.25, ties with channel 0
    a[..., 4] = [[-2, 2], [2, -2]]  # 4
    np.testing.assert_array_equal(M.top_variance_channels(a, 5), [4, 1, 0, 3, 2])
    np.testing.assert_array_equal(M.top_variance_channels(a, 2), [4, 1])
    with pytest.raises(ValueError, match="between 1 and 5"):
        M.top_variance_channels(a, 6)


@pytest.fixture(scope="module")
def four_channel_model():
    """image (4x4x1) -> 1x1 conv (slopes 1, 3, 0.5, -2; biases 0, 0, 0, 10) -> ReLU -> GAP ->
    Dense(2): on the ramp 0..15 the channels' variances are known."""
    inputs = keras.Input((4, 4, 1), name="image")
    conv = L.Conv2D(4, 1, name="conv")
    x = L.ReLU(name="relu")(conv(inputs))
    dense = L.Dense(2, name="logits")
    model = keras.Model(inputs, dense(L.GlobalAveragePooling2D(name="gap")(x)))
    conv.set_weights([np.array([[[[1.0, 3.0, 0.5, -2.0]]]], np.float32),
                      np.array([0.0, 0.0, 0.0, 10.0], np.float32)])
    dense.set_weights([np.array([[0.1, -0.2], [0.05, 0.1], [0.3, 0.2], [-0.1, 0.15]],
                                np.float32), np.zeros(2, np.float32)])
    return model


def test_scorecam_top_channels(four_channel_model):
    x = np.arange(16, dtype=np.float64).reshape(4, 4)
    a = np.stack([x, 3 * x, 0.5 * x, relu(10 - 2 * x)], axis=-1)
    # variances: x on 0..15 has 21.25, so 21.25, 191.25, 5.3125; relu(10 - 2x) is
    # 10, 8, 6, 4, 2 and eleven zeros: mean 1.875, variance 220/16 - 1.875^2 = 10.234375
    np.testing.assert_allclose(a.reshape(-1, 4).var(axis=0),
                               [21.25, 191.25, 5.3125, 10.234375])
    kernel = four_channel_model.get_layer("logits").weights[0].numpy().astype(np.float64)

    def score(image):  # class 1
        acts = np.stack([relu(image), relu(3 * image), relu(0.5 * image),
                         relu(10 - 2 * image)], axis=-1)
        return acts.mean(axis=(0, 1)) @ kernel[:, 1]

    masks = [(a[..., k] - a[..., k].min()) / np.ptp(a[..., k]) for k in range(4)]
    image = x[None, ..., None].astype(np.float32)
    for channels, chosen in [(2, [1, 0]), (3, [1, 0, 3]), (None, [0, 1, 2, 3])]:
        explainer = cam.ScoreCAM(four_channel_model, "relu", channels=channels, batch_size=2)
        n = len(chosen)
        assert explainer.channels_used == explainer.evaluations_per_image == n
        assert f"channels={n} of 4" in repr(explainer)
        picked = backend.numpy(explainer.selected_channels(a[None].astype(np.float32)))[0]
        np.testing.assert_array_equal(np.sort(picked), sorted(chosen))
        if channels is not None:  # the device's choice is the NumPy reference's, in order
            np.testing.assert_array_equal(picked, M.top_variance_channels(a, channels))
        weights = np.zeros(4)
        weights[chosen] = softmax(np.array([score(x * masks[k]) for k in chosen]))
        m = raw(explainer, image, targets=1)[0]
        assert_rel_close(m, a @ weights, rtol=1e-5)


def test_scorecam_batches_and_mode_do_not_change_the_map(four_channel_model):
    x = np.random.default_rng(6).uniform(-1, 12, (3, 4, 4, 1)).astype(np.float32)
    reference = raw(cam.ScoreCAM(four_channel_model, "relu"), x)
    assert np.abs(reference).max() > 0
    for kwargs in ({"batch_size": 1}, {"batch_size": 3}, {"mode": "full"}):
        assert_rel_close(raw(cam.ScoreCAM(four_channel_model, "relu", **kwargs), x), reference,
                         rtol=1e-5)


def test_scorecam_output_shapes(four_channel_model):
    x = np.random.default_rng(6).uniform(0, 9, (2, 4, 4, 1)).astype(np.float32)
    result = cam.ScoreCAM(four_channel_model, "relu").explain(x)
    assert result.maps.shape == (2, 4, 4) and result.raw.shape == (2, 4, 4)
    assert result.layer == "relu" and result.method == "Score-CAM"
    assert result.maps.min() >= 0 and result.maps.max() <= 1


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"channels": 0}, r"channels must be None \(every channel\) or an int between 1 and 4 "
                          r"\(layer 'relu' has 4 channels\), got 0"),
        ({"channels": -1}, "channels must be None .* between 1 and 4"),
        ({"channels": 5}, "channels must be None .* between 1 and 4"),
        ({"channels": 1.5}, "channels must be None .* between 1 and 4"),
        ({"channels": 2.0}, "channels must be None .* between 1 and 4"),
        ({"channels": True}, "channels must be None .* between 1 and 4"),
        ({"channels": "2"}, "channels must be None .* between 1 and 4"),
        ({"batch_size": 0}, "batch_size must be None .* or an int >= 1"),
        ({"batch_size": -4}, "batch_size must be None .* or an int >= 1"),
        ({"batch_size": 8.0}, "batch_size must be None .* or an int >= 1"),
    ],
)
def test_scorecam_errors(four_channel_model, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        cam.ScoreCAM(four_channel_model, "relu", **kwargs)


def test_registered_names():
    assert cam.method_class("Occlusion") is cam.Occlusion
    assert cam.method_class("Score-CAM") is cam.ScoreCAM
    assert cam.method_class("score_cam") is cam.ScoreCAM


def test_the_compiled_scoring_functions_trace_once(four_channel_model, linear_model):
    """Every call has one shape: the rows (image, mask pairs) are spread evenly over the
    calls and the last is padded: 3 images x 4 channels in 4 calls of 3, 3 images x 12
    occlusions in 8 calls of 5. A second explain traces nothing more."""
    x = np.random.default_rng(7).uniform(0, 9, (3, 4, 4, 1)).astype(np.float32)
    scorecam = cam.ScoreCAM(four_channel_model, "relu", batch_size=3)
    occlusion = cam.Occlusion(linear_model, window=3, stride=2, batch_size=5)
    # the compiled functions are shared by every explainer on the model: count from here
    traces = [scorecam.scorer.traces, occlusion.scorer.traces]
    calls = [scorecam.scorer.calls, occlusion.scorer.calls]
    for _ in range(2):
        scorecam(x)
        occlusion(images_7x9(3))
    assert [scorecam.scorer.calls - calls[0], occlusion.scorer.calls - calls[1]] == [8, 16]
    # PyTorch runs eagerly unless CAM_TORCH_COMPILE=1: nothing is traced, and traces says so
    if scorecam.scorer.traces is None:
        assert backend.name() == "torch"
        return
    assert scorecam.scorer.traces - traces[0] <= 1
    assert occlusion.scorer.traces - traces[1] <= 1
