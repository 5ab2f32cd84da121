"""Presentation mode on a projector, 1280x720, in a real Chromium: the sidebar's "Presenting (projector)" toggle
enlarges the Batches grid and the Learn token view, nothing needs scrolling sideways (the -100 cells, the E of
each row, the outlined end-of-text target stay on screen), and a reload keeps it on. Takes
docs/screenshots/batches-presenting-1280.png and docs/screenshots/learn-presenting-1280.png."""
from pathlib import Path

import pytest
from playwright.sync_api import expect

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREEN = {"width": 1280, "height": 720}
# How far the page can scroll sideways (0: not at all), the main column's and the window's.
SIDEWAYS_JS = """() => {
  const main = document.querySelector('[data-testid=stMain]');
  return Math.max(main.scrollWidth - main.clientWidth, document.documentElement.scrollWidth - window.innerWidth);
}"""


def settle(page):
    page.wait_for_timeout(150)  # the rerun's start reaches the browser shortly after the action
    expect(page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]')).to_be_attached()


def open_page(page, url, path, heading):
    page.goto(url + path)
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=60_000)
    settle(page)


def right_edges(locator):
    return [box["x"] + box["width"] for box in (locator.nth(i).bounding_box() for i in range(locator.count()))]


def test_presenting_enlarges_the_grid_and_the_tokens_without_sideways_scrolling(app_url, page):
    page.set_viewport_size(SCREEN)
    open_page(page, app_url["url"], "/batches", "Batches")
    grid = page.locator(".js-plotly-plot").first
    expect(grid).to_be_visible(timeout=60_000)
    page.wait_for_timeout(800)  # Plotly's first drawing
    before = grid.bounding_box()
    switch = page.locator(".st-key-side_presenting")
    switch.get_by_text("Presenting (projector)").click()
    settle(page)
    expect(switch.locator("input")).to_be_checked()
    page.wait_for_timeout(800)
    grid = page.locator(".js-plotly-plot").first
    after = grid.bounding_box()
    assert after["height"] > 1.3 * before["height"] and after["width"] >= before["width"], (before, after)
    assert page.evaluate(SIDEWAYS_JS) == 0
    marks = grid.locator("g.heatmaplayer text", has_text="E")  # one end-of-text per row, in the last columns
    assert marks.count() == 8 and max(right_edges(marks)) <= SCREEN["width"]
    ignored = grid.locator("g.heatmaplayer text", has_text="×")
    assert ignored.count() == 58 and max(right_edges(ignored)) <= SCREEN["width"]  # every -100 cell
    grid.evaluate("e => e.scrollIntoView({block: 'center'})")  # both panels, -100 cells and E's, on one screen
    page.wait_for_timeout(300)
    top, bottom = grid.bounding_box()["y"], grid.bounding_box()["y"] + grid.bounding_box()["height"]
    assert 0 <= top and bottom <= SCREEN["height"], (top, bottom)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "batches-presenting-1280.png"))

    page.get_by_text("Mask instruction").click()  # exercise 7.2, so the Learn view has greyed (-100) targets too
    settle(page)
    page.reload()
    open_page(page, app_url["url"], "/learn", "Learn: where the loss comes from")
    expect(page.locator(".st-key-side_presenting input")).to_be_checked()  # kept over a reload and a page change
    eot = page.locator("span[style*='3px solid #d55e00']")
    expect(eot.first).to_be_attached(timeout=60_000)
    assert eot.count() == 1 and right_edges(eot)[0] <= SCREEN["width"]
    greyed = page.locator("span[style*='background:#e0e0e0'][style*='font-size:24px']")
    assert greyed.count() > 10 and max(right_edges(greyed)) <= SCREEN["width"]
    assert page.evaluate(SIDEWAYS_JS) == 0
    page.locator("[data-testid=stMetric]").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / "learn-presenting-1280.png"))
