"""The speed study's table and its protocol: how a row with many evaluations per image is timed.

Every such row (an ablation, Score-CAM, Occlusion) follows one protocol (:meth:`SpeedTable.sampled`):
a sample of evaluations is timed on one image; when a complete run (``repeats`` calls on every
image) is estimated to fit in ``budget_s`` it is timed, else the row is extrapolated from the
sample and ``measured`` says so. A row whose sample would time the same compiled call on
calls of the same size as an earlier row's reuses that sample and says whose it was.

The library scores the rows of all the images of a call as one list, in equal calls of at
most ``batch_size`` rows, the last padded (:func:`cam.batching.plan`): a row's cost counts the
padded rows a complete run pushes (:func:`padded_rows`), not only its evaluations.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cam.batching import plan

from .timing import PeakMemory, clock, median_ms

COLUMNS = ["layer", "grid", "method", "mode", "batch size", "evaluations/image", "ms/image",
           "x forward", "peak MB", "peak +MB", "GPU peak MB", "measured", "notes"]
#: Masks timed for a per-mask row (one whole-network pass each, at batch size 1: a stable cost).
PER_MASK_SAMPLE = 16


def padded_rows(rows: int, per_call: int) -> int:
    """Rows the library pushes to score ``rows`` rows in calls of at most ``per_call``: the
    fewest calls, evened out, times the rows of each (:func:`cam.batching.plan`)."""
    calls, size = plan(rows, per_call)
    return calls * size


def call_rows(rows: int, per_call: int) -> int:
    """Rows each call scores when ``rows`` rows go in calls of at most ``per_call``."""
    return plan(rows, per_call)[1]


def sample_size(evaluations: int, per_call: int, sample_masks: int, per_mask: bool = False
                ) -> int:
    """Evaluations timed on one image: whole calls of ``per_call`` rows, about ``sample_masks``
    of them and at least one call (16 at most one at a time in the per-mask mode), never more
    than there are."""
    if per_mask:
        return min(evaluations, PER_MASK_SAMPLE, sample_masks)
    return min(evaluations, max(per_call, sample_masks // per_call * per_call))


def grid_text(shape) -> str:
    return "x".join(str(d) for d in shape)


class SpeedTable:
    """The rows of a speed study, the study's own time per row, and the sampling protocol.

    ``forward_ms`` (one forward pass per image) is the yardstick of ``x forward``; the
    subclass :class:`cam.study.speed.SpeedStudy` times it and the rows.
    """

    def __init__(self, images: int, repeats: int = 3, budget_s: float = 5.0,
                 progress: bool = True):
        self.count, self.repeats, self.budget_s, self.progress = images, repeats, budget_s, progress
        self.rows: list[dict] = []
        #: The study's own time: one dict per row (row, wall and CPU seconds), in order.
        self.wall: list[dict] = []
        self.forward_ms: float | None = None
        #: cost key -> (ms per pushed row, evaluations timed, the row that timed them)
        self.samples: dict = {}

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}")

    def add(self, row: dict, memory: PeakMemory | None = None, started: tuple | None = None
            ) -> dict:
        """Append ``row`` with its memory columns, ``x forward`` and the study's time on it."""
        if memory is not None:
            row["peak MB"], row["GPU peak MB"] = memory.peak_mb, memory.gpu_peak_mb
            # What the row itself added: RSS also holds what earlier rows left allocated.
            row["peak +MB"] = memory.peak_mb - memory.start_mb
        row.setdefault("x forward", row["ms/image"] / self.forward_ms if self.forward_ms else 1.0)
        self.rows.append(row)
        seconds, cpu = (np.subtract(clock(), started) if started is not None
                        else (float("nan"), float("nan")))
        self.wall.append({"layer": row.get("layer", ""), "method": row["method"],
                          "mode": row.get("mode", ""), "seconds": seconds, "CPU seconds": cpu,
                          "measured": row["measured"]})
        self.log(f"{row['method']:<24} {row.get('mode', ''):<9} {row.get('layer', ''):<22} "
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

    def rescale(self, forward_ms: float) -> None:
        """Make ``forward_ms`` the yardstick and recompute every row's ``x forward``."""
        self.forward_ms = forward_ms
        for row in self.rows:
            row["x forward"] = row["ms/image"] / forward_ms

    def sampled(self, row: dict, started: tuple, *, evaluations: int, per_call: int, unit: str,
                sample, sample_count: int, run_all=None, traces=None, key=None,
                notes: str = "") -> dict:
        """The protocol of every row with many evaluations per image (the module docstring).

        ``sample()`` scores ``sample_count`` evaluations of one image in calls of at most
        ``per_call`` rows; ``run_all()`` explains every image (``evaluations`` each);
        ``traces()`` counts the traces of the compiled scoring both run, so that a first call
        that compiled is not kept as a timing (:func:`cam.study.timing.timings_ms`). An
        extrapolated row is one forward pass plus the rows a complete run pushes per image
        times the sample's cost per pushed row. ``key``: what the sample's cost depends on.
        """
        n = self.count
        pushed = padded_rows(n * evaluations, per_call) / n  # per image, with padding
        with PeakMemory() as memory:
            reused = self.samples.get(key) if key is not None else None
            if reused is None:
                warm_up = traces is None  # else a first call that compiled is timed again
                per_row = median_ms(sample, self.repeats, warm_up, traces) / padded_rows(
                    sample_count, per_call)
                if key is not None:
                    self.samples[key] = (per_row, sample_count, f"{row['method']} {row['mode']}")
            else:
                per_row = reused[0]
            estimate_s = per_row * pushed * n * self.repeats / 1000
            if run_all is not None and estimate_s <= self.budget_s:
                ms = median_ms(run_all, self.repeats, traces is None, traces) / n
                measured = "all"
            else:
                ms = self.forward_ms + per_row * pushed
                measured = extrapolated(unit, evaluations, sample_count, reused, estimate_s)
        return self.add({**row, "evaluations/image": evaluations, "ms/image": ms,
                         "measured": measured, "notes": notes}, memory, started)


def extrapolated(unit: str, evaluations: int, sample_count: int, reused, estimate_s: float
                 ) -> str:
    """What ``measured`` says for an extrapolated row."""
    complete = f"a complete run: ~{estimate_s:.0f} s"
    if reused is None:
        return (f"extrapolated: {sample_count} of {evaluations} {unit}s timed on 1 image "
                f"({complete})")
    return (f"extrapolated: cost per {unit} from the {reused[1]} {unit}s timed on 1 image for "
            f"{reused[2]}, the same passes on batches of the same size ({complete})")
