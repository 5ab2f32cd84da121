"""Export a GPTModel as a GGUF file for llama.cpp (architecture ``gpt2``) and Ollama.

Written with the ``gguf`` package, llama.cpp's own Python writer. The names and metadata are
those llama.cpp's ``gpt2`` loader reads (``src/models/gpt2.cpp``, and the GPT2 entry of
``gguf-py/gguf/constants.py``). In the file a tensor's numpy shape (rows, cols) is ggml's
{cols, rows}; the loader asks for e.g. attn_qkv {C, 3C}, which is numpy (3C, C): exactly
nn.Linear's (out, in) layout, so our weights go in untransposed (HF's Conv1D would need a
transpose). C = emb_dim, V = vocab (50257), T = context_length, L = n_layers:

    token_embd.weight      (V, C)     position_embd.weight  (T, C)
    blk.N.attn_norm.weight/.bias (C)  blk.N.attn_qkv.weight (3C, C) = [Wq; Wk; Wv], .bias (3C)
    blk.N.attn_output.weight (C, C), .bias (C)
    blk.N.ffn_norm.weight/.bias (C)   blk.N.ffn_up.weight (4C, C), .bias (4C)
    blk.N.ffn_down.weight (C, 4C), .bias (C)
    output_norm.weight/.bias (C)      output.weight (V, C)  (left out when tied to token_embd:
                                                             the loader then reuses token_embd)

dtypes: "f32" keeps everything; "f16" and "q8_0" convert the 2-D weight matrices only. Norms,
biases and position_embd stay f32, as llama.cpp's converter and quantizer keep them; q8_0
(blocks of 32 values along a row, one f16 scale each) falls back to f16 for a matrix whose
rows are not a multiple of 32 long.
"""
import os

import numpy as np

from ..prompts import get_prompt_style
from ..studio.files import atomic_path
from ..tokenizer import EOT_ID
from .common import (PROVENANCE_FILE, check_target, fp32, head_is_tied, model_cfg, qkv_bias,
                     write_record, write_text)
from .modelfile import MODELFILE, modelfile_text, ollama_commands, ollama_name
from .templates import chat_template
from .vocab import gpt2_bpe

DTYPES = ("f32", "f16", "q8_0")
LAYER_NORM_EPS = 1e-5


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("Writing GGUF needs llama.cpp's writer: `pip install gguf`") from e
    return gguf


def gguf_tensors(model):
    """GPTModel -> [(GGUF name, float32 numpy array)], in llama.cpp's gpt2 naming."""
    def np32(t):
        return fp32(t).numpy()

    out = [("token_embd.weight", np32(model.tok_emb.weight)), ("position_embd.weight", np32(model.pos_emb.weight))]
    for i, block in enumerate(model.trf_blocks):
        b, att = f"blk.{i}.", block.att
        qkv = np.concatenate([np32(att.W_query.weight), np32(att.W_key.weight), np32(att.W_value.weight)])
        qkv_b = np.concatenate([qkv_bias(att.W_query).numpy(), qkv_bias(att.W_key).numpy(),
                                qkv_bias(att.W_value).numpy()])  # zeros if built with qkv_bias=False
        out += [
            (b + "attn_norm.weight", np32(block.norm1.scale)), (b + "attn_norm.bias", np32(block.norm1.shift)),
            (b + "attn_qkv.weight", qkv), (b + "attn_qkv.bias", qkv_b),
            (b + "attn_output.weight", np32(att.out_proj.weight)), (b + "attn_output.bias", np32(att.out_proj.bias)),
            (b + "ffn_norm.weight", np32(block.norm2.scale)), (b + "ffn_norm.bias", np32(block.norm2.shift)),
            (b + "ffn_up.weight", np32(block.ff.layers[0].weight)), (b + "ffn_up.bias", np32(block.ff.layers[0].bias)),
            (b + "ffn_down.weight", np32(block.ff.layers[2].weight)),
            (b + "ffn_down.bias", np32(block.ff.layers[2].bias)),
        ]
    out += [("output_norm.weight", np32(model.final_norm.scale)), ("output_norm.bias", np32(model.final_norm.shift))]
    if not head_is_tied(model):
        out.append(("output.weight", np32(model.out_head.weight)))
    return out


