"""From entries to padded, shifted, masked batches (chapter 7, sections 7.3-7.4).

The chapter's path: ``InstructionDataset`` pre-tokenizes each example, the two collate
drafts teach padding and shifting, ``custom_collate_fn`` adds -100 masks and truncation,
and ``create_data_loaders`` is listing 7.6. Beside it (all off by default):
instruction masking (exercise 7.2), length-grouped batches, ``get_batch`` /
``batch_anatomy`` for drawing one batch, and ``pretraining_checks``.
"""
import math
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .prompts import get_prompt_style, prompt_token_count

EOT_ID = 50256  # <|endoftext|>: appended after each response and reused as the pad token
IGNORE_INDEX = -100  # cross_entropy's default ignore_index: these targets add nothing to the loss


class InstructionDataset(Dataset):
    """Chapter 7: each entry as token ids of prompt + "\\n\\n### Response:\\n" + output.

    Not in the book (keyword-only): ``prompt_style`` picks another template (exercise 7.1);
    with ``mask_instruction=True`` items are ``(prompt_length, ids)`` pairs, as the book's
    exercise 7.2 solution yields them, and ``custom_collate_fn`` masks the prompt's targets.
    """

    def __init__(self, data, tokenizer, *, prompt_style="alpaca", mask_instruction=False):
        self.data = data
        self.prompt_style = get_prompt_style(prompt_style)
        self.mask_instruction = mask_instruction
        self.encoded_texts = []
        self.prompt_lengths = []  # tokens before the response prefix, in each example's ids
        for entry in data:
            # Tokenize the whole text at once, as the chapter does (BPE never sees a seam).
            full_text = self.prompt_style.format_example(entry)
            ids = tokenizer.encode(full_text)
            self.encoded_texts.append(ids)
            prompt_text = self.prompt_style.format_prompt(entry)
            self.prompt_lengths.append(prompt_token_count(prompt_text, ids, tokenizer))

    def __getitem__(self, index):
        if self.mask_instruction:
            return self.prompt_lengths[index], self.encoded_texts[index]
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


class InstructionDatasetPhi(InstructionDataset):
    """Exercise 7.1 (the book's solution's name): examples in the Phi-3 prompt style."""

    def __init__(self, data, tokenizer):
        super().__init__(data, tokenizer, prompt_style="phi3")


class InstructionDatasetWithMasking(InstructionDataset):
    """Exercise 7.2 (the book's solution's name): items are ``(instruction_length, ids)`` pairs,
    so ``custom_collate_with_masking_fn`` can mask the prompt's targets."""

    def __init__(self, data, tokenizer):
        super().__init__(data, tokenizer, mask_instruction=True)


def custom_collate_draft_1(batch, pad_token_id=50256, device="cpu"):
    """Chapter draft 1: append one end-of-text, pad to the longest, return inputs (B, T)."""
    batch_max_length = max(len(item) + 1 for item in batch)  # +1 for the end-of-text
    rows = []
    for item in batch:
        padded = item + [pad_token_id] * (batch_max_length - len(item))
        rows.append(torch.tensor(padded[:-1]))  # drop the extra slot again
    return torch.stack(rows).to(device)


