"""Grad-CAM, Ablation-CAM and FastAblationCAM: maths by hand, head-only == full-model oracle,
properties on random tiny models, and one error table that every method goes through."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers as L

import cam
from cam import backend
from conftest import assert_rel_close, raw

#: Every registered method: the shared tests below run each of them.
METHODS = {key: cam.method_class(key) for key in cam.METHODS}
ABLATION_METHODS = ("ablationcam", "fastablationcam")

PROPERTY = settings(max_examples=10, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow])




def activation_of(model, layer, images) -> np.ndarray:
    return backend.numpy(keras.Model(model.input, model.get_layer(layer).output)(images))


def dense_weights(model, name="logits"):
    kernel, bias = model.get_layer(name).weights
    return kernel.numpy().astype(np.float64), bias.numpy().astype(np.float64)


# --------------------------------------------------------------------------- hand-made model


@pytest.fixture(scope="module")
def two_channel_model():
    """image (3x3x1) -> 1x1 conv with fixed weights -> ReLU -> GAP -> Dense(2), fixed weights.

    A_0 = relu(x), A_1 = relu(4 - x); logits y = mean(A) @ W + b with
    W = [[1, 0.5], [2, -1]], b = [0.5, 0].
    """
    inputs = keras.Input((3, 3, 1), name="image")
    conv = L.Conv2D(2, 1, name="conv")
    x = L.ReLU(name="relu")(conv(inputs))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    dense = L.Dense(2, name="logits")
    model = keras.Model(inputs, dense(x), name="two_channel")
    conv.set_weights([np.array([[[[1.0, -1.0]]]], np.float32), np.array([0.0, 4.0], np.float32)])
    dense.set_weights([np.array([[1.0, 0.5], [2.0, -1.0]], np.float32),
                       np.array([0.5, 0.0], np.float32)])
    return model


RAMP = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # x = 0..8
A0 = np.arange(9, dtype=np.float64).reshape(3, 3)  # relu(x)
A1 = np.maximum(4 - A0, 0)  # relu(4 - x) = 4, 3, 2, 1, 0, 0, 0, 0, 0; mean 10/9


def test_ablation_cam_by_hand(two_channel_model):
    explainer = cam.AblationCAM(two_channel_model, "relu")
    # class 0: y = 1*4 + 2*(10/9) + 0.5. Zeroing channel 0 removes 1*4, channel 1 removes
    # 2*10/9, so w = (4/y, (20/9)/y) and the map is (4 A_0 + 20/9 A_1) / y.
    y0 = 4 + 20 / 9 + 0.5
    expected0 = (4 * A0 + 20 / 9 * A1) / y0
    # class 1: y = 0.5*4 - 1*(10/9) = 8/9; drops 2 and -10/9: w = (9/4, -5/4).
    expected1 = 9 / 4 * A0 - 5 / 4 * A1
    result = explainer.explain(np.concatenate([RAMP, RAMP]), targets=[0, 1], upsample=False,
                               normalize=False)
    maps = result.raw
    np.testing.assert_allclose(maps[0], expected0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps[1], expected1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.scores[0], [y0, 8 / 9], rtol=1e-6)
    np.testing.assert_array_equal(result.targets, [0, 1])
    np.testing.assert_array_equal(result.maps, maps)  # upsample=False, normalize=False


def test_ablation_cam_by_numpy_on_random_inputs(two_channel_model):
    x = np.random.default_rng(0).uniform(-2, 6, (3, 3, 3, 1)).astype(np.float32)
    kernel, bias = dense_weights(two_channel_model)
    a = np.stack([np.maximum(x[..., 0], 0), np.maximum(4 - x[..., 0], 0)], -1).astype(np.float64)
    targets = np.array([0, 1, 1])
    y = a.mean(axis=(1, 2)) @ kernel + bias  # (B, classes)
    for k in range(2):
        ablated = a.copy()
        ablated[..., k] = 0
        y_k = ablated.mean(axis=(1, 2)) @ kernel + bias
        if k == 0:
            drops = np.zeros((3, 2))
        drops[:, k] = (y - y_k)[np.arange(3), targets]
    weights = drops / y[np.arange(3), targets][:, None]
    expected = np.einsum("bhwk,bk->bhw", a, weights)
    maps = raw(cam.AblationCAM(two_channel_model, "relu", batch_size=1), x, targets=targets)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)


def test_gradcam_by_hand(two_channel_model):
    # dy_c/dA_k(i, j) = W[k, c] / 9 everywhere: weights W[:, c] / 9.
    maps = raw(cam.GradCAM(two_channel_model, "relu"), np.concatenate([RAMP, RAMP]),
               targets=[0, 1])
    np.testing.assert_allclose(maps[0], (1 * A0 + 2 * A1) / 9, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps[1], (0.5 * A0 - 1 * A1) / 9, rtol=1e-5, atol=1e-6)


def test_fast_ablation_cam_window_1_by_hand(two_channel_model):
    # Zeroing cell (i, j) in both channels lowers mean(A_k) by A_k(i, j) / 9.
    maps = raw(cam.FastAblationCAM(two_channel_model, "relu"), RAMP, targets=0)
    np.testing.assert_allclose(maps[0], (A0 + 2 * A1) / 9, rtol=1e-5, atol=1e-6)


def test_fast_ablation_cam_window_2_averages_overlapping_windows(two_channel_model):
    cell = (0.5 * A0 - 1 * A1) / 9  # class 1: each cell's own contribution to y
    # 2x2 windows at (0,0), (0,1), (1,0), (1,1); each drops the sum of its four cells, and
    # each cell gets the mean over the windows that cover it.
    window_drop = {(i, j): cell[i:i + 2, j:j + 2].sum() for i in (0, 1) for j in (0, 1)}
    expected = np.zeros((3, 3))
    for r, c in itertools.product(range(3), range(3)):
        covering = [d for (i, j), d in window_drop.items() if i <= r < i + 2 and j <= c < j + 2]
        expected[r, c] = np.mean(covering)
    maps = raw(cam.FastAblationCAM(two_channel_model, "relu", window=2, stride=1), RAMP,
               targets=1)
    np.testing.assert_allclose(maps[0], expected, rtol=1e-5, atol=1e-6)
    # stride 2 on a 3-cell axis gives starts [0, 1]: the same four windows
    maps2 = raw(cam.FastAblationCAM(two_channel_model, "relu", window=2), RAMP, targets=1)
    np.testing.assert_allclose(maps2, maps, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [1.5, -2.0])
def test_ablation_value_sets_not_multiplies(two_channel_model, value):
    kernel, _ = dense_weights(two_channel_model)
    # Setting cell (i, j) of channel k to c changes mean(A_k) by (A_k(i, j) - c) / 9.
    fast = raw(cam.FastAblationCAM(two_channel_model, "relu", ablation_value=value), RAMP,
               targets=0)
    expected = (kernel[0, 0] * (A0 - value) + kernel[1, 0] * (A1 - value)) / 9
    np.testing.assert_allclose(fast[0], expected, rtol=1e-5, atol=1e-6)
    # Ablation-CAM: channel k set to c everywhere: y_k = y - W[k, 0] (mean(A_k) - c).
    y = 4 + 20 / 9 + 0.5
    drops = np.array([kernel[0, 0] * (4 - value), kernel[1, 0] * (10 / 9 - value)])
    expected = (drops[0] * A0 + drops[1] * A1) / y
    abl = raw(cam.AblationCAM(two_channel_model, "relu", ablation_value=value), RAMP, targets=0)
    np.testing.assert_allclose(abl[0], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- CAM identity


@pytest.mark.parametrize("fixture", ["gap_head_model", "gap_head_softmax_model"])
def test_fast_ablation_equals_gradcam_equals_cam_on_gap_head(request, fixture, images_like):
    """On GAP + Dense, FastAblationCAM (window 1) == Grad-CAM == CAM / (h w) exactly."""
    model = request.getfixturevalue(fixture)
    x = images_like(model, 3, seed=7)
    targets = [0, 3, 1]
    a = activation_of(model, "relu", x).astype(np.float64)  # (B, 8, 8, 5), post-ReLU
    kernel, _ = dense_weights(model)
    h, w = a.shape[1:3]
    class_activation_map = np.einsum("bhwk,kb->bhw", a, kernel[:, targets])
    expected = class_activation_map / (h * w)
    assert np.abs(expected).max() > 1e-3  # a map worth comparing
    fast = raw(cam.FastAblationCAM(model, "relu", window=1, score="logit"), x, targets=targets)
    grad = raw(cam.GradCAM(model, "relu", score="logit"), x, targets=targets)
    assert fast.shape == grad.shape == (3, h, w)
    assert_rel_close(fast, expected, rtol=1e-4)
    assert_rel_close(grad, expected, rtol=1e-4)
    assert_rel_close(fast, grad, rtol=1e-4)


# --------------------------------------------------------------------------- head == full

HEAD_FULL_CONFIGS = {
    "gradcam": ("gradcam", {}),
    "ablationcam": ("ablationcam", {"batch_size": 3}),
    "fast-w1": ("fastablationcam", {"window": 1, "batch_size": 16}),
    "fast-w2-s1": ("fastablationcam", {"window": 2, "stride": 1, "batch_size": 7}),
    "fast-w2-s2": ("fastablationcam", {"window": 2, "stride": 2}),
    "fast-w3-s1": ("fastablationcam", {"window": 3, "stride": 1}),
    "fast-w3-s3": ("fastablationcam", {"window": 3, "stride": 3, "batch_size": 2}),
}


@pytest.mark.parametrize("config", list(HEAD_FULL_CONFIGS))
def test_head_only_equals_full_model(case, config):
    """The trunk/head path gives the maps of rerunning the whole network (mode='full')."""
    method, kwargs = HEAD_FULL_CONFIGS[config]
    x = case.images(2, seed=11)
    targets = [0, 2]
    head = METHODS[method](case.model, case.layer, mode="head", **kwargs)
    full = METHODS[method](case.model, case.layer, mode="full", **kwargs)
    head_maps = raw(head, x, targets=targets)
    full_maps = raw(full, x, targets=targets)
    assert head_maps.shape == (2, *case.grid)
    assert np.abs(full_maps).max() > 0, "degenerate test: the oracle map is all zero"
    assert_rel_close(head_maps, full_maps, rtol=1e-4)
    # the normalised, upsampled maps agree as well
    np.testing.assert_allclose(head(x, targets=targets), full(x, targets=targets), atol=1e-4)


@pytest.mark.parametrize("method", ABLATION_METHODS)
def test_head_only_equals_full_model_probability_score(dense_concat_model, method):
    x = np.random.default_rng(3).standard_normal((2, 10, 10, 3)).astype(np.float32)
    kwargs = {"score": "probability", "batch_size": 8}
    head = raw(METHODS[method](dense_concat_model, "relu1", **kwargs), x)
    full = raw(METHODS[method](dense_concat_model, "relu1", mode="full", **kwargs), x)
    assert np.abs(full).max() > 0
    assert_rel_close(head, full, rtol=1e-4)


# --------------------------------------------------------------------------- properties


@st.composite
def tiny_conv_models(draw):
    """The recipe of a random conv net: grid 3-8 (not always square), 1-6 channels, a chain,
    a concatenation or an addition past the target, and a weight seed. The model itself is
    built in the test by :func:`build_random_model` (Keras draws from ``random`` while
    building, which Hypothesis does not allow inside a strategy)."""
    return {
        "grid": (draw(st.integers(3, 8)), draw(st.integers(3, 8))),
        "c_in": draw(st.integers(1, 3)),
        "c1": draw(st.integers(1, 6)),
        "c2": draw(st.integers(1, 6)),
        "classes": draw(st.integers(2, 4)),
        "topology": draw(st.sampled_from(["chain", "concat", "add"])),
        "seed": draw(st.integers(0, 2**20)),
    }


def build_random_model(spec):
    """conv0 -> ReLU ("relu", the target) -> 1x1 conv -> [concat/add with conv0] -> ReLU ->
    GAP -> Dense, all weights N(0, 0.7); and two N(0, 1) images."""
    (gh, gw), c_in, c1, topology = spec["grid"], spec["c_in"], spec["c1"], spec["topology"]
    keras.utils.set_random_seed(spec["seed"])
    inputs = keras.Input((gh, gw, c_in), name="image")
    x0 = L.Conv2D(c1, 3, padding="same", name="conv0")(inputs)
    x = L.ReLU(name="relu")(x0)
    x = L.Conv2D(c1 if topology == "add" else spec["c2"], 1, name="mix")(x)
    if topology == "concat":
        x = L.Concatenate(name="concat")([x0, x])
    elif topology == "add":
        x = L.Add(name="add")([x0, x])
    x = L.ReLU(name="relu_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(spec["classes"], name="logits")(x)
    model = keras.Model(inputs, outputs, name=f"random_{topology}")
    rng = np.random.default_rng(spec["seed"])
    model.set_weights([rng.normal(0, 0.7, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    images = rng.standard_normal((2, gh, gw, c_in)).astype(np.float32)
    return model, images


@pytest.mark.parametrize("method, kwargs", [("fastablationcam", {"window": 2, "stride": 1}),
                                            ("reciprocam", {"gaussian": True})])
def test_images_scored_together_equal_one_at_a_time(case, method, kwargs):
    """Several images' ablations share one compiled call when they fit the batch (5 images,
    3 a call: 2 calls, the last padded), in both modes; the maps are those of one image a
    call (5 calls)."""
    x = case.images(5, seed=3)
    targets = [0, 1, 2, 1, 0]
    n = METHODS[method](case.model, case.layer, **kwargs).evaluations_per_image
    for mode in ("head", "full"):
        together = METHODS[method](case.model, case.layer, batch_size=3 * n, mode=mode,
                                   **kwargs)
        alone = METHODS[method](case.model, case.layer, batch_size=n, mode=mode, **kwargs)
        scorer = together.scorer
        before = scorer.calls
        grouped = raw(together, x, targets=targets)
        assert scorer.calls - before == 2
        before = scorer.calls
        assert_rel_close(grouped, raw(alone, x, targets=targets), rtol=1e-5)
        assert scorer.calls - before == 5


@PROPERTY
@given(data=st.data(), spec=tiny_conv_models())
def test_property_head_equals_full(data, spec):
    model, images = build_random_model(spec)
    h, w = images.shape[1:3]
    method = data.draw(st.sampled_from(ABLATION_METHODS), label="method")
    kwargs = {"batch_size": data.draw(st.integers(1, 40), label="batch_size")}
    if method == "fastablationcam":
        kwargs["window"] = data.draw(st.integers(1, min(h, w)), label="window")
        kwargs["stride"] = data.draw(st.integers(1, kwargs["window"]), label="stride")
    targets = data.draw(st.lists(st.integers(0, model.output_shape[-1] - 1), min_size=2,
                                 max_size=2), label="targets")
    head = raw(METHODS[method](model, "relu", **kwargs), images, targets=targets)
    full = raw(METHODS[method](model, "relu", mode="full", **kwargs), images, targets=targets)
    assert head.shape == (2, h, w)
    assert_rel_close(head, full, rtol=1e-4)


@PROPERTY
@given(data=st.data(), spec=tiny_conv_models())
def test_property_fast_ablation_maps_do_not_depend_on_batch_size(data, spec):
    model, images = build_random_model(spec)
    h, w = images.shape[1:3]
    window = data.draw(st.integers(1, min(h, w)), label="window")
    stride = data.draw(st.integers(1, window), label="stride")
    b1, b2 = data.draw(st.integers(1, 70), label="b1"), data.draw(st.integers(1, 70), label="b2")
    maps = [raw(cam.FastAblationCAM(model, "relu", window=window, stride=stride, batch_size=b),
                images) for b in (b1, b2)]
    assert_rel_close(maps[0], maps[1], rtol=1e-5)


@PROPERTY
@given(data=st.data(), spec=tiny_conv_models())
def test_property_normalised_maps_and_shapes(data, spec):
    model, images = build_random_model(spec)
    n, height, width = images.shape[:3]
    method = data.draw(st.sampled_from(list(METHODS)), label="method")
    kwargs = {}
    if method == "fastablationcam":
        kwargs["window"] = data.draw(st.integers(1, min(height, width)), label="window")
    explainer = METHODS[method](model, "relu", **kwargs)
    maps = explainer(images)
    assert maps.shape == (n, height, width) and maps.dtype == np.float32
    small = explainer(images, upsample=False)
    assert small.shape == (n, height, width)  # the target grid is the image grid here
    for m in (small, raw(explainer, images)):
        assert np.isfinite(m).all()
    for m in small:
        assert m.min() >= 0 and m.max() <= 1
        assert m.max() == 1 or not m.any()
    # normalising is ReLU then divide by the max of the raw map
    rawmap = raw(explainer, images)
    peak = np.maximum(rawmap, 0).reshape(n, -1).max(axis=1)
    for r, m, p in zip(rawmap, small, peak):
        if p > 0:
            np.testing.assert_allclose(m, np.maximum(r, 0) / p, rtol=1e-5, atol=1e-6)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6


@pytest.mark.parametrize("method", list(METHODS))
def test_output_shapes_with_a_coarser_grid(method, non_square_model):
    x = np.random.default_rng(1).standard_normal((3, 12, 16, 3)).astype(np.float32)
    explainer = METHODS[method](non_square_model, "relu2")
    # the map's own grid: the layer's, or the image's for a method on pixels (occlusion)
    grid = (12, 16) if explainer.layer == "input" else (6, 8)
    assert explainer(x).shape == (3, 12, 16)
    assert explainer(x, upsample=False).shape == (3, *grid)
    assert raw(explainer, x).shape == (3, *grid)


# --------------------------------------------------------------------------- error table


@pytest.fixture(params=list(METHODS))
def method(request):
    return request.param


class TestErrors:
    """Every method through the same table of bad arguments (like tf-keras-vis' tests)."""

    @pytest.fixture
    def explainer(self, method, gap_head_model):
        return METHODS[method](gap_head_model, "relu")

    @pytest.fixture
    def images(self, images_like, gap_head_model):
        return images_like(gap_head_model, 2)

    # -- construction ---------------------------------------------------------------------

    @pytest.mark.parametrize(
        "kwargs, exc, phrase",
        [
            ({"layer": "rellu"}, ValueError, "no layer named 'rellu'"),
            ({"layer": "gap"}, ValueError, "no spatial grid"),
            ({"layer": "logits"}, ValueError, "no spatial grid"),
            ({"layer": 7}, ValueError, "out of range"),
            ({"layer": -9}, ValueError, "out of range"),
            ({"layer": 2.0}, TypeError, "layer must be a name"),
            ({"score": "logits"}, ValueError, "score must be 'logit' or 'probability'"),
            ({"score": "probability"}, ValueError, "needs a model whose last layer"),
            ({"mode": "fast"}, ValueError, "mode must be one of"),
            ({"mode": None}, ValueError, "mode must be one of"),
        ],
    )
    def test_bad_construction(self, method, gap_head_model, kwargs, exc, phrase):
        kwargs = {"layer": "relu", **kwargs}
        with pytest.raises(exc, match=phrase):
            METHODS[method](gap_head_model, **kwargs)

    def test_unknown_layer_lists_the_close_name(self, method, gap_head_model):
        with pytest.raises(ValueError) as info:
            METHODS[method](gap_head_model, "rellu")
        assert "'relu'" in str(info.value)

    @pytest.mark.parametrize("method", ABLATION_METHODS)
    @pytest.mark.parametrize(
        "kwargs, phrase",
        [
            ({"batch_size": 0}, "batch_size must be None .* or an int >= 1"),
            ({"batch_size": -4}, "batch_size must be None .* or an int >= 1"),
            ({"batch_size": 2.5}, "batch_size must be None .* or an int >= 1"),
            ({"batch_size": 8.0}, "batch_size must be None .* or an int >= 1"),
            ({"batch_size": True}, "batch_size must be None .* or an int >= 1"),
            ({"batch_size": "8"}, "batch_size must be None .* or an int >= 1"),
            ({"ablation_value": float("nan")}, "ablation_value must be finite"),
            ({"ablation_value": float("inf")}, "ablation_value must be finite"),
        ],
    )
    def test_bad_ablation_arguments(self, method, gap_head_model, kwargs, phrase):
        with pytest.raises(ValueError, match=phrase):
            METHODS[method](gap_head_model, "relu", **kwargs)

    @pytest.mark.parametrize(
        "kwargs, phrase",
        [
            ({"window": 0}, "window must be an int >= 1"),
            ({"window": -2}, "window must be an int >= 1"),
            ({"window": 9}, "window 9 is larger than"),  # the grid is 8x8
            ({"window": 1.5}, "window must be an int"),
            ({"window": None}, "window must be an int"),
            ({"window": 2, "stride": 3}, r"stride must be an int between 1 and 2 \(the window"),
            ({"window": 3, "stride": 0}, r"stride must be an int between 1 and 3 \(the window"),
            ({"window": 3, "stride": -1}, r"stride must be an int between 1 and 3 \(the window"),
            ({"window": 3, "stride": 1.0}, "stride must be an int"),
        ],
    )
    def test_bad_window_or_stride(self, gap_head_model, kwargs, phrase):
        with pytest.raises(ValueError, match=phrase):
            cam.FastAblationCAM(gap_head_model, "relu", **kwargs)

    def test_window_equal_to_grid_is_allowed(self, gap_head_model, images):
        maps = raw(cam.FastAblationCAM(gap_head_model, "relu", window=8), images, targets=0)
        # one window over the whole grid: every cell gets the same drop
        np.testing.assert_allclose(maps, np.broadcast_to(maps[:, :1, :1], maps.shape))

    # -- images ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "make, exc, phrase",
        [
            (lambda x: x[0], ValueError, "for one image use images\\[None\\]"),  # rank 3
            (lambda x: x[..., None], ValueError, "rank 4"),
            (lambda x: np.zeros((2, 9, 8, 3), np.float32), ValueError, "to fit the model's"),
            (lambda x: np.zeros((2, 8, 7, 3), np.float32), ValueError, "to fit the model's"),
            (lambda x: x[..., :1], ValueError, "to fit the model's"),  # 1 channel, not 3
            (lambda x: x > 0, TypeError, "real-valued numeric"),
            (lambda x: x.astype(object), TypeError, "real-valued numeric"),
            (lambda x: x.astype(np.complex64), TypeError, "real-valued numeric"),
            (lambda x: np.full((2, 8, 8, 3), "a"), TypeError, "real-valued numeric"),
            (lambda x: x[:0], ValueError, "empty batch"),
        ],
        ids=["rank3", "rank5", "height", "width", "channels", "bool", "object", "complex",
             "str", "empty"],
    )
    def test_bad_images(self, explainer, images, make, exc, phrase):
        with pytest.raises(exc, match=phrase):
            explainer(make(images))

    @pytest.mark.parametrize("dtype", [np.float64, np.float16, np.uint8, np.int32])
    def test_other_numeric_dtypes_are_accepted(self, explainer, images, dtype):
        x = np.clip(images * 3, 0, 255).astype(dtype)
        maps = explainer(x, targets=1)
        expected = explainer(x.astype(np.float32), targets=1)
        np.testing.assert_allclose(maps, expected, atol=1e-6)

    # -- targets --------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "targets, phrase",
        [
            (4, "target 4 is out of range"),  # 4 classes: 0..3
            (-1, "target -1 is out of range"),
            ([0, 4], "target 4 is out of range"),
            ([-2, 1], "target -2 is out of range"),
            (np.int64(17), "target 17 is out of range"),
        ],
    )
    def test_target_out_of_range(self, explainer, images, targets, phrase):
        with pytest.raises(ValueError, match=phrase) as info:
            explainer(images, targets=targets)
        assert "valid targets are 0..3" in str(info.value)

    @pytest.mark.parametrize(
        "targets",
        [[0], [0, 1, 2], [], [[0, 1]], np.zeros((2, 1), int), [0.0, 1.0], [0.5, 1], 1.0,
         "0", True],
        ids=["short", "long", "empty", "nested", "column", "floats", "fraction", "float",
             "str", "bool"],
    )
    def test_targets_of_wrong_length_or_type(self, explainer, images, targets):
        with pytest.raises(ValueError, match=r"targets must be None, an int, 2 ints \(one per image\)"):
            explainer(images, targets=targets)


