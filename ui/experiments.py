"""The Experiments page's figures and tables."""
import time

import pandas as pd
import plotly.graph_objects as go

from sft.studio.experiments import loss_curves

PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000"]  # Okabe-Ito


def curves_figure(runs, x="steps"):
    """Training (solid) and validation (dashed) loss of each run, one colour per run."""
    fig = go.Figure()
    for i, run in enumerate(runs):
        xs, train, val = loss_curves(run, x)
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=xs, y=train, mode="lines", name=f"{run.name}: train", line=dict(color=color)))
        fig.add_trace(go.Scatter(x=xs, y=val, mode="lines", name=f"{run.name}: validation",
                                 line=dict(color=color, dash="dash")))
    fig.update_layout(xaxis_title=x, yaxis_title="loss", height=380, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", y=1.15))
    return fig


def _fmt(value, spec):
    return None if value is None else format(value, spec)


def results_frame(rows):
    """One row per run, the key columns first."""
    out = []
    for r in rows:
        ci = r["judge_ci"]
        out.append({"run": r["run"], "method": r["method"], "state": r["state"], "model": r["model"],
                    "val loss": _fmt(r["val_loss"], ".3f"), "train loss": _fmt(r["train_loss"], ".3f"),
                    "judge mean (95% CI)": "not scored" if r["judge_mean"] is None else
                    f"{r['judge_mean']:.1f} ({ci[0]:.1f}-{ci[1]:.1f}), {r['judged']} scored",
                    "training": None if r["training_s"] is None else f"{r['training_s'] / 60:.1f} min",
                    "tokens/s": _fmt(r["tokens_per_s"], ",.0f"), "peak memory (MB)": _fmt(r["peak_memory_mb"], ",.0f"),
                    "steps": r["steps"]})
    return pd.DataFrame(out)


def differs_frame(differs, names):
    """Settings as rows, runs as columns (values shown as text: they mix types)."""
    return pd.DataFrame([[str(v) for v in values] for values in differs.values()], index=list(differs), columns=names)


def queue_frame(rows):
    return pd.DataFrame([{"device": r["device"], "place": r["place"], "run": r["run"], "model": r["model"],
                          "queued": time.strftime("%H:%M:%S", time.localtime(r["queued_at"])) if r["queued_at"]
                          else None} for r in rows])


# ---- the chapter's exercises as one experiment (sft.studio.exercises) ----

def exercise_settings(ss, limit, seed, max_steps) -> dict:
    """The experiment's base settings from the workspace's choices: the model (Fine-tune page), the dataset
    (Data page) and the batches' allowed_max_length (Batches page), with the data limit, seed and step limit
    given here (0: none). The variants set the prompt style, masking and LoRA themselves."""
    from sft.weights import weights_available

    from . import loaders, state

    models = str(state.models_dir())
    return {"model": ss.model_name, "weights": weights_available(ss.model_name, models) or "openai",
            "models_dir": models, "data": loaders.dataset_file(), "allowed_max_length": ss.allowed_max_length,
            "limit": int(limit) or None, "seed": int(seed), "max_steps": int(max_steps) or None}


def workspace_judge(ss) -> dict:
    """The judge chosen on the Judge page (kept in the workspace), else a local Ollama's llama3."""
    from . import state

    return {"backend": ss.get("judge_backend") or "ollama", "url": ss.get("judge_url") or state.ollama_url(),
            "model": ss.get("judge_model") or "llama3"}


def exercises_frame(summary):
    """One row per variant, its run's figures beside the book's."""
    from sft.studio.exercises import judge_text

    return pd.DataFrame([{"variant": r["variant"], "exercise": r["exercise"], "run": r["run"], "state": r["state"],
                          "val loss": _fmt(r["val_loss"], ".3f"),
                          "training": None if r["training_s"] is None else f"{r['training_s'] / 60:.2f} min",
                          "tokens/s": _fmt(r["tokens_per_s"], ",.0f"), "judge mean (95% CI)": judge_text(r),
                          "the book's judge mean": _fmt(r["book_score"], ".2f"),
                          "the book's training (L4)": None if r["book_training_min"] is None else
                          f"{r['book_training_min']:.2f} min"} for r in summary["rows"]])
