"""cam.study.reproduce: which notebooks run, with which parameters, and the messages when data is missing."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from PIL import Image, ImageDraw, ImageFilter

from cam.study import download, paths, reproduce

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


def test_study_notebooks_in_order_appendix_only_on_synthetic():
    polen = [nb.name for nb in reproduce.notebooks("polen23e")]
    synthetic = [nb.name for nb in reproduce.notebooks("synthetic")]
    assert polen == sorted(polen) and polen[0].startswith("01-")
    assert not any(name.startswith("A") for name in polen)
    assert synthetic[:len(polen)] == polen
    assert synthetic[len(polen):] == sorted(nb.name for nb in paths.NOTEBOOKS_DIR.glob("A*.ipynb"))


def test_only_picks_by_prefix_and_names_what_is_missing():
    assert [nb.name[:2] for nb in reproduce.notebooks("polen23e", ("03", "01"))] == ["01", "03"]
    with pytest.raises(SystemExit, match="no notebook starts with 99; the polen23e notebooks are 01-"):
        reproduce.notebooks("polen23e", ("99",))


@pytest.mark.parametrize("small", [False, True])
def test_parameters_are_only_those_a_notebook_declares(tmp_path, small):
    for notebook in reproduce.notebooks("synthetic"):
        declared = papermill.inspect_notebook(str(notebook))
        params = reproduce.parameters_for(notebook, "synthetic", tmp_path, small)
        assert set(params) <= set(declared), notebook.name
        assert params["dataset"] == "synthetic" and params["output_dir"] == str(tmp_path.resolve())
    if small:
        saliency = reproduce.parameters_for(paths.NOTEBOOKS_DIR / "03-saliency.ipynb",
                                           "synthetic", tmp_path, small)
        assert saliency["image_size"] == reproduce.SMALL["synthetic"]["image_size"]


def test_output_dir_inside_the_repository_is_injected_relative_to_it():
    notebook = paths.NOTEBOOKS_DIR / "01-data.ipynb"
    params = reproduce.parameters_for(notebook, "polen23e", paths.RESULTS_DIR / "polen23e", False)
    assert params["output_dir"] == "results/polen23e"  # no machine's folders in the notebook
    assert paths.resolve(params["output_dir"]) == paths.RESULTS_DIR / "polen23e"


def test_prepare_only_writes_parameterised_copies(tmp_path):
    reproduce.run("synthetic", tmp_path, small=True, prepare_only=True, only=("01",))
    book = json.loads((tmp_path / "notebooks" / "01-data.ipynb").read_text())
    injected = [c for c in book["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "samples_per_class = 2" in "".join(injected[0]["source"])
    assert not (tmp_path / "tables" / "00-wall-times.csv").exists()  # nothing ran
    assert not (tmp_path / "executed").exists()


def test_wall_times_replace_a_notebooks_row(tmp_path):
    reproduce.record_wall_time(tmp_path, "01-data", 12.0, "polen23e")
    reproduce.record_wall_time(tmp_path, "02-train-or-load", 30.0, "polen23e")
    reproduce.record_wall_time(tmp_path, "01-data", 10.0, "polen23e")
    table = pd.read_csv(tmp_path / "00-wall-times.csv")
    assert table["notebook"].tolist() == ["01-data", "02-train-or-load"]
    assert table["seconds"].tolist() == [10.0, 30.0]
    assert "Total: 40 s" in (tmp_path / "00-wall-times.md").read_text()


def test_wall_times_have_the_kernels_peak_memory_and_keep_old_rows(tmp_path):
    # a table from before the peak column: its rows stay, with a blank peak
    pd.DataFrame({"notebook": ["01-data", "02-train-or-load"], "dataset": "polen23e",
                  "seconds": [14.1, 55.1], "finished": "2026-11-22 00:50"}
                 ).to_csv(tmp_path / "00-wall-times.csv", index=False)
    reproduce.record_wall_time(tmp_path, "04-speed", 1349.3, "polen23e", peak_mb=5300.4)
    reproduce.record_wall_time(tmp_path, "03-saliency", 156.2, "polen23e", peak_mb=2100)
    reproduce.record_wall_time(tmp_path, "05-faithfulness", 734.2, "polen23e")  # unknown
    table = pd.read_csv(tmp_path / "00-wall-times.csv")
    assert table.columns.tolist() == ["notebook", "dataset", "seconds", "peak MB", "finished"]
    assert table["notebook"].tolist() == ["01-data", "02-train-or-load", "03-saliency",
                                          "04-speed", "05-faithfulness"]
    assert table["peak MB"].isna().tolist() == [True, True, False, False, True]
    assert table.loc[3, "peak MB"] == 5300
    md = (tmp_path / "00-wall-times.md").read_text()
    assert "peak MB" in md and "nan" not in md.lower()
    footer = "Total: 2309 s (38.5 min); peak memory 5.2 GB (04-speed; not measured for 3)."
    assert md.rstrip().endswith(footer)
    for name, seconds in [("01-data", 14.1), ("02-train-or-load", 55.1),
                          ("05-faithfulness", 734.2)]:
        reproduce.record_wall_time(tmp_path, name, seconds, "polen23e", peak_mb=1000)
    md = (tmp_path / "00-wall-times.md").read_text()
    assert md.rstrip().endswith("Total: 2309 s (38.5 min); peak memory 5.2 GB (04-speed).")


def test_children_peak_memory_is_a_finished_childs_peak():
    if reproduce.children_peak_mb() is None:
        pytest.skip("no resource module")
    subprocess.run([sys.executable, "-c", "import numpy; a = numpy.ones(40_000_000); a += 1"],
                   check=True)
    assert reproduce.children_peak_mb() >= 300  # the child held 305 MB at least


def _png(width: int, height: int) -> bytes:
    """A plot-like RGBA PNG: white, with coloured noisy blocks (what matplotlib draws)."""
    rng = np.random.default_rng(0)
    pixels = np.full((height, width, 4), 255, np.uint8)
    side = min(200, height // 2, width // 2)
    for k in range(6):
        y, x = rng.integers(0, height - side), rng.integers(0, width - side)
        block = rng.integers(0, 256, (side, side, 3), dtype=np.uint8) // 4 + 40 * k
        pixels[y:y + side, x:x + side, :3] = block
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def _executed_book(png: bytes):
    """A notebook as papermill leaves it: injected parameters, timings, a figure and text."""
    book = nbformat.v4.new_notebook()
    book.metadata["papermill"] = {"start_time": "2026-01-01T00:00:00", "end_time": "x",
                                  "duration": 12.345, "input_path": str(paths.ROOT / "nb.ipynb"),
                                  "output_path": "/elsewhere/nb.ipynb", "parameters": {}}
    injected = nbformat.v4.new_code_cell("dataset = 'polen23e'")
    injected.metadata.update(tags=["injected-parameters"],
                             papermill={"start_time": "t0", "end_time": "t1", "duration": 0.2})
    figure = nbformat.v4.new_code_cell("plot()", execution_count=2, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="drawn\n"),
        nbformat.v4.new_output("display_data", data={
            "image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<Figure>"})])
    figure.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:01"}
    book.cells = [injected, figure]
    return book


def test_shrinking_keeps_outputs_and_makes_big_pngs_small(tmp_path):
    png = _png(2400, 1600)
    source, target = tmp_path / "executed" / "nb.ipynb", tmp_path / "notebooks" / "nb.ipynb"
    source.parent.mkdir()
    nbformat.write(_executed_book(png), str(source))
    before, after = reproduce.shrink_notebook(source, target)
    assert after < before / 2 and (before, after) == (source.stat().st_size, target.stat().st_size)
    book = nbformat.read(str(target), as_version=4)
    nbformat.validate(book)
    injected, figure = book.cells
    assert injected.id == "injected-parameters"
    assert injected.metadata.papermill == {"duration": 0}
    assert "execution" not in figure.metadata
    assert [o.output_type for o in figure.outputs] == ["stream", "display_data"]
    assert figure.outputs[0].text == "drawn\n"
    assert figure.outputs[1].data["text/plain"] == "<Figure>"
    [mime] = [key for key in figure.outputs[1].data if key.startswith("image/")]  # PNG or JPEG
    image = Image.open(io.BytesIO(base64.b64decode(figure.outputs[1].data[mime])))
    assert image.size == (reproduce.MAX_FIGURE_WIDTH, 533)
    meta = book.metadata.papermill
    assert "start_time" not in meta and "end_time" not in meta and meta.duration == 12
    assert meta.input_path == "nb.ipynb"  # relative to the repository
    assert meta.output_path == str(target)  # outside the repository: as it is


def test_shrink_png_never_grows_a_figure():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "white").save(buffer, "PNG", optimize=True)
    tiny = buffer.getvalue()
    assert len(reproduce.shrink_png(tiny)) <= len(tiny)
    see_through = np.zeros((300, 1200, 4), np.uint8)
    see_through[100:200, 100:1100] = (200, 30, 30, 255)  # the rest is transparent
    buffer = io.BytesIO()
    Image.fromarray(see_through, "RGBA").save(buffer, "PNG")
    shrunk = Image.open(io.BytesIO(reproduce.shrink_png(buffer.getvalue()))).convert("RGBA")
    assert shrunk.width == reproduce.MAX_FIGURE_WIDTH
    assert shrunk.getpixel((0, 0))[3] == 0 and shrunk.getpixel((450, 112))[3] == 255


def test_photographs_go_in_as_jpeg_and_charts_as_png():
    noise = np.random.default_rng(0).integers(0, 256, (600, 1000, 3), dtype=np.uint8)
    photo = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3))
    chart = Image.new("RGB", (1000, 600), "white")
    draw = ImageDraw.Draw(chart)
    draw.line([(50, 550), (500, 300), (950, 50)], fill=(31, 119, 180), width=2)
    draw.text((400, 570), "ms per image", fill="black")
    for image, mime in ((photo, "image/jpeg"), (chart, "image/png")):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        kind, shrunk = reproduce.shrink_figure(buffer.getvalue())
        assert kind == mime
        with Image.open(io.BytesIO(shrunk)) as small:
            assert small.format == mime.split("/")[1].upper()
            assert small.size == (reproduce.MAX_FIGURE_WIDTH, 480)


def test_run_commits_a_shrunk_copy_and_records_the_peak(tmp_path, monkeypatch):
    """papermill stubbed: it 'executes' by writing a notebook with a big figure."""
    def execute(source, output, **kwargs):
        nbformat.write(_executed_book(_png(2000, 1000)), output)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(reproduce, "children_peak_mb", iter([100.0, 2048.0]).__next__)
    started = time.time()
    monkeypatch.setattr(reproduce.time, "time", lambda: started - 60)
    reproduce.run("synthetic", tmp_path, only=("03",))
    committed = tmp_path / "notebooks" / "03-saliency.ipynb"
    assert committed.is_file() and not (tmp_path / "executed").exists()
    assert abs(committed.stat().st_mtime - (started - 60)) < 1  # dated when the run started
    table = pd.read_csv(tmp_path / "tables" / "00-wall-times.csv")
    assert table["notebook"].tolist() == ["03-saliency"] and table["peak MB"].tolist() == [2048]


def test_kernels_start_in_the_repository_with_the_quiet_options(tmp_path, monkeypatch):
    seen = {}

    def execute(source, output, **kwargs):
        seen.update(kwargs)
        nbformat.write(_executed_book(_png(10, 10)), output)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    reproduce.run("synthetic", tmp_path, only=("01",))
    assert seen["cwd"] == str(paths.ROOT) and seen["extra_arguments"] == reproduce.KERNEL_ARGUMENTS


def test_a_kernel_keeps_c_level_stderr_and_tf_retracing_warnings_out_of_the_outputs(tmp_path):
    """A real kernel with ``KERNEL_ARGUMENTS``: what C code writes to file descriptor 2
    (TensorFlow's start-up log) and TensorFlow's retracing warning stay out of the notebook;
    what the cells print and TensorFlow's other warnings are kept."""
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                   "language": "python"}
    book.cells = [nbformat.v4.new_code_cell(
        "import logging, os\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on\\n')\n"
        "logging.getLogger('tensorflow').warning('5 out of the last 5 calls to <function body> '\n"
        "                                        'triggered tf.function retracing.')\n"
        "logging.getLogger('tensorflow').warning('a warning that stays')\n"
        "print('printed')")]
    nbformat.write(book, tmp_path / "in.ipynb")
    papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                               progress_bar=False, cwd=str(paths.ROOT),
                               extra_arguments=reproduce.KERNEL_ARGUMENTS)
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs
    text = {o.name: o.text for o in outputs if o.output_type == "stream"}
    assert text == {"stderr": "a warning that stays\n", "stdout": "printed\n"}


