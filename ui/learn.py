"""The Learn page's views: tokens coloured by their loss (or its change), with the model's guesses on hover."""
import html

import pandas as pd
import plotly.graph_objects as go

# Colour-blind-safe: loss from light (easy) to dark blue (hard); changes orange (less likely) / blue (more).
LOSS_SCALE = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]
GREY = "#e0e0e0"


def _loss_colour(loss, top=8.0):
    if loss is None:
        return GREY
    k = min(int(loss / top * (len(LOSS_SCALE) - 1) + 0.5), len(LOSS_SCALE) - 1)
    return LOSS_SCALE[k]


def _change_colour(change, span=3.0):
    if change is None:
        return GREY
    t = max(-1.0, min(1.0, change / span))
    if t >= 0:  # more likely: towards blue
        r, g, b = (int(255 - t * (255 - c)) for c in (33, 113, 181))
    else:  # less likely: towards orange
        r, g, b = (int(255 + t * (255 - c)) for c in (230, 159, 0))
    return f"#{r:02x}{g:02x}{b:02x}"


def _tip(cell, change=False):
    target = "(ignored: -100)" if not cell["in_loss"] else repr(cell["target_text"])
    lines = [f"next token: {target}", f"role: {cell['target_role']}"]
    if cell["loss"] is not None:
        lines.append(f"loss {cell['loss']:.2f}, p = {cell['prob']:.3f}")
    elif cell["prob"] is not None:
        lines.append(f"not trained (-100); the model gives it p = {cell['prob']:.3f}")
    if change and cell.get("logprob_change") is not None:
        lines.append(f"log-probability change: {cell['logprob_change']:+.2f} (base p = {cell['base_prob']:.3f})")
    lines.append("top guesses: " + ", ".join(f"{t!r} {p:.2f}" for t, p in cell["top"]))
    return "\n".join(lines)


PRESENTING_PX = {"tokens": 24, "legend": 20}  # font sizes in presentation mode (a projector at 1280x720)


def token_html(cells, *, change=False, font_px=15, presenting=False):
    """Each input token as a coloured box: its colour is the loss of the target it predicts (the next
    token), grey where that target is -100; the end-of-text target is outlined; hover for the guesses.
    Tokens wrap, so none is ever off to the right. ``presenting``: larger, for a projector."""
    font_px = PRESENTING_PX["tokens"] if presenting else font_px
    edge = 3 if presenting else 2
    spans = []
    for cell in cells:
        if cell["role"] == "padding":
            continue
        colour = _change_colour(cell.get("logprob_change")) if change else _loss_colour(cell["loss"])
        text = html.escape(cell["token_text"]).replace("\n", "↵<br>") or "&nbsp;"
        dark = not change and cell["loss"] is not None and cell["loss"] > 4.5
        eot = cell["target_role"] == "end-of-text" and cell["in_loss"]
        border = f"{edge}px solid #d55e00" if eot else "1px solid #fff"
        spans.append(f'<span title="{html.escape(_tip(cell, change))}" style="background:{colour};'
                     f'color:{"#fff" if dark else "#000"};border:{border};border-radius:3px;padding:1px 2px;'
                     f'margin:1px;font-family:monospace;font-size:{font_px}px;line-height:2">{text}</span>')
    return f'<div style="word-break:break-word">{"".join(spans)}</div>'


def legend_html(change=False, font_px=13, presenting=False):
    font_px = PRESENTING_PX["legend"] if presenting else font_px
    if change:
        items = [(_change_colour(-3), "fine-tuning made it less likely"), (_change_colour(0), "unchanged"),
                 (_change_colour(3), "more likely"), (GREY, "target -100 (not trained)")]
    else:
        items = [(LOSS_SCALE[0], "low loss (easy)"), (LOSS_SCALE[2], "medium"), (LOSS_SCALE[4], "high loss (hard)"),
                 (GREY, "target -100 (not trained)")]
    boxes = "".join(f'<span style="background:{c};border:1px solid #999;padding:0 8px;margin:0 4px 0 10px">'
                    f'&nbsp;</span>{html.escape(t)}' for c, t in items)
    eot = '<span style="border:2px solid #d55e00;padding:0 6px;margin:0 4px 0 10px">&nbsp;</span>the end-of-text target'
    return f'<div style="font-size:{font_px}px">{boxes}{eot}</div>'


def cells_frame(cells):
    rows = [{"position": c["col"], "token": c["token_text"], "role": c["role"], "target": c["target_text"] or "-100",
             "loss": None if c["loss"] is None else round(c["loss"], 3),
             "p(target)": None if c["prob"] is None else round(c["prob"], 4),
             "top guess": c["top"][0][0] if c["top"] else None} for c in cells if c["role"] != "padding"]
    return pd.DataFrame(rows)


def roles_figure(summaries):
    """Mean loss by role (instruction, input, response, end-of-text), one bar group per model."""
    fig = go.Figure()
    for (label, summary), colour in zip(summaries.items(), ["#0072b2", "#e69f00"]):
        roles = [r for r in summary if summary[r]["targets"]]
        fig.add_trace(go.Bar(x=roles, y=[summary[r]["mean_loss"] for r in roles], name=label, marker_color=colour))
    fig.update_layout(barmode="group", yaxis_title="mean loss of the targets", height=320,
                      margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.15))
    return fig
