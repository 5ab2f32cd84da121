"""Chat: talk to a base GPT-2 or a fine-tuned run, one message at a time, the answer streamed as it is written."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import streamlit as st

from sft.prompts import PROMPT_STYLES
from sft.studio.config import TrainConfig
from ui import chat, export, snippets, state, widgets

state.init_state()
ss = st.session_state
st.title("Chat")
st.caption("Talk to a model. GPT-2 fine-tuned as in chapter 7 is **single-turn**: it learnt to answer one "
           "instruction (and an optional input) at a time, so each message is answered on its own, with no memory "
           "of the ones before. The history below is only kept for you, in this browser session.")
ss.setdefault("chat_history", [])
for entry in ss.chat_history:  # a rerun (Stop, a widget, a refresh) ended a reply being written
    for reply in entry["replies"]:
        if reply["state"] == "streaming":
            reply["state"] = "stopped"

# ---- who answers, and how ----
choices = chat.model_choices()
labels = list(choices)
c = st.columns([3, 1])
state.start_widget("chat_model", next((lab for lab in labels if lab == f"run: {ss.run_name}"), labels[0]), labels)
first = c[0].selectbox("Model", labels, key="chat_model", help="A fine-tuned run, or a base model downloaded here.")
two = c[1].toggle("Side by side", key="chat_two", help="Two models answer the same message at once.")
picked = [first]
if two:
    rest = [lab for lab in labels if lab != first] or labels
    picked.append(st.selectbox("Second model", rest, key="chat_model_2"))
loaded = [chat.load(choices[lab]) for lab in picked]
for label, (_, style, caption) in zip(picked, loaded):
    st.caption(f"**{label}**: {caption}; trained with prompt style `{style}`.")
d = TrainConfig()
c = st.columns(4)
styles = sorted(PROMPT_STYLES)
state.start_widget("chat_style", loaded[0][1], styles)
style = c[0].selectbox("Prompt style", styles, key="chat_style", help="Use the one the model was trained with.")
max_new = c[1].number_input("Max new tokens", 1, 1024, min(d.response_tokens, 200), key="chat_max_new")
temperature = c[2].number_input("Temperature (0 = greedy)", 0.0, 5.0, 0.0, step=0.1, key="chat_temp")
top_k = c[3].number_input("Top-k (0 = off)", 0, 50257, 0, key="chat_top_k")
settings = {"max_new_tokens": int(max_new), "temperature": float(temperature), "top_k": int(top_k) or None}

# ---- the history ----
for n, entry in enumerate(ss.chat_history):
    with st.container(border=True):
        st.markdown(f"**You:** {entry['instruction']}" + (f"  \n*Input:* {entry['input']}" if entry["input"] else ""))
        with st.expander("The exact prompt the model received"):
            st.code(entry["prompt"], language=None, wrap_lines=True)
        for col, (i, reply) in zip(st.columns(len(entry["replies"])), enumerate(entry["replies"])):
            col.markdown(f"*{reply['model']}*" + (" (stopped)" if reply["state"] == "stopped" else ""))
            col.code(reply["text"] or "(no answer)", language=None, wrap_lines=True)  # with a copy button
            if col.button("Save as a test case", key=f"chat_save_{n}_{i}", disabled=not reply["text"]):
                path, count = chat.save_test_case(entry, reply)
                col.success(f"Saved to `{path}` ({count} test cases): the Compare and Judge pages can read it.")

# ---- a new message ----
with st.form("chat_form", clear_on_submit=True):
    instruction = st.text_area("Instruction", key="chat_instruction", placeholder="Rewrite the sentence using a simile.")
    input_text = st.text_input("Input (optional)", key="chat_input", placeholder="The car is very fast.")
    sent = st.form_submit_button("Send", type="primary", key="chat_send")
if sent and instruction.strip():
    entry = chat.new_entry(instruction.strip(), input_text.strip(), style, picked)
    ss.chat_history.append(entry)
    st.markdown(f"**You:** {entry['instruction']}")
    st.button("Stop", key="chat_stop", icon=":material/stop:", help="Ends the answer here; what was written stays.")
    columns = st.columns(len(picked))
    for col, label in zip(columns, picked):
        col.markdown(f"*{label}*")
    chat.answer(entry, [m for m, _, _ in loaded], settings, columns)
    st.rerun()  # draw it in the history, with its buttons
elif sent:
    st.warning("Type an instruction first.")
if ss.chat_history:
    st.download_button("Download this conversation (JSON)", chat.history_json(ss.chat_history),
                       file_name="chat.json", mime="application/json", key="chat_download")

last = ss.chat_history[-1] if ss.chat_history else {"instruction": "Rewrite the sentence using a simile.",
                                                     "input": "The car is very fast."}
first_choice = choices[picked[0]]
widgets.code_behind(snippets.chat(("run", first_choice[1].path) if first_choice[0] == "run" else first_choice,
                                  last["instruction"], last["input"], style, models_dir=state.models_dir(), **settings),
                    note=f"These lines answer {'your last message' if ss.chat_history else 'a message'} with "
                         f"**{picked[0]}** and the settings above (greedy: the same answer).")

# ---- take it elsewhere ----
with st.expander("Export this model for transformers, llama.cpp and Ollama", icon=":material/ios_share:"):
    export.section(picked[0], choices[picked[0]], style)
