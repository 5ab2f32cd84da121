"""The judge (section 7.8) against fake Ollama / OpenAI servers on 127.0.0.1, and its statistics."""
import argparse
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from fake_servers import FakeOllama, FakeOpenAI

from sft.judge import (
    JudgeHTTPError,
    JudgeTimeoutError,
    MalformedResponseError,
    ModelNotFoundError,
    OllamaClient,
    OpenAIClient,
    ServerUnavailableError,
    ScoreStore,
    check_if_running,
    default_scores_path,
    generate_model_scores,
    judge_prompt,
    load_entries,
    model_available,
    ollama_status,
    parse_score,
    query_model,
    response_keys,
    score_responses,
    scored_records,
)
from sft.cli.judge import add_arguments, run as cli_main
from sft.judge.stats import compare_scores, judge_agreement, plot_score_histogram, plot_score_pairs, summarize_scores

ASSETS = Path(__file__).resolve().parent.parent / "sft" / "assets"  # not `from conftest`: tests/app has one too

FAST = {"retries": 0, "backoff": 0}  # no waiting between tries in tests


@pytest.fixture
def ollama():
    with FakeOllama() as srv:
        yield srv


@pytest.fixture
def entries():
    with open(ASSETS / "instruction-data-with-response.json", encoding="utf-8") as f:
        return json.load(f)[:6]


