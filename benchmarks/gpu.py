"""Speed and precision of cam on a GPU, per Keras backend: JAX, PyTorch, PyTorch compiled.

    python benchmarks/gpu.py [--images 32] [--repeats 5] [--size 224] [--layers relu,pool4_relu]
                             [--backends jax,torch,torch-compile] [--cpu-check 2]
                             [--timeout 0] [--out results/gpu]

DenseNet-169 (23 classes) with seeded random weights drawn by NumPy, the same network on every
backend and device, on seeded random pixels: the speeds are real, the maps mean nothing. No
TensorFlow, h5py or download is needed. One process per backend (Keras picks its backend at
import; ``torch-compile`` is PyTorch with ``CAM_TORCH_COMPILE=1``), one after the other. Rows:
the compiled forward pass; Grad-CAM, FastAblationCAM (window 1) and ReciproCAM at each layer;
Ablation-CAM at ``relu`` only (at ``pool4_relu`` it scores 1280 ablations per image through the
last dense block). Each is the median of ``--repeats`` calls on all the images after a warm-up,
in ms per image and as a multiple of the backend's forward pass. On ``--cpu-check`` images:
the largest difference of each raw map from the same backend in a CPU process, and from the
run under ``cam.allow_tf32()``. On JAX: a head call compiled with the head's variables
against one with all the model's. Writes ``speed.md`` and ``speed.csv`` under ``--out`` after
every backend, so a run cut short keeps what it did; ``--timeout`` stops a slow process and
keeps its finished rows.

On the GPU machine (Python 3.12, JAX and PyTorch, no Keras), carry the wheels of Keras and of
the requirements it lacks there (namex, optree) in ``.whl/``; from the repository root::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT/gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from backends import ROOT, cpu_name, device_name, version  # benchmarks/backends.py

BACKENDS = {"jax": "jax", "torch": "torch", "torch-compile": "torch"}  # label -> Keras backend
METHODS = {"Grad-CAM": "GradCAM", "FastAblationCAM": "FastAblationCAM",  # name -> cam.<class>
           "ReciproCAM": "ReciproCAM", "Ablation-CAM": "AblationCAM"}
ABLATION_CAM_LAYERS = ("relu",)
CHECKS = ("device vs CPU", "TF32 vs default")
CLASSES, SEED = 23, 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="images per call (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (default 5)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--backends", default="jax,torch,torch-compile",
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default: all)")
    p.add_argument("--layers", default="relu,pool4_relu",
                   help="comma-separated target layers (default relu,pool4_relu)")
    p.add_argument("--cpu-check", type=int, default=2,
                   help="images whose maps are compared with the CPU's and TF32's (0: none)")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds each process may take (default 0: no limit)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu",
                   help="folder for speed.md and speed.csv (default results/gpu)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one process
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    if min(args.images, args.repeats) < 1 or args.timeout < 0:
        p.error("--images and --repeats must be >= 1, --timeout >= 0")
    if args.size < 32:
        p.error(f"--size must be >= 32 (DenseNet-169's smallest input), got {args.size}")
    if not 0 <= args.cpu_check <= args.images:
        p.error(f"--cpu-check must be between 0 and --images ({args.images}), got {args.cpu_check}")
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        p.error(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}; got "
                f"{', '.join(unknown) or 'none'} (TensorFlow: benchmarks/backends.py)")
    if not args.layers or len(set(args.layers)) < len(args.layers):
        p.error("--layers takes a comma-separated list of distinct layer names")
    return args


# -- one process: one backend on one device ----------------------------------------------


def build(size: int, count: int):
    """DenseNet-169 with He-normal kernels drawn by NumPy, and random images. Not
    ``keras.utils.set_random_seed``: Keras' initialisers draw other numbers on PyTorch's GPU
    than on its CPU, and that function imports TensorFlow wherever it is installed."""
    import keras
    import numpy as np

    model = keras.applications.DenseNet169(weights=None, input_shape=(size, size, 3),
                                           classes=CLASSES, classifier_activation=None)
    rng = np.random.default_rng(SEED)
    model.set_weights([rng.normal(0, np.sqrt(2 / np.prod(w.shape[:-1])), w.shape)
                       .astype("float32") if w.ndim > 1 else w for w in model.get_weights()])
    pixels = rng.integers(0, 256, (count, size, size, 3)).astype("float32")
    return model, keras.applications.densenet.preprocess_input(pixels)


def timed(fn, repeats: int, warmups: int = 1):
    """(median seconds of ``repeats`` calls after ``warmups``, the first call's seconds, the
    last result); ``fn`` must return on the host (synchronous)."""
    import numpy as np

    times = []
    for _ in range(warmups + repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmups:])), times[0], out


def worker(args) -> None:
    """Time and explain (with --reference: explain only) on this process's backend; save
    the rows, the maps and the TF32 maps next to --worker after every row."""
    import keras
    import numpy as np

    import cam
    from cam import backend as B

    name, n, k = B.name(), args.images, args.cpu_check
    model, images = build(args.size, n)
    done = {"device": device_name(name), "rows": [],
            "versions": {"python": platform.python_version(), "keras": keras.__version__,
                         name: version(name), "numpy": np.__version__, "cam": cam.__version__}}
    maps, tf32 = {}, {}

    def save():  # written whole, then renamed: a process stopped by --timeout leaves no half
        done["tensorflow imported"] = sys.modules.get("tensorflow") is not None
        for suffix, arrays in ((".npz", maps), (".tf32.npz", tf32)):
            with open(part := f"{args.worker.with_suffix(suffix)}.part", "wb") as stream:
                np.savez(stream, **arrays)
            os.replace(part, args.worker.with_suffix(suffix))
        Path(part := f"{args.worker}.part").write_text(json.dumps(done))
        os.replace(part, args.worker)

    if not args.reference:
        forward = B.compiled(lambda x: model(x, training=False), model.variables)
        # three warm-ups: a process's first calls are slow (PyTorch on a CPU: 10x, twice)
        seconds, first, _ = timed(lambda: B.numpy(forward(B.tensor(images))), args.repeats, 3)
        done["rows"].append({"method": "forward", "layer": "", "ms/image": 1000 * seconds / n,
                             "first call s": first})
        if name == "jax":  # early: a run cut short by --timeout still has it
            done["variables"] = variables_overhead(model, images, args.repeats)
        save()
    for layer in args.layers:
        for method, kind in METHODS.items():
            if method == "Ablation-CAM" and layer not in ABLATION_CAM_LAYERS:
                continue
            explainer, key = getattr(cam, kind)(model, layer), f"{method} @ {layer}"
            if args.reference:
                maps[key] = explainer.explain(images[:k], upsample=False, normalize=False).raw
                save()
                continue
            before = scoring_calls(explainer)
            seconds, first, out = timed(lambda: explainer.explain(
                images, upsample=False, normalize=False), args.repeats)
            done["rows"].append({
                "method": method, "layer": layer, "ms/image": 1000 * seconds / n,
                "first call s": first, "rows/call": getattr(explainer, "batch_size", ""),
                "calls/explain": (scoring_calls(explainer) - before) // (args.repeats + 1)})
            maps[key] = out.raw[:k]
            if k:  # the same call, only the precision differs
                with cam.allow_tf32():
                    tf32[key] = explainer.explain(images, upsample=False,
                                                  normalize=False).raw[:k]
            save()


def scoring_calls(explainer) -> int:
    """Calls so far of the explainer's compiled scoring (Grad-CAM: gradient) function, which
    explainers of one kind at this layer share."""
    return explainer.scorer.calls


def variables_overhead(model, images, repeats: int) -> list:
    """One head call on FastAblationCAM's rows at relu (one compiled call's worth), compiled
    with the head's variables and with all the model's: JAX passes them in on every call."""
    from keras import ops

    import cam
    from cam import backend as B

    explainer = cam.FastAblationCAM(model, "relu", window=1)
    features = explainer.features(images)
    h, w = explainer.split.target_shape[:2]
    count = min(explainer.batch_size, len(images) * h * w)
    index = ops.arange(count) % len(images)
    rows = [ops.take(t, index, axis=0) for t in (features.activation, *features.bypass)]
    out = []
    for part in ("head", "full"):
        variables = explainer.split.variables(part)
        head = B.compiled(lambda a, *b: explainer.split.head(a, list(b)), variables)
        seconds, first, _ = timed(lambda: B.numpy(head(*rows)), repeats)
        out.append({"variables": f"{part} ({len(variables)})", "rows": count,
                    "ms/call": 1000 * seconds, "first call s": first})
    return out


# -- the parent: start the processes, compare, write the tables --------------------------


def start(args, label: str, folder: str, reference: bool = False):
    """Start a worker process: (process, its JSON path, its log path)."""
    out = Path(folder) / f"{label}{'-cpu' if reference else ''}.json"
    env = {**os.environ, "KERAS_BACKEND": BACKENDS[label], "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("CAM_TORCH_COMPILE", None)
    if label == "torch-compile":
        env["CAM_TORCH_COMPILE"] = "1"
    if reference:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, __file__, "--worker", str(out), "--label", label,
               "--images", str(args.images), "--repeats", str(args.repeats), "--size",
               str(args.size), "--layers", ",".join(args.layers), "--cpu-check",
               str(args.cpu_check)] + (["--reference"] if reference else [])
    with open(log := out.with_suffix(".log"), "w") as stream:
        return subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT), out, log


def finish(job, timeout: float, what: str):
    """The worker's rows and maps ("stopped": cut short by the timeout), or None."""
    import numpy as np

    process, out, log = job
    stopped = False
    try:
        process.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        stopped = True
        print(f"{what}: stopped by --timeout", flush=True)
    if not out.exists() or not (stopped or process.returncode == 0):
        print(f"{what}: no row finished" if stopped else
              f"{what} failed (exit {process.returncode}):\n{log.read_text()[-4000:]}", flush=True)
        return None
    result = {**json.loads(out.read_text()), "stopped": stopped}
    for kind, suffix in (("maps", ".npz"), ("tf32", ".tf32.npz")):
        with np.load(out.with_suffix(suffix)) as data:
            result[kind] = {key: data[key] for key in data.files}
    return result


