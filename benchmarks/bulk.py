"""Throughput of `cam.bulk` on POLEN23E against a plain `model.predict` loop over the same files.

    python benchmarks/bulk.py [--limit N] [--rows predict,gradcam,...] [--gpu auto|no]
                              [--out results/bulk/throughput.md]

The study's DenseNet-169 checkpoint at 224 px, layer ``relu``, on every POLEN23E image
($POLEN23E_DIR, else data/polen23e; ``--limit N`` takes N spread over the classes). One row
per run, each in a fresh process, with the model loaded before the clock starts (``load s``)
and everything after it timed: tracing, decoding, explaining, writing. Rows:

* ``predict``: what a user writes without cam: decode each file (``cam.images.read_rgb``), make
  it the model's input the way ``cam.bulk`` does (``fit_to_input``) and call ``model.predict``
  per batch of the size ``cam.bulk`` picks; decode included. It runs first and again last
  (``predict-after``; ``--no-bracket`` leaves that out), and the ratios are to the mean of the
  two, so that a change in what else the machine runs shows instead of skewing one side;
* ``gradcam``, ``fastablationcam``, ``ablationcam``, ``all``: ``cam.bulk`` with the local
  engine and those methods (``all``: the three on one trunk pass per batch);
* ``ray``: ``cam.bulk(..., engine="ray")`` with FastAblationCAM on a local Ray instance with
  2 CPUs (one explaining actor); Ray's own start (``ray.init``) is timed apart (``ray start
  s``) and left out of images/s, as on a cluster that is already up;
* ``gpu-predict``, ``gpu``: the predict loop and FastAblationCAM on JAX, added when JAX sees a
  GPU (``--gpu auto``).

Goals (issue 27): the local engine with FastAblationCAM at >= 0.8x the predict loop's images
per second, the Ray engine on one machine at >= 0.6x. Writes the table, the machine, the
load average at the end of each row (the machine may be shared) and the commit to ``--out``.
Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYER, IMAGE_SIZE = "relu", 224
WORK = ROOT / "build" / "bench-bulk"
ALL = ["gradcam", "fastablationcam", "ablationcam"]
#: row -> (engine, methods, Keras backend)
ROWS = {
    "predict": ("model.predict loop", [], "tensorflow"),
    "predict-after": ("model.predict loop, again last", [], "tensorflow"),
    "gradcam": ("local", ["gradcam"], "tensorflow"),
    "fastablationcam": ("local", ["fastablationcam"], "tensorflow"),
    "ablationcam": ("local", ["ablationcam"], "tensorflow"),
    "all": ("local", ALL, "tensorflow"),
    "ray": ("ray (local, 2 CPUs)", ["fastablationcam"], "tensorflow"),
    "gpu-predict": ("model.predict loop (JAX, GPU)", [], "jax"),
    "gpu": ("local (JAX, GPU)", ["fastablationcam"], "jax"),
}
GOALS = [("fastablationcam", "predict", 0.8), ("ray", "predict", 0.6), ("gpu", "gpu-predict", 0.8)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predict_loop(model, folder: Path, batch: int) -> dict:
    """Decode, preprocess and ``model.predict`` every image of ``folder``, ``batch`` at a time."""
    import numpy as np

    from cam import bulk
    from cam.images import fit_to_input, read_rgb

    _, sources = bulk.list_inputs(folder)
    decode = predict = 0.0
    start = time.perf_counter()
    for i in range(0, len(sources), batch):
        t = time.perf_counter()
        images = np.stack([fit_to_input(read_rgb(s.file), IMAGE_SIZE, IMAGE_SIZE, 3)
                           for s in sources[i:i + batch]]).astype(np.float32)
        decode += time.perf_counter() - t
        t = time.perf_counter()
        model.predict(images, batch_size=len(images), verbose=0)
        predict += time.perf_counter() - t
    wall = time.perf_counter() - start
    return {"images": len(sources), "wall s": wall, "images/s": len(sources) / wall,
            "decode s": decode, "explain s": predict, "write s": 0.0}


def worker(row: str, folder: Path, out: Path) -> dict:
    """One row in this process: load the model, then time the run."""
    import cam
    from cam import bulk
    from cam.study import models

    engine, methods, _ = ROWS[row]
    start = time.perf_counter()
    stem, model_dir = models.study_checkpoint("polen23e", 0)
    model, _ = models.load_checkpoint(stem, model_dir, image_size=IMAGE_SIZE)
    batch = bulk.BatchExplainer(model, LAYER, {"fastablationcam": {}}).batch_size()
    result = {"row": row, "engine": engine, "methods": ", ".join(methods) or "(none)",
              "batch": batch, "load s": time.perf_counter() - start}
    if not methods:
        result.update(predict_loop(model, folder, batch))
    else:
        ray_start = None
        if engine.startswith("ray"):
            import ray

            temporary = tempfile.mkdtemp(prefix="cam-ray-")  # short: Ray's sockets live here
            t = time.perf_counter()
            ray.init(num_cpus=2, _temp_dir=temporary, include_dashboard=False,
                     log_to_driver=False)
            ray_start = time.perf_counter() - t
        try:
            summary = cam.bulk(model, folder, out, layer=LAYER, methods=methods, overwrite=True,
                               engine="ray" if ray_start is not None else "local",
                               progress=False)
        finally:
            if ray_start is not None:
                ray.shutdown()
                shutil.rmtree(temporary, ignore_errors=True)
        if summary.failed or summary.explained != summary.listed:
            raise RuntimeError(f"{row}: {summary}")
        result.update({"images": summary.explained, "wall s": summary.seconds,
                       "images/s": summary.images_per_second,
                       **{f"{k} s": v for k, v in summary.stages.items()},
                       "rows": summary.rows})
        if ray_start is not None:
            result["ray start s"] = ray_start
    result["peak MB"] = peak_mb()
    return result


def jax_gpus() -> int:
    """GPUs that JAX sees, asked in a subprocess (0 without JAX)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(sum(d.platform == 'gpu' "
                          "for d in jax.devices()))"], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": ""})
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def chosen_files(limit: int) -> list[str]:
    """The fold table's files: all, or ``limit`` spread evenly over it (every class)."""
    from cam.study import datasets

    files = datasets.open_dataset("polen23e").folds["file"].tolist()
    if limit and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
        memory = next(int(line.split()[1]) for line in open("/proc/meminfo")
                      if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        memory = float("nan")
    return f"{cpu}, {os.cpu_count()} logical CPUs, {memory:.0f} GB RAM, {platform.platform()}"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "cam").strip()
    return head + (" with uncommitted changes in cam/ (the library as it stood in the working "
                   "tree)" if dirty else "")


def markdown(rows: list[dict], args, before, gpus: int, files: int) -> str:
    import pandas as pd

    table = pd.DataFrame(rows).set_index("row")
    base = {r: table.loc[r, "images/s"] for r in ("predict", "gpu-predict") if r in table.index}
    if "predict-after" in table.index:  # the baseline bracketing the other rows
        base["predict"] = (base["predict"] + table.loc["predict-after", "images/s"]) / 2
    table["x predict"] = [row["images/s"] / base[("gpu-predict" if r.startswith("gpu")
                                                   else "predict")]
                          if ("gpu-predict" if r.startswith("gpu") else "predict") in base
                          else float("nan") for r, row in table.iterrows()]
    columns = ["engine", "methods", "images", "batch", "wall s", "images/s", "x predict",
               "decode s", "explain s", "write s", "ray start s", "load s", "peak MB",
               "load average"]
    shown = table.reindex(columns=columns).round(
        {"wall s": 1, "images/s": 2, "x predict": 2, "decode s": 1, "explain s": 1,
         "write s": 1, "ray start s": 1, "load s": 1, "peak MB": 0, "load average": 1})
    shown = shown.astype(object).where(shown.notna(), "")
    goals = []
    for row, against, share in GOALS:
        if row in table.index and against in table.index:
            ratio = table.loc[row, "x predict"]
            goals.append(f"- **{row}** at {ratio:.2f}x the {against} loop's images/s (goal >= "
                         f"{share}x): **{'met' if ratio >= share else 'missed'}**")
    scope = (f"all {files} POLEN23E images" if not args.limit
             else f"**{files} of the 805 POLEN23E images** (`--limit {args.limit}`, spread "
                  f"over the classes), not all 805")
    gpu = (f"{gpus} GPU(s) seen by JAX: the gpu rows run FastAblationCAM on JAX" if gpus
           else "no GPU on this machine (JAX sees none): no GPU row; on a machine with one, "
                "`--gpu auto` adds the predict loop and FastAblationCAM on JAX")
    return "\n".join([
        "# cam.bulk throughput",
        "",
        f"`python benchmarks/bulk.py{' --limit ' + str(args.limit) if args.limit else ''}` "
        f"on {scope}: the study's DenseNet-169 checkpoint at {IMAGE_SIZE} px, layer "
        f"`{LAYER}`, explaining each image's predicted class (logit). Each row is a fresh "
        f"process; the model is loaded before the clock starts (`load s`), and tracing, "
        f"decoding, explaining and writing are timed. `decode s`, `explain s` and `write s` "
        f"are the Summary's busy seconds per stage (decoding summed over its threads or Ray "
        f"tasks, so it can exceed the wall time); for the predict loop they are its decode "
        f"and predict time. The Ray row's wall time leaves out Ray's own start (`ray start "
        f"s`, as on a cluster already up) but includes shipping the model to its actor and "
        f"loading it there; its `peak MB` is the driver's only. `x predict` is images/s over "
        f"the predict loop's{' (the mean of its runs first and last)' if 'predict-after' in table.index else ''}"
        f"; `load average` is the machine's 1-minute load average as the row ended.",
        "",
        f"- Machine: {machine()}; Keras backend TensorFlow; {gpu}.",
        f"- Contention: the machine was shared with other people's jobs; load average (1 min) "
        f"{before:.1f} before the run and {table['load average'].min():.1f} to "
        f"{table['load average'].max():.1f} as its rows ended, on {os.cpu_count()} CPUs: "
        f"absolute numbers are pessimistic (an idle run is faster), and the ratios between rows "
        f"carry the contention's changes from row to row.",
        f"- Commit: {commit()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        shown.to_markdown(),
        "",
        "Goals (issue 27):",
        "",
        *goals,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=0,
                   help="explain only N images spread over the classes (default: all 805)")
    p.add_argument("--rows", default="predict,gradcam,fastablationcam,ablationcam,all,ray",
                   help="rows to run (default %(default)s)")
    p.add_argument("--no-bracket", action="store_true",
                   help="leave out the second predict loop run last (predict-after)")
    p.add_argument("--gpu", choices=("auto", "no"), default="auto",
                   help="add the JAX GPU rows when JAX sees a GPU (default auto)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bulk" / "throughput.md")
    p.add_argument("--worker", nargs=3, metavar=("ROW", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        row, folder, out = args.worker
        print("RESULT " + json.dumps(worker(row, Path(folder), Path(out))), flush=True)
        return 0

    import pandas as pd

    from cam.study import atlas, datasets

    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    gpus = jax_gpus() if args.gpu == "auto" else 0
    if gpus:
        names += [r for r in ("gpu-predict", "gpu") if r not in names]
    if "predict" in names and "predict-after" not in names and not args.no_bracket:
        names.append("predict-after")
    files = chosen_files(args.limit)
    folder = atlas.link_images(datasets.open_dataset("polen23e").root, files, WORK / "images")
    before = os.getloadavg()[0]
    print(f"{len(files)} images, rows {', '.join(names)}; load average {before:.1f}", flush=True)
    rows = []
    for row in names:
        env = {**os.environ, "KERAS_BACKEND": ROWS[row][2], "TF_CPP_MIN_LOG_LEVEL": "3"}
        started = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--worker", row, str(folder),
                              str(WORK / f"out-{row}")], env=env, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            raise RuntimeError(f"row {row} failed:\n{run.stderr[-3000:]}")
        rows.append({**json.loads(lines[-1].removeprefix("RESULT ")),
                     "load average": os.getloadavg()[0]})
        print(f"{row}: {rows[-1]['images/s']:.2f} images/s ({rows[-1]['wall s']:.0f} s timed, "
              f"{time.perf_counter() - started:.0f} s with start-up; load average "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    text = markdown(rows, args, before, gpus, len(files))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    pd.DataFrame(rows).to_csv(args.out.with_suffix(".csv"), index=False)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
