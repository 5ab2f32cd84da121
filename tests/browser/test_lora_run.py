"""A LoRA run as a person makes it (issue 13): Fine-tune's Method set to LoRA with its rank shown beside the
trainable count, Start, a completed run marked LoRA in the runs table, its merged weights answering on Compare.
The Method section at 1280x720 is saved as docs/screenshots/finetune-lora-1280.png."""
import json
from pathlib import Path

import pytest
from playwright.sync_api import expect

from actions import set_number, settle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
STEPS = 40


def test_a_lora_run_from_the_fine_tune_page_to_compare(app_url, page):
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(app_url["url"] + "/finetune")
    expect(page.get_by_role("heading", name="Fine-tune", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    page.get_by_role("button", name="Use the tiny random model instead").click()
    settle(page)
    page.get_by_text("LoRA (exercise 7.4)", exact=True).click()
    # The section whole (rank 16, every layer: exercise 7.4's) before a setting changes: a change sent while
    # the section is still arriving would be a change to a half-drawn page.
    expect(page.get_by_text("842,000 trainable of 7,391,376 parameters", exact=False)).to_be_visible()
    settle(page)
    set_number(page, "Rank", 8)
    # Every Linear of the tiny model (its output head too) wrapped at rank 8, counted before any training.
    count = page.get_by_text("421,000 trainable of 6,970,376 parameters (6.04%)", exact=False)
    expect(count).to_be_visible()
    page.get_by_text("Method", exact=True).first.scroll_into_view_if_needed()
    page.mouse.wheel(0, -120)  # the title row above the method, for context
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / "finetune-lora-1280.png"))

    page.get_by_text("More settings", exact=True).click()
    set_number(page, "Stop after N steps (0 = no limit)", STEPS)
    set_number(page, "Test answers after training (0 = auto)", 5)
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("Done. Weights:", exact=False)).to_be_visible(timeout=300_000)
    expect(page.get_by_text(f"completed: step {STEPS} of {STEPS}", exact=False)).to_be_visible()

    (run,) = [p for p in app_url["runs"].iterdir() if p.is_dir() and not p.name.startswith(".")]
    config = json.loads((run / "config.json").read_text())
    assert (config["lora_rank"], config["lora_alpha"], config["lora_targets"]) == (8, 16.0, "all")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_loss"] for e in events if e["type"] == "eval"]
    assert len(val) >= 2 and val[-1] < val[0]  # the adapters learn: the validation loss falls
    assert len(json.loads((run / "instruction-data-with-response.json").read_text())) == 5

    page.goto(app_url["url"] + "/compare")
    expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    page.get_by_role("button", name="Generate answers").click()  # answered in the page: on a busy machine
    expect(page.get_by_text(f"Fine-tuned: {run.name}", exact=False).first).to_be_visible(timeout=120_000)
