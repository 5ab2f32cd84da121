"""The fast path (sft.fast) equals the book's modules: each kernel, the whole forward, and gradients."""
import pytest
import torch

import sft.fast.kernels as kernels
from sft.fast.forward import FastGPT, forward, forward_hidden
from sft.fast.kvcache import new_kv_cache
from sft.model import GPTModel, LayerNorm, MultiHeadAttention, TransformerBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = {"vocab_size": 300, "context_length": 40, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def perturbed(module, seed=0, scale=0.2):
    """The module with every parameter randomised (LayerNorms start at 1/0, which hides mistakes)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_layer_norm_and_gelu_kernels_equal_the_book():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32) * 3
    ln = perturbed(LayerNorm(32))
    torch.testing.assert_close(kernels.layer_norm(ln, x), ln(x), atol=1e-5, rtol=1e-5)
    from sft.model import GELU

    torch.testing.assert_close(kernels.gelu(x), GELU()(x), atol=1e-5, rtol=1e-5)


def test_attention_kernel_equals_the_books_formula_with_gradients():
    att = perturbed(MultiHeadAttention(32, 32, context_length=40, dropout=0.0, num_heads=4, qkv_bias=True), 2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    book = att(x)
    book.square().sum().backward()
    book_grads, book_x = grads(att), x.grad.clone()
    att.zero_grad()
    x.grad = None
    fast = kernels.attention(att, x)
    fast.square().sum().backward()
    torch.testing.assert_close(fast, book, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, book_x, atol=1e-5, rtol=1e-5)
    for name, g in grads(att).items():  # gradients up to ~100: float32 rounding of ~1e-5 (W_key.bias's is ~0:
        torch.testing.assert_close(g, book_grads[name], atol=1e-4, rtol=1e-5, msg=name)  # keys' bias cancels)


def test_block_and_whole_forward_equal_the_book_logits_and_grads():
    model = perturbed(GPTModel(SMALL), 3).train()
    ids = torch.randint(0, SMALL["vocab_size"], (3, 11))
    targets = torch.randint(0, SMALL["vocab_size"], (3, 11))
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(kernels.block(model.trf_blocks[0], x), model.trf_blocks[0](x), atol=1e-5, rtol=1e-5)

    def loss_and_grads(fn):
        model.zero_grad()
        logits = fn(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return logits.detach(), grads(model)

    book_logits, book_grads = loss_and_grads(model)
    fast_logits, fast_grads = loss_and_grads(lambda i: forward(model, i))
    torch.testing.assert_close(fast_logits, book_logits, atol=1e-4, rtol=1e-4)
    for name, g in fast_grads.items():
        torch.testing.assert_close(g, book_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    wrapped_logits, _ = loss_and_grads(FastGPT(model))
    torch.testing.assert_close(wrapped_logits, fast_logits)
    # The book's bodies through the same wrapper (the chapter's path with checkpointing): bit for bit.
    same, _ = loss_and_grads(FastGPT(model, fused=False))
    assert torch.equal(same, book_logits)


def test_forward_hidden_then_out_head_equals_forward(tiny_cfg):
    torch.manual_seed(2)
    model = GPTModel(tiny_cfg).eval()
    ids = torch.randint(0, tiny_cfg["vocab_size"], (2, 7))
    with torch.no_grad():
        logits = model(ids)
        hidden = forward_hidden(model, ids)
        assert hidden.shape == (2, 7, tiny_cfg["emb_dim"])
        torch.testing.assert_close(model.out_head(hidden), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(FastGPT(model)(ids, return_hidden=True), hidden)


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_checkpointing_same_loss_and_grads(tiny_cfg, fused):
    cfg = {**tiny_cfg, "n_layers": 2, "drop_rate": 0.1}  # dropout too: checkpointing must replay its masks
    torch.manual_seed(3)
    model = GPTModel(cfg).train()
    ids = torch.randint(0, cfg["vocab_size"], (2, 9))
    targets = torch.randint(0, cfg["vocab_size"], (2, 9))

    def loss_and_grads(checkpointing):
        model.zero_grad()
        torch.manual_seed(4)
        logits = FastGPT(model, checkpointing=checkpointing, fused=fused)(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
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
        monkeypatch.setattr(kernels, "CPU_MATH_ATTENTION_MAX_TOKENS", max_tokens)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = forward_hidden(model, ids, lengths=lengths)
            logits = model.out_head(hidden if packed else hidden[keep])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_formula, grads_formula = loss_and_grads(128)
    loss_fused, grads_fused = loss_and_grads(0)  # 0: every row takes the fused kernel
    assert kernels.CPU_MATH_ATTENTION_MAX_TOKENS == 0
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
        cache = new_kv_cache(model, 2, 11)
        parts = [forward(model, ids[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11)]]
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
        batched = forward(model, ids, pad_mask=pad_mask)  # no cache
        cache = new_kv_cache(model, 2, 10)
        prefill = forward(model, ids, pad_mask=pad_mask, kv_cache=cache)
        step = forward(model, torch.tensor([[7], [9]]), kv_cache=cache)
        next_a = model(torch.cat([a, torch.tensor([[7]])], dim=1))[:, -1]
        next_b = model(torch.cat([b, torch.tensor([[9]])], dim=1))[:, -1]
    for out in (batched, prefill):
        assert not torch.isnan(out).any()  # padding queries never see an empty row
        torch.testing.assert_close(out[0], alone_a[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 3:], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[:, -1], torch.cat([next_a, next_b]), atol=1e-5, rtol=1e-5)
    cache.keep([1])  # drop row 0, continue row 1 alone
    with torch.no_grad():
        after = forward(model, torch.tensor([[4]]), kv_cache=cache)[:, -1]
        ref = model(torch.cat([b, torch.tensor([[9, 4]])], dim=1))[:, -1]
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)


def test_forward_hidden_with_lengths_skips_padding_exactly():
    torch.manual_seed(0)
    model = GPTModel({**SMALL, "drop_rate": 0.0}).eval()
    x = torch.randint(0, SMALL["vocab_size"], (3, 9))
    lengths = torch.tensor([9, 4, 0])  # a full row, a short one, one with nothing to compute
    keep = torch.arange(9)[None, :] < lengths[:, None]
    packed = forward_hidden(model, x, lengths=lengths)  # (N, C) for the 13 kept positions
    assert packed.shape == (13, SMALL["emb_dim"])
    assert torch.allclose(packed, forward_hidden(model, x)[keep], atol=1e-5)
    with pytest.raises(ValueError, match="cannot be combined"):
        forward_hidden(model, x, lengths=lengths, pad_mask=keep)
    with pytest.raises(ValueError, match="needs the fused kernels"):
        FastGPT(model, fused=False)(x, lengths=lengths)


def test_too_long_input_names_the_context_length():
    model = GPTModel(SMALL)
    with pytest.raises(ValueError, match="context_length is 40"):
        forward_hidden(model, torch.zeros(1, 41, dtype=torch.long))


def test_block_kernel_serves_a_book_block_with_dropout_off():
    blk = perturbed(TransformerBlock(SMALL), 9).eval()
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(kernels.block(blk, x), blk(x), atol=1e-5, rtol=1e-5)
