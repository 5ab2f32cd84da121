"""Preference: DPO, the book's next step after chapter 7. Browse chosen/rejected pairs, see a pair collated and
masked cell by cell, and preference-tune a finished run's model in a worker, watching its loss and rewards live."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import time

import streamlit as st

from sft.studio.config import ConfigError
from sft.studio.dpo_config import DPOConfig
from sft.studio.hardware import device_key
from sft.studio.locks import DeviceBusyError, holder
from sft.studio.queue import enqueue
from sft.studio.runs import ACTIVE_STATES, Run, RunError
from sft.studio.worker import launch_worker
from ui import loaders, preference, snippets, state, widgets

state.init_state()
ss = st.session_state
st.title("Preference")
st.caption("After instruction fine-tuning, Direct Preference Optimization (the book's DPO notebook) tunes the model "
           "on pairs of a chosen and a rejected answer: it raises the chosen answer's probability relative to the "
           "rejected one, measured against a frozen copy of the starting model, the reference.")

# ---- the pairs ----
same = preference.identical_count()
identical = st.radio(f"The {same} pairs whose chosen and rejected answers are identical", ["keep", "drop"],
                     horizontal=True, key="pref_identical",
                     format_func={"keep": "keep them (the notebook does)", "drop": "drop them"}.get,
                     help="They carry no preference signal: each adds ln 2 to the loss and no gradient.")
data = preference.pairs(identical)
st.caption(f"{len(data)} pairs from the book's `instruction-data-with-preference.json`, split as the notebook: "
           "85% train, 10% test, the rest validation.")
i = int(st.number_input("Pair", 1, len(data), 1, key="pref_pair")) - 1
entry = data[i]
st.markdown(f"**Instruction:** {entry['instruction']}" + (f"  \n**Input:** {entry['input']}" if entry["input"] else ""))
c = st.columns(2)
for col, key in zip(c, ("chosen", "rejected")):
    col.markdown(f"**{key.capitalize()}**")
    col.code(entry[key], language=None, wrap_lines=True)
st.markdown("**Word-level diff**, chosen → rejected (struck: only in the chosen; green: only in the rejected):")
st.markdown(preference.word_diff_html(entry["chosen"], entry["rejected"]), unsafe_allow_html=True)

# ---- the collated pair ----
st.subheader("A batch of pairs, as the collate builds it")
c = st.columns(3, vertical_alignment="bottom")
count = int(c[0].number_input("Pairs in the batch", 1, 4, 2, key="pref_count"))
mask_prompt = c[1].toggle("mask_prompt_tokens", True, key="pref_mask")
zoom = c[2].toggle("Zoom: 20 positions where the answers start", key="pref_zoom")
anatomy = preference.pair_anatomy(data[i:i + count], mask_prompt_tokens=mask_prompt)
kept_cols = [cell["col"] for cell in anatomy["cells"] if cell["kept"]]
positions = None
if zoom and kept_cols:
    first = max(0, min(kept_cols) - 4)
    positions = (first, min(first + 19, anatomy["cols"] - 1))
st.plotly_chart(preference.pair_figure(anatomy, positions), key="pref_grid")
st.caption(f"Chosen and rejected rows share one length, {anatomy['cols']} positions: the longest of them plus one, "
           "padded with 50256. A mask is True only at the tokens whose log-probability counts: never the padding, "
           "and with mask_prompt_tokens not the prompt nor its two ↵ tokens. Kept per row: "
           + ", ".join(f"{row} {n}" for row, n in anatomy["kept"].items()) + ".")

# ---- start a DPO run ----
code_at = st.container()  # the code behind, drawn here once the start settings below are known
st.subheader("Preference-tune a finished run")
starts = preference.start_runs(loaders.list_runs())
if not starts:
    st.info("No finished instruction run yet: train one on the Fine-tune page first (the tiny random model takes "
            "about a minute on a CPU); its final weights are the policy's start and the reference.")
else:
    source = st.selectbox("Start from", [r.name for r in starts], key="pref_from")
    book = DPOConfig()
    c = st.columns(5)
    settings = {"beta": c[0].number_input("beta", 0.01, 100.0, book.beta, key="pref_beta"),
                "lr": c[1].number_input("Learning rate", 1e-8, 1.0, book.lr, format="%.1e", key="pref_lr"),
                "epochs": int(c[2].number_input("Epochs", 1, 100, book.epochs, key="pref_epochs")),
                "limit": int(c[3].number_input("First N pairs (0 = all)", 0, 1100, 0, key="pref_limit")) or None,
                "max_steps": int(c[4].number_input("Stop after N steps (0 = no limit)", 0, 10**6, 0,
                                                   key="pref_max_steps")) or None}
    lora = st.toggle("LoRA (rank 16): train adapters; the reference is the same model with its adapters switched "
                     "off, so no second copy is held", key="pref_lora")
    st.caption(f"The notebook's settings: beta {book.beta:g}, AdamW lr {book.lr:g}, weight decay "
               f"{book.weight_decay:g}, {book.epochs} epoch, batches of {book.batch_size}, an evaluation every "
               f"{book.eval_freq} steps over {book.eval_iter} batches.")
    busy = holder(device_key(DPOConfig().device))  # one training per device: a DPO run can queue behind it
    if busy is not None:
        st.info(f"The device is busy: run `{busy.get('run') or '?'}` is training on it. Queue this DPO run after "
                "it, or wait.", icon=":material/hourglass_top:")
    c = st.columns([1, 3], vertical_alignment="center")
    start = c[0].button("Start DPO", type="primary", key="pref_start", disabled=busy is not None)
    queue = busy is not None and c[1].button(f"Queue after `{busy.get('run') or '?'}`", key="pref_queue",
                                             help="Starts by itself when the device is free (the Experiments "
                                                  "page orders the queue).")
    if start or queue:
        try:
            config = DPOConfig.from_settings(
                settings, from_run=str(next(r for r in starts if r.name == source).path), identical=identical,
                lora_rank=16 if lora else 0, lora_alpha=16.0).validate()
            run = Run.create(config, root=state.runs_dir(), name=f"{time.strftime('%Y%m%d-%H%M%S')}-dpo-{source}"[:100])
            if queue:
                place = enqueue(run)
                ss.pref_notice = f"Queued DPO run `{run.name}`: number {place} in line; it starts " \
                                               "by itself when the device is free."
            else:
                launch_worker(run)
        except (ConfigError, RunError, DeviceBusyError, ValueError) as exc:
            st.error(f"Not {'queued' if queue else 'started'}: {exc}", icon=":material/block:")
        else:
            ss.pref_run = run.name
            st.rerun()
    notice = ss.pop("pref_notice", None)
    if notice:
        st.info(notice, icon=":material/playlist_add:")

with code_at:
    start = next((r for r in starts if r.name == source), None) if starts else None
    widgets.code_behind(snippets.preference(i, count, mask_prompt, identical, start.path if start else None,
                                            settings if starts else None),
                        note="These lines collate the pairs shown above with the DPO notebook's functions; the "
                             "command starts the DPO run below with its settings.")

# ---- the DPO runs, live ----
dpos = preference.dpo_runs(loaders.list_runs())
if not dpos:
    st.stop()
names = [r.name for r in dpos]
state.start_widget("pref_run", names[0], names)
shown = st.selectbox("DPO run", names, key="pref_run")
preference.watch(shown, loaders.open_run(shown).state in ACTIVE_STATES)