def _widget(name, **state):
    return {"model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
            "model_name": name, "state": state}


def test_progress_bars_and_their_widget_state_are_dropped_other_widgets_kept():
    state = {"bar": _widget("HBoxModel", children=["IPY_MODEL_left", "IPY_MODEL_progress",
                                                   "IPY_MODEL_right"], layout="IPY_MODEL_l1"),
             "left": _widget("HTMLModel", value="Ablation-CAM"),
             "progress": _widget("FloatProgressModel", value=7, style="IPY_MODEL_s1"),
             "right": _widget("HTMLModel", value="7/13"),
             "l1": _widget("LayoutModel"), "s1": _widget("ProgressStyleModel"),
             "slider": _widget("IntSliderModel", value=3, layout="IPY_MODEL_l2"),
             "l2": _widget("LayoutModel")}
    book = nbformat.v4.new_notebook()
    book.metadata["widgets"] = {reproduce.WIDGET_STATE: {"state": state, "version_major": 2,
                                                         "version_minor": 0}}

    def view(model_id):
        return nbformat.v4.new_output("display_data", {
            reproduce.WIDGET_VIEW: {"model_id": model_id, "version_major": 2,
                                    "version_minor": 0}, "text/plain": model_id})

    printed = nbformat.v4.new_output("stream", name="stdout", text="done\n")
    book.cells = [nbformat.v4.new_code_cell("x", outputs=[view("bar"), printed]),
                  nbformat.v4.new_code_cell("y", outputs=[view("slider")])]
    reproduce.drop_progress_bars(book)
    assert book.cells[0].outputs == [printed]
    assert book.cells[1].outputs[0].data[reproduce.WIDGET_VIEW]["model_id"] == "slider"
    assert set(book.metadata.widgets[reproduce.WIDGET_STATE].state) == {"slider", "l2"}
    book.cells.pop()
    reproduce.drop_progress_bars(book)  # the slider is no longer shown, but its state stays
    assert set(book.metadata.widgets[reproduce.WIDGET_STATE].state) == {"slider", "l2"}


