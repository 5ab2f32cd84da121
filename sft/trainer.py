"""Not in the book: ``TrainConfig`` and the ``Trainer`` the app, the CLI and the benchmark drive.

``TrainConfig`` holds every run setting in one commented dataclass (saved as the run's
config.json). ``Trainer`` reports events to callbacks, trains with bf16 autocast and a masked
output head where asked, accumulates gradients, checkpoints with exact resume and, under
``torchrun``, trains with DDP (see ``sft.distributed``). ``TrainConfig.chapter_path()`` turns
every fast path off, so the Trainer then computes exactly what ``train_model_simple`` computes.
"""
import json
import math
import os
import time
from contextlib import nullcontext

import torch

from . import distributed
# The settings live in sft.config; TrainConfig & co. stay importable from here too.
from .config import WEIGHT_SOURCES, ConfigError, TrainConfig, TrainingError, oom_advice  # noqa: F401
from .hardware import resolve_device, resolve_precision

IGNORE_INDEX = -100  # targets at this value do not count in the loss (padding, masked prompt)

# ============================================================================ Not in the book

def _is_oom(exc):
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    text = str(exc).lower()
    return isinstance(exc, oom_type) or (isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


def _loader_generators(*loaders):
    """The torch.Generators that decide the loaders' shuffles (those not drawn from the global RNG)."""
    found = {}
    for i, loader in enumerate(loaders):
        batch_sampler = getattr(loader, "batch_sampler", None)
        owners = {"loader": loader, "sampler": getattr(loader, "sampler", None),
                  "batch_sampler": batch_sampler, "batch_sampler.sampler": getattr(batch_sampler, "sampler", None)}
        for name, owner in owners.items():
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found.values()):
                found[f"{i}.{name}"] = gen
    return found


def _finite_or_none(x):
    return x if x is None or math.isfinite(x) else None


CHECKPOINT_FORMAT = "sft-studio-checkpoint"


