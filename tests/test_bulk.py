"""`cam.bulk` and `python -m cam bulk`: a folder of tiny images (good ones of every kind, and
planted bad files) explained into Parquet; the rows equal the explainers' own raw maps; bad
files land in errors.parquet with their reason; a run killed with SIGKILL resumes to exactly
the rows of an uninterrupted run; the Ray engine writes the same rows as the local one.

The subprocess and Ray tests run on TensorFlow only (each starts processes that import a
backend: the slow part of this file); the local engine's test runs on every backend.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import keras
import numpy as np
import pytest
from keras import layers as L
from PIL import Image

import cam
from cam import bulk as BULK
from cam import cli
from cam.images import fit_to_input, read_rgb

pq = pytest.importorskip("pyarrow.parquet", reason="cam.bulk writes Parquet: pip install 'cam[bulk]'")
pa = pytest.importorskip("pyarrow")

METHODS = ("gradcam", "fastablationcam")
TENSORFLOW_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="starts processes that each import a backend (slow); run on TensorFlow only, the "
           "local engine's test covers every backend")


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((12, 12, 3), name="image"),
        L.Rescaling(1 / 255, name="rescale"),
        L.Conv2D(4, 3, padding="same", name="conv"),
        L.ReLU(name="relu"),  # 12x12 grid
        L.MaxPooling2D(2, name="pool"),
        L.Conv2D(5, 3, padding="same", activation="relu", name="conv2"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(3, name="logits"),
    ], name="tiny_bulk")


#: name -> the reason errors.parquet gives (a substring)
BAD = {"truncated.jpg": "runcated", "text.png": "not an image format", "empty.jpg": "empty file"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model as .keras, and a folder of good images (RGB of several sizes in a subfolder,
    grayscale, RGBA, 16-bit) and bad files (:data:`BAD`)."""
    root = tmp_path_factory.mktemp("bulk")
    _model().save(root / "model.keras")
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (14 + 3 * i, 12 + i, 3), np.uint8)).save(
            images / "sub" / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 256, (15, 12), np.uint8)).save(images / "gray.png")
    Image.fromarray(rng.integers(0, 256, (12, 16, 4), np.uint8)).save(images / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (13, 13), np.uint16)).save(images / "deep16.png")
    assert Image.open(images / "deep16.png").mode.startswith("I")
    whole = root / "whole.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(whole, quality=95)
    (images / "truncated.jpg").write_bytes(whole.read_bytes()[:400])
    (images / "text.png").write_text("not an image at all")
    (images / "empty.jpg").write_bytes(b"")
    return root


GOOD = ["deep16.png", "gray.png", "rgba.png", "sub/rgb0.png", "sub/rgb1.png", "sub/rgb2.png",
        "sub/rgb3.png"]


def _rows(out) -> list[dict]:
    rows = pq.read_table(out / "maps").to_pylist()
    return sorted(rows, key=lambda r: (r["path"], r["method"]))


def _assert_same_rows(rows, expected):
    """Every column equal except ``seconds``; maps to float tolerance."""
    assert [(r["path"], r["method"]) for r in rows] == \
        [(r["path"], r["method"]) for r in expected]
    for got, want in zip(rows, expected):
        np.testing.assert_allclose(got["map"], want["map"], rtol=1e-5, atol=1e-6)
        same = {k: v for k, v in got.items() if k not in ("map", "seconds")}
        assert same == {k: v for k, v in want.items() if k not in ("map", "seconds")}


@pytest.fixture(scope="module")
def local_run(files, tmp_path_factory):
    """``python -m cam bulk`` (in-process) on the folder with the local engine."""
    out = tmp_path_factory.mktemp("local") / "out"
    code = cli.main(["bulk", str(files / "model.keras"), str(files / "images"), "--layer", "relu",
                     "--method", ",".join(METHODS), "--out", str(out), "--batch-size", "3",
                     "--overlays", "--no-progress"])
    return code, out