# --------------------------------------------------------------------------- targets


class TestTargets:
    @pytest.fixture
    def setup(self, method, residual_add_model):
        explainer = METHODS[method](residual_add_model, "relu_a", batch_size=32) \
            if method in ABLATION_METHODS else METHODS[method](residual_add_model, "relu_a")
        x = np.random.default_rng(5).standard_normal((3, 10, 10, 3)).astype(np.float32)
        return explainer, x, backend.numpy(residual_add_model(x))

    def test_none_explains_the_predicted_class(self, setup):
        explainer, x, logits = setup
        result = explainer.explain(x, upsample=False, normalize=False)
        maps = result.raw
        predicted = logits.argmax(axis=1)
        np.testing.assert_array_equal(result.targets, predicted)
        np.testing.assert_array_equal(result.predicted, predicted)
        np.testing.assert_allclose(result.scores, logits, rtol=1e-5, atol=1e-6)
        assert result.method == explainer.name and result.layer == explainer.layer
        np.testing.assert_allclose(maps, raw(explainer, x, targets=list(predicted)), atol=1e-7)

    @pytest.mark.parametrize("target", [0, 2, np.int64(1)])
    def test_int_applies_to_every_image(self, setup, target):
        explainer, x, _ = setup
        result = explainer.explain(x, targets=target, upsample=False, normalize=False)
        maps = result.raw
        np.testing.assert_array_equal(result.targets, [int(target)] * 3)
        assert result.targets.dtype.kind == "i"
        np.testing.assert_allclose(maps, raw(explainer, x, targets=[int(target)] * 3), atol=1e-7)

    def test_list_gives_one_target_per_image(self, setup):
        explainer, x, _ = setup
        targets = [2, 0, 1]
        result = explainer.explain(x, targets=targets, upsample=False, normalize=False)
        maps = result.raw
        np.testing.assert_array_equal(result.targets, targets)
        for i, t in enumerate(targets):
            alone = explainer.explain(x[i:i + 1], targets=t, upsample=False, normalize=False)
            # relative to the map's scale: batch size changes the trunk's float32 rounding
            assert_rel_close(maps[i], alone.raw[0], rtol=1e-5)
            np.testing.assert_array_equal(alone.targets, [t])
        # the target matters: another class gives another map
        other = raw(explainer, x, targets=[0, 1, 2])
        assert not np.allclose(maps[0], other[0], atol=1e-6)

    def test_numpy_array_targets(self, setup):
        explainer, x, _ = setup
        result = explainer.explain(x, targets=np.array([1, 1, 0]), upsample=False,
                                   normalize=False)
        np.testing.assert_allclose(result.raw, raw(explainer, x, targets=[1, 1, 0]), atol=1e-7)
        np.testing.assert_array_equal(result.targets, [1, 1, 0])


