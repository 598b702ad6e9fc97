"""Many saliency methods on the same images without paying twice, what each one costs, and
how faithful each one is: the helpers behind notebooks/03-saliency and notebooks/05-faithfulness.

* :func:`explain_together`: raw maps of several explainers at one layer, the trunk run once
  per batch for all of them, and what each method costs per image on its own;
* :func:`to_grid`: input-resolution maps (Occlusion's) averaged onto a layer's grid;
* :func:`explain_timed`: maps one image per call with the wall time of each call, for a
  method that does not start from the layer (Occlusion);
* :class:`CachedPredict`: a predict function that runs the model once per distinct image;
* :func:`image_metrics`: the per-image metrics that take one forward pass per image;
* notebook 05's steps: :func:`original_methods` and :func:`study_methods` (the explainers),
  :func:`round_robin` (the ROAD sample), :func:`maps_and_cost` (every method's maps and what
  each costs), :func:`study_masks` (the grain masks), :func:`score_maps` (the cheap metrics
  and the deletion and insertion curves), :func:`road_scores` and :func:`with_road` (ROAD),
  :class:`Stopwatch` (wall and CPU time per part);
* the tables of notebook 05: :func:`cost_table` (what each method costs),
  :func:`mean_ci_rows` and :func:`metric_table` (per-image values to means with bootstrap
  intervals, :data:`BETTER` saying which way each metric is better), :func:`summary_table`
  (one "mean [low, high]" cell per metric and method), :func:`road_table` and
  :func:`road_summary` (ROAD per method), :func:`sanity_summary` (the randomisation check per
  stage);
* its figures: :func:`perturbation_figure` (deletion and insertion curves),
  :func:`road_figure` (ROAD curves), :func:`cost_figure` (ROAD's LeRF - MoRF against
  milliseconds per image, one labelled point per method), :func:`sanity_figure` (Spearman per
  stage of the randomisation check).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from .. import (AblationCAM, AblationExplainer, FastAblationCAM, GradCAM, GradCAMPlusPlus,
               GradientExplainer, HiResCAM, LayerCAM, Occlusion, ReciproCAM, ScoreCAM,
               XGradCAM, metrics, road)
from ..maps import normalize_maps, upsample_maps
from . import segment

#: Explainers whose maps start from the target layer's activation, so one trunk pass can
#: serve them all (Occlusion perturbs pixels and is explained on its own).
SHARES_TRUNK = (GradientExplainer, AblationExplainer, ScoreCAM)


@dataclass(frozen=True)
class Together:
    """What :func:`explain_together` computed, and how long each part took."""

    raw: dict             # {name: (N, h, w) raw maps on the layer's grid}
    targets: np.ndarray   # (N,) the class explained
    seconds: dict         # {name: (batches,) wall time of the method's own work per batch}
    trunk_seconds: np.ndarray  # (batches,) the shared trunk and unablated head per batch
    batch_sizes: np.ndarray    # (batches,)

    def ms_per_image(self, name: str) -> float:
        """Milliseconds per image of ``name`` run on its own: the trunk pass plus its own work,
        median over the batches after the first (which traces the compiled functions); NaN
        with a single batch."""
        per_image = (self.trunk_seconds + self.seconds[name])[1:] / self.batch_sizes[1:]
        return float(1000 * np.median(per_image)) if per_image.size else float("nan")


def explain_together(explainers: Mapping, images, targets=None, batch_size: int = 16,
                     progress: bool = True) -> Together:
    """Raw maps (N, h, w) on the layer's grid of several explainers of one model at one layer:
    what ``explainer.explain(images, targets, upsample=False, normalize=False).raw`` returns
    for each, with the trunk (and the unablated head) run once per batch of ``batch_size``
    images for all of them instead of once per explainer. Each part is timed, so
    ``batch_size=1`` also gives what each method costs per image on its own
    (:meth:`Together.ms_per_image`).

    Every explainer must be a head-mode :data:`SHARES_TRUNK` method on the same model, layer
    and score. ``targets`` None explains each image's predicted class.
    """
    if not explainers:
        raise ValueError("explainers must be a non-empty {name: explainer} dict")
    first = next(iter(explainers.values()))
    for name, e in explainers.items():
        if not isinstance(e, SHARES_TRUNK) or e.mode != "head":
            raise ValueError(f"{name}: {type(e).__name__} in mode {e.mode!r} does not start from "
                             f"the layer's activation in head mode; explain it on its own")
        if e.model is not first.model or (e.layer, e.score) != (first.layer, first.score):
            raise ValueError(f"{name} explains {e.layer!r} ({e.score}) of {e.model.name!r}; "
                             f"every explainer must share the first one's model, layer and score")
    images = np.asarray(images, dtype=np.float32)
    raws = {name: [] for name in explainers}
    seconds = {name: [] for name in explainers}
    trunk_seconds, chosen, sizes = [], [], []
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, leave=False,
                      desc=f"{len(explainers)} methods, one trunk pass per batch"):
        batch = images[start:start + batch_size]
        clock = time.perf_counter()
        features = first.features(batch)  # the trunk and the unablated head, on the device
        wanted = None if targets is None else \
            np.broadcast_to(np.asarray(targets), (len(images),))[start:start + batch_size]
        trunk_seconds.append(time.perf_counter() - clock)
        for name, e in explainers.items():
            clock = time.perf_counter()
            result = e.explain(batch, wanted, upsample=False, normalize=False,
                               features=features)
            raws[name].append(result.raw)
            seconds[name].append(time.perf_counter() - clock)
        chosen.append(result.targets)
        sizes.append(len(batch))
    return Together({name: np.concatenate(r).astype(np.float32) for name, r in raws.items()},
                    np.concatenate(chosen).astype(np.int64),
                    {name: np.array(s) for name, s in seconds.items()},
                    np.array(trunk_seconds), np.array(sizes))


def to_grid(maps, shape: tuple[int, int]) -> np.ndarray:
    """Maps (N, H, W) resized to (N, h, w) by OpenCV's area interpolation: each cell the mean
    of the pixels it covers, exactly when H / h and W / w are whole numbers. Puts Occlusion's
    input-resolution maps on a layer's grid, to rank them cell by cell against the CAMs."""
    maps = np.asarray(maps, dtype=np.float32)
    h, w = shape
    if maps.shape[1:] == (h, w):
        return maps
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) for m in maps])