def test_inputs_listed_from_a_folder_glob_list_and_archives(files, tmp_path):
    folder = sorted((p.relative_to(files / "images").as_posix(), p) for p in
                    (files / "images").rglob("*") if p.is_file())
    names = [name for name, _ in folder]
    zipped, tarred = tmp_path / "images.zip", tmp_path / "images.tar.gz"
    with zipfile.ZipFile(zipped, "w") as archive:
        for name, path in folder:
            archive.write(path, name)
    with tarfile.open(tarred, "w:gz") as archive:
        for name, path in folder:
            archive.add(path, name)
    listing = tmp_path / "list.txt"
    listing.write_text("# the images\n" + "\n".join(str(p) for _, p in folder) + "\n\n")
    assert BULK.list_inputs(files / "images") == ("folder", BULK.list_inputs(files / "images")[1])
    assert [s.name for s in BULK.list_inputs(files / "images")[1]] == names
    assert [s.name for s in BULK.list_inputs(f"{files}/images/**/*.*")[1]] == names
    assert [s.name for s in BULK.list_inputs(zipped)[1]] == names
    assert [s.name for s in BULK.list_inputs(tarred)[1]] == names
    kind, listed = BULK.list_inputs(listing)
    assert kind == "list" and len(listed) == len(names)
    reader = BULK.Reader()
    for archive in (zipped, tarred):  # a member reads as the file's bytes
        member = next(s for s in BULK.list_inputs(archive)[1] if s.name == "gray.png")
        assert reader.read(member) == (files / "images" / "gray.png").read_bytes()
    reader.close()
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder, a glob"):
        BULK.list_inputs(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        BULK.list_inputs(tmp_path / "nothing")


def test_local_engine_writes_every_good_image_and_every_bad_file_with_its_reason(
        files, local_run):
    code, out = local_run
    assert code == 1  # some images failed
    rows = _rows(out)
    assert [(r["path"], r["method"]) for r in rows] == \
        [(name, method) for name in GOOD for method in sorted(METHODS)]
    errors = {e["path"]: e for e in pq.read_table(out / "errors.parquet").to_pylist()}
    assert set(errors) == set(BAD)
    for name, reason in BAD.items():
        assert reason in errors[name]["reason"] and errors[name]["stage"] == "decode"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"listed": 10, "explained": 7, "skipped": 0, "failed": 3,
                                  "rows": 14, "shards": 3}
    assert manifest["config"]["layer"] == "relu" and list(manifest["methods"]) == list(METHODS)
    assert manifest["backend"] == keras.backend.backend()
    overlays = sorted(p.relative_to(out / "overlays").as_posix()
                      for p in (out / "overlays").rglob("*.png"))
    assert overlays == sorted(f"{n.replace('.', '_')}-{m}.png" for n in GOOD for m in METHODS)

    # The rows are the explainers' own raw maps of the same preprocessed images.
    model = keras.saving.load_model(files / "model.keras")
    images = np.stack([fit_to_input(read_rgb(files / "images" / n), 12, 12, 3)
                       for n in GOOD]).astype(np.float32)
    for method in METHODS:
        result = cam.method_class(method)(model, "relu").explain(images, upsample=False,
                                                                 normalize=False)
        mine = [r for r in rows if r["method"] == method]
        for i, row in enumerate(mine):
            raw = np.reshape(row["map"], (row["map_height"], row["map_width"]))
            np.testing.assert_allclose(raw, result.raw[i], rtol=1e-4, atol=1e-6)
            assert row["map_min"] == pytest.approx(raw.min()) and \
                row["map_max"] == pytest.approx(raw.max())
            assert row["predicted"] == row["target_class"] == result.targets[i]
            assert row["predicted_score"] == pytest.approx(result.scores[i].max(), rel=1e-5)
            assert row["target"] == "predicted" and row["layer"] == "relu"
            assert (row["height"], row["width"]) == read_rgb(files / "images" / row["path"]
                                                             ).shape[:2]
            assert row["seconds"] > 0