@pytest.mark.parametrize("method", ["gradcam", "fastablationcam"])
def test_more_images_than_one_trunk_call(method, gap_head_model, monkeypatch):
    """Targets are matched to images across the trunk's calls, whose size the memory budget
    sets (here 3 images a call: 8 images in 3 calls, the last padded)."""
    kwargs = {"window": 2} if method == "fastablationcam" else {}
    explainer = METHODS[method](gap_head_model, "relu", **kwargs)
    monkeypatch.setenv("CAM_MEMORY_BUDGET", str(3 * explainer.split.bytes_per_row("trunk")))
    assert explainer.rows_per_call("trunk") == 3
    n = 8
    x = np.random.default_rng(8).standard_normal((n, 8, 8, 3)).astype(np.float32)
    targets = [i % 4 for i in range(n)]
    calls = explainer._trunk.calls
    result = explainer.explain(x, targets=targets, upsample=False, normalize=False)
    assert explainer._trunk.calls - calls == 3
    maps = result.raw
    assert maps.shape == (n, 8, 8)
    np.testing.assert_array_equal(result.targets, targets)
    for i in (0, 2, 3, n - 1):
        alone = raw(explainer, x[i:i + 1], targets=targets[i])
        np.testing.assert_allclose(maps[i], alone[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, targets=targets[:-1] + [4])


# --------------------------------------------------------------------------- misc


def test_repeated_calls_give_identical_maps(method, dense_concat_model):
    explainer = METHODS[method](dense_concat_model, "relu1")
    x = np.random.default_rng(9).standard_normal((2, 10, 10, 3)).astype(np.float32)
    first = explainer(x)
    second = explainer(x)
    assert np.array_equal(first, second)
    assert first.any()
    assert np.array_equal(raw(explainer, x), raw(explainer, x))


def test_grayscale_model(method):
    keras.utils.set_random_seed(12)
    inputs = keras.Input((10, 10, 1), name="gray")
    x = L.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = L.ReLU(name="relu")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(2, name="logits")(x))
    images = np.random.default_rng(12).uniform(0, 1, (2, 10, 10, 1)).astype(np.float32)
    explainer = METHODS[method](model, "pool")
    maps = explainer(images)
    assert maps.shape == (2, 10, 10)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    grid = (10, 10) if explainer.layer == "input" else (5, 5)
    assert explainer(images, upsample=False).shape == (2, *grid)


