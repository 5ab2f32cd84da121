"""GPT-2 from scratch (chapter 4), with the chapter's module and config names.

Reading order: LayerNorm, GELU, FeedForward, MultiHeadAttention, TransformerBlock, GPTModel,
then the configs. State-dict keys are the chapter's (``trf_blocks.0.att.W_query.weight``,
``trf_blocks.0.norm1.scale`` ...), so loading weights is a name mapping.

Not in the book, and off unless asked for: ``forward_hidden`` (hidden states before the
output head, so a trainer can apply the head only where targets count), activation
checkpointing (``model.gradient_checkpointing = True``), and a ``KVCache`` for generation
that also serves a batch of left-padded prompts (``pad_mask``, per-row position ids).
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# Not in the book: rows up to this many tokens take the plain attention formula on CPU in bf16
# (faster there than the fused kernels, which win on longer rows; measured with torch 2.13).
CPU_MATH_ATTENTION_MAX_TOKENS = 128


class LayerNorm(nn.Module):
    """Normalise the last dimension to mean 0, variance 1, then scale and shift (learned)."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # The chapter's maths: (x - mean) / sqrt(var + eps) * scale + shift, with the biased
        # variance (unbiased=False) as GPT-2 was trained. Not in the book: one fused kernel.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU, tanh approximation as in GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def forward(self, x):
        # Not in the book: the same formula as one fused kernel instead of six elementwise ops.
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: expand to 4x the width, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    The chapter computes softmax(Q K^T / sqrt(d)) V with a registered triangular mask; we call
    ``scaled_dot_product_attention`` (the same maths, fused). ``attn_mask``/``kv`` are ours.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)  # on the attention weights, training only

    def forward(self, x, attn_mask=None, kv=None, packed=None):
        """x (B, T, d_in) -> (B, T, d_out).

        attn_mask: None = plain causal attention; else a bool (B or 1, 1, T, T_keys), True = may
        attend. kv: a ``KVCache`` layer slot; past keys/values are prepended from it.
        """
        # Not in the book: with ``packed`` (a ``Packed``), x is (N, d_in), the real positions only;
        # the projections run on those N rows, attention on the (B, T) layout.
        b, num_tokens = packed.keep.shape if packed is not None else x.shape[:2]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        if packed is not None:  # one scatter for all three (B, T, 3 * d_out), not three
            queries, keys, values = packed.scatter(torch.cat([queries, keys, values], dim=-1)).chunk(3, dim=-1)

        def split(t):  # (B, T, d_out) -> (B, n_heads, T, head_dim)
            return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = split(queries), split(keys), split(values)
        if kv is not None:  # Not in the book: keys/values of all positions so far, (B, H, T_keys, hd)
            keys, values = kv.update(keys, values)
        dropout_p = self.dropout.p if self.training else 0.0
        dtype, autocast = queries.dtype, nullcontext()
        cpu_bf16 = dtype == torch.bfloat16 and x.device.type == "cpu"
        if cpu_bf16 and attn_mask is None and kv is None and 1 < num_tokens <= CPU_MATH_ATTENTION_MAX_TOKENS:
            context_vec = _causal_attention_formula(queries, keys, values, dropout_p)
        else:
            if cpu_bf16 and torch.is_grad_enabled():
                # Not in the book: on CPU, PyTorch's bf16 attention backward is ~3x slower than its
                # fp32 one (torch 2.13); attention is a small share of the FLOPs, so train it in fp32.
                queries, keys, values = queries.float(), keys.float(), values.float()
                autocast = torch.autocast("cpu", enabled=False)  # else autocast casts them back to bf16
            # A lone query (decoding with a cache) may see every cached key; is_causal would wrongly
            # align its triangle top-left, so it is used only when queries and keys start together.
            with autocast:
                context_vec = F.scaled_dot_product_attention(
                    queries, keys, values,
                    attn_mask=attn_mask,
                    dropout_p=dropout_p,
                    is_causal=attn_mask is None and num_tokens > 1,
                ).to(dtype)  # (B, H, T, hd), scaled by 1/sqrt(head_dim) as in the chapter
        context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        if packed is not None:
            context_vec = packed.gather(context_vec)  # back to (N, d_out)
        return self.out_proj(context_vec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Not in the book: the chapter keeps its causal mask as a buffer, so its saved state
        # dicts carry `...att.mask`. We need no buffer; drop the key so they load strictly.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _causal_attention_formula(queries, keys, values, dropout_p):
    """Not in the book as a function: the chapter's attention formula, for short bf16 rows on CPU.

    Two bf16 matrix products and an fp32 softmax beat PyTorch's fused kernels there (run in fp32
    while training: ~2x faster for the chapter's ~60-token batches, forward and backward; the
    fused kernel wins on long rows). (B, H, T, hd) each -> (B, H, T, hd).
    """
    num_tokens, head_dim = queries.shape[-2:]
    with torch.autocast("cpu", enabled=False):
        scores = (queries @ keys.transpose(2, 3)).float()  # (B, H, T, T)
        causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=queries.device).triu(1)
        weights = torch.softmax(scores.masked_fill(causal, float("-inf")) / head_dim ** 0.5, dim=-1)
        weights = F.dropout(weights, dropout_p, training=dropout_p > 0)
        return weights.to(queries.dtype) @ values


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + ff(norm2(x)), dropout on each branch."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, attn_mask=None, kv=None, packed=None):
        shortcut = x  # (B, T, C), or (N, C) with ``packed``
        x = self.att(self.norm1(x), attn_mask=attn_mask, kv=kv, packed=packed)
        x = self.drop_shortcut(x) + shortcut

        shortcut = x
        x = self.ff(self.norm2(x))
        return self.drop_shortcut(x) + shortcut


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, ``n_layers`` blocks, final norm, output head (untied)."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        # Not in the book: recompute each block's activations in backward instead of storing
        # them (less memory, ~30% more compute); used only when training with grads on.
        self.gradient_checkpointing = False

    def forward(self, in_idx, *, pad_mask=None, kv_cache=None, return_hidden=False, lengths=None):
        """in_idx (B, T) token ids -> logits (B, T, vocab_size).

        Not in the book (keyword-only): ``return_hidden`` gives (B, T, emb_dim) instead (see
        ``forward_hidden``; useful through DDP, which only syncs what goes through forward);
        ``pad_mask`` (B, T) bool, False at left padding; ``kv_cache`` a ``KVCache``;
        ``lengths`` (B,) computes only each row's first ``lengths[b]`` positions (output (N, ...)).
        """
        x = self.forward_hidden(in_idx, pad_mask=pad_mask, kv_cache=kv_cache, lengths=lengths)
        return x if return_hidden else self.out_head(x)

    # Not in the book: everything up to the output head.
    def forward_hidden(self, in_idx, *, pad_mask=None, kv_cache=None, lengths=None):
        """in_idx (B, T) -> hidden states (B, T, emb_dim) after ``final_norm``.

        ``lengths`` (B,) ints: only the first ``lengths[b]`` positions of row b are computed
        (right padding, whose outputs nothing reads, is skipped); returns (N, emb_dim) for
        those N = lengths.sum() positions, row by row. Training uses it: a batch is ~20%
        padding, and causal attention means a row's later positions never change its earlier ones.
        """
        if lengths is not None:
            if pad_mask is not None or kv_cache is not None:
                raise ValueError("lengths cannot be combined with pad_mask or kv_cache")
            return self._forward_packed(in_idx, lengths)
        batch_size, seq_len = in_idx.shape
        context_length = self.pos_emb.num_embeddings
        if kv_cache is None and pad_mask is None:  # the chapter's path
            self._check_length(seq_len)
            pos, attn_mask = torch.arange(seq_len, device=in_idx.device), None
        elif kv_cache is None:  # a left-padded batch, no cache
            pos, attn_mask = _positions_and_mask(pad_mask, start=0)
        else:
            pos, attn_mask = kv_cache.advance(seq_len, pad_mask, in_idx.device)
            if kv_cache.max_position >= context_length:
                raise ValueError(f"KV cache passed the model's context_length ({context_length})")
        x = self.tok_emb(in_idx) + self.pos_emb(pos)  # (B, T, C)
        x = self.drop_emb(x)
        if attn_mask is None and kv_cache is None:
            x = self._blocks(x)
        else:
            for i, block in enumerate(self.trf_blocks):
                x = block(x, attn_mask=attn_mask, kv=None if kv_cache is None else kv_cache.layers[i])
        return self.final_norm(x)

    def _forward_packed(self, in_idx, lengths):
        seq_len = in_idx.shape[1]
        self._check_length(seq_len)
        packed = Packed(torch.arange(seq_len, device=in_idx.device) < lengths.to(in_idx.device)[:, None])
        pos = packed.positions()  # (N,) each kept position's index in its row
        x = self.drop_emb(self.tok_emb(packed.gather(in_idx)) + self.pos_emb(pos))  # (N, C)
        return self.final_norm(self._blocks(x, packed))

    def _check_length(self, seq_len):
        context_length = self.pos_emb.num_embeddings
        if seq_len > context_length:
            raise ValueError(f"input has {seq_len} tokens but the model's context_length is {context_length}; "
                             "crop it (e.g. idx[:, -context_length:])")

    def _blocks(self, x, packed=None):
        """The blocks with plain causal attention; each recomputed in backward if checkpointing."""
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.trf_blocks:
            x = checkpoint(block, x, None, None, packed, use_reentrant=False) if recompute else block(x, packed=packed)
        return x

    # Not in the book.
    def new_kv_cache(self, batch_size, max_len):
        """An empty ``KVCache`` for ``batch_size`` rows and up to ``max_len`` positions."""
        return KVCache(len(self.trf_blocks), batch_size, max_len)


