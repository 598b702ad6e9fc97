"""Explain a whole archive: every image of a folder, a glob, a list of paths or a tar/zip
archive, streamed to a Parquet dataset, resumable, on one machine or on a Ray cluster.

    import cam, pandas
    summary = cam.bulk("model.keras", "images/", "maps/", layer="relu",
                       methods="gradcam,fastablationcam")
    print(summary)                                   # counts and where the time went
    rows = pandas.read_parquet("maps/maps")          # one row per image and method
    raw = rows.map[0].reshape(rows.map_height[0], rows.map_width[0])

From a shell: ``python -m cam bulk MODEL INPUT --layer L --method M[,M...] --out DIR``
(docs/command-line.md).

The pieces both engines share, so that they write the same rows:

* :func:`list_inputs`: the input's images as :class:`Source` s (a relative name and where to
  read it), sorted by name;
* :func:`prepare`: one image read, hashed, checked against what is already done, decoded and
  preprocessed, or the reason it cannot be (an :class:`Item`);
* :class:`BatchExplainer`: the model and one explainer per method, built once per process or
  Ray actor; :meth:`BatchExplainer.rows` turns a batch of prepared images into the dataset's
  rows (one trunk pass shared by every method, :meth:`cam.Explainer.features`);
* :func:`write_table`: a Parquet file written atomically (a temporary name, then
  :func:`os.replace`), so a killed run leaves whole shards or none.

``engine="local"`` (:func:`bulk`) reads and decodes in a thread pool ahead of the explain
calls and writes shards in a background thread; ``engine="ray"`` is :mod:`cam.bulk_ray`.

Environment: ``CAM_BULK_TEST_PAUSE`` (seconds) makes the local engine pause after each batch,
so a test can kill a run mid-way; it is for tests only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import glob
import hashlib
import importlib
import json
import os
import queue
import shutil
import sys
import tarfile
import threading
import time
import types
import uuid
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import METHODS, method_key
from ._optional import require

ENGINES = ("local", "ray")
#: Named preprocessings (``preprocess=``); anything else is a ``module:function``.
PREPROCESSINGS = ("square",)
#: Where the rows go, under ``out``: a folder of Parquet shards (one Parquet dataset).
MAPS = "maps"
ERRORS = "errors.parquet"
MANIFEST = "manifest.json"
OVERLAYS = "overlays"
#: Most images in one batch when the memory budget allows more (host memory for the decoded
#: images, and the granularity of resuming).
MAX_BATCH = 256
PAUSE = "CAM_BULK_TEST_PAUSE"


def _pyarrow():
    require("pyarrow.parquet", "cam.bulk (writing Parquet)")
    import pyarrow

    return pyarrow


def schema():
    """The dataset's columns: one row per image and method."""
    pa = _pyarrow()
    return pa.schema([
        ("path", pa.string()),           # relative to the input's root (an archive's member)
        ("sha256", pa.string()),         # of the file's bytes: what a rerun skips by
        ("height", pa.int32()),          # the image as decoded, before preprocessing
        ("width", pa.int32()),
        ("predicted", pa.int32()),       # argmax of the scores; null for a non-class output
        ("predicted_score", pa.float32()),
        ("target", pa.string()),         # what was explained, as given ("predicted" by default)
        ("target_class", pa.int32()),    # the class explained; null for a non-class target
        ("target_score", pa.float32()),  # the explained target's score
        ("method", pa.string()),         # the registry key: gradcam, fastablationcam, ...
        ("layer", pa.string()),
        ("map", pa.list_(pa.float32())),  # the raw map on the layer's grid, row-major
        ("map_height", pa.int32()),
        ("map_width", pa.int32()),
        ("map_min", pa.float32()),
        ("map_max", pa.float32()),
        ("seconds", pa.float64()),       # this image's share of its batch's trunk and method calls
    ])


def error_schema():
    """``errors.parquet``: one row per image that could not be explained."""
    pa = _pyarrow()
    return pa.schema([("path", pa.string()), ("sha256", pa.string()), ("stage", pa.string()),
                      ("reason", pa.string())])


