"""Not in the book: answering a split with a model and saving it as the chapter does.

Section 7.7 ends with ``instruction-data-with-response.json``: the test entries, each with the
fine-tuned model's ``model_response``, written with ``indent=4``. ``answer_entries`` does that
through the fast path (``sft.fast.decode.generate_responses``: KV cache, prompts batched by
length), optionally on a bf16 copy of the model where bf16 is fast, and writes the file atomically.
"""
import copy

import torch

from ..fast.decode import generate_responses
from .files import atomic_write_json

RESPONSE_BATCH = 32  # test prompts answered together (KV cache): more rows per weight read


def answer_model(model, precision="fp32"):
    """``model`` in eval mode, or a bf16 copy of it (half the weight traffic per decoded token)."""
    model = model.eval()
    return copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model


def answer_entries(model, entries, tokenizer, *, prompt_style="alpaca", max_new_tokens=256,
                   batch_size=RESPONSE_BATCH, device=None, precision="fp32", progress=None, out_path=None,
                   temperature=0.0, top_k=None):
    """Copies of ``entries`` with ``model_response`` added; with ``out_path``, saved there as JSON
    (the chapter's layout: ``indent=4``), atomically. ``progress(done, total)`` after each batch."""
    results = generate_responses(answer_model(model, precision), entries, tokenizer, prompt_style=prompt_style,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                 progress=progress, temperature=temperature, top_k=top_k)
    if out_path is not None:
        atomic_write_json(out_path, results, indent=4)
    return results
