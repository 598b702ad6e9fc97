"""What :func:`cam.bulk` writes under ``out``, and what it finds there from an earlier run.

* the layout: :data:`MAPS` (a folder of Parquet shards, one dataset), :data:`ERRORS`,
  :data:`MANIFEST`, :data:`OVERLAYS`; :func:`clear` removes them;
* :func:`schema`: the dataset's columns (one row per image and method) and
  :func:`error_schema`, ``errors.parquet``'s;
* :func:`write_table`: a Parquet file written atomically (a temporary name, then
  :func:`os.replace`), so a killed run leaves whole shards or none; :func:`write_json`;
* :func:`completed`: what a rerun skips (sha256 -> the methods that already have rows);
* :class:`Writer`: the local engine's background thread writing shards (and overlays).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from ._optional import require

#: Where the rows go, under ``out``: a folder of Parquet shards (one Parquet dataset).
MAPS = "maps"
ERRORS = "errors.parquet"
MANIFEST = "manifest.json"
OVERLAYS = "overlays"


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


def clear(out: Path) -> None:
    """What a run writes under ``out`` (and nothing else there)."""
    for name in (MAPS, OVERLAYS):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (ERRORS, MANIFEST):
        (out / name).unlink(missing_ok=True)
    for leftover in out.glob(".ray-*"):
        shutil.rmtree(leftover, ignore_errors=True)


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
