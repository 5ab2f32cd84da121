"""Not in the book, beside chapter 7's ``torch.save(model.state_dict(), file_name)``: fine-tuned files.

``save_finetuned`` writes the chapter's ``<name>-sft.pth`` state dict, the same weights as
``.safetensors``, and a ``.json`` with the model's config (and extras such as the prompt style),
each atomically; ``load_finetuned`` reads any of them back without unpickling anything
(``weights_only=True`` or safetensors) and rebuilds the ``GPTModel`` from the config.
"""
import json
import os
import re

import torch

from ..model import GPTModel
from .files import atomic_write, atomic_write_text

_HEADS_BY_EMB_DIM = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # GPT-2's four sizes

def finetuned_filename(choose_model):
    """Chapter 7's file name: "gpt2-medium (355M)" -> "gpt2-medium355M-sft.pth"."""
    return f"{re.sub(r'[ ()]', '', choose_model)}-sft.pth"


def _stem(path):
    path = os.fspath(path)
    for ext in (".pth", ".safetensors", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def config_from_model(model):
    """The chapter's cfg dict, read off a GPTModel's modules."""
    att = model.trf_blocks[0].att
    return {"vocab_size": model.tok_emb.num_embeddings, "context_length": model.pos_emb.num_embeddings,
            "emb_dim": model.tok_emb.embedding_dim, "n_heads": att.num_heads,
            "n_layers": len(model.trf_blocks), "drop_rate": model.drop_emb.p,
            "qkv_bias": att.W_query.bias is not None}


def save_finetuned(model, path, *, cfg=None, extra=None):
    """Save ``model`` as ``<stem>.pth`` (the chapter's state_dict), ``<stem>.safetensors`` and
    ``<stem>.json`` (config + ``extra``, e.g. the prompt style); returns the three paths.

    ``path`` may be the chapter's name (``gpt2-medium355M-sft.pth``) or a stem.
    """
    from safetensors.torch import save_file

    stem = _stem(path)
    info = {"format": "sft-studio-finetuned", "version": 1,
            "config": dict(cfg or config_from_model(model)), "extra": extra or {}}
    text = json.dumps(info, indent=2)  # fails on unserialisable extra before anything is written
    if os.path.dirname(stem):
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    state = model.state_dict()
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    tensors, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    paths = {"pth": stem + ".pth", "safetensors": stem + ".safetensors", "json": stem + ".json"}
    atomic_write(paths["pth"], lambda tmp: torch.save(state, tmp), durable=True)
    atomic_write(paths["safetensors"], lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), durable=True)
    atomic_write_text(paths["json"], text)
    return paths


def finetuned_info(path):
    """The JSON saved beside a fine-tuned model ({"config", "extra", ...}), or None if absent."""
    json_path = _stem(path) + ".json"
    if not os.path.exists(json_path):
        return None
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info.get("config"), dict):
            raise ValueError("no 'config' object")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"Bad fine-tuned model config {json_path}: {e}") from e
    return info


def _config_from_state(state, source):
    # For a bare .pth (e.g. the book's own): shapes give all but n_heads, which GPT-2's sizes fix.
    try:
        vocab, emb = state["tok_emb.weight"].shape
        n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("trf_blocks."))
        context = state["pos_emb.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source} is not a GPTModel state_dict ({e})") from e
    if emb not in _HEADS_BY_EMB_DIM:
        raise ValueError(f"{source}: cannot tell n_heads for emb_dim={emb}; pass cfg= or keep its .json")
    return {"vocab_size": vocab, "context_length": context, "emb_dim": emb,
            "n_heads": _HEADS_BY_EMB_DIM[emb], "n_layers": n_layers, "drop_rate": 0.0,
            "qkv_bias": "trf_blocks.0.att.W_query.bias" in state}


def load_finetuned(path, *, cfg=None, device="cpu"):
    """A GPTModel (eval mode) from ``save_finetuned``'s files or a chapter-style ``.pth``.

    Reads ``.safetensors`` (preferred when ``path`` names no format) or ``.pth`` with
    ``torch.load(weights_only=True)``; the config comes from ``cfg``, the ``.json``, or the shapes.
    """
    from safetensors.torch import load_file

    path, stem = os.fspath(path), _stem(path)
    if path.endswith((".pth", ".safetensors")):
        candidates = [path]
    else:
        candidates = [stem + ".safetensors", stem + ".pth"]
    weights = next((p for p in candidates if os.path.isfile(p)), None)
    if weights is None:
        raise FileNotFoundError(f"No fine-tuned weights at {' or '.join(candidates)}")
    try:
        if weights.endswith(".safetensors"):
            state = load_file(weights, device=str(device))
        else:
            state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as e:  # corrupt file, or a pickle with more than tensors in it
        raise ValueError(f"Could not read {weights}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]  # a chapter-5 style training checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{weights} does not hold a state_dict")
    info = finetuned_info(stem)
    cfg = cfg or (info["config"] if info else _config_from_state(state, weights))
    model = GPTModel(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys or wrong shapes
        raise ValueError(f"{weights} does not fit a GPTModel with config {cfg}: {e}") from e
    return model.to(device).eval()
