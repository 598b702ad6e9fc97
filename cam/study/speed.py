"""Where the time goes: every method, execution mode and layer timed side by side in one process.

The yardstick is one plain forward pass. Each ablation method (Ablation-CAM, FastAblationCAM,
ReciproCAM) runs in three execution modes:

``head`` (ours)
    the trunk runs once per image, then batches of ablated activations go through the part
    of the network after the target layer only;
``full``
    every ablation batch reruns the whole network on copies of the image, the way
    pytorch-grad-cam batches Ablation-CAM;
``per-mask``
    one whole-network pass per mask and per image (batch size 1), the way the reference
    FastAblationCAM repository loops over locations.

The gradient methods run head-only (Grad-CAM also full). Score-CAM and Occlusion perturb the
input, so every evaluation is a whole-network pass (mode ``full``). The peer library
tf-keras-vis (optional) adds its Gradcam and Scorecam.

Every row with many evaluations per image follows one protocol (:meth:`SpeedStudy._sampled`):
a sample of evaluations is timed on one image; when a complete run (``repeats`` calls on every
image) is estimated to fit in ``budget_s`` it is timed, else the row is extrapolated from the
sample and ``measured`` says so. All rows use the same images, the same clock
(``time.perf_counter``) and the median of ``repeats`` calls after one untimed warm-up call (a
complete run right after its own sample, whose compiled functions are then warm, needs none;
a call costing more than ``REPEAT_MS / (repeats - 1)`` is timed once).

The study's own cost is mostly tracing: every new ``tf.function`` of DenseNet-169 takes seconds
to trace. Explainers at one layer therefore share the compiled functions that compute the same
thing on the same shapes (the trunk, the head, the gradient, an ablation batch of one shape and
dtype), and a row whose sample would time the same passes on batches of the same size as an
earlier row's (which cells or channels a mask hides does not change the cost) reuses that
sample and says so. ``SpeedStudy.wall`` records the study's own seconds per row.

Used by ``notebooks/04-speed.ipynb`` and ``benchmarks/speed.py``.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from .. import GradientExplainer, release
from ..methods import method_class
from ..graph import candidate_layers

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
COLUMNS = ["layer", "grid", "method", "mode", "batch size", "evaluations/image", "ms/image",
           "x forward", "peak MB", "peak +MB", "GPU peak MB", "measured", "notes"]
#: Masks timed for a per-mask row (one whole-network pass each, at batch size 1: a stable cost).
PER_MASK_SAMPLE = 16
#: A timed call is repeated (median of ``repeats``) only when the extra calls take under this
#: many ms in all: a call of a few seconds already averages many passes.
REPEAT_MS = 4_000
NOTES = {"head": "trunk once per image; ablated batches through the head only",
         "full": "every ablated batch reruns the whole network",
         "per-mask": "one whole-network pass per mask, one image at a time"}


# -- machine and memory --------------------------------------------------------------------

def machine() -> dict:
    """CPU model, cores, GPUs visible to TensorFlow, library versions: where a table was made."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical CPUs": os.cpu_count(),
            "GPUs": len(tf.config.list_physical_devices("GPU")),
            "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__}


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; elsewhere the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


class PeakMemory:
    """Context manager sampling the process's RSS every ``interval`` s; ``.peak_mb`` after.

    The process-wide high-water mark (``ru_maxrss``) only grows, so it cannot tell rows apart;
    a sampler thread gives each timed block its own peak. TensorFlow's C++ allocations count
    (tracemalloc would see Python objects only).
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb = interval, 0.0
        self.gpu_peak_mb = None  # with a GPU: TensorFlow's peak device memory during the block
        self._stop = threading.Event()
        self._gpu = "GPU:0" if tf.config.list_physical_devices("GPU") else None

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak_mb = self.start_mb = _rss_mb()
        if self._gpu:
            tf.config.experimental.reset_memory_stats(self._gpu)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
        if self._gpu:
            self.gpu_peak_mb = tf.config.experimental.get_memory_info(self._gpu)["peak"] / 2**20


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds now: ``time.perf_counter`` and ``time.process_time``."""
    return time.perf_counter(), time.process_time()


