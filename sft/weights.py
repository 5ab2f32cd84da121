"""GPT-2 weights: downloads, the two checkpoint readers, the chapter's loader (chapter 5's gpt_download.py).

Two sources give the same ``params`` dict (the layout of OpenAI's checkpoint, arrays squeezed):
- OpenAI's TensorFlow checkpoint, as the book downloads it (``download_and_load_gpt2``; needs TensorFlow),
- Hugging Face's ``model.safetensors`` of the same models (``download_hf_gpt2``; no TensorFlow).
``load_weights_into_gpt(gpt, params)`` copies either into ``GPTModel``.

params = {"wte": (V, C), "wpe": (T, C), "g": (C,), "b": (C,), "blocks": [
    {"attn": {"c_attn": {"w": (C, 3C), "b": (3C,)}, "c_proj": {"w": (C, C), "b": (C,)}},
     "mlp": {"c_fc": {"w": (C, 4C), "b": (4C,)}, "c_proj": {"w": (4C, C), "b": (C,)}},
     "ln_1": {"g", "b"}, "ln_2": {"g", "b"}}, ...]}
Both checkpoints store linear weights as (in, out); torch's nn.Linear wants (out, in), hence the ``.T``.
"""
import json
import os
import re

import numpy as np
import torch

from . import download
from .model import GPTModel, is_tiny, model_config

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"  # the book's mirror
OPENAI_FILES = (
    "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
    "model.ckpt.index", "model.ckpt.meta", "vocab.bpe",
)
HF_BASE_URL = "https://huggingface.co"
HF_REPOS = {  # model_size -> Hugging Face repo holding the same weights as model.safetensors
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
ALLOWED_SIZES = tuple(HF_REPOS)
_SIZE_BY_EMB_DIM = {768: "124M", 1024: "355M", 1280: "774M", 1600: "1558M"}
TF_INSTALL_HINT = (
    "Reading OpenAI's GPT-2 checkpoint needs TensorFlow: `pip install tensorflow-cpu`. "
    "Or use the Hugging Face source (source='hf', model.safetensors), which needs no TensorFlow."
)


# ----------------------------------------------------------------------------- OpenAI (TensorFlow)

def _import_tf():
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(TF_INSTALL_HINT) from e
    return tf


def download_and_load_gpt2(model_size, models_dir, *, progress=None, show_bar=True,
                           base_url=OPENAI_BASE_URL, backup_base_url=OPENAI_BACKUP_URL):
    """Chapter 5: fetch OpenAI's GPT-2 files into ``models_dir/model_size``; return (settings, params)."""
    if model_size not in ALLOWED_SIZES:
        raise ValueError(f"Model size not in {ALLOWED_SIZES}")
    tf = _import_tf()  # before downloading gigabytes that could not be read
    model_dir = _download_openai(model_size, models_dir, progress=progress, show_bar=show_bar,
                                 base_url=base_url, backup_base_url=backup_base_url)
    settings = _read_hparams(os.path.join(model_dir, "hparams.json"))
    ckpt_path = tf.train.latest_checkpoint(model_dir) or os.path.join(model_dir, "model.ckpt")
    return settings, load_gpt2_params_from_tf_ckpt(ckpt_path, settings)


def _download_openai(model_size, models_dir, *, progress, show_bar, base_url=OPENAI_BASE_URL,
                     backup_base_url=OPENAI_BACKUP_URL):
    model_dir = os.path.join(models_dir, model_size)
    bases = [b for b in (base_url, backup_base_url) if b]
    download.download_all(OPENAI_FILES, lambda f: [f"{b.rstrip('/')}/{model_size}/{f}" for b in bases],
                  model_dir, f"GPT-2 {model_size}", progress=progress, show_bar=show_bar)
    return model_dir


def _read_hparams(path):
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Could not read {path}: {e}") from e
    missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in settings]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return settings


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Chapter 5: read every ``model/...`` variable into the nested params dict, squeezed."""
    tf = _import_tf()
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    try:
        variables = tf.train.list_variables(ckpt_path)
    except Exception as e:  # tf.errors.NotFoundError, DataLossError, ...
        raise ValueError(f"Could not read TensorFlow checkpoint {ckpt_path}: {e}") from e
    for name, _ in variables:
        parts = name.split("/")
        if parts[0] != "model" or len(parts) < 2:
            raise ValueError(f"{ckpt_path}: unexpected variable {name!r} (GPT-2's start with 'model/')")
        try:
            array = np.squeeze(tf.train.load_variable(ckpt_path, name))  # (1, C, 3C) conv1d -> (C, 3C)
        except Exception as e:
            raise ValueError(f"{ckpt_path}: could not read variable {name!r}: {e}") from e
        target = params
        layer = re.fullmatch(r"h(\d+)", parts[1])
        if layer:  # model/h<i>/attn/c_attn/w -> params["blocks"][i]["attn"]["c_attn"]["w"]
            i = int(layer.group(1))
            if i >= settings["n_layer"]:
                raise ValueError(f"{ckpt_path}: variable {name!r} but n_layer is {settings['n_layer']}")
            target = params["blocks"][i]
        for key in parts[2:-1]:  # the second part is the layer, or a scope dropped: ln_f/g -> "g"
            target = target.setdefault(key, {})
        target[parts[-1]] = array
    return params


# ----------------------------------------------------------------------------- Hugging Face

def download_hf_gpt2(model_size, models_dir, *, progress=None, show_bar=True, base_url=HF_BASE_URL):
    """Not in the book: fetch Hugging Face's GPT-2 ``model.safetensors`` (no TensorFlow); return its path.

    Saved as ``models_dir/hf/<repo name>/model.safetensors``, e.g. ``models/hf/gpt2-medium/``.
    """
    if model_size not in ALLOWED_SIZES:
        raise ValueError(f"Model size not in {ALLOWED_SIZES}")
    repo = HF_REPOS[model_size]
    folder = os.path.join(models_dir, "hf", repo.split("/")[-1])
    download.download_all(["model.safetensors"], lambda f: [f"{base_url.rstrip('/')}/{repo}/resolve/main/{f}"],
                  folder, f"GPT-2 {model_size} ({repo})", progress=progress, show_bar=show_bar)
    return os.path.join(folder, "model.safetensors")


def load_gpt2_params_from_safetensors(path):
    """Not in the book: convert a Hugging Face GPT-2 safetensors file into the chapter's params dict."""
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                short = key.removeprefix("transformer.")  # GPT2LMHeadModel's keys carry this prefix
                if short.startswith(("wte.", "wpe.", "ln_f.", "h.")):
                    tensors[short] = key
            arrays = {k: f.get_tensor(full).float().numpy() for k, full in tensors.items()
                      if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
    except Exception as e:  # SafetensorError for a corrupt header, OSError for a missing file
        raise ValueError(f"Could not read safetensors file {path}: {e}") from e

    def get(key):
        if key not in arrays:
            raise ValueError(f"{path}: missing tensor {key!r} (is this a GPT-2 checkpoint?)")
        return arrays[key]

    n_layer = 1 + max((int(k.split(".")[1]) for k in arrays if k.startswith("h.")), default=-1)
    blocks = []
    for i in range(n_layer):
        wb = lambda name: {"w": get(f"h.{i}.{name}.weight"), "b": get(f"h.{i}.{name}.bias")}  # noqa: E731
        gb = lambda name: {"g": get(f"h.{i}.{name}.weight"), "b": get(f"h.{i}.{name}.bias")}  # noqa: E731
        blocks.append({"attn": {"c_attn": wb("attn.c_attn"), "c_proj": wb("attn.c_proj")},
                       "mlp": {"c_fc": wb("mlp.c_fc"), "c_proj": wb("mlp.c_proj")},
                       "ln_1": gb("ln_1"), "ln_2": gb("ln_2")})
    return {"wte": get("wte.weight"), "wpe": get("wpe.weight"), "blocks": blocks,
            "g": get("ln_f.weight"), "b": get("ln_f.bias")}


def load_hf_safetensors_into_gpt(gpt, path):
    """Not in the book: load a Hugging Face GPT-2 ``model.safetensors`` into ``gpt``."""
    load_weights_into_gpt(gpt, load_gpt2_params_from_safetensors(path))
    return gpt


# ----------------------------------------------------------------------------- into GPTModel

def assign(left, right):
    """Chapter 5: a new Parameter holding ``right``, refused if the shapes differ."""
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}")
    return torch.nn.Parameter(torch.as_tensor(np.asarray(right), dtype=left.dtype, device=left.device))


