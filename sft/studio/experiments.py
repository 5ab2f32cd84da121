"""Not in the book: runs compared, side by side.

``compare_runs(runs)`` gives what a table of experiments needs: only the settings that differ
between the runs (so runs of different sizes or data are allowed and the table says what differs),
and per run its method (full, LoRA, DPO), final train and validation loss, training time,
tokens/s, peak memory, and, when its answers have been scored, the judge's mean score with its
95% bootstrap interval. ``loss_curves`` are the overlays' data (x: steps, epochs or tokens seen).
"""
from ..judge import default_scores_path
from ..judge.stats import ScoreStore, summarize_scores

X_AXES = {"steps": "step", "epochs": "epochs_seen", "tokens seen": "tokens_seen"}
HIDDEN = {"models_dir"}  # settings that say where files are, not how the run trained


def method(config):
    """"DPO", "LoRA" or "full" fine-tuning."""
    if getattr(config, "kind", "sft") == "dpo":
        return "DPO"
    return "LoRA" if getattr(config, "lora_rank", 0) else "full"


def judge_summary(run):
    """The judge's scores of ``run``'s answers: {judge, n, mean, ci_low, ci_high, ...} for the judge
    that scored the most of them, or None when none was scored."""
    path = default_scores_path(run.responses_path, "model_response")
    if not path.is_file():
        return None
    try:
        records = list(ScoreStore(path).load().values())
    except ValueError:
        return None
    by_judge = {}
    for r in records:
        by_judge.setdefault(r.get("judge"), []).append(r.get("score"))
    if not by_judge:
        return None
    judge, scores = max(by_judge.items(), key=lambda kv: sum(s is not None for s in kv[1]))
    return {"judge": judge, **summarize_scores(scores)}


def run_stats(run):
    """One row of the table for ``run``."""
    status, config = run.status(), run.config
    done = (run.read_metrics("done") or [{}])[-1]
    evals = run.read_metrics("eval")
    last_eval = evals[-1] if evals else {}
    p = status.get("progress") or {}
    judged = judge_summary(run)
    return {"run": run.name, "state": status.get("state"), "method": method(config), "model": config.model,
            "train_loss": done.get("train_loss", last_eval.get("train_loss")),
            "val_loss": done.get("val_loss", last_eval.get("val_loss")),
            "training_s": done.get("elapsed", p.get("elapsed")), "tokens_per_s": done.get("tokens_per_s",
                                                                                           p.get("tokens_per_s")),
            "peak_memory_mb": status.get("peak_memory_mb"), "steps": (p.get("step", -1) + 1) if p else None,
            "judge_mean": judged["mean"] if judged else None,
            "judge_ci": (judged["ci_low"], judged["ci_high"]) if judged and judged["n"] else None,
            "judged": judged["n"] if judged else 0, "judge": judged["judge"] if judged else None}


def differing_settings(runs):
    """{setting: [value per run]} for the settings whose values are not all the same."""
    configs = [r.config.to_dict() for r in runs]
    keys = sorted({k for c in configs for k in c} - HIDDEN)
    return {k: [c.get(k) for c in configs] for k in keys if len({repr(c.get(k)) for c in configs}) > 1}


def compare_runs(runs):
    """{"differs": differing_settings, "rows": [run_stats per run]} for readable runs."""
    runs = [r for r in runs if not getattr(r, "is_broken", False)]
    return {"differs": differing_settings(runs) if len(runs) > 1 else {}, "rows": [run_stats(r) for r in runs]}


def loss_curves(run, x="steps"):
    """(x values, train losses, val losses) of ``run``'s evaluations against steps, epochs or tokens."""
    key = X_AXES[x]
    evals = run.read_metrics("eval")
    return [e.get(key) for e in evals], [e.get("train_loss") for e in evals], [e.get("val_loss") for e in evals]
