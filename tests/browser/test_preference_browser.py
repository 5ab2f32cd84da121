"""DPO as a person runs it (issue 14): the Preference page's pairs and collated grid, Start DPO from a finished tiny
run, the run completing with its loss and reward curves and the note, the reference cached in the run folder."""
import json
from pathlib import Path

import pytest
from playwright.sync_api import expect

from actions import set_number, settle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
STEPS = 6
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def test_dpo_from_the_preference_page(app_url, page):
    from sft.studio.config import TrainConfig
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    source = Run.create(TrainConfig.from_settings(model="tiny", limit=20, max_steps=2, batch_size=4, device="cpu",
                                                  sample_each_epoch=False), root=app_url["runs"], name="sft-tiny")
    execute_run(source, responses=False)

    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(app_url["url"] + "/preference")
    expect(page.get_by_role("heading", name="Preference", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    expect(page.get_by_text("The 6 pairs whose chosen and rejected answers are identical", exact=False)).to_be_visible()
    expect(page.get_by_text("Word-level diff", exact=False)).to_be_visible()
    expect(page.get_by_text("Chosen and rejected rows share one length", exact=False)).to_be_visible()

    set_number(page, "First N pairs (0 = all)", 80)  # 68 train pairs: 8 batches
    set_number(page, "Stop after N steps (0 = no limit)", STEPS)
    page.get_by_role("button", name="Start DPO").click()
    expect(page.get_by_text("Done:", exact=False)).to_be_visible(timeout=300_000)
    expect(page.get_by_text(f"completed: step {STEPS} of {STEPS}", exact=False)).to_be_visible()
    expect(page.get_by_text("Why the chosen reward can fall while the margin grows", exact=False)).to_be_visible()
    expect(page.get_by_text("Each step runs the reference 0 times", exact=False)).to_be_visible()

    (run,) = [p for p in app_url["runs"].iterdir() if p.is_dir() and "-dpo-" in p.name]
    config = json.loads((run / "config.json").read_text())
    assert (config["kind"], config["from_run"], config["max_steps"], config["limit"]) == (
        "dpo", str(source.path), STEPS, 80)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "eval"] == [0, 5]
    assert (run / "reference_logprobs.safetensors").is_file()

    # The whole page, for the README: the pairs, the collated grid, the run's curves.
    page.set_viewport_size({"width": 1400, "height": 1000})
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(max(height, 1000), 5000)})
    page.wait_for_timeout(800)  # Plotly redraws at the new size
    page.screenshot(path=str(SHOTS / "preference.png"))
