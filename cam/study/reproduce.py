"""Run the study's notebooks in order with papermill: ``make reproduce``, ``make demo``, CI.

    python -m cam.study.reproduce polen23e                  # the study: results/polen23e
    python -m cam.study.reproduce synthetic                 # the offline demo: results/synthetic
    python -m cam.study.reproduce polen23e --only 04 05     # some notebooks
    python -m cam.study.reproduce synthetic --small --prepare-only --out build/ci-notebooks/synthetic

Each notebook gets ``dataset`` and the parameters below that it declares (papermill would
warn about the others), runs with a progress bar over its cells while its printed output
streams to the terminal, and its executed copy goes to ``<out>/notebooks/`` (committed: its
figures are downscaled to at most 800 px wide, photographs stored as JPEG, and papermill's
timestamps are dropped, so it stays small and its diffs readable); its figures and tables go
to ``<out>/figures`` and ``<out>/tables``. The wall time and the kernel's peak memory of each
notebook are added to ``<out>/tables/00-wall-times.csv`` and ``.md``. A failing notebook
stops the run with its name and the error, and the run exits non-zero; its partial copy is
in ``<out>/executed/`` (git-ignored). With several notebooks each runs in its own process,
so that each peak is its own kernel's; ``make reproduce`` runs one per process anyway, only
those whose inputs changed (see the Makefile).

``--small`` uses the CI parameters (a few images, small sizes, one timed call); with
``--prepare-only`` the notebooks are only parameterised (into ``<out>/notebooks/``), for
``pytest --nbval-lax`` to run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from . import paths

#: The study's parameters per dataset, on top of each notebook's defaults.
STUDY = {
    "polen23e": {},
    "synthetic": {"architecture": "small_cnn", "train_size": 128, "image_size": 128,
                  "epochs": 15},
}
#: Caps shared by the later notebooks in CI: a few images, one timed call, small samples.
SMALL_COST = {"max_images": 4, "repeats": 1, "budget_s": 1.0, "sample_masks": 8,
              "steps": 4, "sanity_images": 2}
#: CI parameters: the synthetic stand-in at 64 px with a small CNN trained on the spot, and
#: one held-out POLEN23E image per class with the committed checkpoint.
SMALL = {
    "synthetic": {"image_size": 64, "train_size": 64, "epochs": 10, "architecture": "small_cnn",
                  "mode": "train", "batch_size": 16, "samples_per_class": 2, "thumb_size": 48,
                  **SMALL_COST},
    "polen23e": {"mode": "load", "held_out_per_class": 1, "samples_per_class": 1,
                 "thumb_size": 48, "batch_size": 8, **SMALL_COST},
}


#: CI overrides for single notebooks, keyed by (dataset, the name's number: "04", "A03"). On
#: POLEN23E, where every new explainer traces DenseNet-169
#: (seconds each): the speed study at the last layer only, with two windows and two batch
#: sizes (one extrapolated, one the main table's row); the layer x
#: window sweep with two windows (window 1 and a larger one still cover every code path; the
#: four windows took 523 s of `make test`), as the notebook's smoke run (max_images below
#: sweep_images: the last two layers, a bypassed convolution and the last feature map, on two
#: images) at 112 px (a 3x3 grid at `relu`, a quarter of the pixels), with max_evaluations 4 so
#: that the costly-setting path runs too (five layers at 224 px took 193 s).
SMALL_NOTEBOOK = {("polen23e", "04"): {"layers": ["relu"], "windows": [1, 2],
                                       "batch_sizes": [1, 2048]},
                  ("polen23e", "06"): {"windows": [1, 2], "image_size": 112, "max_images": 2,
                                       "max_evaluations": 4},
                  # Score-CAM and Occlusion (a whole-network pass per mask) on 2 images with
                  # 4 masks each; ROAD on 2 images at one fraction.
                  ("polen23e", "03"): {"costly_images": 2, "scorecam_channels": 4,
                                       "occlusion_window": 112},
                  ("polen23e", "05"): {"road_images": 2, "costly_images": 2, "road_fractions": [0.5],
                                       "scorecam_channels": 4, "occlusion_window": 112},
                  # The detector appendix at 64 px (a 16x16 grid): 32 scenes, 1 epoch, the
                  # detections of 2 scenes explained (FastAblationCAM's 256 cells in pairs).
                  ("synthetic", "A03"): {"scene_size": 64, "train_scenes": 32, "test_scenes": 4,
                                         "det_epochs": 1, "max_images": 2, "figure_rows": 2,
                                         "window": 2}}


#: How each notebook's kernel starts (ipykernel options), so that an executed copy holds what
#: its cells print and nothing else. Output that C and C++ libraries write straight to the
#: process's stderr goes to the terminal that runs the notebooks, not into a cell: TensorFlow's
#: start-up log (the oneDNN and CUDA notices, which $TF_CPP_MIN_LOG_LEVEL cannot hide because
#: they come before absl's logging is set up, and on a machine without a GPU the "failed call
#: to cuInit" error). And TensorFlow's warning that a Python function "triggered tf.function
#: retracing" is dropped, its other warnings kept: TensorFlow counts traces per Python
#: function, and cam.backend builds a tf.function per explainer from one function, so every
#: notebook that builds a few explainers would get it for traces that are expected.
KERNEL_ARGUMENTS = [
    "--IPKernelApp.capture_fd_output=False",
    "--IPKernelApp.exec_lines=import logging; logging.getLogger('tensorflow').addFilter("
    "lambda record: 'triggered tf.function retracing' not in record.getMessage())",
]


#: Notebook 09 (the atlas) in CI: two images of each class (46 on POLEN23E) in one batch (a
#: second batch size would trace every explainer again), two images in each figure.
SMALL_NOTEBOOK.update({
    (name, "09"): {"images_per_class": 2, "batch_size": 64, "most_disagreeing": 2,
                   "max_misclassified": 2} for name in ("polen23e", "synthetic")})


def notebooks(dataset: str, only=()) -> list[Path]:
    """The notebooks to run in order: 01-... always, A01-... (appendix) on the synthetic data."""
    found = sorted(paths.NOTEBOOKS_DIR.glob("0*.ipynb"))
    if dataset == "synthetic":
        found += sorted(paths.NOTEBOOKS_DIR.glob("A*.ipynb"))
    if only:
        missing = [o for o in only if not any(nb.name.startswith(o) for nb in found)]
        if missing:
            raise SystemExit(f"error: no notebook starts with {', '.join(missing)}; the "
                             f"{dataset} notebooks are {', '.join(nb.stem for nb in found)}")
        found = [nb for nb in found if any(nb.name.startswith(o) for o in only)]
    return found


def parameters_for(notebook: Path, dataset: str, out: Path, small: bool) -> dict:
    """``dataset``, ``output_dir`` and the study's (or CI's) values that ``notebook`` declares.
    ``output_dir`` is relative to the repository root when ``out`` is inside it (the executed
    copies name no machine's folders; ``paths.Results`` resolves it), else absolute."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    wanted = {"dataset": dataset, "output_dir": paths.relative(out),
              **(SMALL if small else STUDY)[dataset]}
    if small:
        wanted.update(SMALL_NOTEBOOK.get((dataset, notebook.name.split("-")[0]), {}))
    return {k: v for k, v in wanted.items() if k in declared}


