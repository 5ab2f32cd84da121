"""Not in the book: every setting of a fine-tuning run, written once.

``TrainConfig`` is a dataclass whose fields carry their help text, group and choices
(``setting(...)``). A run saves it as config.json; the command line's ``train`` flags are
generated from its fields (``sft.cli.settings``) and the app's widgets take their defaults and
choices from it, so a new setting is one field here. Choices come from the engine's registries
(model names, ``PROMPT_STYLES``, weight sources), so a prompt style added with
``register_prompt_style`` is accepted everywhere.

``TrainConfig.chapter_path()`` turns every fast path off (the chapter's exact computation; a
setting that contradicts it is an error); ``validate()`` lists every bad setting at once
(``ConfigError``); ``oom_advice`` turns settings that ran out of memory into what to try next.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from ..lora import LORA_TARGETS
from ..model import MODEL_NAMES, TINY_NAME, canonical_model_name, is_tiny, model_config
from ..prompts import PROMPT_STYLES
from .hardware import PRECISIONS, resolve_device

WEIGHT_SOURCES = ("openai", "hf", "random")
DUPLICATE_RULES = ("error", "keep", "drop")

GROUPS = {  # group -> title, in the order the CLI's help and the pages show them
    "model": "model",
    "data": "data",
    "method": "method: full fine-tuning, or LoRA (exercise 7.4)",
    "optimisation": "optimisation (defaults are the chapter's)",
    "evaluation": "evaluation and samples",
    "speed": "speed and hardware",
    "checkpoints": "checkpoints",
}


def setting(default, help, *, group, choices=None, label=None, low=None, high=None, cli=True):
    """A dataclass field with what the CLI and the pages need to show it.

    ``choices``: a tuple, or a function returning one (read when a parser or page is built, so
    registries filled later count). ``low``/``high``: the range a page's number input allows.
    """
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "label": label,
                                            "low": low, "high": high, "cli": cli})


def choices_of(f):
    """The allowed values of field ``f`` (a tuple), or None where any value of its type goes."""
    c = f.metadata.get("choices")
    return tuple(c() if callable(c) else c) if c is not None else None


class ConfigError(ValueError):
    """A TrainConfig with one or more bad settings; ``.problems`` lists them all."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("bad training settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


# Fields the chapter's exact computation fixes, and their values there.
CHAPTER_SETTINGS = {"precision": "fp32", "fast_kernels": False, "masked_head_loss": False,
                    "group_by_length": False, "tf32": False, "fused_adamw": False, "compile": False,
                    "grad_accum_steps": 1}

# Settings a model brings unless they are given: the tiny random model has no pretrained weights,
# and its context is 256 tokens.
MODEL_PRESETS = {TINY_NAME: {"weights": "random", "allowed_max_length": 256}}