@dataclass(frozen=True)
class Timed:
    """Maps computed one image per call, and how long each call took."""

    maps: np.ndarray       # (N, H, W) normalised, upsampled to the images
    targets: np.ndarray    # (N,) the class explained
    seconds: np.ndarray    # (N,) wall time of each call; NaN for the first (the warm-up)

    @property
    def ms_per_image(self) -> float:
        """Median wall time of one call after the warm-up, in milliseconds (NaN if none)."""
        timed = self.seconds[np.isfinite(self.seconds)]
        return float(1000 * np.median(timed)) if timed.size else float("nan")


def explain_timed(explainer, images, targets=None) -> Timed:
    """``explainer.explain`` one image at a time, timing each call (``time.perf_counter``).

    The first call traces the explainer's compiled functions: its map is kept, its time is
    not (NaN). Every later call has the same shape, so it runs what a user explaining one image
    at a time would pay. Maps are normalised and upsampled to the images.
    """
    images = np.asarray(images, dtype=np.float32)
    maps, chosen, seconds = [], [], []
    for i in range(len(images)):
        wanted = None if targets is None else np.asarray(targets)[i:i + 1]
        start = time.perf_counter()
        result = explainer.explain(images[i:i + 1], targets=wanted)
        seconds.append(time.perf_counter() - start if i else np.nan)
        maps.append(result.maps)
        chosen.append(result.targets)
    return Timed(np.concatenate(maps), np.concatenate(chosen), np.array(seconds))


class CachedPredict:
    """A predict function (images -> class probabilities) that runs ``predict`` once per
    distinct image: results are kept under a digest of each image's bytes.

    Deletion and insertion curves of every method start and end on the same images (the
    image itself, the blurred image, the black image), and two methods that rank pixels alike
    perturb the same pixels at some steps; wrapping the model in one ``CachedPredict`` for all
    of them scores each of those images once. ``asked`` and ``computed`` count images.
    """

    def __init__(self, predict):
        self.predict = predict
        self.cache: dict[bytes, np.ndarray] = {}
        self.asked = 0
        self.computed = 0

    def __call__(self, images) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        keys = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]
        todo = {}
        for i, key in enumerate(keys):
            if key not in self.cache and key not in todo:
                todo[key] = i
        if todo:
            probabilities = np.asarray(self.predict(images[list(todo.values())]))
            if probabilities.ndim != 2 or len(probabilities) != len(todo):
                raise ValueError(f"predict must return (B, classes) for B images; for {len(todo)} "
                                 f"images it returned shape {probabilities.shape}")
            self.cache.update(zip(todo, probabilities))
        self.asked += len(images)
        self.computed += len(todo)
        return np.stack([self.cache[key] for key in keys])


