"""Judge: a larger model scores each answer against the reference (section 7.8), resumably."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import hashlib
import json
from pathlib import Path

import pandas  # Plotly pages import pandas first (a first-render import race was seen without it)
import streamlit as st

from sft import judge
from sft.data import ASSETS
from sft.judge.stats import (compare_scores, judge_agreement, plot_score_histogram, plot_score_pairs,
                             summarize_scores)
from sft.studio.jobs import JOB_ACTIVE, Job, JobError, score_job_folder, start_score_job
from sft.studio.runs import list_runs
from ui import data_source, snippets, state, widgets
from ui import jobs as job_ui

state.init_state()
ss = st.session_state
BACKENDS = ["ollama", "openai"]
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


def default_url(backend):
    return state.ollama_url() if backend == "ollama" else judge.OPENAI_URL


def backend_changed():  # the other backend's own default address
    backend = ss.judge_backend_choice
    ss.judge_url_text = default_url(backend)
    state.remember(judge_backend=backend, judge_url=ss.judge_url_text)


# ---- the judge server: plain keys kept in the workspace (a reload, or a visit to Home, keeps them) ----
c = st.columns([1, 3, 1.2])
state.start_widget("judge_backend_choice", ss.get("judge_backend") or "ollama", BACKENDS)
backend = c[0].selectbox("Backend", BACKENDS, key="judge_backend_choice", on_change=backend_changed,
                         help="openai: any OpenAI-compatible server (llama.cpp, vLLM, hosted); "
                              "key from $OPENAI_API_KEY.")
state.start_widget("judge_url_text", ss.get("judge_url") or default_url(backend))
url = c[1].text_input("Server URL", key="judge_url_text",
                      on_change=lambda: state.remember(judge_url=ss.judge_url_text.strip())).strip()
state.start_widget("judge_model_text", ss.get("judge_model") or "llama3")
model = c[2].text_input("Judge model", key="judge_model_text",
                        on_change=lambda: state.remember(judge_model=ss.judge_model_text.strip())).strip() or "llama3"
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


def runs_with_answers():
    return [r for r in list_runs(state.runs_dir()) if not r.is_broken and r.responses_path.is_file()]


def pick_run(runs):
    """The run whose answers to score: the Compare page's run (``run_name``) when it has answers, unless
    another was picked here since; else the one kept from the last visit (``judge_run``); else the newest."""
    names = [r.name for r in runs]
    followed = ss.get("run_name") in names and ss.get("_judge_run_picked_at") != ss.get("run_name")
    default = ss.run_name if followed else ss.get("judge_run") if ss.get("judge_run") in names else names[0]
    if followed and ss.get("judge_run_choice") != default:
        ss.judge_run_choice = default  # the Compare page chose another run since this one was shown

    def picked():
        ss._judge_run_picked_at = ss.get("run_name")
        state.remember(judge_run=ss.judge_run_choice)

    state.start_widget("judge_run_choice", default, names)
    name = st.selectbox("Run", names, key="judge_run_choice", on_change=picked)
    return next(r for r in runs if r.name == name)


def pick_answers():
    """-> (entries, path whose scores file sits beside it, label, source), or None with the reason shown.
    ``source``: the answers file, or an upload's bytes (a scoring job reads either)."""
    runs = runs_with_answers()
    kind = st.radio("Answers", ["A run's responses", "Bundled example", "Upload JSON / JSONL"], horizontal=True,
                    index=0 if runs else 1, key="judge_source")
    path = raw = source = None
    if kind == "A run's responses":
        if not runs:
            st.info("No run has answers yet: generate them on the Compare page, or pick the bundled example.")
            return None
        run = pick_run(runs)
        path = run.responses_path  # its scores go in the run folder
        raw, label, source = path.read_bytes(), run.name, path
    elif kind == "Bundled example":
        example = ASSETS / EXAMPLES[st.selectbox("Example", list(EXAMPLES), key="judge_example")]
        raw, label, source = example.read_bytes(), example.stem, example
    else:
        # No max_upload_size: a bigger file reaches the page, which says its size and the limit in words. The
        # drop zone would print the server's limit (500 MB, .streamlit/config.toml) beside our label's; it is hidden.
        st.html("<style>.st-key-judge_upload [data-testid=stFileUploaderDropzoneInstructions]{display:none}</style>")
        up = st.file_uploader(f"Entries with instruction, input, output and answers (JSON or JSON Lines, up to "
                              f"{state.UPLOAD_LIMIT_MB} MB)", type=["json", "jsonl"], key="judge_upload")
        if up is None:
            return None
        raw = up.getvalue()
        too_big = data_source.too_big(up.name, len(raw), state.UPLOAD_LIMIT_MB)
        if too_big:  # its first paragraph says the size and the limit; the advice is the Judge's own
            st.error(too_big.split("\n\n")[0] + "\n\nScore it from the command line, which reads files of any "
                     f"size: `python -m sft judge {up.name}`.", icon=":material/error:")
            return None
        label, source = Path(up.name).stem, raw
    if path is None:  # examples and uploads keep their scores under the runs folder, one file per content
        path = state.runs_dir() / "scores" / f"{label}-{hashlib.sha1(raw).hexdigest()[:8]}.json"
    try:
        ss["judge_answers_file"] = str(source if isinstance(source, Path) else up.name)  # for the code behind
        return load(raw, label), path, label, source
    except ValueError as exc:
        st.error(data_source.error_message(exc), icon=":material/error:")


