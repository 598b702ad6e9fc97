"""cam: class activation maps for Keras 3 image classifiers.

    import cam
    explainer = cam.FastAblationCAM(model, layer="relu")
    maps = explainer(images)            # (B, H, W) float32 in [0, 1]
    result = explainer.explain(images)  # maps, raw maps, targets and scores together
    cam.candidate_layers(model)         # which layers can be explained
    print(cam.layer_table(model))       # the same as a table: index, name, shape, head-only
    cam.GradCAM(vit, "block1_norm1")    # ViT token layers (batch, tokens, D) work too
    cam.GradCAM(net, "encoder/blocks/3")  # a layer only a subclassed model's call reaches
    cam.bulk("model.keras", "images/", "out/", layer="relu")  # a whole folder to Parquet

From a shell: ``python -m cam layers MODEL.keras``, ``python -m cam explain MODEL.keras IMG``,
``python -m cam bulk MODEL.keras IMAGES/ --out DIR``.

Names are loaded on first use: ``import cam`` does not import Keras or its backend, so the
command line answers ``--help`` and argument errors at once.
"""

import importlib

#: Every method, registered here and nowhere else: the command-line name -> its class in
#: :mod:`cam.methods` (its name) or a class registered with :func:`register_method`. The
#: command line, the explorer, :func:`cam.explain` and ``__all__`` follow from it.
METHODS = {
    "gradcam": "GradCAM",
    "ablationcam": "AblationCAM",
    "fastablationcam": "FastAblationCAM",
    "gradcamplusplus": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "reciprocam": "ReciproCAM",
    "occlusion": "Occlusion",
    "scorecam": "ScoreCAM",
}


def _normalised(name: str) -> str:
    return "".join(name.lower().replace("+", "plus").replace("-", "").replace("_", "").split())


def register_method(cls, key: str | None = None) -> str:
    """Add an explainer class (a subclass of :class:`cam.Explainer`) to :data:`METHODS` under
    ``key`` (default: its ``name`` lowercased without '-', '_' or '+'), so the command line,
    the explorer and :func:`cam.explain` offer it. Returns the key."""
    from .explainers import Explainer

    if not (isinstance(cls, type) and issubclass(cls, Explainer)):
        raise TypeError(f"register_method takes a subclass of cam.Explainer, got {cls!r}")
    key = _normalised(key or cls.name)
    if key in METHODS and METHODS[key] not in (cls, cls.__name__):
        raise ValueError(f"method {key!r} is already registered ({METHODS[key]}); "
                         f"pass another key")
    METHODS[key] = cls
    return key


def method_key(method: str) -> str:
    """The registry key of a method name: ``"Grad-CAM"``, ``"grad_cam"`` -> ``"gradcam"``,
    ``"Grad-CAM++"`` -> ``"gradcamplusplus"``."""
    key = _normalised(method)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return key


_EXPORTS = {
    **{name: "methods" for name in METHODS.values()},
    "Explainer": "explainers",
    "Explanation": "explainers",
    "Setting": "explainers",
    "GradientExplainer": "gradient",
    "PerturbationExplainer": "perturbation",
    "AblationExplainer": "perturbation",
    "explain": "methods",
    "method_class": "methods",
    "release": "cache",
    "Features": "explainers",
    "targets": None,
    "bulk": None,  # a module you can call: cam.bulk(model, inputs, out, ...)
    "allow_tf32": "backend",
    "Quantile": "maps",
    "Split": "graph",
    "InterceptedSplit": "intercept",
    "ZeroMapWarning": "explainers",
    "TokenGrid": "tokens",
    "candidate_layers": "layers",
    "layer_table": "layers",
}
__all__ = sorted([*_EXPORTS, "METHODS", "method_key", "register_method"])
__version__ = "0.2.0"


def __getattr__(name):
    if name in _EXPORTS and _EXPORTS[name] is None:  # a submodule: cam.targets
        importlib.import_module(".backend", __name__)
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        importlib.import_module(".backend", __name__)  # Keras and its backend, or a clear error
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cam' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
