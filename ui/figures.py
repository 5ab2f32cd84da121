"""Plotly figures and small formatters the pages draw with."""
import pandas as pd
import plotly.graph_objects as go

from sft.batching import EOT_ID

from .text import plural


def length_histogram(lengths: list, max_length=None) -> go.Figure:
    """Entries per token length, in bins of a whole number of tokens, with whole-number ticks on both axes."""
    low, high = (min(lengths), max(lengths)) if lengths else (0, 1)
    size = max(1, -(-(high - low + 1) // 60))  # about 60 bins, never narrower than one token
    fig = go.Figure(go.Histogram(x=lengths, xbins=dict(start=low - 0.5, end=high + 0.5, size=size),
                                 marker_color="#4c78a8", name="entries"))
    if max_length:
        fig.add_vline(x=max_length, line_dash="dash", line_color="#e45756",
                      annotation_text=f"allowed_max_length {max_length}")
    counts = {}
    for n in lengths:
        counts[(n - low) // size] = counts.get((n - low) // size, 0) + 1
    # Plotly picks steps of 0.5 or 0.2 for short ranges; tokens and entries are counted in whole numbers.
    fig.update_xaxes(tickformat="d", dtick=_whole_step(high - low + size))
    fig.update_yaxes(tickformat="d", dtick=_whole_step(max(counts.values(), default=1)))
    fig.update_layout(xaxis_title="tokens per entry (prompt + response)", yaxis_title="entries",
                      height=320, margin=dict(l=10, r=10, t=30, b=10), bargap=0.05)
    return fig


def _whole_step(span):
    """A tick step of 1, 2 or 5 for an axis spanning `span` units; None (Plotly's own, then >= 5) beyond."""
    return 1 if span <= 12 else 2 if span <= 24 else 5 if span <= 60 else None


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows)


# Okabe and Ito's colour-blind-safe palette; every class has a legend entry, and the target classes a text
# mark too, so nothing is told by colour alone.
ROLE_COLORS = {  # one colour per role in sft.batching.batch_anatomy
    "instruction": "#56B4E9", "input": "#009E73", "prompt": "#56B4E9", "response": "#E69F00",
    "token": "#CC79A7", "end-of-text": "#D55E00", "padding": "#E8E8E8",
}
TARGET_CLASSES = {  # target class: (legend name, colour, mark drawn in the cell)
    "trains": ("trains (in the loss)", "#0072B2", ""),
    "eot": ("E: the end-of-text the row learns", "#D55E00", "E"),
    "ignored": ("×: -100, ignored", "#BDBDBD", "×"),
}
TEXT_COLUMNS = 20  # at this many positions or fewer the cells are wide enough to print their tokens
CELL_CHARS = 6  # characters of token text a zoomed cell shows
ALIGN_COLUMNS = 12  # positions in the input-against-target drawing of one row


def target_class(cell) -> str:
    if not cell["in_loss"]:
        return "ignored"
    return "eot" if cell["target_id"] == EOT_ID else "trains"


def token_label(text: str, limit=CELL_CHARS) -> str:
    """A token's text as a cell shows it: spaces as "·", newlines as "↵", cut to `limit` characters."""
    shown = text.replace(" ", "·").replace("\n", "↵") or "∅"
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def input_label(cell, limit=CELL_CHARS) -> str:
    """An input cell's text: its token, or "eot" / "pad" for the end-of-text and the padding (both 50256)."""
    return {"end-of-text": "eot", "padding": "pad"}.get(cell["role"]) or token_label(cell["token_text"], limit)


def target_label(cell, limit=CELL_CHARS) -> str:
    """A target cell's text: the token it trains on, "E eot" for the end-of-text, "× -100" where ignored."""
    kind = target_class(cell)
    return token_label(cell["target_text"], limit) if kind == "trains" else "E eot" if kind == "eot" else "× -100"


def _discrete_scale(colors):
    """A Plotly colorscale giving integer k in 0..n-1 the flat colour colors[k]."""
    n, scale = len(colors), []
    for k, c in enumerate(colors):
        scale += [[k / n, c], [(k + 1) / n, c]]
    return scale


def _legend_entry(fig, name, color, legend):
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, legend=legend, showlegend=True,
                             marker=dict(symbol="square", size=14, color=color, line=dict(color="#555", width=1))))