def timings_ms(fn, repeats: int, warm_up=True, cap_ms: float | None = REPEAT_MS
               ) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in ms, after one untimed warm-up call; one
    call only when the other ``repeats - 1`` would take ``cap_ms`` or more (None: no cap).

    ``warm_up`` is True (call ``fn``), a cheaper callable that runs the same compiled functions
    on the same shapes (tracing and first-call costs are paid there), or False when those
    functions have already run on these shapes in an earlier row.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warm_up:
        (fn if warm_up is True else warm_up)()
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
        if cap_ms is not None and times[0] * (repeats - 1) >= cap_ms:
            break
    return times


def median_ms(fn, repeats: int, warm_up=True) -> float:
    """Median wall time of ``fn()`` in ms over the calls of :func:`timings_ms`."""
    return statistics.median(timings_ms(fn, repeats, warm_up))


# -- the study -----------------------------------------------------------------------------

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


def _slots(evaluations: int, batch_size: int) -> tuple[int, int]:
    """(masks per batch, masks pushed per image): explainers cut the evaluations into equal
    batches, the last padded, and use one batch of exactly ``evaluations`` when they fit."""
    per_batch = min(batch_size, evaluations)
    return per_batch, math.ceil(evaluations / per_batch) * per_batch


@dataclass
class SpeedStudy:
    """Times methods on ``model`` for one batch of ``images`` (already preprocessed).

    Parameters
    ----------
    repeats : timed calls per row (median reported), after one warm-up call.
    batch_size : evaluations per compiled batch in the ``full`` mode; the ``head`` mode uses
        the library's default (``batch_size=None``: up to 2048 where TensorFlow compiles a
        light head with XLA, else 64) except in :meth:`batch_sweep`.
    budget_s : a row whose complete run (``repeats`` calls on all images) is estimated to take
        longer is extrapolated from a sample of ``sample_masks`` evaluations (16 at most in the
        per-mask mode) on one image instead.
    """

    model: keras.Model
    images: np.ndarray
    repeats: int = 3
    batch_size: int = 64
    budget_s: float = 5.0
    sample_masks: int = 32
    progress: bool = True
    rows: list = field(default_factory=list)

    def __post_init__(self):
        self.images = np.asarray(self.images, dtype=np.float32)
        if self.images.ndim != 4 or len(self.images) == 0:
            raise ValueError(f"images must be a non-empty (B, H, W, C) batch, got shape "
                             f"{self.images.shape}")
        for name in ("repeats", "batch_size", "sample_masks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.forward_ms = None
        self.targets = None  # the model's class per image, from the forward pass
        #: The study's own time: one dict per row (row, wall and CPU seconds), in order.
        self.wall: list[dict] = []
        self._forward_fn = None
        self._first = {}  # (layer, score) -> image 0, its target activation and bypass
        self._samples = {}  # cost key -> (ms per evaluation slot, evaluations timed, row)
        self._warm = set()  # (layer, score, mode) whose gradient functions ran on the images

    def _log(self, message: str) -> None:
        if self.progress:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}")

    def _add(self, row: dict, memory: "PeakMemory | None" = None, started: tuple | None = None
             ) -> dict:
        if memory is not None:
            row["peak MB"], row["GPU peak MB"] = memory.peak_mb, memory.gpu_peak_mb
            # What the row itself added: RSS also holds what earlier rows left allocated.
            row["peak +MB"] = memory.peak_mb - memory.start_mb
        row.setdefault("x forward", row["ms/image"] / self.forward_ms if self.forward_ms else 1.0)
        self.rows.append(row)
        seconds, cpu = (np.subtract(_clock(), started) if started is not None
                        else (float("nan"), float("nan")))
        self.wall.append({"layer": row.get("layer", ""), "method": row["method"],
                          "mode": row.get("mode", ""), "seconds": seconds, "CPU seconds": cpu,
                          "measured": row["measured"]})
        self._log(f"{row['method']:<24} {row.get('mode', ''):<9} {row.get('layer', ''):<22} "
                  f"{row['ms/image']:>10.1f} ms/image  {row['x forward']:>8.2f}x  "
                  f"(row {seconds:.1f} s, {cpu:.1f} CPU s)  {row['measured']}")
        return row

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows).reindex(columns=COLUMNS)

    def wall_times(self) -> pd.DataFrame:
        """The study's own seconds per row (building, tracing, sampling, timing): what a run of
        the study costs, and where. ``CPU seconds`` (every thread of the process) depends less
        than the wall time on what else runs on the machine."""
        return pd.DataFrame(self.wall, columns=["layer", "method", "mode", "seconds",
                                                "CPU seconds", "measured"])

    # -- shared compiled functions -------------------------------------------------------

    def _build(self, method: str, layer, **options):
        """``method`` (a name :func:`cam.method_key` accepts) at ``layer``: explainers at one
        layer share the library's compiled trunk, head, gradient and scoring functions."""
        return method_class(method)(self.model, layer, **options)

    def release(self, layer: str) -> None:
        """Drop what is kept for ``layer`` (the library's compiled functions there, the
        first-image features and samples): every trace of DenseNet-169 holds tens of MB until
        it is dropped."""
        release(self.model, layer)
        for store in (self._samples, self._first):
            for key in [k for k in store if k[0] == layer]:
                del store[key]
        self._warm = {k for k in self._warm if k[0] != layer}
        gc.collect()

    def _first_image(self, explainer):
        """The features (:meth:`cam.Explainer.features`) of image 0 at the explainer's layer,
        after the trunk and head ran once on all images (the shapes every complete run uses,
        so those are compiled and warm afterwards)."""
        key = (explainer.layer, explainer.score, explainer.mode)
        if key not in self._first:
            explainer.features(self.images)
            self._first[key] = explainer.features(self.images[:1])
        return self._first[key]

    def _warm_head(self, explainer) -> bool:
        """Whether a complete run of ``explainer`` finds every compiled function warm once its
        sample ran: head mode (the trunk and head ran on these shapes in :meth:`_first_image`)
        with all images in one trunk call, and one image per scoring call as in the sample
        (an explainer that scores several images' ablations in one call compiles that call
        in its first complete run)."""
        grouped = hasattr(explainer, "images_per_call") and len(self.images) > 1 and \
            explainer.images_per_call(explainer.evaluations_per_image) > 1
        return explainer.mode == "head" and \
            len(self.images) <= explainer.rows_per_call("trunk") and not grouped

    def _ready(self) -> None:
        if self.forward_ms is None:
            self.forward()

    # -- rows ----------------------------------------------------------------------------

    def forward(self) -> dict:
        """The floor: the faster of ``model.predict`` and a compiled ``model(x)`` on the batch."""
        started = _clock()
        batch = tf.constant(self.images)
        if self._forward_fn is None:  # compiled once: the second timing needs no new trace
            self._forward_fn = tf.function(lambda x: self.model(x, training=False))
        call = self._forward_fn
        n = len(self.images)
        timings = {}
        with PeakMemory() as memory:
            timings["tf.function(model)"] = median_ms(lambda: call(batch).numpy(), self.repeats) / n
            timings["model.predict"] = median_ms(
                lambda: self.model.predict(self.images, batch_size=n, verbose=0), self.repeats) / n
        self.targets = np.asarray(call(batch)).argmax(axis=1)
        best = min(timings, key=timings.get)
        self.forward_ms = timings[best]
        return self._add({"layer": "", "grid": "", "method": "forward pass", "mode": "",
                          "batch size": n, "evaluations/image": 1, "ms/image": self.forward_ms,
                          "x forward": 1.0, "measured": "all",
                          "notes": f"{best}; " + ", ".join(f"{k} {v:.1f} ms"
                                                          for k, v in timings.items())},
                         memory, started)

    def _base(self, explainer, method: str, mode: str, batch_size) -> dict:
        shape = explainer.split.target_shape
        return {"layer": explainer.layer, "grid": "x".join(str(d) for d in shape),
                "method": method, "mode": mode, "batch size": batch_size}

    def gradient(self, method: str, layer: str, mode: str = "head") -> dict:
        """A gradient method (Grad-CAM, Grad-CAM++, ...): every image, ``repeats`` calls.

        Gradient methods at one layer and mode share the compiled trunk, head and gradient;
        only the channel weights (numpy) differ, so after the first of them no warm-up call
        is needed."""
        self._ready()
        started = _clock()
        explainer = self._build(method, layer, mode=mode)
        if not isinstance(explainer, GradientExplainer):
            raise ValueError(f"{method!r} is not a gradient method")
        row = self._base(explainer, explainer.name, mode, len(self.images))
        key = (explainer.layer, explainer.score, mode)
        with PeakMemory() as memory:
            ms = median_ms(lambda: explainer(self.images), self.repeats,
                           warm_up=key not in self._warm) / len(self.images)
        self._warm.add(key)
        notes = ("trunk forward, head forward + backward" if mode == "head"
                 else "whole-network forward + backward")
        return self._add({**row, "evaluations/image": 1, "ms/image": ms,
                          "measured": "all", "notes": notes}, memory, started)

    def gradcam(self, layer: str, mode: str = "head") -> dict:
        return self.gradient("Grad-CAM", layer, mode)

    def _sampled(self, row: dict, started: tuple, *, evaluations: int, slots: int, unit: str,
                 sample, sample_count: int, sample_slots: int, warm_up=True, run_all=None,
                 warm: bool = False, key=None, notes: str = "") -> dict:
        """The protocol of every row with many evaluations per image.

        ``sample()`` scores ``sample_count`` evaluations (``sample_slots`` with padding) on one
        image; ``warm_up`` is its untimed first call (see :func:`timings_ms`). If a
        complete run (``repeats`` calls of ``run_all()`` on every image, ``slots``
        evaluations per image with padding) is estimated to fit in ``budget_s``, it is timed
        (with no warm-up call when ``warm``: the sample and the layer's trunk already ran its
        compiled functions on its shapes); else the row is one forward pass plus ``slots``
        times the sample's cost per slot, and ``measured`` says so. A row with the ``key`` of
        an earlier row would time the same passes on batches of the same size, so it reuses
        that sample and says whose it is.
        """
        n = len(self.images)
        with PeakMemory() as memory:
            reused = self._samples.get(key) if key is not None else None
            if reused is None:
                per_slot = median_ms(sample, self.repeats, warm_up) / sample_slots
                if key is not None:
                    self._samples[key] = (per_slot, sample_count, f"{row['method']} {row['mode']}")
            else:
                per_slot = reused[0]
            estimate_s = per_slot * slots * n * self.repeats / 1000
            if run_all is not None and estimate_s <= self.budget_s:
                ms = median_ms(run_all, self.repeats, warm_up=not warm) / n
                measured = "all"
            else:
                ms = self.forward_ms + per_slot * slots
                complete = f"a complete run: ~{estimate_s:.0f} s"
                if reused is None:
                    measured = (f"extrapolated: {sample_count} of {evaluations} {unit}s timed "
                                f"on 1 image ({complete})")
                else:
                    measured = (f"extrapolated: cost per {unit} from the {reused[1]} {unit}s "
                                f"timed on 1 image for {reused[2]}, the same passes on batches "
                                f"of the same size ({complete})")
        return self._add({**row, "evaluations/image": evaluations, "ms/image": ms,
                          "measured": measured, "notes": notes}, memory, started)

    def _ablation_explainer(self, method: str, layer: str, mode: str, window: int = 1,
                            batch_size: int | None = None, gaussian: bool = False) -> tuple:
        """(explainer, table name, masks, cost key) for an ablation row.

        Ablation methods share a compiled scoring function when it sees the same shapes and
        dtype (FastAblationCAM's windows in the per-mask mode, ReciproCAM with and without its
        Gaussian): one trace. Rows with the same cost key reuse one timed sample. In the full
        and per-mask modes that is every row at the layer with batches of the same size: each
        mask costs one whole-network pass, and how a mask is applied (which cells or channels,
        boolean or float) is one elementwise op next to it. In the head mode, where the head
        can be as small as a pooling and a dense layer, it is the same compiled call only."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in ABLATION_METHODS:
            raise ValueError(f"method must be one of {', '.join(ABLATION_METHODS)}, "
                             f"got {method!r}")
        # head mode: the library's default batch unless one is given (the batch sweep)
        size = 1 if mode == "per-mask" else batch_size or (None if mode == "head"
                                                           else self.batch_size)
        run_mode = "head" if mode == "head" else "full"
        options, label = {}, method
        if method == "FastAblationCAM":
            options, label = {"window": window}, f"{method} w{window}"
        elif method == "ReciproCAM":
            options, label = {"gaussian": gaussian}, method + " gaussian" * bool(gaussian)
        explainer = self._build(method, layer, batch_size=size, mode=run_mode, **options)
        masks = explainer.masks(explainer.split.target_shape)
        name = "_score_head" if run_mode == "head" else "_score_full"
        per_batch = _slots(len(masks), explainer.batch_size)[0]
        dtype = "bool" if masks.dtype == bool else "float32"
        base = (explainer.layer, explainer.score, name, explainer.ablation_value, per_batch)
        key = base + (masks.shape[1:], dtype)
        return explainer, label, masks, key if run_mode == "head" else base

    def ablation(self, method: str, layer: str, mode: str, window: int = 1,
                 batch_size: int | None = None, gaussian: bool = False) -> dict:
        """One ablation row; ``method`` is one of :data:`ABLATION_METHODS` (``window`` is
        FastAblationCAM's, ``gaussian`` ReciproCAM's)."""
        self._ready()
        started = _clock()
        explainer, label, masks, key = self._ablation_explainer(method, layer, mode, window,
                                                                batch_size, gaussian)
        size = explainer.batch_size
        row = self._base(explainer, label, mode, size)
        evaluations = len(masks)
        slots = _slots(evaluations, size)[1]
        # A sample of masks on one image decides between a complete run and extrapolation.
        n_sample = min(evaluations, min(PER_MASK_SAMPLE, self.sample_masks) if mode == "per-mask"
                       else max(size, self.sample_masks // size * size))
        batches = explainer.mask_batches(masks[:n_sample])
        first = self._first_image(explainer)
        image, activation, bypass = first.images, first.activation, first.bypass
        target = int(self.targets[0])
        score = lambda b: explainer.ablated_scores(  # noqa: E731
            image, activation, bypass, target, b)
        return self._sampled(
            row, started, evaluations=evaluations, slots=slots, unit="mask",
            sample=lambda: score(batches), sample_count=n_sample,
            sample_slots=len(batches) * len(batches[0]), warm_up=lambda: score(batches[:1]),
            run_all=lambda: explainer(self.images), warm=self._warm_head(explainer), key=key,
            notes=NOTES[mode] + ("; keeps one cell per evaluation" * (method == "ReciproCAM")))

    def scorecam(self, layer: str, channels: int | None = None) -> dict:
        """Score-CAM (ours): one whole-network pass per channel, or per each of the top
        ``channels`` by spatial variance (Faster Score-CAM)."""
        self._ready()
        started = _clock()
        explainer = self._build("Score-CAM", layer, batch_size=self.batch_size,
                                channels=channels)
        label = "Score-CAM" if channels is None else f"Score-CAM top-{channels}"
        row = self._base(explainer, label, "full", self.batch_size)
        evaluations = explainer.channels_used
        per_batch, slots = _slots(evaluations, self.batch_size)
        key = (explainer.layer, explainer.score, "_masked",
               (per_batch,) + self.images.shape[1:3])
        # The sample: the explainer itself on image 0 with its channels cut to whole batches
        # (masks made, the masked images scored, as in a complete run).
        sampler = copy.copy(explainer)
        sampler.channels = min(evaluations,
                               per_batch * max(1, self.sample_masks // per_batch))
        first = self._first_image(explainer)
        targets = self.targets[:1]
        notes = (f"trunk once per image; one whole-network pass per channel (the image times "
                 f"the channel's upsampled map), in batches of {per_batch}")
        if channels is not None:
            notes = (f"channels={channels}: per image the {channels} channels of largest "
                     f"spatial variance (Faster Score-CAM); " + notes)
        return self._sampled(
            row, started, evaluations=evaluations, slots=slots, unit="channel",
            sample=lambda: sampler.explain(self.images[:1], targets, upsample=False,
                                           normalize=False, features=first),
            sample_count=sampler.channels, sample_slots=sampler.channels,
            run_all=lambda: explainer(self.images), warm=self._warm_head(explainer), key=key,
            notes=notes)

    def occlusion(self, window: int | None = None, stride: int | None = None,
                  layer=None) -> dict:
        """Occlusion of the input: one whole-network pass per patch position (``window`` and
        ``stride`` in pixels; None: the library's default)."""
        self._ready()
        started = _clock()
        explainer = self._build("Occlusion", layer, window=window, stride=stride,
                                batch_size=self.batch_size)
        size = self.images.shape[1:3]
        window, stride = explainer.geometry(size)
        masks = explainer.masks(size)
        evaluations = len(masks)
        per_batch, slots = _slots(evaluations, self.batch_size)
        key = (explainer.layer, explainer.score, "_occluded", explainer.baseline,
               (per_batch,) + tuple(size))
        count = min(slots, per_batch * max(1, self.sample_masks // per_batch))
        padded = np.concatenate([masks, np.zeros((slots - evaluations,) + masks.shape[1:], bool)])
        image, target = self.images[:1], self.targets[:1]
        sample = lambda: explainer.occluded_scores(image, padded[:count], target)  # noqa: E731
        row = {"layer": explainer.layer, "grid": "x".join(str(d) for d in self.images.shape[1:]),
               "method": f"Occlusion {window} px, stride {stride}", "mode": "full",
               "batch size": self.batch_size}
        return self._sampled(
            row, started, evaluations=evaluations, slots=slots, unit="position",
            sample=sample, sample_count=min(count, evaluations), sample_slots=count,
            warm_up=lambda: explainer.occluded_scores(image, padded[:per_batch], target),
            run_all=lambda: explainer(self.images), key=key,
            notes=(f"{window}x{window}-pixel patches of the input every {stride} px set to "
                   f"{explainer.baseline}; one whole-network pass per position, in batches "
                   f"of {per_batch}"))

    def peer(self, layer: str) -> list[dict]:
        """tf-keras-vis Gradcam and Scorecam at ``layer``, or one row saying it is missing."""
        self._ready()
        started = _clock()
        try:
            from tf_keras_vis.gradcam import Gradcam
            from tf_keras_vis.scorecam import Scorecam
            from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
            from tf_keras_vis.utils.scores import CategoricalScore
            import tf_keras_vis
        except ImportError as error:
            self._log(f"tf-keras-vis not installed ({error}); peer rows skipped")
            return [self._add({"layer": layer, "method": "tf-keras-vis", "mode": "peer",
                               "ms/image": np.nan, "x forward": np.nan,
                               "measured": "skipped: tf-keras-vis is not installed "
                                           "(pip install '.[peer]')", "notes": ""},
                              started=started)]
        version = tf_keras_vis.__version__
        # Built per layer: kept alive, they keep their compiled functions and the memory.
        gradcam = Gradcam(self.model, model_modifier=ReplaceToLinear(), clone=True)
        score = CategoricalScore(self.targets.tolist())
        shape = dict(candidate_layers(self.model))[layer][1:]
        grid, channels = "x".join(str(d) for d in shape), shape[-1]
        # seek_penultimate_conv_layer=False: by default tf-keras-vis walks back from a non-conv
        # layer to the nearest convolution (for DenseNet's `relu`, the 32-channel
        # conv5_block32_2_conv), which would time and explain a different layer.
        rows = []
        with PeakMemory() as memory:
            with _quiet():
                ms = median_ms(lambda: gradcam(score, self.images, penultimate_layer=layer,
                                               seek_penultimate_conv_layer=False),
                               self.repeats) / len(self.images)
        rows.append(self._add({
            "layer": layer, "grid": grid, "method": "tf-keras-vis Gradcam", "mode": "peer",
            "batch size": len(self.images), "evaluations/image": 1, "ms/image": ms,
            "measured": "all",
            "notes": f"tf-keras-vis {version}, ReplaceToLinear, whole-network gradient"},
            memory, started))
        # Score-CAM costs one whole-network pass per channel; time a sample of channels on one
        # image (max_N keeps the top-variance ones) and scale the per-channel cost.
        started = _clock()
        scorecam = Scorecam(self.model)
        one = self.images[:1]
        one_score = CategoricalScore([int(self.targets[0])])
        n = min(channels, self.sample_masks)
        run = lambda: scorecam(one_score, one, penultimate_layer=layer,  # noqa: E731
                               seek_penultimate_conv_layer=False, max_N=n, batch_size=32)
        with PeakMemory() as memory:
            with _quiet():
                sample_ms = median_ms(run, self.repeats)
        per_channel = max(sample_ms - self.forward_ms, 0) / n
        ms = self.forward_ms + per_channel * channels
        measured = "all" if n == channels else \
            f"extrapolated: {n} of {channels} channels timed on 1 image (max_N={n})"
        rows.append(self._add({
            "layer": layer, "grid": grid, "method": "tf-keras-vis Scorecam", "mode": "peer",
            "batch size": 32, "evaluations/image": channels, "ms/image": ms,
            "measured": measured,
            "notes": f"tf-keras-vis {version}; one whole-network pass per channel"},
            memory, started))
        gc.collect()  # tf-keras-vis' models and tapes hold GBs until collected
        return rows

    # -- the whole study -----------------------------------------------------------------

    def other_methods(self, layer: str, occlusion=OCCLUSION,
                      scorecam_channels: int | None = SCORECAM_CHANNELS) -> None:
        """The methods beyond Grad-CAM, Ablation-CAM and FastAblationCAM at ``layer``:
        Grad-CAM++, XGrad-CAM, LayerCAM and HiResCAM head-only; ReciproCAM in the three
        modes and with its Gaussian head-only; Score-CAM with every channel and with the top
        ``scorecam_channels``; Occlusion with ``occlusion`` = (window, stride) in pixels."""
        for method in GRADIENT_METHODS:
            self.gradient(method, layer)
        for mode in MODES:
            self.ablation("ReciproCAM", layer, mode)
        self.ablation("ReciproCAM", layer, "head", gaussian=True)
        self.scorecam(layer)
        if scorecam_channels:
            self.scorecam(layer, scorecam_channels)
        self.release(self.occlusion(*occlusion)["layer"])

    def run(self, layers, windows=(1, 2, 3), peer: bool = True, others: bool = True,
            occlusion=OCCLUSION, scorecam_channels: int | None = SCORECAM_CHANNELS
            ) -> pd.DataFrame:
        """Forward pass, then per layer: Grad-CAM (head, full), Ablation-CAM and
        FastAblationCAM at each window in the three modes, and the peer rows; at the first
        layer also :meth:`other_methods` (``others``); then the forward pass again (see
        :meth:`settle_forward`)."""
        self.forward()
        for i, layer in enumerate(layers):
            for mode in ("head", "full"):
                self.gradient("Grad-CAM", layer, mode)
            for mode in MODES:
                self.ablation("Ablation-CAM", layer, mode)
            grid = min(self._build("Grad-CAM", layer).split.target_shape[:2])
            for window in windows:
                if window > grid:
                    self._log(f"window {window} skipped at {layer}: its grid is {grid} wide")
                    continue
                for mode in MODES:
                    self.ablation("FastAblationCAM", layer, mode, window=window)
            if others and i == 0:
                self.other_methods(layer, occlusion, scorecam_channels)
            # the first layer's functions serve batch_sweep, which releases them
            if i > 0:
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
        self.forward_ms = first["ms/image"]
        for row in self.rows:
            row["x forward"] = row["ms/image"] / self.forward_ms

    def batch_sweep(self, layer: str, batch_sizes=(1, 4, 16, 64, 256)) -> pd.DataFrame:
        """Head-only Ablation-CAM and FastAblationCAM (window 1) at each batch size. A row the
        main table already has (same layer, method, mode and batch size) is taken from it,
        not timed again. Releases ``layer``'s compiled functions afterwards."""
        self._ready()
        done = {(r.get("layer"), r["method"], r.get("mode"), r.get("batch size")): r
                for r in self.rows}
        sweep = []
        for size in batch_sizes:
            for method, label in (("Ablation-CAM", "Ablation-CAM"),
                                  ("FastAblationCAM", "FastAblationCAM w1")):
                row = done.get((layer, label, "head", size))
                if row is not None:
                    sweep.append({**row, "notes": row["notes"] + " (the main table's row)"})
                    continue
                self.ablation(method, layer, "head", batch_size=size)
                sweep.append(self.rows.pop())
        self.release(layer)
        return pd.DataFrame(sweep).reindex(columns=COLUMNS)


class _quiet:
    """Silence Keras' per-call progress bar (tf-keras-vis calls ``predict`` with verbose=1)
    and the warning Keras gives when tf-keras-vis calls a model with its inputs as a tuple."""

    def __enter__(self):
        self._devnull = open(os.devnull, "w")
        self._stdout, sys.stdout = sys.stdout, self._devnull
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="The structure of `inputs`",
                                category=UserWarning)

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        sys.stdout = self._stdout
        self._devnull.close()


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