def markdown(rows: list) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |"
                        for r in rows])


def write(args, results: dict, references: dict) -> str:
    """speed.md and speed.csv from the backends done so far; returns the markdown."""
    import numpy as np

    def relative(a, b) -> str:  # largest |a - b| relative to the largest |b|
        return f"{np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30):.1e}"

    rows, variables, devices, versions = [], [], {}, {}
    for label, result in results.items():
        devices[label], versions = result["device"], {**versions, **result["versions"]}
        forward, cpu = result["rows"][0]["ms/image"], references.get(BACKENDS[label], {})
        for row in result["rows"]:
            rows.append({"backend": label, "device": result["device"], "method": row["method"],
                         "layer": row["layer"], "ms/image": row["ms/image"],
                         "x forward": row["ms/image"] / forward, **row})
            key = f"{row['method']} @ {row['layer']}"
            if key in result["maps"] and args.cpu_check:
                rows[-1][CHECKS[0]] = (
                    "n/a (same device)" if result["device"] == "CPU" else
                    relative(result["maps"][key], cpu["maps"][key])
                    if key in cpu.get("maps", {}) else "no CPU run")
                rows[-1][CHECKS[1]] = relative(result["tf32"][key], result["maps"][key])
        variables += [{"backend": label, **v} for v in result.get("variables", [])]
    budget = os.environ.get("CAM_MEMORY_BUDGET")
    stopped = [b for b, r in results.items() if r["stopped"]]
    text = (f"# cam on {', '.join(sorted(set(devices.values())))}\n\n"
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_name()}, "
            f"{os.cpu_count()} logical CPUs; devices: "
            f"{', '.join(f'{b}: {d}' for b, d in devices.items())}; "
            f"{', '.join(f'{k} {v}' for k, v in versions.items())}.\n\n"
            f"DenseNet-169, {args.size}x{args.size}, {CLASSES} classes. **Weights and images are "
            f"random** (seeded): the speeds are real, the maps mean nothing. {args.images} "
            f"images per call; median of {args.repeats} calls after a warm-up (`first call s`: "
            f"the warm-up, compiling what the row is the first to need). `rows/call`: ablated copies per compiled call "
            f"({'CAM_MEMORY_BUDGET=' + budget if budget else 'the default memory budget'}); "
            f"`calls/explain`: compiled scoring (Grad-CAM: gradient) calls per explain call."
            + (f" **Stopped by --timeout {args.timeout:g} s, later rows missing: "
               f"{', '.join(stopped)}.**" if stopped else "")
            + "\n\n## Speed\n\n" + markdown([{k: v for k, v in r.items() if k not in CHECKS}
                                              for r in rows]))
    if any(CHECKS[0] in r for r in rows):
        text += (f"\n\n## Maps: device vs CPU, TF32 vs default\n\nLargest |difference| of the "
                 f"raw maps of the first {args.cpu_check} images, relative to the map's largest "
                 f"|value|. Device vs CPU: both at full float32 precision (the default); the CPU "
                 f"process runs the same backend (compiled PyTorch: eager) on those images "
                 f"alone, so a method that amplifies rounding (Ablation-CAM's (y - y_k) / y) "
                 f"also shows the change of batch. TF32: the device's same call under "
                 f"`cam.allow_tf32()` (no effect on a CPU).\n\n"
                 + markdown([{k: r[k] for k in ("backend", "method", "layer", *CHECKS)}
                             for r in rows if CHECKS[0] in r]))
    if variables:
        text += ("\n\n## JAX: variables passed per call\n\nOne compiled head call on "
                 "FastAblationCAM's rows at `relu`, given the head's variables or all the "
                 "model's (JAX passes them as arguments on every call).\n\n" + markdown(variables))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text(text + "\n")
    with open(args.out / "speed.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, list(dict.fromkeys(c for r in rows for c in r)))
        writer.writeheader()
        writer.writerows(rows)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results, references = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for label in args.backends:  # one at a time: the timings must not share the machine
            print(f"{label}: running", flush=True)
            if result := finish(start(args, label, folder), args.timeout, label):
                if result.pop("tensorflow imported"):
                    print(f"warning: {label} imported TensorFlow", flush=True)
                results[label] = result
                write(args, results, references)
        needed = sorted({BACKENDS[b] for b, r in results.items() if r["device"] != "CPU"})
        if args.cpu_check and needed:  # maps only, no timing: side by side
            print(f"CPU references ({', '.join(needed)}): running", flush=True)
            jobs = {b: start(args, b, folder, reference=True) for b in needed}
            deadline = time.monotonic() + args.timeout
            for b, job in jobs.items():
                left = max(1.0, deadline - time.monotonic()) if args.timeout else 0
                if reference := finish(job, left, f"{b} on the CPU"):
                    references[b] = reference
    if not results:
        raise SystemExit("no backend finished")
    print(write(args, results, references))
    print(f"\nwrote {args.out / 'speed.md'} and speed.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
