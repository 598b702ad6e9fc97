"""cam.road against numbers worked out by hand: noisy linear imputation, ROAD curves and their
areas, and several maps scored together."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cam import metrics, road

def _impute(image, removed, **kwargs):
    """noisy_linear_impute of one (H, W) or (H, W, C) image without noise, as (H, W[, C])."""
    image = np.asarray(image, float)
    flat = image.ndim == 2
    out = road.noisy_linear_impute(image[None, ..., None] if flat else image[None],
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
        out = road.noisy_linear_impute(images, removed, noise=0.02, seed=4)
        assert out.dtype == np.result_type(images.dtype, np.float32)
        np.testing.assert_array_equal(out[~removed], images[~removed])
        assert not np.isclose(out[removed], images[removed]).all()
    # nothing removed: a copy, without noise
    images = rng.random((1, 3, 3, 2))
    np.testing.assert_array_equal(
        road.noisy_linear_impute(images, np.zeros((1, 3, 3), bool), noise=0.5), images)


def test_noisy_linear_impute_noise():
    rng = np.random.default_rng(2)
    images = rng.random((2, 30, 30, 3)) * 200 + 20
    removed = np.zeros((2, 30, 30), bool)
    removed[:, 5:25, 5:25] = True
    plain = road.noisy_linear_impute(images, removed, noise=0.0)
    noisy = road.noisy_linear_impute(images, removed, noise=0.05, seed=3)
    np.testing.assert_array_equal(noisy[~removed], images[~removed])  # kept pixels untouched
    np.testing.assert_array_equal(noisy, road.noisy_linear_impute(images, removed, 0.05, seed=3))
    assert not np.array_equal(noisy, road.noisy_linear_impute(images, removed, 0.05, seed=4))
    # noise std = 0.05 * each image's range (max - min over all its pixels), 1200 draws each
    for i in range(2):
        std = (noisy[i] - plain[i])[removed[i]].std()
        assert std == pytest.approx(0.05 * np.ptp(images[i]), rel=0.1)
    # Relative to the range, so imputation commutes with a x + b (a > 0), noise included.
    np.testing.assert_allclose(road.noisy_linear_impute(2.5 * images - 7, removed, 0.05, seed=3),
                               2.5 * noisy - 7, rtol=1e-10)
    # value_range replaces each image's range; the draws are the same.
    fixed = road.noisy_linear_impute(images, removed, 0.05, seed=3, value_range=255.0)
    for i in range(2):
        np.testing.assert_allclose(fixed[i] - plain[i],
                                   (noisy[i] - plain[i]) * 255.0 / np.ptp(images[i]), atol=1e-9)
    # A constant image has range 0: no noise.
    top = np.zeros((1, 4, 4), bool)
    top[0, :2] = True
    np.testing.assert_allclose(road.noisy_linear_impute(np.full((1, 4, 4, 1), 3.0), top, 0.5),
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
    morf = road.road_curves(region_predict, images, maps, order="morf", **kw)
    lerf = road.road_curves(region_predict, images, maps, order="lerf", **kw)
    assert morf.shape == lerf.shape == (3, 10)
    # Ideal map, MoRF: at 10% (6 pixels) the square is gone and imputed from the zeros around it.
    np.testing.assert_array_equal(morf[0], [1.0] + [0.0] * 9)
    # LeRF removes at most round(0.9 * 64) = 58 of the 60 background pixels: the square stays.
    np.testing.assert_array_equal(lerf[0], 1.0)
    # The reverse map is the worst in both orders.
    np.testing.assert_array_equal(morf[1], 1.0)
    np.testing.assert_array_equal(lerf[1], [1.0] + [0.0] * 9)
    areas = road.road(region_predict, images, maps, **kw)
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
    np.testing.assert_allclose(road.road_curves(region_predict, images, maps, 1, **kw), 1 - morf)


def test_road_curves_by_hand_for_single_pixels():
    images, maps = _road_setting()
    one = np.zeros((1, 8, 8))
    one[0, 3, 3] = 1.0  # pixel (3, 3) first, then raster order
    # round(0.02 * 64) = 1 pixel: (3, 3) becomes (2 * (1 + 1) + 1) / 12 = 5/12 from its 3 square
    # neighbours (direct, direct, diagonal) and 5 zeros, so class 0 has (3 + 5/12) / 4 = 41/48.
    curve = road.road_curves(region_predict, images[:1], one, fractions=(0.02,), noise=0.0,
                                progress=False)
    np.testing.assert_allclose(curve[0], [1.0, 41 / 48])
    # LeRF past the square: round(0.95 * 64) = 61 pixels, the whole background and (3, 3), the
    # first of the tied square pixels in raster order. Only square pixels (value 1) are left to
    # impute from, so everything becomes 1 and the curve stays flat.
    curve = road.road_curves(region_predict, images[:1], maps[:1], fractions=(0.5, 0.95),
                                order="lerf", noise=0.0, progress=False)
    np.testing.assert_array_equal(curve[0], [1.0, 1.0, 1.0])


def test_road_noise_is_seeded_per_image_and_fraction():
    images, maps = _road_setting()
    a = road.road_curves(region_predict, images, maps, seed=5, batch_size=1, progress=False)
    b = road.road_curves(region_predict, images, maps, seed=5, batch_size=7, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, road.road_curves(region_predict, images, maps, seed=6,
                                                     progress=False))
    # Ideal map: the square is imputed as noise of std 0.01 (the image's range is 1) around 0.
    assert a[0, 0] == 1.0 and (np.abs(a[0, 1:]) < 0.05).all()
    lerf = road.road_curves(region_predict, images, maps, order="lerf", seed=5, progress=False)
    np.testing.assert_array_equal(lerf[0], 1.0)  # the kept square carries no noise


def test_road_auc_by_hand():
    # x = 0, 0.25, 0.75: (0.25 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0) / 2) / 0.75 = 5/12
    assert road.road_auc([[1.0, 0.5, 0.0]], (0.25, 0.75))[0] == pytest.approx(5 / 12)
    curves = np.random.default_rng(0).random((4, 10))
    np.testing.assert_allclose(road.road_auc(curves), metrics.auc(curves))  # even spacing
    np.testing.assert_allclose(road.road_auc(np.full((2, 4), 0.3), (0.1, 0.5, 0.6)), 0.3)


@pytest.mark.parametrize("call, error, message", [
    (lambda: road.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.ones((1, 2, 2))),
     TypeError, "removed must be boolean"),
    (lambda: road.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.ones((1, 2, 3), bool)),
     ValueError, r"removed must be a \(N, H, W\) = \(1, 2, 2\) mask"),
    (lambda: road.noisy_linear_impute(np.zeros((2, 2, 1)), np.ones((2, 2), bool)),
     ValueError, r"images must be a \(N, H, W, C\) batch"),
    (lambda: road.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.eye(2, dtype=bool)[None], -1),
     ValueError, "noise must be a finite number >= 0, got -1"),
    (lambda: road.noisy_linear_impute(np.zeros((1, 2, 2, 1)), np.eye(2, dtype=bool)[None],
                                         value_range=0),
     ValueError, "value_range must be None or a finite number > 0"),
    (lambda: road.noisy_linear_impute(np.zeros((2, 2, 2, 1)),
                                         np.array([np.eye(2), np.ones((2, 2))], bool)),
     ValueError, "image 1 has every pixel removed"),
    (lambda: road.road_curves(region_predict, *_road_setting(), order="MoRF"),
     ValueError, r"order must be one of \('morf', 'lerf'\)"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=(0.5, 0.2)),
     ValueError, "fractions must be a non-empty sequence of numbers strictly increasing"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=(0.5, 0.5)),
     ValueError, "strictly increasing within"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=(0.0, 0.5)),
     ValueError, r"within \(0, 1\)"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=(0.5, 1.0)),
     ValueError, r"within \(0, 1\)"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=()),
     ValueError, "non-empty"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=[[0.1, 0.2]]),
     ValueError, "non-empty sequence"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions="half"),
     ValueError, "non-empty sequence"),
    (lambda: road.road_curves(region_predict, *_road_setting(), fractions=(0.995,)),
     ValueError, "fraction 0.995 removes all 64 pixels of these 8x8 images"),
    (lambda: road.road_curves(region_predict, _road_setting()[0], _road_setting()[1][:, :4]),
     ValueError, r"maps must be \(N, H, W\) = \(3, 8, 8\)"),
    (lambda: road.road_curves(region_predict, *_road_setting(), batch_size=0),
     ValueError, "batch_size must be an int >= 1, got 0"),
    (lambda: road.road_curves(region_predict, *_road_setting(), seed=-1),
     ValueError, r"seed must be None \(fresh randomness\) or an int >= 0, got -1"),
    (lambda: road.road_curves(region_predict, *_road_setting(), targets=0.5),
     ValueError, "targets must be None, an int or 3 ints"),
    (lambda: road.road_curves(region_predict, *_road_setting(), noise=-0.1, progress=False),
     ValueError, "noise must be a finite number >= 0"),
    (lambda: road.road(region_predict, *_road_setting(), workers=0),
     ValueError, r"workers must be an int >= 1, or -1 \(-1: one per CPU\), got 0"),
    (lambda: road.road_auc(np.zeros((2, 9))),
     ValueError, r"curves must be \(N, 10\)"),
    (lambda: road.road_auc(np.zeros((2, 3)), (0.6, 0.3)),
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
    together = road.road_by_method(predict, images, variants, **kw)
    # Per image: the unperturbed image plus 3 MoRF and 3 LeRF removed sets, whichever map asks;
    # plus the 3 images once for the targets.
    assert predict.images == 3 * (1 + 3 + 3) + 3
    for name, m in variants.items():
        alone = counting(region_predict)
        single = road.road(alone, images, m, **kw)
        assert alone.images == 3 * (1 + 3 + 3) + 3  # MoRF and LeRF share the unperturbed image
        assert together[name].keys() == single.keys()
        for key, value in single.items():
            np.testing.assert_array_equal(together[name][key], value)
    np.testing.assert_array_equal(together["reversed"]["morf"], together["maps"]["lerf"])
    np.testing.assert_array_equal(together["squared"]["lerf_minus_morf"],
                                  together["maps"]["lerf_minus_morf"])
    # Imputing in threads, the next batch while this one is scored, changes nothing.
    threaded = road.road_by_method(region_predict, images, variants, **{**kw, "workers": 3})
    for name in variants:
        np.testing.assert_array_equal(threaded[name]["lerf_minus_morf"],
                                      together[name]["lerf_minus_morf"])
    with pytest.raises(ValueError, match="maps must be a non-empty dict"):
        road.road_by_method(region_predict, images, maps)
    with pytest.raises(ValueError, match=r"maps must be \(N, H, W\) = \(3, 8, 8\)"):
        road.road_by_method(region_predict, images, {"a": maps, "b": maps[:, :4]})