def _convert(gguf, name, array, dtype):
    """(data, ggml type) for one tensor in the chosen file dtype (see the module docstring)."""
    Q = gguf.GGMLQuantizationType
    if dtype == "f32" or array.ndim < 2 or not name.endswith(".weight") or name == "position_embd.weight":
        return array, Q.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0  # uint8 bytes, 34 per block of 32
        except gguf.QuantError:
            pass  # row length not a multiple of 32
    return array.astype(np.float16), Q.F16


def export_gguf(model, path, *, dtype="f32", prompt_style="alpaca", name="sft-gpt2", provenance=None,
                modelfile=True, overwrite=False):
    """Write ``model`` to the GGUF file ``path``; beside it sft-export.json and (``modelfile``)
    an Ollama Modelfile. Returns {"gguf", "sft-export.json", "modelfile", "commands"}.

    Refuses to replace a file that is not from an earlier export unless ``overwrite``.
    """
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    style = get_prompt_style(prompt_style)
    cfg = model_cfg(model)
    path = os.fspath(path)
    folder, file_name = os.path.split(os.path.abspath(path))
    check_target(folder, [file_name, PROVENANCE_FILE] + ([MODELFILE] if modelfile else []), overwrite, "GGUF")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tokens, merges = gpt2_bpe()
    # Both templates first: a style they cannot express fails before anything is written.
    template = chat_template(style)
    modelfile_body = modelfile_text(file_name, style, cfg["context_length"]) if modelfile else None

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "gpt2")  # general.architecture = "gpt2": keys below are "gpt2.*"
        w.add_name(name)
        w.add_description(f"GPT-2 exported by SFT Studio (prompt style {style.name})")
        w.add_context_length(cfg["context_length"])
        w.add_embedding_length(cfg["emb_dim"])
        w.add_feed_forward_length(4 * cfg["emb_dim"])
        w.add_block_count(cfg["n_layers"])
        w.add_head_count(cfg["n_heads"])  # no head_count_kv: the loader then takes n_head (no GQA)
        w.add_layer_norm_eps(LAYER_NORM_EPS)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # Tokenizer: GPT-2's byte-level BPE ("gpt2"), split with GPT-2's regex ("gpt-2").
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(list(tokens))  # byte-level strings as in vocab.json, in id order
        # <|endoftext|> is CONTROL: matched as one token in text only when asked (special=True).
        w.add_token_types([gguf.TokenType.NORMAL] * EOT_ID + [gguf.TokenType.CONTROL])
        w.add_token_merges(list(merges))
        w.add_bos_token_id(EOT_ID)
        w.add_eos_token_id(EOT_ID)
        w.add_unk_token_id(EOT_ID)
        w.add_add_bos_token(False)  # GPT-2 prompts start with no BOS, as in training
        w.add_add_eos_token(False)
        w.add_chat_template(template)
        for tensor_name, array in gguf_tensors(model):
            data, qtype = _convert(gguf, tensor_name, array, dtype)
            w.add_tensor(tensor_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    result = {"gguf": path}
    if modelfile:
        result["modelfile"] = write_text(os.path.join(folder, MODELFILE), modelfile_body)
        result["commands"] = ollama_commands(result["modelfile"], name)
    files = {file_name: {"dtype": dtype, "bytes": os.path.getsize(path)}}
    result["sft-export.json"] = write_record(
        folder, fmt="gguf", files=files, prompt_style=style, provenance=provenance,
        extra={"architecture": "gpt2", "name": name, "ollama_name": ollama_name(name),
               **({"modelfile": MODELFILE, "modelfile_from": file_name} if modelfile else {})})
    return result
