"""Download POLEN23E from figshare and lay it out as ``<dest>/<class>/<file>``.

Usage::

    python -m cam.study.download [--dest DIR] [--url URL] [--force]

The archive is streamed to a temporary file, unpacked into a temporary folder next to the
destination (refusing members with absolute paths, ``..`` or links), searched for image files
wherever they sit (one folder per class, or flat names such as ``anadenanthera_16.jpg`` and
``senegalia (1).jpg``), checked for 23 classes x 35 images, and only then moved into place.
Image bytes are copied unchanged: 91 upstream files named ``.jpg`` are really TIFF, and they
stay that way.
"""

from __future__ import annotations

import argparse
import filecmp
import http.client
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .archive import is_junk, unpack_all
from .paths import POLEN23E_DEFAULT_DIR, POLEN23E_ENV

#: figshare article 1525086 holds POLEN23E (Gonçalves et al. 2016, PLOS ONE 11(6): e0157044).
#: Source of the id: public POLEN23E download scripts on GitHub, found by code search, that fetch
#: ``https://figshare.com/ndownloader/articles/1525086/versions/1`` and sort the unpacked images
#: by file-name prefix. No per-file ``ndownloader/files/<id>`` URL could be confirmed offline,
#: so this is figshare's "download all files of the article" endpoint, pinned to version 1. It
#: returns a zip of the article's files; an archive nested in it (``POLEN23E.zip``) is unpacked.
POLEN23E_ARTICLE_ID = 1525086
POLEN23E_URL = f"https://figshare.com/ndownloader/articles/{POLEN23E_ARTICLE_ID}/versions/1"

EXPECTED_CLASSES = 23
EXPECTED_PER_CLASS = 35

#: File extensions accepted as images (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})

#: Older labels used in some copies of POLEN23E, mapped to the labels of the Kaggle copy
#: (see data/polen23e/SOURCE.md in the shared data folder).
CLASS_ALIASES: Mapping[str, str] = {
    "acacia": "senegalia",
    "poaceae": "urochloa",
    "ditans": "mimosa",
}

_CHUNK = 1 << 20
_USER_AGENT = "cam-polen23e-downloader/0.1 (Python urllib)"
# A class prefix is the leading run of letters, followed by "_" or by " (" (e.g. "senegalia (1)").
_PREFIX_RE = re.compile(r"^([^\W\d_]+)(?:_|\s*\()")


def _manual_hint(url: str) -> str:
    return (
        f"Download the archive manually from {url} (or the Kaggle copy "
        f"'andrewmvd/pollen-grain-image-classification'), unpack it and set "
        f"{POLEN23E_ENV}=/path/to/polen23e."
    )


# ----------------------------------------------------------------------------- class names


def class_from_name(file_name: str) -> str | None:
    """The class in a file name (``anadenanthera_16.jpg``, ``senegalia (1).jpg``), or None."""
    match = _PREFIX_RE.match(PurePosixPath(file_name).stem)
    if not match:
        return None
    label = match.group(1).lower()
    return CLASS_ALIASES.get(label, label)


def _class_from_folder(folder_name: str | None) -> str | None:
    if not folder_name:
        return None
    label = folder_name.strip().lower()
    return CLASS_ALIASES.get(label, label) or None


def is_image(path: Path | str) -> bool:
    return PurePosixPath(str(path)).suffix.lower() in IMAGE_EXTENSIONS


def count_images(root: Path) -> Counter[str]:
    """Images per class under ``root``: one folder per class, or flat ``class_NN`` names."""
    counts: Counter[str] = Counter()
    root = Path(root)
    if not root.is_dir():
        return counts
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if not path.is_file() or is_junk(rel.parts) or not is_image(path):
            continue
        folder = rel.parts[-2] if len(rel.parts) > 1 else None
        label = _class_from_folder(folder) if folder else class_from_name(path.name)
        counts[label or "<unclassified>"] += 1
    return counts


def _is_complete(counts: Mapping[str, int], n_classes: int, per_class: int) -> bool:
    return len(counts) == n_classes and all(n == per_class for n in counts.values())


def _format_counts(counts: Mapping[str, int]) -> str:
    if not counts:
        return "no images"
    total = sum(counts.values())
    listed = ", ".join(f"{label}={n}" for label, n in sorted(counts.items()))
    return f"{len(counts)} classes, {total} images ({listed})"