def start_scoring(store, source, key, limit, conc, retry):
    try:
        start_score_job(state.runs_dir(), store, key=key, backend=backend, url=url, model=model, limit=int(limit),
                        concurrency=int(conc), retry_unparsed=retry,
                        **({"entries_file": source} if isinstance(source, Path) else {"entries": source}))
    except JobError as exc:  # another session started it a moment ago
        ss.judge_job_error = str(exc)


def score_and_show(entries, path, label, source):
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
    widgets.code_behind(snippets.judge(ss["judge_answers_file"], key, backend, model, url, int(limit),
                                       store_beside=path))
    retry = st.checkbox("Ask again where the judge's reply held no score 0..100", key="judge_retry_unparsed",
                        help="Replies with no valid score are kept (raw, below) and not asked again unless this is on.")
    # Scoring runs as a background job (sft.studio.jobs): clicks, reloads and other pages leave it running.
    job = Job(score_job_folder(state.runs_dir(), store))
    job_status = job.status()
    running = job_status.get("state") in JOB_ACTIVE
    st.button("Score", type="primary", key="judge_go", disabled=not status.reachable or running,
              icon=":material/gavel:", on_click=start_scoring, args=(store, source, key, limit, conc, retry),
              help="Scoring already." if running else "Every score is saved as it arrives: Stop, then Score, goes on.")
    if ss.get("judge_job_error"):
        st.error(ss.pop("judge_job_error"), icon=":material/error:")
    if running:
        job_ui.watch(job, key="judge", counted="scored")
        job_status = {}
    job_ui.ended(job_status, counted="scored", saved="the scores so far are saved:", again="Score goes on from there.")
    try:
        records = judge.scored_records(items, key, store, client)
    except ValueError as exc:  # an entry without the key, or a corrupt scores file: both named
        return st.error(str(exc), icon=":material/error:")
    done = [r for r in records if r]
    s = summarize_scores([r["score"] for r in done])
    st.caption(f"{len(done)} of {len(items)} asked; {s['unparsed']} replies held no score 0..100 (kept, raw below)."
               + (" The table fills in when the job ends." if running else ""))
    m = st.columns(4)
    m[0].metric("Scored", f"{s['n']} of {len(items)}")
    m[1].metric("Mean", num(s["mean"]))
    m[2].metric("Median", num(s["median"], "g"))
    m[3].metric("95% bootstrap CI", "–" if s["ci_low"] is None else f"{s['ci_low']:.1f} – {s['ci_high']:.1f}")
    if s["n"]:
        st.plotly_chart(plot_score_histogram(s), key="judge_hist")
    table = pandas.DataFrame([{"#": i, "score": r["score"] if r else None, "answer": e[key], "reference": e["output"],
                               "instruction": e["instruction"], "input": e.get("input", ""),
                               "judge reply": r["raw"] if r else None} for i, (e, r) in enumerate(zip(items, records))])
    text, number = st.column_config.TextColumn, st.column_config.NumberColumn  # rows over 4rem wrap their text
    widths = {"answer": "large", "reference": "large", "instruction": "medium", "input": "small",
              "judge reply": "small"}
    st.dataframe(table, hide_index=True, height=400, row_height=96, key="judge_table",
                 column_config={"#": number("#", width=40), "score": number("score", width=60),
                                **{name: text(name, width=w) for name, w in widths.items()}})
    d = st.columns(2)
    d[0].download_button("Download CSV", table.to_csv(index=False), f"{label}-{key}-scores.csv", "text/csv",
                         key="judge_csv")
    d[1].download_button("Download JSON", json.dumps(done, indent=1, ensure_ascii=False),
                         f"{label}-{key}-scores.json", "application/json", key="judge_json")
    return keys, key, items, records


def compare(entries, path, keys, key, items, records):
    """Item by item against another key of this file or another run's answers, same judge."""
    runs = [r for r in runs_with_answers() if r.responses_path != path]
    others = [f"key: {k}" for k in keys if k != key] + [f"run: {r.name}" for r in runs]
    if not others:
        return st.info("Nothing to compare with: pick a file with two answer keys (eval-example-data.json) "
                       "or make a second run with answers.")
    def scored(option):  # the first set with a scores file beside it is the default
        kind, name = option.split(": ", 1)
        beside = path if kind == "key" else next(r for r in runs if r.name == name).responses_path
        store = judge.default_scores_path(beside, name if kind == "key" else "model_response")
        return store.is_file() and store.stat().st_size > 0

    state.start_widget("judge_other", next((o for o in others if scored(o)), others[0]), others)
    other = st.selectbox("Compare with (same judge, same entries)", others, key="judge_other",
                         help="Sets that have scores come first as the default; score another set to fill it in.")
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
