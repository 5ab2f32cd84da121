"""Not in the book: compute only the positions of a batch that matter.

A padded batch is ~20% padding, and causal attention means a row's later positions never change
its earlier ones, so a trainer can skip each row's right padding entirely: the projections and
MLPs run on the N kept positions only, attention on the (B, T) layout.
"""
import torch


class Packed:
    """Which positions of a (B, T) batch are computed: ``keep`` (B, T) bool, a prefix of each row.

    Its methods' output sizes depend on the data (how many positions are kept), which
    ``torch.compile`` cannot put in a graph: it runs them as they are, between compiled parts.
    """

    def __init__(self, keep):
        self.keep = keep

    @classmethod
    def from_lengths(cls, lengths, seq_len):
        """Keep the first ``lengths[b]`` positions of each row b of a (B, seq_len) batch."""
        return cls(torch.arange(seq_len, device=lengths.device) < lengths[:, None])

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
