"""The runs table ("All runs") on the Fine-tune page follows a training as it goes (issue 12): its state and
"steps done" move with the live view, with no click, and end on the run's final values."""
import json

import pytest
from playwright.sync_api import expect

from actions import set_number, settle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
STEPS = 120  # the run's max_steps: long enough for the table to show it mid-way


def cell(page, column, row=0):
    """The text of a cell of the runs table (its accessible copy: the grid itself is drawn on a canvas)."""
    return page.locator('[data-testid="stDataFrame"]').last.get_by_test_id(f"glide-cell-{column}-{row}")


NAME, STATE, STEPS_DONE, TRAIN_LOSS = 0, 1, 7, 9  # columns, in the page's column_order


def wait_for_row(page, test, polls=2000):
    """Read the first row until ``test(state, steps done)`` holds; return what it read (no clicks meanwhile)."""
    for _ in range(polls):
        state, steps = cell(page, STATE).inner_text(), cell(page, STEPS_DONE).inner_text()
        if steps.isdigit() and test(state, int(steps)):
            return state, int(steps)
        page.wait_for_timeout(100)  # the table refreshes itself every 2 s while a run is active
    raise AssertionError(f"the runs table still reads {state!r}, {steps!r}")


def test_the_runs_table_shows_the_live_step_while_a_run_trains(app_url, page):
    page.goto(app_url["url"] + "/finetune")
    expect(page.get_by_role("heading", name="Fine-tune", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    page.get_by_role("button", name="Use the tiny random model instead").click()
    settle(page)
    page.get_by_text("More settings").click()
    settle(page)
    set_number(page, "Stop after N steps (0 = no limit)", STEPS)
    set_number(page, "Evaluate every N steps", 20)
    set_number(page, "Max tokens per test answer", 4)
    page.get_by_role("button", name="Start training").click()
    settle(page)

    _, first = wait_for_row(page, lambda state, steps: state == "running" and 0 < steps < STEPS)
    state, later = wait_for_row(page, lambda state, steps: steps > first)  # it moved on by itself
    assert later <= STEPS
    expect(page.get_by_text("Done. Weights:", exact=False)).to_be_visible(timeout=240_000)
    state, steps = wait_for_row(page, lambda state, steps: state == "completed")
    assert steps == STEPS
    (run,) = [p for p in app_url["runs"].iterdir() if p.is_dir()]
    assert cell(page, NAME).inner_text() == run.name
    status = json.loads((run / "status.json").read_text())
    assert float(cell(page, TRAIN_LOSS).inner_text()) == pytest.approx(status["progress"]["train_loss"])
