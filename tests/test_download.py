"""Tests for cam.study.download: a tiny POLEN23E-like archive served over loopback HTTP."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cam.study import download
from cam.study.download import class_from_name, count_images, download_polen23e, main

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

# 3 classes x 2 images; the flat layout mixes "class_NN" and "class (N)" names.
FLAT_NAMES = {
    "anadenanthera": ["anadenanthera_16.jpg", "anadenanthera_17.jpg"],
    "senegalia": ["senegalia (1).jpg", "senegalia (2).jpg"],
    "myrcia": ["myrcia_01.jpg", "myrcia_02.jpg"],  # myrcia_02.jpg is a TIFF under a .jpg name
}
TIFF_NAME = "myrcia_02.jpg"
SMALL = {"expected_classes": 3, "expected_per_class": 2}


def _image_bytes(seed: int, fmt: str) -> bytes:
    img = Image.new("RGB", (8, 6), (seed * 40 % 256, 255 - seed * 30 % 256, seed * 70 % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _flat_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    seed = 0
    for names in FLAT_NAMES.values():
        for name in names:
            seed += 1
            files[name] = _image_bytes(seed, "TIFF" if name == TIFF_NAME else "JPEG")
    return files


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


JUNK = {
    "__MACOSX/._anadenanthera_16.jpg": b"\x00\x05\x16\x07resource fork",
    ".DS_Store": b"\x00\x00\x00\x01Bud1",
    "README.txt": b"POLEN23E test archive",
}


def flat_zip() -> bytes:
    return _zip({**_flat_files(), **JUNK})


def nested_zip() -> dict[str, bytes]:
    """Folder per class, two levels deep; one class folder has files with no class prefix."""
    files = _flat_files()
    members: dict[str, bytes] = {}
    for label, names in FLAT_NAMES.items():
        for i, name in enumerate(names):
            if label == "anadenanthera":  # no prefix in the name: the folder gives the class
                members[f"POLEN23E/images/Anadenanthera/{i:04d}.png"] = files[name]
            else:
                members[f"POLEN23E/images/{label.capitalize()}/{name}"] = files[name]
    members["POLEN23E/images/Senegalia/.DS_Store"] = b"junk"
    return members


class Server:
    """A loopback HTTP server with fixed routes; counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, bool]] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path not in routes:
                    self.send_error(404, "Not Found")
                    return
                body, with_length = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if with_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                if not with_length:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def add(self, path: str, body: bytes, *, with_length: bool = True) -> str:
        self.routes[path] = (body, with_length)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)
        assert not srv.thread.is_alive()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): _sha(p.read_bytes()) for p in root.rglob("*") if p.is_file()
    }


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- naming


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("anadenanthera_16.jpg", "anadenanthera"),
        ("senegalia (1).jpg", "senegalia"),
        ("Urochloa (12).JPG", "urochloa"),
        ("acacia_03.jpg", "senegalia"),  # older label of the same class
        ("0001.png", None),
        ("_01.jpg", None),
        ("plain.jpg", None),
    ],
)
def test_class_from_name(name: str, expected: str | None) -> None:
    assert class_from_name(name) == expected


def test_url_constant_points_at_figshare_article() -> None:
    assert download.POLEN23E_URL == "https://figshare.com/ndownloader/articles/1525086/versions/1"
    assert (download.EXPECTED_CLASSES, download.EXPECTED_PER_CLASS) == (23, 35)


# ----------------------------------------------------------------------------- happy paths


