"""Not in the book: exporting what a run trained (or a base model), with where it came from.

``export_run_or_model`` loads the model (``Run.load_model``: final weights, a stopped run's last
checkpoint, a LoRA run's adapters merged into its base) and hands it to ``sft.export`` with a
provenance record (run, base model, prompt style, settings, weights file), which the export
writes beside its files as ``sft-export.json``. ``start_export_job`` does it as a background job
(kind "export", ``sft.studio.jobs``), which is how the Chat page exports.
"""
import json
import re
import time
from pathlib import Path

import torch

from ..export import FORMATS, export_model
from ..model import canonical_model_name
from .config import TrainConfig
from .jobs import register_kind, start_job
from .runs import Run


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "model"


def load_for_export(run_dir=None, model=None, weights=None, models_dir="models"):
    """(GPTModel in eval mode, provenance dict, prompt style, default name)."""
    if run_dir:
        run = Run(run_dir)
        config = run.config
        found = run.weights_file()
        provenance = {"run": run.name, "run_dir": str(run.path), "state": run.state,
                      "base_model": canonical_model_name(config.model), "weights_source": config.weights,
                      "prompt_style": config.prompt_style, "settings": config.to_dict(),
                      "weights_file": str(found[0]) if found else None}
        return run.load_model(), provenance, config.prompt_style, run.name
    if not model:
        raise ValueError("give a run folder (run_dir) or a base model name (model)")
    from .models import build_model

    settings = {"model": model, "models_dir": models_dir, **({"weights": weights} if weights else {})}
    config = TrainConfig.from_settings(settings).validate()
    with torch.random.fork_rng(devices=[]):
        built = build_model(config).eval()
    name = canonical_model_name(model)
    provenance = {"run": None, "base_model": name, "weights_source": config.weights, "prompt_style": "alpaca",
                  "note": "a base model, not fine-tuned" + (" (RANDOM weights)" if config.weights == "random" else "")}
    return built, provenance, "alpaca", name


def export_run_or_model(*, run_dir=None, model=None, weights=None, models_dir="models", out=None,
                        formats=FORMATS, gguf_dtypes=("f32",), name=None, prompt_style=None, overwrite=False,
                        progress=None):
    """Export a run's model (or a base model) into ``out`` (default ``exports/<name>``); returns
    ``sft.export.export_model``'s result plus ``out`` and ``provenance``."""
    built, provenance, style, default_name = load_for_export(run_dir, model, weights, models_dir)
    style = prompt_style or style
    name = name or slug(default_name)
    out = Path(out) if out else Path("exports") / slug(default_name)
    provenance = {**provenance, "prompt_style": style, "exported": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = export_model(built, out, formats=formats, gguf_dtypes=gguf_dtypes, prompt_style=style, name=name,
                          provenance=provenance, progress=progress, overwrite=overwrite)
    return {**result, "out": str(out), "name": name, "provenance": provenance}


# ---------------------------------------------------------------- as a background job (sft.studio.jobs)

def export_job_folder(exports_dir, name):
    """One export job per export folder (``<exports dir>/.jobs/export-<slug>``): two pages cannot write it at once."""
    return Path(exports_dir) / ".jobs" / f"export-{slug(name)}"


def export_job(params, progress):
    """``export_run_or_model(**params)`` with its steps as the job's progress; the result, JSON-able."""
    result = export_run_or_model(**params, progress=lambda done, total, what: progress(done, total, what))
    return json.loads(json.dumps(result, default=str))


def start_export_job(exports_dir, *, out, **settings):
    """Export in the background into ``out`` (the Job); ``settings`` are ``export_run_or_model``'s keywords."""
    params = {**settings, "out": str(out)}
    return start_job(export_job_folder(exports_dir, Path(out).name), "export", params)


register_kind("export", export_job)
