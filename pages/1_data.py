"""Data: choose the instruction dataset, check it, read it, see its lengths and the chapter's split."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import hashlib
import json

import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from ui import data_source, figures, loaders, snippets, state, widgets
from ui.text import plural
from sft.data import ALPACA_52K_URL
from sft.prompts import PROMPT_STYLES, get_prompt_style

state.init_state()
ss = st.session_state
st.title("Data")
st.caption("Stage 1, step 1: download the instruction data, check it, format it as prompts, split it.")
if ss.get("workspace_note"):  # a dataset kept in the workspace whose file has gone
    st.warning(ss.workspace_note, icon=":material/warning:")

SOURCES = ["Bundled chapter dataset", "URL", "Upload JSON / JSONL"]
ss.setdefault("data_source_kind", SOURCES[0])  # plain key (kept in the workspace): the choice survives


def use(data, name, key):
    """Make `data` the dataset of every page (None: the bundled one) and keep it in the workspace."""
    state.remember(dataset=data, dataset_name=name, dataset_key=key, data_source_kind=ss.data_source_kind)


state.start_widget("data_source", ss.data_source_kind, SOURCES)
kind = st.radio("Source", SOURCES, horizontal=True, key="data_source")
if kind != ss.data_source_kind:
    state.remember(data_source_kind=kind)
error = None  # markdown: why the chosen source was not loaded (the previous dataset stays)
if kind == SOURCES[0]:
    if ss.dataset is not None or ss.dataset_key != "bundled":
        use(None, state.STATE_DEFAULTS["dataset_name"], "bundled")
else:
    dup = st.radio("Duplicate entries (same instruction and input)", ["error", "keep", "drop"], horizontal=True,
                   key="data_duplicates", format_func={"error": "report them, load nothing", "keep": "keep all",
                                                       "drop": "keep the first of each"}.get)
if kind == SOURCES[1]:
    state.start_widget("data_url", ss.dataset_name if ss.dataset_key.startswith("url:") else "")
    url = st.text_input("URL of a JSON or JSONL file", placeholder=ALPACA_52K_URL, key="data_url",
                        help="For example the 52K-entry Alpaca file (exercise 7.3).").strip()
    if st.button("Load", key="data_load_url", disabled=not url):
        ss.pop("_data_url_failed", None)
        try:
            use(loaders.load_data(url, dup), url, f"url:{dup}:" + url)
        except Exception as exc:  # validation errors name the entry; network errors say what to do
            ss["_data_url_failed"] = (url, data_source.error_message(exc))
    failed = ss.get("_data_url_failed")
    error = failed[1] if failed and failed[0] == url else None  # said until the address changes
elif kind == SOURCES[2]:
    # No max_upload_size: a bigger file reaches the page, which says its size and the limit in words. The
    # drop zone would print the server's limit (500 MB, .streamlit/config.toml) beside our label's; it is hidden.
    st.html("<style>.st-key-data_upload [data-testid=stFileUploaderDropzoneInstructions]{display:none}</style>")
    up = st.file_uploader(f"JSON array (.json) or JSON Lines (.jsonl), up to {state.UPLOAD_LIMIT_MB} MB",
                          type=["json", "jsonl"], key="data_upload")
    if up is not None:
        raw = up.getvalue()
        error = data_source.too_big(up.name, len(raw), state.UPLOAD_LIMIT_MB)
        key = f"upload:{dup}:" + hashlib.sha1(raw).hexdigest() if error is None else None
        failed = ss.get("_data_failed", {})  # a bad file is checked once, not again at every rerun
        if key in failed:
            error = failed[key]
        elif key is not None and ss.dataset_key != key:
            try:
                use(data_source.load_upload(raw, up.name, dup), up.name, key)
            except Exception as exc:  # the engine's DataValidationError names the file and each entry
                error = data_source.error_message(exc)
                ss["_data_failed"] = {key: error}
    elif ss.dataset is not None and ss.dataset_key.startswith("upload:"):  # a reload empties the uploader
        st.info(f"Showing **{ss.dataset_name}**, kept in the workspace (`{ss.get('dataset_file')}`). "
                "Upload a file to replace it.", icon=":material/inventory_2:")

# ---- validation report ----
if error is not None:
    st.error(error, icon=":material/error:")
    st.caption(f"Nothing was loaded from this source; the dataset is still **{ss.dataset_name}**.")
data = loaders.dataset()
with_input = sum(1 for e in data if e.get("input"))
inputs = "none has an `input`" if not with_input else (
    f"{with_input} also {'has' if with_input == 1 else 'have'} an `input`")
st.success(f"**{ss.dataset_name}**: {plural(len(data), 'entry', 'entries')}, all valid (each has a non-empty "
           f"`instruction` and `output`; {inputs}).", icon=":material/check_circle:")

# ---- searchable table, linked to the entry shown below ----
st.subheader("Entries")
if ss.get("_data_shown_for") != ss.dataset_key:  # another dataset: a fresh search, its own first example
    ss["_data_shown_for"] = ss.dataset_key
    ss["data_search"] = ""
    ss.pop("data_entry", None)
    ss.pop("_data_query_for", None)
state.start_widget("data_entry", min(50, len(data) - 1) if ss.dataset is None else 0,  # 50: the chapter's
                   range(len(data)))


def select_row():
    """Mark the entry shown below in the table (no row when the search hides it)."""
    shown = ss.get("_data_shown_ids", [])
    row = shown.index(ss.data_entry) if ss.data_entry in shown else None
    ss["data_table"] = {"selection": {"rows": [] if row is None else [row], "columns": [], "cells": []}}


query = st.text_input("Search instruction, input and output", key="data_search", placeholder="e.g. antonym")
COLUMNS = ["#", "instruction", "output", "input"]  # what the model learns first; input is often empty
rows = [(i, e["instruction"], e["output"], e.get("input", "")) for i, e in enumerate(data)]
if query:
    q = query.lower()
    rows = [r for r in rows if q in (r[1] + r[3] + r[2]).lower()]
ss["_data_shown_ids"] = [r[0] for r in rows]
if ss.get("_data_query_for") != query:  # new rows: the selection follows the entry, not the row number
    ss["_data_query_for"] = query
    select_row()
st.caption(f"{len(rows)} of {plural(len(data), 'entry', 'entries')}. Select a row to read it whole below, "
           "as a prompt; long text wraps in the cells.")
table = st.dataframe(
    pandas.DataFrame(rows, columns=COLUMNS), hide_index=True, height=360, row_height=72, key="data_table",
    on_select="rerun", selection_mode="single-row",
    column_config={"#": st.column_config.NumberColumn("#", width=56, pinned=True,
                                                      help="The entry number: the Entry shown below"),
                   "instruction": st.column_config.TextColumn(width=250),  # widths that fit a laptop's page;
                   "output": st.column_config.TextColumn(width=330),  # a wider one shares out the rest
                   "input": st.column_config.TextColumn(width=120)})
picked = table.selection.rows
if picked and picked[0] < len(rows):
    ss["data_entry"] = rows[picked[0]][0]  # the row picked is the entry shown

# ---- one entry as the model sees it ----
st.subheader("One entry as a prompt")
names = list(PROMPT_STYLES)
c1, c2 = st.columns([1, 3])
state.start_widget("data_style", ss.prompt_style, names)
style = c1.radio("Prompt style", names, key="data_style",
                 help="alpaca is the chapter's format_input; phi3 is exercise 7.1.")
if style != ss.prompt_style:
    state.remember(prompt_style=style)  # the Batches and Fine-tune pages use it; a reload keeps it
idx = c1.number_input("Entry", 0, len(data) - 1, key="data_entry", on_change=select_row,
                      help="The # column of the table: selecting a row there shows it here.")
shown = ss["_data_shown_ids"]
c1.caption(f"Entry {idx} is row {shown.index(idx) + 1} of the table{', selected' if picked else ''}."
           if idx in shown else f"Entry {idx} is not among the rows the search shows.")
ps, tok = get_prompt_style(style), loaders.tokenizer()
prompt_ids, response_ids = ps.split_ids(data[idx], tok)  # where the response starts, in tokens
n_prompt, n_resp = len(prompt_ids), len(response_ids)
c2.code(ps.format_example(data[idx]), language=None, wrap_lines=True)
c2.caption(f"{n_prompt + n_resp} tokens: {n_prompt} of prompt, {n_resp} of response "
           f"(+1 end-of-text when batched).")

# ---- lengths ----
st.subheader("Token lengths")
stats = loaders.length_stats(ss.dataset_key, style, data)
summ = stats["summary"]
m = st.columns(4)
m[0].metric("Shortest", summ["min"])
m[1].metric("Median", int(summ["median"]))
m[2].metric("Longest", summ["max"])
m[3].metric("Over 1024 (GPT-2's context)", summ["over_max_length"])
st.plotly_chart(figures.length_histogram(stats["lengths"]), key="data_hist")

# ---- split ----
st.subheader("Split")
st.caption("As the chapter: the first 85% train, the next 10% test, the rest validation, in file order.")
parts = loaders.splits()
small = data_source.split_warning({name: len(part) for name, part in parts.items()})
if small:
    st.warning(small, icon=":material/warning:")
cols = st.columns(3)
for col, name in zip(cols, ["train", "val", "test"]):
    col.metric(f"{name} entries", len(parts[name]))
    col.download_button(f"Download {name}.json", json.dumps(parts[name], indent=1, ensure_ascii=False),
                        file_name=f"{name}.json", mime="application/json", key=f"data_dl_{name}")

widgets.code_behind(snippets.data(*loaders.dataset_origin(), style, idx),
                    note=None if kind != SOURCES[2] else "Save the uploaded file beside your notebook first.")
