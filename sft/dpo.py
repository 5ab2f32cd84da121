"""Preference tuning with DPO: the book's notebook ``ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb``.

The notebook's path, with its names and signatures: ``PreferenceDataset`` and its
``custom_collate_fn`` (padded chosen/rejected ids plus boolean masks), ``compute_logprobs``,
``compute_dpo_loss`` (Rafailov et al. 2023, eq. 7), ``compute_dpo_loss_batch``/``_loader``,
``evaluate_dpo_loss_loader`` and ``train_model_dpo_simple``. Its split is the chapter's
``split_data`` (935 train, 110 test, 55 validation for the 1100 pairs).

Not in the book, after those: ``load_preference_data`` (validated like instruction data),
``create_dpo_data_loaders`` (the notebook's loader cells as one function), and reference
log-probabilities computed once and cached in the dataset, so training runs the reference
model zero times per step (``cache_reference_logprobs``; pass ``reference_model=None``).
"""
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

# split_data is the notebook's split too (85% train, 10% test, the rest validation).
from .data import DataValidationError, parse_records, split_data, validate_entries  # noqa: F401
from .prompts import format_input
from .training import generate_and_print_sample

BUNDLED_PREFERENCE_DATA = Path(__file__).resolve().parent / "assets" / "instruction-data-with-preference.json"
RESPONSE_PREFIX = "\n\n### Response:\n"  # the Alpaca response marker; its two "\n" are two tokens (198 198)
ENDOFTEXT = "<|endoftext|>"
CHOICES = ("error", "keep", "drop")
CACHED_KEYS = ("reference_chosen_logprobs", "reference_rejected_logprobs")


# ============================================================================ The notebook

