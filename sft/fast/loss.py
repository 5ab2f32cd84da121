"""Not in the book: the training loss computed only where it counts.

The chapter's ``calc_loss_batch`` runs the output head (emb_dim x 50257, a third of gpt2-small's
weights) at every position, padding included, then drops the -100 targets. Here the body runs up
to each row's last counted target (``forward_hidden`` with ``lengths``: the padding after it
cannot change earlier positions, attention is causal) and the head only at the N counted
positions. Same value and gradients (fp32), far less work.
"""
import torch
import torch.nn.functional as F

from ..batching import IGNORE_INDEX
from .lora import linear


def counted_lengths(targets, ignore_index=IGNORE_INDEX):
    """(B,) per row: 1 + the position of its last counted target (0 if none counts)."""
    positions = torch.arange(1, targets.shape[1] + 1, device=targets.device)
    return torch.where(targets != ignore_index, positions, 0).amax(dim=1)


def masked_head_loss(forward, out_head, inputs, targets, *, reduction="mean", ignore_index=IGNORE_INDEX):
    """Cross-entropy of (B, T) ``inputs``/``targets`` over the counted targets only.

    ``forward(inputs, return_hidden=True, lengths=...)`` gives the (M, C) hidden states of each
    row's first ``lengths[b]`` positions (a ``FastGPT``, possibly inside DDP); ``out_head`` is the
    model's output head. Logits are taken in fp32 for the softmax (autocast gives bf16).
    """
    counted = targets != ignore_index  # (B, T)
    lengths = counted_lengths(targets, ignore_index)
    hidden = forward(inputs, return_hidden=True, lengths=lengths)  # (M, C)
    positions = torch.arange(1, targets.shape[1] + 1, device=targets.device)
    kept = positions[None, :] <= lengths[:, None]  # (B, T): the M positions computed
    keep = counted[kept]  # (M,)
    logits = linear(out_head, hidden[keep])  # (N, vocab): only the N positions that count
    return F.cross_entropy(logits.float(), targets[kept][keep], reduction=reduction)


def full_loss(logits, targets, *, reduction="mean", ignore_index=IGNORE_INDEX):
    """The chapter's loss on (B, T, vocab) logits, with a choice of reduction."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
