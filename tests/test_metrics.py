"""cam.metrics against numbers worked out by hand."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from cam import metrics


def test_spearman_by_hand():
    a = np.array([[[1, 2], [3, 4]]], float)
    assert metrics.spearman(a, a * 10 + 3)[0] == pytest.approx(1.0)
    assert metrics.spearman(a, -a)[0] == pytest.approx(-1.0)
    # ranks 1,2,3,4 vs 2,1,4,3: d^2 = 4, rho = 1 - 6*4 / (4*15) = 0.6
    b = np.array([[[2, 1], [4, 3]]], float)
    assert metrics.spearman(a, b)[0] == pytest.approx(0.6)


def test_spearman_of_a_constant_map_is_nan():
    a = np.zeros((1, 2, 2))
    assert np.isnan(metrics.spearman(a, np.ones((1, 2, 2)) + np.eye(2))[0])


def test_top_mask_and_iou_by_hand():
    a = np.array([[[9, 8, 0, 0], [0, 0, 0, 0]]], float)  # top 25% of 8 pixels = 2 pixels
    b = np.array([[[9, 0, 8, 0], [0, 0, 0, 0]]], float)
    np.testing.assert_array_equal(metrics.top_mask(a, 0.25)[0],
                                  [[True, True, False, False], [False] * 4])
    assert metrics.top_iou(a, b, 0.25)[0] == pytest.approx(1 / 3)  # {0} of {0, 1, 2}
    assert metrics.top_iou(a, a, 0.25)[0] == 1.0


def test_shapes_and_fraction_are_checked():
    with pytest.raises(ValueError, match="one shape"):
        metrics.spearman(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        metrics.top_mask(np.zeros((1, 2, 2)), 0)


# --------------------------------------------------------------------------- faithfulness

def test_average_drop_and_increase_in_confidence_by_hand():
    y, o = [0.5, 0.8, 0.2], [0.25, 0.9, 0.2]
    np.testing.assert_allclose(metrics.average_drop(y, o), [50.0, 0.0, 0.0])
    np.testing.assert_array_equal(metrics.increase_in_confidence(y, o), [False, True, False])
    with pytest.raises(ValueError, match="positive class probabilities; image 1 has 0"):
        metrics.average_drop([0.5, 0.0], [0.1, 0.1])
    with pytest.raises(ValueError, match=r"one shape, got \(2,\) and \(3,\)"):
        metrics.increase_in_confidence([0.5, 0.1], [0.1, 0.1, 0.1])


def test_explanation_masked_multiplies_raw_pixels():
    images = np.array([[[10, 20], [30, 40]]], float)[..., None].repeat(3, axis=-1)  # (1, 2, 2, 3)
    maps = np.array([[[1.0, 0.0], [0.5, 0.0]]])
    out = metrics.explanation_masked(images, maps)
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, ..., 1], [[10, 0], [15, 0]])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        metrics.explanation_masked(images, maps * 2)
    with pytest.raises(ValueError, match=r"maps must be \(N, H, W\) = \(1, 2, 2\)"):
        metrics.explanation_masked(images, np.ones((1, 4, 4)))


def mean_pixel_predict(x):
    """Probability of class 0 = the mean of the visible pixels (values in [0, 1]); class 1 the rest."""
    m = x.reshape(len(x), -1).mean(axis=1)
    return np.stack([m, 1 - m], axis=1)


#: One 2x2 image, pixels 0.1 0.2 / 0.3 0.4 (mean 0.25), and a map ordering them
#: (0, 1) > (1, 0) > (1, 1) > (0, 0).
IMAGE = (np.array([[0.1, 0.2], [0.3, 0.4]])[None, ..., None]).astype(np.float32)
MAP = np.array([[[0.1, 0.4], [0.3, 0.2]]])


def test_deletion_curve_by_hand():
    curve = metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP, [0], "deletion", steps=4,
                                        progress=False)
    # delete 0.2, then 0.3, then 0.4, then 0.1, each time dividing the rest by 4 pixels
    np.testing.assert_allclose(curve[0], [0.25, 0.2, 0.125, 0.025, 0.0])
    # trapezoid with dx = 1/4: (0.25/2 + 0.2 + 0.125 + 0.025 + 0/2) / 4
    assert metrics.auc(curve)[0] == pytest.approx(0.11875)
    two = metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP, [0], steps=2, progress=False)
    np.testing.assert_allclose(two[0], [0.25, 0.125, 0.0])  # two pixels a step
    other = metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP, [1], steps=4, progress=False)
    np.testing.assert_allclose(other[0], 1 - curve[0])  # the target's probability is traced


def test_insertion_curve_by_hand():
    curve = metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP, 0, "insertion", steps=4,
                                        substrate=0.0, progress=False)
    np.testing.assert_allclose(curve[0], [0.0, 0.05, 0.125, 0.225, 0.25])
    # The default substrate is the blurred image: a constant image blurs to itself.
    flat = np.full((1, 5, 5, 3), 0.6, np.float32)
    curve = metrics.perturbation_curves(mean_pixel_predict, flat, np.random.rand(1, 5, 5), 0,
                                        "insertion", steps=3, progress=False)
    np.testing.assert_allclose(curve[0], 0.6, rtol=1e-6)


def test_perturbation_ties_follow_raster_order_and_batching_does_not_matter():
    ties = np.zeros((1, 2, 2))  # every pixel tied: deleted (0,0), (0,1), (1,0), (1,1)
    curve = metrics.perturbation_curves(mean_pixel_predict, IMAGE, ties, [0], steps=4, progress=False)
    np.testing.assert_allclose(curve[0], [0.25, 0.225, 0.175, 0.1, 0.0])
    rng = np.random.default_rng(0)
    images, maps = rng.random((3, 4, 5, 2)), rng.random((3, 4, 5))
    a = metrics.perturbation_curves(mean_pixel_predict, images, maps, None, "insertion", steps=5,
                                    batch_size=1, progress=False)
    b = metrics.perturbation_curves(mean_pixel_predict, images, maps, None, "insertion", steps=5,
                                    batch_size=7, progress=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 6)


def test_perturbation_curves_check_their_inputs():
    with pytest.raises(ValueError, match="mode must be one of .'deletion', 'insertion'., got 'erase'"):
        metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP, [0], "erase")
    with pytest.raises(ValueError, match=r"maps must be \(N, H, W\) = \(1, 2, 2\)"):
        metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP[:, :1], [0])
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        metrics.perturbation_curves(mean_pixel_predict, IMAGE, MAP, [0], steps=0)
    with pytest.raises(ValueError, match=r"shape \(B, classes\) for B images; for 17 images it "
                                         r"returned shape \(17,\)"):
        metrics.perturbation_curves(lambda x: x.mean(axis=(1, 2, 3)), IMAGE, MAP, [0], progress=False)


def test_auc_by_hand():
    np.testing.assert_allclose(metrics.auc([[0.3, 0.3, 0.3], [0.0, 0.5, 1.0], [1.0, 0.0, 0.0]]),
                               [0.3, 0.5, 0.25])
    with pytest.raises(ValueError, match="K >= 2 points"):
        metrics.auc([[1.0]])


# --------------------------------------------------------------------------- localisation

def test_pointing_game_by_hand():
    peak = np.zeros((1, 3, 3))
    peak[0, 1, 1] = 1
    centre = np.zeros((1, 3, 3), bool)
    centre[0, 1, 1] = True
    corner = np.zeros((1, 3, 3), bool)
    corner[0, 0, 0] = True
    assert metrics.pointing_game(peak, centre)[0]
    assert not metrics.pointing_game(peak, corner)[0]
    # Grown by a disc: radius 1 does not reach the diagonal neighbour (1, 1), radius 2 does.
    assert not metrics.pointing_game(peak, corner, tolerance=1)[0]
    assert metrics.pointing_game(peak, corner, tolerance=2)[0]
    # Ties: every maximal pixel must be inside.
    two = peak.copy()
    two[0, 0, 0] = 1
    assert not metrics.pointing_game(two, centre)[0]
    assert metrics.pointing_game(two, centre | corner)[0]
    flat = np.zeros((1, 3, 3))
    assert not metrics.pointing_game(flat, centre)[0]
    assert metrics.pointing_game(flat, np.ones((1, 3, 3), bool))[0]


def test_energy_in_mask_by_hand():
    maps = np.array([[[1.0, 3.0], [0.0, -2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = np.array([[[True, False], [False, True]]] * 2)
    out = metrics.energy_in_mask(maps, masks)
    assert out[0] == pytest.approx(0.25)  # 1 of the positive mass 1 + 3
    assert np.isnan(out[1])


def test_localisation_checks_masks():
    with pytest.raises(ValueError, match="mask of image 1 is empty; 1 of 2 masks are empty"):
        metrics.energy_in_mask(np.ones((2, 2, 2)), np.array([np.ones((2, 2)), np.zeros((2, 2))], bool))
    with pytest.raises(TypeError, match="masks must be boolean"):
        metrics.pointing_game(np.ones((1, 2, 2)), np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="one shape"):
        metrics.pointing_game(np.ones((1, 2, 2)), np.ones((1, 3, 2), bool))


# --------------------------------------------------------------------------- statistics

def test_bootstrap_ci_by_hand():
    # Means of two draws from {0, 1}: 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 95% percentile interval is (0, 1).
    assert metrics.bootstrap_ci([0.0, 1.0, np.nan]) == (0.5, 0.0, 1.0)
    mean, low, high = metrics.bootstrap_ci(np.arange(20.0), seed=3)
    assert mean == 9.5 and 6 < low < 9.5 < high < 13
    assert metrics.bootstrap_ci(np.arange(20.0), seed=3) == (mean, low, high)  # deterministic
    assert metrics.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = metrics.bootstrap_ci([np.nan, 4.0])
    assert m == 4.0 and np.isnan(lo) and np.isnan(hi)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        metrics.bootstrap_ci([1.0, 2.0], confidence=95)


# --------------------------------------------------------------------------- sanity check

def _densenet_named_model():
    import keras
    from keras import layers as L

    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((8, 8, 3))
    for name in ["conv1_conv", "conv2_block1_1_conv", "conv2_block2_1_conv", "pool2_conv",
                 "conv3_block1_1_conv", "conv3_block2_1_conv"]:
        x = L.Conv2D(2, 1, name=name)(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = L.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def test_randomisation_stages_for_densenet_names_and_a_small_cnn():
    from cam.study import models

    stages = models.randomisation_stages(_densenet_named_model(), block_group=1)
    assert stages == [("predictions", ["predictions"]),
                      ("conv3 blocks 2-2", ["bn", "conv3_block2_1_conv"]),
                      ("conv3 blocks 1-1", ["conv3_block1_1_conv"]),
                      ("conv2 blocks 2-2", ["pool2_conv", "conv2_block2_1_conv"]),
                      ("conv2 blocks 1-1", ["conv2_block1_1_conv"]),
                      ("conv1", ["conv1_conv"])]
    assert [s for s, _ in models.randomisation_stages(_densenet_named_model(), block_group=2)] == \
        ["predictions", "conv3 blocks 1-2", "conv2 blocks 1-2", "conv1"]
    small = metrics.randomisation_stages(models.build_small_cnn(3, image_size=16, width=2))
    assert small == [("predictions", ["predictions"]), ("conv4", ["bn", "conv4"]),
                     ("conv3", ["bn3", "conv3"]), ("conv2", ["bn2", "conv2"]),
                     ("conv1", ["bn1", "conv1"])]
    # the DenseNet grouping leaves a model with other names to the generic one
    assert models.randomisation_stages(models.build_small_cnn(3, image_size=16, width=2)) == small


def test_randomisation_check_on_a_small_cnn():
    import cam
    from cam.study import models

    model = models.build_small_cnn(3, image_size=16, width=4)
    before = [w.copy() for w in model.get_weights()]
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    methods = {"Grad-CAM": cam.GradCAM,
               "FastAblationCAM": lambda m, layer: cam.FastAblationCAM(m, layer, batch_size=16)}
    frame = pd.DataFrame(metrics.randomisation_check(model, methods, images, "relu",
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
    again = pd.DataFrame(metrics.randomisation_check(model, methods, images, "relu",
                                                     progress=False))
    np.testing.assert_array_equal(frame["spearman"].to_numpy(), again["spearman"].to_numpy())
    with pytest.raises(ValueError, match="stage 'x' names layers the model does not have: .'nope'."):
        metrics.randomisation_check(model, cam.GradCAM, images, "relu", stages=[("x", ["nope"])])


# --------------------------------------------------------------------------- ROAD

def _impute(image, removed, **kwargs):
    """noisy_linear_impute of one (H, W) or (H, W, C) image without noise, as (H, W[, C])."""
    image = np.asarray(image, float)
    flat = image.ndim == 2
    out = metrics.noisy_linear_impute(image[None, ..., None] if flat else image[None],
                                      np.asarray(removed)[None], **{"noise": 0.0, **kwargs})[0]
    return out[..., 0] if flat else out


def test_noisy_linear_impute_by_hand():
    centre = np.zeros((3, 3), bool)
    centre[1, 1] = True
    # Channel 0 a ramp, channel 1 direct neighbours 3 and diagonal ones 0: the centre becomes
    # (2 * direct + diagonal) / 12, i.e. weights 1/6 and 1/12 (equal weights would give 1.5).
    image = np.stack([[[1, 2, 3], [4, 0, 6], [7, 8, 9]],
                      [[0, 3, 0], [3, 9, 3], [0, 3, 0]]], axis=-1).astype(float)
    out = _impute(image, centre)
    assert out[1, 1, 0] == pytest.approx((2 * (2 + 4 + 6 + 8) + (1 + 3 + 7 + 9)) / 12)  # = 5
    assert out[1, 1, 1] == pytest.approx(2.0)
    np.testing.assert_array_equal(out[~centre], image[~centre])
    # At the border the weights are renormalised over the 3 neighbours that exist:
    # (2 * 1 + 2 * 2 + 1 * 4) / (2 + 2 + 1) = 2.
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True
    assert _impute([[9, 1, 0], [2, 4, 0], [0, 0, 0]], corner)[0, 0] == pytest.approx(2.0)
    # Coupled unknowns: in one row x1 = (0 + x2) / 2, x2 = (x1 + 3) / 2, so 1 and 2.
    np.testing.assert_allclose(_impute([[0, 7, 7, 3]], [[False, True, True, False]]),
                               [[0, 1, 2, 3]], rtol=0, atol=1e-12)
    # The stencil is symmetric: an affine image is reproduced exactly in an interior hole.
    r, c = np.mgrid[:6, :7]
    ramp = 2.0 * r - 3.0 * c + 1.0
    hole = np.zeros((6, 7), bool)
    hole[1:5, 2:6] = True
    hole[2, 1] = True
    np.testing.assert_allclose(_impute(np.where(hole, 100.0, ramp), hole), ramp, rtol=0, atol=1e-12)
    # A single kept pixel: everything else becomes its value.
    lone = np.ones((4, 5), bool)
    lone[3, 1] = False
    np.testing.assert_allclose(_impute(np.where(lone, -50.0, 7.5), lone), 7.5, rtol=0, atol=1e-12)


def test_noisy_linear_impute_keeps_kept_pixels_bit_for_bit():
    rng = np.random.default_rng(1)
    removed = rng.random((2, 7, 9)) < 0.6
    for images in (rng.random((2, 7, 9, 3)).astype(np.float32) * 255,  # float32 stays float32
                   rng.random((2, 7, 9, 3)) * 1e-3 + np.pi,  # float64 stays float64
                   rng.integers(0, 256, (2, 7, 9, 3)).astype(np.uint8)):  # uint8 -> float32
        out = metrics.noisy_linear_impute(images, removed, noise=0.02, seed=4)
        assert out.dtype == np.result_type(images.dtype, np.float32)
        np.testing.assert_array_equal(out[~removed], images[~removed])
        assert not np.isclose(out[removed], images[removed]).all()
    # nothing removed: a copy, without noise
    images = rng.random((1, 3, 3, 2))
    np.testing.assert_array_equal(
        metrics.noisy_linear_impute(images, np.zeros((1, 3, 3), bool), noise=0.5), images)


def test_noisy_linear_impute_noise():
    rng = np.random.default_rng(2)
    images = rng.random((2, 30, 30, 3)) * 200 + 20
    removed = np.zeros((2, 30, 30), bool)
    removed[:, 5:25, 5:25] = True
    plain = metrics.noisy_linear_impute(images, removed, noise=0.0)
    noisy = metrics.noisy_linear_impute(images, removed, noise=0.05, seed=3)
    np.testing.assert_array_equal(noisy[~removed], images[~removed])  # kept pixels untouched
    np.testing.assert_array_equal(noisy, metrics.noisy_linear_impute(images, removed, 0.05, seed=3))
    assert not np.array_equal(noisy, metrics.noisy_linear_impute(images, removed, 0.05, seed=4))
    # noise std = 0.05 * each image's range (max - min over all its pixels), 1200 draws each
    for i in range(2):
        std = (noisy[i] - plain[i])[removed[i]].std()
        assert std == pytest.approx(0.05 * np.ptp(images[i]), rel=0.1)
    # Relative to the range, so imputation commutes with a x + b (a > 0), noise included.
    np.testing.assert_allclose(metrics.noisy_linear_impute(2.5 * images - 7, removed, 0.05, seed=3),
                               2.5 * noisy - 7, rtol=1e-10)
    # value_range replaces each image's range; the draws are the same.
    fixed = metrics.noisy_linear_impute(images, removed, 0.05, seed=3, value_range=255.0)
    for i in range(2):
        np.testing.assert_allclose(fixed[i] - plain[i],
                                   (noisy[i] - plain[i]) * 255.0 / np.ptp(images[i]), atol=1e-9)
    # A constant image has range 0: no noise.
    top = np.zeros((1, 4, 4), bool)
    top[0, :2] = True
    np.testing.assert_allclose(metrics.noisy_linear_impute(np.full((1, 4, 4, 1), 3.0), top, 0.5),
                               3.0, rtol=0, atol=1e-12)


def region_predict(x):
    """Class 0's probability is the mean of the 2x2 square x[3:5, 3:5] (clipped to [0, 1])."""
    p = np.clip(x[:, 3:5, 3:5, :].mean(axis=(1, 2, 3)), 0.0, 1.0)
    return np.stack([p, 1 - p], axis=1)