def test_a_failed_notebook_leaves_its_partial_copy_and_the_committed_one(tmp_path, monkeypatch):
    committed = tmp_path / "notebooks" / "03-saliency.ipynb"
    committed.parent.mkdir()
    committed.write_text("the last good run")

    def execute(source, output, **kwargs):
        nbformat.write(_executed_book(_png(100, 100)), output)
        raise papermill.PapermillExecutionError(3, 3, "boom", "ValueError", "bad", [])

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    with pytest.raises(SystemExit, match="03-saliency.ipynb failed in cell 3: ValueError: bad"):
        reproduce.run("synthetic", tmp_path, only=("03",))
    assert committed.read_text() == "the last good run"
    assert (tmp_path / "executed" / "03-saliency.ipynb").is_file()


def test_several_notebooks_run_one_process_each(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    assert reproduce.main(["synthetic", "--only", "01", "A01", "--out", str(tmp_path)]) == 0
    assert [c[c.index("--only") + 1] for c in calls] == ["01", "A01"]
    assert all(c[:4] == [sys.executable, "-m", "cam.study.reproduce", "synthetic"] for c in calls)


# --------------------------------------------------------------------------- the Makefile

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")
FAKE_PY = """#!/bin/sh
# stands in for python: `-m cam.study.reproduce DATASET --only NN` writes the executed copy
echo "ran $3 $5"
mkdir -p results/$3/notebooks && touch results/$3/notebooks/$5.ipynb
"""


@pytest.fixture
def make_tree(tmp_path):
    """The Makefile in a tree of empty inputs, every notebook run (its stamp up to date)."""
    shutil.copy(paths.ROOT / "Makefile", tmp_path)
    inputs = ["pyproject.toml", "cam/__init__.py", "cam/study/reproduce.py",
              "models/densenet169-polen23e-fold0.weights.h5.gz",
              "models/densenet169-polen23e-fold0.json", "data/polen23e-folds.csv"]
    names = ["01-data", "02-train-or-load", "03-saliency", "A01-vit"]
    inputs += [f"notebooks/{n}.ipynb" for n in names]
    outputs = [f"build/reproduce/{d}/{n}.done" for d in ("polen23e", "synthetic")
               for n in names if d == "synthetic" or not n.startswith("A")]
    for i, name in enumerate([*inputs, ".venv/.installed", *outputs]):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (1e9 + i, 1e9 + i))  # inputs, then the venv stamp, then the outputs
    (tmp_path / "python").write_text(FAKE_PY)
    (tmp_path / "python").chmod(0o755)
    return tmp_path


