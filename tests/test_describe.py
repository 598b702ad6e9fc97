"""Methods describe themselves: settings, cost, and registration (cam.register_method); the
normalize conventions every explainer takes."""

from __future__ import annotations

import numpy as np
import pytest

import cam
from cam import maps as M
from conftest import random_images

KEYS = list(cam.METHODS)


@pytest.mark.parametrize("key", KEYS)
def test_every_method_declares_its_settings_and_cost(gap_head_model, key):
    cls = cam.method_class(key)
    explainer = cls(gap_head_model, "relu")
    assert all(isinstance(s, cam.Setting) for s in cls.SETTINGS)
    # each declared setting is a constructor keyword whose default is the declared one
    for setting in cls.SETTINGS:
        assert explainer.settings[setting.name] == setting.default or \
            setting.name in ("stride",)  # FastAblationCAM's None becomes the window
        assert f"{setting.name}=" in repr(explainer)
    grid = explainer.split.target_shape
    evaluations = explainer.evaluations_per_image
    assert isinstance(evaluations, int) and evaluations >= 1
    if isinstance(explainer, cam.GradientExplainer):
        assert evaluations == 1 and not explainer.whole_network
    elif key == "ablationcam":
        assert evaluations == grid[-1]
    elif key in ("fastablationcam", "reciprocam"):
        assert evaluations == grid[0] * grid[1]
    if key in ("occlusion", "scorecam"):
        assert explainer.whole_network and explainer.path == "input"


def test_a_registered_method_is_offered_everywhere(gap_head_model):
    class Peak(cam.GradientExplainer):
        """A toy: the weight is the largest gradient of each channel."""

        name = "Peak-CAM"
        SETTINGS = (cam.Setting("power", int, 1, "a made-up exponent", low=1),)

        def __init__(self, model, layer=None, score="logit", mode="head", reshape=None,
                     power=1):
            super().__init__(model, layer, score, mode, reshape)
            self.power = power

        def channel_weights(self, activation, gradients):
            from keras import ops
            return ops.max(gradients, axis=(1, 2)) ** self.power

    try:
        key = cam.register_method(Peak)
        assert key == "peakcam" and cam.method_class("Peak-CAM") is Peak
        maps = cam.explain("peakcam", gap_head_model, random_images((8, 8, 3), 2),
                           layer="relu", power=1)
        assert maps.shape == (2, 8, 8)
        with pytest.raises(ValueError, match="already registered"):
            cam.register_method(cam.GradCAM, key)
    finally:
        cam.METHODS.pop("peakcam", None)
    with pytest.raises(TypeError, match="subclass of cam.Explainer"):
        cam.register_method(object)


def test_normalize_conventions(gap_head_model):
    explainer = cam.GradCAM(gap_head_model, "relu")
    images = random_images((8, 8, 3), 3, seed=2)
    result = explainer.explain(images, upsample=False, normalize="minmax")
    np.testing.assert_allclose(result.maps, M.minmax_maps(result.raw), rtol=1e-6)
    np.testing.assert_allclose(explainer(images, upsample=False, normalize="max"),
                               M.normalize_maps(result.raw), rtol=1e-6)
    for bad in ("minmax ", "relu", 1, None):
        with pytest.raises(ValueError, match="normalize must be True, False, 'max' or"):
            explainer(images, normalize=bad)
