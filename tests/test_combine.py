"""The device twins in cam.combine equal the NumPy functions of cam.maps (which are checked by
hand in test_maps.py) on random tensors, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from cam import backend as B
from cam import combine as C
from cam import maps as M

RNG = np.random.default_rng(11)
A = np.maximum(RNG.standard_normal((3, 4, 5, 6)), 0).astype(np.float32)
A[0, ..., 2] = 0  # a channel that sums to 0 (XGrad-CAM's guard)
G = RNG.standard_normal((3, 4, 5, 6)).astype(np.float32)
G[1, 0, 0, :] = 0  # zero gradients (Grad-CAM++'s guard)


def _close(device, reference, rtol=1e-5):
    got = B.numpy(device)
    assert got.shape == np.shape(reference)
    np.testing.assert_allclose(got, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


@pytest.mark.parametrize("name, args", [
    ("gradcam_weights", (G,)), ("layercam_weights", (G,)),
    ("gradcampp_weights", (A, G)), ("xgradcam_weights", (A, G))])
def test_gradient_weights(name, args):
    _close(getattr(C, name)(*map(B.tensor, args)), getattr(M, name)(*args), rtol=1e-4)


@pytest.mark.parametrize("weights", [RNG.standard_normal((3, 6)), G])
def test_weighted_channel_sum(weights):
    weights = weights.astype(np.float32)
    _close(C.weighted_channel_sum(B.tensor(A), B.tensor(weights)),
           M.weighted_channel_sum(A, weights))


def test_ablation_weights_guard_small_scores():
    score = np.array([2.0, 0.0, -1e-9], np.float32)
    ablated = RNG.standard_normal((3, 6)).astype(np.float32)
    _close(C.ablation_weights(B.tensor(score), B.tensor(ablated)),
           M.ablation_weights(score, ablated))


def test_spread_window_drops():
    masks = M.window_masks((4, 5), 2, 1)
    drops = RNG.standard_normal((3, len(masks))).astype(np.float32)
    _close(C.spread_window_drops(B.tensor(drops), B.tensor(masks)),
           M.spread_window_drops(drops, masks))


def test_scorecam_weights():
    scores = RNG.standard_normal((3, 7)).astype(np.float32) * 20
    _close(C.scorecam_weights(B.tensor(scores)), M.scorecam_weights(scores))
