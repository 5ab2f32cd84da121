"""Section 7.8: scoring responses with a larger judge model served by Ollama.

The chapter's ``query_model``, ``check_if_running`` and ``generate_model_scores`` keep their
signatures and defaults (Llama 3, seed 123, temperature 0, num_ctx 2048, the chapter's prompt).
Not in the book: robust reply parsing that keeps unparsed replies, a resumable score store,
and bounded concurrency. The HTTP clients (time-outs, retries, errors that say what to do, the
health check, the OpenAI-compatible backend) live in ``sft.judge.client`` and statistics in
``sft.judge.stats``; both are re-exported here. ``python -m sft judge`` is ``sft.cli.judge``.
"""
import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import psutil

from .client import (  # noqa: F401 (re-exported: `from sft.judge import OllamaClient` works)
    DEFAULT_TIMEOUT,
    OLLAMA_URL,
    OPENAI_URL,
    OPTIONS,
    JudgeError,
    JudgeHTTPError,
    JudgeTimeoutError,
    MalformedResponseError,
    ModelNotFoundError,
    OllamaClient,
    OpenAIClient,
    ServerStatus,
    ServerUnavailableError,
    make_client,
    model_available,
    ollama_status,
)
from ..prompts import format_input
from .stats import ScoreStore, parse_score  # noqa: F401 (parse_score is re-exported)

# ---------------------------------------------------------------------------------------------
# The chapter's functions


def query_model(prompt, model="llama3", url=OLLAMA_URL, *, timeout=DEFAULT_TIMEOUT, retries=3,
                backoff=0.5, options=None):
    """The judge's whole reply to ``prompt``, as the chapter's function (seed 123, temperature 0)."""
    client = OllamaClient(model, url, timeout=timeout, retries=retries, backoff=backoff, options=options)
    return client.chat(prompt)


def check_if_running(process_name):
    """True if any process's name contains ``process_name`` (the chapter's check)."""
    for proc in psutil.process_iter(["name"]):
        if process_name in (proc.info.get("name") or ""):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Scoring a set of responses


