"""cam.study.boxes: scenes of several synthetic grains with boxes from their exact masks, the
CenterNet-style detector's targets, decoding and peak detection (round trips without training),
and the share of a map inside its box (by hand)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import cam
from cam.study import boxes, synthetic
from conftest import assert_rel_close

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

C = len(synthetic.SYNTHETIC_CLASSES)


def test_mask_boxes_are_pixel_edges():
    masks = np.zeros((2, 6, 8), bool)
    masks[0, 1:3, 3:6] = True  # rows 1-2, columns 3-5
    masks[1, 5, 0] = True
    np.testing.assert_array_equal(boxes.mask_boxes(masks), [[3, 1, 6, 3], [0, 5, 1, 6]])
    with pytest.raises(ValueError, match="at least one pixel"):
        boxes.mask_boxes(np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match=r"\(k, H, W\)"):
        boxes.mask_boxes(np.zeros((4, 4), bool))


def test_inside_box_fraction_by_hand():
    """A 4x4 image, the box [0, 0, 2, 2] (its top-left quarter)."""
    box = np.array([[0, 0, 2, 2]], np.float32)
    np.testing.assert_array_equal(boxes.box_masks(box, (4, 4))[0].sum(), 4)
    uniform = np.ones((1, 4, 4), np.float32)
    np.testing.assert_allclose(boxes.inside_box_fraction(uniform, box), [0.25])
    np.testing.assert_allclose(boxes.box_area_fraction(box, (4, 4)), [0.25])
    peaked = np.zeros((1, 4, 4), np.float32)
    peaked[0, 0, 0], peaked[0, 3, 3], peaked[0, 2, 0] = 3, 1, -5  # the negative cell counts 0
    np.testing.assert_allclose(boxes.inside_box_fraction(peaked, box), [0.75])
    assert np.isnan(boxes.inside_box_fraction(-uniform, box)[0])


@pytest.fixture(scope="module")
def scenes():
    return boxes.make_scenes(12, size=64, seed=3, max_grains=3)


def test_scenes_have_exact_disjoint_grains_and_their_boxes(scenes):
    assert scenes.images.shape == (12, 64, 64, 3) and scenes.images.dtype == np.uint8
    assert set(scenes.counts) <= {1, 2, 3} and scenes.counts.max() > 1
    for image, found, labels, masks in zip(scenes.images, scenes.boxes, scenes.labels,
                                           scenes.masks):
        assert masks.shape == (len(labels), 64, 64) and ((0 <= labels) & (labels < C)).all()
        assert masks.sum(axis=0).max() == 1  # no pixel in two grains
        np.testing.assert_array_equal(found, boxes.mask_boxes(masks))
        assert (found[:, :2] >= 0).all() and (found[:, 2:] <= 64).all()
        # every grain pixel lies in its own box
        inside = boxes.box_masks(found, (64, 64))
        assert not (masks & ~inside).any()
        # grains are painted darker than the light slide around them
        background = ~masks.any(axis=0)
        for mask in masks:
            assert image[mask].mean() < image[background].mean()


def test_scenes_are_deterministic_and_a_smaller_set_is_a_prefix(scenes):
    again = boxes.make_scenes(5, size=64, seed=3, max_grains=3)
    np.testing.assert_array_equal(again.images, scenes.images[:5])
    for a, b in zip(again.boxes, scenes.boxes):
        np.testing.assert_array_equal(a, b)
    other = boxes.make_scenes(5, size=64, seed=4, max_grains=3)
    assert not np.array_equal(other.images, again.images)
    assert set(boxes.make_scenes(6, size=64, seed=3, max_grains=1).counts) == {1}


@pytest.mark.parametrize("kwargs, phrase", [({"tile": (20, 40)}, "tile must be"),
                                            ({"tile": (40, 80)}, "tile must be"),
                                            ({"max_grains": 0}, "max_grains must be")])
def test_bad_scene_settings_are_refused(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        boxes.compose_scene(np.random.default_rng(0), size=64, **kwargs)


def _perfect_output(targets):
    """The detector output that decodes to the ground truth: class logits +-20 (a centre cell
    +20, every other -20), and the targets' sizes and offsets."""
    logits = np.where(targets[..., :C] == 1, 20.0, -20.0)
    return np.concatenate([logits, targets[..., C:C + 4]], axis=-1).astype(np.float32)


def test_targets_decode_and_detect_back_to_the_boxes(scenes):
    targets = boxes.center_targets(scenes, C)
    assert targets.shape == (12, 16, 16, C + 5)
    assert targets[..., -1].sum() == scenes.counts.sum()  # one centre cell per grain
    assert (np.abs(targets[..., C + 2:C + 4]) <= 0.5).all()
    decoder = boxes.CenterDecoder(C, 16)
    found = boxes.detect(decoder, _perfect_output(targets), threshold=0.5)
    for (got, classes, scores), truth, labels in zip(found, scenes.boxes, scenes.labels):
        order = np.lexsort(truth.T[::-1])
        mine = np.lexsort(got.T[::-1])
        np.testing.assert_allclose(got[mine], truth[order], atol=1e-3)
        np.testing.assert_array_equal(classes[mine], labels[order])
        assert (scores > 0.99).all()
    assert boxes.match_detections(found, scenes) == (scenes.counts.sum(),) * 4
    # nothing reaches a threshold above 1, but at_least keeps each image's best peak
    assert all(len(f[0]) == 0 for f in boxes.detect(decoder, _perfect_output(targets), 1.5))
    best = boxes.detect(decoder, _perfect_output(targets), 1.5, at_least=1)
    assert [len(f[0]) for f in best] == [1] * 12