def image_metrics(predict, images, maps, masks, targets, scores,
                  batch_size: int = 32) -> dict[str, np.ndarray]:
    """The per-image metrics of one method's maps that cost one forward pass per image,
    ``{metric: (N,) float64}``: ``Average Drop %`` and ``Increase in Confidence %`` (the
    model's probability of ``targets`` on the images multiplied by their maps,
    :func:`cam.metrics.explanation_masked`, against ``scores``, the same probability on the
    images), ``pointing game %`` and ``energy in mask`` against the boolean ``masks``.

    ``predict``: images -> class probabilities, run in batches of ``batch_size``."""
    masked = metrics.predict_batches(predict, metrics.explanation_masked(images, maps), batch_size)
    o = masked[np.arange(len(images)), targets]
    return {"Average Drop %": metrics.average_drop(scores, o),
            "Increase in Confidence %": 100.0 * metrics.increase_in_confidence(scores, o),
            "pointing game %": 100.0 * metrics.pointing_game(maps, masks),
            "energy in mask": metrics.energy_in_mask(maps, masks)}


def original_methods(window: int = 1, batch_size: int = 128) -> dict:
    """The study's original three methods as ``{name: factory(model, layer)}``, what
    :func:`cam.sanity.randomisation_check` rebuilds on every re-initialised copy: Grad-CAM,
    Ablation-CAM, and FastAblationCAM with ``window``; the two ablation methods score
    ``batch_size`` ablated activations per head call."""
    return {
        "Grad-CAM": lambda model, layer: GradCAM(model, layer),
        "Ablation-CAM": lambda model, layer: AblationCAM(model, layer, batch_size=batch_size),
        "FastAblationCAM": lambda model, layer: FastAblationCAM(model, layer, window=window,
                                                                batch_size=batch_size),
    }


def study_methods(model, layer: str, factories: Mapping, batch_size: int = 128,
                  scorecam_channels: int = 32, occlusion_window: int = 32) -> tuple[dict, dict]:
    """Notebook 05's explainers of ``model`` at ``layer``, as two ``{name: explainer}`` dicts.

    The first holds the methods that start from the layer's activation, so that one trunk pass
    per image serves them all (:func:`explain_together`): ``factories``' methods
    (:func:`original_methods`), then Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM and ReciproCAM
    (``batch_size`` masked activations per head call). The second holds the costly methods,
    which run the whole network once per channel or patch: Score-CAM on the
    ``scorecam_channels`` channels that vary most (Faster Score-CAM) and Occlusion with
    ``occlusion_window``-pixel patches, each name saying its setting."""
    layer_methods = {name: factory(model, layer) for name, factory in factories.items()} | {
        "Grad-CAM++": GradCAMPlusPlus(model, layer),
        "XGrad-CAM": XGradCAM(model, layer),
        "LayerCAM": LayerCAM(model, layer),
        "HiResCAM": HiResCAM(model, layer),
        "ReciproCAM": ReciproCAM(model, layer, batch_size=batch_size),
    }
    costly = {
        f"Score-CAM (top {scorecam_channels} ch.)": ScoreCAM(
            model, layer, channels=scorecam_channels, batch_size=16),
        f"Occlusion ({occlusion_window} px)": Occlusion(model, layer, window=occlusion_window,
                                                        batch_size=25),
    }
    return layer_methods, costly


