"""What the HF and GGUF exports share: the folder check, the provenance record (files are written
atomically by ``sft.studio.files``)."""
import json
import os
from datetime import datetime, timezone

import torch

from ..prompts import get_prompt_style
from ..studio.files import atomic_write_json, atomic_write_text
from ..tokenizer import EOT_ID
from .templates import chat_template

PROVENANCE_FILE = "sft-export.json"  # also marks a folder as one of our exports
GPT2_VOCAB_SIZE = EOT_ID + 1  # the exported tokenizer is GPT-2's, so the model must match it


def write_text(path, text):
    return os.fspath(atomic_write_text(path, text))


def write_json(path, data):
    return os.fspath(atomic_write_json(path, data))


def read_record(folder):
    """The provenance record of an earlier export in ``folder``, or None if there is none."""
    try:
        with open(os.path.join(folder, PROVENANCE_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("exporter") == "sft.export" else None


def check_target(folder, would_write, overwrite, what):
    """Create ``folder``; refuse to write into someone else's files unless ``overwrite``.

    A folder holding one of our exports (it has sft-export.json) is ours to update. Otherwise
    writing is refused if ``would_write`` (file names) would replace existing files, or, for
    ``would_write=None`` (a folder meant for the export alone), if the folder is not empty.
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is a file, not a folder; choose another {what} location")
    os.makedirs(folder, exist_ok=True)
    if overwrite or read_record(folder) is not None:
        return
    if would_write is None:
        clash = sorted(os.listdir(folder))
    else:
        clash = [name for name in would_write if os.path.exists(os.path.join(folder, name))]
    if clash:
        shown = ", ".join(clash[:5]) + (" ..." if len(clash) > 5 else "")
        raise FileExistsError(
            f"{folder} already holds files that are not an SFT Studio export ({shown}); "
            f"choose an empty or new folder for the {what} export, or pass overwrite=True to write there anyway")


def write_record(folder, *, fmt, files, prompt_style, provenance, extra=None):
    """Write sft-export.json: what the files came from, and how to prompt the model.

    ``files`` {name: details}; when the folder already has our record of the same format it is
    updated, not replaced, so several GGUF files exported one by one are all listed.
    """
    style = get_prompt_style(prompt_style)
    old = read_record(folder)
    old = old if old and old.get("format") == fmt else {}
    all_files = {**old.get("files", {}), **files}
    record = {
        **old,  # e.g. which GGUF the Modelfile points to, when this call wrote no Modelfile
        "exporter": "sft.export",
        "format": fmt,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": all_files,
        "prompt_style": style.name,
        "response_prefix": style.response_prefix,
        "chat_template": chat_template(style),
        "provenance": dict(provenance or {}),
        **(extra or {}),
    }
    return write_json(os.path.join(folder, PROVENANCE_FILE), record)


def model_cfg(model):
    """The GPT-2 hyperparameters of a GPTModel, read from its modules (no config dict needed)."""
    vocab, emb = model.tok_emb.weight.shape
    blocks = list(model.trf_blocks)
    if not blocks:
        raise ValueError("the model has no transformer blocks")
    cfg = {"vocab_size": vocab, "emb_dim": emb, "context_length": model.pos_emb.weight.shape[0],
           "n_layers": len(blocks), "n_heads": blocks[0].att.num_heads}
    if vocab != GPT2_VOCAB_SIZE:
        raise ValueError(f"the model's vocabulary has {vocab} tokens, GPT-2's tokenizer {GPT2_VOCAB_SIZE}: "
                         "only models with GPT-2's vocabulary can be exported with its tokenizer")
    return cfg


def fp32(tensor):
    """A detached, contiguous float32 CPU copy (whatever the model's device and dtype)."""
    return tensor.detach().to("cpu", torch.float32).contiguous().clone()


def head_is_tied(model):
    """True only if the output head equals the token embedding exactly (e.g. never fine-tuned)."""
    return bool(torch.equal(fp32(model.out_head.weight), fp32(model.tok_emb.weight)))


def qkv_bias(linear):
    """A query/key/value Linear's bias; zeros when the model was built with qkv_bias=False.

    GPT-2 (HF's GPT2 and llama.cpp's gpt2 alike) always has these biases; a zero bias computes
    exactly what no bias does.
    """
    if linear.bias is not None:
        return fp32(linear.bias)
    return torch.zeros(linear.weight.shape[0], dtype=torch.float32)