PRESENTING_SCALE = 1.4  # fonts and row heights of the grids in presentation mode (a projector at 1280x720)


def batch_figure(anatomy: dict, row_labels: list, rows=None, positions=None, presenting=False) -> go.Figure:
    """Inputs (one row per example, one column per position, coloured by role) above their targets
    (blue: trains; E: the end-of-text each row learns; ×: -100). `rows` and `positions` ((first, last),
    inclusive) zoom in; at TEXT_COLUMNS positions or fewer each cell shows its token and its target.
    `presenting`: fonts, rows and legends PRESENTING_SCALE times larger, for a projector."""
    from plotly.subplots import make_subplots

    B, T, cells = anatomy["rows"], anatomy["cols"], anatomy["cells"]
    rows = list(range(B)) if rows is None else list(rows)
    first, last = positions or (0, T - 1)
    cols = list(range(first, last + 1))
    zoomed = len(cols) <= TEXT_COLUMNS
    grid = {(c["row"], c["col"]): c for c in cells}
    roles, classes = list(ROLE_COLORS), list(TARGET_CLASSES)
    z_in, z_tg, text_in, text_tg, hover = [], [], [], [], []
    for r in rows:
        line = [grid[(r, j)] for j in cols]
        z_in.append([roles.index(c["role"]) for c in line])
        z_tg.append([classes.index(target_class(c)) for c in line])
        text_in.append([input_label(c) if zoomed else "" for c in line])
        text_tg.append([target_label(c) if zoomed else TARGET_CLASSES[target_class(c)][2] for c in line])
        hover.append([f"{row_labels[r]}, position {c['col']}<br>token {c['token_id']} {c['token_text']!r}"
                      f"<br>role: {c['role']}<br>target: "
                      + (f"{c['target_id']} {c['target_text']!r}" if c["in_loss"] else f"{c['target_id']} (ignored)")
                      for c in line])
    y = [row_labels[r] for r in rows]
    k = PRESENTING_SCALE if presenting else 1.0
    font = {"size": round((13 if zoomed else 12) * k)}
    gap = 0.16  # between the panels, in paper units: room for the targets' legend
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=gap)
    fig.add_trace(go.Heatmap(z=z_in, x=cols, y=y, text=text_in, texttemplate="%{text}", textfont=font,
                             customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                             colorscale=_discrete_scale(list(ROLE_COLORS.values())), zmin=0, zmax=len(roles),
                             showscale=False, xgap=1, ygap=1, showlegend=False), row=1, col=1)
    fig.add_trace(go.Heatmap(z=z_tg, x=cols, y=y, text=text_tg, texttemplate="%{text}", textfont=font,
                             customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                             colorscale=_discrete_scale([v[1] for v in TARGET_CLASSES.values()]), zmin=0,
                             zmax=len(classes), showscale=False, xgap=1, ygap=1, showlegend=False), row=2, col=1)
    present = {c["role"] for c in cells}
    for role in roles:  # legend entries only (heatmaps have none): one legend above each panel
        if role in present:
            _legend_entry(fig, role, ROLE_COLORS[role], "legend")
    for name, color, _ in TARGET_CLASSES.values():
        _legend_entry(fig, name, color, "legend2")
    fig.update_yaxes(type="category", autorange="reversed", tickfont={"size": round(13 * k)})  # "#8": not a number
    fig.update_xaxes(tickfont={"size": round(12 * k)}, dtick=1 if len(cols) <= 30 else 5)
    fig.update_xaxes(title_text="position", title_standoff=2, row=2, col=1)
    per_row = round((30 if zoomed else 19) * k)
    legend = dict(orientation="h", yanchor="bottom", x=0, xanchor="left", font={"size": round(13 * k)},
                  title_font={"size": round(14 * k)}, itemclick=False, itemdoubleclick=False)
    fig.update_layout(height=round(120 * k) + 2 * per_row * len(rows), margin=dict(l=10, r=10, t=round(28 * k), b=6),
                      plot_bgcolor="white",
                      legend={**legend, "y": 1.0, "title_text": "<b>inputs</b>, coloured by role:"},
                      legend2={**legend, "y": 0.5 - gap / 2,
                               "title_text": "<b>targets</b>, the inputs shifted one left:"})
    return fig


