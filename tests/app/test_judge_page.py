"""The Judge page (pages/5_judge.py) against the fake Ollama server of tests/fake_servers.py on 127.0.0.1."""
import json
import socket
from pathlib import Path

import pytest
import streamlit as st
from fake_servers import FakeOllama
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages" / "5_judge.py")
ASSETS = ROOT / "sft" / "assets"
CHAPTER = "instruction-data-with-response"


def load(name):
    return json.loads((ASSETS / name).read_text(encoding="utf-8"))


def scores_by_answer(table):
    """A fake judge's reply function: the reply is looked up by the answer in the chapter's prompt."""
    return lambda prompt, model: next(v for k, v in table.items() if f"score the model response `{k}`" in prompt)


def page(monkeypatch, url):
    monkeypatch.setenv("SFT_OLLAMA_URL", url)
    st.cache_data.clear()  # the status is cached for 10 s per URL, and the OS may hand a port out again
    at = AppTest.from_file(PAGE, default_timeout=30)
    at.run()
    assert not at.exception
    return at


def choose(at, **keys):
    """Set widgets by key, in order, running the page after each; assert no exception."""
    for key, value in keys.items():
        at.get_by_key(key).set_value(value).run()
        assert not at.exception, at.exception
    return at


def cell_values(at):
    df = at.dataframe[0].value
    return df["score"].tolist(), df["judge reply"].tolist()


@pytest.fixture
def dead_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_status_then_score_the_bundled_answers_and_resume(monkeypatch, app_dirs):
    entries = load(f"{CHAPTER}.json")[:3]
    replies = {e["model_response"]: r for e, r in zip(entries, ["Score: 80/100", "I cannot tell.", "90"])}
    with FakeOllama(models=["llama3:latest", "phi3:mini"], reply=scores_by_answer(replies)) as srv:
        at = page(monkeypatch, srv.base_url)
        assert "Reachable" in at.success[0].value and "llama3:latest, phi3:mini" in at.success[0].value
        choose(at, judge_source="Bundled example", **{f"judge_limit_{CHAPTER}": 3})
        assert at.dataframe[0].value["score"].isna().all()  # nothing asked yet
        at.button(key="judge_go").click().run()
        assert not at.exception and not at.error
        assert len(srv.chat_requests) == 3
        scores, raw = cell_values(at)
        assert scores[0] == 80 and scores[2] == 90 and scores[1] != scores[1]  # NaN: unparsed, kept
        assert raw == ["Score: 80/100", "I cannot tell.", "90"]
        df = at.dataframe[0].value
        assert df["instruction"].tolist() == [e["instruction"] for e in entries]
        assert df["reference"].tolist() == [e["output"] for e in entries]
        assert df["answer"].tolist() == [e["model_response"] for e in entries]
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Scored"] == "2 of 3" and metrics["Mean"] == "85.00" and metrics["Median"] == "85"
        assert at.progress[0].value == 100 and "3 of 3 scored" in at.progress[0].text
        store = list((app_dirs["runs"] / "scores").glob(f"{CHAPTER}-*.model_response.scores.jsonl"))
        assert len(store) == 1 and len(store[0].read_text().splitlines()) == 3

        # A fresh session (a browser refresh) shows the stored scores, and scoring again asks nothing.
        at = choose(page(monkeypatch, srv.base_url), judge_source="Bundled example", **{f"judge_limit_{CHAPTER}": 3})
        assert cell_values(at)[1] == raw
        at.button(key="judge_go").click().run()
        assert not at.exception and len(srv.chat_requests) == 3

        # "Ask again" re-asks only the reply that held no score; the judge now answers it.
        replies[entries[1]["model_response"]] = "Score: 70"
        at.checkbox(key="judge_retry_unparsed").check().run()
        at.button(key="judge_go").click().run()
        assert not at.exception and len(srv.chat_requests) == 4
        assert cell_values(at) == ([80, 70, 90], ["Score: 80/100", "Score: 70", "90"])


def test_no_server_and_missing_model_say_what_to_do(monkeypatch, dead_url):
    at = choose(page(monkeypatch, dead_url), judge_source="Bundled example")
    assert "start it with `ollama serve`" in at.error[0].value
    assert at.button(key="judge_go").disabled  # nothing to ask: scoring waits for a server
    with FakeOllama(models=["phi3:mini"]) as srv:
        at = page(monkeypatch, srv.base_url)
        assert "run `ollama pull llama3`" in at.warning[0].value and "phi3:mini" in at.warning[0].value


def test_compare_two_keys_and_the_chapters_judges(monkeypatch):
    entries = load("eval-example-data.json")[:3]
    replies = {**{e["model 1 response"]: "80" for e in entries}, **{e["model 2 response"]: "50" for e in entries}}
    with FakeOllama(reply=scores_by_answer(replies)) as srv:
        at = page(monkeypatch, srv.base_url)
        example = "eval-example-data.json (two models' answers to 100 instructions)"
        choose(at, judge_source="Bundled example", judge_example=example, **{"judge_limit_eval-example-data": 3})
        for key in ("model 1 response", "model 2 response"):
            choose(at, **{"judge_key_eval-example-data": key})
            at.button(key="judge_go").click().run()
            assert not at.exception and not at.error
        assert len(srv.chat_requests) == 6
        choose(at, judge_other="key: model 1 response")  # A = model 2 (the current key), B = model 1
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["A better / tie / B better"] == "0 / 0 / 3"
    assert (metrics["Mean A"], metrics["Mean B"], metrics["Mean A − B"]) == ("50.00", "80.00", "-30.00")
    # The chapter's GPT-4 vs Llama 3 scores: model 1 lines up, model 2 does not (one reply dropped).
    assert (metrics["Pearson"], metrics["Spearman"], metrics["Mean |GPT-4 − Llama 3|"]) == ("0.805", "0.698", "15.92")
    choose(at, judge_agree_set="model-2")
    assert any("(100 vs 99)" in w.value for w in at.warning)


def test_a_runs_answers_and_an_upload(monkeypatch, app_dirs):
    run = app_dirs["runs"] / "my-run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    entries = load(f"{CHAPTER}.json")[:2]
    (run / f"{CHAPTER}.json").write_text(json.dumps(entries))
    with FakeOllama(reply=lambda prompt, model: "75") as srv:
        at = page(monkeypatch, srv.base_url)
        assert at.selectbox(key="judge_run").value == "my-run"
        at.button(key="judge_go").click().run()
        assert cell_values(at)[0] == [75, 75]
        assert (run / f"{CHAPTER}.model_response.scores.jsonl").is_file()  # scores live in the run

        upload = "\n".join(json.dumps({**e, "answer": "x"}) for e in entries).encode()  # JSON Lines
        choose(at, judge_source="Upload JSON / JSONL")
        at.file_uploader(key="judge_upload").set_value(("mine.jsonl", upload, "application/json")).run()
        assert at.selectbox(key="judge_key_mine").options == ["model_response", "answer"]
        at.file_uploader(key="judge_upload").set_value(("bad.json", b"[{\"instruction\": 1,", "application/json")).run()
    assert not at.exception
    assert "bad: not valid JSON" in at.error[0].value
