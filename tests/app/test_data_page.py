"""The Data page with bad, tiny, huge and unreachable sources, its table linked to the entry shown, and the
dataset kept in the workspace across a reload (a new AppTest is a new browser session)."""
import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from ui import data_source, text

APP = str(Path(__file__).resolve().parents[2] / "app.py")
UPLOAD = "Upload JSON / JSONL"


def open_data_page():
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("pages/1_data.py").run()
    assert not at.exception
    return at


def upload(at, name, raw):
    if at.radio(key="data_source").value != UPLOAD:
        at.radio(key="data_source").set_value(UPLOAD).run()
    at.file_uploader(key="data_upload").set_value((name, raw, "application/json")).run()
    assert not at.exception
    return at


def entries(n, prefix="Say"):
    return [{"instruction": f"{prefix} {i}.", "input": "loud" if i == 0 else "", "output": str(i)} for i in range(n)]


def as_jsonl(rows):
    return "\n".join(json.dumps(r) for r in rows).encode()


def metrics(at):
    return {m.label: m.value for m in at.metric}


def split_of(at):
    m = metrics(at)
    return m["train entries"], m["val entries"], m["test entries"]


def test_an_empty_list_and_one_object_show_the_engines_message_and_keep_the_dataset():
    at = upload(open_data_page(), "mine.jsonl", as_jsonl(entries(20)))
    assert "**mine.jsonl**: 20 entries, all valid" in at.success[0].value
    kept = at.session_state["dataset"]

    upload(at, "empty.json", b"[]")
    assert at.error[0].value == ("**Not loaded: 1 problem in empty.json.**\n\n"
                                 "- the file holds no entries (an empty list): nothing to train on")
    assert any("the dataset is still **mine.jsonl**" in c.value for c in at.caption)
    assert "**mine.jsonl**: 20 entries, all valid" in at.success[0].value
    assert at.session_state["dataset"] == kept and at.session_state["dataset_name"] == "mine.jsonl"
    assert split_of(at) == ("17", "1", "2")

    upload(at, "one.json", json.dumps({"instruction": "Hi.", "output": "Hello."}).encode())
    assert "top level is one JSON object, but a .json file must hold a list of entries" in at.error[0].value
    assert "**Not loaded: 1 problem in one.json.**" in at.error[0].value
    assert "**mine.jsonl**: 20 entries" in at.success[0].value and at.session_state["dataset"] == kept

    at.text_input(key="data_search").set_value("Say 1").run()  # a rerun: the bad file is still reported
    assert "top level is one JSON object" in at.error[0].value and "**mine.jsonl**" in at.success[0].value


def test_one_entry_reads_in_the_singular_and_warns_of_the_empty_splits():
    at = upload(open_data_page(), "one.jsonl", json.dumps(entries(1)[0]).encode())  # JSONL: one line, one entry
    assert at.success[0].value.startswith("**one.jsonl**: 1 entry, all valid")
    assert "1 also has an `input`" in at.success[0].value
    assert any(c.value.startswith("1 of 1 entry.") for c in at.caption)
    assert split_of(at) == ("0", "1", "0")
    warning = at.warning[0].value
    assert warning.startswith("**Split too small:** train 0, val 1, test 0 of 1 entry")
    assert "- **train** is empty: Fine-tune cannot start" in warning
    assert "- **test** is empty: Compare and Judge have no test split" in warning
    assert "- **val** has 1 entry: the validation loss on Fine-tune comes from 1 entry only." in warning


def test_a_three_entry_upload_warns_with_the_numbers():
    at = upload(open_data_page(), "three.json", json.dumps(entries(3)).encode())
    assert split_of(at) == ("2", "1", "0")
    warning = at.warning[0].value
    assert "train 2, val 1, test 0 of 3 entries" in warning
    assert "- **train** has 2 entries: an epoch is less than one batch of 8." in warning
    assert "Compare and Judge have no test split to answer and score" in warning
    assert f"from {data_source.smallest_full_size()} entries on" in warning
    assert data_source.split_counts(data_source.smallest_full_size()) == {"train": 107, "val": 8, "test": 12}
    assert data_source.split_counts(data_source.smallest_full_size() - 1)["val"] < 8

    at.radio(key="data_source").set_value("Bundled chapter dataset").run()  # 935/55/110: nothing to warn of
    assert not at.warning and split_of(at) == ("935", "55", "110")


def test_a_file_over_the_limit_says_its_size_and_the_limit():
    from ui import state

    at = upload(open_data_page(), "mine.jsonl", as_jsonl(entries(20)))
    size = int(60.2 * text.MB)
    upload(at, "big.json", b" " * size)
    assert at.error[0].value.startswith(f"**Not loaded: big.json is 60.2 MB; the limit is {state.UPLOAD_LIMIT_MB} MB.**")
    assert "Load it from a URL instead" in at.error[0].value
    assert "`python -m sft train --data big.json`" in at.error[0].value
    assert "**mine.jsonl**: 20 entries" in at.success[0].value