def ignored_explanation(anatomy: dict, row_labels: list) -> str:
    """Why the batch has more -100 targets than padding positions, in numbers taken from the batch."""
    B, T, cells = anatomy["rows"], anatomy["cols"], anatomy["cells"]
    ignored = sum(not c["in_loss"] for c in cells)
    padding = sum(c["role"] == "padding" for c in cells)
    shorter = [c["row"] for c in cells if c["role"] == "end-of-text"]
    masked = sum(not c["in_loss"] and c["role"] not in ("end-of-text", "padding") for c in cells)
    learned = {c["row"] for c in cells if target_class(c) == "eot"}
    head = (f"**Why {ignored} targets are -100 but only {padding} positions are padding.**" if ignored > padding
            else f"**Why {ignored} targets are -100.**")
    text = (f"{head} A row's inputs are its tokens, then one end-of-text (50256), then padding (50256 again). The "
            "targets are the inputs shifted one to the left, so the end-of-text becomes the target of the row's last "
            "token: the one end-of-text it learns (E). The end-of-text position itself is not padding, yet its "
            "target is the next 50256, so -100. ")
    if shorter:
        who = (f"The 1 row shorter than T = {T} positions ({row_labels[shorter[0]]})" if len(shorter) == 1
               else f"Each of the {len(shorter)} rows shorter than T = {T} positions")
        text += f"{who} thus has one -100 target more than it has padding positions: {padding} + {len(shorter)}"
    else:
        text += f"No row is shorter than T = {T} positions, so no row has an end-of-text position: {padding}"
    if masked:
        text += f" + {masked} masked prompt targets"
    text += f" = {padding + len(shorter) + masked}."
    if padding + len(shorter) + masked != ignored:  # never, by custom_collate_fn's construction; said if it were
        text += f" (The batch has {ignored}: the rule above does not account for all of them.)"
    if len(learned) < B:
        cut = [row_labels[r] for r in range(B) if r not in learned]
        text += (f" {plural(len(cut), 'row', 'rows')} ({', '.join(cut)}) {'learns' if len(cut) == 1 else 'learn'} "
                 "no end-of-text: allowed_max_length cut it off.")
    return text


def alignment_figure(anatomy: dict, row: int, positions) -> go.Figure:
    """One row's inputs above its targets for positions (first, last): each target is the input one to the
    right, drawn as an arrow from input j+1 down to target j."""
    grid = {(c["row"], c["col"]): c for c in anatomy["cells"] if c["row"] == row}
    first, last = positions
    cols = list(range(first, last + 1))
    roles, classes = list(ROLE_COLORS), list(TARGET_CLASSES)
    line = [grid[(row, j)] for j in cols]
    z = [[len(roles) + classes.index(target_class(c)) for c in line], [roles.index(c["role"]) for c in line]]
    text = [[target_label(c, 8) for c in line], [input_label(c, 8) for c in line]]
    colors = list(ROLE_COLORS.values()) + [v[1] for v in TARGET_CLASSES.values()]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=["targets", "inputs"], text=text, texttemplate="%{text}",
                               textfont={"size": 14}, colorscale=_discrete_scale(colors), zmin=0,
                               zmax=len(colors), showscale=False, xgap=3, ygap=40, hoverinfo="skip"))
    for j in cols[:-1]:  # target j is input j+1
        fig.add_annotation(x=j, y=0.22, ax=j + 1, ay=0.78, xref="x", yref="y", axref="x", ayref="y", text="",
                           showarrow=True, arrowhead=2, arrowsize=1.2, arrowwidth=1.5, arrowcolor="#333")
    fig.update_yaxes(tickfont={"size": 14}, fixedrange=True)
    fig.update_xaxes(title_text="position", tickfont={"size": 12}, dtick=1, fixedrange=True)
    fig.update_layout(height=230, margin=dict(l=10, r=10, t=10, b=10), plot_bgcolor="white")
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