def judge_prompt(entry, json_key):
    """The chapter's scoring prompt for one entry, word for word."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def judge_prompts(json_data, json_key):
    """All prompts up front, so a bad entry fails before any judge time is spent."""
    if not isinstance(json_data, (list, tuple)):
        raise ValueError(f"expected a list of entries, got {type(json_data).__name__}")
    prompts = []
    for i, entry in enumerate(json_data):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i}: expected an object, got {type(entry).__name__}")
        for key in ("instruction", "output", json_key):
            if key not in entry:
                raise ValueError(f"entry {i}: missing key {key!r}")
        if not isinstance(entry[json_key], str):
            raise ValueError(f"entry {i}: {json_key!r} must be a string, got {type(entry[json_key]).__name__}")
        try:
            prompts.append(judge_prompt(entry, json_key))
        except KeyError as exc:
            raise ValueError(f"entry {i}: missing key {exc}") from None
    return prompts


def _record_keys(prompts, judge):
    """One key per item: entry index, judge and the whole prompt (so an edited answer is asked again)."""
    return [hashlib.sha256(f"{i}\n{judge}\n{p}".encode()).hexdigest()[:24] for i, p in enumerate(prompts)]


def scored_records(json_data, json_key, store, judge):
    """Records already in ``store`` for these entries and this judge (a client, or its
    ``.identity``), in entry order, None where an entry has not been scored yet; nothing is asked."""
    identity = getattr(judge, "identity", judge)
    stored = (store if isinstance(store, ScoreStore) else ScoreStore(store)).load()
    return [stored.get(k) for k in _record_keys(judge_prompts(json_data, json_key), identity)]


def score_responses(json_data, json_key, model="llama3", *, url=OLLAMA_URL, client=None, store=None,
                    concurrency=1, progress=None, on_record=None, retry_unparsed=False):
    """Score ``entry[json_key]`` for every entry; -> one record per entry, in order:
    {index, key, judge, url, json_key, instruction, input, output, response, score, raw}.

    ``score`` is None when the reply holds no 0..100 score (``raw`` keeps the reply). With
    ``store`` (a JSONL path) each record is appended as it arrives and records already there for
    the same entry, prompt and judge (backend, model and settings: not the URL's spelling) are
    reused, so an interrupted run resumes without asking again; ``retry_unparsed`` asks again
    the items whose stored reply held no score. ``concurrency`` > 1 asks that many questions at
    once. ``progress(done, total)`` and ``on_record(record)`` are called from the calling
    thread. If the judge fails, or ``progress`` or ``on_record`` raises (a job's stop), the
    exception is raised after the records obtained, those in flight too, are stored; they are
    also on ``exc.records``.
    """
    if not 1 <= int(concurrency) <= 32:
        raise ValueError(f"concurrency must be between 1 and 32, got {concurrency}")
    client = client or OllamaClient(model, url)
    prompts = judge_prompts(json_data, json_key)
    keys = _record_keys(prompts, client.identity)
    store = ScoreStore(store) if store is not None and not isinstance(store, ScoreStore) else store
    stored = store.load() if store is not None else {}
    total = len(prompts)
    results = {i: stored[k] for i, k in enumerate(keys)
               if k in stored and not (retry_unparsed and stored[k].get("score") is None)}
    if progress:
        progress(len(results), total)

    def ask(i):
        entry, raw = json_data[i], client.chat(prompts[i])
        return {"index": i, "key": keys[i], "judge": client.identity, "url": client.url, "json_key": json_key,
                "instruction": entry["instruction"], "input": entry.get("input", ""),
                "output": entry["output"], "response": entry[json_key],
                "score": parse_score(raw), "raw": raw}

    def save(record):
        if store is not None:
            store.append(record)
        results[record["index"]] = record

    def keep(record):
        save(record)
        if on_record:
            on_record(record)
        if progress:
            progress(len(results), total)

    todo = [i for i in range(total) if i not in results]
    try:
        if concurrency == 1:
            for i in todo:
                keep(ask(i))
        else:
            _ask_concurrently(ask, keep, save, todo, concurrency)
    except BaseException as exc:
        exc.records = [results[i] for i in sorted(results)]
        where = f" and saved in {store.path}; run again to resume" if store is not None else ""
        exc.add_note(f"{len(results)} of {total} scores were obtained before this{where}.")
        raise
    return [results[i] for i in range(total)]


def _ask_concurrently(ask, keep, save, todo, concurrency):
    """Ask ``todo`` on ``concurrency`` threads; ``keep`` each record as it arrives. After an error
    (the judge's, or one ``keep`` raised: a stop from ``progress``) nothing new is asked, the answers
    in flight are still saved (``save``: without callbacks), and the first error is raised."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
    try:
        futures = [pool.submit(ask, i) for i in todo]
        error, quiet = None, False

        def fail(exc):
            nonlocal error
            if error is None:
                error = exc
                for other in futures:
                    other.cancel()

        for fut in as_completed(futures):
            try:
                record = fut.result()
            except BaseException as exc:  # keep the answers still in flight, then raise the first error
                fail(exc)
                continue
            if quiet:
                try:
                    save(record)
                except Exception:  # a full disk: the first error is the one to report
                    pass
                continue
            try:
                keep(record)
            except BaseException as exc:  # a callback said stop: save what is in flight, quietly
                quiet = True
                fail(exc)
        if error is not None:
            raise error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ScoreList(list):
    """The chapter's list of int scores, with every record (unparsed ones too) on ``.records``."""

    records = ()

    @property
    def unparsed(self):
        return [r for r in self.records if r["score"] is None]


def generate_model_scores(json_data, json_key, model="llama3", *, url=OLLAMA_URL, client=None, store=None,
                          concurrency=1, progress=None):
    """The chapter's scorer: -> list of int scores for the replies that hold one.

    Replies without a score are reported as the chapter does, and kept on ``.records`` /
    ``.unparsed`` of the returned list. Keywords as ``score_responses``; without ``progress``
    a tqdm bar is shown, as in the chapter.
    """
    bar = None
    if progress is None:
        from tqdm import tqdm

        bar = tqdm(total=len(json_data), desc="Scoring entries")
        progress = lambda done, total: bar.update(done - bar.n)  # noqa: E731
    try:
        records = score_responses(json_data, json_key, model, url=url, client=client, store=store,
                                  concurrency=concurrency, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    scores = ScoreList(r["score"] for r in records if r["score"] is not None)
    scores.records = records
    for r in scores.unparsed:
        print(f"Could not convert score: {r['raw']}")
    return scores


# ---------------------------------------------------------------------------------------------
# Reading answers to score


def load_entries(source, *, name=None):
    """Entries to score from a path or bytes (an upload): a JSON array, or JSON Lines.
    Raises ValueError naming the file (``name`` for bytes) and, for JSONL, the line."""
    if isinstance(source, (bytes, bytearray)):
        name, raw = name or "upload", bytes(source)
    else:
        name, raw = name or str(source), Path(source).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 text ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{name}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ValueError(f"{name}: not valid JSON (nested too deeply)") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{name}, line {n}: not valid JSON ({exc})") from None
            except RecursionError:
                raise ValueError(f"{name}, line {n}: not valid JSON (nested too deeply)") from None
    return entries


def default_scores_path(input_path, json_key):
    """Where the scores of ``input_path``'s ``json_key`` go unless told: beside it, as
    ``<input>.<key>.scores.jsonl``; the CLI and the app share it, so either resumes the other's."""
    safe = re.sub(r"[^\w.-]+", "_", json_key)  # "model 1 response" -> "model_1_response"
    return Path(input_path).with_suffix(f".{safe}.scores.jsonl")


def response_keys(entries):
    """Fields that could be scored: string fields, other than instruction/input/output, that every
    entry has, in the first entry's order (e.g. ["model_response"], ["model 1 response", ...])."""
    if not entries or not all(isinstance(e, dict) for e in entries):
        return []
    return [k for k in entries[0] if k not in ("instruction", "input", "output")
            and all(isinstance(e.get(k), str) for e in entries)]
