"""The margin explorer working live: JupyterLab in headless Chromium.

The test starts JupyterLab on a free localhost port (known token, no browser, root = the
repository), opens a copy of notebooks/margin_explorer.ipynb (under the ignored runs/, so the
committed notebook never gets outputs) in Debian's Chromium driven by Playwright, runs all
cells from the Run menu, waits for the notebook's own checks to pass and for the plotly
FigureWidget to render, then drags the position slider and checks that the plot's position
marker moved (plotly.js trace data) and the picture changed (screenshot bytes). The screenshot
after the drag is saved as explorer_browser_smoke.png in $MIXLAB_FIGURES (the test's scratch
folder when unset, so a test run never rewrites the committed figures/; set
MIXLAB_FIGURES=figures to remake the committed screenshot).

Needs: `apt-get install -y chromium` (/usr/bin/chromium) and `pip install playwright` (the
browser is Debian's, never `playwright install`), and the CIFAR-10 test split (make data).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MIXLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "mixlab-browser-test"
NOTEBOOK = "margin_explorer.ipynb"

pytestmark = pytest.mark.browser

# JupyterLab user settings for the test: no news/update pop-ups over the page, no autosave,
# and every cell kept in the DOM (the default windowing detaches off-screen outputs)
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
        {"windowingMode": "none", "autoStartDefaultKernel": True},
}

# plotly.js keeps each trace's `meta`; the explorer tags its slider marker "position"
MARKER_X = """() => Array.from(document.querySelectorAll('.mixlab-explorer .js-plotly-plot'))
    .map(gd => (gd.data || []).filter(t => t.meta === 'position').map(t => Array.from(t.x)))"""


KERNEL_IDLE = """() => Array.from(document.querySelectorAll('.jp-StatusBar-TextItem'))
    .some(e => /[|] Idle$/.test(e.textContent.trim()) && !e.textContent.includes('No Kernel'))"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer at {url} within {timeout:.0f} s")


@pytest.fixture()
def lab(tmp_path, data_root):
    """A JupyterLab server on a free port: yields (base url, notebook path in the server)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get update && apt-get install -y chromium")
    pytest.importorskip("playwright.sync_api",
                        reason="playwright is not installed: pip install playwright "
                               "(no browser download: the test uses Debian's chromium)")
    from mixlab.data import find_dataset
    if find_dataset("cifar10", "test", root=data_root) is None:
        pytest.skip(f"no CIFAR-10 test split under {data_root}: run `make data`")

    # a copy of the notebook under the ignored runs/: outputs are never written to notebooks/
    rel = Path("runs", "browser_test", NOTEBOOK)
    (REPO / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "notebooks" / NOTEBOOK, REPO / rel)
    settings = tmp_path / "settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))

    port = _free_port()
    # the notebook's own figures go where the screenshot goes, never into the committed figures/
    env = dict(os.environ, MIXLAB_DATA=str(data_root),
               MIXLAB_FIGURES=os.environ.get("MIXLAB_FIGURES") or str(tmp_path / "figures"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
           "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={REPO}",
           f"--LabApp.user_settings_dir={settings}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI and these machines run as root; Jupyter refuses otherwise
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={TOKEN}", proc)
        yield base, rel.as_posix()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print((tmp_path / "jupyter.log").read_text()[-3000:])  # shown when the test fails


def test_explorer_live_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, notebook = lab
    figures = Path(os.environ.get("MIXLAB_FIGURES") or tmp_path)
    figures.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(f"{base}/lab/tree/{notebook}?token={TOKEN}&reset", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            # "Run All Cells" before the kernel is up is dropped: wait for the status bar's
            # "Python 3 (ipykernel) | Idle"
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            # the notebook's last cell prints this once its assertions pass (trains the two
            # smoke runs first if runs/margin_explorer/smoke holds none; five minutes, since on a
            # 2-core machine shared with other jobs that took more than 150 s)
            page.wait_for_selector(".jp-OutputArea-output >> text=all checks passed",
                                   timeout=300_000)
            explorer = page.locator(".mixlab-explorer")
            explorer.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
            page.wait_for_function(f"() => ({MARKER_X})().flat().length >= 3", timeout=30_000)
            # slider echoes queued behind the cells still reach the kernel: let them settle
            page.wait_for_function(KERNEL_IDLE, timeout=30_000)
            page.wait_for_timeout(1000)
            before = page.evaluate(MARKER_X)
            explorer.scroll_into_view_if_needed()
            shot_before = explorer.screenshot(path=str(tmp_path / "before.png"))

            # drag the position slider's handle to the other half of its track, as a user
            # would (where the notebook left it depends on widget messages still in flight)
            track = explorer.locator(".mixlab-position .noUi-target").first
            handle = explorer.locator(".mixlab-position .noUi-handle").first
            box, hbox = track.bounding_box(), handle.bounding_box()
            start = (hbox["x"] + hbox["width"] / 2 - box["x"]) / box["width"]
            goal = 0.75 if start < 0.5 else 0.25
            page.mouse.move(hbox["x"] + hbox["width"] / 2, hbox["y"] + hbox["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * goal, box["y"] + box["height"] / 2,
                            steps=8)
            page.mouse.up()
            page.wait_for_function(
                f"(before) => JSON.stringify(({MARKER_X})()) !== JSON.stringify(before)",
                arg=before, timeout=20_000)
            page.wait_for_timeout(500)  # let the image and the title redraw
            after = page.evaluate(MARKER_X)
            shot_after = explorer.screenshot(path=str(figures / "explorer_browser_smoke.png"))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"page at failure: {tmp_path / 'failure.png'}")
            raise
        finally:
            browser.close()

    # both panels' markers (three vertical segments each) moved the way the handle went
    assert len(before) == 2 and len(before[0]) == 3, before
    t_before, t_after = before[0][0][0], after[0][0][0]
    assert (t_after > t_before) if goal > start else (t_after < t_before), (start, before, after)
    assert all(seg == [t_after, t_after] for panel in after for seg in panel), after
    assert shot_before != shot_after  # the picture changed (marker, title, perturbed image)
