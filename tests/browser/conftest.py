"""A real `streamlit run app.py` on 127.0.0.1, and Debian's Chromium driven by Playwright (no `playwright install`)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # for `sft`, to find and end training workers at teardown
    sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network: without the background-networking ones Chromium keeps dialling out.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_S = 90  # bound on the server's start (imports torch on a shared 2-core machine)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_training_workers(runs_dir):
    """Training workers are detached from the server (their own session): end the ones our runs started."""
    from sft.studio.files import read_json
    from sft.studio.runs import ACTIVE_STATES, list_runs

    for run in list_runs(runs_dir):
        if run.is_broken:
            continue
        status = read_json(run.status_path, {}) or {}
        pid = status.get("pid") or (read_json(run.path / "worker.json", {}) or {}).get("pid")
        if status.get("state") in ACTIVE_STATES and pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """Base URL of the app, served with empty runs/ and models/ folders and no judge server."""
    tmp = tmp_path_factory.mktemp("browser")
    runs, models = tmp / "runs", tmp / "models"
    runs.mkdir()
    models.mkdir()
    port = _free_port()
    env = dict(os.environ, SFT_RUNS_DIR=str(runs), SFT_MODELS_DIR=str(models), SFT_EXPORTS_DIR=str(tmp / "exports"),
               SFT_OLLAMA_URL="http://127.0.0.1:9", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}: {(tmp / 'streamlit.log').read_text()}")
            try:
                if requests.get(url + "/_stcore/health", timeout=2).text == "ok":
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer {url}/_stcore/health within {STARTUP_S} s")
            time.sleep(0.25)  # poll interval while the server starts
        yield {"url": url, "runs": runs, "models": models, "exports": tmp / "exports"}
    finally:
        _stop_training_workers(runs)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/test.sh does)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a rerun on a busy 2-core machine can take seconds

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    p.set_default_timeout(30_000)
    yield p
    context.close()
