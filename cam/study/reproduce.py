"""Run the study's notebooks in order with papermill: ``make reproduce``, ``make demo``, CI.

    python -m cam.study.reproduce polen23e                  # the study: results/polen23e
    python -m cam.study.reproduce synthetic                 # the offline demo: results/synthetic
    python -m cam.study.reproduce polen23e --only 04 05     # some notebooks
    python -m cam.study.reproduce synthetic --small --prepare-only --out build/ci-notebooks/synthetic

Each notebook gets ``dataset`` and the parameters below that it declares (papermill would
warn about the others), runs with a progress bar over its cells while its printed output
streams to the terminal, and its executed copy goes to ``<out>/executed/``; its figures and
tables go to ``<out>/figures`` and ``<out>/tables``. The wall time of each notebook is added
to ``<out>/tables/00-wall-times.csv`` and ``.md``. A failing notebook stops the run with its
name and the error, and the run exits non-zero.

``--small`` uses the CI parameters (a few images, small sizes, one timed call); with
``--prepare-only`` the notebooks are only parameterised, for ``pytest --nbval-lax`` to run.
"""

from __future__ import annotations

import argparse
import logging
import os
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


#: CI overrides for single notebooks on POLEN23E, where every new explainer traces DenseNet-169
#: (seconds each): the speed study at the last layer only, with two windows; the layer x
#: window sweep with two windows (window 1 and a larger one still cover every code path; the
#: four windows took 523 s of `make test`).
SMALL_NOTEBOOK = {("polen23e", "04"): {"layers": ["relu"], "windows": [1, 2]},
                  ("polen23e", "06"): {"windows": [1, 2]}}


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
    """``dataset``, ``output_dir`` and the study's (or CI's) values that ``notebook`` declares."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    wanted = {"dataset": dataset, "output_dir": str(out.resolve()),
              **(SMALL if small else STUDY)[dataset]}
    if small:
        wanted.update(SMALL_NOTEBOOK.get((dataset, notebook.name[:2]), {}))
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


def record_wall_time(tables: Path, notebook: str, seconds: float, dataset: str) -> None:
    """Add or replace ``notebook``'s row in ``00-wall-times.csv`` / ``.md``."""
    csv = tables / "00-wall-times.csv"
    frame = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(
        columns=["notebook", "dataset", "seconds", "finished"])
    frame = frame[frame["notebook"] != notebook]
    row = {"notebook": notebook, "dataset": dataset, "seconds": round(seconds, 1),
           "finished": time.strftime("%Y-%m-%d %H:%M")}
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True).sort_values("notebook")
    frame.to_csv(csv, index=False)
    total = frame["seconds"].sum()
    (tables / "00-wall-times.md").write_text(
        frame.to_markdown(index=False) + f"\n\nTotal: {total:.0f} s ({total / 60:.1f} min).\n")


def run(dataset: str, out: Path, small: bool = False, prepare_only: bool = False,
        only=()) -> list[tuple[str, float]]:
    """Run (or prepare) the notebooks for ``dataset`` into ``out``; returns their wall times."""
    import papermill

    if dataset not in STUDY:
        raise SystemExit(f"error: dataset must be one of {', '.join(STUDY)}, not {dataset!r}")
    todo = notebooks(dataset, only)
    if dataset == "polen23e":
        ensure_polen23e()
    executed = out / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    times = []
    for i, notebook in enumerate(todo, 1):
        params = parameters_for(notebook, dataset, out, small)
        target = executed / notebook.name
        print(f"[{i}/{len(todo)}] {notebook.name} -> {target}  "
              f"({', '.join(f'{k}={v!r}' for k, v in params.items())})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(notebook), str(target), parameters=params,
                                       prepare_only=prepare_only, log_output=not prepare_only,
                                       progress_bar=not prepare_only, cwd=str(paths.ROOT))
        except papermill.PapermillExecutionError as error:
            raise SystemExit(f"error: {notebook.name} failed in cell {error.exec_count}: "
                             f"{error.ename}: {error.evalue}\n(executed copy: {target})") from None
        seconds = time.perf_counter() - start
        times.append((notebook.stem, seconds))
        if not prepare_only:
            record_wall_time(out / "tables", notebook.stem, seconds, dataset)
            print(f"[{i}/{len(todo)}] {notebook.stem} done in {seconds:.0f} s", flush=True)
    return times


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
    times = run(args.dataset, out, args.small, args.prepare_only, tuple(args.only))
    if not args.prepare_only:
        total = sum(s for _, s in times)
        print(f"{len(times)} notebook(s) in {total:.0f} s ({total / 60:.1f} min); "
              f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