def custom_collate_draft_2(batch, pad_token_id=50256, device="cpu"):
    """Chapter draft 2: as draft 1, plus targets = inputs shifted one to the left."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        padded = item + [pad_token_id] * (batch_max_length - len(item))
        inputs_lst.append(torch.tensor(padded[:-1]))  # (T,)
        targets_lst.append(torch.tensor(padded[1:]))  # (T,) the next token at each position
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=IGNORE_INDEX, allowed_max_length=None,
                      device="cpu"):
    """Chapter 7: pad, shift, keep the first end-of-text target, set later pads to ``ignore_index``.

    Returns inputs and targets, LongTensors (B, T), cut to ``allowed_max_length`` if given.
    Not in the book: an item may be a ``(prompt_length, ids)`` pair (``InstructionDataset``
    with ``mask_instruction=True``); then the targets that predict prompt tokens are
    ``ignore_index`` too, so only the response and its end-of-text are trained.
    """
    pairs = [item if isinstance(item, tuple) else (None, item) for item in batch]
    batch_max_length = max(len(ids) + 1 for _, ids in pairs)
    inputs_lst, targets_lst = [], []
    for prompt_length, ids in pairs:
        padded = ids + [pad_token_id] * (batch_max_length - len(ids))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        # The first pad in the targets is the end-of-text the model must learn; the rest is filler.
        pad_positions = torch.nonzero(targets == pad_token_id).flatten()
        if pad_positions.numel() > 1:
            targets[pad_positions[1:]] = ignore_index
        if prompt_length is not None:
            # Target j predicts token j+1: the first prompt_length-1 targets are prompt tokens.
            targets[: max(prompt_length - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def custom_collate_with_masking_fn(batch, pad_token_id=50256, ignore_index=IGNORE_INDEX, allowed_max_length=None,
                                   device="cpu"):
    """Exercise 7.2 (the book's solution's name): ``custom_collate_fn`` on ``(instruction_length,
    ids)`` pairs, whose first ``instruction_length - 1`` targets (the prompt's) become ``ignore_index``."""
    if not all(isinstance(item, tuple) for item in batch):
        raise ValueError("custom_collate_with_masking_fn takes (instruction_length, ids) pairs: "
                         "use InstructionDatasetWithMasking")
    return custom_collate_fn(batch, pad_token_id=pad_token_id, ignore_index=ignore_index,
                             allowed_max_length=allowed_max_length, device=device)


class LengthGroupedBatchSampler(Sampler):
    """Not in the book: batches of similar length, to cut padding; still shuffled, seeded.

    Each epoch shuffles the indices (generator seeded with ``seed + epoch``), sorts them by
    length inside buckets of ``bucket_batches`` batches, cuts batches, and shuffles the
    batch order. The same seed gives the same batches.
    """

    def __init__(self, lengths, batch_size, *, shuffle=True, drop_last=False, seed=123, bucket_batches=50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch = seed, 0
        self.bucket_size = batch_size * bucket_batches

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed or 0) + self.epoch)
        self.epoch += 1
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches = []
        for start in range(0, n, self.bucket_size):  # bucket_size is a multiple of batch_size
            bucket = sorted(order[start:start + self.bucket_size], key=self.lengths.__getitem__, reverse=True)
            batches += [bucket[i:i + self.batch_size] for i in range(0, len(bucket), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)

    def __len__(self):
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def _loader(dataset, collate, batch_size, shuffle, drop_last, num_workers, group_by_length, seed):
    if group_by_length:
        lengths = [len(ids) for ids in dataset.encoded_texts]
        sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=shuffle,
                      drop_last=drop_last, num_workers=num_workers)


def create_data_loaders(train_data, val_data, test_data, tokenizer, *, batch_size=8, num_workers=0,
                        device="cpu", allowed_max_length=1024, prompt_style="alpaca",
                        mask_instruction=False, seed=123, group_by_length=False):
    """Listing 7.6: (train_loader, val_loader, test_loader) yielding (inputs, targets) (B, T).

    Calls ``torch.manual_seed(seed)`` first, as the listing does (``seed=None`` leaves the
    global RNG alone); the train loader shuffles and drops the last partial batch.
    ``group_by_length`` (Not in the book) batches the training set by length.
    """
    if seed is not None:
        torch.manual_seed(seed)
    collate = partial(custom_collate_fn, device=device, allowed_max_length=allowed_max_length)
    make = partial(InstructionDataset, tokenizer=tokenizer, prompt_style=prompt_style,
                   mask_instruction=mask_instruction)
    train_loader = _loader(make(train_data), collate, batch_size, True, True, num_workers, group_by_length, seed)
    val_loader = _loader(make(val_data), collate, batch_size, False, False, num_workers, False, seed)
    test_loader = _loader(make(test_data), collate, batch_size, False, False, num_workers, False, seed)
    return train_loader, val_loader, test_loader


# ----------------------------------------------------------------------------- Not in the book:
# one batch taken apart, and checks to run before training.

def get_batch(data, tokenizer, *, batch_number=0, batch_size=8, shuffle=True, drop_last=None, seed=123,
              allowed_max_length=1024, prompt_style="alpaca", mask_instruction=False,
              group_by_length=False, device="cpu"):
    """Batch ``batch_number`` of a loader built as ``create_data_loaders`` builds it, and which entries.

    Use ``shuffle=True`` for the train split, False for validation/test (``drop_last``
    follows ``shuffle`` unless given). The global RNG is left untouched.
    Returns a dict: indices, entries, inputs (B, T), targets (B, T), prompt_lengths.
    """
    drop_last = shuffle if drop_last is None else drop_last
    n = len(data)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if group_by_length:
            style = get_prompt_style(prompt_style)
            lengths = [len(tokenizer.encode(style.format_example(e))) for e in data]
            sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
            index_loader = DataLoader(range(n), batch_sampler=sampler, collate_fn=list)
        else:  # same sampler and the same RNG draws as the real loader, over indices only
            index_loader = DataLoader(range(n), batch_size=batch_size, shuffle=shuffle,
                                      drop_last=drop_last, collate_fn=list)
        for k, indices in enumerate(index_loader):
            if k == batch_number:
                break
        else:
            raise IndexError(f"batch {batch_number} out of range: this loader has {len(index_loader)} batches")
    entries = [data[i] for i in indices]
    dataset = InstructionDataset(entries, tokenizer, prompt_style=prompt_style, mask_instruction=mask_instruction)
    inputs, targets = custom_collate_fn([dataset[i] for i in range(len(dataset))],
                                        allowed_max_length=allowed_max_length, device=device)
    return {"indices": list(indices), "entries": entries, "inputs": inputs, "targets": targets,
            "prompt_lengths": dataset.prompt_lengths}


