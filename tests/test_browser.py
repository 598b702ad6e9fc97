"""The explorer in a real browser: JupyterLab on a free local port, Debian's Chromium driven
by Playwright (from PyPI, with the system Chromium: nothing downloads a browser).

The test opens a copy of notebooks/08-explore.ipynb, runs every cell, waits for the explorer's map,
changes the method and then the layer, and checks that the picture changes each time.
Screenshots go to build/browser/ (08-explorer.png is the one the README shows). Run it alone
with ``make test-browser``, which installs Chromium first; without Chromium it is skipped
with the reason.
"""

from __future__ import annotations

import os
import re
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
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(settings / "workspaces")}
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

        _select(page, "method", {"label": "FastAblationCAM"})
        expect(info).to_contain_text("FastAblationCAM", timeout=MAP_TIMEOUT_MS)
        page.wait_for_timeout(500)  # the image is set after the text
        second = _map_png(page)
        assert second != first, "the map did not change with the method"
        page.screenshot(path=str(SHOTS / "08-explorer-method.png"))

        # two layers before the last: on DenseNet-169 the concatenation before 'bn' and
        # 'relu', the same 7x7 grid (49 ablations; an early layer would need thousands and
        # wait for Compute). Not 'bn': zeroing a cell before a ReLU is zeroing it after.
        select = page.locator(".cam-explorer .widget-dropdown").filter(
            has=page.locator("label", has_text="layer")).locator("select")
        index = select.locator("option").count() - 3
        layer = re.split(r"\s+\(", select.locator("option").nth(index).text_content().strip())[0]
        _select(page, "layer", {"index": index})
        expect(info).to_contain_text(layer, timeout=MAP_TIMEOUT_MS)
        page.wait_for_timeout(500)
        third = _map_png(page)
        assert third != second, "the map did not change with the layer"
        page.screenshot(path=str(SHOTS / "08-explorer-layer.png"))
        # the notebook's own check ran too (its last cell prints the first map's timing)
        expect(page.locator(".jp-OutputArea-output").last).to_contain_text(
            "Grad-CAM at", timeout=MAP_TIMEOUT_MS)
        browser.close()
