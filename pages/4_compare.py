"""Compare: the base model and a fine-tuned run answer the same instructions, side by side."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import json
from pathlib import Path

import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st
import torch

from sft.model import canonical_model_name
from sft.studio.answers import answer_entries
from sft.studio.files import read_json
from sft.studio.jobs import JOB_ACTIVE, Job, JobError, answer_job_folder, start_answer_job
from sft.studio.runs import ACTIVE_STATES, Run
from sft.weights import weights_available
from ui import figures, loaders, snippets, state, widgets
from ui import jobs as job_ui

state.init_state()
ss = st.session_state
st.title("Compare")
st.caption("Stage 3, steps 7 and 8: let the models answer, extract the responses, read them beside the reference.")

runs = [r for r in loaders.list_runs() if not r.is_broken and loaders.run_weights(r)]
if not runs:
    st.info("No run has weights to answer with yet: fine-tune one on the Fine-tune page.")
    st.stop()
names = [r.name for r in runs]
c1, c2 = st.columns(2)
state.start_widget("cmp_run", ss.run_name if ss.run_name in names else names[0], names)
name = c1.selectbox("Fine-tuned run", names, key="cmp_run", on_change=lambda: ss.pop("cmp_base", None))
ss.run_name = name
run = runs[names.index(name)]
cfg, (weights_path, mtime) = run.config, loaders.run_weights(run)
c1.caption(f"{canonical_model_name(cfg.model)}, {run.state}; answering with `{weights_path}`; "
           f"prompt style `{cfg.prompt_style}`.")
# A DPO run's reference (the instruction run it started from) is what it moved away from: offered first.
reference = Run(cfg.from_run) if getattr(cfg, "from_run", None) and Path(cfg.from_run, "config.json").is_file() else None
ref_label = f"reference: {reference.name} (the run DPO started from)" if reference else None
ref_weights = loaders.run_weights(reference) if reference else None
base_names = ([ref_label] if ref_weights else []) + state.GPT2_NAMES + [state.TINY]
trained_from = canonical_model_name(cfg.model)
state.start_widget("cmp_base", ref_label if ref_weights else trained_from if trained_from in base_names
                   else base_names[0], base_names)
base = c2.selectbox("Base model", base_names, key="cmp_base", help="Defaults to the model the run started from.")
base_source = "reference" if base == ref_label else "random" if base == state.TINY else \
    weights_available(base, str(state.models_dir()))
if base_source is None:
    c2.warning(f"{base} is not downloaded: its answers are skipped (download it on the Fine-tune page).")
elif base == state.TINY:
    c2.caption("Random weights (seed 123), the tiny run's starting point when trained with seed 123.")

# ---- what to ask, and how to decode ----
test = read_json(run.test_data_path) or loaders.splits()["test"]
mode = st.radio("Ask", ["Test entries", "My own instruction"], horizontal=True, key="cmp_mode")
if mode == "Test entries":
    picked = st.multiselect("Test entries", range(len(test)), default=list(range(min(3, len(test)))),
                            format_func=lambda i: f"{i}: {test[i]['instruction'][:80]}", key="cmp_entries")
    entries = [test[i] for i in picked]
else:
    instruction = st.text_area("Instruction", "Rewrite the sentence using a simile.", key="cmp_instruction")
    inp = st.text_input("Input (optional)", "The car is very fast.", key="cmp_input")
    entries = [{"instruction": instruction, "input": inp}] if instruction.strip() else []
c = st.columns(5)
max_new = c[0].number_input("Max new tokens", 1, 1024, 256, key="cmp_max_new")
temperature = c[1].number_input("Temperature (0 = greedy)", 0.0, 5.0, 0.0, step=0.1, key="cmp_temp")
top_k = c[2].number_input("Top-k (0 = off)", 0, 50257, 0, key="cmp_top_k")
seed = c[3].number_input("Seed", 0, 2**31 - 1, 123, key="cmp_seed")
fast_bf16 = bool(loaders.device_info()["summary"].get("cpu_bf16"))
state.start_widget("cmp_precision", "bf16" if fast_bf16 else "fp32", ["fp32", "bf16"])
bf16 = c[4].selectbox("Precision", ["fp32", "bf16"], key="cmp_precision",
                      help="fp32: token for token the chapter's greedy answers. bf16: a bf16 copy of the "
                           "models, faster where the CPU does bf16 well (here: " +
                           ("yes" if fast_bf16 else "no") + "); a near-tie may then pick another token.") == "bf16"
decoding = dict(prompt_style=cfg.prompt_style, max_new_tokens=max_new, temperature=temperature,
                top_k=top_k or None)


def answer(model, todo, **kw):
    torch.manual_seed(seed)  # as the chapter does before sampling; greedy decoding ignores it
    return [r["model_response"] for r in answer_entries(model, todo, loaders.tokenizer(), **decoding, **kw)]


if st.button("Generate answers", type="primary", key="cmp_go", disabled=not entries):
    with st.spinner("Generating…"):
        tuned = answer(loaders.finetuned_model(str(run.path), weights_path, mtime, bf16), entries)
        base_model = (loaders.finetuned_model(str(reference.path), *ref_weights, bf16) if base_source == "reference"
                      else loaders.base_model(base, base_source, bf16) if base_source else None)
        based = answer(base_model, entries) if base_model is not None else [None] * len(entries)
    ss.cmp_results = [{**e, "base": b, "tuned": t, "base_name": base, "run": name}
                      for e, b, t in zip(entries, based, tuned)]

widgets.code_behind(snippets.compare(run.path, max_new_tokens=max_new, temperature=temperature, top_k=top_k or None,
                                     seed=seed, prompt_style=cfg.prompt_style, indices=picked if mode == "Test entries"
                                     else None, own=None if mode == "Test entries" else entries),
                    note="These lines give the fine-tuned run's answers (fp32) with the settings above.")
for r in ss.get("cmp_results") or []:
    with st.container(border=True):
        st.markdown(f"**{r['instruction']}**" + (f"  \nInput: {r['input']}" if r.get("input") else ""))
        c = st.columns(3)
        c[0].markdown("*Reference*")
        c[0].text(r.get("output") or "(none: your own instruction)")
        c[1].markdown(f"*Base: {r['base_name']}*")
        c[1].text("(not downloaded)" if r["base"] is None else (r["base"] or "(empty answer)"))
        c[2].markdown(f"*Fine-tuned: {r['run']}*")
        c[2].text(r["tuned"] or "(empty answer)")

# ---- the whole test split, into the run folder: a background job (sft.studio.jobs) ----
st.subheader("The whole test split")
st.caption(f"The chapter's `instruction-data-with-response.json`: each of the {len(test)} test entries with the "
           "fine-tuned model's answer, saved in the run folder (the Judge page scores it). It is answered in a "
           "process of its own: change settings, leave the page or close the tab meanwhile; nothing is lost.")
job = Job(answer_job_folder(run))
busy = run.state in ACTIVE_STATES


def generate_all():  # a callback: the page is then drawn with the job running (the button disabled)
    try:
        start_answer_job(run, test, max_new_tokens=max_new, temperature=temperature, top_k=top_k or None, seed=seed,
                         precision="bf16" if bf16 else "fp32")
    except JobError as exc:  # another session started it a moment ago
        ss.cmp_job_error = str(exc)


job_status = job.status()
running = job_status.get("state") in JOB_ACTIVE
st.button(f"Generate all {len(test)} answers", key="cmp_all", disabled=busy or running or not test,
          on_click=generate_all, help="Waits for the run to finish." if busy else "Answering already." if running
          else "With the decoding settings and precision above.")
if ss.get("cmp_job_error"):
    st.error(ss.pop("cmp_job_error"), icon=":material/error:")

def show_answers(path, status):
    """How the last job ended, and the answers saved in the run folder: a table and one row in full."""
    ended = job_ui.ended(status, counted="answered", saved=f"the {status.get('done') or 0} answers so far are "
                         f"saved in `{path}`.", again="Generate all goes on from there with the same settings (other "
                         "settings start again).")
    if not path.is_file():
        return
    results = read_json(path) or []
    if ended not in ("stopped", "failed"):
        st.success(f"{len(results)} answers in `{path}`.", icon=":material/check_circle:")
    st.download_button("Download instruction-data-with-response.json", json.dumps(results, indent=4),
                       file_name="instruction-data-with-response.json", mime="application/json", key="cmp_dl")
    if not results:
        return
    table = figures.frame(results)
    first = [c for c in ("instruction", "model_response", "output") if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    text = st.column_config.TextColumn  # rows taller than 4rem wrap their text
    picked_row = st.dataframe(
        table, key="cmp_table", height=400, row_height=96, on_select="rerun", selection_mode="single-row",
        column_config={"instruction": text("instruction", width="medium"),
                       "model_response": text("model_response", width="large"),
                       "output": text("output (reference)", width="large"), "input": text("input", width="small")})
    rows = picked_row.selection.rows if picked_row else []
    if not rows:
        return st.caption("Select a row to read it in full.")
    r = results[rows[0]]
    with st.container(border=True, key="cmp_detail"):
        st.markdown(f"**{r.get('instruction', '')}**" + (f"  \nInput: {r['input']}" if r.get("input") else ""))
        c = st.columns(2)
        c[0].markdown("*Fine-tuned answer*")
        c[0].text(r.get("model_response") or "(empty answer)")
        c[1].markdown("*Reference*")
        c[1].text(r.get("output") or "(none)")


if running:
    job_ui.watch(job, key="cmp_job", counted="answered")
else:
    show_answers(run.responses_path, job_status)