def _token_text(tokenizer, token_id):
    return tokenizer.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")


def _content_roles(entry, style, tokenizer):
    """(ids, role per token) for one entry; a token takes the role of the segment its first byte is in."""
    ids = tokenizer.encode(style.format_example(entry))
    bounds, end = [], 0  # byte offset where each segment ends
    for role, text in style.segments(entry):
        end += len(text.encode("utf-8"))
        bounds.append((end, role))
    roles, start, seg = [], 0, 0
    for token in ids:
        while seg < len(bounds) - 1 and start >= bounds[seg][0]:
            seg += 1
        roles.append(bounds[seg][1])
        start += len(tokenizer.decode_single_token_bytes(token))
    return ids, roles


def batch_anatomy(inputs, targets, tokenizer, *, entries=None, prompt_lengths=None, prompt_style="alpaca",
                  pad_token_id=50256, ignore_index=IGNORE_INDEX):
    """Every cell of a batch, for drawing: id, text, role, target and whether it counts in the loss.

    Roles: "instruction", "input", "response" (needs ``entries``, the batch's entries in
    row order), else "prompt"/"response" (needs ``prompt_lengths``), else "token"; then
    "end-of-text" (the end-of-text appended to an example) and "padding".
    Returns a dict: rows, cols, cells (flat list of dicts with row, col, token_id,
    token_text, role, target_id, target_text, in_loss), roles (B lists), tokens_in_loss.
    """
    inputs, targets = inputs.tolist(), targets.tolist()
    style = get_prompt_style(prompt_style)
    cells, role_grid = [], []
    for b, (row, target_row) in enumerate(zip(inputs, targets)):
        T = len(row)
        # Content ends at the first pad (texts never contain <|endoftext|>); a full row has none.
        n = row.index(pad_token_id) if pad_token_id in row else T
        if entries is not None:
            ids, content_roles = _content_roles(entries[b], style, tokenizer)
            if row[:min(len(ids), T)] != ids[:T]:
                raise ValueError(f"batch row {b} does not hold the tokens of entries[{b}]")
            n = len(ids)
        elif prompt_lengths is not None:
            content_roles = ["prompt" if j < prompt_lengths[b] else "response" for j in range(n)]
        else:
            content_roles = ["token"] * n
        roles = [content_roles[j] if j < n else ("end-of-text" if j == n else "padding") for j in range(T)]
        role_grid.append(roles)
        for col, (token_id, target_id, role) in enumerate(zip(row, target_row, roles)):
            in_loss = target_id != ignore_index
            cells.append({
                "row": b, "col": col, "token_id": token_id, "token_text": _token_text(tokenizer, token_id),
                "role": role, "target_id": target_id,
                "target_text": _token_text(tokenizer, target_id) if in_loss else "", "in_loss": in_loss,
            })
    return {"rows": len(inputs), "cols": len(inputs[0]) if inputs else 0, "cells": cells, "roles": role_grid,
            "tokens_in_loss": sum(c["in_loss"] for c in cells)}


# The kinds of problem, in the order an example is counted under (each example under one kind only:
# a cut that loses the end-of-text also leaves it without one, and is counted as the cut).
CHECK_KINDS = ("cut_before_response", "cut_in_response", "not_one_eot", "wholly_masked")


