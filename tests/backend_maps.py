"""Raw maps of every method on saved models, on whichever backend KERAS_BACKEND names.

Run by ``tests/test_backends.py`` once per backend, each in its own process (Keras picks its
backend at import)::

    KERAS_BACKEND=jax python tests/backend_maps.py FOLDER OUT.npz

FOLDER holds ``spec.json`` (per model: a ``.keras`` file, or a ViT to build and a
``.weights.h5`` to load; the target layer; the images file; the targets) and the files it
names. OUT.npz gets ``<model>/<method>`` -> raw maps on the layer's grid, plus ``<model>/scores``.
Not a pytest module.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import cam  # noqa: E402

#: Keyword arguments per method that keep the perturbation methods small on tiny models.
OPTIONS = {"occlusion": {"window": 3, "stride": 2}, "fastablationcam": {"window": 2, "stride": 1}}


def load(folder: Path, entry: dict) -> keras.Model:
    if "keras" in entry:
        return keras.saving.load_model(folder / entry["keras"], compile=False)
    from cam.study.vit import build_vit  # a model built in code, then its weights file loaded

    model = build_vit(**entry["vit"])
    model.load_weights(folder / entry["weights"])
    return model


def main(folder: str, out: str) -> int:
    folder = Path(folder)
    spec = json.loads((folder / "spec.json").read_text())
    results = {}
    for name, entry in spec.items():
        model = load(folder, entry)
        images = np.load(folder / entry["images"])
        targets = np.asarray(entry["targets"])
        for method in cam.METHODS:
            for mode in ("head", "full") if method in entry.get("full", ()) else ("head",):
                explainer = cam.method_class(method)(model, entry["layer"], mode=mode,
                                                     **OPTIONS.get(method, {}))
                result = explainer.explain(images, targets, upsample=False, normalize=False)
                results[f"{name}/{method}/{mode}"] = result.raw
                results[f"{name}/scores"] = result.scores
    np.savez(out, backend=keras.backend.backend(), **results)
    print(f"{len(results)} arrays on {keras.backend.backend()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
