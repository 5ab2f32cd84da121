"""Not in the book: answering a split with a model and saving it as the chapter does.

Section 7.7 ends with ``instruction-data-with-response.json``: the test entries, each with the
fine-tuned model's ``model_response``, written with ``indent=4``. ``answer_entries`` does that
through the fast path (``sft.fast.decode.generate_responses``: KV cache, prompts batched by
length), optionally on a bf16 copy of the model where bf16 is fast, and writes the file atomically.
With ``partial=True`` the file is rewritten after every batch with the entries answered so far, so
a stopped or killed job (``sft.studio.jobs``) keeps them, and ``reuse=`` takes them back to go on.
"""
import copy
import json
import time

import torch

from ..fast.decode import generate_responses
from ..prompts import get_prompt_style
from ..tokenizer import ENDOFTEXT
from .files import atomic_write_json

RESPONSE_BATCH = 32  # test prompts answered together (KV cache): more rows per weight read


def answer_model(model, precision="fp32"):
    """``model`` in eval mode, or a bf16 copy of it (half the weight traffic per decoded token)."""
    model = model.eval()
    return copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model


def entry_key(entry):
    """What identifies an entry whatever answer it carries: its fields but ``model_response``."""
    return json.dumps({k: v for k, v in entry.items() if k != "model_response"}, sort_keys=True, default=str)


def answer_entries(model, entries, tokenizer, *, prompt_style="alpaca", max_new_tokens=256,
                   batch_size=RESPONSE_BATCH, device=None, precision="fp32", progress=None, out_path=None,
                   temperature=0.0, top_k=None, partial=False, reuse=()):
    """Copies of ``entries`` with ``model_response`` added; with ``out_path``, saved there as JSON
    (the chapter's layout: ``indent=4``), atomically. ``progress(done, total)`` after each batch.

    ``partial``: ``out_path`` is written at the start and after each batch with the entries answered
    so far, in the entries' order, so an exception from ``progress`` (a stop) or a kill keeps them.
    ``reuse``: earlier results (entries with ``model_response``); an entry equal to one of them but
    for its answer keeps that answer and is not asked again. The batches are the ones a single
    ``generate_responses`` call makes (prompts sorted by length), so the answers are the same.
    """
    entries = list(entries)
    kept = {entry_key(r): r["model_response"] for r in reuse or ()
            if isinstance(r, dict) and isinstance(r.get("model_response"), str)}
    if not partial and not kept:
        results = generate_responses(answer_model(model, precision), entries, tokenizer, prompt_style=prompt_style,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                     progress=progress, temperature=temperature, top_k=top_k)
        if out_path is not None:
            atomic_write_json(out_path, results, indent=4)
        return results

    responses = [kept.get(entry_key(e)) if isinstance(e, dict) else None for e in entries]
    todo = [i for i, r in enumerate(responses) if r is None]
    total = len(entries)

    def save():
        if out_path is not None:
            atomic_write_json(out_path, [{**e, "model_response": r} for e, r in zip(entries, responses)
                                         if r is not None], indent=4)

    save()
    if progress is not None:
        progress(total - len(todo), total)
    if not todo:
        return [{**e, "model_response": r} for e, r in zip(entries, responses)]
    chosen = answer_model(model, precision)
    for chunk in _batches(entries, todo, tokenizer, prompt_style, batch_size):
        answered = generate_responses(chosen, [entries[i] for i in chunk], tokenizer, prompt_style=prompt_style,
                                      max_new_tokens=max_new_tokens, batch_size=len(chunk), device=device,
                                      temperature=temperature, top_k=top_k,
                                      on_token=_every_second(progress, responses, total))
        for i, result in zip(chunk, answered):
            responses[i] = result["model_response"]
        save()
        if progress is not None:
            progress(sum(r is not None for r in responses), total)
    return [{**e, "model_response": r} for e, r in zip(entries, responses)]


def _every_second(progress, responses, total):
    """An ``on_token`` that repeats the last progress at most once a second: a stop requested during a
    long batch lands within a second (that batch is lost, the answers saved before it are kept)."""
    if progress is None:
        return None
    last = [time.monotonic()]

    def tick(n):
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            progress(sum(r is not None for r in responses), total)
    return tick


def _batches(entries, todo, tokenizer, prompt_style, batch_size):
    """``todo``'s indices sorted by prompt length (stable), cut into batches, as ``generate_responses``
    orders them; an entry that cannot be formatted sorts first, where ``generate_responses`` names it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    style = get_prompt_style(prompt_style)

    def length(i):
        try:
            return len(tokenizer.encode(style.format_prompt(entries[i]), allowed_special={ENDOFTEXT}))
        except (KeyError, TypeError, AttributeError):
            return -1

    order = sorted(todo, key=length)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