def test_flat_zip_is_laid_out_by_class(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/flat.zip", flat_zip())
    dest = tmp_path / "data" / "polen23e"

    out = download_polen23e(dest, url, progress=False, **SMALL)

    assert out == dest
    expected = {
        f"{label}/{name}": _sha(data)
        for name, data in _flat_files().items()
        for label in [class_from_name(name)]
    }
    assert _tree(dest) == expected  # exact bytes, original names, nothing else (no junk)
    assert "senegalia/senegalia (1).jpg" in expected
    with Image.open(dest / "myrcia" / TIFF_NAME) as img:
        assert img.format == "TIFF"  # not re-encoded
    with Image.open(dest / "myrcia" / "myrcia_01.jpg") as img:
        assert img.format == "JPEG"
    assert "Ignored 3 non-image file(s)" in capsys.readouterr().out
    assert _leftovers(dest.parent) == []  # temporary folder removed
    assert server.hits == {"/flat.zip": 1}


def test_nested_folder_zip_without_content_length(server: Server, tmp_path: Path) -> None:
    url = server.add("/nested.zip", _zip(nested_zip()), with_length=False)
    dest = tmp_path / "polen23e"

    download_polen23e(dest, url, progress=False, **SMALL)

    tree = _tree(dest)
    assert sorted(tree) == [
        "anadenanthera/0000.png",
        "anadenanthera/0001.png",
        "myrcia/myrcia_01.jpg",
        "myrcia/myrcia_02.jpg",
        "senegalia/senegalia (1).jpg",
        "senegalia/senegalia (2).jpg",
    ]
    assert tree["myrcia/myrcia_02.jpg"] == _sha(_flat_files()[TIFF_NAME])
    assert count_images(dest) == {"anadenanthera": 2, "senegalia": 2, "myrcia": 2}


def test_archive_nested_in_download_all_zip(server: Server, tmp_path: Path) -> None:
    """figshare's "download all" zip may wrap the dataset's own POLEN23E.zip."""
    outer = _zip({"POLEN23E.zip": flat_zip(), "__MACOSX/._POLEN23E.zip": b"junk"})
    url = server.add("/articles/1525086/versions/1", outer)
    dest = tmp_path / "polen23e"

    download_polen23e(dest, url, progress=False, **SMALL)

    assert count_images(dest) == {"anadenanthera": 2, "senegalia": 2, "myrcia": 2}
    assert (dest / "senegalia" / "senegalia (2).jpg").is_file()


def test_folder_names_win_when_file_prefixes_do_not_name_classes(
    server: Server, tmp_path: Path
) -> None:
    """Camera-style names (IMG_0001.jpg) in class folders: prefixes fail, folder names work."""
    members = {}
    for label, names in FLAT_NAMES.items():
        for i, name in enumerate(names):
            members[f"POLEN23E/{label}/IMG_{i:04d}.jpg"] = _flat_files()[name]
    url = server.add("/camera.zip", _zip(members))
    dest = tmp_path / "polen23e"

    download_polen23e(dest, url, progress=False, **SMALL)

    assert sorted(_tree(dest)) == [
        f"{label}/IMG_{i:04d}.jpg" for label in sorted(FLAT_NAMES) for i in range(2)
    ]


def test_identical_duplicate_is_dropped_but_conflict_raises(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _flat_files()
    same = server.add(
        "/dup.zip", _zip({**files, "copy/anadenanthera_16.jpg": files["anadenanthera_16.jpg"]})
    )
    download_polen23e(tmp_path / "a", same, progress=False, **SMALL)
    assert count_images(tmp_path / "a") == {"anadenanthera": 2, "senegalia": 2, "myrcia": 2}
    assert "Dropped 1 byte-identical duplicate" in capsys.readouterr().out

    clash = server.add(
        "/clash.zip", _zip({**files, "copy/anadenanthera_16.jpg": _image_bytes(42, "PNG")})
    )
    with pytest.raises(
        RuntimeError,
        match="Two different files would both become anadenanthera/anadenanthera_16.jpg",
    ):
        download_polen23e(tmp_path / "b", clash, progress=False, **SMALL)
    assert not (tmp_path / "b").exists()
    assert _leftovers(tmp_path) == []


def test_tar_gz_archive(server: Server, tmp_path: Path) -> None:
    url = server.add(
        "/polen.tar.gz", _tar_gz({f"POLEN23E/{n}": d for n, d in _flat_files().items()})
    )
    dest = tmp_path / "polen23e"

    download_polen23e(dest, url, progress=False, **SMALL)

    assert _tree(dest)["myrcia/myrcia_02.jpg"] == _sha(_flat_files()[TIFF_NAME])
    assert len(_tree(dest)) == 6


def test_complete_copy_is_not_downloaded_again(server: Server, tmp_path: Path) -> None:
    url = server.add("/flat.zip", flat_zip())
    dest = tmp_path / "polen23e"

    download_polen23e(dest, url, progress=False, **SMALL)
    before = _tree(dest)
    again = download_polen23e(dest, url, progress=False, **SMALL)

    assert again == dest
    assert server.hits["/flat.zip"] == 1
    assert _tree(dest) == before


def test_module_constants_are_the_defaults(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "EXPECTED_CLASSES", 3)
    monkeypatch.setattr(download, "EXPECTED_PER_CLASS", 2)
    url = server.add("/flat.zip", flat_zip())

    assert download_polen23e(tmp_path / "p", url, progress=False) == tmp_path / "p"


# ----------------------------------------------------------------------------- failures


def test_wrong_counts_raise_and_leave_no_dest(server: Server, tmp_path: Path) -> None:
    url = server.add("/flat.zip", flat_zip())
    dest = tmp_path / "polen23e"

    with pytest.raises(RuntimeError) as excinfo:
        download_polen23e(dest, url, progress=False, expected_classes=23, expected_per_class=35)

    message = str(excinfo.value)
    assert "expected 23 classes x 35 images" in message
    assert "3 classes, 6 images" in message
    assert "anadenanthera=2" in message and "myrcia=2" in message and "senegalia=2" in message
    assert "POLEN23E_DIR" in message
    assert "\n" not in message
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_missing_class_is_reported(server: Server, tmp_path: Path) -> None:
    files = {n: d for n, d in _flat_files().items() if not n.startswith("myrcia")}
    url = server.add("/two.zip", _zip(files))

    with pytest.raises(
        RuntimeError, match=r"found 2 classes, 4 images \(anadenanthera=2, senegalia=2\)"
    ):
        download_polen23e(tmp_path / "polen23e", url, progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_http_404_names_the_url(server: Server, tmp_path: Path) -> None:
    url = server.url("/no/such/file.zip")
    dest = tmp_path / "polen23e"

    with pytest.raises(RuntimeError) as excinfo:
        download_polen23e(dest, url, progress=False, **SMALL)

    message = str(excinfo.value)
    assert url in message
    assert "404" in message
    assert "POLEN23E_DIR" in message
    assert "\n" not in message
    assert server.hits == {"/no/such/file.zip": 1}
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_a_runtime_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # find a loopback port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/polen.zip"

    with pytest.raises(RuntimeError, match="Could not download POLEN23E from " + url):
        download_polen23e(tmp_path / "polen23e", url, timeout=5, progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad_name", ["../evil.jpg", "POLEN23E/../../evil.jpg", "/tmp/evil_abs.jpg"]
)
def test_unsafe_zip_member_is_refused(server: Server, tmp_path: Path, bad_name: str) -> None:
    members = {**_flat_files(), bad_name: _image_bytes(9, "JPEG")}
    url = server.add("/evil.zip", _zip(members))
    dest = tmp_path / "sub" / "polen23e"

    with pytest.raises(RuntimeError, match="unsafe path"):
        download_polen23e(dest, url, progress=False, **SMALL)

    assert not dest.exists()
    assert list((tmp_path / "sub").iterdir()) == []
    assert not (tmp_path / "evil.jpg").exists()
    assert not list(tmp_path.rglob("evil*"))


def test_tar_with_symlink_is_refused(server: Server, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("POLEN23E/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    url = server.add("/link.tar", buf.getvalue())

    with pytest.raises(RuntimeError, match="link or special file"):
        download_polen23e(tmp_path / "polen23e", url, progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_non_archive_response_is_refused(server: Server, tmp_path: Path) -> None:
    url = server.add("/page.html", b"<!DOCTYPE html><html>figshare login</html>")

    with pytest.raises(RuntimeError, match="neither a zip nor a tar archive"):
        download_polen23e(tmp_path / "polen23e", url, progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_existing_dest_is_kept_unless_forced(server: Server, tmp_path: Path) -> None:
    url = server.add("/flat.zip", flat_zip())
    dest = tmp_path / "polen23e"
    (dest / "myrcia").mkdir(parents=True)
    (dest / "myrcia" / "myrcia_01.jpg").write_bytes(b"partial")

    with pytest.raises(RuntimeError, match="not a complete POLEN23E copy"):
        download_polen23e(dest, url, progress=False, **SMALL)
    assert server.hits == {}
    assert (dest / "myrcia" / "myrcia_01.jpg").read_bytes() == b"partial"

    download_polen23e(dest, url, progress=False, force=True, **SMALL)
    assert count_images(dest) == {"anadenanthera": 2, "senegalia": 2, "myrcia": 2}
    assert (dest / "myrcia" / "myrcia_01.jpg").read_bytes() == _flat_files()["myrcia_01.jpg"]
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- command line


def test_main_success_and_rerun(
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(download, "EXPECTED_CLASSES", 3)
    monkeypatch.setattr(download, "EXPECTED_PER_CLASS", 2)
    url = server.add("/flat.zip", flat_zip())
    dest = tmp_path / "polen23e"

    assert main(["--dest", str(dest), "--url", url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"Downloading POLEN23E from {url}" in out
    assert f"POLEN23E ready in {dest}" in out

    assert main(["--dest", str(dest), "--url", url, "--no-progress"]) == 0
    assert "nothing to download" in capsys.readouterr().out
    assert server.hits["/flat.zip"] == 1


def test_main_failure_is_one_line_without_traceback(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.url("/missing.zip")

    assert main(["--dest", str(tmp_path / "polen23e"), "--url", url, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Could not download POLEN23E from " + url)
    assert err.count("\n") == 1
    assert "Traceback" not in err
