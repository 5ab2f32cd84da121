"""The Preference page's helpers: the pairs, a word-level diff, the collated pair drawn cell by cell, the
runs it can start from, and the DPO curves. The collate (``sft.dpo.custom_collate_fn``) pads and masks;
this module only reads what it gives."""
import difflib
import html

import plotly.graph_objects as go
import streamlit as st

from sft.dpo import PreferenceDataset, custom_collate_fn, identical_pairs, load_preference_data
from sft.studio.dpo_config import is_dpo
from sft.studio.locks import DeviceBusyError
from sft.studio.runs import ACTIVE_STATES, RunError

from .figures import _discrete_scale, _legend_entry, fmt_seconds, token_label
from .loaders import open_run, tokenizer

# What a cell of the collated pair is (Okabe and Ito's palette, as the Batches page).
PAIR_ROLES = {"prompt": "#56B4E9", "↵↵ after the prompt": "#009E73", "chosen: ### Response:↵ + answer": "#0072B2",
              "rejected: ### Response:↵ + answer": "#D55E00", "padding": "#E8E8E8"}
MASK_CLASSES = {"kept: scored by log p": "#E69F00", "dropped (mask False)": "#BDBDBD"}
REWARD_NOTE = (
    "**Why the chosen reward can fall while the margin grows.** A reward is the policy's mean log-probability "
    "of an answer minus the reference's. The DPO loss only asks that the *chosen* answer gain on the "
    "*rejected* one: -log σ(β · (chosen reward − rejected reward)). Both log-probabilities can fall (the policy "
    "moves probability to answers in neither set), and the loss still falls as long as the rejected one falls "
    "faster: the margin grows while the chosen reward goes below 0. That is what the notebook's curves show too.")


@st.cache_data(show_spinner="Loading the preference pairs…")
def pairs(identical="keep") -> list:
    """The book's 1100 pairs (identical pairs kept or dropped)."""
    return load_preference_data(None, identical=identical)


def identical_count() -> int:
    return len(identical_pairs(pairs("keep")))


def word_diff_html(chosen: str, rejected: str) -> str:
    """The rejected answer against the chosen, word by word: removed words struck in red, added in green."""
    a, b = chosen.split(), rejected.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape(" ".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(f"<del style='background:#fbe3e4;color:#a00'>{html.escape(' '.join(a[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins style='background:#e3f6e3;color:#060;text-decoration:none'>"
                       f"{html.escape(' '.join(b[j1:j2]))}</ins>")
    return " ".join(out) or "(both empty)"


def pair_anatomy(entries: list, allowed_max_length=None, mask_prompt_tokens=True) -> dict:
    """The collated batch of ``entries`` as cells: per pair a chosen and a rejected row, each position's token,
    its role and whether the collate's mask keeps it."""
    tok = tokenizer()
    dataset = PreferenceDataset(entries, tok)
    items = [dataset[i] for i in range(len(dataset))]
    batch = custom_collate_fn(items, allowed_max_length=allowed_max_length, mask_prompt_tokens=mask_prompt_tokens)
    rows, cells = [], []
    for b, item in enumerate(items):
        for key in ("chosen", "rejected"):
            r = len(rows)
            rows.append(f"pair {b + 1} {key}")
            ids, mask = batch[key][b].tolist(), batch[f"{key}_mask"][b].tolist()
            for j, (token, keep) in enumerate(zip(ids, mask)):
                role = ("prompt" if j < len(item["prompt"]) else "↵↵ after the prompt" if j < len(item["prompt"]) + 2
                        else f"{key}: ### Response:↵ + answer" if j < len(item[key]) else "padding")
                cells.append({"row": r, "col": j, "token_id": token, "role": role, "kept": bool(keep),
                              "token_text": tok.decode([token]) if role != "padding" else "pad"})
    return {"rows": rows, "cols": batch["chosen"].shape[1], "cells": cells,
            "kept": {rows[i]: sum(c["kept"] for c in cells if c["row"] == i) for i in range(len(rows))}}


def pair_figure(anatomy: dict, positions=None) -> go.Figure:
    """The pair's rows coloured by role, above what the masks keep (the tokens whose log-probability counts)."""
    from plotly.subplots import make_subplots

    first, last = positions or (0, anatomy["cols"] - 1)
    cols = list(range(first, last + 1))
    zoomed = len(cols) <= 20
    grid = {(c["row"], c["col"]): c for c in anatomy["cells"]}
    roles, classes = list(PAIR_ROLES), list(MASK_CLASSES)
    z_role, z_mask, text, hover = [], [], [], []
    for r in range(len(anatomy["rows"])):
        line = [grid[(r, j)] for j in cols]
        z_role.append([roles.index(c["role"]) for c in line])
        z_mask.append([0 if c["kept"] else 1 for c in line])
        text.append([token_label(c["token_text"]) if zoomed else "" for c in line])
        hover.append([f"{anatomy['rows'][r]}, position {c['col']}<br>token {c['token_id']} {c['token_text']!r}"
                      f"<br>{c['role']}<br>mask: {'kept' if c['kept'] else 'dropped'}" for c in line])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.16)
    for row, z, colors, labels in ((1, z_role, list(PAIR_ROLES.values()), text),
                                   (2, z_mask, list(MASK_CLASSES.values()), [["×" if v else "" for v in line]
                                                                            for line in z_mask])):
        fig.add_trace(go.Heatmap(z=z, x=cols, y=anatomy["rows"], text=labels, texttemplate="%{text}",
                                 customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                                 colorscale=_discrete_scale(colors), zmin=0, zmax=len(colors), showscale=False,
                                 xgap=1, ygap=1), row=row, col=1)
    present = {c["role"] for c in anatomy["cells"]}
    for role in roles:
        if role in present:
            _legend_entry(fig, role, PAIR_ROLES[role], "legend")
    for name, color in MASK_CLASSES.items():
        _legend_entry(fig, name, color, "legend2")
    legend = dict(orientation="h", yanchor="bottom", x=0, xanchor="left", itemclick=False, itemdoubleclick=False)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_xaxes(title_text="position", row=2, col=1)
    fig.update_layout(height=140 + 2 * (30 if zoomed else 22) * len(anatomy["rows"]), plot_bgcolor="white",
                      margin=dict(l=10, r=10, t=28, b=6),
                      legend={**legend, "y": 1.0, "title_text": "<b>ids</b>, by role:"},
                      legend2={**legend, "y": 0.42, "title_text": "<b>masks</b> (chosen_mask, rejected_mask):"})
    return fig


