"""Where the time goes: every method, execution mode and layer timed side by side in one process.

The yardstick is one plain forward pass. Each ablation method (Ablation-CAM, FastAblationCAM,
ReciproCAM) runs in three execution modes:

``head`` (ours)
    the trunk runs once per image, then the ablated rows go through the part of the network
    after the target layer only (``notes`` names the library's path: ``pooled`` where the
    head begins with a global average pooling, else ``head``);
``full``
    every ablation batch reruns the whole network on copies of the image, the way
    pytorch-grad-cam batches Ablation-CAM;
``per-mask``
    one whole-network pass per mask and per image (batch size 1), the way the reference
    FastAblationCAM repository loops over locations.

The gradient methods run head-only (Grad-CAM also full). Score-CAM and Occlusion perturb the
input, so every evaluation is a whole-network pass (mode ``full``). The peer library
tf-keras-vis (optional, :mod:`cam.study.speed_peer`) adds its Gradcam and Scorecam; the
FastAblationCAM reference's own head gets rows of its own (:mod:`cam.study.seed_head`).

Rows with many evaluations per image follow one protocol (:mod:`cam.study.speed_table`): a
sample timed on one image, then a complete run when it fits in ``budget_s``, else an
extrapolation that ``measured`` states. All rows use the same images, the same clock and the
median of ``repeats`` calls (:mod:`cam.study.timing`). The study asks the library through its
public API only: :meth:`cam.Explainer.features` for a trunk pass, and
:meth:`cam.PerturbationExplainer.perturbed_scores` to score a sample of masks.

Explainers at one layer share the library's compiled functions, so tracing DenseNet-169 (seconds
per function) is paid once per layer; :meth:`SpeedStudy.release` frees a layer's.

Used by ``notebooks/04-speed.ipynb`` and ``benchmarks/speed.py``.
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from .. import GradientExplainer, candidate_layers, method_class, release
from .speed_table import COLUMNS, SpeedTable, call_rows, grid_text, sample_size  # noqa: F401 (COLUMNS)
from .timing import PeakMemory, clock, machine, median_ms  # noqa: F401 (machine)

#: The study's layers on DenseNet-169: the final feature map, and internal conv4 and conv3 ones.
DENSENET_LAYERS = ("relu", "conv4_block32_concat", "conv3_block12_concat")
#: Ablation execution modes, in table order.
MODES = ("head", "full", "per-mask")
#: Gradient methods timed (head-only) at the first layer besides Grad-CAM.
GRADIENT_METHODS = ("Grad-CAM++", "XGrad-CAM", "LayerCAM", "HiResCAM")
#: Occlusion (window, stride) in pixels: notebooks 03 and 05's 7x7 grid of 32-pixel patches.
OCCLUSION = (32, 32)
#: Faster Score-CAM's channels: one batch of 64, the same passes as the sample of the
#: every-channel row (notebooks 03 and 05 explain with 32, half the cost per image).
SCORECAM_CHANNELS = 64
#: Ablation methods and their table names.
ABLATION_METHODS = ("Ablation-CAM", "FastAblationCAM", "ReciproCAM")
NOTES = {"head": "trunk once per image; ablated rows through the head only",
         "full": "every ablated batch reruns the whole network",
         "per-mask": "one whole-network pass per mask, one image at a time"}


def study_layers(model: keras.Model, count: int = 3) -> list[str]:
    """The study's layers: DenseNet-169's three when present, else ``count`` candidate layers
    of distinct grid sizes from the last one backwards (for other models, e.g. the small CNN)."""
    names = [name for name, _ in candidate_layers(model)]
    if all(name in names for name in DENSENET_LAYERS):
        return list(DENSENET_LAYERS)
    chosen, grids = [], set()
    for name, shape in reversed(candidate_layers(model)):
        if len(shape) == 4 and shape[1:3] not in grids:
            chosen.append(name)
            grids.add(shape[1:3])
        if len(chosen) == count:
            break
    return chosen


def ablation_options(method: str, window: int = 1, gaussian: bool = False) -> tuple[dict, str]:
    """(constructor options, table name) of an ablation method."""
    if method not in ABLATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(ABLATION_METHODS)}, got {method!r}")
    if method == "FastAblationCAM":
        return {"window": window}, f"{method} w{window}"
    if method == "ReciproCAM":
        return {"gaussian": gaussian}, method + " gaussian" * bool(gaussian)
    return {}, method


def ablation_key(explainer, masks: np.ndarray, rows: int) -> tuple:
    """What an ablation sample's cost depends on: the layer, score and path, and the rows a
    call scores. On the whole-network paths each row is one pass whichever cells or channels
    it hides; after the layer, where the head can be as small as a pooling and a dense layer,
    the masks' shape and dtype count too (one compiled call)."""
    base = (explainer.split.layer, explainer.score, explainer.path, rows)
    if explainer.whole_network:
        return base
    return base + (masks.shape[1:], "bool" if masks.dtype == bool else "float32")