def make(tree, *args):
    env = {**os.environ, "POLEN23E_DIR": str(tree), "MAKEFLAGS": "", "FORCE": ""}
    done = subprocess.run([MAKE, "--no-print-directory", "PY=./python", *args], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def up_to_date(tree, target) -> bool:
    """`make -q target`: exit status 0 when it is up to date (1 when not)."""
    return subprocess.run([MAKE, "-q", "PY=./python", target], cwd=tree, timeout=30,
                          env={**os.environ, "MAKEFLAGS": "", "FORCE": ""}).returncode == 0


def rerun(output: str) -> list[str]:
    """The notebooks a `make -n` would run."""
    return [line.split()[-1] for line in output.splitlines()
            if "-m cam.study.reproduce" in line]


def touch(path, when=1.5e9):
    os.utime(path, (when, when))


@needs_make
def test_make_reruns_only_the_notebook_whose_inputs_changed(make_tree):
    assert rerun(make(make_tree, "-n", "reproduce")) == []
    assert rerun(make(make_tree, "-n", "demo")) == []
    touch(make_tree / "notebooks/03-saliency.ipynb")
    assert rerun(make(make_tree, "-n", "reproduce")) == ["03"]
    assert rerun(make(make_tree, "-n", "demo")) == ["03"]
    touch(make_tree / ".venv/.installed", 1.6e9)  # a reinstalled venv reruns nothing more
    assert rerun(make(make_tree, "-n", "reproduce")) == ["03"]
    touch(make_tree / "models/densenet169-polen23e-fold0.json", 1.6e9)  # the checkpoint: all
    assert rerun(make(make_tree, "-n", "reproduce")) == ["01", "02", "03"]
    assert rerun(make(make_tree, "-n", "demo")) == ["03"]  # the demo has its own model


@needs_make
def test_the_synthetic_checkpoint_is_an_input_of_the_notebooks_after_02(make_tree):
    checkpoint = make_tree / "data/models/small-cnn-synthetic-fold0.weights.h5.gz"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()  # notebook 02 trained it: newer than 02's stamp
    assert rerun(make(make_tree, "-n", "demo")) == ["01", "03", "A01"]
    assert rerun(make(make_tree, "-n", "reproduce")) == []


@needs_make
def test_parameters_and_library_are_inputs_and_force_reruns_all(make_tree):
    assert rerun(make(make_tree, "-n", "reproduce", "FORCE=1")) == ["01", "02", "03"]
    assert rerun(make(make_tree, "-n", "demo", "FORCE=1")) == ["01", "02", "03", "A01"]
    target = "build/reproduce/polen23e/03-saliency.done"
    assert up_to_date(make_tree, target)
    touch(make_tree / "cam/study/reproduce.py")  # STUDY, SMALL: the parameters
    assert rerun(make(make_tree, "-n", "demo")) == ["01", "02", "03", "A01"]
    assert not up_to_date(make_tree, target)


@needs_make
def test_make_reproduce_says_why_and_what_it_skipped(make_tree):
    touch(make_tree / "notebooks/03-saliency.ipynb")
    out = make(make_tree, "reproduce")
    assert "== 03-saliency: rerunning (newer: notebooks/03-saliency.ipynb)" in out
    assert "ran polen23e 03" in out and "ran polen23e 01" not in out
    assert "rerun: 03-saliency" in out
    assert "up to date, skipped: 01-data 02-train-or-load (make reproduce FORCE=1" in out
    assert "results/polen23e/notebooks: " in out
    again = make(make_tree, "reproduce")  # nothing to do: only timestamps are compared
    assert "ran " not in again and "rerun: none" in again
    assert "skipped: 01-data 02-train-or-load 03-saliency (" in again
    forced = make(make_tree, "reproduce", "FORCE=1")
    assert "== 01-data: rerunning (FORCE=1)" in forced and "skipped: none" in forced
    assert not (make_tree / "build/reproduce-polen23e.ran").exists()


@needs_make
def test_make_help_lists_the_targets():
    out = subprocess.run([MAKE, "-s", "--no-print-directory", "help"], cwd=paths.ROOT,
                         capture_output=True, text=True, timeout=30).stdout
    listed = [line.split()[1] for line in out.splitlines()]
    assert {"help", "venv", "test", "test-core", "reproduce", "demo", "lab", "data", "folds",
            "train", "benchmark"} <= set(listed)
    assert "force-rerun" not in listed and not any("reproduce-log" in t for t in listed)


def test_only_notebooks_in_notebooks_are_stripped_on_commit():
    if shutil.which("git") is None or not (paths.ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-attr", "filter", "--", "notebooks/01-data.ipynb",
                          "results/polen23e/notebooks/01-data.ipynb"], cwd=paths.ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["notebooks/01-data.ipynb: filter: nbstripout",
                   "results/polen23e/notebooks/01-data.ipynb: filter: unspecified"]


def test_missing_data_and_failed_download_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.POLEN23E_ENV, raising=False)
    monkeypatch.setattr(paths, "POLEN23E_DEFAULT_DIR", tmp_path / "absent")

    def offline(*args, **kwargs):
        raise RuntimeError("could not reach figshare.com")

    monkeypatch.setattr(download, "download_polen23e", offline)
    with pytest.raises(SystemExit) as stop:
        reproduce.ensure_polen23e()
    message = str(stop.value)
    assert "could not reach figshare.com" in message
    assert f"export {paths.POLEN23E_ENV}=" in message and "make demo" in message


def test_a_wrong_polen23e_dir_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.POLEN23E_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="is not a directory"):
        reproduce.ensure_polen23e()


@needs_make
def test_a_fresh_clone_runs_every_notebook_even_with_committed_executed_copies(make_tree):
    """The stamps live in build/ (not committed): committed executed notebooks, however new,
    never make a fresh clone's first `make reproduce` skip anything."""
    shutil.rmtree(make_tree / "build")
    for n in ("01-data", "02-train-or-load", "03-saliency"):
        copy = make_tree / f"results/polen23e/notebooks/{n}.ipynb"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.touch()  # newer than every input, as after a checkout
    out = make(make_tree, "reproduce")
    assert [l for l in out.splitlines() if l.startswith("ran ")] == [
        "ran polen23e 01", "ran polen23e 02", "ran polen23e 03"]
    assert "== 01-data: rerunning (not run in this checkout yet)" in out
    assert "skipped: none" in out
    assert "rerun: none" in make(make_tree, "reproduce")
