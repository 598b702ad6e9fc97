"""Run by `make test` inside a throwaway virtual environment that has only the library and one
backend that is not TensorFlow (`pip install ".[jax]"`, KERAS_BACKEND=jax): the command line
works there with every method, none of the study's packages is installed, and neither is
TensorFlow. Not a pytest module (it needs that other environment); exits non-zero on failure.

    KERAS_BACKEND=jax python tests/core_install_check.py
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STUDY_ONLY = ("pandas", "seaborn", "sklearn", "scipy", "imagehash", "matplotlib", "tensorflow")


def run(*args, cwd) -> str:
    result = subprocess.run([sys.executable, "-m", "cam", *map(str, args)], capture_output=True,
                            text=True, cwd=cwd, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode != 0:
        sys.exit(f"python -m cam {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


def main() -> int:
    # a package the backend itself requires (JAX needs SciPy) is not cam pulling in the study
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    needed = {re.split(r"[ ;<>=!~\[]", r)[0].lower()
              for r in importlib.metadata.requires(backend) or []}
    present = [m for m in STUDY_ONLY
               if importlib.util.find_spec(m) is not None and m not in needed]
    if present:
        sys.exit(f"the core install pulled in study packages or TensorFlow: {present}")
    import cam

    source = Path(cam.__file__).resolve()
    if "site-packages" not in source.parts:
        sys.exit(f"cam was imported from {source}, not from the installed package")

    import keras
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
        keras.Model(inputs, outputs).save(root / "tiny.keras")
        pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "image.png")

        table = run("layers", root / "tiny.keras", cwd=root)
        if "relu" not in table or "16x16" not in table:
            sys.exit(f"unexpected layer table:\n{table}")
        for method in cam.METHODS:
            out = run("explain", root / "tiny.keras", root / "image.png", "--method", method,
                      "--layer", "relu", "--out", root / "maps", cwd=root)
            raw = np.load(root / "maps" / f"image-{method}.npy")
            with Image.open(root / "maps" / f"image-{method}.png") as png:
                size = png.size
            if raw.shape != (16, 16) or min(size) < 256 or "predicted class" not in out:
                sys.exit(f"{method}: raw map {raw.shape}, overlay {size}, output {out!r}")
    if "tensorflow" in sys.modules:
        sys.exit("cam imported TensorFlow on another backend")
    print(f"core install OK: cam {cam.__version__}, Keras {keras.__version__} on "
          f"{keras.backend.backend()}, {len(cam.METHODS)} methods explained from the command "
          f"line, no study packages, no TensorFlow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
