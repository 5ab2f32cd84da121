"""A person's walk through the app in a real Chromium: Data, Batches, Fine-tune (start, watch, stop, resume),
Compare, with a screenshot of each page in docs/screenshots/."""
from pathlib import Path

import pytest
from actions import settle, set_number as type_number
from playwright.sync_api import expect

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def go(page, title):
    """Click a page in the sidebar navigation, as a person does, and wait for its title."""
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()
    settle(page)


def shot(page, name):
    """Screenshot the whole page: Streamlit scrolls inside stMain, so grow the viewport to its height first."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 5000)})
    page.wait_for_timeout(800)  # let Plotly redraw at the new size before the picture
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    page.set_viewport_size(size)


def set_number(page, label, value):
    expect(type_number(page, label, value)).to_have_value(str(value))


def test_walk_through_the_pipeline(app_url, page):
    page.set_viewport_size({"width": 1400, "height": 1100})
    page.goto(app_url["url"])
    expect(page.get_by_role("heading", name="SFT Studio")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Stage 2: fine-tuning the LLM")).to_be_visible()
    expect(page.get_by_text("gpt2-medium (355M): not downloaded")).to_be_visible()
    expect(page.get_by_text("not reachable at")).to_be_visible()
    shot(page, "home")

    # Data: the bundled chapter dataset, its split 935/55/110.
    go(page, "Data")
    expect(page.get_by_text("1100 entries, all valid")).to_be_visible()
    for label, n in (("train entries", "935"), ("val entries", "55"), ("test entries", "110")):
        metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
        expect(metric.locator('[data-testid="stMetricValue"]')).to_have_text(n)
    expect(page.get_by_text("### Input:").first).to_be_visible()
    expect(page.locator(".js-plotly-plot")).to_have_count(1)
    shot(page, "data")

    # Batches: the first training batch of listing 7.6 and the toy batch's -100 targets.
    go(page, "Batches")
    shape = page.locator('[data-testid="stMetric"]').filter(has_text="Shape (B, T)")
    expect(shape.locator('[data-testid="stMetricValue"]')).to_have_text("(8, 61)")
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    expect(page.get_by_text("-100", exact=False).first).to_be_attached()
    expect(page.get_by_text("1.1269")).to_be_visible()
    expect(page.get_by_text("All 935 train examples look right", exact=False)).to_be_visible()
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    shot(page, "batches")

    # Fine-tune: no weights here, so the tiny random model; a short run, stopped and resumed.
    go(page, "Fine-tune")
    expect(page.get_by_text("is not downloaded yet", exact=False)).to_be_visible()
    page.get_by_role("button", name="Use the tiny random model instead").click()
    settle(page)
    expect(page.get_by_text("Random weights, no download", exact=False)).to_be_visible()
    page.get_by_text("More settings").click()
    settle(page)
    set_number(page, "Use the first N entries (0 = all)", 200)
    set_number(page, "Stop after N steps (0 = no limit)", 24)
    set_number(page, "Evaluate every N steps", 4)
    set_number(page, "Batches per evaluation", 1)
    set_number(page, "Max tokens per test answer", 8)
    page.get_by_role("button", name="Start training").click()
    points = page.locator(".js-plotly-plot g.points path.point")
    expect(points.first).to_be_attached(timeout=120_000)  # the first evaluation is on the curve
    page.get_by_role("button", name="Stop (keeps the checkpoint)").click()
    resume = page.get_by_role("button", name="Resume from the checkpoint")
    expect(resume).to_be_visible(timeout=120_000)
    expect(page.get_by_text("stopped", exact=True).first).to_be_visible()
    resume.click()
    expect(page.get_by_text("Done. Weights:", exact=False)).to_be_visible(timeout=240_000)
    # The run's state line; while the page reruns, the stale "running" line can still be on screen.
    expect(page.get_by_text("completed: step 24 of 24", exact=False)).to_be_visible()
    assert points.count() >= 3
    expect(page.get_by_text("Sample answer, epoch 1", exact=False)).to_be_visible()
    # The answers kept at the evaluations, a slider over them, and what keeping them cost.
    expect(page.get_by_text("Watch the answer form", exact=False)).to_be_visible()
    expect(page.get_by_text("Taking these", exact=False)).to_be_visible()
    shot(page, "finetune")

    # Compare: the run's answers beside the base model's and the reference.
    go(page, "Compare")
    set_number(page, "Max new tokens", 8)
    page.get_by_role("button", name="Generate answers").click()
    expect(page.get_by_text("Reference", exact=True)).to_have_count(3, timeout=120_000)
    expect(page.get_by_text("Base: tiny (random)", exact=True).first).to_be_visible()
    expect(page.get_by_text("20 answers in", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Download instruction-data-with-response.json")).to_be_visible()
    shot(page, "compare")

    go(page, "Judge")
    shot(page, "judge")

    # Chat: the run answers a typed message, streamed; then the export section writes it for Ollama.
    go(page, "Chat")
    set_number(page, "Max new tokens", 6)
    page.get_by_label("Instruction", exact=True).fill("Name a primary colour.")
    page.get_by_role("button", name="Send", exact=True).click()
    settle(page)
    expect(page.get_by_text("You:", exact=False).first).to_be_visible(timeout=60_000)
    expect(page.get_by_role("button", name="Save as a test case")).to_be_visible(timeout=60_000)
    settle(page)  # the rerun that draws the reply ends first: a click during it can be lost
    page.get_by_text("Export this model for transformers, llama.cpp and Ollama").click()
    settle(page)
    page.get_by_role("button", name="Export", exact=True).click()
    settle(page)
    expect(page.get_by_text("Exported to", exact=False)).to_be_visible(timeout=120_000)
    expect(page.get_by_text("ollama create", exact=False).first).to_be_visible()
    assert list(app_url["exports"].glob("*/gguf/*-f32.gguf")) and list(app_url["exports"].glob("*/hf/model.safetensors"))
    # A long reply, stopped while it streams: what was written stays, marked "(stopped)". The tiny model's
    # random weights almost never write end-of-text, so 1024 greedy tokens take a while to stream.
    settle(page)  # the export's watcher reran the whole page when the job ended: a dropdown opened during it closes
    option = page.get_by_role("option", name="base: tiny (random) (random weights)")
    for _ in range(3):
        page.get_by_role("combobox", name="Model", exact=True).click()
        try:
            expect(option).to_be_visible(timeout=10_000)
            break
        except AssertionError:
            settle(page)
    option.click()
    settle(page)
    set_number(page, "Max new tokens", 1024)
    page.get_by_label("Instruction", exact=True).fill("Write a long story about the sea.")
    page.get_by_role("button", name="Send", exact=True).click()
    stop = page.get_by_role("button", name="Stop", exact=True)
    expect(stop).to_be_visible(timeout=60_000)
    streaming = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="Write a long story")
    expect(streaming.first).to_be_visible()
    page.wait_for_timeout(300)  # a few pieces of the answer
    stop.click()
    settle(page)
    expect(page.get_by_text("(stopped)", exact=False)).to_be_visible(timeout=30_000)
    expect(page.get_by_role("button", name="Save as a test case")).to_have_count(2)
    shot(page, "chat")

    # Learn: the run's loss taken apart token by token on the first validation example, -100 targets greyed.
    page.locator('[data-testid="stSidebarNav"]').get_by_text("Learn", exact=True).click()
    expect(page.get_by_role("heading", name="Learn: where the loss comes from")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Mean loss of this example", exact=False)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Over the whole val split", exact=False)).to_be_visible(timeout=60_000)
    settle(page)
    shot(page, "learn")