def _road_setting():
    """One 8x8 image, 1 inside the square and 0 outside, and three maps of it: the square on top
    (background ranked at random below it), the reverse, and a random map."""
    image = np.zeros((8, 8, 1), np.float32)
    image[3:5, 3:5] = 1.0
    rng = np.random.default_rng(0)
    ideal = rng.random((8, 8)) * 0.5
    ideal[3:5, 3:5] = 1.0
    maps = np.stack([ideal, 1 - ideal, rng.random((8, 8))])
    return np.repeat(image[None], 3, axis=0), maps


def test_road_curves_where_the_answer_is_known():
    images, maps = _road_setting()
    kw = dict(noise=0.0, progress=False)
    morf = metrics.road_curves(region_predict, images, maps, order="morf", **kw)
    lerf = metrics.road_curves(region_predict, images, maps, order="lerf", **kw)
    assert morf.shape == lerf.shape == (3, 10)
    # Ideal map, MoRF: at 10% (6 pixels) the square is gone and imputed from the zeros around it.
    np.testing.assert_array_equal(morf[0], [1.0] + [0.0] * 9)
    # LeRF removes at most round(0.9 * 64) = 58 of the 60 background pixels: the square stays.
    np.testing.assert_array_equal(lerf[0], 1.0)
    # The reverse map is the worst in both orders.
    np.testing.assert_array_equal(morf[1], 1.0)
    np.testing.assert_array_equal(lerf[1], [1.0] + [0.0] * 9)
    areas = metrics.road(region_predict, images, maps, **kw)
    np.testing.assert_array_equal(areas["morf"], morf)
    np.testing.assert_array_equal(areas["lerf"], lerf)
    np.testing.assert_array_equal(areas["targets"], 0)  # predicted class of the original
    np.testing.assert_allclose(areas["morf_auc"][:2], [1 / 18, 1.0])  # (0.1 / 2) / 0.9
    np.testing.assert_allclose(areas["lerf_auc"][:2], [1.0, 1 / 18])
    np.testing.assert_allclose(areas["lerf_minus_morf"][:2], [17 / 18, -17 / 18])
    # A random map lies strictly in between.
    assert 1 / 18 < areas["morf_auc"][2] < 1 and 1 / 18 < areas["lerf_auc"][2] < 1
    assert -17 / 18 < areas["lerf_minus_morf"][2] < 17 / 18
    assert morf[2, 1] > 0  # 6 random pixels do not take the whole square
    # The other class is traced on request.
    np.testing.assert_allclose(metrics.road_curves(region_predict, images, maps, 1, **kw), 1 - morf)


