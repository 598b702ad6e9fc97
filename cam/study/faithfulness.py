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
* the tables of notebook 05 are in :mod:`cam.study.faithfulness_tables` and its figures in
  :mod:`cam.study.faithfulness_figures`, both importable from here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import (AblationCAM, AblationExplainer, FastAblationCAM, GradCAM, GradCAMPlusPlus,
               GradientExplainer, HiResCAM, LayerCAM, Occlusion, ReciproCAM, ScoreCAM,
               XGradCAM, metrics, road)
from ..maps import normalize_maps, upsample_maps
from . import segment
# notebook 05 reads its tables and figures through this module
from .faithfulness_figures import (cost_figure, perturbation_figure, road_figure,  # noqa: F401
                                   sanity_figure)
from .faithfulness_tables import (BETTER, ROAD_SCORES, cost_table, mean_ci_rows,  # noqa: F401
                                  metric_table, road_summary, road_table, sanity_summary,
                                  summary_table)

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