def test_center_targets_by_hand():
    """One 16x8 box [8, 4, 24, 12] at stride 4: centre (4, 2) cells -> cell (row 2, col 4),
    offsets -0.5, size 4x2 cells."""
    one = boxes.Scenes(np.zeros((1, 32, 32, 3), np.uint8), [np.array([[8, 4, 24, 12]], np.float32)],
                       [np.array([2])], [None])
    targets = boxes.center_targets(one, C)[0]
    assert targets[2, 4, 2] == 1 and targets[..., 2].sum() > 1  # a Gaussian around it
    assert targets[..., [0, 1, 3, 4, 5]].max() == 0
    np.testing.assert_allclose(targets[2, 4, C:], [math.log(4), math.log(2), -0.5, -0.5, 1])
    assert targets[..., -1].sum() == 1


def test_flipped_targets_are_the_targets_of_flipped_scenes(scenes):
    targets = boxes.center_targets(scenes, C)
    flip = boxes._flip_targets(targets, C)
    for axis, (a, b) in ((1, (1, 3)), (2, (0, 2))):  # rows flip y, columns flip x
        flipped_boxes = []
        for found in scenes.boxes:
            f = found.copy()
            f[:, a], f[:, b] = 64 - found[:, b], 64 - found[:, a]
            flipped_boxes.append(f)
        flipped = boxes.Scenes(np.flip(scenes.images, axis), flipped_boxes, scenes.labels,
                               scenes.masks)
        expected = boxes.center_targets(flipped, C)
        got = flip(targets, axis)
        # a centre exactly on a cell edge rounds to the other cell when flipped: compare the
        # decoded boxes, which do not depend on that
        decoder = boxes.CenterDecoder(C, 16)
        for mine, theirs in zip(boxes.detect(decoder, _perfect_output(got), 0.5),
                                boxes.detect(decoder, _perfect_output(expected), 0.5)):
            np.testing.assert_allclose(np.sort(mine[0], axis=0), np.sort(theirs[0], axis=0),
                                       atol=1e-3)


def test_the_loss_prefers_the_truth(scenes):
    targets = boxes.center_targets(scenes, C)
    loss = boxes.center_loss(C)
    perfect = _perfect_output(targets)
    wrong = perfect.copy()
    wrong[..., C:C + 2] += 1.0  # every box e times too large
    got = [np.asarray(loss(keras.ops.convert_to_tensor(targets), keras.ops.convert_to_tensor(o)))
           for o in (perfect, wrong)]
    assert got[0].shape == (12,) and np.isfinite(got[0]).all()
    assert got[0].max() < 0.05 and (got[1] > got[0] + 1.9).all()  # + 2 per box (L1 of w, h)


def test_box_explains_the_detector_through_the_callable_decoder():
    """Box with CenterDecoder on an untrained detector: head-only equals the whole network."""
    keras.utils.set_random_seed(0)
    model = boxes.build_detector(C, image_size=32, width=8)
    assert model.get_layer("features").output.shape[1:3] == (8, 8)
    decoder = boxes.CenterDecoder(C, 8)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    target = cam.targets.Box([[4, 4, 20, 20], [10, 8, 30, 28]], [1, 4], decoder)
    for method in (cam.GradCAM, cam.FastAblationCAM):
        head = method(model, "features").explain(images, target, normalize=False,
                                                 upsample=False)
        full = method(model, "features", mode="full").explain(images, target,
                                                              normalize=False, upsample=False)
        assert head.raw.shape == (2, 8, 8) and np.abs(head.raw).max() > 0
        assert_rel_close(head.raw, full.raw, rtol=1e-4)
        assert (head.target_scores > 0).all() and (head.target_scores <= 1).all()


def test_tile_sides_scale_with_the_scene_and_keep_the_minimum():
    assert boxes.tile_sides(96) == (40, 56)
    assert boxes.tile_sides(64) == (synthetic.MIN_SIZE, 37)


def test_outline_boxes_draws_each_rows_box_on_every_panel():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.patches import Rectangle

    from cam import plot

    images = np.zeros((2, 16, 16, 3), np.float32)
    maps = {"a": np.ones((2, 16, 16), np.float32), "b": np.ones((2, 16, 16), np.float32)}
    fig = plot.compare_methods(images, maps)
    boxes.outline_boxes(fig, [[2, 3, 10, 7], [0, 0, 16, 16]])
    for k, ax in enumerate(fig.axes):
        (patch,) = [p for p in ax.patches if isinstance(p, Rectangle)]
        x, y, w, h = ([1.5, 2.5, 8, 4] if k < 3 else [-0.5, -0.5, 16, 16])
        assert patch.get_xy() == (x, y) and (patch.get_width(), patch.get_height()) == (w, h)
    matplotlib.pyplot.close(fig)
