"""Optional dependencies, imported when first needed, with the install line when missing.

The core install (``pip install cam``) needs only Keras, a backend, NumPy, OpenCV, Pillow and
tqdm; plots need matplotlib (``cam[plot]``) and some metrics SciPy (``cam[metrics]``).
"""

from __future__ import annotations

import importlib

#: module -> the extra of this package that installs it
EXTRAS = {"matplotlib": "plot", "scipy": "metrics", "ipywidgets": "widgets", "pyarrow": "bulk",
          "ray": "ray"}


def require(module: str, feature: str):
    """Import ``module`` (e.g. ``"scipy.stats"``) or fail naming ``feature`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'cam[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(f"{feature} needs {top}, which is not installed: {hint}") from err
