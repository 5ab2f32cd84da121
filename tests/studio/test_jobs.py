"""Background jobs (sft/studio/jobs.py): a real answer job on the tiny random model, a stop that keeps
what was answered, a killed job read as failed, and scoring jobs against the fake Ollama server."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
from fake_servers import FakeOllama

from sft import judge
from sft.studio import jobs
from sft.studio.answers import answer_entries
from sft.studio.config import TrainConfig
from sft.studio.files import read_json
from sft.studio.runs import Run
from sft.studio.worker import execute_run
from sft.tokenizer import get_tokenizer

ANSWERS = Path(__file__).resolve().parents[2] / "sft" / "assets" / "instruction-data-with-response.json"


def tiny_run(root, name, **settings):
    """A tiny random run trained for 2 steps in this process (its own answers: 2 entries)."""
    config = TrainConfig(model="tiny", weights="random", max_steps=2, response_tokens=2, answer_limit=2,
                         sample_each_epoch=False, **settings)
    run = Run.create(config, root=root, name=name)
    execute_run(run)
    return run, read_json(run.test_data_path)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("jobs"), "small", limit=60)  # 6 test entries


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def answers(run):
    return [(a["instruction"], a["model_response"]) for a in read_json(run.responses_path)]


# ---------------------------------------------------------------------------------------------- answering

def test_answer_entries_partial_saves_each_batch_and_reuse_goes_on(small_run, tmp_path):
    run, test = small_run
    model, tok = run.load_model(), get_tokenizer()
    full = answer_entries(model, test, tok, max_new_tokens=6, batch_size=2)
    out = tmp_path / "answers.json"

    def stop_after_the_first_batch(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        answer_entries(model, test, tok, max_new_tokens=6, batch_size=2, out_path=out, partial=True,
                       progress=stop_after_the_first_batch)
    saved = read_json(out)
    assert len(saved) == 2 and all(s in full for s in saved)  # the shortest prompts, in the entries' order
    assert [test.index({k: v for k, v in s.items() if k != "model_response"}) for s in saved] == sorted(
        test.index({k: v for k, v in s.items() if k != "model_response"}) for s in saved)
    seen = []
    again = answer_entries(model, test, tok, max_new_tokens=6, batch_size=2, out_path=out, partial=True,
                           reuse=saved, progress=lambda done, total: seen.append((done, total)))
    assert again == full == read_json(out)  # the same batches as one call: the same answers
    assert seen == [(2, 6), (4, 6), (6, 6)]  # the two saved ones are not asked again


def test_a_stop_lands_inside_a_long_batch(small_run, tmp_path, monkeypatch):
    """Progress is repeated (at most once a second) while a batch generates, so a stop needs no batch's end:
    the first batch (2 answers) is kept, the second is cut after a token."""
    from sft.studio import answers as answers_module

    run, test = small_run
    model, tok = run.load_model(), get_tokenizer()
    clock = iter(range(0, 10_000, 2))  # each reading 2 s after the one before: every token ticks
    monkeypatch.setattr(answers_module.time, "monotonic", lambda: next(clock))
    out, calls = tmp_path / "answers.json", []

    def stop_inside_the_second_batch(done, total):
        calls.append(done)
        if done == 2 and calls.count(2) > 1:  # the second batch's first token tick (the first is its start)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        answer_entries(model, test, tok, max_new_tokens=6, batch_size=2, out_path=out, partial=True,
                       progress=stop_inside_the_second_batch)
    # the start, a tick after each of batch one's 6 tokens, its end (2 done), then the second batch's first tick
    assert calls == [0] * 7 + [2, 2]
    assert len(read_json(out)) == 2


def test_a_run_being_answered_is_not_trained_deleted_or_renamed_meanwhile(tmp_path):
    from sft.studio.locks import create_time
    from sft.studio.manage import delete_run, rename_run
    from sft.studio.runs import RunError
    from sft.studio.worker import launch_worker

    run, test = tiny_run(tmp_path, "busy")
    folder, kind, params, files = jobs.answer_job_args(run, test, max_new_tokens=2)
    job = jobs.create_job(folder, kind, params, files=files)
    job.update(state="running", pid=os.getpid(), create_time=create_time(os.getpid()))  # as its process would
    assert jobs.answering(run)
    for refused in (lambda: delete_run(run), lambda: rename_run(run, "other"), lambda: launch_worker(run)):
        with pytest.raises(RunError, match="is answering its test split"):
            refused()
    assert run.path.is_dir() and run.state == "completed"
    job.update(state="stopped")
    assert not jobs.answering(run)
    delete_run(run)
    assert not run.path.exists()


def test_no_answer_job_while_the_run_trains(small_run, monkeypatch):
    run, test = small_run
    monkeypatch.setattr(type(run), "state", property(lambda self: "running"))
    with pytest.raises(jobs.JobError, match="its answers are written when training ends"):
        jobs.start_answer_job(run, test)


def test_an_answer_job_answers_in_its_own_process(small_run):
    run, test = small_run
    expected = answer_entries(run.load_model(), test, get_tokenizer(), max_new_tokens=6, batch_size=2)
    job = jobs.start_answer_job(run, test, max_new_tokens=6, batch_size=2)
    assert job.path == run.path / "jobs" / "answers" and job.kind == "answer"
    with pytest.raises(jobs.JobError, match="already"):  # one job per folder while it is active
        jobs.start_answer_job(run, test, max_new_tokens=6, batch_size=2)
    status = job.wait(timeout=120)
    job.process.wait(timeout=30)
    assert status["state"] == "completed", job.tail_log()
    assert (status["done"], status["total"], status["error"]) == (6, 6, None)
    assert status["result"] == {"answered": 6, "path": str(run.responses_path)}
    assert read_json(run.responses_path) == expected
    assert not job.active and job.request_stop() is False  # nothing to stop once it ended
    assert job.params["resume"] is False


def test_a_stop_keeps_the_answers_so_far_and_generate_all_goes_on(small_run, monkeypatch):
    run, test = small_run
    run.responses_path.unlink(missing_ok=True)
    args = jobs.answer_job_args(run, test, max_new_tokens=6, batch_size=2)
    job = jobs.create_job(*args[:3], files=args[3])
    real = jobs.KINDS["answer"]

    def stop_after_one_batch(params, progress):  # the page's Stop, clicked once 2 of 6 are answered
        def watched(done, total, message=None):
            if done >= 2:
                job.request_stop()
            progress(done, total, message)

        return real(params, watched)

    monkeypatch.setitem(jobs.KINDS, "answer", stop_after_one_batch)
    status = jobs.run_job(job.path)
    assert (status["state"], status["done"], status["total"]) == ("stopped", 2, 6)
    assert status["stop_requested"] and status["error"] is None
    kept = answers(run)
    assert len(kept) == 2
    monkeypatch.setitem(jobs.KINDS, "answer", real)

    again = jobs.start_answer_job(run, test, max_new_tokens=6, batch_size=2)  # Generate all, same settings
    assert again.params["resume"] is True and not again.stop_requested
    assert again.wait(timeout=120)["state"] == "completed", again.tail_log()
    again.process.wait(timeout=30)
    assert len(answers(run)) == 6 and set(kept) <= set(answers(run))
    other = jobs.answer_job_args(run, test, max_new_tokens=7, batch_size=2)  # other settings: start again
    assert other[2]["resume"] is False


@pytest.mark.slow
def test_a_killed_job_reads_as_failed_and_keeps_what_it_saved(tmp_path):
    run, test = tiny_run(tmp_path, "whole")  # 110 test entries: seconds of answering
    job = jobs.start_answer_job(run, test, max_new_tokens=32, batch_size=4)
    wait_for(lambda: (job.status().get("done") or 0) >= 4, timeout=120)
    os.kill(job.status()["pid"], signal.SIGKILL)
    job.process.wait(timeout=30)
    status = job.status()
    assert status["state"] == "failed" and status["error"] == jobs.DEAD
    assert 4 <= status["done"] < 110 and status["total"] == 110
    assert len(read_json(run.responses_path)) >= status["done"]  # saved before each count
    assert json.loads(job.status_path.read_text())["state"] == "failed"  # recorded, not only reported
    assert not job.active


# ---------------------------------------------------------------------------------------------- scoring

def test_a_score_job_saves_each_score(tmp_path):
    entries = read_json(ANSWERS)[:4]
    upload = "\n".join(json.dumps(e) for e in entries).encode()  # an upload's bytes, JSON Lines
    store = tmp_path / "mine.model_response.scores.jsonl"
    with FakeOllama(reply=lambda prompt, model: "75") as srv:
        job = jobs.start_score_job(tmp_path / "runs", store, key="model_response", url=srv.base_url, model="llama3",
                                   entries=upload, limit=3)
        assert job.path == jobs.score_job_folder(tmp_path / "runs", store)
        assert job.path.parent == tmp_path / "runs" / ".jobs" and job.path.name.startswith("score-")
        status = job.wait(timeout=60)
        job.process.wait(timeout=30)
        assert status["state"] == "completed", job.tail_log()
        assert status["result"] == {"scored": 3, "asked": 3, "unparsed": 0, "store": str(store)}
        assert len(srv.chat_requests) == 3
    records = judge.scored_records(entries[:3], "model_response", store, judge.make_client("ollama", "llama3"))
    assert [r["score"] for r in records] == [75, 75, 75]


def test_a_stopped_score_job_keeps_its_scores_and_goes_on(tmp_path):
    store = tmp_path / "answers.model_response.scores.jsonl"
    kwargs = dict(key="model_response", model="llama3", entries_file=ANSWERS, limit=20)
    with FakeOllama(reply=lambda prompt, model: "60", delay=0.2) as srv:
        job = jobs.start_score_job(tmp_path, store, url=srv.base_url, **kwargs)
        wait_for(lambda: (job.status().get("done") or 0) >= 2)
        with pytest.raises(jobs.JobError, match="already running"):
            jobs.start_score_job(tmp_path, store, url=srv.base_url, **kwargs)
        assert job.request_stop() is True
        status = job.wait(timeout=60)
        job.process.wait(timeout=30)
        assert status["state"] == "stopped", job.tail_log()
        saved = len(store.read_text().splitlines())
        assert 2 <= saved < 20 and saved == status["done"] == len(srv.chat_requests)  # nothing asked in vain
        srv.delay = 0.0
        again = jobs.start_score_job(tmp_path, store, url=srv.base_url, **kwargs)
        assert again.wait(timeout=60)["state"] == "completed", again.tail_log()
        again.process.wait(timeout=30)
        assert len(srv.chat_requests) == 20 and len(store.read_text().splitlines()) == 20  # only the rest


def test_sigterm_stops_a_job_like_its_stop_file(tmp_path):
    with FakeOllama(reply=lambda prompt, model: "60", delay=0.2) as srv:
        job = jobs.start_score_job(tmp_path, tmp_path / "s.jsonl", key="model_response", url=srv.base_url,
                                   entries_file=ANSWERS, limit=30)
        wait_for(lambda: (job.status().get("done") or 0) >= 1)
        os.kill(job.status()["pid"], signal.SIGTERM)  # a polite kill: stopped at the next score, nothing lost
        status = job.wait(timeout=60)
        assert job.process.wait(timeout=30) == 0
        assert status["state"] == "stopped" and status["done"] == len((tmp_path / "s.jsonl").read_text().splitlines())


def test_a_score_job_that_cannot_reach_the_judge_fails_with_the_reason(tmp_path):
    job = jobs.start_score_job(tmp_path, tmp_path / "s.jsonl", key="model_response", url="http://127.0.0.1:9",
                               entries_file=ANSWERS, limit=2)
    status = job.wait(timeout=60)
    job.process.wait(timeout=30)
    assert status["state"] == "failed" and "ollama serve" in status["error"]
    assert "0 of 2 scores were obtained" in status["error"]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_score_responses_keeps_what_is_stored_when_progress_raises(tmp_path, concurrency):
    entries = read_json(ANSWERS)[:8]
    store = tmp_path / "s.jsonl"

    def stop_at_three(done, total):
        if done >= 3:
            raise jobs.JobStopped()

    with FakeOllama(reply=lambda prompt, model: "50", delay=0.1) as srv:
        client = judge.make_client("ollama", "llama3", srv.base_url)
        with pytest.raises(jobs.JobStopped):
            judge.score_responses(entries, "model_response", client=client, store=store, concurrency=concurrency,
                                  progress=stop_at_three)
        stored = [r for r in judge.scored_records(entries, "model_response", store, client) if r]
        assert 3 <= len(stored) <= 3 + concurrency - 1 + (concurrency > 1)  # those in flight are kept too
        assert len(srv.chat_requests) == len(stored) and {r["score"] for r in stored} == {50}  # none asked in vain
        judge.score_responses(entries, "model_response", client=client, store=store, concurrency=concurrency)
        assert len(srv.chat_requests) == 8  # the stored ones are not asked again


def test_unknown_kinds_and_a_dead_queued_job(tmp_path):
    with pytest.raises(jobs.JobError, match="unknown job kind 'nope'"):
        jobs.start_job(tmp_path / "j", "nope", {})
    job = jobs.create_job(tmp_path / "j", "score", {})
    assert job.status()["state"] == "queued" and job.active
    job.update(pid=2**22 + 12345, create_time=1.0)  # a process that is not there
    assert job.status()["state"] == "failed" and job.status()["error"] == jobs.DEAD
    status = jobs.run_job(job.path)  # the params lack what a score job needs: failed, with the reason
    assert status["state"] == "failed" and "KeyError" in status["error"]