class PreferenceDataset(Dataset):
    """Each entry as token ids: ``prompt`` (the Alpaca prompt), ``chosen`` and ``rejected`` (prompt +
    "\\n\\n### Response:\\n" + that answer, the full text tokenized at once, as the notebook does)."""

    def __init__(self, data, tokenizer):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt = format_input(entry)
            item = {"prompt": tokenizer.encode(prompt)}
            for key in ("chosen", "rejected"):
                item[key] = tokenizer.encode(f"{prompt}{RESPONSE_PREFIX}{entry[key]}")
            self.encoded_texts.append(item)

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"):
    """The notebook's DPO collate: a dict of prompt (list of 1-D tensors, left on the CPU as in
    the notebook), chosen and rejected (B, T) ids, rejected_mask and chosen_mask (B, T) bool.

    Chosen and rejected share one length: the longest of either plus one pad. A mask is True
    only at answer tokens: never at padding and, with ``mask_prompt_tokens``, not at the prompt
    nor the two "\\n" tokens after it ("### Response:\\n" stays in). Ids and masks are then cut
    to ``allowed_max_length``.
    """
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    max_length_common = max((len(item[key]) + 1 for item in batch for key in ("chosen", "rejected")), default=0)
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        first_kept = prompt.shape[0] + 2 if mask_prompt_tokens else 0
        for key in ("chosen", "rejected"):
            ids = item[key]
            mask = torch.zeros(max_length_common, dtype=torch.bool)
            mask[first_kept:len(ids)] = True  # the padding after len(ids) stays False
            batch_data[key].append(torch.tensor(ids + [pad_token_id] * (max_length_common - len(ids))))
            batch_data[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        stacked = torch.stack(batch_data[key])  # (B, T)
        if allowed_max_length is not None:
            stacked = stacked[:, :allowed_max_length]
        batch_data[key] = stacked.to(device)
    # Not in the book: reference log-probs cached in the items (cache_reference_logprobs) ride along, (B,).
    if batch and CACHED_KEYS[0] in batch[0]:
        for key in CACHED_KEYS:
            batch_data[key] = torch.tensor([item[key] for item in batch]).to(device)
    return batch_data


def decode_tokens_from_batch(token_ids, tokenizer):
    """The notebook's helper: any tensor of ids back to one string."""
    return tokenizer.decode(token_ids.flatten().tolist())


def compute_logprobs(logits, labels, selection_mask=None):
    """Mean log-probability of each row's selected tokens: logits (B, T, V), labels (B, T) -> (B,).

    Position t predicts token t+1: labels and ``selection_mask`` (B, T) bool drop their first
    column, logits their last. Without a mask every token but the first counts.
    """
    targets = labels[:, 1:]  # (B, T-1)
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)  # (B, T-1, V)
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if selection_mask is None:
        return token_log_probs.mean(-1)
    mask = selection_mask[:, 1:]
    return (token_log_probs * mask).sum(-1) / mask.sum(-1)


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                     reference_rejected_logprobs, beta=0.1):
    """(B,) log-probs -> (loss, chosen reward, rejected reward), each the batch mean.

    loss = -log sigmoid(beta * (policy log-ratio - reference log-ratio)), a log-ratio being
    log p(chosen) - log p(rejected); a reward is policy minus reference log-prob, detached and,
    as in the notebook, not scaled by beta. Policy == reference gives ln 2 and rewards 0.
    """
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    losses = -F.logsigmoid(beta * (model_logratios - reference_logratios))  # (B,)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    """``compute_dpo_loss`` on one collated batch: both models on chosen and on rejected."""
    if reference_model is None:  # Not in the book: use the batch's cached reference log-probs
        return compute_dpo_loss_cached_batch(batch, policy_model, beta)
    policy_chosen = compute_logprobs(policy_model(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
    policy_rejected = compute_logprobs(policy_model(batch["rejected"]), batch["rejected"], batch["rejected_mask"])
    # Not in the book: no autograd through the frozen reference (same values; the notebook's
    # version also builds its graph and fills the reference's .grad on every backward).
    with torch.no_grad():
        ref_chosen = compute_logprobs(reference_model(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
        ref_rejected = compute_logprobs(reference_model(batch["rejected"]), batch["rejected"], batch["rejected_mask"])
    return compute_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None):
    """(loss, chosen reward, rejected reward) averaged over the first ``num_batches`` batches (all if None)."""
    if len(data_loader) == 0:
        # Not in the book: three NaNs (the notebook returns one float, which its callers cannot unpack).
        return float("nan"), float("nan"), float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    totals = [0.0, 0.0, 0.0]
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        values = compute_dpo_loss_batch(batch, policy_model, reference_model, beta)
        totals = [total + value.item() for total, value in zip(totals, values)]
    return tuple(total / num_batches for total in totals)


def evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta, eval_iter):
    """Loss and rewards on ``eval_iter`` batches of each loader, policy in eval mode, no gradients."""
    policy_model.eval()
    with torch.no_grad():
        train = compute_dpo_loss_loader(train_loader, policy_model, reference_model, beta, num_batches=eval_iter)
        val = compute_dpo_loss_loader(val_loader, policy_model, reference_model, beta, num_batches=eval_iter)
    policy_model.train()
    names = ("loss", "chosen_reward", "rejected_reward")
    return {**{f"train_{n}": v for n, v in zip(names, train)}, **{f"val_{n}": v for n, v in zip(names, val)}}


def train_model_dpo_simple(policy_model, reference_model, train_loader, val_loader, optimizer, num_epochs,
                           beta, eval_freq, eval_iter, start_context, tokenizer):
    """The notebook's loop: ``train_model_simple`` with the DPO loss, tracking rewards too.

    Every ``eval_freq`` steps prints "Ep e (Step s): Train loss ..., Val loss ..., Train reward
    margins ..., Val reward margins ..." and appends to the returned dict's lists:
    train_losses, train_chosen_rewards, train_rejected_rewards, val_* alike, tokens_seen.
    """
    names = {"train_losses": "train_loss", "train_chosen_rewards": "train_chosen_reward",  # tracking <- res
             "train_rejected_rewards": "train_rejected_reward", "val_losses": "val_loss",
             "val_chosen_rewards": "val_chosen_reward", "val_rejected_rewards": "val_rejected_reward"}
    tracking = {key: [] for key in [*names, "tokens_seen"]}
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        policy_model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss, _, _ = compute_dpo_loss_batch(batch, policy_model, reference_model, beta)
            loss.backward()
            optimizer.step()
            tokens_seen += batch["chosen"].numel()  # the notebook counts chosen tokens only
            global_step += 1
            if global_step % eval_freq == 0:
                res = evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta, eval_iter)
                for key, res_key in names.items():
                    tracking[key].append(res[res_key])
                tracking["tokens_seen"].append(tokens_seen)
                train_margin = res["train_chosen_reward"] - res["train_rejected_reward"]
                val_margin = res["val_chosen_reward"] - res["val_rejected_reward"]
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
                      f"Train reward margins {train_margin:.3f}, Val reward margins {val_margin:.3f}")
        # The notebook passes loss.device; the policy's device is the same and exists without a batch.
        generate_and_print_sample(policy_model, tokenizer, next(policy_model.parameters()).device, start_context)
    return tracking


