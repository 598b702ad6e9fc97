"""Where the time goes: every method, execution mode and layer timed side by side in one process.

The yardstick is one plain forward pass. Each ablation method runs in three execution modes:

``head`` (ours)
    the trunk runs once per image, then batches of ablated activations go through the part
    of the network after the target layer only;
``full``
    every ablation batch reruns the whole network on copies of the image, the way
    pytorch-grad-cam batches Ablation-CAM;
``per-mask``
    one whole-network pass per mask and per image (batch size 1), the way the reference
    FastAblationCAM repository loops over locations.

Grad-CAM runs head-only and full; the peer library tf-keras-vis (optional) adds its Gradcam and
Scorecam. Rows whose complete run would exceed a time budget are extrapolated from a timed
sample of masks, and the table says so in ``measured``. All rows use the same images, the same
clock (``time.perf_counter``) and the median of ``repeats`` calls after one untimed warm-up.

Used by ``notebooks/04-speed.ipynb`` and ``benchmarks/speed.py``.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from ..methods import AblationCAM, FastAblationCAM, GradCAM
from ..graph import candidate_layers

#: The study's layers on DenseNet-169: the final feature map, and internal conv4 and conv3 ones.
DENSENET_LAYERS = ("relu", "conv4_block32_concat", "conv3_block12_concat")
#: Ablation execution modes, in table order.
MODES = ("head", "full", "per-mask")
COLUMNS = ["layer", "grid", "method", "mode", "batch size", "evaluations/image", "ms/image",
           "x forward", "peak MB", "peak +MB", "GPU peak MB", "measured", "notes"]


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


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after one untimed warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


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


@dataclass
class SpeedStudy:
    """Times methods on ``model`` for one batch of ``images`` (already preprocessed).

    Parameters
    ----------
    repeats : timed calls per row (median reported), after one warm-up call.
    batch_size : ablations per compiled batch in the ``head`` and ``full`` modes.
    budget_s : a row whose complete run (warm-up + repeats, all images) is estimated to take
        longer is extrapolated from ``sample_masks`` masks on one image instead.
    """

    model: keras.Model
    images: np.ndarray
    repeats: int = 3
    batch_size: int = 64
    budget_s: float = 15.0
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

    def _log(self, message: str) -> None:
        if self.progress:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}")

    def _add(self, row: dict, memory: "PeakMemory | None" = None) -> dict:
        if memory is not None:
            row["peak MB"], row["GPU peak MB"] = memory.peak_mb, memory.gpu_peak_mb
            # What the row itself added: RSS also holds what earlier rows left allocated.
            row["peak +MB"] = memory.peak_mb - memory.start_mb
        row.setdefault("x forward", row["ms/image"] / self.forward_ms if self.forward_ms else 1.0)
        self.rows.append(row)
        self._log(f"{row['method']:<24} {row.get('mode', ''):<9} {row.get('layer', ''):<22} "
                  f"{row['ms/image']:>10.1f} ms/image  {row['x forward']:>8.2f}x  "
                  f"{row['measured']}")
        return row

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows).reindex(columns=COLUMNS)

    # -- rows ----------------------------------------------------------------------------

    def forward(self) -> dict:
        """The floor: the faster of ``model.predict`` and a compiled ``model(x)`` on the batch."""
        batch = tf.constant(self.images)
        call = tf.function(lambda x: self.model(x, training=False))
        n = len(self.images)
        timings = {}
        with PeakMemory() as memory:
            timings["tf.function(model)"] = median_ms(lambda: call(batch).numpy(), self.repeats) / n
            timings["model.predict"] = median_ms(
                lambda: self.model.predict(self.images, batch_size=n, verbose=0), self.repeats) / n
        best = min(timings, key=timings.get)
        self.forward_ms = timings[best]
        return self._add({"layer": "", "grid": "", "method": "forward pass", "mode": "",
                          "batch size": n, "evaluations/image": 1, "ms/image": self.forward_ms,
                          "x forward": 1.0, "measured": "all",
                          "notes": f"{best}; " + ", ".join(f"{k} {v:.1f} ms"
                                                          for k, v in timings.items())}, memory)

    def _base(self, explainer, method: str, mode: str, batch_size) -> dict:
        shape = explainer.split.target_shape
        return {"layer": explainer.layer, "grid": "x".join(str(d) for d in shape),
                "method": method, "mode": mode, "batch size": batch_size}

    def gradcam(self, layer: str, mode: str = "head") -> dict:
        explainer = GradCAM(self.model, layer, mode=mode)
        row = self._base(explainer, "Grad-CAM", mode, len(self.images))
        with PeakMemory() as memory:
            ms = median_ms(lambda: explainer(self.images), self.repeats) / len(self.images)
        notes = ("trunk forward, head forward + backward" if mode == "head"
                 else "whole-network forward + backward")
        return self._add({**row, "evaluations/image": 1, "ms/image": ms,
                          "measured": "all", "notes": notes}, memory)

    def ablation(self, method: str, layer: str, mode: str, window: int = 1,
                 batch_size: int | None = None) -> dict:
        """One ablation row; ``method`` is "Ablation-CAM" or "FastAblationCAM"."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        size = 1 if mode == "per-mask" else (batch_size or self.batch_size)
        run_mode = "head" if mode == "head" else "full"
        if method == "Ablation-CAM":
            explainer = AblationCAM(self.model, layer, batch_size=size, mode=run_mode)
            label = method
        elif method == "FastAblationCAM":
            explainer = FastAblationCAM(self.model, layer, window=window, batch_size=size,
                                        mode=run_mode)
            label = f"FastAblationCAM w{window}"
        else:
            raise ValueError(f"method must be 'Ablation-CAM' or 'FastAblationCAM', got {method!r}")
        row = self._base(explainer, label, mode, size)
        evaluations = explainer.evaluations_per_image
        row["evaluations/image"] = evaluations
        masks = explainer.masks(explainer.split.target_shape)
        # Masks actually pushed per image: mask_batches pads the last batch to the batch size,
        # and uses one batch of exactly `evaluations` masks when they fit in one.
        per_batch = min(size, evaluations)
        slots = math.ceil(evaluations / per_batch) * per_batch
        # Time a sample of masks on one image to decide between a complete run and extrapolation.
        n_sample = min(len(masks), min(16, self.sample_masks) if mode == "per-mask"
                       else max(size, self.sample_masks // size * size))
        sample = masks[:n_sample]
        image = tf.constant(self.images[:1])
        activation, bypass = explainer.split.trunk(image)
        target = int(np.argmax(explainer.split.head(activation, bypass)[0]))
        sample_batches = explainer.mask_batches(sample)
        time_sample = lambda: explainer.ablated_scores(  # noqa: E731
            image, activation, bypass, target, sample_batches)
        with PeakMemory() as memory:
            sample_ms = median_ms(time_sample, 1)
            per_mask = sample_ms / (len(sample_batches) * len(sample_batches[0]))
            estimate_s = per_mask * slots * len(self.images) * (self.repeats + 1) / 1000
            if estimate_s <= self.budget_s:
                ms = median_ms(lambda: explainer(self.images), self.repeats) / len(self.images)
                measured = "all"
            else:
                # Repeat the sample too when that is cheap (under ~10 s in all).
                if sample_ms * self.repeats < 10_000:
                    sample_ms = median_ms(time_sample, self.repeats)
                    per_mask = sample_ms / (len(sample_batches) * len(sample_batches[0]))
                ms = self.forward_ms + per_mask * slots
                measured = (f"extrapolated: {len(sample)} of {evaluations} masks timed on 1 "
                            f"image (a complete run: ~{estimate_s:.0f} s)")
        notes = {"head": "trunk once per image; ablated batches through the head only",
                 "full": "every ablated batch reruns the whole network",
                 "per-mask": "one whole-network pass per mask, one image at a time"}[mode]
        return self._add({**row, "ms/image": ms, "measured": measured, "notes": notes}, memory)

    def peer(self, layer: str) -> list[dict]:
        """tf-keras-vis Gradcam and Scorecam at ``layer``, or one row saying it is missing."""
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
                                           "(pip install '.[peer]')", "notes": ""})]
        version = tf_keras_vis.__version__
        probs = self.model.predict(self.images, verbose=0)
        score = CategoricalScore(probs.argmax(1).tolist())
        shape = dict(candidate_layers(self.model))[layer][1:]
        grid, channels = "x".join(str(d) for d in shape), shape[-1]
        # seek_penultimate_conv_layer=False: by default tf-keras-vis walks back from a non-conv
        # layer to the nearest convolution (for DenseNet's `relu`, the 32-channel
        # conv5_block32_2_conv), which would time and explain a different layer.
        gradcam = Gradcam(self.model, model_modifier=ReplaceToLinear(), clone=True)
        rows = []
        with PeakMemory() as memory:
            ms = median_ms(lambda: gradcam(score, self.images, penultimate_layer=layer,
                                           seek_penultimate_conv_layer=False),
                           self.repeats) / len(self.images)
        rows.append(self._add({
            "layer": layer, "grid": grid, "method": "tf-keras-vis Gradcam", "mode": "peer",
            "batch size": len(self.images), "evaluations/image": 1, "ms/image": ms,
            "measured": "all",
            "notes": f"tf-keras-vis {version}, ReplaceToLinear, whole-network gradient"}, memory))
        # Score-CAM costs one whole-network pass per channel; time a sample of channels on one
        # image (max_N keeps the top-variance ones) and scale the per-channel cost.
        scorecam = Scorecam(self.model)
        one = self.images[:1]
        one_score = CategoricalScore([int(probs[0].argmax())])
        n = min(channels, self.sample_masks)
        run = lambda: scorecam(one_score, one, penultimate_layer=layer,  # noqa: E731
                               seek_penultimate_conv_layer=False, max_N=n, batch_size=32)
        with PeakMemory() as memory:
            with _quiet():
                sample_ms = median_ms(run, max(1, self.repeats - 1))
        per_channel = max(sample_ms - self.forward_ms, 0) / n
        ms = self.forward_ms + per_channel * channels
        measured = "all" if n == channels else \
            f"extrapolated: {n} of {channels} channels timed on 1 image (max_N={n})"
        rows.append(self._add({
            "layer": layer, "grid": grid, "method": "tf-keras-vis Scorecam", "mode": "peer",
            "batch size": 32, "evaluations/image": channels, "ms/image": ms,
            "measured": measured,
            "notes": f"tf-keras-vis {version}; one whole-network pass per channel"}, memory))
        return rows

    # -- the whole study -----------------------------------------------------------------

    def run(self, layers, windows=(1, 2, 3), peer: bool = True) -> pd.DataFrame:
        """Forward pass, then per layer: Grad-CAM (head, full), Ablation-CAM and
        FastAblationCAM at each window in the three modes, and the peer rows; then the forward
        pass again (see :meth:`settle_forward`)."""
        self.forward()
        for layer in layers:
            for mode in ("head", "full"):
                self.gradcam(layer, mode)
            for mode in MODES:
                self.ablation("Ablation-CAM", layer, mode)
            grid = min(GradCAM(self.model, layer).split.target_shape[:2])
            for window in windows:
                if window > grid:
                    self._log(f"window {window} skipped at {layer}: its grid is {grid} wide")
                    continue
                for mode in MODES:
                    self.ablation("FastAblationCAM", layer, mode, window=window)
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
        if again["ms/image"] < first["ms/image"]:
            first.update({k: again[k] for k in ("ms/image", "notes", "peak MB", "peak +MB",
                                                "GPU peak MB")})
        first["notes"] += "; faster of two timings (start and end of the study)"
        self.forward_ms = first["ms/image"]
        for row in self.rows:
            row["x forward"] = row["ms/image"] / self.forward_ms

    def batch_sweep(self, layer: str, batch_sizes=(1, 4, 16, 64, 256)) -> pd.DataFrame:
        """Head-only Ablation-CAM and FastAblationCAM (window 1) at each batch size."""
        if self.forward_ms is None:
            self.forward()
        start = len(self.rows)
        for size in batch_sizes:
            self.ablation("Ablation-CAM", layer, "head", batch_size=size)
            self.ablation("FastAblationCAM", layer, "head", batch_size=size)
        sweep = pd.DataFrame(self.rows[start:]).reindex(columns=COLUMNS)
        del self.rows[start:]
        return sweep


class _quiet:
    """Silence Keras' per-call progress bar (tf-keras-vis calls ``predict`` with verbose=1)."""

    def __enter__(self):
        self._devnull = open(os.devnull, "w")
        self._stdout, sys.stdout = sys.stdout, self._devnull

    def __exit__(self, *exc):
        sys.stdout = self._stdout
        self._devnull.close()


def speed_ups(table: pd.DataFrame) -> pd.DataFrame:
    """For each layer and ablation method: how many times faster head-only is than the full
    and per-mask modes, and than tf-keras-vis Scorecam for Ablation-CAM."""
    out = []
    for (layer, method), rows in table[table["mode"].isin(MODES)].groupby(
            ["layer", "method"], sort=False):
        ms = rows.set_index("mode")["ms/image"]
        if "head" not in ms:
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