def round_robin(labels, n: int = 0) -> np.ndarray:
    """Positions in ``labels`` of the first item of every label, then of the second, and so on
    (labels in sorted order within each round): a sample that reaches every class before it
    repeats one. The first ``n`` positions (0: all)."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (0: all), got {n}")
    labels = np.asarray(labels)
    rank = pd.Series(labels).groupby(labels).cumcount().to_numpy()  # k-th item of its label
    return np.lexsort((labels, rank))[:n or None]  # by rank, then by label


class Explained(NamedTuple):
    """What :func:`maps_and_cost` returns."""

    maps: dict            # {name: (n, H, W) float32 in [0, 1]}: layer methods, "random", costly
    positions: dict       # {costly name: (n,) positions of the images its maps are of}
    targets: np.ndarray   # (N,) the class explained: each image's predicted class
    cost: pd.DataFrame    # :func:`cost_table`


def maps_and_cost(layer_methods: Mapping, costly: Mapping, images, costly_sample, seed: int = 0,
                  progress: bool = True) -> Explained:
    """Every method's maps, normalised (ReLU, divided by the maximum) and upsampled to the
    images, and what each method costs a user who explains one image per call.

    ``layer_methods`` (:func:`study_methods`) explain every image, one image per call, sharing
    the trunk pass (:func:`explain_together`); the classes they explain (each image's
    predicted class) are the ``targets`` of the ``costly`` methods, which explain the images
    at positions ``costly_sample`` only: Score-CAM (it starts from the layer's activation) with
    its own trunk pass, Occlusion (it starts from the input) with :func:`explain_timed`.
    ``"random"`` maps, every pixel uniform in [0, 1] drawn with ``seed``, follow the layer's
    methods as the chance baseline. Cost (:func:`cost_table`): the median over the images
    after the first, whose calls trace the compiled functions."""
    images = np.asarray(images, dtype=np.float32)
    costly_sample = np.asarray(costly_sample, dtype=np.int64)
    shape = images.shape[1:3]
    together = explain_together(layer_methods, images, batch_size=1, progress=progress)
    targets = together.targets
    maps = {name: upsample_maps(normalize_maps(r), shape) for name, r in together.raw.items()}
    maps["random"] = np.random.default_rng(seed).uniform(0, 1, images.shape[:3]).astype(np.float32)
    cost_ms = {name: together.ms_per_image(name) for name in layer_methods}
    timed_images = dict.fromkeys(layer_methods, len(images) - 1)
    picked, wanted = images[costly_sample], targets[costly_sample]
    for name, e in costly.items():
        if isinstance(e, SHARES_TRUNK):
            alone = explain_together({name: e}, picked, wanted, batch_size=1, progress=progress)
            maps[name] = upsample_maps(normalize_maps(alone.raw[name]), shape)
            cost_ms[name] = alone.ms_per_image(name)
        else:
            alone = explain_timed(e, picked, wanted)
            maps[name], cost_ms[name] = alone.maps, alone.ms_per_image
        if not np.array_equal(alone.targets, wanted):
            raise RuntimeError(f"{name} explained classes {alone.targets}, asked for {wanted}")
        timed_images[name] = len(costly_sample) - 1
    cost = cost_table(cost_ms, {**layer_methods, **costly}, timed_images, whole_network=costly)
    return Explained(maps, dict.fromkeys(costly, costly_sample), targets, cost)


def all_zero_share(maps: Mapping) -> dict[str, float]:
    """``{name: share of its maps that are zero everywhere}``, rounded to 3 decimals: a map
    that says nothing (e.g. Grad-CAM where every weighted channel is negative)."""
    return {name: round(float((np.asarray(m).reshape(len(m), -1).max(axis=1) == 0).mean()), 3)
            for name, m in maps.items()}


def study_masks(dataset: str, root, files, images, progress: bool = True
                ) -> tuple[np.ndarray, str]:
    """Grain masks (N, H, W) bool of ``images`` (N, H, W, 3) and how they were made: for the
    synthetic stand-in the exact masks it was drawn with (:func:`cam.study.segment.synthetic_masks`
    of ``files`` under ``root``), else segmented from the images
    (:func:`cam.study.segment.grain_masks`: Otsu on the colour distance from the background,
    then morphology)."""
    images = np.asarray(images)
    if dataset == "synthetic":
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"synthetic images are square, got {images.shape[1:3]}")
        return segment.synthetic_masks(root, files, images.shape[1]), "exact (synthetic)"
    return (segment.grain_masks(images.astype(np.uint8), progress=progress),
            "segmented (Otsu + morphology)")


def score_maps(predict, images, maps: Mapping, masks, targets, scores, positions=None,
               curved=(), steps: int = 8, batch_size: int = 32, progress: bool = True
               ) -> tuple[dict, dict]:
    """Every map's cheap metrics, and the deletion and insertion curves of some.

    ``maps`` is ``{name: (n, H, W)}``, of the images at ``positions[name]`` where
    ``positions`` (a dict) names it, else of every image; ``targets`` (N,) the class
    explained and ``scores`` (N,) its probability on each image. Returns ``per_image``,
    ``{name: {metric: (n,) values}}`` (:func:`image_metrics`, plus ``"deletion AUC"`` and
    ``"insertion AUC"`` for the methods in ``curved``), and ``curves``,
    ``{name in curved: {mode: (n, steps + 1)}}`` (:func:`cam.metrics.perturbation_curves`).
    ``predict`` (images -> probabilities, e.g. a :class:`CachedPredict`) runs in batches of
    ``batch_size``."""
    positions = positions or {}
    missing = [name for name in [*curved, *positions] if name not in maps]
    if missing:
        raise ValueError(f"no maps for {missing}; the maps are of {list(maps)}")
    images, targets, scores = np.asarray(images), np.asarray(targets), np.asarray(scores)
    per_image, curves = {}, {}
    for name, m in maps.items():
        pick = np.asarray(positions.get(name, np.arange(len(images))))
        if len(m) != len(pick):
            raise ValueError(f"{name}: {len(m)} maps for {len(pick)} images")
        per_image[name] = image_metrics(predict, images[pick], m, masks[pick], targets[pick],
                                        scores[pick], batch_size)
        if name in curved:
            curves[name] = {mode: metrics.perturbation_curves(
                predict, images[pick], m, targets[pick], mode, steps=steps,
                batch_size=batch_size, progress=progress) for mode in metrics.PERTURBATION_MODES}
            per_image[name] |= {f"{mode} AUC": metrics.auc(c) for mode, c in curves[name].items()}
    return per_image, curves


def cost_table(cost_ms: Mapping, explainers: Mapping, timed_images: Mapping,
               whole_network=()) -> pd.DataFrame:
    """What each method of ``cost_ms`` (``{method: milliseconds per image}``) costs, one row
    per method in that order: ``evaluations/image`` (its explainer's ``evaluations_per_image``,
    1 where it has none), ``runs`` (``"whole network"`` for the methods in ``whole_network``,
    else ``"head (trunk once)"``), ``timed images`` (from ``timed_images``) and ``ms/image``."""
    methods = list(cost_ms)
    return pd.DataFrame({
        "evaluations/image": [getattr(explainers[n], "evaluations_per_image", 1) for n in methods],
        "runs": ["whole network" if n in whole_network else "head (trunk once)" for n in methods],
        "timed images": [timed_images[n] for n in methods],
        "ms/image": [cost_ms[n] for n in methods]}, index=methods).rename_axis("method")


def mean_ci_rows(values: Mapping, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> pd.DataFrame:
    """``{name: per-image values}`` -> one row per name: mean, bootstrap interval
    (:func:`cam.metrics.bootstrap_ci`), images (finite values) and NaN count."""
    rows = []
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        mean, low, high = metrics.bootstrap_ci(v, confidence, resamples, seed)
        rows.append({"name": name, "mean": mean, f"{confidence:.0%} CI low": low,
                     f"{confidence:.0%} CI high": high, "images": int(np.isfinite(v).sum()),
                     "NaN": int(np.isnan(v).sum())})
    return pd.DataFrame(rows).set_index("name")


#: Which way each metric of notebook 05 is better, in the order of its tables.
BETTER = {"Average Drop %": "lower", "Increase in Confidence %": "higher", "deletion AUC": "lower",
          "insertion AUC": "higher", "pointing game %": "higher", "energy in mask": "higher",
          "ROAD MoRF AUC": "lower", "ROAD LeRF AUC": "higher", "ROAD LeRF - MoRF": "higher"}


def metric_table(per_image: Mapping, better: Mapping, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """``{method: {metric: per-image values}}`` -> one row per (metric, method), methods in
    their order and each method's metrics in theirs: ``better`` (``better[metric]``, e.g.
    ``"lower"``), then :func:`mean_ci_rows`' mean, bootstrap interval, images and NaN count."""
    parts = []
    for method, values in per_image.items():
        rows = mean_ci_rows(values, confidence, resamples, seed).rename_axis("metric")
        parts.append(rows.assign(method=method, better=[better[m] for m in rows.index]))
    table = pd.concat(parts).set_index("method", append=True)
    return table[["better", *table.columns.drop("better")]]