def test_model_is_unchanged_by_explaining(method, gap_head_softmax_model, images_like):
    x = images_like(gap_head_softmax_model, 2, seed=4)
    before = backend.numpy(gap_head_softmax_model(x))
    METHODS[method](gap_head_softmax_model, "relu")(x)
    after = backend.numpy(gap_head_softmax_model(x))
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-5)


def test_explain_shortcut_matches_the_class(gap_head_model, images_like):
    x = images_like(gap_head_model, 2)
    direct = cam.GradCAM(gap_head_model, "relu")(x, targets=1, upsample=False)
    short = cam.explain("Grad-CAM", gap_head_model, x, layer="relu", targets=1, upsample=False)
    np.testing.assert_allclose(short, direct, atol=1e-7)
    with pytest.raises(ValueError, match="unknown method"):
        cam.explain("lime", gap_head_model, x)


def test_fast_ablation_evaluations_per_image():
    """(h / stride) * (w / stride) head evaluations, counting the shifted-back last window."""
    model = build_random_model({"grid": (5, 7), "c_in": 1, "c1": 2, "c2": 2, "classes": 2,
                                "topology": "chain", "seed": 0})[0]
    assert cam.FastAblationCAM(model, "relu").evaluations_per_image == 35
    # window 2: rows [0, 2, 3], cols [0, 2, 4, 5]
    assert cam.FastAblationCAM(model, "relu", window=2).evaluations_per_image == 12
    assert cam.AblationCAM(model, "relu").evaluations_per_image == 2  # one per channel


