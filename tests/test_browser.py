"""The explorer in a real browser: JupyterLab on a free local port, Debian's Chromium driven
by Playwright (from PyPI, with the system Chromium: nothing downloads a browser).

The test opens a copy of notebooks/08-explore.ipynb, runs every cell, waits for the explorer's map,
changes the method (whose settings appear) and then the layer (found with the layer filter),
and checks that the picture changes each time and that no cell, nor the explorer, shows
anything on stderr: the kernel is the project's (jupyter/kernels/python3, as `make lab` uses),
which keeps TensorFlow's C++ log out of the notebook.
Screenshots go to build/browser/ (08-explorer.png is the one the README shows). Run it alone
with ``make test-browser``, which installs Chromium first; without Chromium it is skipped
with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.study  # the study's notebook and checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "browser"
NOTEBOOK = ROOT / "notebooks" / "08-explore.ipynb"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: The project's kernel spec, first on JUPYTER_PATH (the Makefile's `lab` does the same).
KERNELS = ROOT / "jupyter"
#: What JupyterLab renders a stream written to stderr as (the pink blocks).
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
#: The first map traces DenseNet-169 on the CPU (tens of seconds); a new layer traces again.
MAP_TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server on a free port of 127.0.0.1, with a token; stopped afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed ({CHROMIUM} is missing): `make test-browser` "
                    f"installs Debian's chromium package, or set CHROMIUM to a Chromium binary")
    pytest.importorskip("playwright", reason="Playwright is in the test extra: "
                                             "pip install -e '.[test]'")
    if not (os.environ.get("POLEN23E_DIR") or (ROOT / "data" / "polen23e").is_dir()):
        pytest.skip("notebook 08 explores POLEN23E: set POLEN23E_DIR")
    port, token = _free_port(), secrets.token_hex(16)
    # user settings of its own: no news prompt over the page, nothing read from ~/.jupyter
    settings = ROOT / "build" / "browser" / "lab-settings"
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    paths = [str(KERNELS)] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]
    # the environment of a user's shell: ipykernel stops forwarding what C++ writes to the
    # process's stderr into cells when it sees PYTEST_CURRENT_TEST, which would hide the
    # noise this test looks for; and conftest.py's TF_CPP_MIN_LOG_LEVEL is not a user's
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k != "TF_CPP_MIN_LOG_LEVEL"}
    env = {**env, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(settings / "workspaces"),
           "JUPYTER_PATH": os.pathsep.join(paths)}
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={ROOT}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--ServerApp.allow_root=True",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGTERM)
                raise RuntimeError(f"JupyterLab did not start on port {port}")
            time.sleep(0.5)
    yield url, token
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def _select(page, label: str, option: dict) -> None:
    """Choose an option of the explorer's dropdown whose label is ``label``."""
    box = page.locator(".cam-explorer .widget-dropdown").filter(
        has=page.locator("label", has_text=label))
    box.locator("select").select_option(**option)


def _map_png(page) -> bytes:
    return page.locator("img.cam-explorer-map").screenshot()


def _no_stderr(page, when: str) -> None:
    blocks = page.locator(STDERR)
    texts = [blocks.nth(i).text_content()[:300] for i in range(blocks.count())]
    assert not texts, f"stderr in the notebook {when}: {texts}"


def test_the_lab_starts_the_projects_quiet_kernel(lab):
    url, token = lab
    with urllib.request.urlopen(f"{url}/api/kernelspecs?token={token}", timeout=10) as answer:
        specs = json.load(answer)
    ours = json.loads((KERNELS / "kernels" / "python3" / "kernel.json").read_text())
    spec = specs["kernelspecs"]["python3"]["spec"]
    assert spec["argv"] == ours["argv"] and spec["env"] == ours["env"]
    assert "--IPKernelApp.capture_fd_output=False" in spec["argv"]


def test_the_explorer_runs_and_follows_its_controls_in_chromium(lab):
    from playwright.sync_api import expect, sync_playwright

    url, token = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    # JupyterLab saves what it runs: open a copy, so the committed notebook stays stripped
    copy = SHOTS / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/{copy.relative_to(ROOT)}?token={token}")
        page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                               "&& window.jupyterapp.shell.currentWidget.context "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext"
                               ".session && window.jupyterapp.shell.currentWidget"
                               ".sessionContext.session.kernel", timeout=120_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        picture = page.locator("img.cam-explorer-map")
        picture.wait_for(state="visible", timeout=MAP_TIMEOUT_MS)
        info = page.locator(".cam-explorer-info")
        expect(info).to_contain_text("Grad-CAM", timeout=MAP_TIMEOUT_MS)
        first = _map_png(page)
        page.locator(".cam-explorer").screenshot(path=str(SHOTS / "08-explorer.png"))
        # the notebook's own check ran too (its last cell prints the first map's timing)
        expect(page.locator(".jp-OutputArea-output").last).to_contain_text(
            "Grad-CAM at", timeout=MAP_TIMEOUT_MS)
        _no_stderr(page, "after running every cell")

        settings = page.locator(".cam-explorer-settings")
        _select(page, "method", {"label": "FastAblationCAM"})
        expect(info).to_contain_text("FastAblationCAM", timeout=MAP_TIMEOUT_MS)
        # its declared settings, and only its: window and stride (auto)
        expect(settings).to_contain_text("window")
        expect(settings).to_contain_text("stride")
        expect(settings.locator(".cam-explorer-setting")).to_have_count(2)
        page.wait_for_timeout(500)  # the image is set after the text
        second = _map_png(page)
        assert second != first, "the map did not change with the method"
        page.screenshot(path=str(SHOTS / "08-explorer-method.png"))

        # the layer list (595 layers) is nearest the output first, and filters by name:
        # "concat" leaves the concatenations, the first the one before 'bn' and 'relu' on
        # DenseNet-169, the same 7x7 grid (49 ablations; an early layer would need thousands
        # and wait for Compute). Not 'bn': zeroing a cell before a ReLU is zeroing it after.
        select = page.locator(".cam-explorer .widget-dropdown").filter(
            has=page.locator("label", has_text="layer")).locator("select")
        assert select.locator("option").first.text_content().strip().startswith("relu")
        search = page.locator(".cam-explorer-layer-filter input")
        search.fill("concat")
        search.press("Enter")
        expect(select.locator("option").first).to_contain_text("concat", timeout=30_000)
        layer = select.locator("option").first.text_content().strip().split()[0]
        expect(info).to_contain_text(layer, timeout=MAP_TIMEOUT_MS)
        page.wait_for_timeout(500)
        third = _map_png(page)
        assert third != second, "the map did not change with the layer"
        page.screenshot(path=str(SHOTS / "08-explorer-layer.png"))
        _no_stderr(page, "after the layer changed")
        browser.close()
