"""GPT-2 from scratch (chapter 4), with the chapter's module names, bodies and config names.

Reading order: LayerNorm, GELU, FeedForward, MultiHeadAttention, TransformerBlock, GPTModel,
then the configs. State-dict keys are the chapter's (``trf_blocks.0.att.W_query.weight``,
``trf_blocks.0.norm1.scale`` ...), so loading weights is a name mapping.

Every ``forward`` here is the chapter's formula, written out. Not in the book: the fast path
(``sft.fast``) runs the same modules' parameters through fused kernels (scaled-dot-product
attention, fused layer norm and GELU, only the positions that count, a KV cache); tests prove
it equal to these bodies, as they prove these equal to Hugging Face's GPT-2.
"""
import torch
import torch.nn as nn


class LayerNorm(nn.Module):
    """Normalise the last dimension to mean 0, variance 1, then scale and shift (learned)."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased variance, as GPT-2 was trained
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU, the tanh approximation GPT-2 uses."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
        ))


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
    """Causal multi-head self-attention: softmax(Q K^T / sqrt(head_dim)) V, heads side by side."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)
        # Not in the book: the mask is kept out of the state dict (persistent=False) and stored as
        # bool, a quarter of the chapter's float mask; its values and its use are the chapter's.
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1),
            persistent=False,
        )

    def forward(self, x):
        b, num_tokens, d_in = x.shape  # (B, T, d_in)
        keys = self.W_key(x)  # (B, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)

        # Split the last dimension into heads: (B, T, d_out) -> (B, T, num_heads, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)

        # (B, T, num_heads, head_dim) -> (B, num_heads, T, head_dim)
        keys = keys.transpose(1, 2)
        queries = queries.transpose(1, 2)
        values = values.transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)  # (B, num_heads, T, T): one score per query-key pair
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]  # True above the diagonal: the future
        attn_scores.masked_fill_(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (B, T, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)  # heads side by side
        return self.out_proj(context_vec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Not in the book: the chapter's saved state dicts carry `...att.mask`; it is rebuilt here,
        # so drop the key and they load with strict=True.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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

    def forward(self, x):
        shortcut = x  # (B, T, C)
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        return x


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

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape  # (B, T) token ids
        check_length(seq_len, self.pos_emb.num_embeddings)  # Not in the book: a clear error
        tok_embeds = self.tok_emb(in_idx)  # (B, T, C)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))  # (T, C)
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)  # (B, T, vocab_size)
        return logits


def check_length(seq_len, context_length):
    """Not in the book: refuse an input longer than the context, saying how to crop it."""
    if seq_len > context_length:
        raise ValueError(f"input has {seq_len} tokens but the model's context_length is {context_length}; "
                         "crop it (e.g. idx[:, -context_length:])")


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


def canonical_model_name(name):
    """Not in the book: "124M" -> "gpt2-small (124M)", "tiny" -> "tiny (random)" (as MODEL_NAMES spells them)."""
    cfg = model_config(name)
    return next((n for n in MODEL_NAMES if model_config(n) == cfg), name)


def is_tiny(name):
    """Not in the book: the random demo model, which has no pretrained weights."""
    return str(name).strip().lower() in ("tiny", TINY_NAME)


def count_parameters(model):
    """Number of parameters (the chapter's 163,009,536 for gpt2-small: out_head is not tied)."""
    return sum(p.numel() for p in model.parameters())
