"""The workspace file (ui/workspace.py): choices written beside runs/, read back by a new browser session,
and a kept dataset whose file has gone, or a torn file, falling back to the defaults with a word."""
import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def workspace(app_dirs):
    return app_dirs["runs"].parent / "workspace" / "workspace.json"


def session(page=None):
    at = AppTest.from_file(APP, default_timeout=30).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception
    return at


def test_home_shows_the_judge_kept_in_the_workspace(app_dirs):
    from fake_servers import FakeOllama

    with FakeOllama(models=["llama3.1:70b"]) as srv:
        path = workspace(app_dirs)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"judge_backend": "ollama", "judge_url": srv.base_url,
                                    "judge_model": "llama3.1:70b"}))
        at = session()
    md = "\n".join(m.value for m in at.markdown)
    assert "**Judge server** (Ollama, model `llama3.1:70b`)" in md
    assert f"answers at `{srv.base_url}`: llama3.1:70b" in md
    assert "http://127.0.0.1:9" not in md  # the environment's default is not the one in use


def test_a_choice_is_written_once_and_read_by_the_next_session(app_dirs):
    at = session("pages/1_data.py")
    at.radio(key="data_style").set_value("phi3").run()
    saved = json.loads(workspace(app_dirs).read_text())
    assert saved["prompt_style"] == "phi3"
    before = workspace(app_dirs).stat().st_mtime_ns
    at.text_input(key="data_search").set_value("antonym").run()  # no kept choice changed: no write
    assert workspace(app_dirs).stat().st_mtime_ns == before
    again = session("pages/1_data.py")
    assert again.radio(key="data_style").value == "phi3"
    assert again.session_state["prompt_style"] == "phi3"


def test_a_kept_dataset_whose_file_is_gone_falls_back_to_the_bundled_one_and_says_so(app_dirs):
    path = workspace(app_dirs)
    path.parent.mkdir(parents=True)
    gone = path.parent / "data" / "0123456789abcdef.json"
    path.write_text(json.dumps({"dataset_name": "mine.json", "dataset_key": "upload:error:abc",
                                "data_source_kind": "Upload JSON / JSONL", "dataset_file": str(gone)}))
    at = session("pages/1_data.py")
    assert at.warning[0].value == f"The dataset kept in the workspace ({gone}) is gone; the bundled one is used."
    assert "1100 entries, all valid" in at.success[0].value
    assert at.radio(key="data_source").value == "Bundled chapter dataset"


def test_a_torn_workspace_file_gives_the_defaults(app_dirs):
    path = workspace(app_dirs)
    path.parent.mkdir(parents=True)
    path.write_text('{"prompt_style": "phi3", "batch_si')  # cut off mid-write by hand
    at = session("pages/1_data.py")
    assert at.radio(key="data_style").value == "alpaca"
    assert "1100 entries, all valid" in at.success[0].value