# -- inputs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input image: ``name`` (the path relative to the input's root, what rows record),
    the ``file`` to read and, inside an archive, its ``member``."""

    name: str
    file: str
    member: str | None = None


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
INPUT_KINDS = "a folder, a glob (quoted), a text file of paths (one a line) or a .tar/.zip archive"


def list_inputs(inputs: str | os.PathLike) -> tuple[str, list[Source]]:
    """(what the input is, its images sorted by name): a folder (every file under it, hidden
    ones left out), a glob, a text file of paths (one a line; relative to the file's folder;
    blank lines and ``#`` comments skipped) or a tar/zip archive (every file member)."""
    text = str(inputs)
    path = Path(text)
    if path.is_dir():
        kind, sources = "folder", [Source(p.relative_to(path).as_posix(), str(p))
                                   for p in path.rglob("*") if p.is_file()
                                   and not any(part.startswith(".")
                                               for part in p.relative_to(path).parts)]
    elif path.is_file() and (text.lower().endswith(ARCHIVE_SUFFIXES) or zipfile.is_zipfile(path)
                             or tarfile.is_tarfile(path)):
        kind, sources = "archive", _archive_members(path)
    elif path.is_file():
        kind, sources = "list", _listed(path)
    elif glob.has_magic(text):
        root = Path(*[p for p in Path(text).parts[:next(
            i for i, p in enumerate(Path(text).parts) if glob.has_magic(p))]] or ["."])
        kind = "glob"
        sources = [Source(_relative(Path(p), root), p)
                   for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"input {text!r} does not exist; give {INPUT_KINDS}")
    if not sources:
        raise ValueError(f"input {text!r} ({kind}) holds no files; give {INPUT_KINDS}")
    return kind, sorted(sources, key=lambda s: s.name)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # outside the root: keep it whole
        return path.resolve().as_posix()


def _listed(path: Path) -> list[Source]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"input {str(path)!r} is a file but neither an archive nor a text "
                         f"list of paths; give {INPUT_KINDS}") from None
    root = path.parent
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [Source(_relative(root / e, root), str(root / e)) for e in entries]


def _archive_members(path: Path) -> list[Source]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [i.filename for i in archive.infolist() if not i.is_dir()]
    else:
        try:
            with tarfile.open(path) as archive:
                names = [m.name for m in archive.getmembers() if m.isfile()]
        except tarfile.TarError as err:
            raise ValueError(f"cannot read the archive {str(path)!r}: {err}") from err
    return [Source(name, str(path), name) for name in names]


class Reader:
    """Reads sources' bytes; an archive is opened once per thread and closed with the reader."""

    def __init__(self):
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()

    def read(self, source: Source) -> bytes:
        if source.member is None:
            return Path(source.file).read_bytes()
        archives = self._local.__dict__.setdefault("archives", {})
        if source.file not in archives:
            archive = (zipfile.ZipFile(source.file) if zipfile.is_zipfile(source.file)
                       else tarfile.open(source.file))
            archives[source.file] = archive
            with self._lock:
                self._opened.append(archive)
        archive = archives[source.file]
        if isinstance(archive, zipfile.ZipFile):
            return archive.read(source.member)
        return archive.extractfile(source.member).read()

    def close(self) -> None:
        with self._lock:
            for archive in self._opened:
                archive.close()
            self._opened.clear()


# -- preprocessing ---------------------------------------------------------------------------

