"""The model and its explainers, and the rows they make: what both engines of :func:`cam.bulk`
run on a batch of prepared images.

* :func:`load_model`: a ``.keras`` file (safe mode), a ``module:function`` or a model;
  :func:`model_hash`: what the manifest records to refuse a rerun with another model;
* :class:`BatchExplainer`: the model and one explainer per method, built once per process or
  Ray actor; :meth:`BatchExplainer.rows` turns a batch of prepared images into the dataset's
  rows (:func:`cam.bulk_output.schema`; one trunk pass shared by every method,
  :meth:`cam.Explainer.features`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from .bulk_inputs import Item, load_function
from .bulk_output import _pyarrow, schema

#: Most images in one batch when the memory budget allows more (host memory for the decoded
#: images, and the granularity of resuming).
MAX_BATCH = 256


def load_model(model, imports=()):
    """A Keras model from a ``.keras`` file (safe mode), a ``module:function`` returning one,
    or a model as it is."""
    from .cli import _import_modules, _load_model

    if not isinstance(model, (str, os.PathLike)):
        return model
    text = str(model)
    if text.endswith(".keras") or Path(text).exists():
        return _load_model(text, imports)
    _import_modules(imports)
    import keras

    built = load_function(text, "model")()
    if not isinstance(built, keras.Model):
        raise ValueError(f"model {text!r} returned {type(built).__name__}, not a keras.Model")
    return built


def model_hash(model, spec) -> str:
    """sha256 of the ``.keras`` file, else of the model's weights (name, shape and bytes)."""
    digest = hashlib.sha256()
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        with open(spec, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for weight in model.weights:
        value = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        digest.update(f"{weight.path}{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class BatchExplainer:
    """The model and one explainer per method at one layer, built once (per process, or per
    Ray actor); :meth:`rows` is the per-batch row-making both engines call."""

    def __init__(self, model, layer, methods: dict, score: str = "logit", target=None,
                 target_text: str = "predicted"):
        from .methods import method_class

        self.model = model
        self.explainers = {key: method_class(key)(model, layer, score=score, **options)
                           for key, options in methods.items()}
        first = next(iter(self.explainers.values()))
        self.layer = str(first.layer)
        self.target, self.target_text = target, target_text
        shape = model.input_shape
        if isinstance(shape, list) or len(shape) != 4 or None in shape[1:]:
            raise ValueError(f"the model's input shape is {shape}; cam.bulk needs a fixed "
                             f"(batch, height, width, channels) input")
        self.input_shape = tuple(int(s) for s in shape[1:])

    def batch_size(self) -> int:
        """Images a batch takes: what one trunk call fits in the memory budget
        (:mod:`cam.batching`), at most :data:`MAX_BATCH`."""
        first = next(iter(self.explainers.values()))
        return int(min(MAX_BATCH, first.rows_per_call("trunk")))

    def rows(self, images: np.ndarray, items: list[Item]):
        """The dataset's rows (a pyarrow Table in :func:`schema`) for one batch: ``images``
        (B, H, W, C) float32, ``items`` their :class:`Item` s (name, hash, size, needs)."""
        pa = _pyarrow()
        columns = {name: [] for name in schema().names}
        start = time.perf_counter()
        everyone = [key for key in self.explainers if all(key in i.needs for i in items)]
        shared = next(iter(self.explainers.values())).features(images) if everyone else None
        trunk = time.perf_counter() - start
        for key, explainer in self.explainers.items():
            chosen = [i for i, item in enumerate(items) if key in item.needs]
            if not chosen:
                continue
            start = time.perf_counter()
            if key in everyone:
                result = explainer.explain(images, self.target, upsample=False,
                                           normalize=False, features=shared)
            else:  # some images already have this method's rows: only the others
                result = explainer.explain(images[chosen], self.target, upsample=False,
                                           normalize=False)
            seconds = (time.perf_counter() - start + (trunk / len(everyone)
                                                      if key in everyone else 0.0))
            scores = result.scores
            classifier = isinstance(scores, np.ndarray) and scores.ndim == 2
            for j, i in enumerate(chosen):
                raw = np.asarray(result.raw[j], np.float32)
                predicted = int(scores[j].argmax()) if classifier else None
                columns["path"].append(items[i].name)
                columns["sha256"].append(items[i].sha256)
                columns["height"].append(items[i].height)
                columns["width"].append(items[i].width)
                columns["predicted"].append(predicted)
                columns["predicted_score"].append(float(scores[j, predicted]) if classifier
                                                  else None)
                columns["target"].append(self.target_text)
                columns["target_class"].append(None if result.targets is None
                                               else int(result.targets[j]))
                columns["target_score"].append(float(result.target_scores[j]))
                columns["method"].append(key)
                columns["layer"].append(self.layer)
                columns["map"].append(raw.ravel())
                columns["map_height"].append(raw.shape[0])
                columns["map_width"].append(raw.shape[1])
                columns["map_min"].append(float(raw.min()))
                columns["map_max"].append(float(raw.max()))
                columns["seconds"].append(seconds / len(chosen))
        return pa.Table.from_pydict(columns, schema=schema())
