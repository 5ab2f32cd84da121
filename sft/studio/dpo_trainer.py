"""Not in the book: preference tuning (DPO) as a run, the ``Trainer`` with the notebook's loss.

``DPOTrainer`` overrides the Trainer's three batch hooks (loss, weight, tokens) and its evaluation
(loss, chosen and rejected rewards, their margin), so steps, gradient accumulation, bf16 autocast,
checkpoints, stop and exact resume and DDP are the fine-tuning run's own. Its batches are the
notebook's collate plus each pair's example index, which looks up the reference model's
log-probabilities: computed once per example before the first step and kept in the run folder
(``reference_logprobs.safetensors``), so a step runs the reference zero times instead of twice.

The reference needs no second model: before the first step the policy is the reference; a LoRA
policy with its adapters switched off is the reference at any time. Only a full fine-tuning run
that lost its cache after training began rebuilds a frozen copy, and frees it once the cache is made.
"""
import hashlib
import json
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..dpo import PreferenceDataset, compute_dpo_loss, compute_logprobs, custom_collate_fn, reference_logprobs
from ..fast.forward import FastGPT
from ..lora import adapters_disabled
from ..model import canonical_model_name
from ..prompts import format_input
from ..tokenizer import get_tokenizer
from . import distributed, sharding
from .files import atomic_write
from .models import build_base_model, build_model
from .trainer import Trainer

REFERENCE_FILE = "reference_logprobs.safetensors"
CACHE_VERSION = 1


# ============================================================================ data

class IndexedPreferenceDataset(PreferenceDataset):
    """``PreferenceDataset`` whose items also carry their example index (``offset`` + position), the key of
    the cached reference log-probabilities (train pairs first, then validation pairs)."""

    def __init__(self, data, tokenizer, *, offset=0):
        super().__init__(data, tokenizer)
        self.offset = offset

    def __getitem__(self, index):
        return {**self.encoded_texts[index], "index": self.offset + index}


def indexed_collate_fn(batch, **kwargs):
    """The notebook's ``custom_collate_fn`` (``kwargs`` as its), plus "index": the examples' indices (B,)."""
    out = custom_collate_fn(batch, **kwargs)
    out["index"] = torch.tensor([item["index"] for item in batch], dtype=torch.long)
    return out


def dpo_loaders(config, train, val, tokenizer):
    """The notebook's loaders (torch seeded with ``config.seed`` first): shuffled train batches that drop
    the last partial one, validation in order; items carry their index (train 0.., validation after)."""
    torch.manual_seed(config.seed)
    collate = partial(indexed_collate_fn, allowed_max_length=config.allowed_max_length,
                      mask_prompt_tokens=config.mask_instruction)
    loaders = []
    for data, offset, shuffle in ((train, 0, True), (val, len(train), False)):
        loaders.append(DataLoader(IndexedPreferenceDataset(data, tokenizer, offset=offset), batch_size=config.batch_size,
                                  collate_fn=collate, shuffle=shuffle, drop_last=shuffle,
                                  num_workers=config.num_workers))
    return tuple(loaders)


# ============================================================================ the reference's cache

def read_reference_cache(path, key):
    """(chosen (N,), rejected (N,)) from ``path`` when it was made for ``key``, else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("chosen"), f.get_tensor("rejected")
    except (OSError, ValueError, RuntimeError, KeyError):  # missing, torn or another format
        return None


def write_reference_cache(path, key, chosen, rejected, info):
    from safetensors.torch import save_file

    meta = {"key": key, **{k: json.dumps(v) for k, v in info.items()}}
    tensors = {"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def model_megabytes(model):
    """Parameters and buffers of ``model`` without its LoRA adapters, in MB: a reference copy's size."""
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".lora." not in n]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


