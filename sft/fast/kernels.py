"""Not in the book: the chapter's layer norm, GELU, attention and block, computed by fused kernels.

Each function takes the book's module (``sft.model.LayerNorm``, ``MultiHeadAttention``, ...) and
uses its parameters, so a model needs no conversion: the fast path calls these instead of the
modules' own ``forward``. Same maths, other rounding; ``tests/fast`` proves them equal.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .lora import linear

# Rows up to this many tokens take the plain attention formula on CPU in bf16: two bf16 matrix
# products and an fp32 softmax beat PyTorch's fused kernels there (torch 2.13), which win on long rows.
CPU_MATH_ATTENTION_MAX_TOKENS = 128


def layer_norm(norm, x):
    """``norm(x)`` (a book ``LayerNorm``) as one fused kernel: same eps, biased variance."""
    return F.layer_norm(x, (x.shape[-1],), norm.scale, norm.shift, norm.eps)


def gelu(x):
    """The book's tanh-approximate GELU as one fused kernel instead of six elementwise ops."""
    return F.gelu(x, approximate="tanh")


def feed_forward(ff, x):
    """``ff(x)`` (a book ``FeedForward``: Linear, GELU, Linear) with the fused GELU."""
    expand, _, project = ff.layers
    return linear(project, gelu(linear(expand, x)))


def attention(att, x, *, attn_mask=None, kv=None, packed=None):
    """``att(x)`` (a book ``MultiHeadAttention``) via ``scaled_dot_product_attention``.

    x (B, T, d_in) -> (B, T, d_out). attn_mask: None = causal; else bool (B or 1, 1, T, T_keys),
    True = may attend. kv: a ``KVCache`` layer slot (past keys/values prepended). packed: a
    ``Packed``: x is then (N, d_in), only the real positions; projections run on those N rows,
    attention on the (B, T) layout.
    """
    b, num_tokens = packed.keep.shape if packed is not None else x.shape[:2]
    joined = kv.joined_qkv(att) if kv is not None and not torch.is_grad_enabled() else None
    if joined is not None:  # answering with a cache: one product for the three (their weights joined once)
        queries, keys, values = F.linear(x, *joined).chunk(3, dim=-1)
    else:
        queries, keys, values = linear(att.W_query, x), linear(att.W_key, x), linear(att.W_value, x)
    if packed is not None:  # one scatter for all three (B, T, 3 * d_out), not three
        queries, keys, values = packed.scatter(torch.cat([queries, keys, values], dim=-1)).chunk(3, dim=-1)

    def heads(t):  # (B, T, d_out) -> (B, n_heads, T, head_dim)
        return t.view(b, num_tokens, att.num_heads, att.head_dim).transpose(1, 2)

    queries, keys, values = heads(queries), heads(keys), heads(values)
    if kv is not None:  # keys/values of all positions so far, (B, H, T_keys, hd)
        keys, values = kv.update(keys, values)
    dropout_p = att.dropout.p if att.training else 0.0
    dtype, autocast = queries.dtype, nullcontext()
    cpu_bf16 = dtype == torch.bfloat16 and x.device.type == "cpu"
    if cpu_bf16 and attn_mask is None and kv is None and 1 < num_tokens <= CPU_MATH_ATTENTION_MAX_TOKENS:
        context_vec = causal_attention_formula(queries, keys, values, dropout_p)
    else:
        if cpu_bf16 and torch.is_grad_enabled():
            # On CPU, PyTorch's bf16 attention backward is ~3x slower than its fp32 one (torch
            # 2.13); attention is a small share of the FLOPs, so train it in fp32.
            queries, keys, values = queries.float(), keys.float(), values.float()
            autocast = torch.autocast("cpu", enabled=False)  # else autocast casts them back to bf16
        # A lone query (decoding with a cache) may see every cached key; is_causal would align
        # its triangle top-left, so it is used only when queries and keys start together.
        with autocast:
            context_vec = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=attn_mask is None and num_tokens > 1,
            ).to(dtype)  # (B, H, T, hd), scaled by 1/sqrt(head_dim) as in the chapter
    context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, att.d_out)
    if packed is not None:
        context_vec = packed.gather(context_vec)  # back to (N, d_out)
    return linear(att.out_proj, context_vec)


def causal_attention_formula(queries, keys, values, dropout_p):
    """The chapter's attention formula for short bf16 rows on CPU: (B, H, T, hd) each -> (B, H, T, hd).

    Two bf16 matrix products and an fp32 softmax (~2x faster there than the fused kernels for
    the chapter's ~60-token batches, forward and backward).
    """
    num_tokens, head_dim = queries.shape[-2:]
    with torch.autocast("cpu", enabled=False):
        scores = (queries @ keys.transpose(2, 3)).float()  # (B, H, T, T)
        causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=queries.device).triu(1)
        weights = torch.softmax(scores.masked_fill(causal, float("-inf")) / head_dim ** 0.5, dim=-1)
        weights = F.dropout(weights, dropout_p, training=dropout_p > 0)
        return weights.to(queries.dtype) @ values


def block(blk, x, *, attn_mask=None, kv=None, packed=None):
    """``blk(x)`` (a book ``TransformerBlock``) with the fused kernels; x (B, T, C) or packed (N, C)."""
    shortcut = x
    x = attention(blk.att, layer_norm(blk.norm1, x), attn_mask=attn_mask, kv=kv, packed=packed)
    x = blk.drop_shortcut(x) + shortcut
    shortcut = x
    x = feed_forward(blk.ff, layer_norm(blk.norm2, x))
    return blk.drop_shortcut(x) + shortcut
