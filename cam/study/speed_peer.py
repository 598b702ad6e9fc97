"""The peer rows of the speed study: tf-keras-vis Gradcam and Scorecam at a layer (optional:
``pip install '.[peer]'``), timed on the study's images with the study's clock."""

from __future__ import annotations

import gc

import numpy as np

from .. import candidate_layers
from .speed_table import grid_text
from .timing import PeakMemory, Quiet, clock, median_ms


def missing_row(layer: str, error: Exception) -> dict:
    """The one row that says tf-keras-vis is not installed."""
    return {"layer": layer, "method": "tf-keras-vis", "mode": "peer", "ms/image": np.nan,
            "x forward": np.nan, "notes": "",
            "measured": f"skipped: tf-keras-vis is not installed ({error}; "
                        f"pip install '.[peer]')"}


def peer_rows(study, layer: str) -> list[dict]:
    """tf-keras-vis Gradcam and Scorecam at ``layer`` as rows of ``study``
    (:class:`cam.study.speed.SpeedStudy`, its forward pass already timed), or one row saying
    tf-keras-vis is missing."""
    started = clock()
    try:
        import tf_keras_vis
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.scorecam import Scorecam
        from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
        from tf_keras_vis.utils.scores import CategoricalScore
    except ImportError as error:
        study.log(f"tf-keras-vis not installed ({error}); peer rows skipped")
        return [study.add(missing_row(layer, error), started=started)]
    version = tf_keras_vis.__version__
    shape = dict(candidate_layers(study.model))[layer][1:]
    grid, channels = grid_text(shape), shape[-1]
    # seek_penultimate_conv_layer=False: by default tf-keras-vis walks back from a non-conv
    # layer to the nearest convolution (for DenseNet's `relu`, the 32-channel
    # conv5_block32_2_conv), which would time and explain a different layer.
    gradcam = Gradcam(study.model, model_modifier=ReplaceToLinear(), clone=True)
    score = CategoricalScore(study.targets.tolist())
    with PeakMemory() as memory, Quiet():
        ms = median_ms(lambda: gradcam(score, study.images, penultimate_layer=layer,
                                       seek_penultimate_conv_layer=False),
                       study.repeats) / len(study.images)
    rows = [study.add({
        "layer": layer, "grid": grid, "method": "tf-keras-vis Gradcam", "mode": "peer",
        "batch size": len(study.images), "evaluations/image": 1, "ms/image": ms,
        "measured": "all",
        "notes": f"tf-keras-vis {version}, ReplaceToLinear, whole-network gradient"},
        memory, started)]
    # Score-CAM costs one whole-network pass per channel; time a sample of channels on one
    # image (max_N keeps the top-variance ones) and scale the per-channel cost.
    started = clock()
    scorecam = Scorecam(study.model)
    one, one_score = study.images[:1], CategoricalScore([int(study.targets[0])])
    n = min(channels, study.sample_masks)
    with PeakMemory() as memory, Quiet():
        sample_ms = median_ms(lambda: scorecam(one_score, one, penultimate_layer=layer,
                                               seek_penultimate_conv_layer=False, max_N=n,
                                               batch_size=32), study.repeats)
    per_channel = max(sample_ms - study.forward_ms, 0) / n
    measured = "all" if n == channels else \
        f"extrapolated: {n} of {channels} channels timed on 1 image (max_N={n})"
    rows.append(study.add({
        "layer": layer, "grid": grid, "method": "tf-keras-vis Scorecam", "mode": "peer",
        "batch size": 32, "evaluations/image": channels,
        "ms/image": study.forward_ms + per_channel * channels, "measured": measured,
        "notes": f"tf-keras-vis {version}; one whole-network pass per channel"},
        memory, started))
    gc.collect()  # tf-keras-vis' models and tapes hold GBs until collected
    return rows
