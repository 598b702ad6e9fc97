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

This module is :func:`bulk` (its argument checks, the manifest, the rerun rules), its
:class:`Summary`, and the local engine. The pieces both engines share, so that they write the
same rows, live beside it (and are importable from here as before):

* :mod:`cam.bulk_inputs`: :func:`list_inputs` (the input's images as :class:`Source` s) and
  :func:`prepare` (one image read, hashed, decoded and preprocessed, or why not: an
  :class:`Item`);
* :mod:`cam.bulk_explainer`: :class:`BatchExplainer`, the model and one explainer per method,
  whose :meth:`~BatchExplainer.rows` turns a batch of prepared images into rows;
* :mod:`cam.bulk_output`: the folder's layout, :func:`schema`, :func:`write_table` (atomic),
  :func:`completed` (what a rerun skips) and the :class:`Writer` thread.

``engine="local"`` (:func:`bulk`) reads and decodes in a thread pool ahead of the explain
calls and writes shards in a background thread; ``engine="ray"`` is :mod:`cam.bulk_ray`.

Environment: ``CAM_BULK_TEST_PAUSE`` (seconds) makes the local engine pause after each batch,
so a test can kill a run mid-way; it is for tests only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import sys
import time
import types
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import METHODS, bulk_ray, method_key
from ._optional import require
# Re-exported: cam.bulk.list_inputs, cam.bulk.BatchExplainer, cam.bulk.schema, ... as before.
from .bulk_explainer import MAX_BATCH, BatchExplainer, load_model, model_hash  # noqa: F401
from .bulk_inputs import (ARCHIVE_SUFFIXES, INPUT_KINDS, PREPROCESSINGS, Item,  # noqa: F401
                          Reader, Source, list_inputs, load_function, prepare, preprocessing,
                          square)
from .bulk_output import (ERRORS, MANIFEST, MAPS, OVERLAYS, Writer, _pyarrow,  # noqa: F401
                          clear, completed, error_schema, overlay_path, schema, write_json,
                          write_table)
from .bulk_ray import salvage

ENGINES = ("local", "ray")
PAUSE = "CAM_BULK_TEST_PAUSE"


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
        clear(out)
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


# -- the local engine ----------------------------------------------------------------------

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
