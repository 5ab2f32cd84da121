"""The sidebar's "Presenting (projector)" toggle: kept across pages and reloads (the workspace), it draws the
Batches grid and the Learn token view and their legends larger."""
import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def open_page(page):
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def home_page():
    """Home, where app.py draws the toggle (AppTest runs a page's file alone). Its first run leaves Streamlit's
    legacy pages/ mode (ui/nav.py) and the next puts AppTest back in it, which gives the toggle another id:
    a value set before that second run would go to a widget that is gone."""
    return AppTest.from_file(APP, default_timeout=60).run().run()


def grid(at):
    """(height, cell font size, legend font size) of the Batches grid."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return (spec["layout"]["height"], spec["data"][0]["textfont"]["size"], spec["layout"]["legend"]["font"]["size"])


def test_the_toggle_enlarges_the_grid_and_the_tokens_and_a_reload_keeps_it(app_dirs):
    at = open_page("pages/2_batches.py")
    assert grid(at) == (120 + 2 * 19 * 8, 12, 13)  # 8 rows of 19 px per panel, as before

    home = home_page()  # app.py draws the toggle in every page's sidebar
    home.toggle(key="side_presenting").set_value(True).run()
    assert not home.exception, home.exception
    saved = json.loads((app_dirs["runs"].parent / "workspace" / "workspace.json").read_text())
    assert saved["presenting"] is True

    at = open_page("pages/2_batches.py")  # a reload (a new session) on another page
    assert at.session_state["presenting"] is True
    assert grid(at) == (round(120 * 1.4) + 2 * round(19 * 1.4) * 8, round(12 * 1.4), round(13 * 1.4))
    again = open_page("pages/9_learn.py")
    legend, tokens = [h.proto.body for h in again.get("html")][-2:]
    assert "font-size:20px" in legend and "font-size:24px" in tokens and "3px solid #d55e00" in tokens

    home = home_page()
    assert home.toggle(key="side_presenting").value is True  # the toggle itself starts from the workspace
    home.toggle(key="side_presenting").set_value(False).run()
    again = open_page("pages/9_learn.py")
    legend, tokens = [h.proto.body for h in again.get("html")][-2:]
    assert "font-size:13px" in legend and "font-size:15px" in tokens and "2px solid #d55e00" in tokens