# ============================================================================ Not in the book: data

def _read_source(source):
    """(raw bytes, name for messages) from None (the bundled file), a path, bytes or a file-like upload."""
    if source is None:
        return BUNDLED_PREFERENCE_DATA.read_bytes(), f"bundled {BUNDLED_PREFERENCE_DATA.name}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "uploaded data"
    if hasattr(source, "read"):  # a Streamlit UploadedFile, an open file
        raw = source.read()
        return (raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)), getattr(source, "name", "upload")
    path = Path(os.fspath(source))
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    return path.read_bytes(), str(path)


def identical_pairs(data):
    """Indices of entries whose ``chosen`` and ``rejected`` are the same string (6 in the book's file)."""
    return [i for i, e in enumerate(data) if isinstance(e, dict) and isinstance(e.get("chosen"), str)
            and e.get("chosen") == e.get("rejected")]


def _entry_number(problem):
    head = problem.split(":", 1)[0]
    return int(head[6:]) if head.startswith("entry ") and head[6:].isdigit() else -1


def validate_preference_entries(data, *, duplicates="error", identical="error", source="data"):
    """Check every entry as ``validate_entries`` does (``output`` optional), plus non-empty string
    ``chosen`` and ``rejected``; raise one ``DataValidationError`` naming every problem.

    ``identical`` (chosen == rejected; such a pair adds a constant ln 2 to the loss and no
    gradient): "error" reports them, "keep" keeps them, "drop" removes them. ``duplicates``
    (same instruction and input) as in ``validate_entries``.
    """
    if identical not in CHOICES:
        raise ValueError(f"identical must be 'error', 'keep' or 'drop', not {identical!r}")
    if not isinstance(data, list):
        raise DataValidationError([f"top level is {type(data).__name__}; expected a list of entries"], source)
    if not data:
        raise DataValidationError(["no entries: the list is empty"], source)
    shadow = []  # copies that remember their row, with a stand-in `output` where there is none
    for i, entry in enumerate(data):
        if isinstance(entry, dict):
            entry = {**entry, "_dpo_row": i, "_dpo_no_output": "output" not in entry}
            entry.setdefault("output", "-")
        shadow.append(entry)
    problems, entries = [], []
    try:
        entries = validate_entries(shadow, duplicates=duplicates, source=source)
    except DataValidationError as exc:
        problems += exc.problems
    same = set(identical_pairs(data))
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            continue
        for key in ("chosen", "rejected"):
            if key not in entry:
                problems.append(f"entry {i}: missing '{key}'")
            elif not isinstance(entry[key], str):
                problems.append(f"entry {i}: '{key}' is {type(entry[key]).__name__}, expected a string")
            elif not entry[key].strip():
                problems.append(f"entry {i}: '{key}' is empty")
            elif ENDOFTEXT in entry[key]:
                problems.append(f"entry {i}: '{key}' contains the special token text {ENDOFTEXT}")
        if i in same and identical == "error" and entry["chosen"].strip():
            problems.append(f"entry {i}: 'chosen' and 'rejected' are identical")
    if problems:
        problems.sort(key=_entry_number)  # stable: each entry's problems together, in key order
        hints = []
        if duplicates == "error" and any("duplicate of entry" in p for p in problems):
            hints.append("For duplicates, pass duplicates='keep' to keep them or 'drop' to keep only the first.")
        if identical == "error" and any("are identical" in p for p in problems):
            hints.append("For identical pairs, pass identical='keep' (the book trains on them) or 'drop'.")
        raise DataValidationError(problems, source, "\n".join(hints))
    kept = []
    for entry in entries:
        row = entry.pop("_dpo_row")
        if entry.pop("_dpo_no_output"):
            del entry["output"]
        if not (identical == "drop" and row in same):
            kept.append(entry)
    return kept


def load_preference_data(source=None, *, duplicates=None, identical=None):
    """Load and validate preference data: None (the book's 1100 pairs), a path, bytes or a
    file-like upload; a JSON array or JSONL. Returns dicts with string instruction, input,
    chosen, rejected (and whatever else they had). ``duplicates`` and ``identical`` default to
    "keep" for the bundled file (the book trains on all 1100) and "error" otherwise.
    """
    raw, name = _read_source(source)
    default = "keep" if source is None else "error"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataValidationError([f"not UTF-8 text: cannot decode the byte at offset {e.start}"], name) from None
    return validate_preference_entries(parse_records(text, name), duplicates=duplicates or default,
                                       identical=identical or default, source=name)


