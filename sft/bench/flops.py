"""Not in the book: how many floating-point operations each path's work is, and its MFU.

MFU (model FLOPs utilisation) = the FLOPs of a path's work / its seconds / the GEMM ceiling
measured in the same run for the path's precision (``measure.gemm_ceiling``). Only matrix
products are counted: they are where the FLOPs are (layer norms, GELU, softmax, the loss and
AdamW are a few FLOPs per element and memory-bound: they cost time, not FLOPs). A path that wastes
time on those, on casts or on a slow GEMM shape shows it as MFU below 1.
"""
from ..batching import IGNORE_INDEX
from ..fast.loss import counted_lengths


def body_matmul_params(cfg):
    """Weights of the transformer blocks' matrix products: per layer the query, key, value and
    output projections (4 d^2) and the MLP's two Linear layers (d x 4d, 4d x d: 8 d^2), so
    12 * n_layers * d^2 (84.9M for gpt2-small). Embeddings are lookups, not products; biases
    and layer norms are elementwise: none of them counted."""
    d = cfg["emb_dim"]
    return 12 * cfg["n_layers"] * d * d


def forward_flops(cfg, body_positions, head_positions, attention_rows, attention_length):
    """FLOPs of one forward pass, by part ({"body", "head", "attention", "total"}).

    - body: 2 * ``body_matmul_params`` per position the body computes (a multiply and an add
      per weight: an (M, k) @ (k, n) product is 2 M k n FLOPs);
    - head: 2 * emb_dim * vocab_size per position the output head computes;
    - attention: 2 * 2 * T * d per layer per query position, over ``attention_rows`` rows of
      ``attention_length`` = T positions: Q K^T (T keys of d per query) and the product with V.
      This counts the full T x T square, which is what the chapter's masked formula and the fast
      path's CPU math attention (bf16, rows up to 128 tokens) compute. Causal SDPA kernels (the
      fast path in fp32, HF's ``sdpa``) skip blocks above the diagonal, up to about half of it;
      at these lengths (T ~ 60-120) attention is ~1-2 % of the total, so counting the square for
      every path moves an MFU by under 1 %.
    """
    d, vocab, layers = cfg["emb_dim"], cfg["vocab_size"], cfg["n_layers"]
    parts = {"body": 2 * body_matmul_params(cfg) * body_positions,
             "head": 2 * d * vocab * head_positions,
             "attention": layers * 2 * 2 * attention_length * d * attention_rows * attention_length}
    parts["total"] = sum(parts.values())
    return parts


def step_positions(inputs, targets, path):
    """(body positions, head positions, attention rows, attention length) one training step of
    ``path`` computes on a chapter batch (B, T):

    - "chapter": every position, body and head: B * T;
    - "fast": the body up to each row's last counted target (``counted_lengths``), the head on
      the counted targets only (the masked head); attention still on the (B, T) layout;
    - "hf": ``GPT2LMHeadModel`` on the chapter's padded sequences (B, T + 1), labels shifted
      by HF itself (``sft.bench.hf.hf_batch``): body and head at every one of B * (T + 1).
    """
    rows, length = targets.shape
    if path == "chapter":
        return rows * length, rows * length, rows, length
    if path == "fast":
        return (int(counted_lengths(targets).sum()), int((targets != IGNORE_INDEX).sum()), rows, length)
    if path == "hf":
        return rows * (length + 1), rows * (length + 1), rows, length + 1
    raise ValueError(f"unknown path {path!r}: chapter, fast or hf")


def train_step_flops(cfg, inputs, targets, path):
    """FLOPs of one optimizer step of ``path`` on a batch, by part: forward + backward = 3 x
    forward (backward computes two products per forward product: the gradients of the input
    and of the weight)."""
    return {k: 3 * v for k, v in forward_flops(cfg, *step_positions(inputs, targets, path)).items()}


def generation_flops(cfg, prompt_length, new_tokens):
    """Useful FLOPs of answering one prompt greedily with a KV cache: the prompt once (body at
    every prompt position, causal attention over the keys before each, the head at the last
    position only), then one position for each further new token (its body, head, and attention
    over the context so far). The same count for every path: it is the work the answer needs
    (the chapter's loop recomputes the whole context per token and does far more)."""
    d, vocab, layers = cfg["emb_dim"], cfg["vocab_size"], cfg["n_layers"]
    body = 2 * body_matmul_params(cfg)
    total = body * prompt_length + 2 * d * vocab + layers * 4 * d * prompt_length * (prompt_length + 1) // 2
    for k in range(1, new_tokens):  # the first new token comes from the prompt pass
        total += body + 2 * d * vocab + layers * 4 * d * (prompt_length + k)
    return total


def mfu(flops, seconds, ceiling_gflops):
    """flops / seconds / ceiling, rounded; None where a figure is missing."""
    if not flops or not seconds or not ceiling_gflops:
        return None
    return round(flops / seconds / (ceiling_gflops * 1e9), 4)


def sum_parts(parts_list):
    """Add up a list of {"body", "head", "attention", "total"} dicts."""
    out = {}
    for parts in parts_list:
        for k, v in parts.items():
            out[k] = out.get(k, 0) + v
    return out