def load_unresolvable_url(monkeypatch):
    """The Data page after "Load" on a URL whose host cannot be resolved (no proxy in the way)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    at = open_data_page()
    at.radio(key="data_source").set_value("URL").run()
    at.text_input(key="data_url").set_value("http://nonexistent.invalid/x.json").run()
    at.button(key="data_load_url").click().run()
    return at


def test_a_url_with_no_network_says_so_and_what_to_do(monkeypatch):
    at = load_unresolvable_url(monkeypatch)
    assert not at.exception
    message = at.error[0].value
    assert message.startswith("**Not loaded: no network, or no such host: the name nonexistent.invalid "
                              "could not be resolved.**")
    assert "download the file on a machine that has network access" in message
    assert "`http://nonexistent.invalid/x.json`" in message
    assert "NameResolutionError" not in message and "Max retries" not in message
    assert "1100 entries, all valid" in at.success[0].value  # still the bundled data


def test_the_search_starts_afresh_with_another_dataset():
    at = upload(open_data_page(), "a.jsonl", as_jsonl(entries(20)))
    at.text_input(key="data_search").set_value("Say 1").run()
    assert any(c.value.startswith("11 of 20 entries.") for c in at.caption)  # Say 1, Say 10..19
    upload(at, "b.jsonl", as_jsonl(entries(3, prefix="Write")))
    assert at.text_input(key="data_search").value == ""
    assert any(c.value.startswith("3 of 3 entries.") for c in at.caption)
    assert at.number_input(key="data_entry").value == 0  # an uploaded dataset starts at its first entry


def test_the_table_shows_the_key_columns_first_and_a_row_picks_the_entry():
    at = open_data_page()
    table = at.dataframe[0]
    assert list(table.value.columns) == ["#", "instruction", "output", "input"]
    assert at.session_state["data_table"]["selection"]["rows"] == [50]  # the entry shown, marked in the table
    assert any(c.value == "Entry 50 is row 51 of the table, selected." for c in at.caption)

    at.text_input(key="data_search").set_value("antonym").run()
    shown = list(at.dataframe[0].value["#"])
    assert shown and 50 not in shown
    assert at.session_state["data_table"]["selection"]["rows"] == []
    at.session_state["data_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}  # a click on row 3
    at.run()
    assert at.number_input(key="data_entry").value == shown[2]
    bundled = json.loads(Path("sft/assets/instruction-data.json").read_text())
    assert at.code[0].value.startswith("Below is an instruction")
    assert bundled[shown[2]]["output"] in at.code[0].value
    assert any(c.value == f"Entry {shown[2]} is row 3 of the table, selected." for c in at.caption)

    at.number_input(key="data_entry").set_value(shown[4]).run()  # and the number marks its row
    assert at.session_state["data_table"]["selection"]["rows"] == [4]
    at.number_input(key="data_entry").set_value(50).run()  # hidden by the search: no row selected
    assert at.session_state["data_table"]["selection"]["rows"] == []
    assert any(c.value == "Entry 50 is not among the rows the search shows." for c in at.caption)


def test_a_reload_keeps_the_uploaded_dataset_and_the_prompt_style(app_dirs):
    at = upload(open_data_page(), "mine.jsonl", as_jsonl(entries(20)))
    at.radio(key="data_style").set_value("phi3").run()
    kept = at.session_state["dataset"]

    again = open_data_page()  # a new browser session: the uploader is empty
    assert again.radio(key="data_source").value == UPLOAD
    assert again.file_uploader(key="data_upload").value is None
    assert "**mine.jsonl**: 20 entries, all valid" in again.success[0].value
    info = again.info[0].value
    assert info.startswith("Showing **mine.jsonl**, kept in the workspace") and "workspace/data/" in info
    assert again.session_state["dataset"] == kept
    assert again.radio(key="data_style").value == "phi3"
    assert split_of(again) == ("17", "1", "2")

    Path(again.session_state["dataset_file"]).unlink()  # the kept file vanished: say so, use the bundled data
    gone = open_data_page()
    assert "is gone; the bundled one is used" in gone.warning[0].value
    assert "1100 entries, all valid" in gone.success[0].value
    assert gone.radio(key="data_source").value == "Bundled chapter dataset"


def test_plural():
    assert [text.plural(n, "entry", "entries") for n in (0, 1, 2)] == ["0 entries", "1 entry", "2 entries"]
    assert text.megabytes(50 * text.MB) == "50.0 MB" and text.megabytes(50 * text.MB + 1) == "50.1 MB"


def test_a_url_error_stays_until_the_address_changes(monkeypatch):
    at = load_unresolvable_url(monkeypatch)
    at.radio(key="data_style").set_value("phi3").run()  # another rerun: the reason is still shown
    assert "no network" in at.error[0].value
    at.text_input(key="data_url").set_value("http://nonexistent.invalid/y.json").run()
    assert not at.error
