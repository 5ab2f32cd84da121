"""GPTModel: equal to Hugging Face's GPT-2, the chapter's parameter count, and our extras."""
import math

import pytest
import torch

import sft.model as model_module
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


def test_forward_hidden_then_out_head_equals_forward(tiny_cfg):
    torch.manual_seed(2)
    model = GPTModel(tiny_cfg).eval()
    ids = torch.randint(0, tiny_cfg["vocab_size"], (2, 7))
    with torch.no_grad():
        logits = model(ids)
        hidden = model.forward_hidden(ids)
        assert hidden.shape == (2, 7, tiny_cfg["emb_dim"])
        torch.testing.assert_close(model.out_head(hidden), logits)
        torch.testing.assert_close(model(ids, return_hidden=True), hidden)


def test_gradient_checkpointing_same_loss_and_grads(tiny_cfg):
    cfg = {**tiny_cfg, "n_layers": 2, "drop_rate": 0.1}  # dropout too: checkpointing must replay its masks
    torch.manual_seed(3)
    model = GPTModel(cfg).train()
    ids = torch.randint(0, cfg["vocab_size"], (2, 9))
    targets = torch.randint(0, cfg["vocab_size"], (2, 9))

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(4)
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = loss_and_grads()
    model.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for g1, g2 in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("packed", [False, True])
def test_cpu_bf16_short_rows_attention_formula_matches_fused_kernel(tiny_cfg, packed, monkeypatch):
    """On CPU in bf16, rows up to CPU_MATH_ATTENTION_MAX_TOKENS take the chapter's plain formula
    instead of PyTorch's fused kernel: same loss and gradients (to bf16 rounding), padded or packed."""
    torch.manual_seed(11)
    model = GPTModel(tiny_cfg).train()
    ids = torch.randint(0, tiny_cfg["vocab_size"], (3, 9))
    targets = torch.randint(0, tiny_cfg["vocab_size"], (3, 9))
    lengths = torch.tensor([9, 4, 6]) if packed else None
    keep = torch.arange(9)[None, :] < lengths[:, None] if packed else torch.ones(3, 9, dtype=torch.bool)

    def loss_and_grads(max_tokens):
        monkeypatch.setattr(model_module, "CPU_MATH_ATTENTION_MAX_TOKENS", max_tokens)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(ids, return_hidden=True, lengths=lengths)
            logits = model.out_head(hidden if packed else hidden[keep])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_formula, grads_formula = loss_and_grads(128)
    loss_fused, grads_fused = loss_and_grads(0)  # 0: every row takes the fused kernel
    assert model_module.CPU_MATH_ATTENTION_MAX_TOKENS == 0
    torch.testing.assert_close(loss_formula, loss_fused, rtol=1e-2, atol=1e-2)
    for name, grad in grads_formula.items():
        scale = grads_fused[name].abs().max().item() + 1e-6
        assert (grad - grads_fused[name]).abs().max().item() / scale < 5e-2, name
    assert loss_formula != loss_fused  # two different computations (bf16 products vs an fp32 kernel)


def test_kv_cache_incremental_equals_full_forward(tiny_cfg):
    torch.manual_seed(5)
    model = GPTModel(tiny_cfg).eval()
    ids = torch.randint(0, tiny_cfg["vocab_size"], (2, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 11)
        parts = [model(ids[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_row_alone(tiny_cfg):
    torch.manual_seed(6)
    model = GPTModel(tiny_cfg).eval()
    a = torch.randint(0, tiny_cfg["vocab_size"], (1, 8))
    b = torch.randint(0, tiny_cfg["vocab_size"], (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])  # b left-padded by 3
    pad_mask = torch.ones(2, 8, dtype=torch.bool)
    pad_mask[1, :3] = False
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        batched = model(ids, pad_mask=pad_mask)  # no cache
        cache = model.new_kv_cache(2, 10)
        prefill = model(ids, pad_mask=pad_mask, kv_cache=cache)
        step = model(torch.tensor([[7], [9]]), kv_cache=cache)
        next_a = model(torch.cat([a, torch.tensor([[7]])], dim=1))[:, -1]
        next_b = model(torch.cat([b, torch.tensor([[9]])], dim=1))[:, -1]
    for out in (batched, prefill):
        assert not torch.isnan(out).any()  # padding queries never see an empty row
        torch.testing.assert_close(out[0], alone_a[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 3:], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[:, -1], torch.cat([next_a, next_b]), atol=1e-5, rtol=1e-5)
    cache.keep([1])  # drop row 0, continue row 1 alone
    with torch.no_grad():
        after = model(torch.tensor([[4]]), kv_cache=cache)[:, -1]
        ref = model(torch.cat([b, torch.tensor([[9, 4]])], dim=1))[:, -1]
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)


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
