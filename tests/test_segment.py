"""cam.study.segment: grain masks segmented by OpenCV, and the synthetic stand-in's exact masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cam.study import segment, synthetic

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


def test_fill_holes_and_largest_component_by_hand():
    ring = np.zeros((5, 5), bool)
    ring[1:4, 1:4] = True
    ring[2, 2] = False  # a one-pixel hole
    filled = segment.fill_holes(ring)
    assert filled[2, 2] and filled.sum() == 9
    two = np.zeros((4, 6), bool)
    two[0, 0] = True
    two[1:3, 3:6] = True
    expected = np.pad(np.ones((2, 3), bool), ((1, 1), (3, 0)))
    np.testing.assert_array_equal(segment.largest_component(two), expected)
    assert not segment.largest_component(np.zeros((3, 3), bool)).any()


def test_grain_mask_of_a_drawn_disc():
    image = np.full((64, 64, 3), (225, 228, 235), np.uint8)  # light bluish slide
    cv2.circle(image, (30, 34), 15, (150, 110, 60), -1)  # a brown grain
    truth = np.zeros((64, 64), np.uint8)
    cv2.circle(truth, (30, 34), 15, 1, -1)
    mask = segment.grain_mask(image)
    iou = (mask & truth.astype(bool)).sum() / (mask | truth.astype(bool)).sum()
    assert iou > 0.95


def test_grain_mask_of_a_pale_grain_with_only_a_rim():
    image = np.full((64, 64, 3), (225, 228, 235), np.uint8)
    cv2.circle(image, (32, 32), 18, (120, 120, 110), 2)  # transparent grain: a dark outline only
    mask = segment.grain_mask(image)
    assert mask[32, 32] and mask[32, 20]  # the interior is filled
    assert 0.8 < mask.sum() / (np.pi * 19**2) < 1.2
    assert not mask[2, 2]


def test_grain_masks_agree_with_the_synthetic_ground_truth():
    images, _, grain, _ = synthetic.make_dataset(n_per_class=1, size=96, seed=0)
    masks = segment.grain_masks(images)
    assert masks.shape == grain.shape and masks.dtype == bool
    iou = (masks & grain).sum(axis=(1, 2)) / (masks | grain).sum(axis=(1, 2))
    assert (iou > 0.8).all(), iou


def test_grain_masks_check_shapes():
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) RGB batch, got shape \(4, 4, 3\)"):
        segment.grain_masks(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"one \(H, W, 3\) RGB image, got shape \(4, 4\)"):
        segment.grain_mask(np.zeros((4, 4), np.uint8))


def test_synthetic_masks_are_read_back_exactly(tmp_path):
    table = synthetic.write_dataset(tmp_path, n_per_class=1, size=48, seed=0)
    _, _, grain, feature = synthetic.make_dataset(n_per_class=1, size=48, seed=0)
    np.testing.assert_array_equal(segment.synthetic_masks(tmp_path, table["file"], 48), grain)
    np.testing.assert_array_equal(
        segment.synthetic_masks(tmp_path, table["file"], 48, kind="feature"), feature)
    small = segment.synthetic_masks(tmp_path, table["file"], 24)
    assert small.shape == (6, 24, 24)
    # Area interpolation then a 50% threshold keeps the grain's area to within its outline.
    assert np.allclose(small.mean(axis=(1, 2)), grain.mean(axis=(1, 2)), atol=0.05)
    assert segment.synthetic_mask_path(tmp_path, "echinate/echinate_00.png") == \
        tmp_path / "masks" / "echinate_00_grain.png"
    with pytest.raises(ValueError, match=r"kind must be one of \('grain', 'feature'\), got 'body'"):
        segment.synthetic_masks(tmp_path, table["file"], 48, kind="body")
    with pytest.raises(FileNotFoundError, match="no grain mask for x/missing.png"):
        segment.synthetic_masks(tmp_path, ["x/missing.png"], 48)


def test_mask_iou_by_hand():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 8 and 8 pixels, 4 shared: 4 / 12
    np.testing.assert_allclose(segment.mask_iou(a, b), [4 / 12, 1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        segment.mask_iou(a, b[:1])


def test_grain_segmenter_shapes_and_layer():
    import cam

    model = segment.build_grain_segmenter(image_size=32, width=4)
    assert model.output_shape == (None, 32, 32, 2)
    assert cam.GradCAM(model, "encoder").split.target_shape == (8, 8, 8)
