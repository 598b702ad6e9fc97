"""Unpacking downloaded archives safely: zip and tar, nested archives, and no member with an
absolute path, ``..``, a link or a special file is ever written."""

from __future__ import annotations

import re
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
#: How deep archives nested in archives are unpacked.
NESTING_LIMIT = 3


def is_junk(rel_parts: Iterable[str]) -> bool:
    """macOS resource forks, Finder/Explorer metadata and other hidden files."""
    for part in rel_parts:
        if part == "__MACOSX" or part.startswith(".") or part.lower() in JUNK_NAMES:
            return True
    return False



def unsafe_reason(name: str) -> str | None:
    """Why an archive member name is unsafe to extract, or None when it is safe."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised):
        return "absolute path"
    if ".." in normalised.split("/"):
        return "'..' in path"
    if "\x00" in name:
        return "NUL byte in name"
    return None


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, into: Path, label: str) -> None:
    """Unpack a zip or tar archive into ``into``; refuse unsafe members before writing anything."""
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    reason = unsafe_reason(info.filename)
                    if reason:
                        raise RuntimeError(
                            f"Refusing to unpack {label}: member {info.filename!r} has an "
                            f"unsafe path ({reason})."
                        )
                zf.extractall(into)
        except zipfile.BadZipFile as err:
            raise RuntimeError(f"{label} is a damaged zip archive: {err}.") from err
        return
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError:
        is_tar = False
    if is_tar:
        try:
            with tarfile.open(archive, mode="r:*") as tf:
                members = tf.getmembers()
                for member in members:
                    reason = unsafe_reason(member.name)
                    if reason is None and not (member.isfile() or member.isdir()):
                        reason = "link or special file"
                    if reason:
                        raise RuntimeError(
                            f"Refusing to unpack {label}: member {member.name!r} has an "
                            f"unsafe path ({reason})."
                        )
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(into, members=members, filter="data")
                else:  # pragma: no cover - Python without PEP 706 filters
                    tf.extractall(into, members=members)
        except tarfile.TarError as err:
            raise RuntimeError(f"{label} is a damaged tar archive: {err}.") from err
        return
    with open(archive, "rb") as fh:
        head = fh.read(64)
    raise RuntimeError(
        f"{label} is neither a zip nor a tar archive (it starts with {head[:32]!r})."
    )


def unpack_all(archive: Path, root: Path, label: str) -> set[Path]:
    """Unpack ``archive`` into ``root``, then any archives nested in it; return all roots."""
    extract_archive(archive, root, label)
    roots = {root}
    pending = [root]
    for _depth in range(NESTING_LIMIT):
        nested: list[Path] = []
        for base in pending:
            for path in sorted(base.rglob("*")):
                rel = path.relative_to(root)
                if path.is_file() and not is_junk(rel.parts) and is_archive_name(path.name):
                    nested.append(path)
        if not nested:
            break
        pending = []
        for inner in nested:
            target = inner.with_name(inner.name + ".unpacked")
            extract_archive(inner, target, f"nested archive {inner.name!r}")
            inner.unlink()
            roots.add(target)
            pending.append(target)
    return roots
