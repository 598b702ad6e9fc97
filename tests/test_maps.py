"""cam.maps: the arithmetic of the maps, checked against numbers worked out by hand."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from cam import maps as M

# --------------------------------------------------------------------------- ablation_weights


class TestAblationWeights:
    def test_hand_worked(self):
        # y = 2: channel 0 drops the score to 1, channel 1 raises it to 3, channel 2 keeps it.
        # w = (y - y_k) / y = (2-1)/2, (2-3)/2, (2-2)/2
        w = M.ablation_weights(np.array([2.0]), np.array([[1.0, 3.0, 2.0]]))
        np.testing.assert_allclose(w, [[0.5, -0.5, 0.0]], rtol=0, atol=1e-7)

    def test_negative_score_divides_by_signed_y(self):
        # y = -2: (-2 - -3)/-2 = -0.5, (-2 - -1)/-2 = 0.5, (-2 - 2)/-2 = 2
        w = M.ablation_weights(np.array([-2.0]), np.array([[-3.0, -1.0, 2.0]]))
        np.testing.assert_allclose(w, [[-0.5, 0.5, 2.0]], rtol=0, atol=1e-7)

    def test_batch_rows_are_independent(self):
        w = M.ablation_weights(np.array([4.0, 1.0]), np.array([[3.0, 5.0], [0.0, 0.5]]))
        np.testing.assert_allclose(w, [[0.25, -0.25], [1.0, 0.5]], rtol=0, atol=1e-7)
        assert w.shape == (2, 2)
        assert w.dtype == np.float32

    @pytest.mark.parametrize(
        "y, ablated, expected",
        [
            # |y| < eps: divide by +eps for y >= 0 ...
            (0.0, [-1e-6, 1e-6, 0.0], [1.0, -1.0, 0.0]),
            (5e-7, [0.0, 1e-6, 5e-7], [0.5, -0.5, 0.0]),
            # ... and by -eps for y < 0, so the sign of the weights follows the drop / y.
            (-5e-7, [0.0, -1e-6], [0.5, -0.5]),
        ],
    )
    def test_small_score_guard(self, y, ablated, expected):
        w = M.ablation_weights(np.array([y]), np.array([ablated]))
        assert np.isfinite(w).all()
        np.testing.assert_allclose(w[0], expected, rtol=1e-5, atol=1e-6)

    def test_guard_respects_custom_eps(self):
        # eps = 0.5: y = 0.25 is replaced by 0.5; y = -0.25 by -0.5.
        w = M.ablation_weights(np.array([0.25, -0.25]), np.array([[0.0], [0.0]]), eps=0.5)
        np.testing.assert_allclose(w, [[0.5], [0.5]], rtol=1e-6)

    def test_no_guard_above_eps(self):
        # |y| = 2 * eps is divided by itself: w = (2e-6 - 0) / 2e-6 = 1.
        w = M.ablation_weights(np.array([2e-6]), np.array([[0.0]]))
        np.testing.assert_allclose(w, [[1.0]], rtol=1e-5)


# --------------------------------------------------------------------------- channel weights


def test_weighted_channel_sum_2x2x2_by_hand():
    a = np.zeros((1, 2, 2, 2), np.float32)
    a[0, :, :, 0] = [[1, 2], [3, 4]]
    a[0, :, :, 1] = [[0, 1], [1, 0]]
    w = np.array([[2.0, -1.0]], np.float32)
    # 2 * [[1,2],[3,4]] - [[0,1],[1,0]] = [[2,3],[5,8]]
    out = M.weighted_channel_sum(a, w)
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out[0], [[2, 3], [5, 8]])


def test_weighted_channel_sum_uses_each_images_own_weights():
    a = np.ones((2, 2, 2, 2), np.float32)
    w = np.array([[1.0, 0.0], [0.5, 3.0]], np.float32)
    out = M.weighted_channel_sum(a, w)
    np.testing.assert_allclose(out[0], np.full((2, 2), 1.0))
    np.testing.assert_allclose(out[1], np.full((2, 2), 3.5))


def test_gradcam_weights_are_grid_means():
    g = np.zeros((2, 2, 2, 2), np.float32)
    g[0, :, :, 0] = [[1, 2], [3, 6]]  # mean 3
    g[0, :, :, 1] = [[-1, -1], [1, 5]]  # mean 1
    g[1, :, :, 0] = [[0, 0], [0, 8]]  # mean 2
    g[1, :, :, 1] = [[-4, 0], [0, 0]]  # mean -1
    w = M.gradcam_weights(g)
    assert w.shape == (2, 2)
    np.testing.assert_allclose(w, [[3, 1], [2, -1]])


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "n, window, stride, expected",
    [
        (7, 3, 3, [0, 3, 4]),  # the last window is shifted back to end at the edge
        (7, 3, 1, [0, 1, 2, 3, 4]),
        (7, 1, 1, [0, 1, 2, 3, 4, 5, 6]),
        (7, 7, 7, [0]),  # window == n: one window
        (7, 7, 1, [0]),
        (6, 3, 3, [0, 3]),  # divides evenly: nothing appended
        (5, 2, 2, [0, 2, 3]),
        (5, 3, 2, [0, 2]),
        (8, 3, 2, [0, 2, 4, 5]),
    ],
)
def test_window_starts(n, window, stride, expected):
    assert M.window_starts(n, window, stride) == expected


@pytest.mark.parametrize("h, w", [(3, 3), (5, 7), (6, 8), (4, 4)])
@pytest.mark.parametrize("window, stride", [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)])
def test_window_masks_cover_every_cell(h, w, window, stride):
    masks = M.window_masks((h, w), window, stride)
    rows, cols = M.window_starts(h, window, stride), M.window_starts(w, window, stride)
    assert masks.shape == (len(rows) * len(cols), h, w)
    assert masks.dtype == bool
    assert masks.any(axis=0).all(), "some cell is never ablated"
    # every mask is one window x window square, at the row-major start positions
    assert (masks.sum(axis=(1, 2)) == window * window).all()
    for mask, (i, j) in zip(masks, itertools.product(rows, cols)):
        expected = np.zeros((h, w), bool)
        expected[i:i + window, j:j + window] = True
        np.testing.assert_array_equal(mask, expected)


def test_window_masks_first_and_last():
    masks = M.window_masks((3, 4), 2, 2)  # rows [0, 1], cols [0, 2]
    np.testing.assert_array_equal(masks[0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(masks[1], [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(masks[-1], [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])


def test_spread_window_drops_averages_overlaps_by_hand():
    # 3x3 grid, 2x2 windows at (0,0), (0,1), (1,0), (1,1) with drops 1, 2, 3, 4.
    masks = M.window_masks((3, 3), 2, 1)
    assert len(masks) == 4
    out = M.spread_window_drops(np.array([[1.0, 2.0, 3.0, 4.0]]), masks)
    # corner cells see one window; edge midpoints two; the centre all four: (1+2+3+4)/4
    expected = [
        [1.0, (1 + 2) / 2, 2.0],
        [(1 + 3) / 2, (1 + 2 + 3 + 4) / 4, (2 + 4) / 2],
        [3.0, (3 + 4) / 2, 4.0],
    ]
    assert out.shape == (1, 3, 3)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected)


def test_spread_window_drops_window_1_is_the_drops():
    masks = M.window_masks((2, 3), 1, 1)
    drops = np.array([[1, 2, 3, 4, 5, 6], [-1, 0, 1, 0, 0, 7]], np.float32)
    out = M.spread_window_drops(drops, masks)
    np.testing.assert_allclose(out, drops.reshape(2, 2, 3))


def test_spread_window_drops_rejects_uncovered_cells():
    masks = np.zeros((1, 2, 2), bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="covered by no window"):
        M.spread_window_drops(np.ones((1, 1)), masks)


# --------------------------------------------------------------------------- normalize


def test_normalize_maps_relu_then_max_one():
    maps = np.array([[[-1.0, 2.0], [4.0, 0.0]], [[0.5, 0.25], [-3.0, 0.0]]], np.float32)
    out = M.normalize_maps(maps)
    np.testing.assert_allclose(out[0], [[0, 0.5], [1, 0]])
    np.testing.assert_allclose(out[1], [[1, 0.5], [0, 0]])  # each map by its own maximum
    assert out.dtype == np.float32
    assert maps[0, 0, 0] == -1.0, "the input was modified in place"


@pytest.mark.parametrize("fill", [0.0, -1.0, -1e-30])
def test_normalize_maps_all_zero_or_negative_stays_zero(fill):
    maps = np.stack([np.full((3, 3), fill, np.float32), np.eye(3, dtype=np.float32) * 2])
    out = M.normalize_maps(maps)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0], np.zeros((3, 3)))
    np.testing.assert_array_equal(out[1], np.eye(3))  # the other map is still normalised


def test_normalize_maps_tiny_positive_peak_is_scaled_to_one():
    maps = np.array([[[1e-30, 0.0], [0.5e-30, 0.0]]], np.float32)
    out = M.normalize_maps(maps)
    np.testing.assert_allclose(out[0], [[1.0, 0.0], [0.5, 0.0]], rtol=1e-5)


# --------------------------------------------------------------------------- upsample


def test_upsample_2x2_to_4x4_half_pixel_columns():
    # Output x maps to input (x + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped to
    # 0, 0.25, 0.75, 1: the columns interpolate 0 -> 1 as 0, .25, .75, 1.
    out = M.upsample_maps(np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32), (4, 4))
    assert out.shape == (1, 4, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-6)


def test_upsample_corners_and_centre_by_hand():
    a, b, c, d = 1.0, 2.0, 4.0, 8.0
    out = M.upsample_maps(np.array([[[a, b], [c, d]]], np.float32), (4, 4))[0]
    # corners sit in the clamped region: the cell values themselves
    np.testing.assert_allclose([out[0, 0], out[0, 3], out[3, 0], out[3, 3]], [a, b, c, d],
                               atol=1e-6)
    # pixel (1, 1) samples input (0.25, 0.25): weights .75*.75, .75*.25, .25*.75, .25*.25
    centre = 0.5625 * a + 0.1875 * b + 0.1875 * c + 0.0625 * d
    np.testing.assert_allclose(out[1, 1], centre, atol=1e-6)
    # (1, 2) samples (0.25, 0.75): mirror image in x of (1, 1)
    np.testing.assert_allclose(out[1, 2], 0.1875 * a + 0.5625 * b + 0.0625 * c + 0.1875 * d,
                               atol=1e-6)
    # the edge between two cells: (0, 1) samples (row 0, x 0.25): .75 a + .25 b
    np.testing.assert_allclose(out[0, 1], 0.75 * a + 0.25 * b, atol=1e-6)


def test_upsample_symmetric_map_stays_symmetric():
    m = np.array([[[0.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 0.0]]], np.float32)
    out = M.upsample_maps(m, (9, 9))[0]
    np.testing.assert_allclose(out, out[::-1, :], atol=1e-6)
    np.testing.assert_allclose(out, out[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(out, out.T, atol=1e-6)
    # 3x3 -> 9x9 is an exact factor of 3: each cell's centre pixel carries its value
    np.testing.assert_allclose(out[1::3, 1::3], m[0], atol=1e-6)


def test_upsample_matches_cv2_half_pixel_and_non_square():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 4)).astype(np.float32)
    out = M.upsample_maps(maps, (6, 10))
    assert out.shape == (2, 6, 10)
    # half-pixel bilinear worked out directly: src = (dst + 0.5) * in / out - 0.5, clamped
    for k in range(2):
        ys = np.clip((np.arange(6) + 0.5) * 3 / 6 - 0.5, 0, 2)
        xs = np.clip((np.arange(10) + 0.5) * 4 / 10 - 0.5, 0, 3)
        y0 = np.minimum(np.floor(ys).astype(int), 1)
        x0 = np.minimum(np.floor(xs).astype(int), 2)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        m = maps[k]
        ref = ((1 - fy) * (1 - fx) * m[y0][:, x0] + (1 - fy) * fx * m[y0][:, x0 + 1]
               + fy * (1 - fx) * m[y0 + 1][:, x0] + fy * fx * m[y0 + 1][:, x0 + 1])
        np.testing.assert_allclose(out[k], ref, atol=1e-5)
        np.testing.assert_allclose(
            out[k], cv2.resize(m, (10, 6), interpolation=cv2.INTER_LINEAR), atol=1e-6)


def test_upsample_empty_batch():
    out = M.upsample_maps(np.zeros((0, 2, 2), np.float32), (5, 7))
    assert out.shape == (0, 5, 7)


# --------------------------------------------------------------------------- threshold


class TestThreshold:
    MAP = np.array([[[-2.0, 0.0, 1.0, 2.0, 5.0]]], np.float32)  # (1, 1, 5)

    @pytest.mark.parametrize("threshold, expected", [
        # (max(m, t) - t) / (max(m) - t)
        (0.0, [0, 0, 1 / 5, 2 / 5, 1]),  # the default: ReLU, then / max
        (1.0, [0, 0, 0, 1 / 4, 1]),
        (-2.0, [0, 2 / 7, 3 / 7, 4 / 7, 1]),  # a negative level keeps some negative evidence
        (5.0, [0, 0, 0, 0, 0]),  # nothing above the level: all zero
        (M.Quantile(0.5), [0, 0, 0, 1 / 4, 1]),  # the median is 1
        ("q0.5", [0, 0, 0, 1 / 4, 1]),
        ("1", [0, 0, 0, 1 / 4, 1]),
        ("q0", [0, 2 / 7, 3 / 7, 4 / 7, 1]),  # the minimum: min-max scaling
    ])
    def test_hand_worked(self, threshold, expected):
        out = M.normalize_maps(self.MAP, threshold)
        np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
        assert out.dtype == np.float32

    def test_default_is_relu_then_max(self):
        maps = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
        relu = np.maximum(maps, 0)
        expected = relu / relu.reshape(3, -1).max(axis=1)[:, None, None]
        np.testing.assert_allclose(M.normalize_maps(maps), expected, atol=1e-7)

    def test_quantile_is_per_map(self):
        maps = np.stack([np.arange(4.0).reshape(2, 2), 10 + np.arange(4.0).reshape(2, 2)])
        np.testing.assert_allclose(M.threshold_levels(maps, "q0.5"), [1.5, 11.5])
        out = M.normalize_maps(maps, M.Quantile(0.5))
        np.testing.assert_allclose(out, [[[0, 0], [1 / 3, 1]]] * 2, atol=1e-6)

    @pytest.mark.parametrize("bad, message", [
        ("median", "'q' and a quantile"),
        ("q1.5", r"quantile in \[0, 1\].*got 'q1.5'"),
        (float("nan"), "finite number"),
        (True, "finite number"),
        ([0.5], "finite number"),
    ])
    def test_bad_thresholds(self, bad, message):
        with pytest.raises(ValueError, match=message):
            M.normalize_maps(self.MAP, bad)


def test_upsample_more_maps_than_opencv_resizes_at_once():
    # OpenCV 5 resizes at most 128 channels per call (4.x: 512); 300 maps need three chunks.
    maps = np.random.default_rng(0).random((300, 3, 4)).astype(np.float32)
    out = M.upsample_maps(maps, (9, 12))
    one_by_one = [cv2.resize(m, (12, 9), interpolation=cv2.INTER_LINEAR) for m in maps]
    np.testing.assert_allclose(out, np.stack(one_by_one), atol=1e-6)


def test_minmax_maps_by_hand():
    """pytorch-grad-cam's scaling: ReLU, then (m - min) / (max - min + 1e-7) per map."""
    maps = np.array([[[1.0, 2.0], [3.0, 5.0]],       # min 1 -> 0, unlike dividing by the max
                     [[-1.0, 0.0], [2.0, 4.0]],      # ReLU first: min 0
                     [[3.0, 3.0], [3.0, 3.0]]])      # constant: all zeros
    out = M.minmax_maps(maps)
    eps = np.float32(1e-7)
    np.testing.assert_allclose(out[0], (maps[0] - 1) / (4 + eps), rtol=1e-6)
    np.testing.assert_allclose(out[1], np.maximum(maps[1], 0) / (4 + eps), rtol=1e-6)
    assert (out[2] == 0).all() and out.dtype == np.float32
    assert not np.allclose(out[0], M.normalize_maps(maps)[:1])  # the conventions differ
    # a threshold replaces ReLU's 0, as in normalize_maps
    np.testing.assert_allclose(M.minmax_maps(maps[:1], threshold=2.5)[0],
                               (np.maximum(maps[0], 2.5) - 2.5) / (2.5 + eps), rtol=1e-6)
