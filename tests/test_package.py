"""The library stays small: what `import cam` loads, where methods are registered, and that no
library module reaches into the study."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import cam
from cam import explainers, methods

ROOT = Path(cam.__file__).resolve().parent
LIBRARY = sorted(p for p in ROOT.glob("*.py"))
#: Packages the study needs and the library must not load.
STUDY_ONLY = ("pandas", "seaborn", "sklearn", "scipy", "imagehash", "matplotlib")


def _loaded_after(code: str) -> set[str]:
    """Modules loaded in a fresh interpreter after running ``code``."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_cam_loads_neither_keras_nor_the_study():
    loaded = _loaded_after("import cam, cam.cli")
    assert not {"keras", "tensorflow"} & loaded, "import cam must stay instant"
    assert not [m for m in loaded if m.startswith("cam.study")]


def test_explaining_loads_nothing_from_the_study():
    loaded = _loaded_after("""
import numpy as np, keras, cam, cam.cli
inputs = keras.Input((8, 8, 3))
x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="relu")(inputs)
x = keras.layers.GlobalAveragePooling2D()(x)
model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
for key in cam.METHODS:
    assert cam.method_class(key)(model, "relu")(images).shape == (2, 8, 8)
""")
    # Keras itself imports pandas, scikit-learn, SciPy and matplotlib when they are installed
    # (its wrappers and plotting utilities); what counts is what cam adds on top. The core
    # install check in `make test` (tests/core_install_check.py) runs where none is installed.
    added = loaded - _loaded_after("import keras")
    study = sorted(m for m in added if m.startswith("cam.study"))
    heavy = sorted(m for m in added if m.split(".")[0] in STUDY_ONLY)
    assert not study and not heavy, (study, heavy[:10])
    assert "cam.methods" in added  # the explainers did run


def test_no_library_module_imports_the_study():
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names = [a.name for a in node.names]
                assert "study" not in module.split(".") and not (
                    module in (".", "cam") and "study" in names), f"{path.name} imports {module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("cam.study") for a in node.names), path.name


def test_the_metrics_and_road_never_import_keras():
    """cam.metrics and cam.road are NumPy over maps and a predict function: they import no
    Keras, not even inside a function (the sanity check, which runs models, is cam.sanity)."""
    for name in ("metrics.py", "road.py"):
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, ast.Import):
                assert not [a.name for a in node.names if a.name.split(".")[0] == "keras"], name
            elif isinstance(node, ast.ImportFrom):  # of cam itself, only the Keras-free parts
                assert (node.module or "").split(".")[0] != "keras", name
                assert node.level == 0 or node.module in ("metrics", "_optional", "checks"), \
                    f"{name} imports {'.' * node.level}{node.module or ''}"
    loaded = _loaded_after("import cam.metrics, cam.road")
    assert not {"keras", "tensorflow", "jax", "torch"} & loaded


def test_library_modules_have_no_import_time_side_effects():
    """Importing every library module leaves the environment (backend, log levels) alone."""
    # Third-party imports may touch the environment themselves (OpenCV's loader extends
    # LD_LIBRARY_PATH): they are imported first, so what is compared is what cam adds.
    code = """
import os, sys
import cv2, keras, numpy, PIL.Image, tqdm
before = dict(os.environ)
import cam.cli, cam.explainers, cam.graph, cam.images, cam.maps, cam.methods, cam.metrics
import cam.keras_internals, cam.road, cam.sanity
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_every_method_class_is_registered_once_and_exported():
    defined = {name for name, obj in vars(methods).items()
               if inspect.isclass(obj) and issubclass(obj, explainers.Explainer)
               and obj.__module__ == methods.__name__}
    assert defined == set(cam.METHODS.values()), "a method class is missing from cam.METHODS"
    assert len(set(cam.METHODS.values())) == len(cam.METHODS)
    for key, name in cam.METHODS.items():
        assert name in cam.__all__ and getattr(cam, name) is cam.method_class(key)
        assert key == key.lower() and key.isalnum()
        assert cam.method_class(getattr(cam, name).name) is getattr(cam, name)  # "Grad-CAM"


def test_the_command_line_offers_every_registered_method(capsys):
    from cam import cli

    assert cli.main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in cam.METHODS:
        assert key in text