# ---------------------------------------------------------------------------------------------
# Not in the book: KV cache for generation.
# ---------------------------------------------------------------------------------------------

def _positions_and_mask(valid, start, past_valid=None):
    """Position ids (B, T) and a bool attention mask (B, 1, T, start + T) for ``T`` new slots.

    valid (B, T): True at real tokens, False at (left) padding. past_valid (B, start): the same
    for slots already in the cache. A row's positions count only its real tokens, so a padded
    prompt gets the positions it would have alone. Each query also sees itself, so a padding
    query never has an all-False row (which would give NaN); its output is never used.
    """
    t = valid.shape[1]
    keys_valid = valid if past_valid is None else torch.cat([past_valid, valid], dim=1)
    seen = 0 if past_valid is None else past_valid.sum(dim=1, keepdim=True)  # (B, 1)
    pos = (seen + valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    q_idx = start + torch.arange(t, device=valid.device)[:, None]  # (T, 1)
    k_idx = torch.arange(start + t, device=valid.device)[None, :]  # (1, T_keys)
    mask = (k_idx <= q_idx) & keys_valid[:, None, :]  # causal and not padding, (B, T, T_keys)
    mask = mask | (k_idx == q_idx)
    return pos, mask[:, None]  # heads broadcast: (B, 1, T, T_keys)


class Packed:
    """Which positions of a (B, T) batch are computed: ``keep`` (B, T) bool, a prefix of each row.

    Its methods' output sizes depend on the data (how many positions are kept), which
    ``torch.compile`` cannot put in a graph: it runs them as they are, between compiled parts.
    """

    def __init__(self, keep):
        self.keep = keep

    @torch.compiler.disable
    def positions(self):
        """(N,) the index of each kept position within its row."""
        return self.keep.nonzero()[:, 1]

    @torch.compiler.disable
    def gather(self, t):
        """(B, T, ...) -> (N, ...): the kept positions, row by row."""
        return t[self.keep]

    @torch.compiler.disable
    def scatter(self, t):
        """(N, C) rows of the kept positions -> (B, T, C), zeros elsewhere."""
        out = t.new_zeros(*self.keep.shape, t.shape[-1])
        out[self.keep] = t
        return out


class _LayerKV:
    """One layer's keys and values, (B, H, max_len, head_dim), allocated on first write."""

    def __init__(self, cache):
        self.cache = cache
        self.k = self.v = None

    def update(self, k, v):
        c = self.cache
        if self.k is None:
            shape = (k.shape[0], k.shape[1], c.max_len, k.shape[3])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = c.start + k.shape[2]
        self.k[:, :, c.start:end] = k
        self.v[:, :, c.start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of past positions, per layer, so each new token costs one position.

    Use: ``cache = model.new_kv_cache(B, max_len)``; ``model(prompt_ids, pad_mask=m,
    kv_cache=cache)`` once for (left-padded) prompts, then ``model(next_ids, kv_cache=cache)``
    with (B, 1) ids per step. ``keep(rows)`` drops finished rows.
    """

    def __init__(self, n_layers, batch_size, max_len):
        self.batch_size = batch_size
        self.max_len = max_len
        self.layers = [_LayerKV(self) for _ in range(n_layers)]
        self.start = 0  # slots already written: where the next forward pass writes
        self.length = 0  # slots filled after the forward pass in progress
        self.valid = None  # (B, max_len) bool, False at padding; None while there is none
        self.max_position = -1  # largest position id handed out (for the context check)

    def advance(self, t, pad_mask, device):
        """Reserve ``t`` slots; return their position ids (B, t) and the attention mask."""
        self.start = self.length
        if self.start + t > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} slots); make a larger one")
        self.length = self.start + t
        if pad_mask is None and self.valid is None:  # no padding anywhere: plain positions
            pos = torch.arange(self.start, self.length, device=device)
            self.max_position = self.length - 1
            if self.start == 0 or t == 1:
                return pos, None  # causal (prefill) or "see everything" (one new token)
            q_idx = torch.arange(self.start, self.length, device=device)[:, None]
            return pos, torch.arange(self.length, device=device)[None, :] <= q_idx
        if self.valid is None:  # first padded write: all earlier slots were real tokens
            self.valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=device)
        new_valid = torch.ones(self.batch_size, t, dtype=torch.bool, device=device) if pad_mask is None else pad_mask.bool()
        self.valid[:, self.start:self.length] = new_valid
        pos, mask = _positions_and_mask(new_valid, self.start, self.valid[:, :self.start])
        self.max_position = max(self.max_position, int(pos.max()))
        return pos, mask

    def keep(self, rows):
        """Keep only the batch rows ``rows`` (a list or 1-D LongTensor of indices)."""
        for layer in self.layers:
            if layer.k is not None:
                idx = torch.as_tensor(rows, device=layer.k.device)
                layer.k, layer.v = layer.k[idx], layer.v[idx]
        if self.valid is not None:
            self.valid = self.valid[torch.as_tensor(rows, device=self.valid.device)]
        self.batch_size = len(rows)


# ---------------------------------------------------------------------------------------------
# Configs (chapter 5/7): the four GPT-2 sizes share BASE_CONFIG.
# ---------------------------------------------------------------------------------------------

BASE_CONFIG = {
    "vocab_size": 50257,     # GPT-2's BPE vocabulary
    "context_length": 1024,  # longest sequence
    "drop_rate": 0.0,        # the chapter fine-tunes without dropout
    "qkv_bias": True,        # OpenAI's checkpoints have query/key/value biases
}

model_configs = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

# Not in the book: a small model with RANDOM weights, for offline demos and tests only;
# it has no pretrained checkpoint and produces gibberish until trained.
TINY_NAME = "tiny (random)"
TINY_CONFIG = {**BASE_CONFIG, "context_length": 256, "emb_dim": 64, "n_layers": 2, "n_heads": 2}

MODEL_NAMES = [*model_configs, TINY_NAME]


def model_config(name):
    """Full config dict for ``name``: "gpt2-small (124M)", "gpt2-small", "124M", ... or "tiny"."""
    key = str(name).strip().lower()
    if key in ("tiny", TINY_NAME):
        return dict(TINY_CONFIG)
    for full in model_configs:  # "gpt2-small (124M)" -> "gpt2-small" and "124m"
        short, size = full.split(" ")
        if key in (full.lower(), short, size.strip("()").lower()):
            return {**BASE_CONFIG, **model_configs[full]}
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES} (or '124M', 'gpt2-medium', ...)")


def count_parameters(model):
    """Number of parameters (the chapter's 163,009,536 for gpt2-small: out_head is not tied)."""
    return sum(p.numel() for p in model.parameters())