def pretraining_checks(dataset_or_data, tokenizer, *, allowed_max_length=1024, mask_instruction=False,
                       prompt_style="alpaca", pad_token_id=50256, ignore_index=IGNORE_INDEX, chunk_size=256):
    """Checks before training, run through ``custom_collate_fn`` itself, counted in examples.

    Each example must keep exactly one trained end-of-text target and at least one
    trained target; examples cut by ``allowed_max_length`` are listed with how many
    response tokens (its end-of-text included) they lose. An ``InstructionDataset`` is
    checked with its own prompt style and masking; the keyword options apply to a list of entries.
    Returns a dict: ok, n_examples, n_affected (examples with any problem), kinds (each
    ``CHECK_KINDS`` name: the indices of the examples counted under it, each example under
    one kind), summary (one sentence per kind found, "N of M examples ..."), problems (one
    plain line per affected example), and the facts, which overlap: not_one_eot,
    wholly_masked, truncated (dicts: index, length, prompt_length, response_tokens,
    response_tokens_lost), tokens_in_loss.
    """
    dataset = dataset_or_data
    if not isinstance(dataset, InstructionDataset):
        dataset = InstructionDataset(dataset, tokenizer, prompt_style=prompt_style, mask_instruction=mask_instruction)
    collate = partial(custom_collate_fn, pad_token_id=pad_token_id, ignore_index=ignore_index,
                      allowed_max_length=allowed_max_length)
    report = {"n_examples": len(dataset), "not_one_eot": [], "wholly_masked": [], "truncated": [],
              "tokens_in_loss": 0}
    lines = {}  # example index -> what is wrong with it, in words
    for start in range(0, len(dataset), chunk_size):
        chunk = [dataset[i] for i in range(start, min(start + chunk_size, len(dataset)))]
        longest = max(len(item[1] if isinstance(item, tuple) else item) for item in chunk)
        _, targets = collate(chunk + [[0] * (longest + 1)])  # a longer dummy row: every example gets padding
        for offset, row in enumerate(targets[:-1]):
            i = start + offset
            n_eot = int((row == pad_token_id).sum())
            n_loss = int((row != ignore_index).sum())
            report["tokens_in_loss"] += n_loss
            if n_eot != 1:
                report["not_one_eot"].append(i)
                lines.setdefault(i, []).append(f"{n_eot} trained end-of-text tokens, expected exactly 1")
            if n_loss == 0:
                report["wholly_masked"].append(i)
                lines.setdefault(i, []).append("every target is masked, so it adds nothing to the loss")
    kinds = {kind: [] for kind in CHECK_KINDS}
    cut = {}
    for i, ids in enumerate(dataset.encoded_texts):
        if allowed_max_length is not None and len(ids) > allowed_max_length:
            prompt_length = dataset.prompt_lengths[i]
            response_tokens = len(ids) - prompt_length + 1  # response tokens plus the end-of-text
            # Targets prompt_length-1 .. len(ids)-1 predict the response; those past the cut are lost.
            kept = max(0, allowed_max_length - max(prompt_length - 1, 0))
            lost = response_tokens - min(kept, response_tokens)
            cut[i] = {"index": i, "length": len(ids), "prompt_length": prompt_length,
                      "response_tokens": response_tokens, "response_tokens_lost": lost}
            report["truncated"].append(cut[i])
            where = "before its response starts" if lost == response_tokens else "inside its response"
            kinds["cut_before_response" if lost == response_tokens else "cut_in_response"].append(i)
            lines.setdefault(i, []).insert(0, f"{len(ids)} tokens, cut to {allowed_max_length} {where}; loses "
                                              f"{lost} of its {response_tokens} response tokens (end-of-text included)")
    counted = set(cut)
    for kind in ("not_one_eot", "wholly_masked"):
        kinds[kind] = [i for i in report[kind] if i not in counted]
        counted.update(kinds[kind])
    report["kinds"] = kinds
    report["n_affected"] = len(lines)
    report["problems"] = [f"example {i}: " + "; ".join(lines[i]) for i in sorted(lines)]
    report["summary"] = _check_summary(kinds, cut, set(report["wholly_masked"]), len(dataset), allowed_max_length)
    report["ok"] = not lines
    return report


def _check_summary(kinds, cut, wholly_masked, n, allowed_max_length):
    """One sentence per kind of problem found: how many examples, and what it costs the training."""
    sentences = []
    before, inside = kinds["cut_before_response"], kinds["cut_in_response"]
    if before:
        masked = sum(i in wholly_masked for i in before)
        sentence = (f"{len(before)} of {n} examples are cut to {allowed_max_length} tokens before their response "
                    "starts: none of the response and no end-of-text target is left to learn")
        if masked == len(before):
            sentence += "; with the instruction masked, every target is -100, so they add nothing to the loss"
        elif masked:
            sentence += f"; {masked} of them have every target masked and add nothing to the loss"
        else:
            sentence += "; only their prompt tokens train"
        sentences.append(sentence)
    if inside:
        lost = sum(cut[i]["response_tokens_lost"] for i in inside)
        total = sum(cut[i]["response_tokens"] for i in inside)
        sentences.append(f"{len(inside)} of {n} examples are cut to {allowed_max_length} tokens inside their "
                         "response: they lose their end-of-text target, so they do not teach where to stop, and "
                         f"{lost} of their {total} response tokens (end-of-text included) in all")
    if kinds["not_one_eot"]:
        sentences.append(f"{len(kinds['not_one_eot'])} of {n} examples do not keep exactly one end-of-text "
                         "target, so the model would not learn where to stop on them")
    if kinds["wholly_masked"]:
        sentences.append(f"{len(kinds['wholly_masked'])} of {n} examples have every target masked and "
                         "teach nothing")
    return sentences