def test_bad_arguments_fail_before_any_work(files, local_run, tmp_path, capsys):
    model, images, out = str(files / "model.keras"), str(files / "images"), tmp_path / "out"
    cases = [
        (["--method", "gradcam,nosuchcam"], "unknown method 'nosuchcam'; choose one of"),
        (["--layer", "nosuchlayer"], "nosuchlayer"),
        (["--set", "window=2", "--method", "gradcam"], "none of the methods has a setting"),
        (["--target", "banana"], "is not a target"),
        (["--preprocess", "nosuchmodule:f"], "cannot import 'nosuchmodule'"),
        (["--workers", "0"], "workers must be an int >= 1"),
    ]
    for extra, message in cases:
        assert cli.main(["bulk", model, images, "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "maps").exists()
    _, done = local_run  # another layer into a folder that holds a run: refused, untouched
    before = sorted(done.rglob("*"))
    assert cli.main(["bulk", model, images, "--out", str(done), "--layer", "conv2",
                     "--method", ",".join(METHODS)]) == 2
    assert "holds a run with other settings (layer: 'relu' there, 'conv2' now)" in \
        capsys.readouterr().err
    assert sorted(done.rglob("*")) == before
    assert cli.main(["bulk", model, str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_a_killed_ray_runs_whole_staged_files_are_committed_and_the_rest_dropped(tmp_path):
    """What a Ray run killed before its commit left (``OUT/.ray-RUN/``): files that read back
    whole become shards of ``OUT/maps``, a truncated one is dropped, the folder goes."""
    from cam.bulk_ray import staged_schema

    staging = tmp_path / ".ray-killed"
    staging.mkdir(parents=True)
    row = {name: None for name in staged_schema().names}
    ok = {**row, "path": "a.png", "sha256": "ab", "method": "gradcam", "map": [1.0, 2.0],
          "map_height": 1, "map_width": 2, "seconds": 0.5, "status": "ok",
          "decode_seconds": 0.1}
    failed = {**row, "path": "b.png", "status": "error", "stage": "decode", "reason": "bad"}
    table = pa.Table.from_pylist([ok, failed], schema=staged_schema())
    pq.write_table(table, staging / "0.parquet")
    (staging / "1.parquet").write_bytes((staging / "0.parquet").read_bytes()[:100])
    (tmp_path / "maps").mkdir()
    BULK.salvage(tmp_path)
    assert not staging.exists()
    rows = pq.read_table(tmp_path / "maps").to_pylist()
    assert [(r["path"], r["map"]) for r in rows] == [("a.png", [1.0, 2.0])]
    assert BULK.completed(tmp_path) == {"ab": {"gradcam"}}


@TENSORFLOW_ONLY
def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(files, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in GOOD:
        (good / name.replace("/", "-")).write_bytes((files / "images" / name).read_bytes())
    args = dict(layer="relu", methods=METHODS, batch_size=2, progress=False)
    killed = tmp_path / "killed"
    # CAM_BULK_TEST_PAUSE: the run pauses 1 s after each batch of 2, so it is still running
    # when its first shard appears
    process = subprocess.Popen(
        [sys.executable, "-m", "cam", "bulk", str(files / "model.keras"), str(good),
         "--layer", "relu", "--method", ",".join(METHODS), "--out", str(killed),
         "--batch-size", "2", "--no-progress"],
        env={**os.environ, "CAM_BULK_TEST_PAUSE": "1", "KERAS_BACKEND": "tensorflow"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list((killed / "maps").glob("part-*.parquet")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    written = len(list((killed / "maps").glob("part-*.parquet")))
    assert 1 <= written < 4, written  # 4 batches: killed mid-way

    resumed = cam.bulk(files / "model.keras", good, killed, **args)
    assert (resumed.skipped, resumed.explained, resumed.failed) == \
        (2 * written, len(GOOD) - 2 * written, 0)
    assert resumed.exit_code == 0
    whole = cam.bulk(files / "model.keras", good, tmp_path / "whole", **args)
    rows = _rows(killed)
    assert len({(r["path"], r["method"]) for r in rows}) == len(rows) == 2 * len(GOOD)
    _assert_same_rows(rows, _rows(tmp_path / "whole"))
    assert whole.rows == len(rows)

    shards = sorted((killed / "maps").iterdir())
    again = cam.bulk(files / "model.keras", good, killed, **args)
    assert (again.skipped, again.explained, again.rows, again.shards) == (len(GOOD), 0, 0, 0)
    assert sorted((killed / "maps").iterdir()) == shards
    more = cam.bulk(files / "model.keras", good, killed, **{**args, "methods": ("gradcam",
                                                                                 "layercam")})
    assert (more.explained, more.rows) == (len(GOOD), len(GOOD))  # only the new method ran

    fresh = cam.bulk(files / "model.keras", good, killed, overwrite=True, **args)
    assert (fresh.explained, fresh.rows) == (len(GOOD), 2 * len(GOOD))


@TENSORFLOW_ONLY
def test_the_ray_engine_writes_the_local_engines_rows(files, local_run, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray engine needs Ray: pip install 'cam[ray]'")
    # its own temporary folder, short: Ray's sockets live there (at most 107 bytes a path)
    temporary = tempfile.mkdtemp(prefix="cam-ray-")
    try:
        try:
            ray.init(num_cpus=2, _temp_dir=temporary, include_dashboard=False,
                     log_to_driver=False)
        except Exception as err:  # noqa: BLE001 (whatever stops Ray starting here)
            pytest.skip(f"Ray cannot start here: {err}")
        try:
            summary = cam.bulk(files / "model.keras", files / "images", tmp_path / "out",
                               layer="relu", methods=METHODS, batch_size=3, engine="ray",
                               progress=False)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    _, local = local_run
    assert (summary.explained, summary.failed, summary.exit_code) == (len(GOOD), len(BAD), 1)
    _assert_same_rows(_rows(tmp_path / "out"), _rows(local))

    def errors(out):
        return sorted(pq.read_table(out / "errors.parquet").to_pylist(), key=lambda e: e["path"])

    assert errors(tmp_path / "out") == errors(local)
