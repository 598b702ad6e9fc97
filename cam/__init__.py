"""cam: Grad-CAM, Ablation-CAM and FastAblationCAM for Keras 3 image classifiers.

    import cam
    explainer = cam.FastAblationCAM(model, layer="relu")
    maps = explainer(images)            # (B, H, W) float32 in [0, 1]
    cam.candidate_layers(model)         # which layers can be explained
    print(cam.layer_table(model))       # the same as a table: index, name, shape, head-only
    cam.GradCAM(vit, "block1_norm1")    # ViT token layers (batch, tokens, D) work too

From a shell: ``python -m cam layers MODEL.keras``, ``python -m cam explain MODEL.keras IMG``.

The explainers import TensorFlow, which takes seconds; they are loaded on first use so that
``python -m cam.download`` and the data tools start at once.
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_EXPORTS = {
    "AblationCAM": "explainers",
    "Explainer": "explainers",
    "FastAblationCAM": "explainers",
    "GradCAM": "explainers",
    "explain": "explainers",
    "Quantile": "maps",
    "Split": "graph",
    "TokenGrid": "graph",
    "build_vit": "vit",
    "candidate_layers": "graph",
    "layer_table": "graph",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cam' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