def test_road_curves_by_hand_for_single_pixels():
    images, maps = _road_setting()
    one = np.zeros((1, 8, 8))
    one[0, 3, 3] = 1.0  # pixel (3, 3) first, then raster order
    # round(0.02 * 64) = 1 pixel: (3, 3) becomes (2 * (1 + 1) + 1) / 12 = 5/12 from its 3 square
    # neighbours (direct, direct, diagonal) and 5 zeros, so class 0 has (3 + 5/12) / 4 = 41/48.
    curve = metrics.road_curves(region_predict, images[:1], one, fractions=(0.02,), noise=0.0,
                                progress=False)
    np.testing.assert_allclose(curve[0], [1.0, 41 / 48])
    # LeRF past the square: round(0.95 * 64) = 61 pixels, the whole background and (3, 3), the
    # first of the tied square pixels in raster order. Only square pixels (value 1) are left to
    # impute from, so everything becomes 1 and the curve stays flat.
    curve = metrics.road_curves(region_predict, images[:1], maps[:1], fractions=(0.5, 0.95),
                                order="lerf", noise=0.0, progress=False)
    np.testing.assert_array_equal(curve[0], [1.0, 1.0, 1.0])


def test_road_noise_is_seeded_per_image_and_fraction():
    images, maps = _road_setting()
    a = metrics.road_curves(region_predict, images, maps, seed=5, batch_size=1, progress=False)
    b = metrics.road_curves(region_predict, images, maps, seed=5, batch_size=7, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, metrics.road_curves(region_predict, images, maps, seed=6,
                                                     progress=False))
    # Ideal map: the square is imputed as noise of std 0.01 (the image's range is 1) around 0.
    assert a[0, 0] == 1.0 and (np.abs(a[0, 1:]) < 0.05).all()
    lerf = metrics.road_curves(region_predict, images, maps, order="lerf", seed=5, progress=False)
    np.testing.assert_array_equal(lerf[0], 1.0)  # the kept square carries no noise


