"""The Judge page (pages/5_judge.py) against the fake Ollama server of tests/fake_servers.py on 127.0.0.1."""
import json
import socket
import time
from pathlib import Path

import pytest
import streamlit as st
from fake_servers import FakeOllama
from streamlit.testing.v1 import AppTest

from sft import judge
from sft.studio.jobs import Job

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages" / "5_judge.py")
APP = str(ROOT / "app.py")
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


def score(at, app_dirs):
    """Click Score: a background job the page watches (its Stop beside it); once it ends, the page shows it."""
    at.button(key="judge_go").click().run()
    assert not at.exception, at.exception
    assert at.button(key="judge_go").disabled and at.button(key="judge_stop").label == "Stop"
    for folder in (app_dirs["runs"] / ".jobs").iterdir():  # the scoring jobs, one per scores file
        status = Job(folder).wait(timeout=60)
        assert status["state"] == "completed", (status, Job(folder).tail_log())
    at.run()
    assert not at.exception
    assert "judge_stop" not in [b.key for b in at.button] and not at.progress  # Stop only while a job runs
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
        assert "judge_stop" not in [b.key for b in at.button]  # nothing to stop
        score(at, app_dirs)
        assert not at.error
        assert len(srv.chat_requests) == 3
        scores, raw = cell_values(at)
        assert scores[0] == 80 and scores[2] == 90 and scores[1] != scores[1]  # NaN: unparsed, kept
        assert raw == ["Score: 80/100", "I cannot tell.", "90"]
        df = at.dataframe[0].value
        assert df["instruction"].tolist() == [e["instruction"] for e in entries]
        assert df["reference"].tolist() == [e["output"] for e in entries]
        assert df["answer"].tolist() == [e["model_response"] for e in entries]
        assert list(df.columns) == ["#", "score", "answer", "reference", "instruction", "input", "judge reply"]
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Scored"] == "2 of 3" and metrics["Mean"] == "85.00" and metrics["Median"] == "85"
        assert "3 of 3 asked; 1 replies held no score" in "\n".join(c.value for c in at.caption)
        (job,) = [Job(f) for f in (app_dirs["runs"] / ".jobs").iterdir()]
        assert (job.status()["done"], job.status()["total"]) == (3, 3) and job.params["limit"] == 3
        store = list((app_dirs["runs"] / "scores").glob(f"{CHAPTER}-*.model_response.scores.jsonl"))
        assert len(store) == 1 and len(store[0].read_text().splitlines()) == 3

        # A fresh session (a browser refresh) shows the stored scores, and scoring again asks nothing.
        at = choose(page(monkeypatch, srv.base_url), judge_source="Bundled example", **{f"judge_limit_{CHAPTER}": 3})
        assert cell_values(at)[1] == raw
        score(at, app_dirs)
        assert len(srv.chat_requests) == 3

        # "Ask again" re-asks only the reply that held no score; the judge now answers it.
        replies[entries[1]["model_response"]] = "Score: 70"
        at.checkbox(key="judge_retry_unparsed").check().run()
        score(at, app_dirs)
        assert len(srv.chat_requests) == 4
        assert cell_values(at) == ([80, 70, 90], ["Score: 80/100", "Score: 70", "90"])


def test_no_server_and_missing_model_say_what_to_do(monkeypatch, dead_url):
    at = choose(page(monkeypatch, dead_url), judge_source="Bundled example")
    assert "start it with `ollama serve`" in at.error[0].value
    assert at.button(key="judge_go").disabled  # nothing to ask: scoring waits for a server
    with FakeOllama(models=["phi3:mini"]) as srv:
        at = page(monkeypatch, srv.base_url)
        assert "run `ollama pull llama3`" in at.warning[0].value and "phi3:mini" in at.warning[0].value


def test_compare_two_keys_and_the_chapters_judges(monkeypatch, app_dirs):
    entries = load("eval-example-data.json")[:3]
    replies = {**{e["model 1 response"]: "80" for e in entries}, **{e["model 2 response"]: "50" for e in entries}}
    with FakeOllama(reply=scores_by_answer(replies)) as srv:
        at = page(monkeypatch, srv.base_url)
        example = "eval-example-data.json (two models' answers to 100 instructions)"
        choose(at, judge_source="Bundled example", judge_example=example, **{"judge_limit_eval-example-data": 3})
        for key in ("model 1 response", "model 2 response"):
            choose(at, **{"judge_key_eval-example-data": key})
            score(at, app_dirs)
            assert not at.error
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
        assert at.selectbox(key="judge_run_choice").value == "my-run"
        score(at, app_dirs)
        assert cell_values(at)[0] == [75, 75]
        assert (run / f"{CHAPTER}.model_response.scores.jsonl").is_file()  # scores live in the run

        upload = "\n".join(json.dumps({**e, "answer": "x"}) for e in entries).encode()  # JSON Lines
        choose(at, judge_source="Upload JSON / JSONL")
        at.file_uploader(key="judge_upload").set_value(("mine.jsonl", upload, "application/json")).run()
        assert at.selectbox(key="judge_key_mine").options == ["model_response", "answer"]
        at.file_uploader(key="judge_upload").set_value(("bad.json", b"[{\"instruction\": 1,", "application/json")).run()
    assert not at.exception
    assert "bad: not valid JSON" in at.error[0].value