def ensure_polen23e() -> Path:
    """$POLEN23E_DIR or data/polen23e; else download it; else stop saying what to do."""
    from . import download

    try:
        root = paths.polen23e_dir()
    except FileNotFoundError as error:  # $POLEN23E_DIR set but wrong
        raise SystemExit(f"error: {error}") from None
    if root is not None:
        return root
    print(f"POLEN23E not found in ${paths.POLEN23E_ENV} or {paths.POLEN23E_DEFAULT_DIR}; "
          f"downloading it from figshare ({download.POLEN23E_URL})", flush=True)
    try:
        download.download_polen23e(paths.POLEN23E_DEFAULT_DIR, download.POLEN23E_URL)
    except (RuntimeError, OSError) as error:
        raise SystemExit(
            f"error: POLEN23E is not available and the download failed ({error}).\n"
            f"Do one of these, then run `make reproduce` again:\n"
            f"  - export {paths.POLEN23E_ENV}=/path/to/polen23e  (a folder with one subfolder "
            f"per class, 805 images)\n"
            f"  - download {download.POLEN23E_URL} by hand and unpack it into "
            f"{paths.POLEN23E_DEFAULT_DIR}\n"
            f"  - or run `make demo` for the same study on the offline synthetic stand-in"
        ) from None
    return paths.POLEN23E_DEFAULT_DIR