def test_road_auc_by_hand():
    # x = 0, 0.25, 0.75: (0.25 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0) / 2) / 0.75 = 5/12
    assert metrics.road_auc([[1.0, 0.5, 0.0]], (0.25, 0.75))[0] == pytest.approx(5 / 12)
    curves = np.random.default_rng(0).random((4, 10))
    np.testing.assert_allclose(metrics.road_auc(curves), metrics.auc(curves))  # even spacing
    np.testing.assert_allclose(metrics.road_auc(np.full((2, 4), 0.3), (0.1, 0.5, 0.6)), 0.3)


@pytest.mark.parametrize("call, error, message", [
    (lambda: metrics.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.ones((1, 2, 2))),
     TypeError, "removed must be boolean"),
    (lambda: metrics.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.ones((1, 2, 3), bool)),
     ValueError, r"removed must be a \(N, H, W\) = \(1, 2, 2\) mask"),
    (lambda: metrics.noisy_linear_impute(np.zeros((2, 2, 1)), np.ones((2, 2), bool)),
     ValueError, r"images must be a \(N, H, W, C\) batch"),
    (lambda: metrics.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.eye(2, dtype=bool)[None], -1),
     ValueError, "noise must be a finite number >= 0, got -1"),
    (lambda: metrics.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.eye(2, dtype=bool)[None],
                                         value_range=0),
     ValueError, "value_range must be None or a finite number > 0"),
    (lambda: metrics.noisy_linear_impute(np.zeros((2, 2, 2, 1)),
                                         np.array([np.eye(2), np.ones((2, 2))], bool)),
     ValueError, "image 1 has every pixel removed"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), order="MoRF"),
     ValueError, r"order must be one of \('morf', 'lerf'\)"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=(0.5, 0.2)),
     ValueError, "fractions must be a non-empty sequence of numbers strictly increasing"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=(0.5, 0.5)),
     ValueError, "strictly increasing within"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=(0.0, 0.5)),
     ValueError, r"within \(0, 1\)"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=(0.5, 1.0)),
     ValueError, r"within \(0, 1\)"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=()),
     ValueError, "non-empty"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=[[0.1, 0.2]]),
     ValueError, "non-empty sequence"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions="half"),
     ValueError, "non-empty sequence"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), fractions=(0.995,)),
     ValueError, "fraction 0.995 removes all 64 pixels of these 8x8 images"),
    (lambda: metrics.road_curves(region_predict, _road_setting()[0], _road_setting()[1][:, :4]),
     ValueError, r"maps must be \(N, H, W\) = \(3, 8, 8\)"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), batch_size=0),
     ValueError, "batch_size must be an integer >= 1, got 0"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), seed=-1),
     ValueError, "seed must be None or an integer >= 0, got -1"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), targets=0.5),
     ValueError, "targets must be None, an int or 3 ints"),
    (lambda: metrics.road_curves(region_predict, *_road_setting(), noise=-0.1, progress=False),
     ValueError, "noise must be a finite number >= 0"),
    (lambda: metrics.road(region_predict, *_road_setting(), workers=0),
     ValueError, "workers must be an integer >= 1, or -1 for one per CPU, got 0"),
    (lambda: metrics.road_auc(np.zeros((2, 9))),
     ValueError, r"curves must be \(N, 10\)"),
    (lambda: metrics.road_auc(np.zeros((2, 3)), (0.6, 0.3)),
     ValueError, "strictly increasing"),
])
def test_road_checks_its_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _impute_by_definition(image, removed):
    """Noiseless linear imputation written out pixel by pixel, solved with ``spsolve`` (the
    solver the module used before it factorised the symmetric system): the reference."""
    import scipy.sparse
    import scipy.sparse.linalg

    h, w = removed.shape
    unknown = list(zip(*np.nonzero(removed)))
    index = {p: n for n, p in enumerate(unknown)}
    a = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), image.shape[-1]))
    for n, (r, c) in enumerate(unknown):
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                q = (r + dr, c + dc)
                if (dr, dc) == (0, 0) or not (0 <= q[0] < h and 0 <= q[1] < w):
                    continue
                weight = 1 / 12 if dr and dc else 1 / 6
                a[n, n] += weight
                if q in index:
                    a[n, index[q]] -= weight
                else:
                    b[n] += weight * image[q]
    out = image.astype(np.float64).copy()
    out[removed] = scipy.sparse.linalg.spsolve(a.tocsc(), b).reshape(len(unknown), -1)
    return out


