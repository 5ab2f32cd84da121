"""Judge: a larger model scores each answer against the reference (section 7.8), resumably."""
import hashlib
import json
import os
from pathlib import Path

import pandas  # Plotly pages import pandas first (a first-render import race was seen without it)
import streamlit as st

from sft import judge
from sft.data import ASSETS
from sft.judge.stats import (compare_scores, judge_agreement, plot_score_histogram, plot_score_pairs,
                             summarize_scores)
from sft.studio.runs import list_runs
from ui import snippets, state, widgets

state.init_state()
EXAMPLES = {"instruction-data-with-response.json (the chapter's 110 answers)": "instruction-data-with-response.json",
            "eval-example-data.json (two models' answers to 100 instructions)": "eval-example-data.json"}
st.title("Judge")
st.caption("Stage 3, step 9: a judge model scores each answer from 0 to 100 against the reference, with the "
           "chapter's prompt (seed 123, temperature 0). Scores are saved as they arrive, so a rerun resumes.")


@st.cache_data(ttl=10, show_spinner=False)
def server_status(backend, url):
    return judge.make_client(backend, "-", url).status(timeout=1.5)  # short: the page never hangs on it


@st.cache_data(max_entries=8, show_spinner=False)
def load(raw: bytes, name: str):
    return judge.load_entries(raw, name=name)


