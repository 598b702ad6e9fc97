"""cam.metrics against numbers worked out by hand: agreement, faithfulness (Average Drop,
Increase in Confidence, deletion and insertion), localisation and the bootstrap interval."""

from __future__ import annotations

import numpy as np
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
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
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
