"""Not in the book: the fast path, beside the chapter's modules and never instead of them.

The book's ``GPTModel`` (``sft.model``) keeps the chapter's formulas. The functions here run
the same modules' parameters through faster kernels, as nanoGPT keeps "flash" attention beside
the manual formula; tests prove each piece equal to the book's (logits and gradients):

- ``kernels``: fused layer norm and GELU, scaled-dot-product attention (and, on CPU in bf16,
  the chapter's formula for short rows, which beats the fused kernel there), one block.
- ``packed``: compute only each row's real positions (no right padding).
- ``kvcache``: keys and values of past positions, for generation; left-padded batches.
- ``forward``: ``forward_hidden(model, ids, ...)`` up to the output head, and ``FastGPT``, the
  module a trainer wraps in DDP or ``torch.compile``.
- ``loss``: the output head and cross-entropy only where targets count.
- ``decode``: batched greedy/sampled generation with a KV cache (``generate_batch``,
  ``generate_stream``) and the chapter's section 7.7 loop done in batches (``generate_responses``).

Imports go one way: this package imports the book's modules, never the reverse.
"""
