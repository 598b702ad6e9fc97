"""Speed benchmark: Grad-CAM, Ablation-CAM and FastAblationCAM on DenseNet-169, head vs full.

    python benchmarks/speed.py [--images 8] [--repeats 3] [--batch-size 64] [--layers relu]
                               [--budget 300] [--sample-batches 2] [--quick] [--csv PATH]

Builds DenseNet-169 (random weights, 224x224, 23 classes), makes N images of random pixels
with a fixed seed and prints a Markdown table: for each method and mode, the evaluations per
image, milliseconds per image (median of ``--repeats`` timed calls after one untimed warm-up),
the ratio to one forward pass, the process's peak RSS so far and the head-over-full speed-up.

An ablation row whose full run would take longer than ``--budget`` seconds (estimated from a
timed sample) is not run over every mask: ``--sample-batches`` batches of masks go through
``explainer.ablated_scores`` on one image, and the time per batch is scaled to all of the
image's batches, plus one forward pass for the trunk and the scores. Such rows say so in the
notes column.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cam  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from cam.models import build_densenet169  # noqa: E402

NUM_CLASSES, IMAGE_SIZE, SEED = 23, 224, 0
COLUMNS = ["method", "mode", "layer", "evaluations/image", "ms/image", "x forward",
           "peak RSS MB", "head speed-up", "notes"]


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks the samples and the budget for a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="ablations per batch (default 64)")
    p.add_argument("--layers", default="relu", help="comma-separated target layers")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds an ablation row may take before it is extrapolated from a "
                        "sample (default 300, 20 with --quick)")
    p.add_argument("--sample-batches", type=int, default=None,
                   help="mask batches timed for an extrapolated row (default 2, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smaller samples and budget")
    p.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 20.0 if args.quick else 300.0
    if args.sample_batches is None:
        args.sample_batches = 1 if args.quick else 2
    if min(args.images, args.repeats, args.batch_size, args.sample_batches) < 1:
        p.error("--images, --repeats, --batch-size and --sample-batches must be >= 1")
    args.layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    return args


def progress(message: str) -> None:
    """One progress line on stderr (runs take minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor(), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """Markdown lines describing the machine and library versions."""
    gpus = tf.config.list_physical_devices("GPU")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return "\n".join([
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{len(gpus)} GPU(s) visible to TensorFlow; {platform.platform()}",
        f"- Python {platform.python_version()}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__} (backend {keras.backend.backend()})",
        f"- load average (1/5/15 min) at start: {load}",
    ])


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark so far, in MB (ru_maxrss: KB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after one untimed warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_forward(model: keras.Model, images: np.ndarray, repeats: int) -> tuple[float, str]:
    """ms per image of the faster of ``model.predict`` and a tf.function'd ``model(x)``."""
    batch = tf.constant(images)
    call = tf.function(lambda x: model(x, training=False))
    candidates = {
        "model.predict": lambda: model.predict(images, batch_size=len(images), verbose=0),
        "tf.function(model)": lambda: call(batch).numpy(),
    }
    timings = {name: median_ms(fn, repeats) / len(images) for name, fn in candidates.items()}
    best = min(timings, key=timings.get)
    other = ", ".join(f"{name} {ms:.1f} ms/image" for name, ms in timings.items())
    return timings[best], f"{best} (faster of: {other})"


def time_ablation_sample(explainer, images: np.ndarray, sample_batches: int,
                         repeats: int) -> tuple[float, int]:
    """ms per mask batch of ``explainer.ablated_scores`` on the first image, and masks timed."""
    image = tf.constant(images[:1])
    activation, bypass = explainer.split.trunk(image)
    target = int(np.argmax(explainer.split.head(activation, bypass)[0]))
    masks = explainer.masks(explainer.split.target_shape)[:sample_batches * explainer.batch_size]
    ms = median_ms(lambda: explainer.ablated_scores(image, activation, bypass, target, masks),
                   repeats)
    return ms / math.ceil(len(masks) / explainer.batch_size), len(masks)


def bench_method(cls, mode: str, model, images, layer: str, args, forward_ms: float) -> dict:
    """One table row: time the explainer's call, or extrapolate an ablation method's."""
    kwargs = {} if cls is cam.GradCAM else {"batch_size": args.batch_size}
    explainer = cls(model, layer, mode=mode, **kwargs)
    row = {"method": cls.name, "mode": mode, "layer": layer, "notes": ""}
    if cls is cam.GradCAM:
        row["evaluations/image"] = 1
        row["notes"] = ("trunk+head forward, then head forward+backward" if mode == "head"
                        else "trunk+head forward, then whole-net forward+backward")
        row["ms/image"] = median_ms(lambda: explainer(images), args.repeats) / len(images)
        return row
    evaluations = explainer.evaluations_per_image
    row["evaluations/image"] = evaluations
    batches = math.ceil(evaluations / args.batch_size)
    per_batch, sampled = time_ablation_sample(explainer, images, args.sample_batches,
                                              args.repeats)
    estimate_s = per_batch * batches * len(images) * (args.repeats + 1) / 1000
    if estimate_s <= args.budget:
        row["ms/image"] = median_ms(lambda: explainer(images), args.repeats) / len(images)
    else:
        row["ms/image"] = forward_ms + per_batch * batches
        row["notes"] = (f"extrapolated from {sampled} of {evaluations} ablations on 1 image "
                        f"(full run est. {estimate_s:.0f} s > budget {args.budget:.0f} s)")
    return row


def bench_layer(model, images, layer: str, args, forward_ms: float) -> list[dict]:
    """The six explainer rows (3 methods x head/full) at one layer, with head speed-ups."""
    rows = []
    for cls in (cam.GradCAM, cam.AblationCAM, cam.FastAblationCAM):
        for mode in ("head", "full"):
            progress(f"{cls.name} {mode} @ {layer} ...")
            row = bench_method(cls, mode, model, images, layer, args, forward_ms)
            row["x forward"] = row["ms/image"] / forward_ms
            row["peak RSS MB"] = peak_rss_mb()
            progress(f"  {row['ms/image']:.1f} ms/image {row['notes']}")
            rows.append(row)
        head, full = rows[-2], rows[-1]
        head["head speed-up"] = full["ms/image"] / head["ms/image"]
    return rows


def to_markdown(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` with the columns in COLUMNS."""
    def fmt(column, value):
        if value is None or value == "":
            return ""
        if column == "head speed-up":
            return f"{value:.1f}x"
        if column == "x forward":
            return f"{value:.2f}"
        if isinstance(value, float):
            return f"{value:.1f}" if value < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(machine_info() + "\n")
    progress("building DenseNet-169 (random weights)")
    model = build_densenet169(NUM_CLASSES, image_size=IMAGE_SIZE)
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (args.images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)

    progress("forward pass")
    forward_ms, how = time_forward(model, images, args.repeats)
    rows = [{"method": "forward pass", "mode": "", "layer": "", "evaluations/image": 1,
             "ms/image": forward_ms, "x forward": 1.0, "peak RSS MB": peak_rss_mb(),
             "notes": how}]
    for layer in args.layers:
        rows += bench_layer(model, images, layer, args, forward_ms)

    print(f"DenseNet-169, {IMAGE_SIZE}x{IMAGE_SIZE}, {NUM_CLASSES} classes, random weights, "
          f"{args.images} random image(s) (seed {SEED}), batch size {args.batch_size}; "
          f"ms/image = median of {args.repeats} call(s) after 1 untimed warm-up.\n")
    print(to_markdown(rows))
    print("\npeak RSS MB is the process's resident-set high-water mark so far "
          "(resource.getrusage(RUSAGE_SELF).ru_maxrss), so it only grows down the table. "
          "tracemalloc is not used: it sees Python allocations only, not TensorFlow's C++ "
          "allocator. head speed-up = full ms / head ms for the same method.")
    if args.csv:
        import pandas as pd

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=COLUMNS).to_csv(args.csv, index=False)
        progress(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
