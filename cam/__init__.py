"""cam: Grad-CAM, Ablation-CAM and FastAblationCAM for Keras 3 image classifiers.

    import cam
    explainer = cam.FastAblationCAM(model, layer="relu")
    maps = explainer(images)            # (B, H, W) float32 in [0, 1]
    cam.candidate_layers(model)         # which layers can be explained
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .explainers import AblationCAM, Explainer, FastAblationCAM, GradCAM, explain  # noqa: E402
from .graph import Split, candidate_layers  # noqa: E402

__all__ = [
    "AblationCAM",
    "Explainer",
    "FastAblationCAM",
    "GradCAM",
    "Split",
    "candidate_layers",
    "explain",
]
__version__ = "0.1.0"
