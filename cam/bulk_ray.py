"""The Ray engine of :func:`cam.bulk` (``engine="ray"``; ``pip install 'cam[ray]'``).

A Ray Data pipeline over the sources :func:`cam.bulk_inputs.list_inputs` found:

1. ``from_items``: the sources (name, file, archive member), listed by the driver;
2. ``map_batches(_decode)``: tasks on CPUs read, hash, skip and decode them
   (:func:`cam.bulk_inputs.prepare`, what the local engine's threads run);
3. ``map_batches(_Explain, compute=ActorPoolStrategy(size=actors), num_gpus=...)``: each actor
   builds the model and its explainers once (:class:`cam.bulk_explainer.BatchExplainer`) and
   turns batches into rows with :meth:`~cam.bulk_explainer.BatchExplainer.rows`, the local
   engine's function;
4. ``write_parquet`` into a hidden staging folder ``OUT/.ray-RUN/``.

Ray writes its files in place, not atomically, so the driver then commits them (:func:`commit`):
each staged file's rows become a shard of ``OUT/maps`` written atomically by
:func:`cam.bulk_output.write_table` (the images that failed go to ``errors.parquet``). A run
killed before its commit leaves the staging folder; the next run commits every staged file
that reads back whole (:func:`salvage`) and drops the rest, so only a killed run's unfinished
files are redone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .bulk_explainer import BatchExplainer, load_model
from .bulk_inputs import Item, Reader, Source, prepare
from .bulk_output import MAPS, _pyarrow, schema, write_table


def _extra_schema():
    pa = _pyarrow()
    return pa.schema([("status", pa.string()), ("stage", pa.string()),
                      ("reason", pa.string()), ("decode_seconds", pa.float64())])


def staged_schema():
    """What the explaining actors return and Ray writes: :func:`cam.bulk_output.schema` plus each
    image's status (ok, skip or error), the failure's stage and reason, and its decode time."""
    pa = _pyarrow()
    return pa.schema(list(schema()) + list(_extra_schema()))


def _decode(batch: dict, *, methods, done, preprocess, input_shape) -> dict:
    """A batch of sources -> prepared images (zeros where an image failed or was skipped)."""
    reader = Reader()
    try:
        items = [prepare(Source(str(n), str(f), str(m) or None), reader, methods, done,
                         preprocess, input_shape)
                 for n, f, m in zip(batch["name"], batch["file"], batch["member"])]
    finally:
        reader.close()
    images = np.zeros((len(items), *input_shape), np.float32)
    for i, item in enumerate(items):
        if item.image is not None:
            images[i] = item.image
    return {
        "name": np.array([i.name for i in items], dtype=object),
        "sha256": np.array([i.sha256 or "" for i in items], dtype=object),
        "height": np.array([i.height for i in items], np.int32),
        "width": np.array([i.width for i in items], np.int32),
        "needs": np.array([",".join(i.needs) for i in items], dtype=object),
        "status": np.array(["error" if i.failed else "ok" if i.needs else "skip"
                            for i in items], dtype=object),
        "stage": np.array([i.stage or "" for i in items], dtype=object),
        "reason": np.array([i.reason or "" for i in items], dtype=object),
        "decode_seconds": np.array([i.seconds for i in items], np.float64),
        "image": images,
    }


class _Explain:
    """An explaining actor: the model and its explainers, built once."""

    def __init__(self, model, model_bytes, imports, layer, chosen, score, target, target_text,
                 backend):
        # The driver's backend, whatever this worker's environment says: set before the
        # actor's process imports Keras (no runtime environment to set it, so Ray can use a
        # worker it has already started).
        os.environ["KERAS_BACKEND"] = backend
        from .cli import _import_backend, _import_modules

        _import_backend()
        from . import backend as B

        if B.name() != backend:
            raise RuntimeError(f"this Ray worker had imported Keras with the {B.name()} "
                               f"backend before; the driver runs {backend}")
        _import_modules(imports)
        if model_bytes is not None:  # a model object from Python: shipped as a .keras archive
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.keras"
                path.write_bytes(model_bytes)
                model = load_model(str(path), imports)
        else:
            model = load_model(model, imports)
        self.worker = BatchExplainer(model, layer, chosen, score, target, target_text)

    def __call__(self, batch: dict):
        pa = _pyarrow()
        status = [str(s) for s in batch["status"]]
        ok = [i for i, s in enumerate(status) if s == "ok"]
        items = [Item(str(batch["name"][i]), str(batch["sha256"][i]),
                      int(batch["height"][i]), int(batch["width"][i]),
                      needs=tuple(str(batch["needs"][i]).split(",")),
                      seconds=float(batch["decode_seconds"][i])) for i in ok]
        rows = (self.worker.rows(np.asarray(batch["image"])[ok], items) if ok
                else schema().empty_table())
        by_name = {item.name: item for item in items}
        paths = rows.column("path").to_pylist()
        extra = pa.table({"status": ["ok"] * len(paths), "stage": [None] * len(paths),
                          "reason": [None] * len(paths),
                          "decode_seconds": [by_name[p].seconds for p in paths]},
                         schema=_extra_schema())
        explained = pa.Table.from_arrays(rows.columns + extra.columns, schema=staged_schema())
        others = [i for i, s in enumerate(status) if s != "ok"]
        marks = {name: [None] * len(others) for name in staged_schema().names}
        marks.update(path=[str(batch["name"][i]) for i in others],
                     sha256=[str(batch["sha256"][i]) or None for i in others],
                     status=[status[i] for i in others],
                     stage=[str(batch["stage"][i]) or None for i in others],
                     reason=[str(batch["reason"][i]) or None for i in others],
                     decode_seconds=[float(batch["decode_seconds"][i]) for i in others])
        return pa.concat_tables([explained, pa.Table.from_pydict(marks,
                                                                   schema=staged_schema())])


def _model_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def run(*, model, layer, chosen, score, target, target_text, imports, address, num_cpus,
        actors, gpus_per_actor, sources, methods, done, preprocess, input_shape, batch, out,
        run, summary, overlays, alpha, progress) -> list[dict]:
    """Run the pipeline (starting Ray on this machine unless ``address`` or an initialised Ray
    says where), commit what it wrote, and return the errors."""
    import ray

    from . import backend as B

    temporary = None
    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, log_to_driver=progress)
    elif started:
        temporary = tempfile.mkdtemp(prefix="cam-ray-")
        ray.init(num_cpus=num_cpus, _temp_dir=temporary, include_dashboard=False,
                 log_to_driver=progress)
    staging = out / f".ray-{run}"
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = progress
        items = [{"name": s.name, "file": os.path.abspath(s.file), "member": s.member or ""} for s in sources]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch)))
        dataset = dataset.map_batches(
            _decode, batch_size=batch, batch_format="numpy", num_cpus=1,
            fn_kwargs=dict(methods=methods, done=done, preprocess=preprocess,
                           input_shape=input_shape))
        is_path = isinstance(model, (str, os.PathLike))
        dataset = dataset.map_batches(
            _Explain, batch_size=batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
            num_gpus=gpus_per_actor or None,
            fn_constructor_kwargs=dict(model=str(model) if is_path else None,
                                       model_bytes=None if is_path else _model_bytes(model),
                                       imports=imports, layer=layer, chosen=chosen,
                                       score=score, target=target, target_text=target_text,
                                       backend=B.name()))
        dataset.write_parquet(str(staging))
    finally:
        if started:
            ray.shutdown()
            if temporary:
                shutil.rmtree(temporary, ignore_errors=True)
    start = time.perf_counter()
    result = commit(staging, out, run)
    summary.stages["write"] += time.perf_counter() - start
    summary.stages["decode"] += result["decode_seconds"]
    summary.stages["explain"] += result["explain_seconds"]
    summary.explained = len(result["explained"])
    summary.rows, summary.shards = result["rows"], result["shards"]
    errors = result["errors"]
    seen = result["explained"] | result["skipped"] | {e["path"] for e in errors}
    errors += [{"path": s.name, "sha256": None, "stage": "engine",
                "reason": "the Ray pipeline returned no row for it"}
               for s in sources if s.name not in seen]
    return errors


def commit(staging: Path, out: Path, run: str, salvage: bool = False) -> dict:
    """Move the staged files' rows into ``out/maps`` as atomically written shards; the failed
    images' rows become errors. ``salvage``: a file that does not read back whole (a killed
    run's) is dropped instead of raising."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    result = {"explained": set(), "skipped": set(), "errors": [], "rows": 0, "shards": 0,
              "decode_seconds": 0.0, "explain_seconds": 0.0}
    names = schema().names
    for number, part in enumerate(sorted(staging.glob("*.parquet"))):
        try:
            table = pq.read_table(part)
        except Exception:  # pyarrow raises several types for a truncated file
            if not salvage:
                raise
            continue
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        if ok.num_rows:
            write_table(ok.select(names).cast(schema()),
                        out / MAPS / f"part-{run}-{number:06d}.parquet")
            result["rows"] += ok.num_rows
            result["shards"] += 1
            paths = ok.column("path").to_pylist()
            result["explained"].update(paths)
            first = {p: s for p, s in zip(paths, ok.column("decode_seconds").to_pylist())}
            result["decode_seconds"] += sum(first.values())
            result["explain_seconds"] += sum(ok.column("seconds").to_pylist())
        for row in table.filter(pc.not_equal(table.column("status"), "ok")).to_pylist():
            result["decode_seconds"] += row["decode_seconds"] or 0.0
            if row["status"] == "skip":
                result["skipped"].add(row["path"])
            else:
                result["errors"].append({k: row[k] for k in ("path", "sha256", "stage",
                                                             "reason")})
    shutil.rmtree(staging, ignore_errors=True)
    return result


def salvage(out: Path) -> None:
    """Commit what a killed Ray run staged (``out/.ray-RUN/``): the files that read back whole
    become shards, the rest are dropped (:func:`commit`). :func:`cam.bulk` calls it before
    every run, whichever its engine."""
    for staging in sorted(out.glob(".ray-*")):
        commit(staging, out, staging.name.removeprefix(".ray-"), salvage=True)
