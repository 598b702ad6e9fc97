"""Many saliency methods on the same images without paying twice, and what each one costs:
the helpers behind notebooks/03-saliency and notebooks/05-faithfulness.

* :func:`explain_together`: raw maps of several explainers at one layer, the trunk run once
  per batch for all of them, and what each method costs per image on its own;
* :func:`to_grid`: input-resolution maps (Occlusion's) averaged onto a layer's grid;
* :func:`explain_timed`: maps one image per call with the wall time of each call, for a
  method that does not start from the layer (Occlusion);
* :class:`CachedPredict`: a predict function that runs the model once per distinct image;
* :func:`image_metrics`: the per-image metrics that take one forward pass per image;
* the tables of notebook 05: :func:`cost_table` (what each method costs),
  :func:`mean_ci_rows` and :func:`metric_table` (per-image values to means with bootstrap
  intervals), :func:`summary_table` (one "mean [low, high]" cell per metric and method),
  :func:`road_table` and :func:`road_summary` (ROAD per method), :func:`sanity_summary`
  (the randomisation check per stage);
* :func:`cost_figure`: ROAD's LeRF - MoRF against milliseconds per image, one labelled point
  per method.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import metrics, road
from ..explainers import AblationExplainer, GradientExplainer
from ..methods import ScoreCAM

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


def sanity_summary(sanity: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`cam.sanity.randomisation_check` (as a DataFrame), one row per stage
    (``stage``, ``reinitialised``, ``layers``) and, per method, the ``mean``, ``std`` and
    ``count`` of the Spearman correlations over the images (NaNs, constant maps, not counted)."""
    return (sanity.groupby(["stage", "reinitialised", "layers", "method"], sort=True)["spearman"]
            .agg(["mean", "std", "count"]).unstack("method"))


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


def cost_figure(table: pd.DataFrame, reference: tuple | None = None,
                score: str = "LeRF - MoRF", title: str = "", highlight: str | None = None,
                label_gap: float = 0.045):
    """Faithfulness against cost: ``table[score]`` with its 95% interval (``"<score> CI low"``,
    ``"<score> CI high"``) against ``table["ms/image"]`` on a log axis, one labelled point per
    method (rows with no cost are skipped; a label says ``n=`` where the ``images`` column is
    below its maximum). ``reference`` (mean, low, high), e.g. random maps, is drawn as a
    horizontal line with its interval shaded; ``highlight`` names a method drawn in red.
    Returns the figure."""
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
