"""Not in the book: batched generation with a KV cache, beside the chapter's ``generate``.

``generate_batch`` feeds each prompt once (left-padded into a batch), then one token per step
through a ``KVCache``; rows leave the batch at their end-of-text. Greedy output is token for
token the chapter's ``generate`` (``sft.generation``) for each prompt alone; sampling follows
the chapter's rule (``next_token``). Everything works on token ids, except
``generate_responses``, the chapter's section 7.7 loop done in batches, which formats entries
with a prompt style and decodes the answers.
"""
import torch

from ..generation import next_token
from ..prompts import get_prompt_style
from ..tokenizer import ENDOFTEXT, EOT_ID
from .forward import forward_hidden
from .kvcache import new_kv_cache
from .lora import linear

def _left_pad(seqs, device, pad_id=0):
    """Lists of ids -> ids (B, T) padded on the left, and pad_mask (B, T) (None if no padding).

    Left padding puts every row's last real token in the last column, so one (B, 1) step
    serves all rows. The pad id is irrelevant: padded keys are masked out.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = True
    padded = any(len(s) < width for s in seqs)
    return ids.to(device), (mask.to(device) if padded else None)


def _model_device(model):
    return next(model.parameters()).device


def _check_prompts(prompts):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    seqs = []
    for i, p in enumerate(prompts):
        p = p.tolist() if hasattr(p, "tolist") else list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty; it needs at least one token")
        seqs.append([int(t) for t in p])
    return seqs


def last_logits(model, ids, **kwargs):
    """Logits (B, vocab) of the last position only, through the fast kernels.

    The output head (vocab x emb_dim, a third of gpt2-small's weights) then runs on one
    position per row, not on every prompt position as ``model(ids)[:, -1]`` would.
    """
    return linear(model.out_head, forward_hidden(model, ids, **kwargs)[:, -1, :])


@torch.inference_mode()
def _decode_steps(model, prompts, max_new_tokens, eos_id, temperature, top_k, context_size, device):
    """Yield, for each step, ``[(row, token), ...]`` for the rows that produced a token.

    A row that produces ``eos_id`` leaves the batch (the eos is not yielded). While every row
    fits in ``context_size`` the KV cache is used; after that the rows are re-run on their last
    ``context_size`` tokens each step, which is what the chapter's crop does.
    """
    seqs = [p[-context_size:] for p in prompts]  # the chapter crops to the context first
    rows = list(range(len(seqs)))  # original index of each row still running
    ids, pad_mask = _left_pad(seqs, device)
    cache = new_kv_cache(model, len(seqs), ids.shape[1] + max_new_tokens)
    logits = last_logits(model, ids, pad_mask=pad_mask, kv_cache=cache)  # (B, vocab)
    use_cache = True
    for step in range(max_new_tokens):
        next_ids = next_token(logits, temperature, top_k)  # (B, 1)
        keep, out = [], []
        for i, tok in enumerate(next_ids[:, 0].tolist()):
            if eos_id is not None and tok == eos_id:
                continue  # this row is finished
            seqs[rows[i]].append(tok)
            out.append((rows[i], tok))
            keep.append(i)
        if out:
            yield out
        if not keep or step == max_new_tokens - 1:
            return
        if len(keep) < len(rows):
            rows = [rows[i] for i in keep]
            next_ids = next_ids[keep]
            if use_cache:
                cache.keep(keep)
        if use_cache and any(len(seqs[r]) > context_size for r in rows):
            use_cache = False  # positions would pass the context: fall back to the sliding window
        if use_cache:
            logits = last_logits(model, next_ids, kv_cache=cache)
        else:
            ids, pad_mask = _left_pad([seqs[r][-context_size:] for r in rows], device)
            logits = last_logits(model, ids, pad_mask=pad_mask)


def _prepare(model, context_size, device):
    context_size = context_size or model.pos_emb.num_embeddings
    device = device if device is not None else _model_device(model)
    return context_size, device


def generate_batch(model, prompts, *, max_new_tokens, eos_id=EOT_ID, temperature=0.0, top_k=None,
                   context_size=None, device=None, on_token=None):
    """New token ids for each prompt (a list of id lists), generated together with a KV cache.

    Greedy (the default) gives, for every prompt, the tokens the chapter's ``generate`` gives
    for it alone. Each list stops before its ``eos_id``. Sampling follows the chapter's rule;
    it is reproducible under ``torch.manual_seed`` but draws from one batched random stream.
    The model runs in eval mode (restored afterwards). ``on_token(n)``, if given, is called after
    the n-th new token of the batch (n = 1, 2, ...): a job's progress, where a stop can land.
    """
    seqs = _check_prompts(prompts)
    context_size, device = _prepare(model, context_size, device)
    new_ids = [[] for _ in seqs]
    was_training = model.training
    model.eval()
    try:
        for n, step in enumerate(_decode_steps(model, seqs, max_new_tokens, eos_id, temperature, top_k, context_size,
                                               device), start=1):
            for row, tok in step:
                new_ids[row].append(tok)
            if on_token is not None:
                on_token(n)
    finally:
        model.train(was_training)
    return new_ids


def generate_stream(model, ids, *, max_new_tokens, eos_id=EOT_ID, temperature=0.0, top_k=None,
                    context_size=None, device=None):
    """Yield the new token ids for one prompt (a list of ids) one at a time, as they come."""
    seqs = _check_prompts([ids])
    context_size, device = _prepare(model, context_size, device)
    was_training = model.training
    model.eval()
    try:
        for step in _decode_steps(model, seqs, max_new_tokens, eos_id, temperature, top_k, context_size, device):
            yield step[0][1]
    finally:
        model.train(was_training)


def generate_responses(model, entries, tokenizer, *, prompt_style="alpaca", max_new_tokens=256,
                       batch_size=8, device=None, progress=None, temperature=0.0, top_k=None,
                       eos_id=EOT_ID, on_token=None):
    """Answer each entry; return copies of the entries with ``"model_response"`` added.

    The chapter's section 7.7 loop (``generate`` one entry at a time, ``extract_response``),
    done in batches: prompts are sorted by length so a batch holds similar lengths (little
    padding), and the results come back in the entries' order. ``progress(done, total)`` is
    called after each batch, ``on_token`` as ``generate_batch`` calls it. (A run folder saves the list as the chapter's
    ``instruction-data-with-response.json``: ``sft.studio.answers``.)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    style = get_prompt_style(prompt_style)
    entries = list(entries)
    prompt_texts, prompt_ids = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i} is a {type(entry).__name__}, expected a dict")
        try:
            text = style.format_prompt(entry)
        except KeyError as err:
            raise ValueError(f"entry {i} has no {err.args[0]!r} field") from None
        prompt_texts.append(text)
        prompt_ids.append(tokenizer.encode(text, allowed_special={ENDOFTEXT}))

    order = sorted(range(len(entries)), key=lambda i: len(prompt_ids[i]))  # stable: ties keep order
    responses = [None] * len(entries)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new_ids = generate_batch(
            model, [prompt_ids[i] for i in chunk], max_new_tokens=max_new_tokens, eos_id=eos_id,
            temperature=temperature, top_k=top_k, device=device, on_token=on_token,
        )
        for i, ids in zip(chunk, new_ids):
            generated_text = tokenizer.decode(prompt_ids[i] + ids)
            responses[i] = style.extract_response(generated_text, prompt_texts[i])
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))

    return [{**entry, "model_response": resp} for entry, resp in zip(entries, responses)]