def summary_table(table: pd.DataFrame, better: Mapping, methods, images: int,
                  confidence: float = 0.95) -> pd.DataFrame:
    """:func:`metric_table` as one cell per metric (rows, in the order of ``better``, labelled
    ``"<metric> (<better> is better)"``) and method (columns, in the order of ``methods``):
    ``"mean [low, high]"`` to 3 significant digits, with ``" n=<images>"`` where the cell used
    other than ``images`` images, and ``"not run"`` where the method has no such metric."""
    low, high = f"{confidence:.0%} CI low", f"{confidence:.0%} CI high"
    cells = [f"{r['mean'] + 0.0:.3g} [{r[low] + 0.0:.3g}, {r[high] + 0.0:.3g}]"  # + 0.0: no "-0"
             + (f" n={r['images']}" if r["images"] != images else "")
             for _, r in table.iterrows()]
    wide = (table.assign(cell=cells)["cell"].unstack("method")
            .reindex(index=list(better), columns=list(methods), fill_value="not run")
            .fillna("not run"))
    wide.index = [f"{m} ({better[m]} is better)" for m in wide.index]
    return wide


#: The three ROAD numbers per image, as :func:`cam.road.road` names them, and how the tables
#: call them.
ROAD_SCORES = {"morf_auc": "MoRF AUC", "lerf_auc": "LeRF AUC", "lerf_minus_morf": "LeRF - MoRF"}


