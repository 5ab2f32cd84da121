"""Not in the book: where the loss comes from, token by token.

The chapter's loss is one number: the mean cross-entropy over every target that is not -100.
Here it is taken apart. ``position_losses`` gives each position's loss (0 where the target is
-100), and its masked mean is exactly ``calc_loss_batch``. ``explain_example`` takes one entry
through the same ``InstructionDataset`` and ``custom_collate_fn`` the training used (the same
prompt style, instruction masking and ``allowed_max_length``), so what is shown is what was
trained: per position, the input token, the target the model must predict, its role
(instruction, input, response, end-of-text, padding), whether it counts, its loss and
probability, and the model's top guesses. ``compare_examples`` sets two models side by side (the
base and a fine-tuned run): which targets fine-tuning made more or less likely; ``role_summary``
averages the loss by role over a split.
"""
import math

import torch

from ..batching import IGNORE_INDEX, InstructionDataset, batch_anatomy, custom_collate_fn

ROLES = ("instruction", "input", "response", "end-of-text")


def position_losses(model, inputs, targets, *, ignore_index=IGNORE_INDEX):
    """(B, T) cross-entropy of each position's target (0 where it is ``ignore_index``), the book's
    forward in eval mode, no gradients. ``losses[targets != -100].mean()`` is ``calc_loss_batch``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)  # (B, T, vocab)
    finally:
        model.train(was_training)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                               ignore_index=ignore_index, reduction="none")
    return losses.view(targets.shape), logits


def _collated(entries, tokenizer, *, prompt_style, mask_instruction, allowed_max_length, device):
    dataset = InstructionDataset(entries, tokenizer, prompt_style=prompt_style, mask_instruction=mask_instruction)
    inputs, targets = custom_collate_fn([dataset[i] for i in range(len(dataset))],
                                        allowed_max_length=allowed_max_length, device=device)
    return inputs, targets


def _device(model):
    return next(model.parameters()).device


def explain_example(model, entry, tokenizer, *, prompt_style="alpaca", mask_instruction=False,
                    allowed_max_length=1024, top_k=5):
    """Every position of one entry, as the training saw it: a list of dicts with col, token_id,
    token_text, role, target_id, target_text, in_loss, loss, prob (of the target), logprob and
    top (the model's ``top_k`` next-token guesses: [(text, probability), ...])."""
    inputs, targets = _collated([entry], tokenizer, prompt_style=prompt_style, mask_instruction=mask_instruction,
                                allowed_max_length=allowed_max_length, device=_device(model))
    losses, logits = position_losses(model, inputs, targets)
    probs = torch.softmax(logits[0].float(), dim=-1)  # (T, vocab)
    top = probs.topk(top_k, dim=-1)
    cells = batch_anatomy(inputs.cpu(), targets.cpu(), tokenizer, entries=[entry], prompt_style=prompt_style)["cells"]
    out = []
    for cell in cells:
        j = cell["col"]
        guess = [(tokenizer.decode([int(t)]), round(float(p), 4)) for p, t in zip(top.values[j], top.indices[j])]
        target_role = cells[j + 1]["role"] if j + 1 < len(cells) else "end-of-text"
        if cell["in_loss"]:
            prob = float(probs[j, int(targets[0, j])])
        elif target_role not in ("padding", "end-of-text"):  # a masked target (-100): the model still guesses it
            prob = float(probs[j, int(inputs[0, j + 1])])
        else:
            prob = None
        out.append({**cell, "loss": float(losses[0, j]) if cell["in_loss"] else None, "prob": prob,
                    "logprob": math.log(prob) if prob else None, "top": guess, "target_role": target_role})
    return out


def compare_examples(base, tuned, entry, tokenizer, **kwargs):
    """``explain_example`` for both models, position by position, with each target's change in
    log-probability (tuned - base): > 0 where fine-tuning made the right next token more likely."""
    a, b = explain_example(base, entry, tokenizer, **kwargs), explain_example(tuned, entry, tokenizer, **kwargs)
    rows = []
    for x, y in zip(a, b):
        change = (y["logprob"] - x["logprob"]) if x["logprob"] is not None and y["logprob"] is not None else None
        rows.append({**y, "base_loss": x["loss"], "base_prob": x["prob"], "base_top": x["top"],
                     "logprob_change": change})
    return rows


def role_summary(model, entries, tokenizer, *, prompt_style="alpaca", mask_instruction=False,
                 allowed_max_length=1024, batch_size=8):
    """Mean loss of the targets by what they predict (instruction, input, response, end-of-text)
    over ``entries``, counting every target the model is asked about: with instruction masking
    on, the instruction's targets are -100 in training, but their loss is measured here too, to
    show what masking leaves unlearnt. Returns {role: {"mean_loss", "targets", "trained"}}."""
    sums = {r: [0.0, 0, 0] for r in ROLES}  # loss sum, targets, trained targets
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        kw = dict(prompt_style=prompt_style, allowed_max_length=allowed_max_length, device=_device(model))
        inputs, trained = _collated(chunk, tokenizer, mask_instruction=mask_instruction, **kw)
        _, every = _collated(chunk, tokenizer, mask_instruction=False, **kw)  # every real target, unmasked
        losses, _ = position_losses(model, inputs, every)
        anatomy = batch_anatomy(inputs.cpu(), every.cpu(), tokenizer, entries=chunk, prompt_style=prompt_style)
        for b, roles in enumerate(anatomy["roles"]):
            for j in range(len(roles)):
                if every[b, j] == IGNORE_INDEX:
                    continue
                role = roles[j + 1] if j + 1 < len(roles) else "end-of-text"
                role = "end-of-text" if role in ("end-of-text", "padding") else role
                if role not in sums:
                    continue
                sums[role][0] += float(losses[b, j])
                sums[role][1] += 1
                sums[role][2] += int(trained[b, j] != IGNORE_INDEX)
    return {r: {"mean_loss": s / n if n else None, "targets": n, "trained": t} for r, (s, n, t) in sums.items()}