def _dynamic_size_model():
    keras.utils.set_random_seed(13)
    inputs = keras.Input((None, None, 3), name="image")
    x = L.ReLU(name="relu")(L.Conv2D(3, 3, padding="same", name="conv")(inputs))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(2, name="logits")(x), name="dynamic")


@pytest.mark.parametrize("method", list(METHODS))
def test_model_with_unknown_image_size(method):
    """Like build_densenet169(image_size=None): any image size, maps at that size."""
    explainer = METHODS[method](_dynamic_size_model(), "relu")
    rng = np.random.default_rng(13)
    assert explainer(rng.standard_normal((2, 6, 6, 3)).astype(np.float32)).shape == (2, 6, 6)
    assert explainer(rng.standard_normal((1, 4, 7, 3)).astype(np.float32)).shape == (1, 4, 7)


def test_window_larger_than_the_grid_of_these_images():
    explainer = cam.FastAblationCAM(_dynamic_size_model(), "relu", window=5)
    with pytest.raises(ValueError, match="window 5 is larger than the 4x4 grid"):
        explainer(np.zeros((1, 4, 4, 3), np.float32))


def test_evaluations_per_image_with_unknown_grid_is_a_clear_error():
    """BUG (fails until cam/explainers.py is fixed): on a model with unknown spatial dims,
    FastAblationCAM.masks() evaluates ``self.window > min(None, None)``, so the
    evaluations_per_image property raises an internal TypeError. The count depends on the
    image size, and the error should say so."""
    explainer = cam.FastAblationCAM(_dynamic_size_model(), "relu")
    with pytest.raises(ValueError, match="image size|grid|unknown"):
        explainer.evaluations_per_image