def create_dpo_data_loaders(train_data, val_data, test_data, tokenizer, *, batch_size=8, num_workers=0,
                            device="cpu", allowed_max_length=1024, mask_prompt_tokens=True, seed=123):
    """The notebook's three loaders: seeds torch with ``seed`` first (None leaves it), then a
    shuffled train loader that drops its last partial batch, and unshuffled val and test loaders."""
    if seed is not None:
        torch.manual_seed(seed)
    collate = partial(custom_collate_fn, device=device, mask_prompt_tokens=mask_prompt_tokens,
                      allowed_max_length=allowed_max_length)
    loaders = []
    for data, train in ((train_data, True), (val_data, False), (test_data, False)):
        loaders.append(DataLoader(PreferenceDataset(data, tokenizer), batch_size=batch_size, collate_fn=collate,
                                  shuffle=train, drop_last=train, num_workers=num_workers))
    return tuple(loaders)


# ============================================================================ Not in the book: cached reference

def _pair_logprobs(model, batch):
    """(chosen (B,), rejected (B,)) mean log-probs from one forward over the 2B rows: the collate pads
    both to one length, and causal rows are independent, so values equal two passes' (to rounding)."""
    device = next(model.parameters()).device
    ids = torch.cat([batch["chosen"], batch["rejected"]]).to(device)  # (2B, T)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).to(device)
    return compute_logprobs(model(ids), ids, mask).chunk(2)


def reference_logprobs(model, dataset_or_loader, *, batch_size=8, allowed_max_length=None, mask_prompt_tokens=True):
    """The reference model's (chosen, rejected) mean log-probs for every example: two (N,) float CPU
    tensors in the dataset's order, in eval mode without gradients. Pass the ``PreferenceDataset``
    (``allowed_max_length``/``mask_prompt_tokens`` as the training collate's: a cut changes the
    values) or an unshuffled loader built on it."""
    loader = dataset_or_loader
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, RandomSampler) or getattr(loader.batch_sampler, "shuffle", False):
            raise ValueError("this loader shuffles; pass the dataset or an unshuffled loader, "
                             "so the log-probs follow the dataset's order")
    else:
        loader = DataLoader(loader, batch_size=batch_size, shuffle=False, collate_fn=partial(
            custom_collate_fn, allowed_max_length=allowed_max_length, mask_prompt_tokens=mask_prompt_tokens))
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with torch.no_grad():
            for batch in loader:
                c, r = _pair_logprobs(model, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
    finally:
        model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    unscored = torch.nonzero(chosen.isnan() | rejected.isnan()).flatten().tolist()
    if unscored:  # a row whose mask is all False (the prompt fills allowed_max_length) divides 0 by 0
        raise ValueError(f"examples {unscored[:10]}{' ...' if len(unscored) > 10 else ''} have no answer token "
                         "to score (NaN log-prob): raise allowed_max_length or drop them")
    return chosen, rejected


def cache_reference_logprobs(reference_model, dataset, **kwargs):
    """Compute ``reference_logprobs`` and store them in the dataset's items, so its batches carry
    them and ``compute_dpo_loss_batch(batch, policy, None, beta)`` needs no reference model.
    Returns (chosen, rejected) (N,). Keyword options as ``reference_logprobs``."""
    chosen, rejected = reference_logprobs(reference_model, dataset, **kwargs)
    for item, c, r in zip(dataset.encoded_texts, chosen.tolist(), rejected.tolist()):
        item[CACHED_KEYS[0]], item[CACHED_KEYS[1]] = c, r
    return chosen, rejected


def compute_dpo_loss_cached_batch(batch, policy_model, beta):
    """``compute_dpo_loss_batch`` from the batch's cached reference log-probs: one policy forward, no reference."""
    if CACHED_KEYS[0] not in batch:
        raise KeyError("this batch carries no cached reference log-probs: run cache_reference_logprobs "
                       "on its dataset first, or pass a reference_model")
    policy_chosen, policy_rejected = _pair_logprobs(policy_model, batch)
    ref_chosen, ref_rejected = (batch[key].to(policy_chosen.device, policy_chosen.dtype) for key in CACHED_KEYS)
    return compute_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)


preference_collate_fn = custom_collate_fn  # Not in the book: a name that does not clash with sft.batching's
