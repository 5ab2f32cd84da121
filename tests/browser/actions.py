"""What a person does on the app's pages, for the browser tests: wait for a rerun to end, type a number."""
from playwright.sync_api import expect


def settle(page, timeout=30_000):
    """Wait until the app has finished the rerun that the last action started (a busy machine: up to 30 s)."""
    page.wait_for_timeout(150)  # the rerun's start reaches the browser shortly after the action
    expect(page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]')).to_be_attached(timeout=timeout)


def set_number(page, label, value):
    """Type ``value`` into the number input labelled ``label`` and press Enter; returns the input."""
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    settle(page)
    return box
