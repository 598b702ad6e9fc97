"""The model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency
Maps"), cascading from the output down: a map that still correlates with the original once
the model's weights are random does not depend on what the model learned.

* :func:`randomisation_check`: re-initialise a copy of the model stage by stage and compare
  each method's maps with the original's (:func:`cam.metrics.spearman`);
* :func:`randomisation_stages`: which layers form each stage (one weighted layer per stage by
  default; a study passes its architecture's grouping);
* :func:`reinitialise`: one layer's weights redrawn from its own initializers.

Unlike :mod:`cam.metrics` and :mod:`cam.road`, which take maps and a ``predict`` function,
this runs Keras models and explainers; tests/test_sanity.py checks it on a small CNN.
"""

from __future__ import annotations

import keras
import numpy as np
from tqdm.auto import tqdm

from .metrics import spearman


def randomisation_stages(model, group=None) -> list[tuple[str, list[str]]]:
    """Groups of the model's weighted layers, from the output down, for the cumulative
    model-randomisation check: ``[(stage name, [layer names]), ...]``.

    By default each weighted layer is its own stage, and a BatchNormalization joins the layer
    before it (a small CNN gives ``predictions``, ``conv4``, ..., ``conv1``). ``group(layer,
    previous)`` overrides that: it gets each weighted layer in graph order and the stage key of
    the one before it (None for the first) and returns the layer's stage key; consecutive
    layers with one key form one stage, named by the key. A study passes its architecture's
    grouping here (DenseNet blocks: :func:`cam.study.models.randomisation_stages`).
    """
    group = group or _default_stage
    weighted = [layer for layer in _flat_layers(model) if layer.trainable_weights]
    keys, previous = [], None
    for layer in weighted:
        previous = group(layer, previous)
        keys.append(previous)
    stages: list[tuple[str, list[str]]] = []
    for layer, key in reversed(list(zip(weighted, keys))):
        if stages and stages[-1][0] == key:
            stages[-1][1].append(layer.name)
        else:
            stages.append((key, [layer.name]))
    return stages


def _default_stage(layer, previous: str | None) -> str:
    if isinstance(layer, keras.layers.BatchNormalization) and previous is not None:
        return previous
    return layer.name


def _flat_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def reinitialise(layer, seed: int) -> None:
    """Redraw every weight of ``layer`` in place from the layer's own initializer
    (``kernel_initializer`` for ``kernel``, ``gamma_initializer`` for ``gamma``, ...), seeded
    ``seed``, ``seed + 1``, ... in weight order. BatchNormalization goes back to identity
    statistics, as at construction."""
    for offset, variable in enumerate(layer.weights):
        name = variable.name.split("/")[-1]
        init = getattr(layer, f"{name}_initializer", None)
        if init is None and name == "depthwise_kernel":
            init = getattr(layer, "depthwise_initializer", None)
        if init is None:
            raise ValueError(f"cannot re-initialise weight {variable.path!r} of layer "
                             f"{layer.name!r}: the layer has no {name}_initializer")
        config = init.get_config()
        if "seed" in config:
            config["seed"] = seed + offset
        fresh = type(init).from_config(config)
        variable.assign(fresh(tuple(variable.shape), dtype=variable.dtype))


def randomisation_check(model, explainers, images, layer=None, stages=None, targets=None,
                        seed: int = 0, normalize: bool = False, progress: bool = True):
    """Model-randomisation sanity check (Adebayo et al. 2018), cumulative from the top.

    A copy of the model (``keras.models.clone_model`` with the same weights; the caller's model
    is never touched) has the layers of each stage re-initialised in turn, keeping the earlier
    stages re-initialised. After each stage every explainer recomputes its maps of the same
    targets at the same layer, and each map is compared with the original model's map by
    Spearman rank correlation (:func:`cam.metrics.spearman`). A method whose maps still
    correlate highly once the weights are random does not depend on what the model learned.

    Parameters
    ----------
    model : keras.Model
    explainers : dict or explainer class
        ``{method name: factory}``, a factory being an explainer class or any callable
        ``factory(model, layer)`` returning an explainer; or one class (named by its ``name``).
    images : array (N, H, W, C)
    layer : str, int or None
        The layer all maps are taken at.
    stages : list of (name, [layer names]) or None
        What to re-initialise, top first; None: :func:`randomisation_stages` (one stage
        per weighted layer).
    targets : None, int or (N,) ints
        Classes to explain on every stage; None: the original model's predicted classes.
    seed : int
        Layer i of stage s is re-initialised with seeds from ``seed + 1_000_000 * s + 100 * i``.
    normalize : bool
        Compare normalised maps (ReLU, divided by the max) instead of the raw maps; both on
        the layer's grid.

    Returns
    -------
    list of dicts, one row per (stage, method, image) (``pandas.DataFrame(rows)`` makes it a
    table): ``stage`` (0 = the unchanged copy,
    a check that the copy reproduces the maps), ``reinitialised`` (the stage's name),
    ``layers`` (how many layers are random so far), ``method``, ``image``, ``spearman``
    (NaN where a map is constant).
    """
    if not isinstance(explainers, dict):
        explainers = {getattr(explainers, "name", getattr(explainers, "__name__", "explainer")): explainers}
    images = np.asarray(images, dtype=np.float32)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    if stages is None:
        stages = randomisation_stages(copy)
    known = {layer_.name: layer_ for layer_ in _flat_layers(copy)}
    for name, names in stages:
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"stage {name!r} names layers the model does not have: {missing[:5]}")

    def maps_of(methods) -> dict:
        return {m: e(images, targets=targets, upsample=False, normalize=normalize)
                for m, e in methods.items()}

    original = {m: f(model, layer) for m, f in explainers.items()}
    if targets is None:
        targets = next(iter(original.values())).explain(images, upsample=False).targets
    reference = maps_of(original)
    # One explainer per method on the copy: its compiled functions read the copy's variables,
    # so re-initialising them in place needs no retracing between stages.
    on_copy = {m: f(copy, layer) for m, f in explainers.items()}
    rows, count = [], 0
    plan = [("none", [])] + list(stages)
    for s, (name, names) in enumerate(tqdm(plan, desc="randomisation stages",
                                           disable=not progress, leave=False)):
        for i, layer_name in enumerate(names):
            reinitialise(known[layer_name], seed + 1_000_000 * s + 100 * i)
        count += len(names)
        for m, maps in maps_of(on_copy).items():
            for image, rho in enumerate(spearman(reference[m], maps)):
                rows.append({"stage": s, "reinitialised": name, "layers": count, "method": m,
                             "image": image, "spearman": rho})
    return rows