class SpeedStudy(SpeedTable):
    """Times methods on ``model`` for one batch of ``images`` (already preprocessed).

    Parameters
    ----------
    repeats : timed calls per row (median reported).
    batch_size : rows per compiled call in the ``full`` mode, Score-CAM and Occlusion; the
        ``head`` mode uses the library's default (from its memory budget) except in
        :meth:`batch_sweep`.
    budget_s : a row whose complete run (``repeats`` calls on all images) is estimated to take
        longer is extrapolated from a sample of ``sample_masks`` evaluations (16 at most in the
        per-mask mode) on one image instead.
    score : what every explainer explains, "logit" or "probability".
    """

    def __init__(self, model: keras.Model, images, repeats: int = 3, batch_size: int = 64,
                 budget_s: float = 5.0, sample_masks: int = 32, progress: bool = True,
                 score: str = "logit"):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty (B, H, W, C) batch, got shape "
                             f"{images.shape}")
        for name, value in (("repeats", repeats), ("batch_size", batch_size),
                            ("sample_masks", sample_masks)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        super().__init__(len(images), repeats, budget_s, progress)
        self.model, self.images, self.score = model, images, score
        self.batch_size, self.sample_masks = batch_size, sample_masks
        self.targets = None  # the model's class per image, from the forward pass
        self.forward_fn = None
        self.first: dict = {}  # (layer, mode) -> Features of image 0
        self.warm: set = set()  # (layer, mode) whose gradient ran on the images

    # -- explainers --------------------------------------------------------------------

    def build(self, method: str, layer, **options):
        """``method`` (a name :func:`cam.method_key` accepts) at ``layer``: explainers at one
        layer share the library's compiled trunk, head, gradient and scoring functions."""
        return method_class(method)(self.model, layer, score=self.score, **options)

    def release(self, layer: str) -> None:
        """Drop what is kept for ``layer`` (the library's compiled functions there, the
        first-image features and samples): every trace of DenseNet-169 holds tens of MB."""
        release(self.model, layer)
        for store in (self.samples, self.first):
            for key in [k for k in store if k[0] == layer]:
                del store[key]
        self.warm = {k for k in self.warm if k[0] != layer}
        gc.collect()

    def first_features(self, explainer):
        """The features of image 0 at the explainer's layer (what a sample scores), after the
        trunk and the scores ran once on all images (the shapes of a complete run, which are
        compiled and warm afterwards)."""
        key = (explainer.split.layer, explainer.mode)
        if key not in self.first:
            explainer.features(self.images)
            self.first[key] = explainer.features(self.images[:1])
        return self.first[key]

    def ready(self) -> None:
        if self.forward_ms is None:
            self.forward()

    def base_row(self, explainer, method: str, mode: str, batch_size) -> dict:
        return {"layer": explainer.layer, "grid": grid_text(explainer.split.target_shape),
                "method": method, "mode": mode, "batch size": batch_size}

    # -- rows ----------------------------------------------------------------------------

    def forward(self) -> dict:
        """The floor: the faster of ``model.predict`` and a compiled ``model(x)`` on the batch."""
        started = clock()
        batch = tf.constant(self.images)
        if self.forward_fn is None:  # compiled once: the second timing needs no new trace
            self.forward_fn = tf.function(lambda x: self.model(x, training=False))
        call, n = self.forward_fn, len(self.images)
        timings = {}
        with PeakMemory() as memory:
            timings["tf.function(model)"] = median_ms(lambda: call(batch).numpy(), self.repeats) / n
            timings["model.predict"] = median_ms(
                lambda: self.model.predict(self.images, batch_size=n, verbose=0), self.repeats) / n
        self.targets = np.asarray(call(batch)).argmax(axis=1)
        best = min(timings, key=timings.get)
        self.forward_ms = timings[best]
        return self.add({"layer": "", "grid": "", "method": "forward pass", "mode": "",
                         "batch size": n, "evaluations/image": 1, "ms/image": self.forward_ms,
                         "x forward": 1.0, "measured": "all",
                         "notes": f"{best}; " + ", ".join(f"{k} {v:.1f} ms"
                                                         for k, v in timings.items())},
                        memory, started)

    def gradient(self, method: str, layer: str, mode: str = "head") -> dict:
        """A gradient method (Grad-CAM, Grad-CAM++, ...): every image, ``repeats`` calls.

        Gradient methods at one layer and mode share the compiled trunk, head and gradient;
        only the channel weights differ, so after the first of them no warm-up call is needed."""
        self.ready()
        started = clock()
        explainer = self.build(method, layer, mode=mode)
        if not isinstance(explainer, GradientExplainer):
            raise ValueError(f"{method!r} is not a gradient method")
        row = self.base_row(explainer, explainer.name, mode, len(self.images))
        key = (explainer.split.layer, mode)
        with PeakMemory() as memory:
            ms = median_ms(lambda: explainer(self.images), self.repeats,
                           warm_up=key not in self.warm) / len(self.images)
        self.warm.add(key)
        notes = ("trunk forward, head forward + backward" if mode == "head"
                 else "whole-network forward + backward")
        return self.add({**row, "evaluations/image": 1, "ms/image": ms,
                         "measured": "all", "notes": notes}, memory, started)

    def gradcam(self, layer: str, mode: str = "head") -> dict:
        return self.gradient("Grad-CAM", layer, mode)

    def ablation_explainer(self, method: str, layer: str, mode: str, window: int = 1,
                           batch_size: int | None = None, gaussian: bool = False) -> tuple:
        """(explainer, table name) of an ablation row: ``mode`` "head" at the library's
        default batch unless one is given (the batch sweep), "full" at the study's
        ``batch_size``, "per-mask" a whole-network explainer at batch size 1."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        options, label = ablation_options(method, window, gaussian)
        size = 1 if mode == "per-mask" else batch_size or (None if mode == "head"
                                                           else self.batch_size)
        explainer = self.build(method, layer, batch_size=size,
                               mode="head" if mode == "head" else "full", **options)
        return explainer, label

    def ablation(self, method: str, layer: str, mode: str, window: int = 1,
                 batch_size: int | None = None, gaussian: bool = False) -> dict:
        """One ablation row; ``method`` is one of :data:`ABLATION_METHODS` (``window`` is
        FastAblationCAM's, ``gaussian`` ReciproCAM's)."""
        self.ready()
        started = clock()
        explainer, label = self.ablation_explainer(method, layer, mode, window, batch_size,
                                                   gaussian)
        per_call = explainer.batch_size
        masks = explainer.masks(explainer.split.target_shape)
        count = sample_size(len(masks), per_call, self.sample_masks, mode == "per-mask")
        first, targets = self.first_features(explainer), self.targets[:1]
        notes = f"{NOTES[mode]} (path {explainer.path})"
        if method == "ReciproCAM":
            notes += "; keeps one cell per evaluation"
        return self.sampled(
            self.base_row(explainer, label, mode, per_call), started,
            evaluations=len(masks), per_call=per_call, unit="mask",
            sample=lambda: explainer.perturbed_scores(first, targets, masks[:count]),
            sample_count=count, run_all=lambda: explainer(self.images),
            traces=lambda: explainer.scorer.traces,
            key=ablation_key(explainer, masks, call_rows(count, per_call)), notes=notes)

    def scorecam(self, layer: str, channels: int | None = None) -> dict:
        """Score-CAM (ours): one whole-network pass per channel, or per each of the top
        ``channels`` by spatial variance (Faster Score-CAM)."""
        self.ready()
        started = clock()
        explainer = self.build("Score-CAM", layer, batch_size=self.batch_size, channels=channels)
        label = "Score-CAM" if channels is None else f"Score-CAM top-{channels}"
        evaluations, per_call = explainer.channels_used, explainer.batch_size
        count = sample_size(evaluations, per_call, self.sample_masks)
        # the sample: Score-CAM itself on image 0 with its top `count` channels (the same
        # compiled scoring, masks made from the activation as in a complete run)
        sampler = self.build("Score-CAM", layer, batch_size=per_call, channels=count)
        first, targets = self.first_features(explainer), self.targets[:1]
        notes = (f"trunk once per image; one whole-network pass per channel (the image times "
                 f"the channel's upsampled map), in calls of {per_call}")
        if channels is not None:
            notes = (f"channels={channels}: per image the {channels} channels of largest "
                     f"spatial variance (Faster Score-CAM); " + notes)
        return self.sampled(
            self.base_row(explainer, label, "full", per_call), started,
            evaluations=evaluations, per_call=per_call, unit="channel",
            sample=lambda: sampler.perturbed_scores(first, targets), sample_count=count,
            run_all=lambda: explainer(self.images), traces=lambda: explainer.scorer.traces,
            key=(explainer.split.layer, "Score-CAM", call_rows(count, per_call)), notes=notes)

    def occlusion(self, window: int | None = None, stride: int | None = None,
                  layer=None) -> dict:
        """Occlusion of the input: one whole-network pass per patch position (``window`` and
        ``stride`` in pixels; None: the library's default), the trunk pass cut at ``layer``."""
        self.ready()
        started = clock()
        explainer = self.build("Occlusion", layer, window=window, stride=stride,
                               batch_size=self.batch_size)
        window, stride = explainer.geometry(self.images.shape[1:3])
        masks = explainer.masks(self.images.shape[1:])
        per_call = explainer.batch_size
        count = sample_size(len(masks), per_call, self.sample_masks)
        first, targets = self.first_features(explainer), self.targets[:1]
        row = {"layer": explainer.layer, "grid": grid_text(self.images.shape[1:]),
               "method": f"Occlusion {window} px, stride {stride}", "mode": "full",
               "batch size": per_call}
        return self.sampled(
            row, started, evaluations=len(masks), per_call=per_call, unit="position",
            sample=lambda: explainer.perturbed_scores(first, targets, masks[:count]),
            sample_count=count, run_all=lambda: explainer(self.images),
            traces=lambda: explainer.scorer.traces,
            key=(explainer.split.layer, "Occlusion", explainer.baseline,
                 call_rows(count, per_call)),
            notes=(f"{window}x{window}-pixel patches of the input every {stride} px set to "
                   f"{explainer.baseline}; one whole-network pass per position, in calls of "
                   f"{per_call}"))

    def peer(self, layer: str) -> list[dict]:
        """tf-keras-vis Gradcam and Scorecam at ``layer`` (:mod:`cam.study.speed_peer`)."""
        from .speed_peer import peer_rows

        self.ready()
        return peer_rows(self, layer)

    # -- the whole study -----------------------------------------------------------------

    def run(self, layers, windows=(1, 2, 3), peer: bool = True, others: bool = True,
            occlusion=OCCLUSION, scorecam_channels: int | None = SCORECAM_CHANNELS
            ) -> pd.DataFrame:
        """Forward pass, then per layer :func:`layer_rows` and the peer rows; at the first
        layer also :func:`other_methods` (``others``); then the forward pass again (see
        :meth:`settle_forward`)."""
        self.forward()
        for i, layer in enumerate(layers):
            layer_rows(self, layer, windows)
            if others and i == 0:
                other_methods(self, layer, occlusion, scorecam_channels)
            if i > 0:  # the first layer's functions serve batch_sweep, which releases them
                self.release(layer)
            if peer:
                self.peer(layer)
        self.settle_forward()
        return self.table()

    def settle_forward(self) -> None:
        """Time the forward pass again and keep the faster of the two as the yardstick.

        The first timing runs on a cold process (allocator, thread pools, caches) and can read
        tens of percent slow; every ratio is recomputed against the settled value."""
        first = self.rows[0]
        again = self.forward()
        self.rows.pop()
        self.wall[-1]["method"] = "forward pass (again)"
        if again["ms/image"] < first["ms/image"]:
            first.update({k: again[k] for k in ("ms/image", "notes", "peak MB", "peak +MB",
                                                "GPU peak MB")})
        first["notes"] += "; faster of two timings (start and end of the study)"
        self.rescale(first["ms/image"])


def layer_rows(study: SpeedStudy, layer: str, windows=(1, 2, 3)) -> None:
    """Grad-CAM (head, full), then Ablation-CAM and FastAblationCAM at each window that fits
    the layer's grid, in the three modes."""
    for mode in ("head", "full"):
        study.gradient("Grad-CAM", layer, mode)
    for mode in MODES:
        study.ablation("Ablation-CAM", layer, mode)
    grid = min(study.build("Grad-CAM", layer).split.target_shape[:2])
    for window in windows:
        if window > grid:
            study.log(f"window {window} skipped at {layer}: its grid is {grid} wide")
            continue
        for mode in MODES:
            study.ablation("FastAblationCAM", layer, mode, window=window)


def other_methods(study: SpeedStudy, layer: str, occlusion=OCCLUSION,
                  scorecam_channels: int | None = SCORECAM_CHANNELS) -> None:
    """The methods beyond Grad-CAM, Ablation-CAM and FastAblationCAM at ``layer``: Grad-CAM++,
    XGrad-CAM, LayerCAM and HiResCAM head-only; ReciproCAM in the three modes and with its
    Gaussian head-only; Score-CAM with every channel and with the top ``scorecam_channels``;
    Occlusion with ``occlusion`` = (window, stride) in pixels."""
    for method in GRADIENT_METHODS:
        study.gradient(method, layer)
    for mode in MODES:
        study.ablation("ReciproCAM", layer, mode)
    study.ablation("ReciproCAM", layer, "head", gaussian=True)
    study.scorecam(layer)
    if scorecam_channels:
        study.scorecam(layer, scorecam_channels)
    study.occlusion(*occlusion, layer=layer)


def batch_sweep(study: SpeedStudy, layer: str, batch_sizes=(1, 4, 16, 64, 256)) -> pd.DataFrame:
    """Head-only Ablation-CAM and FastAblationCAM (window 1) at each batch size. A row the
    study's table already has (same layer, method, mode and batch size) is taken from it, not
    timed again. Releases ``layer``'s compiled functions afterwards."""
    study.ready()
    done = {(r.get("layer"), r["method"], r.get("mode"), r.get("batch size")): r
            for r in study.rows}
    sweep = []
    for size in batch_sizes:
        for method, label in (("Ablation-CAM", "Ablation-CAM"),
                              ("FastAblationCAM", "FastAblationCAM w1")):
            row = done.get((layer, label, "head", size))
            if row is not None:
                sweep.append({**row, "notes": row["notes"] + " (the main table's row)"})
                continue
            study.ablation(method, layer, "head", batch_size=size)
            sweep.append(study.rows.pop())
    study.release(layer)
    return pd.DataFrame(sweep).reindex(columns=COLUMNS)


def speed_ups(table: pd.DataFrame) -> pd.DataFrame:
    """For each layer and method with a head-only row and a full or per-mask one: how many
    times faster head-only is than the full and per-mask modes, and than tf-keras-vis
    Scorecam for Ablation-CAM."""
    out = []
    for (layer, method), rows in table[table["mode"].isin(MODES)].groupby(
            ["layer", "method"], sort=False):
        ms = rows.set_index("mode")["ms/image"]
        if "head" not in ms or not ({"full", "per-mask"} & set(ms.index)):
            continue
        record = {"layer": layer, "method": method,
                  "full / head": ms.get("full", np.nan) / ms["head"],
                  "per-mask / head": ms.get("per-mask", np.nan) / ms["head"]}
        if method == "Ablation-CAM":
            peer = table[(table["layer"] == layer) & (table["method"] == "tf-keras-vis Scorecam")]
            if len(peer):
                record["Scorecam / head"] = peer["ms/image"].iloc[0] / ms["head"]
        out.append(record)
    return pd.DataFrame(out)
