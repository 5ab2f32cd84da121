"""GPTModel: the chapter's formulas, equal to Hugging Face's GPT-2, the chapter's parameter count and names."""
import math

import pytest
import torch

from sft.model import (
    BASE_CONFIG,
    GELU,
    MODEL_NAMES,
    GPTModel,
    LayerNorm,
    count_parameters,
    model_config,
    model_configs,
)

SMALL = {"vocab_size": 500, "context_length": 32, "emb_dim": 48, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def hf_to_gpt(hf_model, model):
    """Copy a transformers GPT2LMHeadModel's weights into GPTModel (an independent mapping).

    HF's Conv1D stores weights as (in, out), nn.Linear as (out, in); c_attn packs q, k, v.
    """
    sd = hf_model.state_dict()
    c = model.tok_emb.embedding_dim
    new = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "final_norm.scale": sd["transformer.ln_f.weight"], "final_norm.shift": sd["transformer.ln_f.bias"],
           "out_head.weight": sd["lm_head.weight"]}
    for i in range(len(model.trf_blocks)):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        qw, kw, vw = sd[h + "attn.c_attn.weight"].split(c, dim=1)
        qb, kb, vb = sd[h + "attn.c_attn.bias"].split(c, dim=0)
        new.update({
            b + "att.W_query.weight": qw.T, b + "att.W_key.weight": kw.T, b + "att.W_value.weight": vw.T,
            b + "att.W_query.bias": qb, b + "att.W_key.bias": kb, b + "att.W_value.bias": vb,
            b + "att.out_proj.weight": sd[h + "attn.c_proj.weight"].T, b + "att.out_proj.bias": sd[h + "attn.c_proj.bias"],
            b + "ff.layers.0.weight": sd[h + "mlp.c_fc.weight"].T, b + "ff.layers.0.bias": sd[h + "mlp.c_fc.bias"],
            b + "ff.layers.2.weight": sd[h + "mlp.c_proj.weight"].T, b + "ff.layers.2.bias": sd[h + "mlp.c_proj.bias"],
            b + "norm1.scale": sd[h + "ln_1.weight"], b + "norm1.shift": sd[h + "ln_1.bias"],
            b + "norm2.scale": sd[h + "ln_2.weight"], b + "norm2.shift": sd[h + "ln_2.bias"],
        })
    model.load_state_dict({k: v.contiguous() for k, v in new.items()}, strict=True)


def test_logits_equal_huggingface_gpt2():
    import transformers  # a test dependency (requirements-dev.txt)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=SMALL["vocab_size"], n_positions=SMALL["context_length"], n_embd=SMALL["emb_dim"],
        n_layer=SMALL["n_layers"], n_head=SMALL["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new",
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1; make them random too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = GPTModel(SMALL).eval()
    hf_to_gpt(hf, model)
    ids = torch.randint(0, SMALL["vocab_size"], (3, SMALL["context_length"]))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == (3, SMALL["context_length"], SMALL["vocab_size"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_parameter_count_gpt2_small_chapter4():
    # Chapter 4's GPT_CONFIG_124M (no qkv bias): 163,009,536 with the untied output head.
    cfg = {**model_config("gpt2-small (124M)"), "qkv_bias": False, "drop_rate": 0.1}
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert count_parameters(model) == 163_009_536
    assert count_parameters(model) - model.out_head.weight.numel() == 124_412_160


def test_state_dict_keys_are_the_chapters(tiny_cfg):
    keys = set(GPTModel(tiny_cfg).state_dict())
    for k in ["tok_emb.weight", "pos_emb.weight", "trf_blocks.0.att.W_query.weight", "trf_blocks.0.att.W_key.weight",
              "trf_blocks.0.att.W_value.weight", "trf_blocks.0.att.out_proj.bias", "trf_blocks.0.ff.layers.0.weight",
              "trf_blocks.0.ff.layers.2.bias", "trf_blocks.0.norm1.scale", "trf_blocks.0.norm2.shift",
              "final_norm.scale", "out_head.weight"]:
        assert k in keys
    assert "out_head.bias" not in keys and "trf_blocks.0.att.W_query.bias" not in keys  # tiny_cfg: qkv_bias False


def test_chapter_state_dict_with_mask_buffer_loads_strictly(tiny_cfg):
    # The chapter registers `att.mask` as a buffer, so its .pth files carry it.
    src = GPTModel(tiny_cfg)
    sd = src.state_dict()
    t = tiny_cfg["context_length"]
    sd["trf_blocks.0.att.mask"] = torch.triu(torch.ones(t, t), diagonal=1)
    dst = GPTModel(tiny_cfg)
    dst.load_state_dict(sd, strict=True)
    torch.testing.assert_close(dst.out_head.weight, src.out_head.weight)


def test_layernorm_and_gelu_match_the_chapters_formulas():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 16) * 3
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.scale.normal_()
        ln.shift.normal_()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    ref = ln.scale * (x - mean) / torch.sqrt(var + 1e-5) + ln.shift
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)
    ref_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(GELU()(x), ref_gelu, atol=1e-5, rtol=1e-5)


def test_too_long_input_names_the_context_length(tiny_cfg):
    model = GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="context_length is 120"):
        model(torch.zeros(1, 121, dtype=torch.long))


def test_model_config_names():
    assert list(model_configs) == ["gpt2-small (124M)", "gpt2-medium (355M)", "gpt2-large (774M)", "gpt2-xl (1558M)"]
    assert BASE_CONFIG == {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
    medium = {**BASE_CONFIG, "emb_dim": 1024, "n_layers": 24, "n_heads": 16}
    for name in ["gpt2-medium (355M)", "355M", "gpt2-medium", "GPT2-Medium"]:
        assert model_config(name) == medium
    assert model_config("124M")["emb_dim"] == 768 and model_config("1558M")["n_heads"] == 25
    tiny = model_config("tiny")
    assert tiny == model_config("tiny (random)") and tiny["n_layers"] == 2 and tiny["vocab_size"] == 50257
    assert len(MODEL_NAMES) == 5 and "random" in MODEL_NAMES[-1]
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        model_config("gpt5")
