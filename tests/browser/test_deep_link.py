"""A fresh server whose first visitor opens a page's own URL still frames it with the app's navigation."""
import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_first_visit_to_a_page_url_gets_the_app_navigation(app_url, page):
    # This module's server is new, and this is its first visit: Streamlit's legacy pages/ mode would
    # list the files of pages/ ("common" among them) instead of app.py's navigation.
    page.goto(app_url["url"] + "/judge")
    nav = page.locator('[data-testid="stSidebarNav"]')
    heading = page.get_by_role("heading", name="Judge", exact=True)
    seen = set()
    for _ in range(600):  # while the cold server loads torch: never the legacy list of pages/ file names
        seen.update(nav.all_inner_texts())
        if heading.count():
            break
        page.wait_for_timeout(50)
    assert not [t for t in seen if "finetune" in t or "judge\n" in t], seen  # the files' names, lower case
    expect(heading).to_be_visible()
    expect(nav.get_by_text("Home", exact=True)).to_be_visible()
    expect(nav.get_by_text("Fine-tune", exact=True)).to_be_visible()
    expect(nav.get_by_text("common", exact=True)).to_have_count(0)
    # And the navigation stays the app's on the next page.
    nav.get_by_text("Data", exact=True).click()
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible()
    expect(nav.get_by_text("common", exact=True)).to_have_count(0)
