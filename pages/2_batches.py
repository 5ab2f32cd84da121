"""Batches: one training batch taken apart, the chapter's toy batch and loss demo, pre-training checks."""
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st
import torch

from ui import figures, loaders, snippets, state, widgets
from sft.batching import custom_collate_draft_1, custom_collate_draft_2, custom_collate_fn

state.init_state()
ss = st.session_state
st.title("Batches")
st.caption("Stage 1, steps 2 and 3: pad each batch, shift the targets, mask what must not be learned.")

parts = loaders.splits()
c = st.columns([1, 1, 1, 1, 1, 1.3])
split = c[0].selectbox("Split", ["train", "val", "test"], key="bat_split")
batch_size = c[1].number_input("Batch size", 1, 64, 8, key="bat_size")
seed = c[2].number_input("Seed", 0, 2**31 - 1, 123, key="bat_seed")
data = parts[split]
n_batches = len(data) // batch_size if split == "train" else -(-len(data) // batch_size)
if n_batches == 0:
    st.warning(f"The {split} split has {len(data)} entries: fewer than one batch of {batch_size}.")
    st.stop()
state.start_widget("bat_number", 0, range(n_batches))
number = c[3].number_input(f"Batch (0-{n_batches - 1})", 0, n_batches - 1, key="bat_number")
state.start_widget("bat_maxlen", ss.allowed_max_length)
state.start_widget("bat_mask", ss.mask_instruction)
max_len = c[4].number_input("allowed_max_length", 2, 4096, key="bat_maxlen")
mask = c[5].toggle("Mask instruction", key="bat_mask",
                   help="Exercise 7.2: targets that predict prompt tokens become -100.")
ss.allowed_max_length, ss.mask_instruction = max_len, mask
st.caption(f"{split}: {len(data)} entries, {n_batches} batches; "
           f"{'shuffled with the seed, last partial batch dropped' if split == 'train' else 'in order'}; "
           f"prompt style `{ss.prompt_style}` (chosen on the Data page).")

view = loaders.batch_view(ss.dataset_key, split, number, batch_size, seed, max_len, mask, ss.prompt_style, data)
anatomy = view["anatomy"]
labels = [f"#{i}" for i in view["indices"]]
B, T = anatomy["rows"], anatomy["cols"]
roles = pandas.Series([cell["role"] for cell in anatomy["cells"]]).value_counts()
m = st.columns(4)
m[0].metric("Shape (B, T)", f"({B}, {T})")
m[1].metric("Targets that train", anatomy["tokens_in_loss"])
m[2].metric("Targets set to -100", B * T - anatomy["tokens_in_loss"])
m[3].metric("Padding positions", int(roles.get("padding", 0)))
st.plotly_chart(figures.batch_figure(anatomy, labels), key="bat_grid")
source, duplicates = loaders.dataset_origin()
widgets.code_behind(snippets.batches(split, number, batch_size, seed, max_len, mask, ss.prompt_style, source=source,
                                     duplicates=duplicates))
with st.expander("The tensors (token ids)"):
    st.markdown("**inputs**")
    st.dataframe(figures.frame(view["inputs"]).set_axis(labels), key="bat_inputs")
    st.markdown("**targets**: the inputs shifted one to the left; -100 is ignored by the loss")
    st.dataframe(figures.frame(view["targets"]).set_axis(labels), key="bat_targets")

# ---- the chapter's toy batch, live ----
st.subheader("The chapter's toy batch")
st.caption("Three examples of token ids `[0, 1, 2, 3, 4]`, `[5, 6]`, `[7, 8, 9]` through the collate drafts.")
c = st.columns(3)
pad = c[0].number_input("pad_token_id", 0, 50256, 50256, key="bat_toy_pad")
ignore = c[1].number_input("ignore_index", -1000, 1000, -100, key="bat_toy_ignore")
toy_max = c[2].number_input("allowed_max_length (0 = none)", 0, 10, 0, key="bat_toy_max")
toy = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
draft_in = custom_collate_draft_1(toy, pad_token_id=pad)
d2_in, d2_tg = custom_collate_draft_2(toy, pad_token_id=pad)
f_in, f_tg = custom_collate_fn(toy, pad_token_id=pad, ignore_index=ignore, allowed_max_length=toy_max or None)
st.markdown("**Draft 1**: pad every example to the longest + 1, then drop the last position")
st.code(f"inputs\n{draft_in}", language=None)
st.markdown("**Draft 2**: targets are the inputs shifted one position to the left")
c = st.columns(2)
c[0].code(f"inputs\n{d2_in}", language=None)
c[1].code(f"targets\n{d2_tg}", language=None)
st.markdown("**custom_collate_fn**: every padding target but the first (the end-of-text to learn) becomes "
            "`ignore_index`; `allowed_max_length` cuts both")
