"""The Data page in a real Chromium: a real upload (the server's own size limit is no longer the one that
speaks), a row of the table picked with the mouse, a 60 MB file refused in words, and a reload that keeps
the uploaded dataset. Takes docs/screenshots/data-1280.png (1280x720, after the upload)."""
import json
import os
from pathlib import Path

import pytest
from playwright.sync_api import expect

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
HEADER_PX, ROW_PX = 36, 72  # the table's header and its row_height on the page (pages/1_data.py)


def settle(page):
    page.wait_for_timeout(150)  # the rerun's start reaches the browser shortly after the action
    expect(page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]')).to_be_attached()


def capitals(n):
    """Entries with long outputs, so the table has text to wrap."""
    return [{"instruction": f"Describe city number {i} in three sentences.",
             "input": "" if i % 3 else f"City {i}",
             "output": f"City {i} lies on a river. " * 8 + "It is known for its markets."} for i in range(n)]


def test_upload_pick_a_row_refuse_a_big_file_and_reload(app_url, page, tmp_path):
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(app_url["url"] + "/data")
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    page.get_by_text("Upload JSON / JSONL", exact=True).click()
    settle(page)
    good = tmp_path / "cities.json"
    good.write_text(json.dumps(capitals(30)))
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(good))
    settle(page)
    expect(page.get_by_text("cities.json: 30 entries, all valid")).to_be_visible()
    expect(page.get_by_text("Split too small:")).to_be_attached()  # 25 / 2 / 3
    expect(page.get_by_text("test has 3 entries: Compare and Judge answer and score 3 entries only."))\
        .to_be_attached()
    SHOTS.mkdir(parents=True, exist_ok=True)  # the picture: the file, its check and the table, on a laptop's screen
    page.locator('[data-testid="stFileUploader"]').evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / "data-1280.png"))

    # A click on the third row of the table shows that entry below.
    grid = page.locator('[data-testid="stDataFrame"]')
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 12, box["y"] + HEADER_PX + 2 * ROW_PX + ROW_PX / 2)  # the row's selection box
    settle(page)
    expect(page.get_by_label("Entry", exact=True)).to_have_value("2")
    expect(page.get_by_text("Entry 2 is row 3 of the table, selected.")).to_be_visible()

    # 60 MB: the page, not the uploader's hover-only "!", says the size and the limit.
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(int(60.2 * 1024 * 1024))
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(big))
    settle(page)
    expect(page.get_by_text("Not loaded: big.json is 60.2 MB; the limit is 50 MB.")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("cities.json: 30 entries, all valid")).to_be_visible()
    os.remove(big)

    # A reload is a new session with an empty uploader: the dataset kept in the workspace is shown.
    page.reload()
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(timeout=60_000)
    settle(page)
    expect(page.get_by_text("cities.json: 30 entries, all valid")).to_be_visible()
    expect(page.get_by_text("kept in the workspace")).to_be_visible()
    kept = json.loads((app_url["runs"].parent / "workspace" / "workspace.json").read_text())
    assert kept["dataset_name"] == "cities.json" and kept["data_source_kind"] == "Upload JSON / JSONL"