def _prompt_styles():
    return tuple(sorted(PROMPT_STYLES))


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; the defaults are chapter 7's."""

    # model
    model: str = setting("gpt2-medium (355M)", "model to fine-tune: one of " + ", ".join(MODEL_NAMES)
                         + " (also '124M', 'gpt2-small', ...). 'tiny' is a small RANDOMLY initialised model "
                         "for offline demos and tests", group="model", choices=lambda: tuple(MODEL_NAMES))
    weights: str = setting("openai", "where the starting weights come from: OpenAI's TensorFlow checkpoint (the "
                           "book), Hugging Face safetensors (no TensorFlow needed) or random (any size, offline: "
                           "for benchmarks; such runs are labelled RANDOM); the tiny model is always random",
                           group="model", choices=WEIGHT_SOURCES)
    models_dir: str = setting("models", "folder holding downloaded GPT-2 weights", group="model")
    # data
    data: str | None = setting(None, "dataset path or URL (JSON/JSONL); default: the chapter's bundled 1100 "
                               "entries", group="data")
    duplicates: str | None = setting(None, "entries with the same instruction and input: error, keep or drop "
                                     "(default: keep for the bundled data, as the chapter; error for a file)",
                                     group="data", choices=DUPLICATE_RULES)
    limit: int | None = setting(None, "use only the first N entries (quick runs)", group="data", low=1)
    prompt_style: str = setting("alpaca", "prompt template (alpaca: the chapter; phi3: exercise 7.1)",
                                group="data", choices=_prompt_styles)
    allowed_max_length: int = setting(1024, "truncate examples to this many tokens", group="data", low=2, high=1024)
    mask_instruction: bool = setting(False, "exercise 7.2: no loss on prompt tokens", group="data")
    group_by_length: bool = setting(False, "batch similar lengths together (less padding; not the chapter's "
                                    "order)", group="data")
    # method: full fine-tuning (the chapter) or LoRA (exercise 7.4, appendix E)
    lora_rank: int = setting(0, "LoRA rank: 0 fine-tunes every weight (the chapter); N > 0 freezes the model and "
                             "trains rank-N adapters instead (exercise 7.4 uses 16)", group="method", low=0, high=1024)
    lora_alpha: float = setting(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank (exercise 7.4: "
                                "16)", group="method", low=0.0, high=100000.0)
    lora_targets: str = setting("all", "layers that get adapters: 'all' (every Linear, the book's choice) or a "
                                "comma-separated list of " + ", ".join(LORA_TARGETS), group="method")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input (0: the book's)", group="method",
                                  low=0.0, high=0.99)
    # optimisation (chapter: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs)
    epochs: int = setting(2, "passes over the training split", group="optimisation", low=1, high=1000)
    lr: float = setting(5e-5, "AdamW learning rate", group="optimisation", low=0.0, high=10.0)
    weight_decay: float = setting(0.1, "AdamW weight decay", group="optimisation", low=0.0, high=10.0)
    batch_size: int = setting(8, "examples per batch", group="optimisation", low=1, high=1024)
    grad_accum_steps: int = setting(1, "gradient accumulation: micro-batches of batch_size per optimizer step, "
                                    "so the effective batch is batch_size x N in the memory of one micro-batch",
                                    group="optimisation", low=1, high=1024)
    max_steps: int | None = setting(None, "stop after N optimizer steps", group="optimisation", low=1)
    # evaluation (chapter: every 5 steps over 5 batches) and samples
    eval_freq: int = setting(5, "evaluate every N steps", group="evaluation", low=1)
    eval_iter: int = setting(5, "batches per evaluation", group="evaluation", low=1)
    sample_each_epoch: bool = setting(True, "answer the first validation prompt after each epoch",
                                      group="evaluation")
    sample_tokens: int = setting(50, "new tokens of that sample answer (the chapter's 50)", group="evaluation",
                                 low=0, high=1024)
    response_tokens: int = setting(256, "max new tokens per test answer after training", group="evaluation",
                                   low=1, high=1024)
    # reproducibility and hardware
    seed: int = setting(123, "random seed (data order, random weights)", group="speed", low=0)
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps", group="speed")
    precision: str = setting("auto", "auto = bf16 autocast where the hardware does bf16 well, else fp32",
                             group="speed", choices=PRECISIONS)
    fast_kernels: bool = setting(True, "fused layer norm, GELU and attention (sft.fast); off: the book's module "
                                 "bodies", group="speed")
    masked_head_loss: bool = setting(True, "output head and loss only where targets count (same value, less "
                                     "work; needs fast_kernels)", group="speed")
    tf32: bool = setting(True, "TF32 matmuls on NVIDIA GPUs (fp32 inputs, ~10 mantissa bits)", group="speed")
    fused_adamw: bool = setting(True, "one fused AdamW kernel (CUDA and CPU: ~7x less time than the loop)",
                                group="speed")
    compile: bool = setting(False, "torch.compile the model (slow first steps, faster after on GPUs)",
                            group="speed")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward (much less "
                                             "memory, ~30% slower; for gpt2-large/xl on smaller GPUs)",
                                             group="speed")
    num_workers: int = setting(0, "DataLoader worker processes", group="speed", low=0, high=64)
    checkpoint_every: int | None = setting(None, "also checkpoint every N optimizer steps (always at each epoch "
                                           "end and on stop)", group="checkpoints", low=1)
    checkpoint_minutes: float | None = setting(5.0, "also checkpoint after this many minutes of training since the "
                                               "last checkpoint, so a crash loses at most that much work",
                                               group="checkpoints", low=0.0)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_settings(cls, settings=None, *, chapter_path=False, **more):
        """A config from the settings given (a dict and/or keywords); the rest are the defaults,
        after the chosen model's preset (the tiny model's random weights). With ``chapter_path``,
        the chapter's exact computation; a given setting that contradicts it is an error."""
        given = {**(settings or {}), **more}
        values = {**model_preset(given.get("model", cls.model_default())), **given}
        return cls.chapter_path(**values) if chapter_path else cls(**values)

    @classmethod
    def model_default(cls):
        return next(f.default for f in fields(cls) if f.name == "model")

    @classmethod
    def defaults_for(cls, model):
        """The defaults a page shows once ``model`` is picked (its preset applied)."""
        return cls.from_settings(model=model)

    @classmethod
    def chapter_path(cls, **overrides):
        """The chapter's exact computation: fp32, the book's module bodies, full output head, no
        grouping, no TF32/fused kernels, no accumulation. An override that contradicts it (say
        precision="bf16") raises ConfigError naming it."""
        clash = [f"{k}={v!r} contradicts the chapter's exact computation ({k}={CHAPTER_SETTINGS[k]!r})"
                 for k, v in overrides.items() if k in CHAPTER_SETTINGS and v != CHAPTER_SETTINGS[k]]
        if clash:
            raise ConfigError(clash)
        return cls(**{**CHAPTER_SETTINGS, **overrides})

    def is_chapter_path(self):
        return all(getattr(self, k) == v for k, v in CHAPTER_SETTINGS.items())

    # ------------------------------------------------------------------ checking
    def validate(self):
        """Raise ConfigError listing every bad setting (not just the first)."""
        p = []
        for f in fields(self):
            p += _check_field(f, getattr(self, f.name))
        if isinstance(self.lr, (int, float)) and self.lr == 0:
            p.append("lr must be > 0, got 0")
        try:
            model_config(self.model)
            if is_tiny(self.model) and self.weights != "random":
                p.append(f"model {self.model!r} has no pretrained weights: set weights='random'")
        except ValueError as exc:
            p.append(f"model: {exc}")
        if isinstance(self.device, str):
            try:
                resolve_device(self.device)
            except ValueError as exc:
                p.append(f"device: {exc}")
        if isinstance(self.lora_targets, str):
            try:
                self.lora_target_list()
            except ValueError as exc:
                p.append(f"lora_targets: {exc}")
        if isinstance(self.lora_dropout, (int, float)) and not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.masked_head_loss is True and self.fast_kernels is False:
            p.append("masked_head_loss needs fast_kernels (the packed rows are computed by sft.fast)")
        if p:
            raise ConfigError(p)
        return self

    @property
    def method(self):
        """"LoRA" when adapters are trained, else "full"."""
        return "LoRA" if self.lora_rank else "full"

    def lora_target_list(self):
        """None for 'all' (every Linear), else the tuple of ``LORA_TARGETS`` named; ValueError for others."""
        text = self.lora_targets.strip().lower()
        if text in ("all", ""):
            return None
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in names if t not in LORA_TARGETS]
        if bad or not names:
            raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, bad)) or repr(text)}; "
                             f"use 'all' or some of {', '.join(LORA_TARGETS)}")
        return tuple(t for t in LORA_TARGETS if t in names)

    # ------------------------------------------------------------------ JSON
    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d, *, source="config"):
        """Build from a dict (e.g. config.json); unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise ConfigError([f"{source}: expected a JSON object, got {type(d).__name__}"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError([f"{source}: unknown setting {k!r} (from another version of SFT Studio?)"
                               for k in unknown])
        return cls(**d)

    def save(self, path):
        from .files import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{os.fspath(path)}: not valid JSON ({exc})"]) from None
        return cls.from_dict(data, source=os.fspath(path))


def model_preset(model):
    """Settings that ``model`` brings unless given (``MODEL_PRESETS``); {} for an unknown name."""
    try:
        return dict(MODEL_PRESETS.get(canonical_model_name(model), {}))
    except ValueError:
        return {}


def field_type(f):
    """(python type, None allowed) of a field: ``int | None`` -> (int, True)."""
    args = getattr(f.type, "__args__", None)
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return f.type, False


def _check_field(f, value):
    """Problems with one field's value: its type, range and choices, from its metadata."""
    kind, optional = field_type(f)
    meta, name = f.metadata, f.name
    if value is None:
        return [] if optional else [f"{name} must be set, got None"]
    if kind is bool:
        return [] if isinstance(value, bool) else [f"{name} must be true or false, got {value!r}"]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{name} must be an integer, got {value!r}"]
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        return [f"{name} must be a finite number, got {value!r}"]
    if kind is str and not isinstance(value, str):
        return [f"{name} must be a string, got {value!r}"]
    low = meta.get("low")
    if kind in (int, float) and low is not None and value < low:
        return [f"{name} must be >= {low}" + (" or None" if optional else "") + f", got {value!r}"]
    choices = choices_of(f)
    if choices is not None and name != "model" and value not in choices:
        return [f"{name} must be one of {list(choices)}, got {value!r}"]
    return []


class TrainingError(RuntimeError):
    """Training failed in a way a person can act on; ``.advice`` lists what to try."""

    def __init__(self, message, advice=()):
        self.advice = list(advice)
        super().__init__(message + ("\nTry: " + "; ".join(self.advice) if self.advice else ""))


def oom_advice(config):
    """What to change after running out of memory, given the settings that ran out."""
    tips = []
    if config.batch_size > 1:
        smaller = max(1, config.batch_size // 2)
        accum = config.grad_accum_steps * config.batch_size // smaller
        tips.append(f"a smaller batch_size (now {config.batch_size}): {smaller} with "
                    f"grad_accum_steps={accum} keeps the effective batch")
    if config.allowed_max_length > 256:
        tips.append(f"a shorter allowed_max_length (now {config.allowed_max_length}), "
                    f"e.g. {config.allowed_max_length // 2}")
    if not config.activation_checkpointing:
        tips.append("activation_checkpointing=True (much less memory, about 30% slower)")
    if config.precision == "fp32":
        tips.append("precision 'bf16' or 'auto' where the device supports bf16")
    tips.append("a smaller model")
    return tips
