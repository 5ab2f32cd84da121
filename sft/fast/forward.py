"""Not in the book: a book ``GPTModel``'s forward pass through the fast kernels.

``forward_hidden(model, ids)`` gives the hidden states before the output head, so a trainer can
apply the head only where targets count, and generation only at the last position. Options
(keyword-only): ``lengths`` computes only each row's first ``lengths[b]`` positions (``Packed``),
``pad_mask`` serves left-padded prompts, ``kv_cache`` decodes one position at a time, and
``checkpointing`` recomputes each block's activations in backward instead of storing them.

``FastGPT`` wraps a model in a module whose ``forward`` is this function: it is what a trainer
hands to ``DistributedDataParallel`` or ``torch.compile`` (they act on a module's forward).
Its parameters are the wrapped model's own; nothing is copied or converted.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..model import check_length
from . import kernels
from .kvcache import positions_and_mask
from .lora import linear
from .packed import Packed


def forward_hidden(model, in_idx, *, pad_mask=None, kv_cache=None, lengths=None, checkpointing=False,
                   fused=True):
    """in_idx (B, T) -> hidden states (B, T, emb_dim) after ``final_norm``.

    ``lengths`` (B,): only the first ``lengths[b]`` positions of row b are computed; returns
    (N, emb_dim) for those N = lengths.sum() positions, row by row. ``pad_mask`` (B, T) bool,
    False at left padding. ``fused=False`` runs the book's own module bodies (only for the plain
    causal path: the chapter's computation with checkpointing).
    """
    batch_size, seq_len = in_idx.shape
    context_length = model.pos_emb.num_embeddings
    if lengths is not None:
        if pad_mask is not None or kv_cache is not None:
            raise ValueError("lengths cannot be combined with pad_mask or kv_cache")
        check_length(seq_len, context_length)
        packed = Packed.from_lengths(lengths.to(in_idx.device), seq_len)
        x = model.drop_emb(model.tok_emb(packed.gather(in_idx)) + model.pos_emb(packed.positions()))  # (N, C)
        return kernels.layer_norm(model.final_norm, _blocks(model, x, packed, checkpointing))
    if kv_cache is None and pad_mask is None:  # plain causal attention, as the chapter
        check_length(seq_len, context_length)
        pos, attn_mask = torch.arange(seq_len, device=in_idx.device), None
    elif kv_cache is None:  # a left-padded batch, no cache
        pos, attn_mask = positions_and_mask(pad_mask, start=0)
    else:
        pos, attn_mask = kv_cache.advance(seq_len, pad_mask, in_idx.device)
        if kv_cache.max_position >= context_length:
            raise ValueError(f"KV cache passed the model's context_length ({context_length})")
    x = model.drop_emb(model.tok_emb(in_idx) + model.pos_emb(pos))  # (B, T, C)
    if attn_mask is None and kv_cache is None:
        if not fused:
            return model.final_norm(_book_blocks(model, x, checkpointing))
        x = _blocks(model, x, None, checkpointing)
    else:
        for i, blk in enumerate(model.trf_blocks):
            x = kernels.block(blk, x, attn_mask=attn_mask, kv=None if kv_cache is None else kv_cache.layers[i])
    return kernels.layer_norm(model.final_norm, x)


def _recompute(model, checkpointing):
    return checkpointing and model.training and torch.is_grad_enabled()


def _blocks(model, x, packed, checkpointing):
    """The blocks with plain causal attention; each recomputed in backward if checkpointing."""
    recompute = _recompute(model, checkpointing)
    for blk in model.trf_blocks:
        if recompute:
            x = checkpoint(_fused_block, blk, x, packed, use_reentrant=False)
        else:
            x = kernels.block(blk, x, packed=packed)
    return x


def _fused_block(blk, x, packed):
    return kernels.block(blk, x, packed=packed)


def _book_blocks(model, x, checkpointing):
    recompute = _recompute(model, checkpointing)
    for blk in model.trf_blocks:
        x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
    return x


def forward(model, in_idx, **kwargs):
    """Logits (B, T, vocab) (or (N, vocab) with ``lengths``): ``forward_hidden`` then the output head."""
    return linear(model.out_head, forward_hidden(model, in_idx, **kwargs))


class FastGPT(nn.Module):
    """A book ``GPTModel`` whose forward runs the fast kernels (for DDP and torch.compile).

    ``FastGPT(model)(ids)`` -> logits; ``(ids, return_hidden=True, lengths=...)`` -> hidden
    states. ``checkpointing`` recomputes activations in backward; ``fused=False`` keeps the
    book's module bodies (the chapter's exact computation). ``.model`` is the wrapped model.
    """

    def __init__(self, model, *, checkpointing=False, fused=True):
        super().__init__()
        self.model = model
        self.checkpointing = checkpointing
        self.fused = fused

    def forward(self, in_idx, *, return_hidden=False, lengths=None):
        if not self.fused and lengths is not None:
            raise ValueError("lengths (packed rows) needs the fused kernels")
        hidden = forward_hidden(self.model, in_idx, lengths=lengths, checkpointing=self.checkpointing,
                                fused=self.fused)
        return hidden if return_hidden else linear(self.model.out_head, hidden)
