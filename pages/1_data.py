"""Data: choose the instruction dataset, check it, read it, see its lengths and the chapter's split."""
import hashlib
import json

import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from ui import figures, loaders, snippets, state, widgets
from sft.data import ALPACA_52K_URL
from sft.prompts import PROMPT_STYLES, get_prompt_style

state.init_state()
ss = st.session_state
st.title("Data")
st.caption("Stage 1, step 1: download the instruction data, check it, format it as prompts, split it.")

SOURCES = ["Bundled chapter dataset", "URL", "Upload JSON / JSONL"]
ss.setdefault("data_source_kind", SOURCES[0])  # plain key: the choice survives navigation


def use(data, name, key):
    ss.dataset, ss.dataset_name, ss.dataset_key = data, name, key


state.start_widget("data_source", ss.data_source_kind)
kind = st.radio("Source", SOURCES, horizontal=True, key="data_source")
ss.data_source_kind = kind
error = None
if kind == SOURCES[0]:
    use(None, state.STATE_DEFAULTS["dataset_name"], "bundled")
else:
    dup = st.radio("Duplicate entries (same instruction and input)", ["error", "keep", "drop"], horizontal=True,
                   key="data_duplicates", format_func={"error": "report them, load nothing", "keep": "keep all",
                                                       "drop": "keep the first of each"}.get)
if kind == SOURCES[1]:
    url = st.text_input("URL of a JSON or JSONL file", placeholder=ALPACA_52K_URL, key="data_url",
                        help="For example the 52K-entry Alpaca file (exercise 7.3).")
    if st.button("Load", key="data_load_url", disabled=not url):
        try:
            use(loaders.load_data(url.strip(), dup), url.strip(), f"url:{dup}:" + url.strip())
        except Exception as exc:  # validation errors name the entry; network errors the URL
            error = exc
elif kind == SOURCES[2]:
    up = st.file_uploader(f"JSON array or JSON Lines, up to {state.UPLOAD_LIMIT_MB} MB",
                          type=["json", "jsonl"], key="data_upload", max_upload_size=state.UPLOAD_LIMIT_MB)
    if up is not None:
        raw = up.getvalue()
        key = f"upload:{dup}:" + hashlib.sha1(raw).hexdigest()
        if ss.dataset_key != key:
            try:
                use(loaders.load_data(raw, dup), up.name, key)
            except Exception as exc:
                error = exc

# ---- validation report ----
if error is not None:
    problems = getattr(error, "problems", None)  # sft.data.DataValidationError lists each one, naming the entry
    if problems:
        st.error(f"**Not loaded: {len(problems)} problem(s) in {error.source}.**\n\n"
                 + "\n".join(f"- {p}" for p in problems[:30])
                 + (f"\n- … and {len(problems) - 30} more" if len(problems) > 30 else "")
                 + (f"\n\n{error.hint}" if error.hint else ""), icon=":material/error:")
    else:
        st.error(f"**Not loaded: {type(error).__name__}.** {error}", icon=":material/error:")
    st.caption("Nothing was loaded from this source; the dataset below is still the previous one.")
data = loaders.dataset()
with_input = sum(1 for e in data if e.get("input"))
st.success(f"**{ss.dataset_name}**: {len(data)} entries, all valid (each has a non-empty `instruction` and "
           f"`output`; {with_input} also have an `input`).", icon=":material/check_circle:")

# ---- searchable table ----
st.subheader("Entries")
query = st.text_input("Search instruction, input and output", key="data_search",
                      placeholder="e.g. antonym")
rows = [{"#": i, "instruction": e["instruction"], "input": e.get("input", ""), "output": e["output"]}
        for i, e in enumerate(data)]
if query:
    q = query.lower()
    rows = [r for r in rows if q in (r["instruction"] + r["input"] + r["output"]).lower()]
st.caption(f"{len(rows)} of {len(data)} entries")
st.dataframe(figures.frame(rows), hide_index=True, height=280, key="data_table")

# ---- one entry as the model sees it ----
st.subheader("One entry as a prompt")
names = list(PROMPT_STYLES)
c1, c2 = st.columns([1, 3])
state.start_widget("data_style", ss.prompt_style, names)
style = c1.radio("Prompt style", names, key="data_style",
                 help="alpaca is the chapter's format_input; phi3 is exercise 7.1.")
ss.prompt_style = style  # the Batches and Fine-tune pages use it
state.start_widget("data_entry", min(50, len(data) - 1), range(len(data)))
idx = c1.number_input("Entry", 0, len(data) - 1, key="data_entry")
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
cols = st.columns(3)
for col, name in zip(cols, ["train", "val", "test"]):
    col.metric(f"{name} entries", len(parts[name]))
    col.download_button(f"Download {name}.json", json.dumps(parts[name], indent=1, ensure_ascii=False),
                        file_name=f"{name}.json", mime="application/json", key=f"data_dl_{name}")

widgets.code_behind(snippets.data(*loaders.dataset_origin(), style, idx),
                    note=None if kind != SOURCES[2] else "Save the uploaded file beside your notebook first.")
