"""Not in the book, beside chapter 7's ``torch.save(model.state_dict(), file_name)``: fine-tuned files.

``save_finetuned`` writes the chapter's ``<name>-sft.pth`` state dict, the same weights as
``.safetensors``, and a ``.json`` with the model's config, the SHA-256 of each weights file and
extras such as the prompt style, each atomically; ``load_finetuned`` reads any of them back
without unpickling anything (``weights_only=True`` or safetensors), checks them (hash, names,
shapes, dtype, finite values) and only then builds the ``GPTModel``: a bad file is a
``ValueError`` naming it, before any large allocation.
"""
import hashlib
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
    atomic_write(paths["pth"], lambda tmp: _torch_save(state, tmp), durable=True)
    atomic_write(paths["safetensors"], lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), durable=True)
    info["sha256"] = {kind: file_sha256(paths[kind]) for kind in ("pth", "safetensors")}
    atomic_write_text(paths["json"], json.dumps(info, indent=2))
    return paths


def _torch_save(obj, path):
    with open(path, "wb") as f:  # closed on any error: a full disk gets its space back at once
        torch.save(obj, f)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finetuned_info(path):
    """The JSON saved beside a fine-tuned model ({"config", "extra", ...}), or None if absent."""
    json_path = _stem(path) + ".json"
    if not os.path.exists(json_path):
        return None
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise ValueError("no 'config' object")
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"Bad fine-tuned model config {json_path}: {e}") from e
    return info


CONFIG_KEYS = {"vocab_size": int, "context_length": int, "emb_dim": int, "n_heads": int, "n_layers": int,
               "drop_rate": (int, float), "qkv_bias": bool}
LIMITS = {"vocab_size": 1 << 20, "context_length": 1 << 16, "emb_dim": 1 << 14, "n_heads": 1 << 8, "n_layers": 256}


def check_config(cfg, source):
    """A config dict a GPTModel can be built from, within limits (so a bad one never allocates)."""
    problems = []
    for key, kind in CONFIG_KEYS.items():
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            problems.append(f"{key} is {value!r}")
        elif key in LIMITS and not 1 <= value <= LIMITS[key]:
            problems.append(f"{key}={value} is outside 1..{LIMITS[key]}")
    if not problems and cfg["emb_dim"] % cfg["n_heads"]:
        problems.append(f"emb_dim={cfg['emb_dim']} is not divisible by n_heads={cfg['n_heads']}")
    if problems:
        raise ValueError(f"{source}: not a GPT-2 config: " + "; ".join(problems))
    return cfg


def check_state(state, cfg, source):
    """The state dict fits ``cfg`` (names and shapes, checked on the meta device: nothing allocated)
    and holds finite float32 tensors."""
    with torch.device("meta"):
        expected = GPTModel(cfg).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith(".att.mask"))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit a GPTModel with config {cfg}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, shape in ((k, tuple(v.shape)) for k, v in expected.items()):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{source} does not fit a GPTModel with config {cfg}: {name} is {got}, "
                             f"expected {shape}")
        if tensor.dtype != torch.float32:
            raise ValueError(f"{source}: tensor {name} is {tensor.dtype}, expected torch.float32 (SFT Studio "
                             "saves fine-tuned weights in float32)")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: tensor {name} holds NaN or infinite values")


def _config_from_state(state, source):
    # For a bare .pth (e.g. the book's own): shapes give all but n_heads, which GPT-2's sizes fix.
    try:
        vocab, emb = state["tok_emb.weight"].shape
        n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("trf_blocks."))
        context = state["pos_emb.weight"].shape[0]
    except (KeyError, ValueError, AttributeError, TypeError) as e:
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
    recorded = ((info or {}).get("sha256") or {}).get("safetensors" if weights.endswith(".safetensors") else "pth")
    if recorded and recorded != file_sha256(weights):
        raise ValueError(f"{weights} has changed since it was saved: its SHA-256 differs from the one in "
                         f"{stem}.json (a partial copy, or an edited file)")
    cfg = check_config(cfg or (info["config"] if info else _config_from_state(state, weights)),
                       stem + ".json" if info and cfg is None else weights)
    check_state(state, cfg, weights)
    model = GPTModel(cfg)
    model.load_state_dict(state)
    return model.to(device).eval()