def road_table(results: Mapping, cost_ms: Mapping | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per method from ``{method: cam.road.road(...)}``: images, the mean of each
    of :data:`ROAD_SCORES` with its 95% bootstrap interval, the mean curve at every fraction
    (MoRF and LeRF), and ``ms/image`` from ``cost_ms`` where given."""
    rows = []
    for method, r in results.items():
        row = {"method": method, "images": len(r["targets"])}
        if cost_ms is not None:
            row["ms/image"] = cost_ms.get(method, np.nan)
        for key, label in ROAD_SCORES.items():
            mean, low, high = metrics.bootstrap_ci(r[key], 0.95, 2000, seed)
            row.update({label: mean, f"{label} CI low": low, f"{label} CI high": high})
        for order, label in zip(road.ROAD_ORDERS, ("MoRF", "LeRF")):
            for f, value in zip(r["fractions"], r[order][:, 1:].mean(axis=0)):
                row[f"{label} {f:.0%}"] = value
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def road_summary(results: Mapping, cost: pd.DataFrame, paired_images: int,
                 seed: int = 0) -> pd.DataFrame:
    """:func:`road_table` with what each method costs from ``cost`` (:func:`cost_table`):
    ``evaluations/image`` after ``images``, and ``ms/image``; NaN for a method ``cost`` lacks
    (random maps). Last, ``"LeRF - MoRF, first <paired_images> images"``: every method's mean
    gap on the first ``paired_images`` images only, so that methods scored on fewer images
    (the costly ones) compare with the others on the same images."""
    table = road_table(results, cost["ms/image"], seed)
    table.insert(1, "evaluations/image", cost["evaluations/image"])
    table[f"LeRF - MoRF, first {paired_images} images"] = [
        r["lerf_minus_morf"][:paired_images].mean() for r in results.values()]
    return table


def road_scores(predict, images, maps: Mapping, targets, sample, fractions=road.ROAD_FRACTIONS,
                positions=None, **kwargs) -> dict:
    """ROAD of every map (:func:`cam.road.road_by_method`), ``{name: result}`` in the order of
    ``maps``: a map that ``positions`` names is scored on the images it is of (its
    ``positions[name]``), every other one (maps of every image) on the images at ``sample``.
    Maps scored on the same images share one call, so an imputed image that several of them
    ask for is computed and scored once. ``targets`` (N,) is the class explained; ``kwargs``
    go to :func:`cam.road.road_by_method` (``batch_size``, ``seed``, ``workers``, ...)."""
    positions = positions or {}
    targets = np.asarray(targets)
    groups: dict[tuple, list] = {}
    for name in maps:
        pick = positions[name] if name in positions else sample
        groups.setdefault(tuple(np.asarray(pick, dtype=np.int64).tolist()), []).append(name)
    results = {}
    for pick, names in groups.items():
        pick = np.array(pick, dtype=np.int64)
        results |= road.road_by_method(
            predict, images[pick], {n: maps[n] if n in positions else maps[n][pick] for n in names},
            targets[pick], fractions, **kwargs)
    return {name: results[name] for name in maps}


def with_road(per_image: Mapping, results: Mapping) -> dict:
    """``per_image`` (``{method: {metric: values}}``) with each method's three ROAD numbers
    from ``results`` (:func:`road_scores`) added as ``"ROAD <label>"`` (:data:`ROAD_SCORES`)."""
    unknown = [name for name in results if name not in per_image]
    if unknown:
        raise ValueError(f"ROAD results for {unknown}, which have no per-image metrics")
    return {name: {**values, **({f"ROAD {label}": results[name][key]
                                 for key, label in ROAD_SCORES.items()} if name in results else {})}
            for name, values in per_image.items()}


def sanity_summary(sanity: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`cam.sanity.randomisation_check` (as a DataFrame), one row per stage
    (``stage``, ``reinitialised``, ``layers``) and, per method, the ``mean``, ``std`` and
    ``count`` of the Spearman correlations over the images (NaNs, constant maps, not counted)."""
    return (sanity.groupby(["stage", "reinitialised", "layers", "method"], sort=True)["spearman"]
            .agg(["mean", "std", "count"]).unstack("method"))


class Stopwatch:
    """Wall and CPU seconds (``time.perf_counter``, ``time.process_time``) of named parts of
    a notebook, from the stopwatch's start: ``with watch("ROAD"): ...`` times one part,
    ``watch.seconds[part]`` is its (wall, CPU), :meth:`table` all of them and the rest."""

    def __init__(self, clock=None):
        self.clock = clock or (lambda: (time.perf_counter(), time.process_time()))
        self.started = self.clock()
        self.seconds: dict[str, tuple[float, float]] = {}

    @contextmanager
    def __call__(self, part: str):
        wall, cpu = self.clock()
        yield self
        now_wall, now_cpu = self.clock()
        self.seconds[part] = (now_wall - wall, now_cpu - cpu)

    def table(self, rest: str = "everything else") -> pd.DataFrame:
        """One row per part (``wall s``, ``CPU s``), then ``rest``: the time since the start
        that no part accounts for."""
        total = pd.DataFrame.from_dict(self.seconds, orient="index", columns=["wall s", "CPU s"])
        now = self.clock()
        total.loc[rest] = (now[0] - self.started[0] - total["wall s"].sum(),
                           now[1] - self.started[1] - total["CPU s"].sum())
        return total


def _spread(positions: np.ndarray, gap: float) -> np.ndarray:
    """Positions moved apart to at least ``gap`` from each other, staying close to where they
    were (labels next to points that would overlap). Keeps the input order."""
    order = np.argsort(positions, kind="stable")
    placed = positions[order].astype(float)
    for _ in range(100):
        moved = False
        for i in range(1, len(placed)):
            overlap = gap - (placed[i] - placed[i - 1])
            if overlap > 1e-12:
                placed[i - 1] -= overlap / 2
                placed[i] += overlap / 2
                moved = True
        if not moved:
            break
    out = np.empty_like(placed)
    out[order] = placed
    return out


def cost_figure(table: pd.DataFrame, reference: tuple | str | None = None,
                score: str = "LeRF - MoRF", title: str = "", highlight: str | None = None,
                label_gap: float = 0.045):
    """Faithfulness against cost: ``table[score]`` with its 95% interval (``"<score> CI low"``,
    ``"<score> CI high"``) against ``table["ms/image"]`` on a log axis, one labelled point per
    method (rows with no cost are skipped; a label says ``n=`` where the ``images`` column is
    below its maximum). ``reference`` (mean, low, high), or the name of a row of ``table`` to
    take them from (e.g. ``"random"``: random maps), is drawn as a horizontal line with its
    interval shaded; ``highlight`` names a method drawn in red. Returns the figure."""
    if isinstance(reference, str):
        row = table.loc[reference]
        reference = (row[score], row[f"{score} CI low"], row[f"{score} CI high"])
    shown = table.dropna(subset=["ms/image"])
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    if reference is not None:
        mean, low, high = reference
        ax.axhspan(low, high, color="grey", alpha=0.15, lw=0)
        ax.axhline(mean, color="grey", ls="--", lw=1)
        ax.annotate("random maps", (0.005, mean), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", color="dimgrey", fontsize=8)
    x, y = shown["ms/image"].to_numpy(float), shown[score].to_numpy(float)
    low, high = shown[f"{score} CI low"].to_numpy(float), shown[f"{score} CI high"].to_numpy(float)
    colours = ["tab:red" if name == highlight else "tab:blue" for name in shown.index]
    for xi, yi, lo, hi, colour in zip(x, y, low, high, colours):
        ax.errorbar(xi, yi, yerr=[[yi - lo], [hi - yi]], fmt="o", ms=6, capsize=3, color=colour,
                    elinewidth=1, alpha=0.9)
    ax.set_xscale("log")
    ax.set_xlim(x.min() / 2, x.max() * 8)  # room for the labels right of the costliest point
    ax.set(xlabel="cost: milliseconds per image (one image per call, median; log scale)",
           ylabel=f"ROAD {score} (higher is more faithful)")
    ax.set_title(title, fontsize=10)
    names = list(shown.index)
    if "images" in shown:
        most = shown["images"].max()
        names = [f"{name} (n={n})" if n < most else name for name, n in zip(names, shown["images"])]
    # Labels right of their points; points within a fifth of the width share a column of labels,
    # pushed apart vertically (in axes units) where they would overlap.
    fig.canvas.draw()
    to_axes = ax.transData + ax.transAxes.inverted()
    points = to_axes.transform(np.column_stack([x, y]))
    labels = points[:, 1].copy()
    order = np.argsort(points[:, 0])
    groups = np.split(order, np.flatnonzero(np.diff(points[order, 0]) > 0.2) + 1)
    for group in groups:
        labels[group] = _spread(points[group, 1], label_gap)
    for (px, py), ly, name, colour in zip(points, labels, names, colours):
        ax.annotate(name, (px, py), xycoords="axes fraction", xytext=(px + 0.025, ly),
                    textcoords="axes fraction", va="center", fontsize=9,
                    color="tab:red" if colour == "tab:red" else "black",
                    fontweight="bold" if colour == "tab:red" else "normal",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.5, shrinkA=0, shrinkB=3)
                    if abs(ly - py) > 0.01 else None)
    ax.grid(True, which="both", axis="x", alpha=0.2)
    fig.tight_layout()
    return fig


def perturbation_figure(curves: Mapping, title: str = ""):
    """The mean deletion (black substrate) and insertion (blurred substrate) curve of each
    method of ``curves`` (:func:`score_maps`), side by side, each labelled with its mean AUC;
    random maps dashed. Returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, metrics.PERTURBATION_MODES):
        for name, c in curves.items():
            ax.plot(np.linspace(0, 1, c[mode].shape[1]), c[mode].mean(axis=0), marker=".",
                    ls="--" if name == "random" else "-",
                    label=f"{name} (AUC {metrics.auc(c[mode]).mean():.3f})")
        ax.set(title=f"{mode} ({'black' if mode == 'deletion' else 'blurred'} substrate)",
               xlabel=f"fraction of pixels {'deleted' if mode == 'deletion' else 'inserted'}",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("probability of the predicted class (mean)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def road_figure(results: Mapping, title: str = ""):
    """The mean ROAD curves of each method of ``results`` (:func:`road_scores`), MoRF and
    LeRF side by side, each labelled with its mean AUC; random maps dashed and black, the
    others in alternate colours of ``tab20``. Returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    palette = itertools.cycle(plt.cm.tab20(np.linspace(0, 1, 20))[::2])
    colours = {name: "black" if name == "random" else next(palette) for name in results}
    last = max(float(r["fractions"][-1]) for r in results.values())
    for ax, order, label in zip(axes, road.ROAD_ORDERS, ["MoRF", "LeRF"]):
        for name, r in results.items():
            ax.plot(np.concatenate([[0.0], r["fractions"]]), r[order].mean(axis=0), marker=".",
                    ls="--" if name == "random" else "-", color=colours[name],
                    label=f"{name} ({r[f'{order}_auc'].mean():.3f})")
        ax.set(title=f"ROAD {label}: {'most' if order == 'morf' else 'least'} relevant pixels "
                     f"removed first ({'lower' if order == 'morf' else 'higher'} is better)",
               xlabel="fraction of pixels removed and imputed", xlim=(0, last), ylim=(0, 1))
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7)
    axes[0].set_ylabel("probability of the predicted class (mean)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sanity_figure(sanity: pd.DataFrame, title: str = "", seed: int = 0):
    """The rows of :func:`cam.sanity.randomisation_check` (as a DataFrame) as the mean
    Spearman correlation with the original map per stage (in the order of the stages) and
    method, with seaborn's 95% bootstrap interval (``seed``). Returns the figure."""
    order = sanity.sort_values("stage", kind="stable").drop_duplicates("stage")["reinitialised"]
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.pointplot(data=sanity, x="reinitialised", y="spearman", hue="method",
                  order=order.tolist(), errorbar=("ci", 95), dodge=0.3, ax=ax, seed=seed)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="re-initialised cumulatively, from the output down",
           ylabel="Spearman vs original map", ylim=(-1.05, 1.05), title=title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