def test_stop_is_only_shown_while_scoring_and_keeps_the_scores(monkeypatch, app_dirs):
    with FakeOllama(reply=lambda prompt, model: "60", delay=0.3) as srv:
        at = choose(page(monkeypatch, srv.base_url), judge_source="Bundled example", **{f"judge_limit_{CHAPTER}": 40})
        at.button(key="judge_go").click().run()
        (job,) = [Job(f) for f in (app_dirs["runs"] / ".jobs").iterdir()]
        deadline = time.monotonic() + 60
        while (job.status().get("done") or 0) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        at.button(key="judge_stop").click().run()  # the watching fragment's Stop
        assert not at.exception
        assert job.wait(timeout=60)["state"] == "stopped"
        at.run()
        saved = len(next((app_dirs["runs"] / "scores").glob("*.scores.jsonl")).read_text().splitlines())
        assert 2 <= saved < 40 and len(srv.chat_requests) == saved
        assert f"Stopped at {saved} of 40 scored; the scores so far are saved: Score goes on" in at.info[0].value
        assert "judge_stop" not in [b.key for b in at.button] and not at.button(key="judge_go").disabled
        assert {m.label: m.value for m in at.metric}["Scored"] == f"{saved} of 40"


def test_the_judge_settings_survive_a_visit_to_home_and_a_reload(monkeypatch, app_dirs):
    with FakeOllama(models=["phi3:mini"]) as srv:
        at = AppTest.from_file(APP, default_timeout=30).run()
        at.switch_page("pages/5_judge.py").run()
        choose(at, judge_url_text=srv.base_url, judge_model_text="phi3:mini")
        assert "`phi3:mini` is there" in at.success[0].value
        at.switch_page("app.py").run()  # Home: the Judge page's widgets are gone, the plain keys are not
        assert f"answers at `{srv.base_url}`: phi3:mini" in "\n".join(m.value for m in at.markdown)
        at.switch_page("pages/5_judge.py").run()
        assert at.text_input(key="judge_url_text").value == srv.base_url
        assert at.text_input(key="judge_model_text").value == "phi3:mini"
        again = AppTest.from_file(PAGE, default_timeout=30).run()  # a reload: a new session, the workspace file
        assert again.text_input(key="judge_url_text").value == srv.base_url
        assert again.text_input(key="judge_model_text").value == "phi3:mini"
        choose(again, judge_backend_choice="openai")  # another backend: its own default address
        assert again.text_input(key="judge_url_text").value == "http://localhost:8000/v1"
    kept = json.loads((app_dirs["runs"].parent / "workspace" / "workspace.json").read_text())
    assert (kept["judge_backend"], kept["judge_url"], kept["judge_model"]) == (
        "openai", "http://localhost:8000/v1", "phi3:mini")


def make_run(app_dirs, name, entries):
    run = app_dirs["runs"] / name
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / f"{CHAPTER}.json").write_text(json.dumps(entries))
    return run


def test_the_run_follows_the_compare_page_and_compare_defaults_to_a_set_with_scores(monkeypatch, app_dirs):
    entries = load("eval-example-data.json")[:2]
    for name in ("a-run", "b-run"):
        make_run(app_dirs, name, [{**e, "model_response": e["model 1 response"]} for e in entries])
    with FakeOllama(reply=lambda prompt, model: "70") as srv:
        monkeypatch.setenv("SFT_OLLAMA_URL", srv.base_url)
        at = AppTest.from_file(PAGE, default_timeout=30)
        at.session_state["run_name"] = "b-run"  # the run the Compare page shows
        at.run()
        assert at.selectbox(key="judge_run_choice").value == "b-run"
        choose(at, judge_run_choice="a-run")  # picked here: it holds, and is kept
        at.run()
        assert at.selectbox(key="judge_run_choice").value == "a-run"
        assert json.loads((app_dirs["runs"].parent / "workspace" / "workspace.json").read_text())["judge_run"] == "a-run"
        # "Compare two sets" offers b-run; with b-run scored, it is the default over the file's other keys.
        client = judge.make_client("ollama", "llama3", srv.base_url)
        b = app_dirs["runs"] / "b-run" / f"{CHAPTER}.json"
        judge.score_responses(json.loads(b.read_text()), "model_response", client=client,
                              store=judge.default_scores_path(b, "model_response"))
        example = "eval-example-data.json (two models' answers to 100 instructions)"
        choose(at, judge_source="Bundled example", judge_example=example, **{"judge_limit_eval-example-data": 2})
        assert at.selectbox(key="judge_other").options == ["key: model 2 response", "run: a-run", "run: b-run"]
        assert at.selectbox(key="judge_other").value == "run: b-run"


def test_an_upload_over_the_limit_is_refused_in_words(monkeypatch):
    monkeypatch.setattr("ui.state.UPLOAD_LIMIT_MB", 1)
    at = choose(page(monkeypatch, "http://127.0.0.1:9"), judge_source="Upload JSON / JSONL")
    from ui.text import megabytes

    big = json.dumps([{"instruction": "x" * 100, "output": "y", "answer": "z"}] * 12_000).encode()  # over 1 MB
    at.file_uploader(key="judge_upload").set_value(("big.json", big, "application/json")).run()
    assert not at.exception
    (error,) = [e.value for e in at.error if "Not loaded" in e.value]
    assert f"big.json is {megabytes(len(big))}; the limit is 1 MB" in error and "`python -m sft judge big.json`" in error
    assert "judge_go" not in [b.key for b in at.button]  # nothing loaded, nothing to score
