"""The Batches page on a projector, 1280x720, in a real Chromium: every control's label reads whole on one line
and each number input keeps its +/- buttons, the grid starts on the first screen with a legend entry for every
class, the "Why -100" demo follows right after, and a reload keeps the batch settings. Takes
docs/screenshots/batches-1280.png (the first screen)."""
from pathlib import Path

import pytest
from playwright.sync_api import expect

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREEN = {"width": 1280, "height": 720}
CONTROLS = {"bat_split": "Split", "bat_size": "Batch size", "bat_seed": "Seed", "bat_number": "Batch (0-115)",
            "bat_maxlen": "allowed_max_length", "bat_mask": "Mask instruction"}
NUMBER_INPUTS = ("bat_size", "bat_seed", "bat_number", "bat_maxlen")

# Per control: its label's text, whether it overflows its box (cut with "..."), how many lines it takes, and
# whether its +/- buttons are drawn (Streamlit drops them from a number input too narrow for them).
LABELS_JS = """keys => keys.map(k => {
  const box = document.querySelector('.st-key-' + k);
  const md = box.querySelector('[data-testid=stWidgetLabel] [data-testid=stMarkdownContainer]');
  const lines = document.createRange();
  lines.selectNodeContents(md.querySelector('p'));
  const up = box.querySelector('[data-testid=stNumberInputStepUp]');
  return {key: k, text: md.innerText, overflows: md.scrollWidth > md.clientWidth,
          lines: lines.getClientRects().length, steps: !!up && up.getBoundingClientRect().width > 0};
})"""


def settle(page):
    page.wait_for_timeout(150)  # the rerun's start reaches the browser shortly after the action
    expect(page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]')).to_be_attached()


def open_batches(page, url):
    page.goto(url + "/batches")
    expect(page.get_by_role("heading", name="Batches", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
    page.wait_for_timeout(800)  # Plotly's first drawing


def test_the_batches_page_reads_whole_at_1280x720(app_url, page):
    page.set_viewport_size(SCREEN)
    open_batches(page, app_url["url"])
    labels = page.evaluate(LABELS_JS, list(CONTROLS))
    for label in labels:
        assert label["text"] == CONTROLS[label["key"]], label
        assert not label["overflows"] and label["lines"] == 1, label  # not "Mask instruct…", no mid-word wrap
        assert label["steps"] == (label["key"] in NUMBER_INPUTS), label

    grid = page.locator(".js-plotly-plot").first
    box = grid.bounding_box()
    assert box["y"] < SCREEN["height"] / 2, box  # the grid starts in the upper half of the first screen
    targets_legend = grid.locator("text", has_text="targets")
    assert targets_legend.bounding_box()["y"] < SCREEN["height"], "the targets' panel starts on the first screen"
    for name in ("instruction", "input", "response", "end-of-text", "padding", "trains (in the loss)",
                 "E: the end-of-text the row learns", "×: -100, ignored"):
        expect(grid.locator("text.legendtext, text.legend2text", has_text=name).first).to_be_attached()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "batches-1280.png"))

    # The -100 demo is next: its heading within the second screen, the loss on the page.
    why = page.get_by_role("heading", name="Why -100: cross-entropy skips it")
    top = why.evaluate("e => e.getBoundingClientRect().top + document.querySelector('[data-testid=stMain]').scrollTop")
    assert top < 2 * SCREEN["height"], top
    expect(page.get_by_text("is the default", exact=False).first).to_be_attached()
    why.scroll_into_view_if_needed()
    expect(page.get_by_text("1.1269")).to_be_visible()


def test_a_reload_keeps_the_batch_settings(app_url, page):
    page.set_viewport_size(SCREEN)
    open_batches(page, app_url["url"])
    box = page.get_by_label("Batch size", exact=True)
    box.fill("4")
    box.press("Enter")
    settle(page)
    shape = page.locator('[data-testid="stMetric"]').filter(has_text="Shape (B, T)")
    expect(shape.locator('[data-testid="stMetricValue"]')).to_have_text("(4, 61)")  # batch 0 of 4 rows
    page.reload()
    open_batches(page, app_url["url"])
    expect(page.get_by_label("Batch size", exact=True)).to_have_value("4")
    expect(shape.locator('[data-testid="stMetricValue"]')).to_have_text("(4, 61)")