def _copy(gpt, target, array, source):
    """Copy ``array`` into the parameter named ``target`` in place (keeps dtype, device, identity)."""
    try:
        param = gpt.get_parameter(target)
    except AttributeError:  # no such module, or e.g. W_query.bias is None (qkv_bias=False)
        param = None
    if param is None:
        raise ValueError(f"Model has no parameter {target} for checkpoint {source}"
                         + (" (build it with qkv_bias=True: GPT-2 has attention biases)"
                            if target.endswith("bias") and ".att." in target else ""))
    array = np.asarray(array)
    if tuple(param.shape) != array.shape:
        raise ValueError(f"Shape mismatch for {target}: model has {tuple(param.shape)}, "
                         f"checkpoint {source} gives {array.shape}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def _get(params, *keys):
    node = params
    for depth, key in enumerate(keys):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            path = "params" + "".join(f"[{k!r}]" for k in keys[:depth + 1])
            raise ValueError(f"GPT-2 params lack {path}") from None
    return node


def load_weights_into_gpt(gpt, params):
    """Chapter 5: copy the params dict (either source) into ``gpt``'s chapter-named modules."""
    n_blocks = len(_get(params, "blocks"))
    if n_blocks != len(gpt.trf_blocks):
        raise ValueError(f"Checkpoint has {n_blocks} transformer blocks, model has {len(gpt.trf_blocks)}")
    _copy(gpt, "pos_emb.weight", _get(params, "wpe"), "wpe")
    _copy(gpt, "tok_emb.weight", _get(params, "wte"), "wte")
    for b in range(n_blocks):
        p, m = (lambda *k: _get(params, "blocks", b, *k)), f"trf_blocks.{b}"
        # c_attn packs query, key and value side by side: (C, 3C) -> three (C, C)
        q_w, k_w, v_w = np.split(p("attn", "c_attn", "w"), 3, axis=-1)
        q_b, k_b, v_b = np.split(p("attn", "c_attn", "b"), 3, axis=-1)
        for name, w, bias in (("W_query", q_w, q_b), ("W_key", k_w, k_b), ("W_value", v_w, v_b)):
            _copy(gpt, f"{m}.att.{name}.weight", w.T, f"h{b}/attn/c_attn/w")
            _copy(gpt, f"{m}.att.{name}.bias", bias, f"h{b}/attn/c_attn/b")
        for target, keys in (("att.out_proj", ("attn", "c_proj")), ("ff.layers.0", ("mlp", "c_fc")),
                             ("ff.layers.2", ("mlp", "c_proj"))):
            _copy(gpt, f"{m}.{target}.weight", p(*keys, "w").T, f"h{b}/{'/'.join(keys)}/w")
            _copy(gpt, f"{m}.{target}.bias", p(*keys, "b"), f"h{b}/{'/'.join(keys)}/b")
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            _copy(gpt, f"{m}.{norm}.scale", p(ln, "g"), f"h{b}/{ln}/g")
            _copy(gpt, f"{m}.{norm}.shift", p(ln, "b"), f"h{b}/{ln}/b")
    _copy(gpt, "final_norm.scale", _get(params, "g"), "ln_f/g")
    _copy(gpt, "final_norm.shift", _get(params, "b"), "ln_f/b")
    _copy(gpt, "out_head.weight", _get(params, "wte"), "wte")  # GPT-2 ties the output head to wte
    return gpt


# ----------------------------------------------------------------------------- pretrained GPTModel

def _model_size(name, cfg):
    size = _SIZE_BY_EMB_DIM.get(cfg["emb_dim"])
    if size is None:
        raise ValueError(f"{name!r} is not one of the GPT-2 sizes {ALLOWED_SIZES}")
    return size


def _hf_path(models_dir, size):
    return os.path.join(models_dir, "hf", HF_REPOS[size].split("/")[-1], "model.safetensors")


def weights_available(name, models_dir="models", source=None):
    """Are ``name``'s weights on disk? With ``source`` ("openai"/"hf") a bool; without it, the
    first source present ("openai", then "hf") or None. The tiny model needs none ("random")."""
    cfg = model_config(name)
    if is_tiny(name):
        return "random" if source is None else True
    size = _model_size(name, cfg)
    present = {
        "openai": all(os.path.isfile(os.path.join(models_dir, size, f)) for f in OPENAI_FILES),
        "hf": os.path.isfile(_hf_path(models_dir, size)),
    }
    if source is None:
        return next((s for s, ok in present.items() if ok), None)
    if source not in present:
        raise ValueError(f"source must be 'openai' or 'hf', got {source!r}")
    return present[source]


def download_weights(name, models_dir="models", *, source="openai", progress=None, show_bar=True,
                     base_url=None):
    """Not in the book: only fetch ``name``'s GPT-2 files (no TensorFlow needed to download) and
    return the folder or file they are in. ``progress(done_bytes, total_bytes, filename)``."""
    if is_tiny(name):
        raise ValueError(f"{name!r} has random weights: there is nothing to download")
    size = _model_size(name, model_config(name))
    if source == "openai":
        kw = {"base_url": base_url} if base_url else {}
        return _download_openai(size, models_dir, progress=progress, show_bar=show_bar, **kw)
    if source == "hf":
        kw = {"base_url": base_url} if base_url else {}
        return download_hf_gpt2(size, models_dir, progress=progress, show_bar=show_bar, **kw)
    raise ValueError(f"source must be 'openai' or 'hf', got {source!r}")


def load_pretrained(name, models_dir="models", *, source="openai", progress=None, show_bar=True):
    """Not in the book: GPTModel for ``name`` (e.g. "gpt2-medium (355M)") with GPT-2's weights, in eval mode.

    ``source="openai"`` reads OpenAI's TensorFlow checkpoint (the book's way), ``"hf"`` Hugging
    Face's safetensors; either is downloaded into ``models_dir`` if missing. "tiny" is a small
    model with seeded RANDOM weights (no download), for demos and tests.
    """
    cfg = model_config(name)
    if is_tiny(name):
        with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
            torch.manual_seed(123)
            return GPTModel(cfg).eval()
    size = _model_size(name, cfg)
    if source == "openai":
        settings, params = download_and_load_gpt2(size, models_dir, progress=progress, show_bar=show_bar)
        want = {"n_vocab": "vocab_size", "n_ctx": "context_length", "n_embd": "emb_dim",
                "n_head": "n_heads", "n_layer": "n_layers"}
        bad = {k: (settings[k], cfg[v]) for k, v in want.items() if settings[k] != cfg[v]}
        if bad:
            raise ValueError(f"{os.path.join(models_dir, size, 'hparams.json')} does not describe {name!r}: "
                             + ", ".join(f"{k}={a} (expected {b})" for k, (a, b) in bad.items()))
    elif source == "hf":
        params = load_gpt2_params_from_safetensors(
            download_hf_gpt2(size, models_dir, progress=progress, show_bar=show_bar))
    else:
        raise ValueError(f"source must be 'openai' or 'hf', got {source!r}")
    model = GPTModel(cfg)
    load_weights_into_gpt(model, params)
    return model.eval()
