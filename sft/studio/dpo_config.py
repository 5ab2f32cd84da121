"""Not in the book: the settings of a preference-tuning (DPO) run, written once like ``TrainConfig``'s.

``DPOConfig`` is a ``TrainConfig`` with ``kind="dpo"``, DPO's ``beta``, what to do with pairs whose
answers are identical, and where the policy and its frozen reference start: ``from_run`` (a finished
instruction run's weights, full or LoRA-merged) or ``model``/``weights`` as for fine-tuning. Its
defaults are the DPO notebook's: AdamW lr 5e-6, weight decay 0.01, 1 epoch, batch 8, evaluation
every 5 steps over 5 batches, the prompt masked. ``python -m sft dpo``'s flags are generated from
its fields like ``train``'s; ``load_config`` reads a run's config.json as the class its kind names.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from ..dpo import CHOICES
from ..model import TINY_NAME, canonical_model_name, model_config
from .config import ConfigError, TrainConfig, canonical_name_or_none, setting
from .files import read_json
from .finetuned import finetuned_filename

# Settings a model brings unless given: the tiny random model has no pretrained weights and a
# 256-token context; it keeps the notebook's optimiser settings otherwise.
DPO_MODEL_PRESETS = {TINY_NAME: {"weights": "random", "allowed_max_length": 256, "response_tokens": 64}}
FROM_RUN_SETTINGS = ("model", "weights", "models_dir")  # what a DPO run takes from the run it starts from


@dataclass
class DPOConfig(TrainConfig):
    """Every setting of a DPO run; the defaults are the DPO notebook's."""

    # Fields redefined here keep TrainConfig's order; only their defaults and help change.
    data: str | None = setting(None, "preference data path (JSON/JSONL with instruction, input, chosen, rejected); "
                               "default: the book's bundled 1100 pairs", group="data")
    mask_instruction: bool = setting(True, "no log-probability on the prompt tokens (the notebook's "
                                     "mask_prompt_tokens=True)", group="data")
    epochs: int = setting(1, "passes over the training pairs (the notebook: 1)", group="optimisation", low=1, high=1000)
    lr: float = setting(5e-6, "AdamW learning rate (the notebook: 5e-6)", group="optimisation", low=0.0, high=10.0)
    weight_decay: float = setting(0.01, "AdamW weight decay (the notebook: 0.01)", group="optimisation",
                                  low=0.0, high=10.0)
    # DPO's own
    kind: str = setting("dpo", "what the run does: preference tuning with DPO", group="method", choices=("dpo",),
                        cli=False)
    from_run: str | None = setting(None, "a finished instruction run's folder to start from: its weights (full, or "
                                   "LoRA merged) are the policy's start and the frozen reference; default: "
                                   "--model and --weights", group="model")
    beta: float = setting(0.1, "DPO's beta: how far the policy may move from the reference (the notebook: 0.1)",
                          group="method", low=0.0, high=100.0)
    identical: str | None = setting(None, "pairs whose chosen and rejected answers are identical (no preference "
                                    "signal): error, keep or drop (default: keep for the bundled data, as the "
                                    "notebook; error for a file)", group="data", choices=CHOICES)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_settings(cls, settings=None, *, chapter_path=False, **more):
        """A config from the settings given; with ``from_run``, that run's model and weights unless
        given; then the model's preset (``DPO_MODEL_PRESETS``), then the notebook's defaults."""
        given = {**(settings or {}), **more}
        if given.get("from_run"):
            given["from_run"] = os.path.abspath(given["from_run"])
            given = {**start_settings(given["from_run"]), **given}
        values = {**DPO_MODEL_PRESETS.get(canonical_name_or_none(given.get("model", cls.model_default())), {}),
                  **given}
        return cls.chapter_path(**values) if chapter_path else cls(**values)

    def start_weights_path(self):
        """The final weights file of ``from_run`` (None without one)."""
        if not self.from_run:
            return None
        return Path(self.from_run) / finetuned_filename(canonical_model_name(self.model))

    # ------------------------------------------------------------------ checking
    def validate(self):
        """Raise ConfigError listing every bad setting, TrainConfig's and DPO's."""
        try:
            super().validate()
            problems = []
        except ConfigError as exc:
            problems = list(exc.problems)
        if self.kind != "dpo":
            problems.append(f"kind must be 'dpo' for a DPO run, got {self.kind!r}")
        if isinstance(self.beta, (int, float)) and self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta!r}")
        if self.prompt_style != "alpaca":
            problems.append(f"prompt_style must be 'alpaca' for DPO (the notebook's PreferenceDataset formats "
                            f"prompts with format_input), got {self.prompt_style!r}")
        if self.group_by_length:
            problems.append("group_by_length is not offered for DPO (the notebook's loaders shuffle the pairs)")
        try:
            context = model_config(self.model)["context_length"]
            if isinstance(self.allowed_max_length, int) and self.allowed_max_length > context:
                problems.append(f"allowed_max_length {self.allowed_max_length} is longer than the model's context "
                                f"({context}): a pair cut there would not fit; use {context}")
        except ValueError:
            pass  # TrainConfig.validate named the model already
        if self.from_run:
            problems += _from_run_problems(self)
        if problems:
            raise ConfigError(problems)
        return self


def start_settings(from_run):
    """{model, weights, models_dir} of the run at ``from_run``; ConfigError if it is not a run."""
    path = Path(from_run) / "config.json"
    if not path.is_file():
        raise ConfigError([f"from_run: no run at {from_run} (config.json missing)"])
    source = load_config(path)
    return {"model": canonical_model_name(source.model), **{k: getattr(source, k) for k in FROM_RUN_SETTINGS[1:]}}


def _from_run_problems(config):
    try:
        source = start_settings(config.from_run)
    except ConfigError as exc:
        return exc.problems
    problems = []
    if canonical_name_or_none(config.model) != source["model"]:
        problems.append(f"model {config.model!r} is not the model of from_run ({source['model']!r})")
    elif not config.start_weights_path().is_file() and not _will_train(config.from_run):
        problems.append(f"from_run: {config.from_run} has no final weights ({config.start_weights_path().name}): "
                        "let that run finish first")
    return problems


def _will_train(folder):
    """True while the run at ``folder`` is queued or training: a DPO run queued behind it (the queue keeps the
    order) finds its final weights when its turn comes, and fails then, saying so, if that run did not finish."""
    status = read_json(Path(folder) / "status.json", {}) or {}
    return isinstance(status, dict) and status.get("state") in ("queued", "starting", "running")


def load_config(path):
    """A run's config.json as the class its ``kind`` names: ``DPOConfig`` for "dpo", else ``TrainConfig``."""
    try:
        data = read_json(path, {})
    except (ValueError, RecursionError, UnicodeDecodeError):
        data = None  # TrainConfig.load reports it
    kind = data.get("kind") if isinstance(data, dict) else None
    return (DPOConfig if kind == "dpo" else TrainConfig).load(path)


def is_dpo(config):
    return getattr(config, "kind", "sft") == "dpo"
