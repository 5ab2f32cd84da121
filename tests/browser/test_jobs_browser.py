"""Compare page in a real Chromium: "Generate all" is a background job; changing a widget and reloading the page
while it runs leave it running, and it ends with every answer saved and the page showing them (issue 12)."""
import os
import re
import signal

import pytest
from playwright.sync_api import expect

import actions
from actions import settle

from sft.studio.config import TrainConfig
from sft.studio.files import read_json
from sft.studio.jobs import Job
from sft.studio.runs import Run
from sft.studio.worker import execute_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def set_number(page, label, value):
    expect(actions.set_number(page, label, value)).to_have_value(str(value))


def test_generate_all_survives_a_changed_widget_and_a_reload(app_url, page):
    # A tiny random run trained for 2 steps, which answered 2 of its 110 test entries.
    config = TrainConfig(model="tiny", weights="random", max_steps=2, response_tokens=2, answer_limit=2,
                         sample_each_epoch=False)
    run = Run.create(config, root=app_url["runs"], name="answers")
    execute_run(run)
    assert len(read_json(run.responses_path)) == 2
    job = Job(run.path / "jobs" / "answers")
    try:
        page.goto(app_url["url"] + "/compare")
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_text("2 answers in", exact=False)).to_be_visible()
        set_number(page, "Max new tokens", 160)  # some tens of seconds of answering on this CPU
        page.get_by_role("button", name="Generate all 110 answers").click()
        watching = page.get_by_text(re.compile(r"Starting…|\d+ of 110 answered"))
        expect(watching).to_be_visible()
        expect(page.get_by_role("button", name="Stop")).to_be_visible()
        expect(page.get_by_role("button", name="Generate all 110 answers")).to_be_disabled()
        expect(page.get_by_text("2 answers in", exact=False)).to_have_count(0)  # no stale success box

        set_number(page, "Seed", 7)  # a click elsewhere used to end the answering silently
        assert job.active, job.tail_log()
        expect(watching).to_be_visible()
        page.reload()  # a refresh (or a closed tab): a new session finds the job through its folder
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible(timeout=60_000)
        assert job.active, job.tail_log()
        expect(watching).to_be_visible()

        expect(page.get_by_text("110 answers in", exact=False)).to_be_visible(timeout=300_000)
        status = job.status()
        assert status["state"] == "completed" and (status["done"], status["total"]) == (110, 110)
        assert job.params["max_new_tokens"] == 160  # the settings of the click, not the Seed changed after it
        answers = read_json(run.responses_path)
        assert len(answers) == 110 and all(isinstance(a["model_response"], str) for a in answers)
        expect(page.get_by_role("button", name="Stop")).to_have_count(0)
        expect(page.get_by_role("button", name="Generate all 110 answers")).to_be_enabled()
        expect(page.get_by_role("button", name="Download instruction-data-with-response.json")).to_be_visible()
    finally:
        status = job.status()
        if status.get("state") in ("queued", "running") and status.get("pid"):
            os.kill(int(status["pid"]), signal.SIGKILL)  # a detached process: never leave it behind