#: Embedded figures in the committed executed notebooks are downscaled to this width at most.
MAX_FIGURE_WIDTH = 800
#: A figure goes in with at most 256 colours when that is at most this share of its size.
PALETTE_SHARE = 0.6
#: A figure goes in as a JPEG when that is at most this share of its smallest PNG: photographs
#: (micrographs, overlays) do; a chart's lines and text make a PNG the smaller.
JPEG_SHARE = 0.8


def _png_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True, **kwargs)
    return buffer.getvalue()


def _fitted(data: bytes, max_width: int):
    """``data`` (a PNG) decoded, at most ``max_width`` pixels wide."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    if image.width > max_width:
        image = image.resize((max_width, max(1, round(image.height * max_width / image.width))),
                             Image.Resampling.LANCZOS)
    return image


def shrink_png(data: bytes, max_width: int = MAX_FIGURE_WIDTH) -> bytes:
    """``data`` (a PNG) at most ``max_width`` pixels wide, saved optimised, with a 256-colour
    palette when that is clearly smaller; ``data`` itself when nothing is smaller."""
    from PIL import Image

    image = _fitted(data, max_width)
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        image = image.convert("RGBA")
    best = _png_bytes(image)
    if image.mode != "P":
        if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema()[0] < 255:
            palette = image.convert("RGBA").quantize(256, method=Image.Quantize.FASTOCTREE)
        else:  # opaque (matplotlib's white background): median cut keeps colours best
            palette = image.convert("RGB").quantize(256)
        small = _png_bytes(palette)
        if len(small) <= PALETTE_SHARE * len(best):
            best = small
    return best if len(best) < len(data) else data


def shrink_figure(data: bytes, max_width: int = MAX_FIGURE_WIDTH) -> tuple[str, bytes]:
    """(MIME type, bytes) of ``data`` (a PNG) at most ``max_width`` pixels wide: the
    :func:`shrink_png` copy, or a JPEG (``cam.plot.JPEG_QUALITY``) when that is at most
    ``JPEG_SHARE`` of it and the figure has no transparency."""
    from ..plot import JPEG_QUALITY

    png = shrink_png(data, max_width)
    image = _fitted(data, max_width).convert("RGBA")
    if image.getchannel("A").getextrema()[0] < 255:
        return "image/png", png
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    jpeg = buffer.getvalue()
    return ("image/jpeg", jpeg) if len(jpeg) <= JPEG_SHARE * len(png) else ("image/png", png)


def shrink_notebook(source: Path, target: Path) -> tuple[int, int]:
    """Write ``source`` (an executed notebook) to ``target`` with its PNG outputs shrunk by
    ``shrink_figure``, its progress bars dropped (``drop_progress_bars``) and papermill's and
    nbclient's timestamps dropped (the other outputs are kept); returns the sizes in bytes
    before and after."""
    import nbformat

    book = nbformat.read(str(source), as_version=4)
    drop_progress_bars(book)
    for cell in book.cells:
        cell.metadata.pop("execution", None)  # nbclient's per-message timestamps
        if "id" in cell and "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = "injected-parameters"  # papermill draws a new random id every run
        _drop_times(cell.metadata.get("papermill"))
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                mime, image = shrink_figure(base64.b64decode(data.pop("image/png")))
                data[mime] = base64.b64encode(image).decode("ascii")
    meta = book.metadata.get("papermill")
    if meta is not None:  # paths relative to the repository: the same on every checkout
        _drop_times(meta)
        if meta.get("input_path"):
            meta["input_path"] = paths.relative(meta["input_path"])
        meta["output_path"] = paths.relative(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(book, str(target))
    return source.stat().st_size, target.stat().st_size


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: tqdm's progress bar in a notebook (``tqdm.auto`` with ipywidgets): an HBox of these.
PROGRESS_BAR = ["HTMLModel", "FloatProgressModel", "HTMLModel"]


def drop_progress_bars(book) -> None:
    """Drop tqdm's progress bars from ``book`` (a notebook): their outputs, and their widget
    models from its saved widget state. A bar is transient (most close when done), and its
    saved state would show it stopped at its last refresh; other widgets are kept."""
    widgets = book.metadata.get("widgets", {})
    state = widgets.get(WIDGET_STATE, {}).get("state", {})

    def refs(model_id):
        text = json.dumps(state.get(model_id, {}).get("state", {}))
        return re.findall(r"IPY_MODEL_(\w+)", text)

    def is_bar(model_id):
        model = state.get(model_id, {})
        children = [c.removeprefix("IPY_MODEL_") for c in model.get("state", {}).get("children", [])]
        return (model.get("model_name") == "HBoxModel"
                and [state.get(c, {}).get("model_name") for c in children] == PROGRESS_BAR)

    dropped = set()
    for cell in book.cells:
        kept = []
        for output in cell.get("outputs", []):
            model_id = output.get("data", {}).get(WIDGET_VIEW, {}).get("model_id")
            if model_id and is_bar(model_id):
                dropped.add(model_id)
            else:
                kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    todo = list(dropped)
    while todo:  # the bar and the models only it refers to: its parts, their layouts, styles
        model_id = todo.pop()
        todo += refs(model_id)
        state.pop(model_id, None)
    if widgets and not state:
        del book.metadata["widgets"]


def _drop_times(meta) -> None:
    if meta:
        meta.pop("start_time", None)
        meta.pop("end_time", None)
        if isinstance(meta.get("duration"), (int, float)):
            meta["duration"] = round(meta["duration"])


def children_peak_mb() -> float | None:
    """The largest peak resident memory of this process's finished children (the notebook
    kernels papermill started) in MB (2**20 bytes); None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def record_wall_time(tables: Path, notebook: str, seconds: float, dataset: str,
                     peak_mb: float | None = None) -> None:
    """Add or replace ``notebook``'s row in ``00-wall-times.csv`` / ``.md``, with its kernel's
    peak memory ``peak_mb`` (blank when unknown); the other notebooks' rows are kept."""
    csv = tables / "00-wall-times.csv"
    columns = ["notebook", "dataset", "seconds", "peak MB", "finished"]
    frame = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=columns)
    frame = frame.reindex(columns=columns)  # rows from before the peak column get a blank
    frame = frame[frame["notebook"] != notebook]
    row = {"notebook": notebook, "dataset": dataset, "seconds": round(seconds, 1),
           "peak MB": None if peak_mb is None else round(peak_mb),
           "finished": time.strftime("%Y-%m-%d %H:%M")}
    frame = pd.concat([frame.astype(object), pd.DataFrame([row], dtype=object)],
                      ignore_index=True).sort_values("notebook")
    frame["seconds"] = frame["seconds"].astype(float)
    frame["peak MB"] = pd.to_numeric(frame["peak MB"]).astype("Int64")
    frame.to_csv(csv, index=False)
    total = frame["seconds"].sum()
    footer = f"Total: {total:.0f} s ({total / 60:.1f} min)"
    if frame["peak MB"].notna().any():
        top = frame.loc[frame["peak MB"].idxmax()]
        unknown = int(frame["peak MB"].isna().sum())
        footer += (f"; peak memory {top['peak MB'] / 1024:.1f} GB ({top['notebook']}"
                   + (f"; not measured for {unknown}" if unknown else "") + ")")
    table = frame.astype(object).where(frame.notna(), "")  # tabulate leaves "" cells blank
    (tables / "00-wall-times.md").write_text(
        table.to_markdown(index=False) + f"\n\n{footer}.\n")


