"""cam.metrics against numbers worked out by hand."""

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
