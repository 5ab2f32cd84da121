"""Not in the book: LoRA (``sft.lora``, appendix E) as a run's method.

A LoRA run freezes its base model and trains adapters (``apply_lora``); its checkpoints keep
only the adapter tensors, with the settings and base they belong to (``adapter_state`` /
``load_adapter_state``), since the base is rebuilt exactly from the run's config (the same
downloaded or seeded weights). At the end the adapters are merged into the base
(``sft.lora.merge_lora``) so everything downstream reads a plain ``GPTModel``.
"""
import torch

from ..lora import (LORA_TARGETS, freeze_for_lora, load_lora_state_dict, lora_config, lora_state_dict,
                    replace_linear_with_lora)
from ..model import canonical_model_name, model_config

ADAPTER_FORMAT = "sft-studio-lora-adapter"


def apply_lora(model, config):
    """Freeze ``model`` and wrap its target layers in adapters, as ``config`` says; returns it.

    A no-op for full fine-tuning (``lora_rank`` 0). The adapters' A matrices are drawn from a
    generator seeded with ``config.seed`` on the side, so the global RNG (and with it the
    chapter's data order and dropout) is the same as for full fine-tuning.
    """
    if not config.lora_rank:
        return model
    freeze_for_lora(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        replace_linear_with_lora(model, config.lora_rank, config.lora_alpha, targets=config.lora_target_list(),
                                 dropout=config.lora_dropout)
    return freeze_for_lora(model)


def adapter_state(model, config):
    """The adapters' tensors plus what they belong to (a ``torch.load(weights_only=True)`` dict)."""
    return {"format": ADAPTER_FORMAT, "tensors": lora_state_dict(model), "lora": lora_config(model),
            "base_model": canonical_model_name(config.model), "weights": config.weights, "seed": config.seed}


def load_adapter_state(model, state, *, source="checkpoint"):
    """Copy an ``adapter_state`` into ``model``'s adapters; ValueError naming ``source`` if it does not fit."""
    if not isinstance(state, dict) or state.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{source} holds full weights, not LoRA adapters: it belongs to a full fine-tuning run")
    mine = lora_config(model)
    if state.get("lora") != mine:
        raise ValueError(f"{source}: adapters {state.get('lora')} do not match this run's LoRA settings {mine}")
    try:
        load_lora_state_dict(model, state["tensors"])
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return model


def trainable_state(model, config):
    """What a checkpoint keeps of the model: every tensor, or under LoRA only the adapters."""
    return adapter_state(model, config) if config.lora_rank else model.state_dict()


def load_trainable_state(model, config, state, *, source="checkpoint"):
    """Put ``trainable_state``'s dict back into ``model``; a full state into a LoRA run (or the
    reverse) is a ValueError naming ``source``."""
    if config.lora_rank:
        return load_adapter_state(model, state, source=source)
    if isinstance(state, dict) and state.get("format") == ADAPTER_FORMAT:
        raise ValueError(f"{source} holds LoRA adapters, but this run fine-tunes every weight")
    model.load_state_dict(state)
    return model


def _linear_shapes(cfg):
    """{target: (in, out, count)} of GPTModel's Linear layers for a model config dict."""
    d, n, v = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    return {"query": (d, d, n), "key": (d, d, n), "value": (d, d, n), "attn_out": (d, d, n),
            "ff_in": (d, 4 * d, n), "ff_out": (4 * d, d, n), "head": (d, v, 1)}


def lora_counts(model_name, rank, targets=None):
    """(trainable, total, share) of a LoRA model before building it: ``rank`` x (in + out) per
    wrapped Linear. gpt2-medium, rank 16, every Linear: 7,898,384 of 414,184,720."""
    cfg = model_config(model_name)
    shapes = _linear_shapes(cfg)
    chosen = LORA_TARGETS if targets is None else tuple(targets)
    adapters = sum(rank * (i + o) * k for t, (i, o, k) in shapes.items() if t in chosen)
    d, n, v, c = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"], cfg["context_length"]
    bias = 1 if cfg["qkv_bias"] else 0
    block = 3 * (d * d + bias * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    base = v * d + c * d + n * block + 2 * d + d * v
    total = base + adapters
    return adapters, total, adapters / total


def save_adapter(path, model, config):
    """Write the adapters as safetensors (atomically), their settings and base in its metadata."""
    import json

    from safetensors.torch import save_file

    from .files import atomic_write

    state = adapter_state(model, config)
    meta = {k: json.dumps(v) for k, v in state.items() if k != "tensors"}
    tensors = {k: t.detach().cpu().contiguous() for k, t in state["tensors"].items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_adapter(path):
    """``adapter_state`` dict back from ``save_adapter``'s file (no pickle involved)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        state = {k: json.loads(v) for k, v in meta.items()}
    except ValueError:
        raise ValueError(f"{path}: unreadable adapter settings in its metadata") from None
    return {**state, "tensors": tensors}