@pytest.fixture
def dead_url():
    """A URL on which nothing listens (a port the OS just gave out, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/chat"


def by_response(scores):
    """A reply function scoring each entry by its response text."""
    return lambda prompt, model: next(v for k, v in scores.items() if f"score the model response `{k}`" in prompt)


# ---------------------------------------------------------------------------------------------
# query_model and the Ollama API


def test_query_model_sends_the_chapters_request(ollama):
    ollama.reply = lambda prompt, model: f"echo: {prompt} ({model})"
    assert query_model("What is 2+2?", url=ollama.url) == "echo: What is 2+2? (llama3)"
    (req,) = ollama.chat_requests
    assert req["path"] == "/api/chat"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["body"] == {
        "model": "llama3",
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def test_stream_split_mid_line_and_mid_character():
    # 5-byte chunks cut every JSON line, and the multi-byte characters, across HTTP chunks.
    text = "Très bien — 90 ✓ naïve"
    with FakeOllama(split=5, reply=lambda p, m: text) as srv:
        assert query_model("x", url=srv.url) == text


def test_base_url_is_accepted_and_tags_and_models_listed(ollama):
    ollama.models = ["llama3:latest", "phi3:mini"]
    assert query_model("x", url=ollama.base_url) == "85"
    status = ollama_status(ollama.url)
    assert (status.url, status.reachable, status.models, status.error) == (
        ollama.base_url, True, ["llama3:latest", "phi3:mini"], None)
    assert status.has_model("llama3") and status.has_model("phi3:mini") and not status.has_model("phi3")
    assert OllamaClient("phi3", ollama.url).status().models == ["llama3:latest", "phi3:mini"]


@pytest.mark.parametrize("model, models, expected", [
    ("llama3", ["llama3:latest"], True),
    ("llama3:latest", ["llama3"], True),
    ("llama3:8b", ["llama3:latest"], False),
    ("llama3", ["llama3:8b"], False),
    ("llama3", ["llama3.1:latest"], False),
    ("library/llama3", ["library/llama3:latest"], True),
    ("llama3", [], False),
])
def test_model_available(model, models, expected):
    assert model_available(model, models) is expected


def test_missing_model_says_to_pull_it(ollama):
    with pytest.raises(ModelNotFoundError, match=r"run `ollama pull mistral`"):
        query_model("x", model="mistral", url=ollama.url)
    assert len(ollama.chat_requests) == 1  # a 404 is not retried


def test_no_server_says_to_start_it(dead_url):
    with pytest.raises(ServerUnavailableError, match=r"start it with `ollama serve`"):
        query_model("x", url=dead_url, retries=2, backoff=0)
    status = ollama_status(dead_url)
    assert not status.reachable and status.models == [] and "ollama serve" in status.error


def test_slow_server_times_out_without_retrying():
    with FakeOllama(delay=0.5) as srv:
        with pytest.raises(JudgeTimeoutError, match=r"did not answer within 0.2 s") as info:
            query_model("x", url=srv.url, timeout=(1.0, 0.2), retries=3, backoff=0)
        assert isinstance(info.value, TimeoutError)
        assert len(srv.chat_requests) == 1


def test_stream_that_stalls_midway_times_out():
    with FakeOllama(delay=0.5, delay_in_stream=True, reply=lambda p, m: "85 points") as srv:
        with pytest.raises(JudgeTimeoutError):
            query_model("x", url=srv.url, timeout=(1.0, 0.2), **FAST)


def test_5xx_is_retried_then_reported(ollama):
    ollama.fail_first = 2
    assert query_model("x", url=ollama.url, retries=2, backoff=0) == "85"
    assert len(ollama.chat_requests) == 3
    ollama.fail_first = 5
    with pytest.raises(JudgeHTTPError, match=r"HTTP 500: fake server failure") as info:
        query_model("x", url=ollama.url, retries=1, backoff=0)
    assert info.value.status == 500
    assert len(ollama.chat_requests) == 5


@pytest.mark.parametrize("knobs, message", [
    ({"inject_line": b"this is not json"}, r"Line 2 of the stream .* is not JSON"),
    ({"inject_line": b'{"error": "out of memory"}'}, r"error mid-stream: out of memory"),
    ({"inject_line": b"[1, 2]"}, r"Line 2 .* not a JSON object"),
    ({"drop_done": True}, r"ended before its final 'done' line"),
])
def test_malformed_stream(knobs, message):
    with FakeOllama(reply=lambda p, m: "85 is fair", **knobs) as srv:
        with pytest.raises(MalformedResponseError, match=message):
            query_model("x", url=srv.url, **FAST)


def test_check_if_running():
    assert check_if_running(psutil.Process().name()) is True
    assert check_if_running("no-such-process-8d1f3c") is False


# ---------------------------------------------------------------------------------------------
# Parsing replies


@pytest.mark.parametrize("reply, score", [
    ("85", 85), ("85.", 85), (" 85\n", 85), ("Score: 85/100", 85), ("**85**", 85), ("Score: **72**", 72),
    ("85 out of 100", 85), ("85%", 85), ("0", 0), ("100", 100), ("100/100", 100), ("Score: 84.5", 85),
    ("The score is 85.\n\nThe response has 2 small errors.", 85), ("I would rate it: 90", 90),
    ("150", None), ("-5", None), ("Score: 101", None), ("8/10", None), ("Score: 4 out of 5", None),
    ("", None), ("I cannot score this.", None), ("between 70 and 80", None), (None, None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


# ---------------------------------------------------------------------------------------------
# Scoring a set


def test_generate_model_scores_uses_the_chapters_prompt(ollama, entries, capsys):
    ollama.reply = by_response({e["model_response"]: str(10 * i) for i, e in enumerate(entries)})
    scores = generate_model_scores(entries, "model_response", url=ollama.url)
    assert scores == [0, 10, 20, 30, 40, 50] and all(type(s) is int for s in scores)
    assert ollama.chat_requests[0]["body"]["messages"][0]["content"] == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")
    assert [r["body"]["messages"][0]["content"] for r in ollama.chat_requests] == [
        judge_prompt(e, "model_response") for e in entries]
    assert "Scoring entries" in capsys.readouterr().err  # the chapter's tqdm bar


def test_unparsed_replies_are_kept_and_counted(ollama, entries, capsys):
    replies = {e["model_response"]: r for e, r in zip(entries, ["85", "Score: 70/100", "I cannot judge this.",
                                                                  "**90**", "7/10", "60."])}
    ollama.reply = by_response(replies)
    scores = generate_model_scores(entries, "model_response", url=ollama.url, progress=lambda d, t: None)
    assert scores == [85, 70, 90, 60]
    assert [(r["index"], r["raw"]) for r in scores.unparsed] == [(2, "I cannot judge this."), (4, "7/10")]
    assert [r["score"] for r in scores.records] == [85, 70, None, 90, None, 60]
    out = capsys.readouterr().out
    assert "Could not convert score: I cannot judge this." in out and "Could not convert score: 7/10" in out


def test_records_carry_the_item_and_the_judge(ollama, entries):
    seen = []
    records = score_responses(entries[:2], "model_response", url=ollama.url,
                              progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 2), (1, 2), (2, 2)]
    r = records[1]
    assert {k: r[k] for k in ("index", "instruction", "input", "output", "response", "score", "raw", "json_key")} == {
        "index": 1, "instruction": entries[1]["instruction"], "input": "", "output": entries[1]["output"],
        "response": entries[1]["model_response"], "score": 85, "raw": "85", "json_key": "model_response"}
    assert r["judge"] == 'ollama:llama3 {"num_ctx": 2048, "seed": 123, "temperature": 0}'  # not the URL
    assert r["url"] == ollama.url


def test_bad_entries_fail_before_asking(ollama, entries):
    with pytest.raises(ValueError, match=r"entry 1: missing key 'model_response'"):
        score_responses([entries[0], {"instruction": "a", "output": "b"}], "model_response", url=ollama.url)
    with pytest.raises(ValueError, match=r"entry 0: 'model_response' must be a string"):
        score_responses([{**entries[0], "model_response": None}], "model_response", url=ollama.url)
    assert ollama.chat_requests == []


def test_interrupted_run_resumes_without_asking_twice(ollama, entries, tmp_path):
    store = tmp_path / "scores.jsonl"
    ollama.reply = by_response({e["model_response"]: str(50 + i) for i, e in enumerate(entries)})
    ollama.fail_after = 3  # the server breaks after three answers
    with pytest.raises(JudgeHTTPError) as info:
        score_responses(entries, "model_response", client=OllamaClient("llama3", ollama.url, **FAST), store=store)
    assert [r["score"] for r in info.value.records] == [50, 51, 52]
    assert "3 of 6 scores were obtained before this and saved in" in info.value.__notes__[0]
    assert len(store.read_text().splitlines()) == 3

    ollama.fail_after = None
    ollama.requests.clear()
    records = score_responses(entries, "model_response", url=ollama.url, store=store)
    assert [r["score"] for r in records] == [50, 51, 52, 53, 54, 55]
    assert [r["body"]["messages"][0]["content"] for r in ollama.chat_requests] == [
        judge_prompt(e, "model_response") for e in entries[3:]]

    ollama.requests.clear()
    assert score_responses(entries, "model_response", url=ollama.url, store=store) == records
    assert ollama.chat_requests == []
    # Another judge, or a changed response, is a new question.
    changed = [dict(e) for e in entries]
    changed[0]["model_response"] = "Something else."
    ollama.reply = lambda p, m: "5"
    assert [r["score"] for r in score_responses(changed, "model_response", url=ollama.url, store=store)] == [
        5, 51, 52, 53, 54, 55]
    ollama.models.append("phi3:latest")
    score_responses(entries, "model_response", model="phi3", url=ollama.url, store=store)
    assert len(ollama.chat_requests) == 1 + 6


def test_keyboard_interrupt_keeps_what_was_scored(ollama, entries, tmp_path):
    store = tmp_path / "scores.jsonl"

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_responses(entries, "model_response", url=ollama.url, store=store, progress=stop_after_two)
    assert len(ScoreStore(store).load()) == 2
    ollama.requests.clear()
    score_responses(entries, "model_response", url=ollama.url, store=store)
    assert len(ollama.chat_requests) == 4


def test_store_survives_a_line_cut_short(tmp_path):
    store = ScoreStore(tmp_path / "s.jsonl")
    store.append({"key": "a", "score": 1})
    with open(store.path, "a", encoding="utf-8") as f:
        f.write('{"key": "b", "sco')  # killed mid-write
    assert list(store.load()) == ["a"]
    store.append({"key": "c", "score": 3})
    assert store.path.read_text().splitlines() == ['{"key": "a", "score": 1}', '{"key": "c", "score": 3}']
    store.path.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl, line 2: not a JSON score record"):
        store.load()


def test_concurrent_requests_really_overlap(entries, tmp_path):
    # Each request waits at a 3-party barrier: they only pass if three are in flight together.
    with FakeOllama(gate=threading.Barrier(3), reply=lambda p, m: "70") as srv:
        records = score_responses(entries, "model_response", url=srv.url, concurrency=3,
                                  store=tmp_path / "s.jsonl")
        assert srv.max_in_flight == 3
    assert [r["index"] for r in records] == list(range(6)) and {r["score"] for r in records} == {70}
    assert sorted(r["index"] for r in ScoreStore(tmp_path / "s.jsonl").load().values()) == list(range(6))


class FailsOn(OllamaClient):
    """A judge whose reply for one response is unusable."""

    def __init__(self, bad, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad = bad

    def chat(self, prompt):
        if f"response `{self.bad}`" in prompt:
            raise MalformedResponseError("unusable reply")
        return super().chat(prompt)


def test_concurrent_failure_keeps_finished_answers(ollama, entries, tmp_path):
    store = tmp_path / "s.jsonl"
    client = FailsOn(entries[4]["model_response"], "llama3", ollama.url, **FAST)
    with pytest.raises(MalformedResponseError) as info:
        score_responses(entries, "model_response", client=client, store=store, concurrency=2)
    kept = {r["index"] for r in ScoreStore(store).load().values()}
    assert {0, 1, 2, 3} <= kept and 4 not in kept  # answers still in flight are kept too
    assert {r["index"] for r in info.value.records} == kept
    ollama.requests.clear()
    records = score_responses(entries, "model_response", url=ollama.url, store=store, concurrency=2)
    assert [r["score"] for r in records] == [85] * 6
    assert len(ollama.chat_requests) == 6 - len(kept)


def test_concurrency_is_bounded(ollama, entries):
    with pytest.raises(ValueError, match="concurrency must be between 1 and 32"):
        score_responses(entries, "model_response", url=ollama.url, concurrency=0)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible backend


def test_openai_backend(entries, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with FakeOpenAI(api_key="sk-test", models=["judge-8b"], reply=lambda p, m: "Score: 77/100") as srv:
        client = OpenAIClient("judge-8b", srv.url + "/chat/completions", api_key_env="JUDGE_KEY", **FAST)
        assert client.chat("Hello") == "Score: 77/100"
        req = srv.chat_requests[0]
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["Authorization"] == "Bearer sk-test"
        assert req["body"] == {"model": "judge-8b", "messages": [{"role": "user", "content": "Hello"}],
                               "temperature": 0, "seed": 123, "stream": False}
        status = client.status()
        assert (status.reachable, status.models, status.error) == (True, ["judge-8b"], None)

        assert generate_model_scores(entries, "model_response", client=client, progress=lambda d, t: None) == [77] * 6

        monkeypatch.setenv("JUDGE_KEY", "sk-wrong")
        with pytest.raises(JudgeHTTPError, match=r"refused the API key .*: set \$JUDGE_KEY to a valid key"):
            OpenAIClient("judge-8b", srv.base_url, api_key_env="JUDGE_KEY", **FAST).chat("x")
        with pytest.raises(JudgeHTTPError, match=r"HTTP 401.*check the api_key given"):
            OpenAIClient("judge-8b", srv.base_url, api_key="wrong", **FAST).chat("x")
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        with pytest.raises(ModelNotFoundError, match=r"does not serve model 'gpt-9'"):
            OpenAIClient("gpt-9", srv.url, api_key_env="JUDGE_KEY", **FAST).chat("x")
        srv.fail_first = 1
        assert OpenAIClient("judge-8b", srv.url, api_key_env="JUDGE_KEY", retries=1, backoff=0).chat("x") == (
            "Score: 77/100")


def test_openai_no_server(dead_url):
    client = OpenAIClient("m", dead_url.replace("/api/chat", "/v1"), **FAST)
    with pytest.raises(ServerUnavailableError, match=r"start your OpenAI-compatible server"):
        client.chat("x")
    assert client.status().reachable is False


# ---------------------------------------------------------------------------------------------
# Statistics


def test_summarize_scores():
    s = summarize_scores([0, 50, 100, None, 50])
    assert {k: s[k] for k in ("n", "total", "unparsed", "mean", "median")} == {
        "n": 4, "total": 5, "unparsed": 1, "mean": 50.0, "median": 50.0}
    assert s["histogram"] == {"edges": [float(e) for e in range(0, 101, 10)], "counts": [1, 0, 0, 0, 0, 2, 0, 0, 0, 1]}
    # The interval is a seeded percentile bootstrap of the mean.
    x = np.array([0, 50, 100, 50], dtype=float)
    means = x[np.random.default_rng(123).integers(0, 4, size=(2000, 4))].mean(axis=1)
    assert (s["ci_low"], s["ci_high"]) == tuple(np.quantile(means, [0.025, 0.975]))
    assert summarize_scores([None, None])["mean"] is None


def test_compare_scores():
    c = compare_scores([80, 50, None, 30, 90], [70, 50, 20, 40, 60])
    assert {k: c[k] for k in ("n", "skipped", "wins", "ties", "losses", "mean_a", "mean_b", "mean_diff")} == {
        "n": 4, "skipped": 1, "wins": 2, "ties": 1, "losses": 1, "mean_a": 62.5, "mean_b": 55.0, "mean_diff": 7.5}
    with pytest.raises(ValueError, match=r"differ in length \(2 vs 1\)"):
        compare_scores([1, 2], [1])


def load_scores(name):
    with open(ASSETS / "ch07-eval-scores" / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def test_bundled_scores_summaries_and_comparison():
    # The chapter's bonus evaluation: GPT-4 and Llama 3 8B scoring two models' responses.
    means = {n: summarize_scores(load_scores(n))["mean"] for n in (
        "gpt4-model-1-response", "gpt4-model-2-response", "llama3-8b-model-1-response", "llama3-8b-model-2-response")}
    assert means["gpt4-model-1-response"] == pytest.approx(74.09)
    assert means["gpt4-model-2-response"] == pytest.approx(56.57)
    assert means["llama3-8b-model-1-response"] == pytest.approx(77.05)
    assert means["llama3-8b-model-2-response"] == pytest.approx(6670 / 99)  # 99 of 100 parsed in the chapter

    g1, g2 = load_scores("gpt4-model-1-response"), load_scores("gpt4-model-2-response")
    s = summarize_scores(g1)
    assert (s["median"], s["histogram"]["counts"]) == (100.0, [19, 1, 3, 1, 0, 5, 0, 0, 3, 68])
    assert s["ci_low"] < 74.09 < s["ci_high"]
    c = compare_scores(g1, g2)
    d = np.array(g1) - np.array(g2)
    assert (c["wins"], c["ties"], c["losses"]) == (33, 56, 11) == ((d > 0).sum(), (d == 0).sum(), (d < 0).sum())
    assert c["mean_diff"] == pytest.approx(17.52) == pytest.approx(d.mean())
    assert c["diff_ci_low"] > 0  # model 1 is better by GPT-4's scores, clear of chance


def test_judge_agreement_on_the_bundled_scores():
    gpt4, llama3 = load_scores("gpt4-model-1-response"), load_scores("llama3-8b-model-1-response")
    a = judge_agreement(gpt4, llama3)
    assert (a["n"], a["skipped"]) == (100, 0)
    assert a["pearson"] == pytest.approx(0.80489012064218, abs=1e-12)
    assert a["spearman"] == pytest.approx(0.69840560059468, abs=1e-12)
    assert a["mean_abs_diff"] == pytest.approx(15.92)
    # Cross-check against pandas (Spearman with tied values ranked by their average).
    g, l = pd.Series(gpt4, dtype=float), pd.Series(llama3, dtype=float)
    assert a["pearson"] == pytest.approx(g.corr(l), abs=1e-12)
    assert a["spearman"] == pytest.approx(g.corr(l, method="spearman"), abs=1e-12)
    assert a["mean_abs_diff"] == pytest.approx((g - l).abs().mean())
    # Llama 3's model-2 list has 99 scores: one reply was dropped, so items no longer line up.
    with pytest.raises(ValueError, match=r"judge agreement needs the same items .* \(100 vs 99\)"):
        judge_agreement(load_scores("gpt4-model-2-response"), load_scores("llama3-8b-model-2-response"))
    assert judge_agreement([50, 50, 50], [10, 20, 30])["pearson"] is None


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return cli_main(parser.parse_args([str(a) for a in argv]))


def test_cli_scores_and_summarizes(ollama, entries, tmp_path, capsys):
    src = tmp_path / "responses.json"
    src.write_text(json.dumps(entries), encoding="utf-8")
    ollama.reply = by_response({e["model_response"]: r for e, r in zip(entries, ["80", "60", "no idea", "90",
                                                                                  "100", "70"])})
    assert run_cli(src, "--url", ollama.url, "--retries", "0") == 0
    out = capsys.readouterr().out
    assert "Number of scores: 5 of 6" in out
    assert "Average score: 80.00 (median 80" in out
    assert "Unparsed replies: 1" in out
    assert (tmp_path / "responses.model_response.scores.jsonl").exists()
    ollama.requests.clear()
    assert run_cli(src, "--url", ollama.url, "--out", tmp_path / "responses.model_response.scores.jsonl") == 0
    assert ollama.chat_requests == []  # resumed from the scores file


def test_cli_errors(ollama, entries, tmp_path, dead_url, capsys):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(entries), encoding="utf-8")
    assert run_cli(src, "--url", dead_url) == 1
    assert "ollama serve" in capsys.readouterr().err
    assert run_cli(src, "--url", ollama.url, "--key", "nope") == 2
    assert "entry 0: missing key 'nope'" in capsys.readouterr().err
    assert run_cli(src, "--url", ollama.url, "--model", "mistral", "--retries", "0") == 1
    err = capsys.readouterr().err
    assert "run `ollama pull mistral`" in err


def test_cli_openai_backend(entries, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    src = tmp_path / "r.json"
    src.write_text(json.dumps(entries[:2]), encoding="utf-8")
    with FakeOpenAI(api_key="sk-x", models=["llama3"], reply=lambda p, m: "42") as srv:
        assert run_cli(src, "--backend", "openai", "--url", srv.url, "--out", tmp_path / "o.jsonl") == 0
    assert "Number of scores: 2 of 2\nAverage score: 42.00" in capsys.readouterr().out


def test_names_are_exported_from_sft():
    import sft

    for name in ("query_model", "check_if_running", "generate_model_scores", "OllamaClient", "score_responses"):
        assert getattr(sft, name) is getattr(__import__("sft.judge", fromlist=[name]), name)


def test_client_names_live_in_judge_client_and_are_re_exported():
    import sft.judge as judge
    import sft.judge.client as client

    for name in ("JudgeError", "ServerUnavailableError", "ModelNotFoundError", "JudgeTimeoutError",
                 "MalformedResponseError", "JudgeHTTPError", "ServerStatus", "OllamaClient", "OpenAIClient",
                 "make_client", "ollama_status", "model_available", "OLLAMA_URL", "OPENAI_URL", "DEFAULT_TIMEOUT"):
        assert getattr(judge, name) is getattr(client, name)


# ---------------------------------------------------------------------------------------------
# What the Judge page builds on


def test_status_problem_says_what_to_do(ollama, dead_url):
    ollama.models = ["phi3:mini"]
    status = ollama_status(ollama.url)
    assert status.problem("phi3:mini") is None
    assert status.problem("llama3") == (f"The Ollama server at {ollama.base_url} does not have model 'llama3': "
                                        f"run `ollama pull llama3`.")
    assert "start it with `ollama serve`" in ollama_status(dead_url).problem("llama3")
    with FakeOpenAI(models=["qwen"]) as srv:
        status = OpenAIClient("qwen", srv.url).status()
        assert (status.backend, status.problem("qwen")) == ("openai", None)
        assert "does not list model 'llama3': pick one it lists" in status.problem("llama3")


def test_load_entries_json_jsonl_and_errors(entries, tmp_path):
    assert load_entries(json.dumps(entries).encode()) == entries
    jsonl = "\n".join(json.dumps(e) for e in entries[:2]) + "\n"
    assert load_entries(jsonl.encode("utf-8-sig"), name="a.jsonl") == entries[:2]
    (tmp_path / "r.jsonl").write_text(jsonl, encoding="utf-8")
    assert load_entries(tmp_path / "r.jsonl") == entries[:2]
    with pytest.raises(ValueError, match=r"^b.json: not valid JSON"):
        load_entries(b'[{"instruction": 1,', name="b.json")
    with pytest.raises(ValueError, match=r"^c.jsonl, line 2: not valid JSON"):
        load_entries(b'{"a": 1}\n{oops}\n', name="c.jsonl")
    with pytest.raises(ValueError, match=r"^upload: not UTF-8"):
        load_entries(b"\xff\xfe[")


def test_response_keys():
    with open(ASSETS / "eval-example-data.json", encoding="utf-8") as f:
        assert response_keys(json.load(f)) == ["model 1 response", "model 2 response"]
    assert response_keys([{"instruction": "i", "output": "o", "a": "x", "b": 1}, {"instruction": "i", "a": "y"}]) == ["a"]
    assert response_keys([]) == [] and response_keys([["not", "a", "dict"]]) == []


def test_scored_records_read_the_store_without_asking(ollama, entries, tmp_path):
    store = default_scores_path(tmp_path / "instruction-data-with-response.json", "model_response")
    assert store == tmp_path / "instruction-data-with-response.model_response.scores.jsonl"
    assert default_scores_path("x.json", "model 1 response").name == "x.model_1_response.scores.jsonl"
    client = OllamaClient("llama3", ollama.url, **FAST)
    assert scored_records(entries, "model_response", store, client) == [None] * 6
    score_responses(entries[:2], "model_response", client=client, store=store)
    ollama.requests.clear()
    got = scored_records(entries, "model_response", store, client.identity)
    assert [r and r["score"] for r in got] == [85, 85, None, None, None, None]
    assert got[0]["response"] == entries[0]["model_response"]
    other = OllamaClient("phi3", ollama.url)  # another judge's scores are not these
    assert scored_records(entries, "model_response", store, other) == [None] * 6
    assert ollama.requests == []


def test_score_figures():
    s = summarize_scores([5, 15, 15, 100, None])
    bars = plot_score_histogram(s).data[0]
    assert list(bars.x)[:2] == [5.0, 15.0] and list(bars.y) == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    points = plot_score_pairs([10, None, 30], [20, 50, 40], "GPT-4", "Llama 3").data[0]
    assert (list(points.x), list(points.y)) == ([10.0, 30.0], [20.0, 40.0])


# ---------------------------------------------------------------------------------------------
# Reliability (issue 11): deadline, identity, unparsed replies, ASCII digits, nested JSON


def test_a_reply_that_never_ends_hits_the_total_deadline():
    """A server sending a line every 0.2 s and never "done": the read time-out (1 s) never trips,
    the deadline (1.5 s for the whole reply) does, long before the 100 lines it would send."""
    with FakeOllama(trickle=(0.2, 100)) as srv:
        client = OllamaClient("llama3", srv.url, timeout=(1.0, 1.0), deadline=1.5, **FAST)
        with pytest.raises(JudgeTimeoutError, match="did not finish its reply within 1.5 s"):
            client.chat("Score this")
        assert srv.trickled < 30  # stopped listening well before the end of the stream


def test_localhost_and_127_0_0_1_are_the_same_judge(ollama, entries, tmp_path):
    store = tmp_path / "scores.jsonl"
    score_responses(entries[:3], "model_response", client=OllamaClient("llama3", ollama.url, **FAST), store=store)
    asked = len(ollama.chat_requests)
    other_spelling = ollama.url.replace("127.0.0.1", "localhost")
    records = score_responses(entries[:3], "model_response", client=OllamaClient("llama3", other_spelling, **FAST),
                              store=store)
    assert len(ollama.chat_requests) == asked == 3 and [r["score"] for r in records] == [85, 85, 85]
    changed = OllamaClient("llama3", ollama.url, options={"seed": 7, "temperature": 0, "num_ctx": 2048}, **FAST)
    score_responses(entries[:3], "model_response", client=changed, store=store)
    assert len(ollama.chat_requests) == 6  # other settings: another judge, asked again


def test_unparsed_replies_can_be_asked_again(ollama, entries, tmp_path):
    store = tmp_path / "scores.jsonl"
    ollama.reply = lambda prompt, model: "150"  # out of range: no valid score
    client = OllamaClient("llama3", ollama.url, **FAST)
    records = score_responses(entries[:2], "model_response", client=client, store=store)
    assert [r["score"] for r in records] == [None, None] and [r["raw"] for r in records] == ["150", "150"]
    ollama.reply = lambda prompt, model: "70"
    assert [r["score"] for r in score_responses(entries[:2], "model_response", client=client, store=store)] == \
        [None, None]  # kept as final unless asked
    assert len(ollama.chat_requests) == 2
    again = score_responses(entries[:2], "model_response", client=client, store=store, retry_unparsed=True)
    assert [r["score"] for r in again] == [70, 70] and len(ollama.chat_requests) == 4
    assert [r and r["score"] for r in scored_records(entries[:2], "model_response", store, client)] == [70, 70]


def test_scores_are_ascii_digits_only():
    assert parse_score("९०") is None and parse_score("٩٠") is None and parse_score("Score: ９０") is None
    assert parse_score("90") == 90 and parse_score("Score: 90/100") == 90


def test_deeply_nested_answers_file_is_a_clear_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not valid JSON \(nested too deeply\)"):
        load_entries(deep)
    deep.write_text("{" + '"a":' * 0 + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=r"deep\.json, line 1: not valid JSON"):
        load_entries(deep)


def test_cli_judge_on_nested_json_says_so(capsys, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert run_cli(deep) == 2
    assert "nested too deeply" in capsys.readouterr().err
