"""Plotly figures and small formatters the pages draw with."""
import pandas as pd
import plotly.graph_objects as go


def length_histogram(lengths: list, max_length=None) -> go.Figure:
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=60, marker_color="#4c78a8", name="entries"))
    if max_length:
        fig.add_vline(x=max_length, line_dash="dash", line_color="#e45756",
                      annotation_text=f"allowed_max_length {max_length}")
    fig.update_layout(xaxis_title="tokens per entry (prompt + response)", yaxis_title="entries",
                      height=320, margin=dict(l=10, r=10, t=30, b=10), bargap=0.05)
    return fig


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows)


ROLE_COLORS = {  # one colour per role in sft.batching.batch_anatomy
    "instruction": "#4c78a8", "input": "#72b7b2", "prompt": "#4c78a8", "response": "#f58518",
    "token": "#9d755d", "end-of-text": "#54a24b", "padding": "#d4d4d4",
}


def _discrete_scale(colors):
    """A Plotly colorscale giving integer k in 0..n-1 the flat colour colors[k]."""
    n, scale = len(colors), []
    for k, c in enumerate(colors):
        scale += [[k / n, c], [(k + 1) / n, c]]
    return scale


def batch_figure(anatomy: dict, row_labels: list) -> go.Figure:
    """Inputs (one row per example, one column per position, coloured by role) above their targets,
    with every target that does not count in the loss (-100) drawn red and labelled."""
    from plotly.subplots import make_subplots

    B, T, cells = anatomy["rows"], anatomy["cols"], anatomy["cells"]
    roles = list(ROLE_COLORS)
    z_in = [[0] * T for _ in range(B)]
    z_tg = [[0] * T for _ in range(B)]
    text_tg = [[""] * T for _ in range(B)]
    hover = [[""] * T for _ in range(B)]
    for c in cells:
        r, j = c["row"], c["col"]
        z_in[r][j] = roles.index(c["role"])
        z_tg[r][j] = 1 if c["in_loss"] else 0
        text_tg[r][j] = "" if c["in_loss"] else str(c["target_id"])
        target = f"{c['target_id']} {c['target_text']!r}" if c["in_loss"] else f"{c['target_id']} (ignored)"
        hover[r][j] = (f"{row_labels[r]}, position {j}<br>token {c['token_id']} {c['token_text']!r}"
                       f"<br>role: {c['role']}<br>target: {target}")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("inputs, coloured by role", "targets (red: -100, not in the loss)"))
    fig.add_trace(go.Heatmap(z=z_in, y=row_labels, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                             colorscale=_discrete_scale(list(ROLE_COLORS.values())), zmin=0, zmax=len(roles),
                             showscale=False, xgap=1, ygap=1), row=1, col=1)
    fig.add_trace(go.Heatmap(z=z_tg, y=row_labels, text=text_tg, texttemplate="%{text}", textfont={"size": 8},
                             customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                             colorscale=_discrete_scale(["#e45756", "#c7e9c0"]), zmin=0, zmax=2,
                             showscale=False, xgap=1, ygap=1), row=2, col=1)
    present = {c["role"] for c in cells}
    for role in roles:  # legend entries only (heatmaps have none)
        if role in present:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=role,
                                     marker=dict(symbol="square", size=12, color=ROLE_COLORS[role])))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="target -100",
                             marker=dict(symbol="square", size=12, color="#e45756")))
    fig.update_yaxes(type="category", autorange="reversed")  # labels like "#8" must not read as numbers
    fig.update_xaxes(title_text="position", row=2, col=1)
    fig.update_layout(height=200 + 2 * 24 * B, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.12 * 8 / max(B, 4)),
                      plot_bgcolor="white")
    return fig


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


X_AXES = {"steps": "step", "epochs": "epochs_seen", "tokens seen": "tokens_seen"}


def loss_figure(evals: list, steps: list, x: str = "steps") -> go.Figure:
    """Training and validation loss (the chapter's evaluations) against steps, epochs or tokens seen,
    with each step's own training loss faint behind them."""
    key = X_AXES[x]
    fig = go.Figure()
    if steps:
        fig.add_trace(go.Scatter(x=[e[key] for e in steps], y=[e.get("loss") for e in steps], mode="lines",
                                 name="loss of each step", line=dict(color="#bbbbbb", width=1)))
    fig.add_trace(go.Scatter(x=[e[key] for e in evals], y=[e.get("train_loss") for e in evals],
                             mode="lines+markers", name="Training loss", line=dict(color="#4c78a8")))
    fig.add_trace(go.Scatter(x=[e[key] for e in evals], y=[e.get("val_loss") for e in evals],
                             mode="lines+markers", name="Validation loss",
                             line=dict(color="#f58518", dash="dashdot")))
    fig.update_layout(xaxis_title=x, yaxis_title="loss", height=360, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", y=1.12))
    return fig