def test_cam_keeps_no_model_alive_and_release_frees_early():
    """A model explained by every kind of method, then dropped, is garbage-collected: what cam
    keeps per model (splits, compiled functions) is keyed weakly and holds only its layers."""
    import gc
    import weakref

    from cam import cache
    from conftest import build_dense_concat_model

    model = build_dense_concat_model()
    images = np.random.default_rng(3).standard_normal((2, 10, 10, 3)).astype(np.float32)
    for method in ("gradcam", "ablationcam", "scorecam", "occlusion"):
        METHODS[method](model, "relu1")(images)
    assert cache.holds(model)
    assert cam.release(model, "relu0") == 0 and cam.release(model, "relu1") >= 1
    assert not cache.holds(model)
    explainer = cam.FastAblationCAM(model, "relu1")
    explainer(images)  # still works after a release: compiles again
    del explainer
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_several_methods_share_one_trunk_pass(dense_concat_model):
    """explain(features=...) gives each method's own maps, with the trunk run once for all;
    features from another layer, mode or image count are refused."""
    x = np.random.default_rng(13).standard_normal((3, 10, 10, 3)).astype(np.float32)
    explainers = [METHODS[k](dense_concat_model, "relu1") for k in
                  ("gradcam", "ablationcam", "fastablationcam", "scorecam", "reciprocam")]
    trunk = explainers[0]._trunk
    features = explainers[0].features(x)
    calls = trunk.calls
    for explainer in explainers:
        shared = explainer.explain(x, [0, 1, 2], normalize=False, features=features)
        alone = explainer.explain(x, [0, 1, 2], normalize=False)
        np.testing.assert_array_equal(shared.raw, alone.raw)
    assert trunk.calls - calls == len(explainers)  # the alone calls only
    with pytest.raises(ValueError, match="features were computed at layer 'relu1'"):
        METHODS["gradcam"](dense_concat_model, "relu0").explain(x, features=features)
    with pytest.raises(ValueError, match="mode 'full'"):
        METHODS["gradcam"](dense_concat_model, "relu1", mode="full").explain(x, features=features)
    with pytest.raises(ValueError, match="features are of 3 images, got 2"):
        explainers[0].explain(x[:2], features=features)
    with pytest.raises(TypeError, match="features must come from explainer.features"):
        explainers[0].explain(x, features=(1, 2))
