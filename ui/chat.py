"""The Chat page's pieces: which models can answer, loading one, and streaming replies into the page."""
import json

import streamlit as st

from sft.model import canonical_model_name
from sft.studio.chat import chat_prompt, stop_markers, stream_reply
from sft.studio.files import atomic_write_json, read_json

from . import loaders, state

CURSOR = " ▌"


def model_choices():
    """{label: ("base", name, source) | ("run", run)} for every model that can answer here."""
    choices = {}
    for run in loaders.list_runs():
        if not run.is_broken and loaders.run_weights(run):
            choices[f"run: {run.name}"] = ("run", run)
    for name, source in loaders.weights_status().items():
        if source:
            choices[f"base: {name}"] = ("base", name, source)
    choices[f"base: {state.TINY} (random weights)"] = ("base", state.TINY, "random")
    return choices


def load(choice, bf16=False):
    """(model, default prompt style, caption) for a ``model_choices`` value."""
    if choice[0] == "run":
        run = choice[1]
        path, mtime = loaders.run_weights(run)
        cfg = run.config
        caption = f"{canonical_model_name(cfg.model)} fine-tuned in run `{run.name}` ({run.state}), `{path}`"
        return loaders.finetuned_model(str(run.path), path, mtime, bf16), cfg.prompt_style, caption
    _, name, source = choice
    note = "RANDOM weights: gibberish until trained" if source == "random" else f"{source} weights, not fine-tuned"
    return loaders.base_model(name, source, bf16), "alpaca", f"{name}, {note}"


def reply_stream(model, prompt, style, settings, entry, slot):
    """A generator of the reply's text pieces that also keeps the text so far in ``entry['replies'][slot]``
    (a rerun, Stop, or a closed tab keeps what was written)."""
    reply = entry["replies"][slot]
    for piece in stream_reply(model, loaders.tokenizer(), prompt, stops=stop_markers(style), **settings):
        if not reply["text"]:
            piece = piece.lstrip()
        reply["text"] += piece
        yield piece
    reply["state"] = "done"


def answer(entry, models, settings, columns):
    """Stream every model's reply to ``entry`` at once, each into its column."""
    gens = [reply_stream(m, entry["prompt"], entry["style"], settings, entry, i) for i, m in enumerate(models)]
    if len(gens) == 1:
        with columns[0]:
            st.write_stream(gens[0])
        return
    boxes = [c.empty() for c in columns]
    live = list(range(len(gens)))
    while live:  # one token from each model in turn: both answers grow together
        for i in list(live):
            try:
                next(gens[i])
            except StopIteration:
                live.remove(i)
            boxes[i].markdown(entry["replies"][i]["text"] + ("" if i not in live else CURSOR))


def test_cases_path():
    return state.runs_dir() / ".chat" / "test-cases.json"


def save_test_case(entry, reply):
    """Append the message and a reply as a test case (instruction, input, output) to the JSON file the
    Compare and Judge pages can read; returns (path, how many it holds)."""
    path = test_cases_path()
    cases = read_json(path, []) or []
    cases.append({"instruction": entry["instruction"], "input": entry["input"], "output": reply["text"],
                  "source": f"chat: {reply['model']}"})
    atomic_write_json(path, cases, indent=4)
    return path, len(cases)


def history_json(history):
    return json.dumps([{"instruction": h["instruction"], "input": h["input"], "prompt": h["prompt"],
                        "replies": [{"model": r["model"], "text": r["text"], "state": r["state"]}
                                    for r in h["replies"]]} for h in history], indent=2, ensure_ascii=False)


def new_entry(instruction, input_text, style, labels):
    return {"instruction": instruction, "input": input_text, "style": style,
            "prompt": chat_prompt(instruction, input_text, style),
            "replies": [{"model": label, "text": "", "state": "streaming"} for label in labels]}
