"""SFT Studio: `streamlit run app.py`.

This file frames every page: it lists them with st.navigation and draws Home, the chapter's
three-stage pipeline with what this machine has to run it.
"""
import streamlit as st

st.set_page_config(page_title="SFT Studio", page_icon=":material/school:", layout="wide")
from ui import boot  # noqa: E402  first: a cold server's first visitor sees that it is starting

from ui import loaders, state, widgets  # noqa: E402  (imports torch)

boot.done()
st.set_option("client.showSidebarNavigation", True)  # config.toml hides it only for the legacy pages/ mode
state.init_state()
widgets.presenting_toggle()  # kept across pages and reloads; the Batches and Learn views read it


def home():
    st.title("SFT Studio")
    st.write(
        "Instruction fine-tuning of GPT-2, step by step, as chapter 7 of *Build a Large Language Model "
        "(From Scratch)* does it: prepare a dataset of instructions, fine-tune a pretrained model on it, "
        "then evaluate what it answers."
    )
    stages = [
        ("Stage 1: preparing the dataset",
         ["1. Download and format the instruction data", "2. Batch it: padding, targets, masking",
          "3. Create the data loaders"],
         [(PAGES["data"], "Data"), (PAGES["batches"], "Batches")]),
        ("Stage 2: fine-tuning the LLM",
         ["4. Load a pretrained GPT-2", "5. Fine-tune it on the instructions", "6. Watch the loss"],
         [(PAGES["finetune"], "Fine-tune")]),
        ("Stage 3: evaluating the LLM",
         ["7. Extract the responses", "8. Compare them by eye", "9. Score them with a judge model"],
         [(PAGES["compare"], "Compare"), (PAGES["judge"], "Judge"), (PAGES["chat"], "Chat")]),
    ]
    for col, (title, steps, links) in zip(st.columns(3), stages):
        with col.container(border=True):
            st.subheader(title)
            st.markdown("\n".join(steps))
            for page, label in links:
                st.page_link(page, label=f"Open {label}", icon=":material/arrow_forward:")

    st.subheader("This machine")
    dev = loaders.device_info()
    c1, c2, c3 = st.columns(3)
    with c1.container(border=True):
        st.markdown("**Device**")
        for d in dev["devices"]:
            st.write(f"`{d['id']}`: {d['name']}")
    with c2.container(border=True):
        st.markdown("**GPT-2 weights downloaded**")
        for name, source in loaders.weights_status().items():
            mark = ":material/check_circle:" if source else ":material/radio_button_unchecked:"
            st.write(f"{mark} {name}" + (f" ({source})" if source else ": not downloaded"))
        st.caption(f"Folder: `{state.models_dir()}`. Download on the Fine-tune page.")
    with c3.container(border=True):
        ss = st.session_state  # the judge the Judge page uses (kept in the workspace), else Ollama's default
        backend, url = ss.get("judge_backend") or "ollama", ss.get("judge_url") or state.ollama_url()
        st.markdown("**Judge server** (" + ("Ollama" if backend == "ollama" else "OpenAI-compatible") +
                    f", model `{ss.get('judge_model') or 'llama3'}`)")
        status = loaders.judge_status(backend, url)
        if status["ok"]:
            models = ", ".join(status["models"]) or "no models pulled yet"
            st.write(f":material/check_circle: answers at `{url}`: {models}")
        else:
            st.write(f":material/cancel: not reachable at `{url}`")
            st.caption(status["error"] or "Start it with `ollama serve` to score answers on the Judge page.")
        st.caption("Set on the Judge page.")


PAGES = {
    "home": st.Page(home, title="Home", icon=":material/home:", default=True),
    "data": st.Page("pages/1_data.py", title="Data", icon=":material/dataset:"),
    "batches": st.Page("pages/2_batches.py", title="Batches", icon=":material/grid_on:"),
    "finetune": st.Page("pages/3_finetune.py", title="Fine-tune", icon=":material/model_training:"),
    "compare": st.Page("pages/4_compare.py", title="Compare", icon=":material/compare:"),
    "judge": st.Page("pages/5_judge.py", title="Judge", icon=":material/gavel:"),
    "chat": st.Page("pages/6_chat.py", title="Chat", icon=":material/chat:"),
    "preference": st.Page("pages/7_preference.py", title="Preference", icon=":material/thumbs_up_down:"),
    "experiments": st.Page("pages/8_experiments.py", title="Experiments", icon=":material/science:"),
    "learn": st.Page("pages/9_learn.py", title="Learn", icon=":material/school:"),
}
st.navigation(list(PAGES.values())).run()
