"""Two runs, the second queued behind the first, as a person does it (issue 17): Start on the Fine-tune page, then
"Queue after" with one setting changed; the Experiments page shows the queued run in line, then the queue empty
once the first ends and the second starts by itself; with both done, their curves overlaid and the settings
that differ. Saves docs/screenshots/experiments.png."""
import json
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from actions import set_number, settle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def runs_in(folder):
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def state_of(run):
    try:
        return json.loads((run / "status.json").read_text()).get("state")
    except (FileNotFoundError, ValueError):
        return None


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def open_experiments(page, url):
    page.goto(url + "/experiments")
    expect(page.get_by_role("heading", name="Experiments", exact=True)).to_be_visible(timeout=60_000)
    settle(page)


def test_a_queued_run_starts_when_the_first_ends_and_both_are_compared(app_url, page):
    url = app_url["url"]
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(url + "/finetune")
    expect(page.get_by_role("heading", name="Fine-tune", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    page.get_by_role("button", name="Use the tiny random model instead").click()
    settle(page)
    page.get_by_text("More settings", exact=True).click()
    settle(page)
    set_number(page, "Use the first N entries (0 = all)", 200)  # 2 epochs of 22 steps
    set_number(page, "Evaluate every N steps", 4)
    set_number(page, "Batches per evaluation", 1)
    set_number(page, "Max tokens per test answer", 4)
    set_number(page, "Test answers after training (0 = auto)", 2)
    page.get_by_role("button", name="Start training").click()

    # The device is busy: Start is off and "Queue after <the first run>" is offered; the second run stops at 6.
    queue = page.get_by_role("button", name=re.compile(r"^Queue after"))
    expect(queue).to_be_visible(timeout=120_000)
    (first,) = runs_in(app_url["runs"])
    set_number(page, "Stop after N steps (0 = no limit)", 6)
    page.get_by_role("button", name=re.compile(r"^Queue after")).click()
    expect(page.get_by_text("number 1 in line", exact=False).first).to_be_visible(timeout=60_000)
    second = next(p for p in runs_in(app_url["runs"]) if p != first)
    assert state_of(second) == "queued"

    # The Experiments page: the queued run in line while the first one trains.
    open_experiments(page, url)
    if state_of(first) in ("starting", "running") and state_of(second) == "queued":
        expect(page.get_by_role("combobox", name="Queued run")).to_have_value(second.name)

    # The first ends; the second starts by itself (the queue's runner), and then the queue is empty.
    wait_for(lambda: state_of(second) not in ("queued", None), 300, f"{second.name} to leave the queue")
    assert state_of(first) == "completed"
    wait_for(lambda: state_of(second) == "completed", 300, f"{second.name} to finish")
    first_status = json.loads((first / "status.json").read_text())
    second_status = json.loads((second / "status.json").read_text())
    assert first_status["finished"] <= second_status["started"]  # one after the other, never together
    open_experiments(page, url)
    expect(page.get_by_text("No run is waiting", exact=False)).to_be_visible()

    # Both picked (the page's default: the newest three), their curves overlaid, what differs tabulated.
    picked = page.locator(".st-key-exp_runs")
    expect(picked).to_contain_text(first.name)
    expect(picked).to_contain_text(second.name)
    chart = page.locator(".st-key-exp_curves .js-plotly-plot")
    expect(chart).to_be_visible()
    expect(chart.locator(".scatterlayer .trace")).to_have_count(4)  # train and validation of each run
    expect(page.get_by_role("heading", name="Settings that differ")).to_be_visible()
    expect(page.locator("[data-testid='stDataFrame']")).to_have_count(2)  # what each achieved; what differs
    expect(page.get_by_text("None: these runs share every setting")).to_have_count(0)
    chart.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / "experiments.png"))
