"""What :func:`cam.bulk` reads: the input's images and each one made ready for the model.

* :func:`list_inputs`: a folder, a glob, a text file of paths or a tar/zip archive -> its
  images as :class:`Source` s (a relative name and where to read it), sorted by name;
* :class:`Reader`: a source's bytes (an archive opened once per thread);
* :func:`preprocessing`: ``"square"``, ``module:function`` or a function -> the function;
* :func:`prepare`: one image read, hashed, checked against what is already done, decoded and
  preprocessed, or the reason it cannot be (an :class:`Item`). Both engines call it: the
  local engine's decoding threads and the Ray engine's decode tasks.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import os
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Named preprocessings (``preprocess=``); anything else is a ``module:function``.
PREPROCESSINGS = ("square",)


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