def run(dataset: str, out: Path, small: bool = False, prepare_only: bool = False,
        only=()) -> list[tuple[str, float]]:
    """Run (or prepare) the notebooks for ``dataset`` into ``out``; returns their wall times.

    Each notebook runs into ``<out>/executed/`` (git-ignored), and once it has run through is
    written shrunk (``shrink_notebook``) to ``<out>/notebooks/``, the copy that is committed
    and that Make compares with the notebook's inputs; a failed run leaves the partial copy in
    ``executed/`` and the committed one untouched. ``prepare_only`` writes the parameterised
    notebooks straight to ``<out>/notebooks/``."""
    import papermill

    if dataset not in STUDY:
        raise SystemExit(f"error: dataset must be one of {', '.join(STUDY)}, not {dataset!r}")
    todo = notebooks(dataset, only)
    if dataset == "polen23e":
        ensure_polen23e()
    executed, committed = out / "executed", out / "notebooks"
    committed.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    if not prepare_only:
        executed.mkdir(parents=True, exist_ok=True)
    times = []
    for i, notebook in enumerate(todo, 1):
        params = parameters_for(notebook, dataset, out, small)
        target = committed / notebook.name
        partial = target if prepare_only else executed / notebook.name
        print(f"[{i}/{len(todo)}] {notebook.name} -> {target}  "
              f"({', '.join(f'{k}={v!r}' for k, v in params.items())})", flush=True)
        peak_before = children_peak_mb()
        started, start = time.time(), time.perf_counter()
        try:
            papermill.execute_notebook(str(notebook), str(partial), parameters=params,
                                       prepare_only=prepare_only, log_output=not prepare_only,
                                       progress_bar=not prepare_only, cwd=str(paths.ROOT),
                                       extra_arguments=KERNEL_ARGUMENTS)
        except papermill.PapermillExecutionError as error:
            raise SystemExit(f"error: {notebook.name} failed in cell {error.exec_count}: "
                             f"{error.ename}: {error.evalue}\n(executed copy: {partial})") from None
        seconds = time.perf_counter() - start
        times.append((notebook.stem, seconds))
        if not prepare_only:
            # The kernel has exited: RUSAGE_CHILDREN's maximum is its peak, unless an earlier
            # notebook in this process peaked higher (then it is unknown: left blank).
            peak = children_peak_mb()
            if peak is not None and i > 1 and peak <= (peak_before or 0):
                peak = None
            before, after = shrink_notebook(partial, target)
            partial.unlink()
            # dated when the run started: an input edited while it ran makes Make rerun it
            os.utime(target, (started, started))
            record_wall_time(out / "tables", notebook.stem, seconds, dataset, peak)
            memory = "" if peak is None else f", kernel peak {peak / 1024:.1f} GB"
            print(f"[{i}/{len(todo)}] {notebook.stem} done in {seconds:.0f} s{memory}; "
                  f"{target} is {before / 2**20:.1f} -> {after / 2**20:.1f} MB", flush=True)
    if not prepare_only:
        try:
            executed.rmdir()  # only when empty: nothing failed
        except OSError:
            pass
    return times


