"""The speed study's instruments: the clock, repeated timings, a memory sampler, the machine.

Nothing here knows about explainers: :mod:`cam.study.speed` builds its rows from these.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings

import keras
import tensorflow as tf

#: A timed call is repeated (median of ``repeats``) only when the extra calls take under this
#: many ms in all: a call of a few seconds already averages many passes.
REPEAT_MS = 4_000


def machine() -> dict:
    """CPU model, cores, GPUs visible to TensorFlow, library versions: where a table was made."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "logical CPUs": os.cpu_count(),
            "GPUs": len(tf.config.list_physical_devices("GPU")),
            "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__}


def rss_mb() -> float:
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
    (tracemalloc would see Python objects only). ``start_mb``: the RSS when the block began;
    ``gpu_peak_mb``: with a GPU, TensorFlow's peak device memory during the block.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb, self.start_mb = interval, 0.0, 0.0
        self.gpu_peak_mb = None
        self.stop = threading.Event()
        self.gpu = "GPU:0" if tf.config.list_physical_devices("GPU") else None

    def sample(self) -> None:
        while not self.stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self.stop.wait(self.interval)

    def __enter__(self):
        self.peak_mb = self.start_mb = rss_mb()
        if self.gpu:
            tf.config.experimental.reset_memory_stats(self.gpu)
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if self.gpu:
            self.gpu_peak_mb = tf.config.experimental.get_memory_info(self.gpu)["peak"] / 2**20


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now: ``time.perf_counter`` and ``time.process_time``."""
    return time.perf_counter(), time.process_time()


def timings_ms(fn, repeats: int, warm_up=True, cap_ms: float | None = REPEAT_MS,
               traces=None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in ms; one call only when the other
    ``repeats - 1`` would take ``cap_ms`` or more (None: no cap).

    ``warm_up``: True (an untimed call of ``fn`` first), a cheaper callable that runs the
    same compiled functions on the same shapes (tracing and first-call costs are paid there),
    or False when those functions already ran on these shapes. ``traces``: with
    ``warm_up=False``, a callable counting the traces of the compiled functions ``fn`` runs;
    a first call during which it changed was the warm-up after all, and is not kept.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warm_up:
        (fn if warm_up is True else warm_up)()
    times, before = [], traces() if traces is not None else None
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
        if before is not None and traces() != before:  # that call compiled: time again
            times, before = [], None
            continue
        if cap_ms is not None and times[0] * (repeats - 1) >= cap_ms:
            break
    return times


def median_ms(fn, repeats: int, warm_up=True, traces=None) -> float:
    """Median wall time of ``fn()`` in ms over the calls of :func:`timings_ms`."""
    return statistics.median(timings_ms(fn, repeats, warm_up, traces=traces))


class Quiet:
    """Silence Keras' per-call progress bar (tf-keras-vis calls ``predict`` with verbose=1)
    and the warning Keras gives when tf-keras-vis calls a model with its inputs as a tuple."""

    def __enter__(self):
        self.devnull = open(os.devnull, "w")
        self.stdout, sys.stdout = sys.stdout, self.devnull
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", message="The structure of `inputs`",
                                category=UserWarning)
        return self

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        sys.stdout = self.stdout
        self.devnull.close()
