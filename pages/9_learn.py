"""Learn: where the loss comes from, token by token, under the base model and a fine-tuned run."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from sft.studio.token_loss import compare_examples, explain_example, role_summary
from ui import chat, learn, loaders, snippets, state, widgets

state.init_state()
ss = st.session_state
st.title("Learn: where the loss comes from")
st.caption("The chapter's loss is one number, the mean cross-entropy of every target that is not -100. Here it "
           "is taken apart: each token is coloured by the loss of the token it must predict next, through the same "
           "collate and masks the training used, so what you see is what was trained. Hover a token for the "
           "model's top-5 guesses.")

choices = chat.model_choices()
labels = list(choices)
runs = [lab for lab in labels if lab.startswith("run: ")]
c = st.columns(2)
state.start_widget("learn_tuned", next((lab for lab in runs if lab == f"run: {ss.run_name}"), labels[0]), labels)
tuned_label = c[0].selectbox("Model", labels, key="learn_tuned", help="Usually a fine-tuned run.")
base_label = c[1].selectbox("Compared with (optional)", ["(none)"] + labels, key="learn_base",
                            help="Usually the base model the run started from.")
tuned, style, caption = chat.load(choices[tuned_label])
c[0].caption(caption)
config = choices[tuned_label][1].config if choices[tuned_label][0] == "run" else None
mask = config.mask_instruction if config else ss.mask_instruction
max_len = min(config.allowed_max_length if config else ss.allowed_max_length, tuned.pos_emb.num_embeddings)
st.caption(f"As trained: prompt style `{style}`, instruction masking {'on' if mask else 'off'}, "
           f"allowed_max_length {max_len}.")

parts = loaders.splits()
c = st.columns([1, 1, 3])
split = c[0].selectbox("Split", ["val", "test", "train"], key="learn_split")
data = parts[split]
if not data:
    st.warning(f"The {split} split is empty.")
    st.stop()
index = c[1].number_input(f"Example (0-{len(data) - 1})", 0, len(data) - 1, 0, key="learn_index")
entry = data[index]
c[2].markdown(f"**{entry['instruction']}**" + (f"  \n*Input:* {entry['input']}" if entry.get("input") else ""))
settings = dict(prompt_style=style, mask_instruction=mask, allowed_max_length=max_len)
cells = explain_example(tuned, entry, loaders.tokenizer(), **settings)
trained = [x for x in cells if x["in_loss"]]
m = st.columns(3)
m[0].metric("Mean loss of this example", f"{sum(x['loss'] for x in trained) / len(trained):.3f}")
m[1].metric("Targets that train", len(trained))
m[2].metric("Targets set to -100", sum(1 for x in cells if not x["in_loss"] and x["role"] != "padding"))
big = state.presenting()  # the sidebar's projector setting: larger tokens and legends
st.html(learn.legend_html(presenting=big))
st.html(learn.token_html(cells, presenting=big))
with st.expander("Every position as a table"):
    st.dataframe(learn.cells_frame(cells), hide_index=True, key="learn_table")
choice = choices[tuned_label]
source, duplicates = loaders.dataset_origin()
widgets.code_behind(snippets.learn(("run", choice[1].path) if choice[0] == "run" else choice, split, index,
                                   source=source, duplicates=duplicates, models_dir=str(state.models_dir()),
                                   **settings))

if base_label != "(none)":
    base, _, base_caption = chat.load(choices[base_label])
    st.subheader("What fine-tuning changed")
    st.caption(f"Against **{base_label}** ({base_caption}): each token coloured by how much more (blue) or less "
               "(orange) likely the tuned model makes its next token, as a change in log-probability.")
    rows = compare_examples(base, tuned, entry, loaders.tokenizer(), **settings)
    st.html(learn.legend_html(change=True, presenting=big))
    st.html(learn.token_html(rows, change=True, presenting=big))
    st.markdown("**Side by side**, each token coloured by its loss (the legend above the first view):")
    side = st.columns(2)
    for col, label, model in ((side[0], base_label, base), (side[1], tuned_label, tuned)):
        col.caption(label)
        with col:
            st.html(learn.token_html(explain_example(model, entry, loaders.tokenizer(), **settings), presenting=big))

st.subheader(f"Over the whole {split} split: mean loss by role")
st.caption("Which part of the examples the model finds hard. Every target is measured, the -100 ones too: with "
           "instruction masking on, the instruction's targets are not trained, and their loss shows it.")
if st.button("Compute", key="learn_roles"):
    models = {tuned_label: tuned} | ({base_label: base} if base_label != "(none)" else {})
    with st.spinner(f"Scoring {len(data)} examples…"):
        ss.learn_summary = {label: role_summary(model, data, loaders.tokenizer(), **settings)
                            for label, model in models.items()}
if ss.get("learn_summary"):
    st.plotly_chart(learn.roles_figure(ss.learn_summary), key="learn_roles_plot")