class DPOTrainer(Trainer):
    """The Trainer on preference pairs with the DPO loss, against cached reference log-probabilities.

    ``reference_cache``: where the cache is kept (None: in memory only). ``fit`` makes or reads it
    first and reports a "reference" event (how it was made, seconds, the MB no reference copy needs).
    """

    def __init__(self, model, config, train_loader, val_loader, *, reference_cache=None, **kwargs):
        super().__init__(model, config, train_loader, val_loader, **kwargs)
        self.reference_cache = reference_cache
        self.reference = None  # (chosen (N,), rejected (N,)) on the device, by example index
        self._step_rewards = []  # per micro-batch of this step: (chosen sum, rejected sum, pairs)
        self._last_rewards = None  # the last step's (chosen, rejected) mean rewards, over all ranks

    # ------------------------------------------------------------------ the reference
    def reference_key(self):
        """What the cached values depend on: the pairs, the start weights and how the rows are cut and scored."""
        cfg = self.config
        parts = {"version": CACHE_VERSION, "train": self.train_loader.dataset.data, "val": self.val_loader.dataset.data,
                 **{k: getattr(cfg, k) for k in ("model", "weights", "from_run", "allowed_max_length",
                                                 "mask_instruction", "fast_kernels")},
                 "seed": cfg.seed if cfg.weights == "random" and not cfg.from_run else None,
                 "precision": self.precision}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    @contextmanager
    def _reference_model(self):
        """(module, how) computing the reference's logits: the policy itself before its first step, the
        policy with its adapters off under LoRA, else a frozen copy of the start weights (freed after)."""
        if self.config.lora_rank:
            with adapters_disabled(self.model):
                yield self.body, "the LoRA policy with its adapters switched off"
        elif self.global_step < 0:
            yield self.body, "the policy before its first step"
        else:
            with torch.random.fork_rng(devices=[]):
                copy = build_base_model(self.config).to(self.device).eval()
            try:
                yield (FastGPT(copy, fused=self.config.fast_kernels) if self.body is not self.model else copy,
                       "a frozen copy of the start weights, freed after")
            finally:
                del copy
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def prepare_reference(self):
        """Read the cache (or compute it, once per example, and save it); returns (chosen, rejected) (N,)."""
        if self.reference is not None:
            return self.reference
        key, t0 = self.reference_key(), time.perf_counter()
        cached = read_reference_cache(self.reference_cache, key) if self.reference_cache else None
        how = "read from the run's cache"
        if cached is None:
            datasets = (self.train_loader.dataset, self.val_loader.dataset)
            with self._reference_model() as (module, how), self._autocast():
                parts = [reference_logprobs(module, ds, batch_size=self.config.batch_size,
                                            allowed_max_length=self.config.allowed_max_length,
                                            mask_prompt_tokens=self.config.mask_instruction) for ds in datasets]
            cached = tuple(torch.cat(values) for values in zip(*parts))
            if self.reference_cache and self.is_main:
                write_reference_cache(self.reference_cache, key, *cached,
                                      {"n_train": len(datasets[0]), "n_val": len(datasets[1]), "how": how})
        self.reference = tuple(t.to(self.device, torch.float32) for t in cached)
        self._emit("reference", how=how, examples=int(cached[0].numel()),
                   seconds=round(time.perf_counter() - t0, 4), reference_forwards_per_step=0,
                   reference_copy_mb_saved=round(model_megabytes(self.model), 2))
        return self.reference

    # ------------------------------------------------------------------ the batch hooks
    def pair_metrics(self, batch):
        """(loss, chosen reward, rejected reward) of a batch, each its mean: one policy forward over
        the 2B rows (chosen then rejected), the reference's values looked up by example index."""
        ids = torch.cat([batch["chosen"], batch["rejected"]]).to(self.device, non_blocking=True)  # (2B, T)
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).to(self.device, non_blocking=True)
        forward = self.forward_model if self.model.training else self.body
        with self._autocast():
            logprobs = compute_logprobs(forward(ids), ids, mask).float()  # (2B,)
        chosen, rejected = logprobs.chunk(2)
        index = batch["index"].to(self.device)
        ref_chosen, ref_rejected = self.prepare_reference()  # made once, before the first use
        return compute_dpo_loss(chosen, rejected, ref_chosen[index], ref_rejected[index], beta=self.config.beta)

    def batch_loss(self, batch, *, reduction="mean"):
        loss, chosen_reward, rejected_reward = self.pair_metrics(batch)
        pairs = self.batch_weight(batch)
        if self.model.training:
            self._step_rewards.append((chosen_reward.item() * pairs, rejected_reward.item() * pairs, pairs))
        return loss * pairs if reduction == "sum" else loss

    def batch_weight(self, batch):
        """Pairs in the batch: the DPO loss is a mean over pairs."""
        return int(batch["chosen"].shape[0])

    def batch_tokens(self, batch):
        """Chosen tokens, padding included, as the notebook's tokens_seen counts them."""
        return batch["chosen"].numel()

    # ------------------------------------------------------------------ evaluation and events
    def _loader_metrics(self, loader):
        """(loss, chosen reward, rejected reward): the mean over ``eval_iter`` batches of their means,
        as the notebook's ``compute_dpo_loss_loader`` (each batch split over the ranks under DDP)."""
        if len(loader) == 0:
            return (float("nan"),) * 3
        n = min(self.config.eval_iter, len(loader))
        sums = torch.zeros(n, 4, dtype=torch.float64)  # per batch: loss, chosen, rejected (times pairs), pairs
        for i, batch in enumerate(loader):
            if i >= n:
                break
            if batch is not None:  # a short last batch leaves some ranks without rows
                pairs = self.batch_weight(batch)
                sums[i, :3] = torch.tensor([v.item() * pairs for v in self.pair_metrics(batch)], dtype=torch.float64)
                sums[i, 3] = pairs
            elif self.sharded:  # FSDP: every rank joins each forward's weight gathers
                sharding.take_part(self.body, self.device)
        if self.world_size > 1:
            sums = distributed.all_reduce(sums.to(self.device)).cpu()
        return tuple((sums[:, :3] / sums[:, 3:]).mean(0).tolist())

    def eval_metrics(self):
        """{train,val}_{loss, chosen_reward, rejected_reward, margin} over ``eval_iter`` batches each."""
        self.model.eval()
        metrics = {}
        with self._eval_context(), self._autocast():
            for split, loader in (("train", self.train_loader), ("val", self.val_loader)):
                loss, chosen, rejected = self._loader_metrics(loader)
                metrics.update({f"{split}_loss": loss, f"{split}_chosen_reward": chosen,
                                f"{split}_rejected_reward": rejected, f"{split}_margin": chosen - rejected})
        self.model.train()
        return metrics

    def _train_step(self, batches, n_batches):
        loss = super()._train_step(batches, n_batches)
        sums = torch.tensor(self._step_rewards, dtype=torch.float64).sum(0)  # every rank: the whole step's
        if self.world_size > 1:
            sums = distributed.all_reduce(sums.to(self.device)).cpu()
        self._step_rewards, self._last_rewards = [], ((sums[0] / sums[2]).item(), (sums[1] / sums[2]).item())
        return loss

    def _emit(self, kind, *, epoch=None, **data):
        if kind == "step" and self._last_rewards is not None:  # the step's mean rewards over its pairs
            chosen, rejected = self._last_rewards
            data.update(chosen_reward=chosen, rejected_reward=rejected, margin=chosen - rejected)
        super()._emit(kind, epoch=epoch, **data)

    def fit(self, *, max_steps=None):
        self.prepare_reference()
        return super().fit(max_steps=max_steps)