def test_noisy_linear_impute_matches_the_definition_on_saliency_shaped_masks():
    # Removed sets shaped like upsampled 7x7 saliency maps (large blobs, both orders) and a
    # scattered one; the factorised solve agrees with spsolve on the equations to 1e-6 grey levels.
    rng = np.random.default_rng(7)
    image = rng.uniform(0, 255, (48, 56, 3))
    coarse = cv2.resize(rng.random((7, 7)).astype(np.float32), (56, 48),
                        interpolation=cv2.INTER_LINEAR)
    rank = np.argsort(np.argsort(-coarse.ravel(), kind="stable"), kind="stable").reshape(48, 56)
    masks = [rank < 0.1 * rank.size, rank < 0.5 * rank.size, rank < 0.9 * rank.size,
             rank >= 0.3 * rank.size, rng.random((48, 56)) < 0.4]
    for removed in masks:
        np.testing.assert_allclose(_impute(image, removed), _impute_by_definition(image, removed),
                                   rtol=0, atol=1e-6)


def counting(predict):
    """``predict`` that records how many images it was given."""
    def wrapped(x):
        wrapped.images += len(x)
        return predict(x)
    wrapped.images = 0
    return wrapped


def test_road_by_method_equals_road_per_map_and_scores_each_imputed_image_once():
    images, maps = _road_setting()
    kw = dict(fractions=(0.25, 0.5, 0.75), noise=0.01, seed=3, batch_size=4, progress=False)
    # maps ** 2 ranks the pixels exactly as maps does; 1 - maps removes in MoRF what maps
    # removes in LeRF and the other way round (ties go in raster order in both).
    variants = {"maps": maps, "squared": maps ** 2, "reversed": 1 - maps}
    predict = counting(region_predict)
    together = metrics.road_by_method(predict, images, variants, **kw)
    # Per image: the unperturbed image plus 3 MoRF and 3 LeRF removed sets, whichever map asks;
    # plus the 3 images once for the targets.
    assert predict.images == 3 * (1 + 3 + 3) + 3
    for name, m in variants.items():
        alone = counting(region_predict)
        single = metrics.road(alone, images, m, **kw)
        assert alone.images == 3 * (1 + 3 + 3) + 3  # MoRF and LeRF share the unperturbed image
        assert together[name].keys() == single.keys()
        for key, value in single.items():
            np.testing.assert_array_equal(together[name][key], value)
    np.testing.assert_array_equal(together["reversed"]["morf"], together["maps"]["lerf"])
    np.testing.assert_array_equal(together["squared"]["lerf_minus_morf"],
                                  together["maps"]["lerf_minus_morf"])
    # Imputing in threads, the next batch while this one is scored, changes nothing.
    threaded = metrics.road_by_method(region_predict, images, variants, **{**kw, "workers": 3})
    for name in variants:
        np.testing.assert_array_equal(threaded[name]["lerf_minus_morf"],
                                      together[name]["lerf_minus_morf"])
    with pytest.raises(ValueError, match="maps must be a non-empty dict"):
        metrics.road_by_method(region_predict, images, maps)
    with pytest.raises(ValueError, match=r"maps must be \(N, H, W\) = \(3, 8, 8\)"):
        metrics.road_by_method(region_predict, images, {"a": maps, "b": maps[:, :4]})