class Trainer:
    """One training loop the app, the CLI and the benchmark all drive.

    Every step, evaluation, epoch end, sample, checkpoint and the end are reported as event
    dicts to each callback (and, with ``metrics_path``, appended to a JSONL file). A stop asked
    with ``request_stop()`` or by creating ``stop_file`` is honoured between optimizer steps:
    the trainer checkpoints and ``fit`` returns with state "stopped". ``resume(path)`` then
    continues so that the final weights equal those of a run that never stopped.

    Under torchrun (a process group is initialised) it trains with DDP: the model is wrapped,
    the loaders sharded, losses all-reduced, and only rank 0 reports and saves (see
    ``sft.distributed`` for the batch rule).
    """

    def __init__(self, model, config, train_loader, val_loader, *, tokenizer=None, sample_prompt=None,
                 callbacks=(), checkpoint_path=None, stop_file=None, metrics_path=None, device=None):
        self.config = config.validate()
        self.device = resolve_device(config.device if device is None else device)
        self.precision = resolve_precision(config.precision, self.device)
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.tokenizer, self.sample_prompt = tokenizer, sample_prompt
        self.callbacks = list(callbacks)
        self.checkpoint_path, self.stop_file, self.metrics_path = checkpoint_path, stop_file, metrics_path
        self.rank, self.world_size = distributed.world()
        self.is_main = self.rank == 0

        cuda = self.device.type == "cuda"
        if cuda and config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if config.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
            model.gradient_checkpointing = True
        # Masked head: only for models that expose the hidden states before out_head (GPTModel).
        self.masked_head = (config.masked_head_loss and hasattr(model, "forward_hidden")
                            and hasattr(model, "out_head"))
        self.forward_model = self.model
        if self.world_size > 1:  # Not in the book: data parallel over torchrun's processes
            if config.batch_size < self.world_size:
                raise ConfigError([f"batch_size {config.batch_size} is smaller than the {self.world_size} "
                                   "processes: each needs at least one row of every batch"])
            from torch.nn.parallel import DistributedDataParallel

            self.train_loader = distributed.shard_loader(train_loader, self.rank, self.world_size)
            self.val_loader = distributed.shard_loader(val_loader, self.rank, self.world_size)
            self._ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
            self.forward_model = self._ddp
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        # Fused AdamW: one pass over params, grads and moments instead of ~10 (the CPU step of
        # gpt2-small drops from ~0.9 s to ~0.13 s per thread); same maths, other rounding.
        extra = {"fused": True} if config.fused_adamw and self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, **extra)
        # Position: the chapter's counters plus where we are inside the epoch.
        self.epoch = 0           # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already trained on
        self.global_step = -1    # the chapter's counter: 0 after the first optimizer step
        self.tokens_seen = 0     # input tokens, padding included (as the chapter counts)
        self.history = {"train_losses": [], "val_losses": [], "tokens_seen": [], "steps": [], "epochs": []}
        self.total_steps = None
        self.elapsed_before = 0.0  # seconds trained before a resume
        self._stop = False
        self._epoch_rng = None   # RNG states at the start of this epoch: they fix its shuffle
        self._resume_rng = None  # RNG states at the checkpoint, restored after replaying the shuffle
        self._resume_sampler_epochs = {}
        self._live_batches = None  # this epoch's batch iterator, kept so a second fit() goes on
        self._t0, self._steps_at_start = time.perf_counter(), 0

    # ------------------------------------------------------------------ loss and evaluation
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def loss(self, inputs, targets, *, reduction="mean"):
        """Cross-entropy of a batch (B, T) over positions whose target is not -100 (their mean,
        or with ``reduction="sum"`` their sum, which DDP weighs across ranks)."""
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        # Evaluation needs no gradients: the plain module then (no DDP sync, no recompile).
        forward = self.forward_model if self.model.training else self.model
        with self._autocast():
            if self.masked_head:
                # Compute only what the loss reads: the body up to each row's last counted
                # target (the padding after it cannot change earlier positions: causal
                # attention), then the output head only where targets count.
                counted = targets != IGNORE_INDEX  # (B, T)
                positions = torch.arange(1, targets.shape[1] + 1, device=targets.device)
                lengths = torch.where(counted, positions, 0).amax(dim=1)  # (B,)
                hidden = forward(inputs, return_hidden=True, lengths=lengths)  # (M, C) kept rows
                kept = positions[None, :] <= lengths[:, None]  # (B, T), the M positions computed
                keep = counted[kept]  # (M,)
                logits = self.model.out_head(hidden[keep])  # (N, vocab): only the N positions that count
                return torch.nn.functional.cross_entropy(logits.float(), targets[kept][keep], reduction=reduction)
            logits = forward(inputs)  # (B, T, vocab)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction=reduction)

    def _loader_loss(self, loader):
        if len(loader) == 0:
            return float("nan")
        n = min(self.config.eval_iter, len(loader))
        if self.world_size > 1:
            return self._loader_loss_ddp(loader, n)
        total = 0.0
        for i, (inputs, targets) in enumerate(loader):
            if i >= n:
                break
            total += self.loss(inputs, targets).item()
        return total / n

    def _loader_loss_ddp(self, loader, n):
        """The chapter's average of per-batch mean losses, each batch split over the ranks."""
        sums = torch.zeros(n, 2, dtype=torch.float64)  # per batch: (loss sum, counted targets)
        for i, batch in enumerate(loader):
            if i >= n:
                break
            if batch is not None:  # a short last batch leaves some ranks without rows
                inputs, targets = batch
                sums[i, 0] = self.loss(inputs, targets, reduction="sum").item()
                sums[i, 1] = int((targets != IGNORE_INDEX).sum())
        sums = distributed.all_reduce(sums.to(self.device)).cpu()
        return (sums[:, 0] / sums[:, 1]).mean().item()

    def evaluate(self):
        """(train_loss, val_loss) over ``eval_iter`` batches each, as the chapter's evaluate_model."""
        self.model.eval()
        # One autocast around all batches, so each weight is cast to bf16 once per evaluation.
        # autocast keeps no cast cache under inference_mode (each batch would recast all 163M
        # weights of gpt2-small), so bf16 evaluates under no_grad; fp32 under inference_mode.
        no_grad = torch.no_grad() if self.precision == "bf16" else torch.inference_mode()
        with no_grad, self._autocast():
            losses = self._loader_loss(self.train_loader), self._loader_loss(self.val_loader)
        self.model.train()
        return losses

    def sample(self, epoch=None):
        """Greedy answer to ``sample_prompt`` (stops at end-of-text), reported as a "sample" event."""
        if not (self.config.sample_each_epoch and self.tokenizer is not None and self.sample_prompt
                and self.is_main):
            return None
        from .generation import generate_batch
        from .tokenizer import EOT_ID

        ids = self.tokenizer.encode(self.sample_prompt)
        # KV cache, greedy, fp32: the tokens the chapter's generate gives (autocast would recast
        # every weight at every new token: it keeps no cast cache under inference_mode).
        new = generate_batch(self.model, [ids], max_new_tokens=self.config.sample_tokens, eos_id=EOT_ID)[0]
        self.model.train()
        response = self.tokenizer.decode(new)
        self._emit("sample", epoch=epoch, prompt=self.sample_prompt, response=response.strip(),
                   text=self.tokenizer.decode(ids + new))
        return response

    # ------------------------------------------------------------------ events
    def request_stop(self):
        """Ask the loop to checkpoint and return after the current optimizer step."""
        self._stop = True

    def _stop_requested(self):
        asked = self._stop or bool(self.stop_file and os.path.exists(self.stop_file))
        if self.world_size > 1:  # every rank calls this at the same points: agree on one answer
            asked = bool(distributed.all_reduce(torch.tensor([int(asked)], device=self.device), "max").item())
        return asked

    def _timing(self):
        session = time.perf_counter() - self._t0
        done, eta = self.global_step + 1, None
        if done > self._steps_at_start and self.total_steps is not None:
            eta = session / (done - self._steps_at_start) * max(self.total_steps - done, 0)
        return self.elapsed_before + session, eta

    def epochs_seen(self):
        """Fractional epochs trained so far (x axis of the chapter's loss plot)."""
        n = len(self.train_loader)
        return self.epoch + (self.batch_in_epoch / n if n else 0.0)

    def _emit(self, kind, *, epoch=None, **data):
        if not self.is_main:
            return
        elapsed, eta = self._timing()
        done = self.global_step + 1
        event = {"type": kind, "time": time.time(),
                 "epoch": epoch if epoch is not None else min(self.epoch + 1, self.config.epochs),
                 "epochs": self.config.epochs, "epochs_seen": self.epochs_seen(),
                 "step": self.global_step, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                 "progress": done / self.total_steps if self.total_steps else 0.0,
                 "elapsed": elapsed, "eta": eta,
                 "tokens_per_s": round(self.tokens_seen / elapsed, 1) if elapsed > 0 else None, **data}
        for key in ("loss", "train_loss", "val_loss"):
            if key in event:
                event[key] = _finite_or_none(event[key])
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")  # one write per line: readers never see half an event
        for callback in self.callbacks:
            callback(event)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """Everything resuming needs; loads with ``torch.load(weights_only=True)``."""
        from .runs import capture_rng_state

        elapsed, _ = self._timing()
        return {"format": CHECKPOINT_FORMAT, "version": 1,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "n_batches": len(self.train_loader), "global_step": self.global_step,
                "tokens_seen": self.tokens_seen, "elapsed": elapsed, "history": self.history,
                "config": self.config.to_dict(),
                "rng": capture_rng_state(self._generators()), "epoch_rng": self._epoch_rng,
                "sampler_epochs": {attr: s.epoch for attr, s in self._samplers()}}

    def load_state_dict(self, state, *, source="checkpoint"):
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source} is not an SFT Studio training checkpoint")
        if state["n_batches"] != len(self.train_loader):
            raise ValueError(
                f"{source} was taken with {state['n_batches']} training batches per epoch, but the data "
                f"now gives {len(self.train_loader)}: resuming needs the same data, limit and batch_size")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for key in ("epoch", "batch_in_epoch", "global_step", "tokens_seen"):
            setattr(self, key, state[key])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.elapsed_before = state["elapsed"]
        self._epoch_rng, self._resume_rng = state["epoch_rng"], state["rng"]
        self._resume_sampler_epochs = state.get("sampler_epochs", {})
        self._live_batches = None

    def checkpoint(self, reason="manual"):
        """Save ``state_dict()`` atomically to ``checkpoint_path`` (rank 0 only)."""
        if not self.checkpoint_path or not self.is_main:
            return None
        from .runs import save_checkpoint

        save_checkpoint(self.checkpoint_path, self.state_dict())
        self._emit("checkpoint", path=os.fspath(self.checkpoint_path), reason=reason)
        return self.checkpoint_path

    def resume(self, path=None):
        """Load a checkpoint (default ``checkpoint_path``); the next ``fit`` continues from it."""
        from .runs import load_checkpoint

        path = path or self.checkpoint_path
        self.load_state_dict(load_checkpoint(path, map_location=self.device), source=os.fspath(path))
        return self

    def _generators(self):
        return _loader_generators(self.train_loader, self.val_loader)

    def _samplers(self):
        """(name, sampler) of the train loader's seeded samplers: they shuffle from seed + epoch."""
        for attr in ("sampler", "batch_sampler"):
            sampler = getattr(self.train_loader, attr, None)
            if hasattr(sampler, "set_epoch") and isinstance(getattr(sampler, "epoch", None), int):
                yield attr, sampler

    def _restore_resume_state(self):
        from .runs import restore_rng_state

        restore_rng_state(self._resume_rng, self._generators())
        for attr, sampler in self._samplers():  # evaluations may have advanced their epoch counter
            if attr in self._resume_sampler_epochs:
                sampler.epoch = self._resume_sampler_epochs[attr]
        self._resume_rng = None

    # ------------------------------------------------------------------ the loop
    def _epoch_batches(self):
        from .runs import capture_rng_state, restore_rng_state

        if self.batch_in_epoch > 0 and self._live_batches is not None:
            return self._live_batches  # fit() called again in memory (a larger max_steps): go on
        gens = self._generators()
        for _, sampler in self._samplers():
            sampler.set_epoch(self.epoch)
        if self.batch_in_epoch == 0:
            self._epoch_rng = capture_rng_state(gens)
            self._live_batches = iter(self.train_loader)
            return self._live_batches
        # Resuming mid-epoch: replay this epoch's shuffle from its starting RNG state, skip the
        # batches already trained on, then put the RNG back as it was at the checkpoint.
        restore_rng_state(self._epoch_rng, gens)
        batches = iter(self.train_loader)
        for _ in range(self.batch_in_epoch):
            next(batches)
        self._restore_resume_state()
        self._live_batches = batches
        return batches

    def _train_step(self, batches, n_batches):
        """One optimizer step over up to ``grad_accum_steps`` micro-batches; returns the mean loss."""
        group = min(self.config.grad_accum_steps, n_batches - self.batch_in_epoch)
        if self.world_size > 1:
            return self._train_step_ddp(batches, group)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(group):
            inputs, targets = next(batches)
            loss = self.loss(inputs, targets)
            (loss if group == 1 else loss / group).backward()
            total += loss.item()
            self.tokens_seen += inputs.numel()
            self.batch_in_epoch += 1
        self.optimizer.step()
        self.global_step += 1
        return total / group

    def _train_step_ddp(self, batches, group):
        """As ``_train_step``, each micro-batch split over the ranks.

        Rank r's loss is (sum of its token losses) * world_size / (counted targets of the
        whole micro-batch): DDP averages gradients over ranks, so the result is the gradient
        of the whole micro-batch's mean loss, as one process computes it.
        """
        micro = []
        for _ in range(group):
            batch = next(batches)
            if batch is None:
                raise TrainingError("a training batch has fewer rows than processes: use drop_last batches "
                                    "with batch_size >= the number of processes")
            micro.append(batch)
        # Per micro-batch, over all ranks: counted targets and input tokens (padding included).
        counts = torch.tensor([[int((y != IGNORE_INDEX).sum()), x.numel()] for x, y in micro], dtype=torch.float64)
        counts = distributed.all_reduce(counts.to(self.device)).cpu()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(group, dtype=torch.float64)
        for i, (inputs, targets) in enumerate(micro):
            last = i == group - 1
            with nullcontext() if last else self._ddp.no_sync():  # all-reduce grads once per step
                loss_sum = self.loss(inputs, targets, reduction="sum")
                (loss_sum * (self.world_size / (counts[i, 0].item() * group))).backward()
            sums[i] = loss_sum.item()
        self.optimizer.step()
        self.global_step += 1
        self.batch_in_epoch += group
        self.tokens_seen += int(counts[:, 1].sum().item())
        sums = distributed.all_reduce(sums.to(self.device)).cpu()
        return (sums / counts[:, 0]).mean().item()  # mean of the micro-batches' mean losses

    def _stopped(self, save=True):
        if save:
            self.checkpoint("stop")
        self._emit("stopped")
        self._stop = False
        if self.is_main and self.stop_file:
            try:
                os.remove(self.stop_file)  # the request is consumed
            except FileNotFoundError:
                pass
        return "stopped"

    def _loop(self):
        cfg, n_batches = self.config, len(self.train_loader)
        if self._resume_rng is not None and self.batch_in_epoch == 0:
            self._restore_resume_state()
        if self._stop_requested():
            return self._stopped()
        while self.epoch < cfg.epochs and self.global_step + 1 < self.total_steps:
            batches = self._epoch_batches()
            while self.batch_in_epoch < n_batches:
                loss = self._train_step(batches, n_batches)
                self._emit("step", loss=loss, lr=self.optimizer.param_groups[0]["lr"])
                if self.global_step % cfg.eval_freq == 0:
                    train_loss, val_loss = self.evaluate()
                    for key, value in (("train_losses", train_loss), ("val_losses", val_loss),
                                       ("tokens_seen", self.tokens_seen), ("steps", self.global_step),
                                       ("epochs", self.epochs_seen())):
                        self.history[key].append(value)
                    self._emit("eval", train_loss=train_loss, val_loss=val_loss)
                if self.global_step + 1 >= self.total_steps:
                    break
                if cfg.checkpoint_every and (self.global_step + 1) % cfg.checkpoint_every == 0:
                    self.checkpoint("periodic")
                if self._stop_requested():
                    return self._stopped()
            if self.batch_in_epoch == n_batches:
                self.epoch, self.batch_in_epoch, self._live_batches = self.epoch + 1, 0, None
                self._emit("epoch_end", epoch=self.epoch)
                self.sample(epoch=self.epoch)
                self.checkpoint("epoch_end")
                if self._stop_requested() and self.global_step + 1 < self.total_steps:
                    return self._stopped(save=False)  # the epoch-end checkpoint is the stop point
            elif self.global_step + 1 >= self.total_steps:  # max_steps ended it mid-epoch
                self.sample()
                self.checkpoint("max_steps")
        return "completed"

    def fit(self):
        """Train to the end (epochs or max_steps) or until a stop; returns a summary dict."""
        cfg, n_batches = self.config, len(self.train_loader)
        if n_batches == 0:
            raise ValueError("the training data gives no batches: add data or lower batch_size")
        self.total_steps = cfg.epochs * math.ceil(n_batches / cfg.grad_accum_steps)
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._t0, self._steps_at_start = time.perf_counter(), self.global_step + 1
        self.model.train()
        try:
            state = self._loop()
        except Exception as exc:
            if _is_oom(exc):
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                advice = oom_advice(cfg)
                message = (f"out of memory on {self.device} training {cfg.model} with batch_size "
                           f"{cfg.batch_size} and allowed_max_length {cfg.allowed_max_length}; "
                           "the last checkpoint is kept")
                self._emit("error", error=message, advice=advice, oom=True)
                raise TrainingError(message, advice) from exc
            self._emit("error", error=f"{type(exc).__name__}: {exc}")
            raise
        extra = {}
        if self.world_size > 1:  # proof that DDP kept the replicas identical
            digests = distributed.gather_digests(self.model)
            extra = {"world_size": self.world_size, "replica_digests": digests,
                     "replicas_in_sync": len(set(digests)) == 1}
        if state == "completed":
            self._emit("done", train_loss=self.history["train_losses"][-1] if self.history["train_losses"] else None,
                       val_loss=self.history["val_losses"][-1] if self.history["val_losses"] else None, **extra)
        elapsed, _ = self._timing()
        return {"state": state, "global_step": self.global_step, "epochs_completed": self.epoch,
                "tokens_seen": self.tokens_seen, "elapsed": elapsed,
                "train_losses": list(self.history["train_losses"]),
                "val_losses": list(self.history["val_losses"]),
                "track_tokens_seen": list(self.history["tokens_seen"]), **extra}
