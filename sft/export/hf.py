"""Export a GPTModel as a Hugging Face GPT-2 folder (``GPT2LMHeadModel`` + GPT-2's tokenizer).

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)``, and its logits equal GPTModel's. This is the
inverse of ``sft.weights.load_gpt2_params_from_safetensors`` + ``load_weights_into_gpt``.

Layouts (C = emb_dim, V = vocab, T = context_length), ours -> GPT-2's:
- nn.Linear keeps its weight as (out, in); GPT-2's Conv1D as (in, out): every block weight
  is transposed.
- GPT-2 has one ``c_attn`` for query, key and value: weight (C, 3C) = [Wq^T | Wk^T | Wv^T],
  bias (3C,) = [bq, bk, bv].
- GPTModel's output head is untied from the token embedding (fine-tuning changes them
  apart), so ``lm_head.weight`` (V, C) is written and ``tie_word_embeddings`` is false;
  only when the two are identical is the head left out and tied, as in OpenAI's GPT-2.
"""
import json
import os

import torch

from ..studio.files import atomic_path
from ..tokenizer import ENDOFTEXT, EOT_ID
from .common import (check_target, fp32, head_is_tied, model_cfg, qkv_bias, write_json,
                     write_record, write_text)
from .templates import chat_template
from .vocab import gpt2_bpe, gpt2_vocab

WEIGHTS_FILE = "model.safetensors"


def gpt2_state_dict(model):
    """GPTModel -> {GPT2LMHeadModel key: float32 tensor}, and whether the head is tied."""
    tied = head_is_tied(model)
    sd = {
        "transformer.wte.weight": fp32(model.tok_emb.weight),  # (V, C)
        "transformer.wpe.weight": fp32(model.pos_emb.weight),  # (T, C)
        "transformer.ln_f.weight": fp32(model.final_norm.scale),  # (C,)
        "transformer.ln_f.bias": fp32(model.final_norm.shift),
    }
    for i, block in enumerate(model.trf_blocks):
        h, att = f"transformer.h.{i}.", block.att
        qkv_w = torch.cat([fp32(att.W_query.weight), fp32(att.W_key.weight), fp32(att.W_value.weight)])  # (3C, C)
        sd.update({
            h + "ln_1.weight": fp32(block.norm1.scale), h + "ln_1.bias": fp32(block.norm1.shift),
            h + "attn.c_attn.weight": qkv_w.T.contiguous(),  # (C, 3C)
            h + "attn.c_attn.bias": torch.cat([qkv_bias(att.W_query), qkv_bias(att.W_key), qkv_bias(att.W_value)]),
            h + "attn.c_proj.weight": fp32(att.out_proj.weight).T.contiguous(),  # (C, C)
            h + "attn.c_proj.bias": fp32(att.out_proj.bias),
            h + "ln_2.weight": fp32(block.norm2.scale), h + "ln_2.bias": fp32(block.norm2.shift),
            h + "mlp.c_fc.weight": fp32(block.ff.layers[0].weight).T.contiguous(),  # (C, 4C)
            h + "mlp.c_fc.bias": fp32(block.ff.layers[0].bias),  # (4C,)
            h + "mlp.c_proj.weight": fp32(block.ff.layers[2].weight).T.contiguous(),  # (4C, C)
            h + "mlp.c_proj.bias": fp32(block.ff.layers[2].bias),
        })
    if not tied:
        sd["lm_head.weight"] = fp32(model.out_head.weight)  # (V, C)
    return sd, tied


def gpt2_config(cfg, tied):
    """config.json: GPT2Config's fields for this model (dropout off: the export is for inference)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_ctx": cfg["context_length"],  # older readers (and llama.cpp's converter) use this name
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,  # None = 4 * n_embd, as in GPTModel's FeedForward
        "activation_function": "gelu_new",  # GPT-2's tanh approximation, our GELU
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True,  # softmax(QK^T / sqrt(head_dim))
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": 0.02,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _tokenizer_json():
    """tokenizer.json (HF's fast tokenizer) built with the ``tokenizers`` library, or None if
    it is not installed (then transformers converts vocab.json + merges.txt on loading)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        return None
    _, merges = gpt2_bpe()
    bpe = models.BPE(vocab=gpt2_vocab(), merges=[tuple(m.split(" ")) for m in merges],
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tok = Tokenizer(bpe)
    # GPT-2: split with its regex, bytes as printable characters, no space added in front.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tok.to_str(pretty=True)


def tokenizer_files(context_length, prompt_style):
    """{file name: text} for GPT-2's tokenizer, with the prompt style as its chat template."""
    tokens, merges = gpt2_bpe()
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
               "pad_token": ENDOFTEXT}  # GPT-2 has one special token; the chapter pads with it too
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode gives back the exact text
        "errors": "replace",
        "model_max_length": context_length,
        **special,
        "added_tokens_decoder": {str(EOT_ID): {"content": ENDOFTEXT, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}},
        "chat_template": chat_template(prompt_style),
    }
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",  # vocab.bpe's own header line
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }
    fast = _tokenizer_json()
    if fast is not None:
        files["tokenizer.json"] = fast
    return files


def export_hf(model, folder, *, prompt_style="alpaca", provenance=None, overwrite=False):
    """Write ``model`` as a Hugging Face GPT-2 folder; return {file name: path} (and "folder").

    ``provenance``: a JSON-able dict saying what the model came from (base model, run, data,
    epochs...), stored in sft-export.json with the prompt style and chat template. A folder
    that exists, is not empty and is not an earlier export is refused unless ``overwrite``.
    """
    from safetensors.torch import save_file

    cfg = model_cfg(model)
    folder = os.fspath(folder)
    check_target(folder, None, overwrite, "Hugging Face")
    sd, tied = gpt2_state_dict(model)
    paths = {"folder": folder}
    path = os.path.join(folder, WEIGHTS_FILE)
    with atomic_path(path) as tmp:
        save_file(sd, tmp, metadata={"format": "pt"})  # "pt": transformers reads it as PyTorch weights
    paths[WEIGHTS_FILE] = path
    paths["config.json"] = write_json(os.path.join(folder, "config.json"), gpt2_config(cfg, tied))
    generation = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID, "do_sample": False}
    paths["generation_config.json"] = write_json(os.path.join(folder, "generation_config.json"), generation)
    for name, text in tokenizer_files(cfg["context_length"], prompt_style).items():
        paths[name] = write_text(os.path.join(folder, name), text)
    files = {name: {"bytes": os.path.getsize(p)} for name, p in paths.items() if name != "folder"}
    paths["sft-export.json"] = write_record(
        folder, fmt="hf", files=files, prompt_style=prompt_style, provenance=provenance,
        extra={"architecture": "GPT2LMHeadModel", "tie_word_embeddings": tied,
               "qkv_bias_written_as_zeros": model.trf_blocks[0].att.W_query.bias is None})
    return paths
