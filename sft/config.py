"""Not in the book: ``TrainConfig``, every setting of a fine-tuning run in one commented dataclass.

A run saves it as config.json; the app's widgets, the CLI's flags and the benchmark all build
one. ``TrainConfig.chapter_path()`` turns every fast path off (the chapter's exact computation);
``validate()`` lists every bad setting at once (``ConfigError``); ``oom_advice`` turns the
settings that ran out of memory into what to try next (``TrainingError`` carries it).
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

from .hardware import PRECISIONS, resolve_device

class ConfigError(ValueError):
    """A TrainConfig with one or more bad settings; ``.problems`` lists them all."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("bad training settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


WEIGHT_SOURCES = ("openai", "hf", "random")


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; the defaults are chapter 7's."""

    # model
    model: str = "gpt2-medium (355M)"  # a name sft.model.model_config knows, or "tiny" (random, demo only)
    weights: str = "openai"            # "openai" (the book's TF checkpoint), "hf" (safetensors), "random"
    models_dir: str = "models"         # where downloaded GPT-2 weights live
    # data
    data: str | None = None            # None = the chapter's bundled 1100 entries; else a path or URL
    limit: int | None = None           # use only the first N entries (quick demos and tests)
    prompt_style: str = "alpaca"       # "alpaca" (the chapter) or "phi3" (exercise 7.1)
    allowed_max_length: int = 1024     # longer examples are truncated by the collate function
    mask_instruction: bool = False     # exercise 7.2: prompt tokens get target -100
    group_by_length: bool = False      # batches of similar lengths, less padding (changes the order)
    # optimisation (chapter: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs)
    epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    grad_accum_steps: int = 1          # micro-batches per optimizer step: same effective batch, less memory
    max_steps: int | None = None       # stop after this many optimizer steps (demos, tests, benchmarks)
    # evaluation (chapter: every 5 steps over 5 batches) and samples
    eval_freq: int = 5
    eval_iter: int = 5
    sample_each_epoch: bool = True     # generate an answer to the first validation prompt after each epoch
    sample_tokens: int = 50            # the chapter's 50 new tokens
    response_tokens: int = 256         # max new tokens per test-split response after training
    # reproducibility and hardware
    seed: int = 123
    device: str = "auto"               # "auto" picks cuda, then mps, then cpu
    precision: str = "auto"            # "auto" = bf16 autocast where the hardware does bf16 well, else fp32
    tf32: bool = True                  # TF32 matmuls on NVIDIA GPUs (fp32 inputs, ~10 mantissa bits)
    fused_adamw: bool = True           # one fused AdamW kernel (CUDA, and CPU: ~7x less time than the loop)
    compile: bool = False              # torch.compile the model (slow first steps, faster after)
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    masked_head_loss: bool = True      # output head + loss only where targets != -100 (same value, less work)
    num_workers: int = 0               # DataLoader worker processes
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps (epoch ends always)

    @classmethod
    def chapter_path(cls, **overrides):
        """The chapter's exact computation: fp32, full output head, no grouping, no TF32/fused kernels."""
        settings = dict(precision="fp32", masked_head_loss=False, group_by_length=False, tf32=False,
                        fused_adamw=False, compile=False, grad_accum_steps=1)
        return cls(**{**settings, **overrides})

    def is_chapter_path(self):
        return (self.precision == "fp32" and not self.masked_head_loss and not self.group_by_length
                and not self.tf32 and not self.fused_adamw and not self.compile and self.grad_accum_steps == 1)

    def validate(self):
        """Raise ConfigError listing every bad setting (not just the first)."""
        p = []

        def need_int(name, low, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                p.append(f"{name} must be an integer >= {low}" + (" or None" if allow_none else "")
                         + f", got {v!r}")

        for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("eval_freq", 1),
                          ("eval_iter", 1), ("allowed_max_length", 2), ("sample_tokens", 0),
                          ("response_tokens", 1), ("num_workers", 0), ("seed", 0)):
            need_int(name, low)
        for name in ("max_steps", "limit", "checkpoint_every"):
            need_int(name, 1, allow_none=True)
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                p.append(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.lr, (int, float)) and self.lr == 0:
            p.append("lr must be > 0, got 0")
        if self.precision not in PRECISIONS:
            p.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.weights not in WEIGHT_SOURCES:
            p.append(f"weights must be one of {WEIGHT_SOURCES}, got {self.weights!r}")
        try:
            from .model import TINY_NAME, model_config

            model_config(self.model)
            if str(self.model).strip().lower() in ("tiny", TINY_NAME) and self.weights != "random":
                p.append(f"model {self.model!r} has no pretrained weights: set weights='random'")
        except ValueError as exc:
            p.append(f"model: {exc}")
        try:
            from .prompts import PROMPT_STYLES

            if self.prompt_style not in PROMPT_STYLES:
                p.append(f"prompt_style must be one of {sorted(PROMPT_STYLES)}, got {self.prompt_style!r}")
        except ImportError:  # pragma: no cover - prompts is part of the package
            pass
        try:
            resolve_device(self.device)
        except ValueError as exc:
            p.append(f"device: {exc}")
        if p:
            raise ConfigError(p)
        return self

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
            raise ConfigError([f"{source}: unknown setting {k!r}" for k in unknown])
        return cls(**d)

    def save(self, path):
        from .runs import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), source=os.fspath(path))


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