# ============================================================================ building

def build_dpo_trainer(config, splits, *, model=None, reference_cache=None, **trainer_kwargs):
    """Loaders, model and ``DPOTrainer`` for a DPO ``config`` and its (train, test, val) pairs (``worker.load_splits``);
    returns (trainer, (train, test, val)).

    The model starts from ``config.from_run``'s final weights (or ``model``/``weights``), with LoRA
    adapters when ``lora_rank`` is set. ``reference_cache`` defaults to ``reference_logprobs.safetensors``
    in the run folder of ``checkpoint_path`` (runs/<name>/checkpoints/last.pt).
    """
    train, test, val = splits
    tokenizer = get_tokenizer()
    model = model if model is not None else build_model(config)
    train_loader, val_loader = dpo_loaders(config, train, val, tokenizer)
    torch.manual_seed(config.seed)  # seeded again right before training, as the notebook does
    checkpoint = trainer_kwargs.get("checkpoint_path")
    if reference_cache is None and checkpoint is not None:
        reference_cache = Path(checkpoint).parent.parent / REFERENCE_FILE
    sample_entry = (val or test or train)[0]
    trainer = DPOTrainer(model, config, train_loader, val_loader, tokenizer=tokenizer,
                         sample_prompt=format_input(sample_entry), reference_cache=reference_cache, **trainer_kwargs)
    return trainer, (train, test, val)


def describe_start(config):
    """One line: where the policy and reference start."""
    if config.from_run:
        return f"from run {config.from_run} ({canonical_model_name(config.model)})"
    return f"{canonical_model_name(config.model)} with {config.weights} weights"
