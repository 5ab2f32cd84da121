"""Judge page in a real Chromium: scoring is a background job; its Stop ends it, keeps what was scored, and Score
goes on from there. Stop is shown only while a job runs."""
import json
import re

import pytest
from fake_servers import FakeOllama
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def settle(page):
    page.wait_for_timeout(150)  # the rerun's start reaches the browser shortly after the action
    expect(page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]')).to_be_attached()


def test_stop_keeps_the_scores_and_score_resumes(app_url, page):
    # A judge that takes 0.4 s per answer: 110 answers would take ~45 s, so there is time to stop.
    with FakeOllama(reply=lambda prompt, model: "75", delay=0.4) as srv:
        page.goto(app_url["url"] + "/judge")
        expect(page.get_by_role("heading", name="Judge", exact=True)).to_be_visible(timeout=60_000)
        url_box = page.get_by_label("Server URL", exact=True)
        url_box.fill(srv.base_url)
        url_box.press("Enter")
        settle(page)
        expect(page.get_by_text("is there. Models:")).to_be_visible()
        page.get_by_text("Bundled example", exact=True).click()
        settle(page)

        expect(page.get_by_role("button", name="Stop")).to_have_count(0)  # nothing runs: nothing to stop
        page.get_by_role("button", name="Score", exact=True).click()
        expect(page.get_by_text(re.compile(r"([3-9]|\d\d+) of 110 scored"))).to_be_visible()  # the job's progress
        expect(page.get_by_role("button", name="Score", exact=True)).to_be_disabled()
        page.get_by_role("button", name="Stop").click()
        expect(page.get_by_text("the scores so far are saved: Score goes on from there", exact=False)).to_be_visible()
        settle(page)
        expect(page.get_by_role("button", name="Stop")).to_have_count(0)

        asked = len(srv.chat_requests)
        page.wait_for_timeout(1500)  # nothing more is asked once stopped
        assert len(srv.chat_requests) == asked
        assert 3 <= asked < 110
        store = next((app_url["runs"] / "scores").glob("instruction-data-with-response-*model_response*"))
        saved = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
        assert len(saved) == asked and {r["score"] for r in saved} == {75}  # the answer in flight was kept too
        expect(page.get_by_text(f"Stopped at {asked} of 110 scored", exact=False)).to_be_visible()
        expect(page.locator('[data-testid="stMetric"]').filter(has_text="Scored")
               .locator('[data-testid="stMetricValue"]')).to_have_text(f"{len(saved)} of 110")

        # Score again: only the rest is asked, and the page ends with all 110.
        srv.delay = 0.0
        page.get_by_role("button", name="Score", exact=True).click()
        settle(page)
        expect(page.locator('[data-testid="stMetric"]').filter(has_text="Scored")
               .locator('[data-testid="stMetricValue"]')).to_have_text("110 of 110", timeout=90_000)
        assert len(srv.chat_requests) == asked + (110 - len(saved)) == 110
        expect(page.get_by_role("button", name="Stop")).to_have_count(0)