def num(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


# ---- the judge server ----
c = st.columns([1, 3, 1.2])
backend = c[0].selectbox("Backend", ["ollama", "openai"], key="judge_backend",
                         help="openai: any OpenAI-compatible server (llama.cpp, vLLM, hosted); key from $OPENAI_API_KEY.")
default_url = (os.environ.get("SFT_OLLAMA_URL") or state.OLLAMA_URL) if backend == "ollama" else judge.OPENAI_URL
url = c[1].text_input("Server URL", default_url, key=f"judge_url_{backend}").strip()
model = c[2].text_input("Judge model", "llama3", key="judge_model").strip() or "llama3"
if st.button("Check again", key="judge_recheck", icon=":material/refresh:"):
    server_status.clear()
status = server_status(backend, url)
problem = status.problem(model)
if not status.reachable:
    st.error(problem, icon=":material/cloud_off:")
elif problem:
    st.warning(f"{problem} Models there: {', '.join(status.models) or 'none yet'}.", icon=":material/warning:")
else:
    st.success(f"Reachable at `{status.url}`; `{model}` is there. Models: {', '.join(status.models)}.",
               icon=":material/check_circle:")
client = judge.make_client(backend, model, url, timeout=(2.0, 120.0), retries=1)


def pick_answers():
    """-> (entries, path whose scores file sits beside it, label), or None with the reason shown."""
    runs = [r for r in list_runs(state.runs_dir()) if not r.is_broken and r.responses_path.is_file()]
    kind = st.radio("Answers", ["A run's responses", "Bundled example", "Upload JSON / JSONL"], horizontal=True,
                    index=0 if runs else 1, key="judge_source")
    path = raw = source = None
    if kind == "A run's responses":
        if not runs:
            st.info("No run has answers yet: generate them on the Compare page, or pick the bundled example.")
            return None
        name = st.selectbox("Run", [r.name for r in runs], key="judge_run")
        path = next(r for r in runs if r.name == name).responses_path  # its scores go in the run folder
        raw, label, source = path.read_bytes(), name, path
    elif kind == "Bundled example":
        example = ASSETS / EXAMPLES[st.selectbox("Example", list(EXAMPLES), key="judge_example")]
        raw, label, source = example.read_bytes(), example.stem, example
    else:
        up = st.file_uploader("Entries with instruction, input, output and answers", type=["json", "jsonl"],
                              key="judge_upload", max_upload_size=state.UPLOAD_LIMIT_MB)
        if up is None:
            return None
        raw, label, source = up.getvalue(), Path(up.name).stem, Path(up.name)
    if path is None:  # examples and uploads keep their scores under the runs folder, one file per content
        path = state.runs_dir() / "scores" / f"{label}-{hashlib.sha1(raw).hexdigest()[:8]}.json"
    try:
        st.session_state["judge_answers_file"] = str(source)  # for the code behind the page
        return load(raw, label), path, label
    except ValueError as exc:
        st.error(f"Not loaded: {exc}", icon=":material/error:")


def score_and_show(entries, path, label):
    keys = judge.response_keys(entries)
    if not keys:
        return st.error("No field to score: entries need a string answer besides instruction, input and output.")
    c = st.columns([2, 1, 1])
    key = c[0].selectbox("Response key", keys, index=keys.index("model_response") if "model_response" in keys else 0,
                         key=f"judge_key_{label}")
    limit = c[1].number_input("Score the first", 1, len(entries), len(entries), key=f"judge_limit_{label}")
    conc = c[2].number_input("Questions at once", 1, 8, 1, key="judge_conc")
    items, store = entries[:limit], judge.default_scores_path(path, key)
    st.caption(f"Judge `{client.name}`; scores file `{store}`.")
    widgets.code_behind(snippets.judge(st.session_state["judge_answers_file"], key, backend, model, url, int(limit),
                                       store_beside=path))
    retry = st.checkbox("Ask again where the judge's reply held no score 0..100", key="judge_retry_unparsed",
                        help="Replies with no valid score are kept (raw, below) and not asked again unless this is on.")
    if st.button("Score", type="primary", key="judge_go", disabled=not status.reachable, icon=":material/gavel:"):
        row = st.columns([6, 1], vertical_alignment="center")
        bar = row[0].progress(0.0, text="Asking the judge…")
        # Any click reruns the page, which ends this run at its next progress update; every score
        # is saved as it arrives (the answers in flight too), so Score later asks only the rest.
        row[1].button("Stop", key="judge_stop", icon=":material/stop:", help="Score again to resume.")
        try:
            judge.score_responses(items, key, client=client, store=store, concurrency=int(conc), retry_unparsed=retry,
                                  progress=lambda done, total: bar.progress(done / total, f"{done} of {total} scored"))
        except (judge.JudgeError, ValueError) as exc:  # what was scored is stored; the notes say so
            st.error(" ".join([str(exc), *getattr(exc, "__notes__", [])]), icon=":material/error:")
    elif st.session_state.get("judge_stop"):
        st.info("Stopped. The scores so far are saved: Score goes on from there.", icon=":material/pause_circle:")
    try:
        records = judge.scored_records(items, key, store, client)
    except ValueError as exc:  # an entry without the key, or a corrupt scores file: both named
        return st.error(str(exc), icon=":material/error:")
    done = [r for r in records if r]
    s = summarize_scores([r["score"] for r in done])
    st.caption(f"{len(done)} of {len(items)} asked; {s['unparsed']} replies held no score 0..100 (kept, raw below).")
    m = st.columns(4)
    m[0].metric("Scored", f"{s['n']} of {len(items)}")
    m[1].metric("Mean", num(s["mean"]))
    m[2].metric("Median", num(s["median"], "g"))
    m[3].metric("95% bootstrap CI", "–" if s["ci_low"] is None else f"{s['ci_low']:.1f} – {s['ci_high']:.1f}")
    if s["n"]:
        st.plotly_chart(plot_score_histogram(s), key="judge_hist")
    table = pandas.DataFrame([{"#": i, "instruction": e["instruction"], "input": e.get("input", ""),
                               "reference": e["output"], "answer": e[key], "score": r["score"] if r else None,
                               "judge reply": r["raw"] if r else None} for i, (e, r) in enumerate(zip(items, records))])
    st.dataframe(table, hide_index=True, height=320, key="judge_table")
    d = st.columns(2)
    d[0].download_button("Download CSV", table.to_csv(index=False), f"{label}-{key}-scores.csv", "text/csv",
                         key="judge_csv")
    d[1].download_button("Download JSON", json.dumps(done, indent=1, ensure_ascii=False),
                         f"{label}-{key}-scores.json", "application/json", key="judge_json")
    return keys, key, items, records


def compare(entries, path, keys, key, items, records):
    """Item by item against another key of this file or another run's answers, same judge."""
    runs = [r for r in list_runs(state.runs_dir()) if not r.is_broken and r.responses_path.is_file()
            and r.responses_path != path]
    others = [f"key: {k}" for k in keys if k != key] + [f"run: {r.name}" for r in runs]
    if not others:
        return st.info("Nothing to compare with: pick a file with two answer keys (eval-example-data.json) "
                       "or make a second run with answers.")
    other = st.selectbox("Compare with (same judge, same entries)", others, key="judge_other")
    kind_b, name_b = other.split(": ", 1)
    path_b = path if kind_b == "key" else next(r for r in runs if r.name == name_b).responses_path
    key_b = name_b if kind_b == "key" else "model_response"
    try:
        items_b = (entries if kind_b == "key" else load(path_b.read_bytes(), name_b))[:len(items)]
        if [e.get("instruction") for e in items_b] != [e["instruction"] for e in items]:
            raise ValueError(f"{other} answers other instructions: item by item needs the same entries")
        rec_b = judge.scored_records(items_b, key_b, judge.default_scores_path(path_b, key_b), client)
    except ValueError as exc:
        return st.warning(str(exc), icon=":material/warning:")
    a, b = ([r["score"] if r else None for r in rs] for rs in (records, rec_b))
    cmp = compare_scores(a, b)
    st.caption(f"{cmp['n']} items scored in both ({cmp['skipped']} not yet, or unparsed: score the other set with "
               f"this judge to fill them in). 95% bootstrap interval of A − B: {num(cmp['diff_ci_low'])} to "
               f"{num(cmp['diff_ci_high'])}.")
    m = st.columns(4)
    m[0].metric("A better / tie / B better", f"{cmp['wins']} / {cmp['ties']} / {cmp['losses']}")
    for col, (what, v) in zip(m[1:], [("Mean A", cmp["mean_a"]), ("Mean B", cmp["mean_b"]),
                                      ("Mean A − B", cmp["mean_diff"])]):
        col.metric(what, num(v))
    st.plotly_chart(plot_score_pairs(a, b, f"A: {key}", f"B: {other}"), key="judge_cmp_plot")


def agreement():
    st.caption("The chapter's bonus: GPT-4 and Llama 3 8B scored the same answers (eval-example-data.json).")
    which = st.radio("Answers of", ["model-1", "model-2"], horizontal=True, key="judge_agree_set")
    gpt4, llama = (json.loads((ASSETS / "ch07-eval-scores" / f"{j}-{which}-response.json").read_text())
                   for j in ("gpt4", "llama3-8b"))
    try:
        agree = judge_agreement(gpt4, llama)
    except ValueError as exc:  # model-2: one Llama 3 reply held no number and the chapter dropped it
        return st.warning(f"{exc}. One Llama 3 reply held no number and the chapter dropped it, so the lists no "
                          "longer line up: this is why the app keeps unparsed replies in place.")
    m = st.columns(3)
    m[0].metric("Pearson", f"{agree['pearson']:.3f}")
    m[1].metric("Spearman", f"{agree['spearman']:.3f}")
    m[2].metric("Mean |GPT-4 − Llama 3|", f"{agree['mean_abs_diff']:.2f}")
    st.plotly_chart(plot_score_pairs(gpt4, llama, "GPT-4", "Llama 3 8B"), key="judge_agree_plot")


picked = pick_answers()
tab_scores, tab_compare, tab_agree = st.tabs(["Scores", "Compare two sets", "Do judges agree?"])
with tab_scores:
    shown = score_and_show(*picked) if picked else st.info("Choose the answers to score above.")
with tab_compare:
    if isinstance(shown, tuple):
        compare(picked[0], picked[1], *shown)
    else:
        st.info("Choose answers with a response key first.")
with tab_agree:
    agreement()
