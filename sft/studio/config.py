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
                    "grad_accum_steps": 1, "train_loss_from_steps": False}

# The tiny random model's demo settings, chosen by measuring on a 2-core CPU (README, "The app"): the
# chapter's lr 5e-5 barely moves random weights (val loss 10.9 -> 9.0, answers "."). After 2 epochs
# 3e-3 reaches 2.36, 5e-3 2.26, 1e-2 2.22 (no warm-up needed); a third epoch of 5e-3 takes it to
# 2.12 with answers of three times as many distinct words, in ~50 s from the command line (5 epochs:
# 2.10 in 80 s). Evaluating every 10 steps instead of 5 halves the evaluation time and still draws
# 35 points; no reference answer of the bundled data is longer than 50 tokens, so 64 new tokens
# end every answer quickly.
TINY_DEMO_SETTINGS = {"lr": 5e-3, "epochs": 3, "eval_freq": 10, "response_tokens": 64}
TINY_DEMO_VAL_LOSS = 3.0  # its validation loss ends below this (measured: 2.12; tests/studio/test_tiny_demo.py)

# Settings a model brings unless they are given: the tiny random model has no pretrained weights,
# its context is 256 tokens, and it trains with the demo settings above.
MODEL_PRESETS = {TINY_NAME: {"weights": "random", "allowed_max_length": 256, **TINY_DEMO_SETTINGS}}
# Why a model's preset differs from the chapter, for the Fine-tune page (``TrainConfig.preset_note``).
PRESET_REASONS = {TINY_NAME: "Its random weights need a far higher learning rate to learn within about two "
                             "minutes on a CPU: the validation loss falls from above 10 to below "
                             f"{TINY_DEMO_VAL_LOSS:g}. Real GPT-2 weights keep the chapter's settings"}
MAX_EXTRA_PROMPTS = 2
PROMPT_SEPARATOR = "|"  # between the extra instructions of ``snapshot_prompts`` (one flag on the command line)


def extra_instructions(text):
    """The instructions of a ``snapshot_prompts`` setting: "Name a colour.|Add 2 and 3." -> two."""
    return [t.strip() for t in (text or "").split(PROMPT_SEPARATOR) if t.strip()]


QUICK_RUN_ANSWERS = 32  # test entries answered after a run that max_steps cut short: one batch (RESPONSE_BATCH)


def _prompt_styles():
    return tuple(sorted(PROMPT_STYLES))


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; the defaults are chapter 7's."""

    # model
    model: str = setting("gpt2-medium (355M)", "model to fine-tune: one of " + ", ".join(MODEL_NAMES)
                         + " (also '124M', 'gpt2-small', ...). 'tiny' is a small RANDOMLY initialised model "
                         "for offline demos and tests, with demo settings of its own (a higher lr, 3 epochs)",
                         group="model", choices=lambda: tuple(MODEL_NAMES))
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
    train_loss_from_steps: bool = setting(True, "an evaluation's train loss: the mean loss of the training steps since "
                                          "the last one (no extra batches); off: eval_iter fresh training batches, "
                                          "as the chapter", group="evaluation", label="Train loss from the steps")
    sample_each_epoch: bool = setting(True, "answer the first validation prompt after each epoch",
                                      group="evaluation")
    sample_tokens: int = setting(50, "new tokens of that sample answer and of the snapshots (the chapter's 50)",
                                 group="evaluation", low=0, high=1024)
    # Not in the book: the answer kept at evaluations, to watch it form (sft.studio.snapshots)
    snapshot_every: int = setting(1, "keep the greedy answer to the first validation prompt (and to "
                                  "snapshot_prompts) at every Nth evaluation, to watch it form; 0: never",
                                  group="evaluation", low=0, high=100000)
    snapshot_prompts: str = setting("", f"up to {MAX_EXTRA_PROMPTS} more instructions answered at each snapshot, "
                                    f"separated by '{PROMPT_SEPARATOR}'", group="evaluation")
    response_tokens: int = setting(256, "max new tokens per test answer after training", group="evaluation",
                                   low=1, high=1024)
    answer_limit: int | None = setting(None, "answer only the first N test entries after training (default: "
                                       "all, as the chapter; a run that max_steps cuts short answers the first "
                                       f"{QUICK_RUN_ANSWERS}, so a quick run stays quick: the Compare page answers "
                                       "the rest)", group="evaluation", low=1)
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
    strategy: str = setting("ddp", "under torchrun: ddp (each process holds the whole model and optimizer state) or "
                            "fsdp (FSDP2: each holds 1/N of the weights, gradients and AdamW state; full "
                            "fine-tuning of gpt2-large/xl on smaller GPUs)", group="speed", choices=("ddp", "fsdp"))
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
    def preset_note(cls, model):
        """What the page says about ``model``'s preset: why it differs from the chapter and the settings
        it changes (say "lr 5e-3 (the chapter's 5e-05)"); None for a model that trains as the chapter."""
        name = canonical_name_or_none(model)
        reason = PRESET_REASONS.get(name)
        if reason is None:
            return None
        chapter = {f.name: f.default for f in fields(cls)}
        changed = [NOTE_NAMES.get(k, k + " {}").format(_short(v)) + f" (the chapter: {_short(chapter[k])})"
                   for k, v in MODEL_PRESETS[name].items() if k not in ("weights", "allowed_max_length")]
        return f"{name} trains with demo settings of its own, not the chapter's: {', '.join(changed)}. {reason}."

    def answers_after_training(self, n_test, *, cut_short=None):
        """How many test entries (the first ones) a run answers after training: ``answer_limit`` if set,
        else all ``n_test``, or ``QUICK_RUN_ANSWERS`` where max_steps cut training short of its epochs
        (``cut_short``: whether it did; None: whenever max_steps is set)."""
        if self.answer_limit is not None:
            return min(n_test, self.answer_limit)
        if cut_short if cut_short is not None else self.max_steps is not None:
            return min(n_test, QUICK_RUN_ANSWERS)
        return n_test

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
        extra = extra_instructions(self.snapshot_prompts) if isinstance(self.snapshot_prompts, str) else []
        if len(extra) > MAX_EXTRA_PROMPTS:
            p.append(f"snapshot_prompts: at most {MAX_EXTRA_PROMPTS} instructions (separated by "
                     f"'{PROMPT_SEPARATOR}'), got {len(extra)}")
        if self.strategy == "fsdp" and isinstance(self.lora_rank, int) and self.lora_rank > 0:
            p.append("strategy 'fsdp' shards full fine-tuning's weights and optimizer state; LoRA's few trainable "
                     "parameters need no sharding: use strategy 'ddp' with LoRA")
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


NOTE_NAMES = {"lr": "learning rate {}", "eval_freq": "evaluation every {} steps", "epochs": "{} epochs",
              "response_tokens": "at most {} tokens per test answer", "batch_size": "batch size {}"}


def _short(value):
    """5e-3 as "5e-3", 10 as "10"."""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def canonical_name_or_none(model):
    try:
        return canonical_model_name(model)
    except ValueError:
        return None


def model_preset(model):
    """Settings that ``model`` brings unless given (``MODEL_PRESETS``); {} for an unknown name."""
    return dict(MODEL_PRESETS.get(canonical_name_or_none(model), {}))


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
