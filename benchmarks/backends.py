"""Speed and agreement of cam on each Keras backend, side by side.

    python benchmarks/backends.py [--images 8] [--repeats 3] [--layer relu]
                                  [--backends tensorflow,jax,torch] [--out results/polen23e/tables]

The committed DenseNet-169 checkpoint (``.weights.h5.gz``) is built and loaded on each backend in
its own process (Keras chooses its backend at import), on the same held-out POLEN23E images
($POLEN23E_DIR; else seeded random pixels, said in the output), 224 x 224. Per backend: a
forward pass of the whole model (compiled by cam.backend, as the explainers' functions are),
Grad-CAM, Ablation-CAM and FastAblationCAM at ``--layer``, each the median of ``--repeats``
timed calls on all the images after one warm-up call, in ms per image and as a multiple of that
backend's own forward pass; and the largest difference of each method's raw maps from
TensorFlow's, relative to the map's largest value. Writes ``backends-speed.md`` and ``.csv``
under ``--out`` and prints the table. A measurement, not a test; it runs unchanged on a GPU,
where each backend uses the device it finds (the ``device`` column).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("Grad-CAM", "Ablation-CAM", "FastAblationCAM")
IMAGE_SIZE, SEED = 224, 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    p.add_argument("--layer", default="relu", help="target layer (default relu)")
    p.add_argument("--backends", default="tensorflow,jax,torch",
                   help="comma-separated Keras backends (default: all three)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "polen23e" / "tables",
                   help="folder for backends-speed.md and .csv")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one backend
    args = p.parse_args(argv)
    if min(args.images, args.repeats) < 1:
        p.error("--images and --repeats must be >= 1")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(backend: str) -> str:
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return gpus[0].name if gpus else "CPU"
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return d.platform.upper() if d.platform == "cpu" else str(d.device_kind)
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def worker(args) -> None:
    """Run in a process whose KERAS_BACKEND is set: time and explain, save to args.worker."""
    import keras
    import numpy as np

    import cam
    from cam import backend as B
    from cam.study import data, models, paths

    name = B.name()
    model, _ = models.load_checkpoint(models.CHECKPOINT_STEM, paths.MODELS_DIR, IMAGE_SIZE)
    images, source = data.held_out_sample(args.images, IMAGE_SIZE, SEED)
    forward = B.compiled(lambda x: model(x, training=False), model.variables)

    def timed(fn):
        fn()  # warm-up: traces and compiles
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1000 / len(images)

    row = {"backend": name, "device": device_name(name), "images": source,
           "forward ms": timed(lambda: B.numpy(forward(B.tensor(images))))}
    scores = B.numpy(forward(B.tensor(images)))
    targets = scores.argmax(axis=1)
    maps = {}
    for method in METHODS:
        explainer = cam.method_class(method)(model, args.layer)
        row[f"{method} ms"] = timed(lambda: explainer.explain(images, targets, upsample=False,
                                                              normalize=False))
        maps[method] = explainer.explain(images, targets, upsample=False, normalize=False).raw
    np.savez(args.worker, targets=targets, **maps)
    args.worker.with_suffix(".json").write_text(json.dumps(
        {**row, "keras": keras.__version__, "version": version(name)}))


def version(backend: str) -> str:
    from importlib.metadata import version as v

    return v("tensorflow" if backend == "tensorflow" else backend)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import numpy as np
    import pandas as pd

    rows, maps = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.backends:
            out = Path(folder) / f"{name}.npz"
            command = [sys.executable, __file__, "--worker", str(out), "--images",
                       str(args.images), "--repeats", str(args.repeats), "--layer", args.layer]
            print(f"{name}: running", flush=True)
            env = {**os.environ, "KERAS_BACKEND": name, "TF_CPP_MIN_LOG_LEVEL": "3"}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
            rows.append(json.loads(out.with_suffix(".json").read_text()))
            with np.load(out) as data:
                maps[name] = {k: data[k] for k in data.files}
    reference = maps.get("tensorflow")
    records, differences = [], []
    for row in rows:
        record = {"backend": f"{row['backend']} {row['version']}", "device": row["device"],
                  "forward ms/image": row["forward ms"]}
        for method in METHODS:
            ms = row[f"{method} ms"]
            record[f"{method} ms/image"] = ms
            record[f"{method} x forward"] = ms / row["forward ms"]
        records.append(record)
        if reference is not None:
            mine = maps[row["backend"]]
            same = np.array_equal(mine["targets"], reference["targets"])
            differences.append({"backend": record["backend"], "same predicted classes": same,
                                **{f"{m}": np.abs(mine[m] - reference[m]).max()
                                   / np.abs(reference[m]).max() for m in METHODS}})
    table = pd.DataFrame(records)
    header = (f"DenseNet-169 (committed checkpoint), {IMAGE_SIZE}x{IMAGE_SIZE}, layer "
              f"`{args.layer}`, {rows[0]['images']}; median of {args.repeats} calls on all the "
              f"images after a warm-up; machine: {cpu_name()}, {os.cpu_count()} logical CPUs; "
              f"Keras {rows[0]['keras']}. Map difference: largest |map - TensorFlow's map| over "
              f"the three methods, relative to the map's largest value.")
    markdown = table.to_markdown(index=False, floatfmt=".3g")
    if differences:
        markdown += ("\n\nLargest difference from TensorFlow's raw map, relative to its largest "
                     "value, per method:\n\n"
                     + pd.DataFrame(differences).to_markdown(index=False, floatfmt=".2g"))
    print(header + "\n\n" + markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "backends-speed.csv", index=False)
    (args.out / "backends-speed.md").write_text(header + "\n\n" + markdown + "\n")
    print(f"\nwrote {args.out / 'backends-speed.md'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