def square(image: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """``python -m cam explain``'s preprocessing (:func:`cam.images.fit_to_input`)."""
    from .images import fit_to_input

    return fit_to_input(image, height, width, channels)


def load_function(spec: str, what: str):
    """``module:function`` -> the function, or a ValueError saying what went wrong."""
    module, colon, name = spec.partition(":")
    if not colon or not module or not name:
        raise ValueError(f"{what} {spec!r}: write module:function")
    try:
        function = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import {module!r} ({err})") from err
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: {module!r} has no {name!r}") from None
    if not callable(function):
        raise ValueError(f"{what} {spec!r} is not callable")
    return function


def preprocessing(spec):
    """A preprocessing: a name in :data:`PREPROCESSINGS`, a ``module:function`` or a
    function ``f(rgb uint8 (h, w, 3), height, width, channels) -> (height, width, channels)``."""
    if callable(spec):
        return spec
    if spec == "square":
        return square
    if ":" not in str(spec):
        raise ValueError(f"unknown preprocessing {spec!r}; give one of "
                         f"{', '.join(PREPROCESSINGS)} or module:function")
    return load_function(spec, "--preprocess")


# -- one image -------------------------------------------------------------------------------

@dataclass
class Item:
    """One source after :func:`prepare`: ``image`` preprocessed for the model and ``needs``
    (the methods still to run on it); or ``stage`` and ``reason`` when it cannot be explained;
    or ``needs`` empty when every method already has its rows."""

    name: str
    sha256: str | None = None
    height: int = 0
    width: int = 0
    image: np.ndarray | None = None
    needs: tuple = ()
    stage: str | None = None
    reason: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.reason is not None


def prepare(source: Source, reader: Reader, methods, done, preprocess, input_shape) -> Item:
    """Read, hash, skip (when ``done[sha256]`` holds every method), decode and preprocess one
    image. Never raises for a bad image: the :class:`Item` says why."""
    from .images import read_rgb

    start = time.perf_counter()
    item = Item(source.name)
    try:
        data = reader.read(source)
    except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile) as err:
        item.stage, item.reason = "read", f"cannot read it: {err}"
        return item
    item.sha256 = hashlib.sha256(data).hexdigest()
    item.needs = tuple(m for m in methods if m not in done.get(item.sha256, ()))
    if not item.needs:
        return item
    if not data:
        item.stage, item.reason = "decode", "empty file (0 bytes)"
        return item
    try:
        rgb = read_rgb(source.name, data)
    except ValueError as err:  # cam.images.ImageError
        item.stage, item.reason = "decode", str(err)
        return item
    item.height, item.width = rgb.shape[:2]
    height, width, channels = input_shape
    try:
        image = np.asarray(preprocess(rgb, height, width, channels), dtype=np.float32)
    except Exception as err:  # a user's preprocessing: any failure is this image's
        item.stage, item.reason = "preprocess", f"{type(err).__name__}: {err}"
        return item
    if image.shape != (height, width, channels) or not np.isfinite(image).all():
        item.stage = "preprocess"
        item.reason = (f"the preprocessing returned shape {image.shape}, the model takes "
                       f"{(height, width, channels)}" if image.shape != (height, width, channels)
                       else "the preprocessing returned non-finite pixels")
        return item
    item.image = image
    item.seconds = time.perf_counter() - start
    return item


# -- the model and its explainers ------------------------------------------------------------

def load_model(model, imports=()):
    """A Keras model from a ``.keras`` file (safe mode), a ``module:function`` returning one,
    or a model as it is."""
    from .cli import _import_modules, _load_model

    if not isinstance(model, (str, os.PathLike)):
        return model
    text = str(model)
    if text.endswith(".keras") or Path(text).exists():
        return _load_model(text, imports)
    _import_modules(imports)
    import keras

    built = load_function(text, "model")()
    if not isinstance(built, keras.Model):
        raise ValueError(f"model {text!r} returned {type(built).__name__}, not a keras.Model")
    return built