def _format_counts_short(counts: Mapping[str, int]) -> str:
    per = sorted(set(counts.values()))
    per_text = "/".join(str(n) for n in per) if per else "0"
    return f"{len(counts)} classes x {per_text} images, {sum(counts.values())} files"


# ----------------------------------------------------------------------------- download


def _fetch(url: str, target: Path, timeout: float, progress: bool) -> int:
    """Stream ``url`` into ``target``; return the number of bytes written."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            header = response.headers.get("Content-Length")
            expected = int(header) if header and header.isdigit() else None
            written = 0
            with (
                open(target, "wb") as sink,
                tqdm(
                    total=expected,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="POLEN23E",
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    sink.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise RuntimeError(
            f"Could not download POLEN23E from {url}: HTTP {err.code} {err.reason}. "
            f"{_manual_hint(url)}"
        ) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise RuntimeError(
            f"Could not download POLEN23E from {url}: {reason}. {_manual_hint(url)}"
        ) from err
    if expected is not None and written != expected:
        raise RuntimeError(
            f"Could not download POLEN23E from {url}: got {written} of {expected} bytes "
            f"(connection cut). {_manual_hint(url)}"
        )
    return written


# ----------------------------------------------------------------------------- layout


def _scan(
    tree: Path, roots: set[Path]
) -> tuple[list[tuple[Path, str | None, str | None]], list[str]]:
    """Image files under ``tree`` with (path, class from name, class from folder); ignored files."""
    images: list[tuple[Path, str | None, str | None]] = []
    ignored: list[str] = []
    for path in sorted(tree.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(tree)
        if is_junk(rel.parts) or not path.is_file() or not is_image(path):
            ignored.append(rel.as_posix())
            continue
        parent = path.parent
        folder = None if parent in roots else _class_from_folder(parent.name)
        images.append((path, class_from_name(path.name), folder))
    return images, ignored


def _label(
    images: list[tuple[Path, str | None, str | None]], prefer_name: bool
) -> tuple[dict[Path, str], Counter[str], list[Path]]:
    labels: dict[Path, str] = {}
    unclassified: list[Path] = []
    for path, by_name, by_folder in images:
        label = (by_name or by_folder) if prefer_name else (by_folder or by_name)
        if label is None:
            unclassified.append(path)
        else:
            labels[path] = label
    counts: Counter[str] = Counter()
    # Count distinct destination names, so duplicates of one file are not counted twice.
    for label, _name in {(label, path.name) for path, label in labels.items()}:
        counts[label] += 1
    return labels, counts, unclassified


def _lay_out(labels: Mapping[Path, str], staging: Path) -> int:
    """Move images to ``staging/<class>/<file name>``; return the number of exact duplicates."""
    duplicates = 0
    for source, label in sorted(labels.items()):
        target = staging / label / source.name
        if target.exists():
            if filecmp.cmp(source, target, shallow=False):
                duplicates += 1
                continue
            raise RuntimeError(
                f"Two different files would both become {label}/{source.name}; the archive "
                "does not look like POLEN23E."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
    return duplicates


# ----------------------------------------------------------------------------- public API


def _already_complete(dest: Path, n_classes: int, per_class: int, force: bool, say) -> bool:
    """Whether ``dest`` already holds a complete copy; an error for an incomplete one unless
    ``force`` (it is then replaced once the new copy is verified)."""
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise RuntimeError(
            f"{dest} exists and is not a directory; move it away or pick another --dest."
        )
    existing = count_images(dest)
    if _is_complete(existing, n_classes, per_class):
        say(
            f"POLEN23E is already complete in {dest} ({_format_counts_short(existing)}); "
            "nothing to download."
        )
        return True
    if any(dest.iterdir()) and not force:
        raise RuntimeError(
            f"{dest} exists but is not a complete POLEN23E copy ({_format_counts(existing)}); "
            f"delete it, rerun with --force, or set {POLEN23E_ENV} to a complete local copy."
        )
    return False


def _classify(images, n_classes: int, per_class: int, url: str) -> dict:
    """Each image's class: the file-name prefix names the class (flat Kaggle layout), the
    parent folder is the fallback; if that labelling is not complete, folder names first.
    A clear error when neither gives ``n_classes`` classes of ``per_class`` images."""
    labels, counts, unclassified = _label(images, prefer_name=True)
    if not (_is_complete(counts, n_classes, per_class) and not unclassified):
        alt_labels, alt_counts, alt_unclassified = _label(images, prefer_name=False)
        if _is_complete(alt_counts, n_classes, per_class) and not alt_unclassified:
            labels, counts, unclassified = alt_labels, alt_counts, alt_unclassified
    if unclassified or not _is_complete(counts, n_classes, per_class):
        found = _format_counts(counts)
        if unclassified:
            found += (
                f"; {len(unclassified)} image(s) with no class (e.g. {unclassified[0].name!r})"
            )
        raise RuntimeError(
            f"The archive from {url} is not the expected POLEN23E: expected {n_classes} "
            f"classes x {per_class} images, found {found}. {_manual_hint(url)}"
        )
    return labels


def download_polen23e(
    dest: Path = POLEN23E_DEFAULT_DIR,
    url: str = POLEN23E_URL,
    *,
    timeout: float = 60,
    expected_classes: int | None = None,
    expected_per_class: int | None = None,
    force: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> Path:
    """Download POLEN23E into ``dest`` as ``dest/<class>/<original file name>`` and return ``dest``.

    Returns at once, without any network access, when ``dest`` already holds a complete copy
    (``expected_classes`` classes of ``expected_per_class`` images, by default 23 x 35).
    Everything is downloaded and unpacked in a temporary folder beside ``dest`` and moved into
    place only after the counts check out, so a failure never leaves a half-written ``dest``.
    An existing but incomplete ``dest`` is left alone unless ``force`` is true, in which case it
    is replaced once the new copy has been verified.

    Raises RuntimeError with a one-line message on network errors, unsafe or unreadable
    archives, and wrong image counts.
    """
    n_classes = EXPECTED_CLASSES if expected_classes is None else expected_classes
    per_class = EXPECTED_PER_CLASS if expected_per_class is None else expected_per_class
    say = (lambda _msg: None) if quiet else print
    dest = Path(dest).expanduser()

    if _already_complete(dest, n_classes, per_class, force, say):
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-download-", dir=dest.parent))
    try:
        archive = work / "archive"
        say(f"Downloading POLEN23E from {url} ...")
        size = _fetch(url, archive, timeout, progress)
        say(f"Downloaded {size / 2**20:.1f} MiB; unpacking.")

        tree = work / "unpacked"
        roots = unpack_all(archive, tree, f"the archive from {url}")
        archive.unlink()

        images, ignored = _scan(tree, roots)
        if ignored:
            examples = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            say(f"Ignored {len(ignored)} non-image file(s) ({examples}).")

        labels = _classify(images, n_classes, per_class, url)

        staging = work / "staging"
        staging.mkdir()
        duplicates = _lay_out(labels, staging)
        if duplicates:
            say(f"Dropped {duplicates} byte-identical duplicate path(s) inside the archive.")
        final = count_images(staging)
        if not _is_complete(final, n_classes, per_class):  # defensive: layout must match the check
            raise RuntimeError(
                f"Laying out POLEN23E went wrong: found {_format_counts(final)}. "
                f"{_manual_hint(url)}"
            )

        if dest.exists():
            old = work / "previous"
            dest.rename(old)
        staging.rename(dest)
        say(f"POLEN23E ready in {dest} ({_format_counts_short(final)}).")
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cam.study.download",
        description="Download POLEN23E (Gonçalves et al. 2016) into DIR/<class>/<file>.",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=POLEN23E_DEFAULT_DIR,
        metavar="DIR",
        help=f"target folder (default: {POLEN23E_DEFAULT_DIR})",
    )
    parser.add_argument(
        "--url", default=POLEN23E_URL, help=f"zip or tar archive (default: {POLEN23E_URL})"
    )
    parser.add_argument(
        "--timeout", type=float, default=60, metavar="SECONDS", help="network timeout (default: 60)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing but incomplete DIR"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        download_polen23e(
            args.dest,
            args.url,
            timeout=args.timeout,
            force=args.force,
            progress=not args.no_progress,
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the destination.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