def start_runs(runs) -> list:
    """Finished instruction runs a DPO run can start from (their final weights exist)."""
    return [r for r in runs if not r.is_broken and not is_dpo(r.config) and r.model_path.is_file()]


def dpo_runs(runs) -> list:
    return [r for r in runs if not r.is_broken and is_dpo(r.config)]


def curves(evals: list, steps: list):
    """(loss figure, rewards figure) against steps: the evaluations' train and validation values, each step's faint."""
    loss = go.Figure()
    if steps:
        loss.add_trace(go.Scatter(x=[e["step"] for e in steps], y=[e.get("loss") for e in steps], mode="lines",
                                  name="loss of each step", line=dict(color="#bbbbbb", width=1)))
    for key, name, dash in (("train_loss", "Training loss", None), ("val_loss", "Validation loss", "dashdot")):
        loss.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e.get(key) for e in evals], mode="lines+markers",
                                  name=name, line=dict(dash=dash)))
    loss.add_hline(y=0.6931, line_dash="dot", line_color="#999", annotation_text="ln 2: policy = reference")
    rewards = go.Figure()
    for key, name, color in (("chosen_reward", "chosen reward", "#0072B2"),
                             ("rejected_reward", "rejected reward", "#D55E00"), ("margin", "margin", "#009E73")):
        for split, dash in (("train", None), ("val", "dashdot")):
            rewards.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e.get(f"{split}_{key}") for e in evals],
                                         mode="lines+markers", name=f"{split} {name}",
                                         line=dict(color=color, dash=dash)))
    for fig, title in ((loss, "DPO loss"), (rewards, "reward (policy − reference mean log-prob)")):
        fig.update_layout(xaxis_title="step", yaxis_title=title, height=340, margin=dict(l=10, r=10, t=30, b=10),
                          legend=dict(orientation="h", y=1.15))
    return loss, rewards


def watch(name: str, polling: bool):
    """The DPO run ``name``, live while ``polling``: progress, the last evaluation's rewards, the reference's
    cache, Stop and Resume, the loss and reward curves with the note."""
    st.fragment(run_every=1.5 if polling else None)(_live)(name, polling)


def _live(name, polling):
    run = open_run(name)
    status = run.status()
    if polling and status.get("state") not in ACTIVE_STATES:
        st.rerun()  # it ended: redraw once, with polling off
    now, p = status.get("state"), status.get("progress") or {}
    evals = run.read_metrics("eval")
    total = p.get("total_steps")
    bar = f"**{now}**" + (f": step {p.get('step', -1) + 1} of {total}" if total else "")
    st.progress(min(p.get("progress", 0.0), 1.0), text=bar)
    last = evals[-1] if evals else {}
    c = st.columns(6)
    for col, (label, value) in zip(c, [("Val loss", last.get("val_loss")), ("Val margin", last.get("val_margin")),
                                       ("Val chosen reward", last.get("val_chosen_reward")),
                                       ("Val rejected reward", last.get("val_rejected_reward"))]):
        col.metric(label, "–" if value is None else f"{value:.3f}")
    c[4].metric("Elapsed", fmt_seconds(p.get("elapsed")))
    c[5].metric("ETA", fmt_seconds(p.get("eta")) if now in ACTIVE_STATES else "–")
    for ref in run.read_metrics("reference")[-1:]:
        st.caption(f"Reference log-probabilities of {ref['examples']} pairs: {ref['how']} ({ref['seconds']:.1f} s). "
                   f"Each step runs the reference 0 times (the notebook: twice), and no second model is held: "
                   f"**{ref['reference_copy_mb_saved']:,.0f} MB** the notebook's frozen copy would take.")
    _controls(run, now)
    if now == "failed":
        st.error(f"Failed: {status.get('error')}", icon=":material/error:")
    loss, rewards = curves(evals, run.read_metrics("step"))
    c = st.columns(2)
    c[0].plotly_chart(loss, key="pref_loss")
    c[1].plotly_chart(rewards, key="pref_rewards")
    st.markdown(REWARD_NOTE)
    if now == "completed":
        st.success(f"Done: `{run.model_path}`. Compare shows its answers beside the run it started from; Judge "
                   "scores them.", icon=":material/check_circle:")


def _controls(run, now):
    """Stop while it trains; Resume once it stopped (or failed) with a checkpoint."""
    from sft.studio.worker import launch_worker  # looked up at each call (tests replace it)

    if now in ("starting", "running") and st.button("Stop (keeps the checkpoint)", key="pref_stop"):
        run.request_stop()
        st.rerun()
    if now in ("stopped", "failed") and run.has_checkpoint and st.button("Resume from the checkpoint",
                                                                           key="pref_resume"):
        try:
            launch_worker(run, resume=True)
        except (RunError, DeviceBusyError) as exc:
            st.error(str(exc))
        else:
            st.rerun()
