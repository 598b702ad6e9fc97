"""The FastAblationCAM reference's head on the study's trunk: its speed rows and goals.

The reference repository's DenseNet-169 ends in GlobalAveragePooling2D, Dense(1664) and
Dense(23, softmax) and scores probabilities. :func:`seed_head_model` puts that head (random
weights: timing does not depend on them) on the study model's own layers up to ``relu``, and
:func:`seed_head_rows` times at ``relu`` a forward pass, Ablation-CAM and FastAblationCAM
window 1 (head-only, ``score="probability"``), each row's ``x forward`` against that model's
own forward pass. The library scores such a head through its pooled-head shortcut (path
``pooled``, :mod:`cam.pooled`): the ablations move the pooled vector, and only the two dense
layers run per ablation.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from .. import release
from .speed import SpeedStudy

#: The reference head's hidden width (DenseNet-169's 1664 channels at ``relu``).
WIDTH = 1664
MODE = "seed head"
#: Goals (a benchmark, not a test): method -> most times a forward pass of the same model.
GOALS = {"Ablation-CAM": 1.3, "FastAblationCAM w1": 1.1}


def seed_head_model(model: keras.Model, layer: str = "relu", classes: int | None = None,
                    width: int = WIDTH, seed: int = 0) -> keras.Model:
    """``model``'s layers up to ``layer`` (shared, not copied) followed by the reference
    head: GlobalAveragePooling2D, Dense(``width``, relu), Dense(``classes``, softmax) with
    weights drawn from ``seed``. ``classes``: the model's output width by default."""
    classes = classes or int(model.output_shape[-1])
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    x = keras.layers.GlobalAveragePooling2D(name="seed_avg_pool")(model.get_layer(layer).output)
    x = keras.layers.Dense(width, activation="relu", kernel_initializer=init(0),
                           name="seed_dense")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", kernel_initializer=init(1),
                                 name="seed_predictions")(x)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # as the model takes them
    return keras.Model(inputs, outputs, name=f"{model.name}_seed_head")


def describe(model: keras.Model) -> str:
    """The seed model's head as a short text for the notes."""
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    return "GlobalAveragePooling2D, " + ", ".join(
        f"Dense({l.units}, {l.activation.__name__})" for l in dense) + ", random weights"


def seed_head_rows(model: keras.Model, images, layer: str = "relu", progress: bool = False,
                   **options) -> tuple[pd.DataFrame, dict]:
    """Rows (the speed table's columns, mode "seed head") of the forward pass, Ablation-CAM
    and FastAblationCAM w1 on :func:`seed_head_model` at ``layer``, ``score="probability"``,
    and the library's path for each method. ``options``: :class:`SpeedStudy`'s (``repeats``,
    ``budget_s``, ...). The forward pass is timed before and after (the faster kept)."""
    seed_model = seed_head_model(model, layer)
    study = SpeedStudy(seed_model, images, score="probability", progress=progress, **options)
    study.forward()
    paths = {}
    for method, label in (("Ablation-CAM", "Ablation-CAM"),
                          ("FastAblationCAM", "FastAblationCAM w1")):
        study.ablation(method, layer, "head", window=1)
        paths[label] = study.ablation_explainer(method, layer, "head")[0].path
    study.settle_forward()
    release(seed_model)
    table = study.table()
    table["mode"] = MODE
    table["notes"] = (f"{describe(seed_model)}, score=probability; x forward against this "
                      f"model's own forward pass; " + table["notes"])
    return table, paths


def seed_goals(table: pd.DataFrame) -> pd.DataFrame:
    """The goals of :data:`GOALS` from the seed rows of ``table`` (x forward against the seed
    model's own forward pass): goal, measured, need, bound, met ("yes", "no", "n/a")."""
    seed = table[table["mode"] == MODE].set_index("method")["x forward"]
    goals = pd.DataFrame([(f"seed head: {method} <= {bound}x", seed.get(method, np.nan), "<=",
                           bound) for method, bound in GOALS.items()],
                         columns=["goal", "measured", "need", "bound"])
    goals["met"] = np.where(goals["measured"].isna(), "n/a",
                            np.where(goals["measured"] <= goals["bound"], "yes", "no"))
    return goals
