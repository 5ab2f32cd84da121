"""The Fine-tune page's "watch the answer form" view: a slider through the answers taken at evaluations
(``sft.studio.snapshots``), the answers at that point, and the loss curve with that point marked."""
import plotly.graph_objects as go
import streamlit as st

from sft.studio.snapshots import snapshot_cost

from . import figures

SCRUB_KEY = "ft_snap_scrub"


def marked_loss_figure(evals, steps, x, snap) -> go.Figure:
    """``figures.loss_figure`` with ``snap``'s evaluation marked: a line across and a ring on its validation loss."""
    fig = figures.loss_figure(evals, steps, x)
    if snap is not None:
        where = snap.get(figures.X_AXES[x])
        fig.add_vline(x=where, line_dash="dot", line_color="#555")
        fig.add_trace(go.Scatter(x=[where], y=[snap.get("val_loss")], mode="markers", name="this snapshot",
                                 marker=dict(size=16, symbol="circle-open", color="#d55e00",
                                             line=dict(width=3, color="#d55e00"))))
    return fig


def shown_text(answer):
    """An answer as the view prints it; an empty one says why (whitespace, or end-of-text at once)."""
    if answer["response"]:
        return answer["response"]
    return "(no answer: end-of-text came first)" if not answer.get("tokens") else "(only spaces and new lines)"


def _scrub(snaps, run_name):
    """The index chosen on the slider. While a run trains new snapshots come: the slider follows the
    latest unless a person moved it back (kept per run, across the page's polling)."""
    ss, n = st.session_state, len(snaps)
    value, last = ss.get(SCRUB_KEY), ss.get("ft_snap_drawn")  # last: (run, index, snapshots) when last drawn
    same_run = last is not None and last[0] == run_name
    moved = same_run and value != last[1]  # this rerun is the slider's own
    at_latest = not same_run or last[1] >= last[2] - 1
    if value is None or value >= n or (at_latest and not moved):
        ss[SCRUB_KEY] = n - 1
    if n == 1:
        ss[SCRUB_KEY] = 0
        chosen = 0
    else:
        chosen = st.select_slider("Snapshot", list(range(n)), key=SCRUB_KEY,
                                  format_func=lambda i: f"step {snaps[i]['step']}",
                                  help="Scrub through the answers kept at the evaluations: the loss curve marks "
                                       "the point.")
    ss["ft_snap_drawn"] = (run_name, chosen, n)
    return chosen


def show(run_name, snaps, evals, steps, x, elapsed):
    """The loss curve (with the chosen snapshot marked) and, where the run kept snapshots, the slider,
    the answers at that point and what taking them cost."""
    if not snaps:
        st.plotly_chart(figures.loss_figure(evals, steps, x), key="ft_curve")
        return
    st.markdown("**Watch the answer form**: the greedy answers kept at the evaluations.")
    snap = snaps[_scrub(snaps, run_name)]
    st.plotly_chart(marked_loss_figure(evals, steps, x, snap), key="ft_curve")
    loss = f", validation loss {snap['val_loss']:.3f}" if snap.get("val_loss") is not None else ""
    st.caption(f"At step {snap['step']} (epoch {snap.get('epoch')}, {snap.get('tokens_seen', 0):,} tokens seen)"
               f"{loss}:")
    for answer in snap["answers"]:
        st.markdown(f"*{answer['label']}* ({answer.get('tokens', '?')} new tokens):")
        st.code(shown_text(answer), language=None, wrap_lines=True)
    total, share = snapshot_cost(snaps, elapsed)
    st.caption(f"Taking these {len(snaps)} snapshots cost {total:.2f} s"
               + (f", {share:.1%} of the run's {figures.fmt_seconds(elapsed)}" if share is not None else "")
               + " (greedy, KV cache, at most the run's sample_tokens new tokens each).")