def model_hash(model, spec) -> str:
    """sha256 of the ``.keras`` file, else of the model's weights (name, shape and bytes)."""
    digest = hashlib.sha256()
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        with open(spec, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for weight in model.weights:
        value = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        digest.update(f"{weight.path}{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class BatchExplainer:
    """The model and one explainer per method at one layer, built once (per process, or per
    Ray actor); :meth:`rows` is the per-batch row-making both engines call."""

    def __init__(self, model, layer, methods: dict, score: str = "logit", target=None,
                 target_text: str = "predicted"):
        from .methods import method_class

        self.model = model
        self.explainers = {key: method_class(key)(model, layer, score=score, **options)
                           for key, options in methods.items()}
        first = next(iter(self.explainers.values()))
        self.layer = str(first.layer)
        self.target, self.target_text = target, target_text
        shape = model.input_shape
        if isinstance(shape, list) or len(shape) != 4 or None in shape[1:]:
            raise ValueError(f"the model's input shape is {shape}; cam.bulk needs a fixed "
                             f"(batch, height, width, channels) input")
        self.input_shape = tuple(int(s) for s in shape[1:])

    def batch_size(self) -> int:
        """Images a batch takes: what one trunk call fits in the memory budget
        (:mod:`cam.batching`), at most :data:`MAX_BATCH`."""
        first = next(iter(self.explainers.values()))
        return int(min(MAX_BATCH, first.rows_per_call("trunk")))

    def rows(self, images: np.ndarray, items: list[Item]):
        """The dataset's rows (a pyarrow Table in :func:`schema`) for one batch: ``images``
        (B, H, W, C) float32, ``items`` their :class:`Item` s (name, hash, size, needs)."""
        pa = _pyarrow()
        columns = {name: [] for name in schema().names}
        start = time.perf_counter()
        everyone = [key for key in self.explainers if all(key in i.needs for i in items)]
        shared = next(iter(self.explainers.values())).features(images) if everyone else None
        trunk = time.perf_counter() - start
        for key, explainer in self.explainers.items():
            chosen = [i for i, item in enumerate(items) if key in item.needs]
            if not chosen:
                continue
            start = time.perf_counter()
            if key in everyone:
                result = explainer.explain(images, self.target, upsample=False,
                                           normalize=False, features=shared)
            else:  # some images already have this method's rows: only the others
                result = explainer.explain(images[chosen], self.target, upsample=False,
                                           normalize=False)
            seconds = (time.perf_counter() - start + (trunk / len(everyone)
                                                      if key in everyone else 0.0))
            scores = result.scores
            classifier = isinstance(scores, np.ndarray) and scores.ndim == 2
            for j, i in enumerate(chosen):
                raw = np.asarray(result.raw[j], np.float32)
                predicted = int(scores[j].argmax()) if classifier else None
                columns["path"].append(items[i].name)
                columns["sha256"].append(items[i].sha256)
                columns["height"].append(items[i].height)
                columns["width"].append(items[i].width)
                columns["predicted"].append(predicted)
                columns["predicted_score"].append(float(scores[j, predicted]) if classifier
                                                  else None)
                columns["target"].append(self.target_text)
                columns["target_class"].append(None if result.targets is None
                                               else int(result.targets[j]))
                columns["target_score"].append(float(result.target_scores[j]))
                columns["method"].append(key)
                columns["layer"].append(self.layer)
                columns["map"].append(raw.ravel())
                columns["map_height"].append(raw.shape[0])
                columns["map_width"].append(raw.shape[1])
                columns["map_min"].append(float(raw.min()))
                columns["map_max"].append(float(raw.max()))
                columns["seconds"].append(seconds / len(chosen))
        return pa.Table.from_pydict(columns, schema=schema())


# -- writing ---------------------------------------------------------------------------------

def write_table(table, path: Path) -> None:
    """``table`` to ``path`` as Parquet, atomically: a hidden temporary name in the same folder
    (which Parquet readers skip), then :func:`os.replace`."""
    _pyarrow()
    import pyarrow.parquet as pq

    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def write_json(data: dict, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def completed(out: Path) -> dict[str, set]:
    """sha256 -> the methods that already have rows in ``out``'s dataset."""
    done: dict[str, set] = {}
    folder = out / MAPS
    if not folder.is_dir():
        return done
    _pyarrow()
    import pyarrow.parquet as pq

    for shard in sorted(folder.glob("*.parquet")):
        if shard.name.startswith((".", "_")):
            continue
        table = pq.read_table(shard, columns=["sha256", "method"])
        for sha, method in zip(table.column("sha256").to_pylist(),
                               table.column("method").to_pylist()):
            done.setdefault(sha, set()).add(method)
    return done


def salvage(out: Path) -> None:
    """Commit what a killed Ray run staged (``out/.ray-RUN/``): the files that read back whole
    become shards, the rest are dropped (:func:`cam.bulk_ray.commit`)."""
    from .bulk_ray import commit

    for staging in sorted(out.glob(".ray-*")):
        commit(staging, out, staging.name.removeprefix(".ray-"), salvage=True)


def overlay_path(out: Path, name: str, method: str) -> Path:
    stem = Path(name)
    return out / OVERLAYS / stem.parent / f"{stem.name.replace('.', '_')}-{method}.png"


def _save_overlays(out: Path, table, images_by_name: dict, alpha: float) -> None:
    from . import maps as M
    from .cli import _save_overlay

    for name, method, flat, h, w in zip(*(table.column(c).to_pylist() for c in
                                          ("path", "method", "map", "map_height", "map_width"))):
        image = images_by_name[name]
        raw = np.asarray(flat, np.float32).reshape(1, h, w)
        saliency = M.upsample_maps(M.normalize_maps(raw), image.shape[:2])[0]
        path = overlay_path(out, name, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_overlay(path, image, saliency, alpha, 0.0)


class Writer:
    """Writes shards (and overlays) in a background thread, in the order they come; an error
    there is raised in the caller at the next :meth:`put` or at :meth:`close`."""

    def __init__(self, out: Path, run: str, overlays: bool, alpha: float):
        self.out, self.run, self.overlays, self.alpha = out, run, overlays, alpha
        self.shards = self.rows = 0
        self.seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="cam-bulk-writer", daemon=True)
        self._thread.start()

    def _work(self):
        while (job := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                start = time.perf_counter()
                table, images = job
                write_table(table, self.out / MAPS / f"part-{self.run}-{self.shards:06d}.parquet")
                if self.overlays:
                    _save_overlays(self.out, table, images, self.alpha)
                self.shards += 1
                self.rows += table.num_rows
                self.seconds += time.perf_counter() - start
            except BaseException as err:  # raised in the caller's thread
                self._error = err

    def _raise(self):
        if self._error is not None:
            raise RuntimeError(f"writing to {self.out} failed: {self._error}") from self._error

    def put(self, table, images: dict) -> None:
        self._raise()
        self._queue.put((table, images))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()


# -- the run ---------------------------------------------------------------------------------

@dataclass
class Summary:
    """What a :func:`bulk` run did: counts of images (``listed`` = ``explained`` +
    ``skipped`` + ``failed``), rows and shards written, wall ``seconds`` and the busy seconds of
    each stage (``decode``: reading, hashing, decoding and preprocessing, summed over the
    decoding threads or tasks; ``explain``; ``write``)."""

    out: Path
    engine: str
    listed: int = 0
    explained: int = 0
    skipped: int = 0
    failed: int = 0
    rows: int = 0
    shards: int = 0
    seconds: float = 0.0
    stages: dict = field(default_factory=lambda: {"decode": 0.0, "explain": 0.0, "write": 0.0})

    @property
    def images_per_second(self) -> float:
        return self.explained / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every image has its rows, 1 when some are in ``errors.parquet``."""
        return 1 if self.failed else 0

    def __str__(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items())
        lines = [f"{self.listed} images: {self.explained} explained, {self.skipped} already "
                 f"done, {self.failed} failed; {self.rows} rows in {self.shards} shards in "
                 f"{self.out / MAPS}",
                 f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s, engine "
                 f"{self.engine}); busy time: {stages}"]
        if self.failed:
            lines.append(f"the failed images and why: {self.out / ERRORS}")
        return "\n".join(lines)


def _method_settings(methods, settings) -> dict:
    """``{key: constructor options}`` for ``methods`` ("a,b" or a sequence), checked against
    each method's declared settings. ``settings``: None, ``{method: {name: value}}``, or
    command-line ``NAME=VALUE`` / ``METHOD.NAME=VALUE`` strings (a bare NAME applies to every
    method that declares it)."""
    from .cli import parse_settings
    from .methods import method_class

    names = methods.split(",") if isinstance(methods, str) else list(methods)
    keys = list(dict.fromkeys(method_key(m.strip()) for m in names if str(m).strip()))
    if not keys:
        raise ValueError(f"give at least one method: {', '.join(METHODS)}")
    chosen = {key: {} for key in keys}
    if settings is None:
        return chosen
    if isinstance(settings, dict):
        for method, options in settings.items():
            key = method_key(method)
            if key not in chosen:
                raise ValueError(f"settings for {method!r}, which is not among the methods "
                                 f"{', '.join(keys)}")
            chosen[key] = parse_settings(method_class(key), key,
                                         [f"{k}={v}" for k, v in options.items()])
        return chosen
    pairs: dict = {key: [] for key in keys}
    for pair in settings:
        name, equals, value = pair.partition("=")
        method, dot, bare = name.strip().rpartition(".")
        if dot:
            key = method_key(method)
            if key not in pairs:
                raise ValueError(f"--set {pair}: {method!r} is not among the methods "
                                 f"{', '.join(keys)}")
            pairs[key].append(f"{bare}={value}" if equals else pair)
            continue
        takers = [k for k in keys if any(s.name == bare for s in method_class(k).SETTINGS)]
        if not takers or not equals:
            declared = {k: [s.name for s in method_class(k).SETTINGS] for k in keys}
            raise ValueError(f"--set {pair}: none of the methods has a setting {bare!r}; they "
                             f"declare {declared} (`python -m cam methods`)" if equals else
                             f"--set {pair!r}: write NAME=VALUE or METHOD.NAME=VALUE")
        for key in takers:
            pairs[key].append(pair)
    return {key: parse_settings(method_class(key), key, pairs[key]) for key in keys}


def _target(target):
    """(the target for the explainers, its text for the rows): None is each image's
    predicted class; a string is parsed as ``--target`` is (:func:`cam.cli.parse_target`)."""
    if target is None:
        return None, "predicted"
    if isinstance(target, str):
        from .cli import parse_target

        return parse_target(target), target
    return target, repr(target)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _clear(out: Path) -> None:
    """What a run writes under ``out`` (and nothing else there)."""
    for name in (MAPS, OVERLAYS):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (ERRORS, MANIFEST):
        (out / name).unlink(missing_ok=True)
    for leftover in out.glob(".ray-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def bulk(model, inputs, out, *, layer=None, methods="fastablationcam", settings=None,
         target=None, score: str = "logit", preprocess="square", batch_size: int | None = None,
         workers: int | None = None, overlays: bool = False, alpha: float = 0.5,
         engine: str = "local", address: str | None = None, num_cpus: int | None = None,
         actors: int = 1, gpus_per_actor: float = 0.0, overwrite: bool = False, imports=(),
         progress: bool = True) -> Summary:
    """Explain every image of ``inputs`` with every method at one layer into the Parquet
    dataset ``out/maps`` (one row per image and method, :func:`schema`); images that cannot be
    explained go to ``out/errors.parquet`` with the reason; ``out/manifest.json`` records the
    run. A rerun skips the images (by content hash) that already have rows for every method;
    ``overwrite`` starts afresh.

    ``model``: a ``.keras`` file (loaded in safe mode), a ``module:function`` returning a
    model, or a model. ``inputs``: a folder, a glob, a text file of paths or a tar/zip
    archive. ``methods``: ``"gradcam,fastablationcam"`` or a sequence; ``settings``:
    ``{method: {name: value}}`` or ``--set`` strings. ``target``: None (each image's predicted
    class), a ``--target`` string or a :mod:`cam.targets` target. ``preprocess``: ``"square"``
    (``python -m cam explain``'s), ``module:function`` or a function ``f(rgb, height, width,
    channels)``. ``batch_size``: images per batch (default: what one trunk call fits in the
    memory budget, at most :data:`MAX_BATCH`). ``workers``: decoding threads (local) or CPUs
    Ray starts with (ray, ``num_cpus``). ``engine="ray"``: :mod:`cam.bulk_ray` (``address``
    joins a cluster; ``actors`` explainer actors with ``gpus_per_actor`` GPUs each).

    Every argument is checked, and the model and explainers built, before any image is read.
    Returns a :class:`Summary`.
    """
    started, wall = _now(), time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "ray":
        require("ray.data", "engine='ray'")
        if overlays:
            raise ValueError("overlays are drawn by the local engine only; rerun with "
                             "--engine local --overlays on the same out folder to add them")
        if not isinstance(actors, int) or actors < 1 or gpus_per_actor < 0:
            raise ValueError(f"actors must be an int >= 1 and gpus_per_actor >= 0, got "
                             f"{actors!r} and {gpus_per_actor!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an int >= 1 or None (the CPU count), got {workers!r}")
    _pyarrow()
    import pyarrow.parquet  # noqa: F401  (a missing pyarrow fails here, before any work)

    # What can be checked without Keras first (a method from an imported module is known
    # only once it is imported), then Keras quietly, then the rest.
    if not imports:
        for name in (methods.split(",") if isinstance(methods, str) else methods):
            method_key(str(name).strip())
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None (the memory budget), got "
                         f"{batch_size!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kind, sources = list_inputs(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; give a folder")
    from .cli import _import_backend, _import_modules

    _import_backend()
    _import_modules(imports)
    chosen = _method_settings(methods, settings)
    explained_target, target_text = _target(target)
    preprocess_fn = preprocessing(preprocess)
    keras_model = load_model(model, imports)
    worker = BatchExplainer(keras_model, layer, chosen, score, explained_target, target_text)
    batch = batch_size or worker.batch_size()
    import keras

    from . import __version__
    from . import backend as B

    config = {
        "model_sha256": model_hash(keras_model, model), "layer": worker.layer,
        "score": score, "target": target_text,
        "preprocess": preprocess if isinstance(preprocess, str)
        else f"{preprocess.__module__}:{preprocess.__qualname__}",
    }
    if overwrite:
        _clear(out)
    previous = out / MANIFEST
    if previous.is_file():
        old = json.loads(previous.read_text())
        differ = {k: (old.get("config", {}).get(k), v) for k, v in config.items()
                  if old.get("config", {}).get(k) != v}
        differ.update({f"{k} settings": (old["methods"][k], v) for k, v in chosen.items()
                       if k in old.get("methods", {}) and old["methods"][k] != v})
        if differ:
            raise ValueError(f"{out} holds a run with other settings ("
                             + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b)
                                         in differ.items())
                             + "): pass overwrite=True (--overwrite) or another out folder")
        methods_done = {**old.get("methods", {}), **chosen}
    else:
        methods_done = dict(chosen)
    (out / MAPS).mkdir(parents=True, exist_ok=True)
    manifest = {"config": config, "methods": methods_done, "input": str(inputs),
                "model": str(model) if isinstance(model, (str, os.PathLike)) else keras_model.name,
                "input_kind": kind, "engine": engine, "batch_size": batch,
                "cam": __version__, "keras": keras.__version__, "backend": B.name(),
                "started": started, "finished": None, "counts": None}
    write_json(manifest, previous)
    salvage(out)
    done = completed(out)
    summary = Summary(out=out, engine=engine, listed=len(sources))
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + \
        f"-{uuid.uuid4().hex[:6]}"
    common = dict(sources=sources, methods=list(chosen), done=done, preprocess=preprocess_fn,
                  input_shape=worker.input_shape, batch=batch, out=out, run=run,
                  summary=summary, overlays=overlays, alpha=alpha, progress=progress)
    if engine == "local":
        errors = _run_local(worker, workers=workers, **common)
    else:
        from . import bulk_ray

        if not isinstance(model, (str, os.PathLike)):
            spec = keras_model  # shipped to the actors as a .keras archive
        else:  # a file the actors load by its absolute path, or module:function
            spec = os.path.abspath(model) if Path(model).exists() else str(model)
        errors = bulk_ray.run(model=spec, layer=layer, chosen=chosen, score=score,
                              target=explained_target, target_text=target_text,
                              imports=list(imports), address=address, num_cpus=num_cpus,
                              actors=actors, gpus_per_actor=gpus_per_actor, **common)
    pa = _pyarrow()
    start = time.perf_counter()
    write_table(pa.Table.from_pylist(errors, schema=error_schema()), out / ERRORS)
    summary.stages["write"] += time.perf_counter() - start
    summary.failed = len(errors)
    summary.skipped = summary.listed - summary.explained - summary.failed
    summary.seconds = time.perf_counter() - wall
    manifest.update(finished=_now(), seconds=round(summary.seconds, 3),
                    stages={k: round(v, 3) for k, v in summary.stages.items()},
                    counts={k: getattr(summary, k) for k in
                            ("listed", "explained", "skipped", "failed", "rows", "shards")})
    write_json(manifest, previous)
    return summary


def _batches(sources, reader, pool, lookahead, **prepare_args):
    """The prepared :class:`Item` s in order, at most ``lookahead`` decoding ahead."""
    pending: deque = deque()
    iterator = iter(sources)
    while True:
        while len(pending) < lookahead:
            source = next(iterator, None)
            if source is None:
                break
            pending.append(pool.submit(prepare, source, reader, **prepare_args))
        if not pending:
            return
        yield pending.popleft().result()


def _run_local(worker, *, sources, methods, done, preprocess, input_shape, batch, out, run,
               summary, overlays, alpha, progress, workers) -> list[dict]:
    """The local engine: decoding threads ahead of the explain calls, a writer thread behind."""
    from tqdm.auto import tqdm

    workers = workers or min(8, os.cpu_count() or 1)
    pause = float(os.environ.get(PAUSE) or 0)
    errors: list[dict] = []
    reader = Reader()
    writer = Writer(out, run, overlays, alpha)
    bar = tqdm(total=len(sources), unit="image", desc="cam bulk", disable=not progress,
               file=sys.stderr)
    pending: list[Item] = []

    def flush():
        start = time.perf_counter()
        images = np.stack([item.image for item in pending])
        table = worker.rows(images, pending)
        summary.stages["explain"] += time.perf_counter() - start
        writer.put(table, {item.name: item.image for item in pending} if overlays else {})
        summary.explained += len(pending)
        bar.update(len(pending))
        pending.clear()
        if pause:
            time.sleep(pause)

    try:
        with concurrent.futures.ThreadPoolExecutor(workers, "cam-bulk-decode") as pool:
            for item in _batches(sources, reader, pool, lookahead=2 * batch + workers,
                                 methods=methods, done=done, preprocess=preprocess,
                                 input_shape=input_shape):
                summary.stages["decode"] += item.seconds
                if item.failed:
                    errors.append({"path": item.name, "sha256": item.sha256,
                                   "stage": item.stage, "reason": item.reason})
                    bar.update()
                elif not item.needs:
                    bar.update()
                else:
                    pending.append(item)
                    if len(pending) == batch:
                        flush()
            if pending:
                flush()
    except BaseException:  # the first error is the one to see; the writer's comes second
        bar.close()
        reader.close()
        with contextlib.suppress(Exception):
            writer.close()
        raise
    bar.close()
    reader.close()
    writer.close()
    summary.rows, summary.shards = writer.rows, writer.shards
    summary.stages["write"] += writer.seconds
    return errors


class _CallableModule(types.ModuleType):
    """``cam.bulk(...)`` calls :func:`bulk`: the module is also the function, whichever of the
    two ``cam.bulk`` resolves to (``import cam.bulk`` binds the module on the package)."""

    def __call__(self, *args, **kwargs) -> Summary:
        return bulk(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
