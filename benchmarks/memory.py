"""Peak memory of one explain call on many images: every call inside the memory budget.

    python benchmarks/memory.py [--images 256,2048] [--size 224] [--out results/memory/peak.md]

DenseNet-121 (random weights: memory does not depend on them) at ``--size`` px, seeded random
images, one ``explainer(images)`` call per row, each in a fresh process so that peaks do not
mix: Occlusion with a 112-pixel window (4 occluded copies per image, every one a
whole-network pass) and FastAblationCAM with window 1 at the last feature map (``relu``).
A row reports the process's peak resident memory (``ru_maxrss``), what the process held
before the call (the model, the images) and the difference, the call's own peak. Nothing is
asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Occlusion's window is half the image side (112 px at 224: 4 occluded copies per image).
METHODS = {"Occlusion (window H/2)": ("Occlusion", {}),
           "FastAblationCAM (window 1, relu)": ("FastAblationCAM", {"layer": "relu"})}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method: str, count: int, size: int) -> dict:
    """One explain call in this process: its peak and what was held before it."""
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import cam

    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(weights=None, input_shape=(size, size, 3),
                                           classes=23)
    images = np.random.default_rng(0).uniform(0, 255, (count, size, size, 3))
    images = images.astype(np.float32)
    kind, options = METHODS[method]
    if kind == "Occlusion":
        options = {"window": size // 2}
    explainer = getattr(cam, kind)(model, **options)
    before = rss_mb()
    started = time.perf_counter()
    maps = explainer(images, upsample=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "images": count, "peak MB": round(peak),
            "held before MB": round(before), "call's peak MB": round(peak - before),
            "rows/call": explainer.batch_size, "path": getattr(explainer, "path", "(before the engine)"),
            "evaluations/image": explainer.evaluations_per_image,
            "s": round(seconds, 1), "maps": list(maps.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="256,2048", help="image counts (default 256,2048)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default="results/memory/peak.md")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.size)))
        return 0
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.setdefault("KERAS_BACKEND", "tensorflow")
    rows = []
    for count in (int(n) for n in args.images.split(",")):
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--size", str(args.size),
                                  "--worker", method, str(count)], env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{method} on {count} images failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    budget = os.environ.get("CAM_MEMORY_BUDGET", "256 MiB (the CPU default)")
    text = (f"# Peak memory of one explain call\n\n`python benchmarks/memory.py --images "
            f"{args.images} --size {args.size}`: DenseNet-121 (random weights) at "
            f"{args.size} px, {os.environ['KERAS_BACKEND'] if 'KERAS_BACKEND' in os.environ else 'tensorflow'}, "
            f"memory budget {budget}, {os.cpu_count()} CPUs.\n\n" + "\n".join(lines) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
