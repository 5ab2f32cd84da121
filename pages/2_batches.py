"""Batches: one training batch taken apart, how each target is the next input, why -100, the chapter's toy
batch, and the checks on every example. Laid out for a projector at 1280x720: the controls and the grid on
the first screen, the -100 demo right below."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st
import torch

from ui import checks, figures, loaders, snippets, state, widgets
from sft.batching import IGNORE_INDEX, custom_collate_draft_1, custom_collate_draft_2, custom_collate_fn

state.init_state()
ss = st.session_state
SPLITS = ["train", "val", "test"]
for key, value in {"batch_split": "train", "batch_size": 8, "batch_seed": 123}.items():
    ss.setdefault(key, value)  # plain keys, kept in the workspace (ui.workspace restores them on a reload)
# For a projector at 1280x720: less empty space above the title, smaller metric values, so the grid is on screen.
st.html("<style>[data-testid=stMainBlockContainer]{padding-top:2.5rem}"
        "[data-testid=stMetricValue]{font-size:1.75rem}</style>")
head = st.columns([1, 3], vertical_alignment="bottom")
head[0].title("Batches")
head[1].caption("Stage 1, steps 2 and 3: pad each batch, shift the targets, mask what must not be learned.")

parts = loaders.splits()
# Widths chosen so every label and the number inputs' +/- buttons show whole at 1280x720 (tests/browser).
c = st.columns([0.85, 1.3, 1.3, 1.3, 1.35, 1.65], gap="xsmall", vertical_alignment="bottom")
state.start_widget("bat_split", ss.batch_split, SPLITS)
split = c[0].selectbox("Split", SPLITS, key="bat_split")
state.start_widget("bat_size", int(ss.batch_size), range(1, 65))
batch_size = c[1].number_input("Batch size", 1, 64, key="bat_size")
state.start_widget("bat_seed", int(ss.batch_seed))
seed = c[2].number_input("Seed", 0, 2**31 - 1, key="bat_seed")
state.start_widget("bat_maxlen", int(ss.allowed_max_length))
state.start_widget("bat_mask", bool(ss.mask_instruction))
max_len = c[4].number_input("allowed_max_length", 2, 4096, key="bat_maxlen")
mask = c[5].toggle("Mask instruction", key="bat_mask",
                   help="Exercise 7.2: targets that predict prompt tokens become -100.")
chosen = {"batch_split": split, "batch_size": batch_size, "batch_seed": seed, "allowed_max_length": max_len,
          "mask_instruction": mask}
changed = {key: value for key, value in chosen.items() if ss.get(key) != value}
if changed:  # the Fine-tune page trains with allowed_max_length and masking; a reload finds all of them
    state.remember(**changed)
data = parts[split]
n_batches = len(data) // batch_size if split == "train" else -(-len(data) // batch_size)
if n_batches == 0:
    st.warning(f"The {split} split has {len(data)} entries: fewer than one batch of {batch_size}.")
    st.stop()
state.start_widget("bat_number", 0, range(n_batches))
number = c[3].number_input(f"Batch (0-{n_batches - 1})", 0, n_batches - 1, key="bat_number")
report = loaders.pretraining_checks(ss.dataset_key, split, max_len, mask, ss.prompt_style, data)
if not report["ok"]:
    st.warning(f"With these settings {report['n_affected']} of {report['n_examples']} {split} examples have "
               "problems: see **Before training** at the end of the page.", icon=":material/warning:")

view = loaders.batch_view(ss.dataset_key, split, number, batch_size, seed, max_len, mask, ss.prompt_style, data)
anatomy = view["anatomy"]
labels = [f"#{i}" for i in view["indices"]]
B, T = anatomy["rows"], anatomy["cols"]
n_padding = sum(cell["role"] == "padding" for cell in anatomy["cells"])
m = st.columns([1, 1, 1, 1, 1.25], vertical_alignment="center")
m[0].metric("Shape (B, T)", f"({B}, {T})")
m[1].metric("Targets that train", anatomy["tokens_in_loss"])
m[2].metric("Targets set to -100", B * T - anatomy["tokens_in_loss"])
m[3].metric("Padding positions", n_padding)
with m[4].popover("Zoom", icon=":material/zoom_in:", width="stretch"):
    st.caption(f"At {figures.TEXT_COLUMNS} positions or fewer every cell shows its token and its target.")
    rows = st.slider("Rows", 0, B - 1, (0, B - 1), key=f"bat_zoom_rows_{B}") if B > 1 else (0, 0)
    first_col = max(0, T - figures.TEXT_COLUMNS) if T > figures.TEXT_COLUMNS else 0
    positions = st.slider("Positions", 0, T - 1, (0, T - 1), key=f"bat_zoom_cols_{T}") if T > 1 else (0, 0)
    st.button("Show the last 20 positions", key="bat_zoom_end", on_click=ss.__setitem__,
              args=(f"bat_zoom_cols_{T}", (first_col, T - 1)), disabled=T <= 1)
st.plotly_chart(figures.batch_figure(anatomy, labels, rows=range(rows[0], rows[1] + 1), positions=positions,
                                     presenting=state.presenting()), key="bat_grid")
st.caption(f"{split}: {len(data)} entries, {n_batches} batches; "
           f"{'shuffled with the seed, last partial batch dropped' if split == 'train' else 'in order'}; "
           f"prompt style `{ss.prompt_style}` (chosen on the Data page). Hover a cell for its token and target; "
           f"**Zoom** to {figures.TEXT_COLUMNS} positions or fewer to read them in the cells.")
st.markdown(figures.ignored_explanation(anatomy, labels))

# ---- why -100 ----
st.subheader("Why -100: cross-entropy skips it")
left, right = st.columns([1.3, 1], gap="large")
left.markdown(f"`{IGNORE_INDEX}` is the default `ignore_index` of PyTorch's `torch.nn.functional.cross_entropy`: "
              "a target equal to it adds nothing to the loss and is left out of the mean. Edit the logits and "
              "targets:")
ss.setdefault("bat_ce_rows", [{"logit 0": -1.0, "logit 1": 1.0, "target": 0},
                              {"logit 0": -0.5, "logit 1": 1.5, "target": 1},
                              {"logit 0": -0.5, "logit 1": 1.5, "target": -100}])
table = left.data_editor(figures.frame(ss.bat_ce_rows), num_rows="dynamic", key="bat_ce_table",
                         column_config={"target": st.column_config.NumberColumn(step=1, format="%d")})
table = table.dropna()
ce_ignore = right.number_input("ignore_index for the loss", -1000, 1000, IGNORE_INDEX, key="bat_ce_ignore")
logits = torch.tensor(table[["logit 0", "logit 1"]].to_numpy(), dtype=torch.float32)  # (N, 2)
targets = torch.tensor(table["target"].to_numpy(), dtype=torch.long)  # (N,)
bad = [int(t) for t in targets if t != ce_ignore and not 0 <= t < 2]
if len(table) == 0 or bad:
    right.warning(f"Targets must be 0 or 1 (two classes) or ignore_index; got {bad or 'no rows'}.")
else:
    # The chapter's own demo calls torch directly; only the numbers on screen come from here.
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ce_ignore)
    every = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ce_ignore, reduction="none")
    right.metric("cross_entropy(logits, targets, ignore_index)", f"{loss.item():.4f}")
    right.caption("Per row: " + ", ".join(f"{v:.4f}" for v in every.tolist())
                  + f" (rows with target {ce_ignore} give 0 and do not count in the mean).")

# ---- one row: each target is the next input ----
st.subheader("Each target is the next input")
ends = [next((c["col"] for c in anatomy["cells"] if c["row"] == r and figures.target_class(c) == "eot"), T - 1)
        for r in range(B)]
shorter = [r for r in range(B) if any(c["row"] == r and c["role"] == "end-of-text" for c in anatomy["cells"])]
state.start_widget("bat_align_row", shorter[0] if shorter else 0, range(B))
a = st.columns([1, 1, 2], vertical_alignment="bottom")
row = a[0].selectbox("Example row", range(B), format_func=labels.__getitem__, key="bat_align_row")
width = min(figures.ALIGN_COLUMNS, T)
start = a[1].number_input(f"From position (0-{T - width})", 0, T - width, max(0, min(ends[row] - 7, T - width)),
                          key=f"bat_align_start_{row}_{T}")
a[2].caption(f"Row {labels[row]}: each arrow goes from input j+1 to target j. Its end-of-text target (E) is at "
             f"position {ends[row]}; every target after it is -100 (×).")
st.plotly_chart(figures.alignment_figure(anatomy, row, (start, start + width - 1)), key="bat_align",
                config={"displayModeBar": False})

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
ignore = c[1].number_input("ignore_index", -1000, 1000, IGNORE_INDEX, key="bat_toy_ignore")
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

# ---- pre-training checks ----
st.subheader("Before training: checks on every example")
if report["ok"]:
    st.success(f"All {report['n_examples']} {split} examples look right: each keeps exactly one end-of-text "
               f"target to learn, none is wholly masked, none is cut by allowed_max_length {max_len}. "
               f"{report['tokens_in_loss']} targets train in all.", icon=":material/check_circle:")
else:
    st.error(checks.report_header(report, split, max_len, mask), icon=":material/warning:")
    st.markdown(checks.report_lines(report, split))
    if report["truncated"]:
        st.dataframe(figures.frame(report["truncated"]), hide_index=True, key="bat_truncated")
    with st.expander("Every example with a problem, one line each"):
        st.text("\n".join(report["problems"]))