def folder_mb(folder: Path) -> float:
    """The size of the files in ``folder`` in MB (2**20 bytes)."""
    return sum(f.stat().st_size for f in folder.glob("*") if f.is_file()) / 2**20


def run_one_per_process(dataset: str, out: Path | None, small: bool, only=()) -> int:
    """Run each notebook in its own ``python -m cam.study.reproduce --only`` process (so that
    each kernel's peak memory is measured on its own); stops at the first that fails."""
    todo = notebooks(dataset, only)
    if dataset == "polen23e":
        ensure_polen23e()  # once, before any notebook starts
    start = time.perf_counter()
    for i, notebook in enumerate(todo, 1):
        print(f"== {notebook.stem} ({i}/{len(todo)})", flush=True)
        command = [sys.executable, "-m", "cam.study.reproduce", dataset,
                   "--only", notebook.stem.split("-")[0]]
        command += (["--out", str(out)] if out else []) + (["--small"] if small else [])
        code = subprocess.call(command)
        if code:
            return code
    total = time.perf_counter() - start
    print(f"{len(todo)} notebooks in {total:.0f} s ({total / 60:.1f} min)", flush=True)
    return 0


def main(argv=None) -> int:
    # The notebook kernels inherit this: TensorFlow's C++ start-up notices stay out of outputs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="python -m cam.study.reproduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(STUDY))
    parser.add_argument("--out", type=Path, help="results folder (default results/<dataset>)")
    parser.add_argument("--only", nargs="+", default=(), metavar="PREFIX",
                        help="run only the notebooks whose names start with these, e.g. 03 04")
    parser.add_argument("--small", action="store_true", help="CI parameters (minutes)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only write the parameterised notebooks (for pytest --nbval-lax)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    out = args.out or paths.RESULTS_DIR / args.dataset
    if not args.prepare_only and len(notebooks(args.dataset, tuple(args.only))) > 1:
        code = run_one_per_process(args.dataset, args.out, args.small, tuple(args.only))
        if code:
            return code
    else:
        times = run(args.dataset, out, args.small, args.prepare_only, tuple(args.only))
        if args.prepare_only:
            return 0
        total = sum(s for _, s in times)
        print(f"{len(times)} notebook(s) in {total:.0f} s ({total / 60:.1f} min); "
              f"results in {out}")
    print(f"{out / 'notebooks'}: {folder_mb(out / 'notebooks'):.1f} MB of executed notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