c = st.columns(2)
c[0].code(f"inputs\n{f_in}", language=None)
c[1].code(f"targets\n{f_tg}", language=None)

# ---- cross-entropy and ignore_index, live ----
st.subheader("Why -100: cross-entropy skips it")
st.caption("Edit the logits and targets; rows whose target equals ignore_index add nothing to the loss.")
ss.setdefault("bat_ce_rows", [{"logit 0": -1.0, "logit 1": 1.0, "target": 0},
                              {"logit 0": -0.5, "logit 1": 1.5, "target": 1},
                              {"logit 0": -0.5, "logit 1": 1.5, "target": -100}])
table = st.data_editor(figures.frame(ss.bat_ce_rows), num_rows="dynamic", key="bat_ce_table",
                       column_config={"target": st.column_config.NumberColumn(step=1, format="%d")})
table = table.dropna()
ce_ignore = st.number_input("ignore_index for the loss", -1000, 1000, -100, key="bat_ce_ignore")
logits = torch.tensor(table[["logit 0", "logit 1"]].to_numpy(), dtype=torch.float32)  # (N, 2)
targets = torch.tensor(table["target"].to_numpy(), dtype=torch.long)  # (N,)
bad = [int(t) for t in targets if t != ce_ignore and not 0 <= t < 2]
if len(table) == 0 or bad:
    st.warning(f"Targets must be 0 or 1 (two classes) or ignore_index; got {bad or 'no rows'}.")
else:
    # The chapter's own demo calls torch directly; only the numbers on screen come from here.
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ce_ignore)
    every = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ce_ignore, reduction="none")
    st.metric("cross_entropy(logits, targets, ignore_index)", f"{loss.item():.4f}")
    st.caption("Per row: " + ", ".join(f"{v:.4f}" for v in every.tolist())
               + f" (rows with target {ce_ignore} give 0 and do not count in the mean).")

# ---- pre-training checks ----
st.subheader("Before training: checks on every example")
report = loaders.pretraining_checks(ss.dataset_key, split, max_len, mask, ss.prompt_style, data)
if report["ok"]:
    st.success(f"All {report['n_examples']} {split} examples look right: each keeps exactly one end-of-text "
               f"target to learn, none is wholly masked, none is cut by allowed_max_length {max_len}. "
               f"{report['tokens_in_loss']} targets train in all.", icon=":material/check_circle:")
else:
    st.error(f"{len(report['problems'])} problem(s) in the {split} split:", icon=":material/warning:")
    first = lambda ids: ", ".join(map(str, ids[:10])) + (" …" if len(ids) > 10 else "")  # noqa: E731
    if report["truncated"]:
        st.markdown(f"- **{len(report['truncated'])} examples are cut to {max_len} tokens** and lose part of "
                    "their response (table below).")
    if report["not_one_eot"]:
        st.markdown(f"- **{len(report['not_one_eot'])} examples do not keep exactly one end-of-text target**, so "
                    f"the model would not learn where to stop on them (examples {first(report['not_one_eot'])}).")
    if report["wholly_masked"]:
        st.markdown(f"- **{len(report['wholly_masked'])} examples have every target masked** and teach nothing "
                    f"(examples {first(report['wholly_masked'])}).")
    if report["truncated"]:
        st.dataframe(figures.frame(report["truncated"]), hide_index=True, key="bat_truncated")
    with st.expander("Every problem, one line each"):
        st.text("\n".join(report["problems"]))
