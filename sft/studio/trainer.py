"""Not in the book: the ``Trainer`` the app, the command line and the benchmark all drive.

One job: the training loop. It runs optimizer steps (gradient accumulation, bf16 autocast, the
fast kernels and the masked head where the config asks), evaluates on the chapter's schedule
and reports every step, evaluation, epoch end, sample, checkpoint and stop as an event dict to
its callbacks. What a checkpoint holds and how a resume replays the epoch is ``checkpoint``'s
job; DDP's batch rule is ``distributed``'s. With ``TrainConfig.chapter_path()`` it computes
exactly what the chapter's ``train_model_simple`` computes (a test proves it bit for bit).
"""
import math
import os
import time
from contextlib import nullcontext

import torch

from ..batching import IGNORE_INDEX
from ..fast.forward import FastGPT
from ..fast.loss import full_loss, masked_head_loss
from . import distributed, sharding
from .adapters import load_trainable_state, trainable_state
from .checkpoint import EpochBatches, load_checkpoint, restore_training_state, save_checkpoint, training_state
from .config import ConfigError, TrainingError, oom_advice
from .files import append_jsonl
from .hardware import peak_memory_mb, resolve_device, resolve_precision, tf32
from .snapshots import Snapshots, greedy_answer


def _is_oom(exc):
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


def _finite_or_none(x):
    return x if x is None or math.isfinite(x) else None


class Trainer:
    """The training loop.

    Every step, evaluation, answer snapshot, epoch end, sample, checkpoint and the end are reported as event
    dicts to each callback (and, with ``metrics_path``, appended to a JSONL file). A stop asked
    with ``request_stop()`` or by creating ``stop_file`` is honoured between optimizer steps:
    the trainer checkpoints and ``fit`` returns with state "stopped". ``resume(path)`` then
    continues so that the final weights equal those of a run that never stopped.

    Under torchrun (a process group is initialised) it trains with DDP: the model is wrapped,
    the loaders sharded, losses all-reduced, and only rank 0 reports and saves.
    """

    def __init__(self, model, config, train_loader, val_loader, *, tokenizer=None, sample_prompt=None,
                 callbacks=(), checkpoint_path=None, stop_file=None, metrics_path=None, device=None):
        self.config = config.validate()
        self.device = resolve_device(config.device if device is None else device)
        self.precision = resolve_precision(config.precision, self.device)
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.tokenizer, self.sample_prompt = tokenizer, sample_prompt
        self.snapshots = None  # the answers taken at evaluations (``snapshots``), set up by ``fit``
        self.callbacks = list(callbacks)
        self.checkpoint_path, self.stop_file, self.metrics_path = checkpoint_path, stop_file, metrics_path
        self.rank, self.world_size = distributed.world()
        self.is_main = self.rank == 0
        self.sharded = self.world_size > 1 and config.strategy == "fsdp"  # FSDP2: 1/N of the state per process

        # The module each step runs: the book's model itself on the chapter's path, else the
        # fast kernels over its parameters (and, with lengths, only the positions that count).
        self.masked_head = config.masked_head_loss and config.fast_kernels
        if config.fast_kernels or config.activation_checkpointing:
            self.body = FastGPT(self.model, checkpointing=config.activation_checkpointing,
                                fused=config.fast_kernels)
        else:
            self.body = self.model
        self.forward_model = self.body
        if self.world_size > 1:  # data parallel over torchrun's processes
            if config.batch_size < self.world_size:
                raise ConfigError([f"batch_size {config.batch_size} is smaller than the {self.world_size} "
                                   "processes: each needs at least one row of every batch"])
            self.train_loader = distributed.shard_loader(train_loader, self.rank, self.world_size)
            self.val_loader = distributed.shard_loader(val_loader, self.rank, self.world_size)
            self._ddp = self.forward_model = sharding.wrap(self.body, config, self.device)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        # Fused AdamW: one pass over params, grads and moments instead of ~10; same maths, other rounding.
        extra = {"fused": True} if config.fused_adamw and self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=config.weight_decay, **extra)
        # Position: the chapter's counters plus where we are inside the epoch.
        self.epoch = 0           # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already trained on
        self.global_step = -1    # the chapter's counter: 0 after the first optimizer step
        self.tokens_seen = 0     # input tokens, padding included (as the chapter counts)
        self.history = {"train_losses": [], "val_losses": [], "tokens_seen": [], "steps": [], "epochs": []}
        self.since_eval = []     # losses of the optimizer steps since the last evaluation
        self.total_steps = None
        self.elapsed_before = 0.0  # seconds trained before a resume
        self.batches = EpochBatches(self.train_loader, self.val_loader)
        self._stop = False
        self._t0, self._steps_at_start = time.perf_counter(), 0
        self._last_checkpoint = time.monotonic()

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
        forward = self.forward_model if self.model.training else self.body
        with self._autocast():
            if self.masked_head:
                return masked_head_loss(forward, self.model.out_head, inputs, targets, reduction=reduction)
            return full_loss(forward(inputs), targets, reduction=reduction)

    # A batch as the loaders give it; DPO (its own trainer) redefines these three.
    def batch_loss(self, batch, *, reduction="mean"):
        inputs, targets = batch
        return self.loss(inputs, targets, reduction=reduction)

    def batch_weight(self, batch):
        """How much a batch counts in a mean over batches split across ranks: its counted targets."""
        return int((batch[1] != IGNORE_INDEX).sum())

    def batch_tokens(self, batch):
        """Input tokens, padding included, as the chapter's tokens_seen counts them."""
        return batch[0].numel()

    def _loader_loss(self, loader):
        if len(loader) == 0:
            return float("nan")
        n = min(self.config.eval_iter, len(loader))
        if self.world_size > 1:
            return self._loader_loss_ddp(loader, n)
        total = 0.0
        for i, batch in enumerate(loader):
            if i >= n:
                break
            total += self.batch_loss(batch).item()
        return total / n

    def _loader_loss_ddp(self, loader, n):
        """The chapter's average of per-batch mean losses, each batch split over the ranks."""
        sums = torch.zeros(n, 2, dtype=torch.float64)  # per batch: (loss sum, weight)
        for i, batch in enumerate(loader):
            if i >= n:
                break
            if batch is not None:  # a short last batch leaves some ranks without rows
                sums[i, 0] = self.batch_loss(batch, reduction="sum").item()
                sums[i, 1] = self.batch_weight(batch)
            elif self.sharded:  # FSDP: every rank joins each forward's weight gathers
                sharding.take_part(self.body, self.device)
        sums = distributed.all_reduce(sums.to(self.device)).cpu()
        return (sums[:, 0] / sums[:, 1]).mean().item()

    def _eval_context(self):
        # One autocast around all batches, so each weight is cast to bf16 once per evaluation.
        # autocast keeps no cast cache under inference_mode (each batch would recast every
        # weight), so bf16 evaluates under no_grad; fp32 under inference_mode.
        return torch.no_grad() if self.precision == "bf16" else torch.inference_mode()

    def eval_metrics(self):
        """{"train_loss", "val_loss"} over ``eval_iter`` batches each, as the chapter's evaluate_model; with
        ``train_loss_from_steps`` the train loss is the mean of the steps' losses since the last evaluation."""
        self.model.eval()
        recent = self.config.train_loss_from_steps and self.since_eval
        with self._eval_context(), self._autocast():
            metrics = {"train_loss": sum(recent) / len(recent) if recent else self._loader_loss(self.train_loader),
                       "val_loss": self._loader_loss(self.val_loader)}
        self.model.train()
        return metrics

    def evaluate(self):
        """(train_loss, val_loss), the chapter's ``evaluate_model`` on this trainer's loaders."""
        return tuple(self.eval_metrics()[k] for k in ("train_loss", "val_loss"))

    def sample(self, epoch=None):
        """Greedy answer to ``sample_prompt`` (KV cache, the chapter's generate's tokens): a "sample" event."""
        if not (self.config.sample_each_epoch and self.tokenizer is not None and self.sample_prompt
                and self.is_main and not self.sharded):  # FSDP: rank 0 alone cannot run the sharded model
            return None
        ids, new = greedy_answer(self.model, self.tokenizer, self.sample_prompt, self.config.sample_tokens)
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
        for key, value in list(event.items()):
            if key.endswith("loss") and isinstance(value, float):
                event[key] = _finite_or_none(value)
        if self.metrics_path:
            append_jsonl(self.metrics_path, event)
        for callback in self.callbacks:
            callback(event)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self):
        """What a checkpoint keeps of the model: every tensor (adapters only under LoRA)."""
        return trainable_state(self.model, self.config)

    def load_trainable_state_dict(self, state, source="checkpoint"):
        load_trainable_state(self.model, self.config, state, source=source)

    def state_dict(self):
        """Everything resuming needs; loads with ``torch.load(weights_only=True)``."""
        return training_state(self, self._timing()[0])

    def load_state_dict(self, state, *, source="checkpoint"):
        restore_training_state(self, state, source=source)

    def checkpoint(self, reason="manual"):
        """Save ``state_dict()`` atomically to ``checkpoint_path`` (rank 0 only). Weights that are no
        longer finite are never saved: the last good checkpoint stays."""
        self._last_checkpoint = time.monotonic()
        if not self.checkpoint_path or not (self.is_main or self.sharded):
            return None
        state = self.state_dict()  # under FSDP every rank takes part: the shards are gathered whole
        if not self.is_main:
            return None
        bad = [n for n, t in state["model"].items()
               if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise TrainingError(f"the weights became NaN or infinite by step {self.global_step} ({bad[0]}): "
                                "training diverged; the last checkpoint (before this) is kept",
                                [f"a lower learning rate (now {self.config.lr:g})", "precision 'fp32' if it was bf16"])
        save_checkpoint(self.checkpoint_path, state)
        self._emit("checkpoint", path=os.fspath(self.checkpoint_path), reason=reason)
        return self.checkpoint_path

    def _checkpoint_due(self):
        cfg = self.config
        if cfg.checkpoint_every and (self.global_step + 1) % cfg.checkpoint_every == 0:
            return True
        return bool(cfg.checkpoint_minutes) and time.monotonic() - self._last_checkpoint >= 60 * cfg.checkpoint_minutes

    def resume(self, path=None):
        """Load a checkpoint (default ``checkpoint_path``); the next ``fit`` continues from it."""
        path, where = path or self.checkpoint_path, "cpu" if self.sharded else self.device  # FSDP: shards moved
        self.load_state_dict(load_checkpoint(path, map_location=where), source=os.fspath(path))
        return self

    # ------------------------------------------------------------------ the loop
    def _train_step(self, batches, n_batches):
        """One optimizer step over up to ``grad_accum_steps`` micro-batches; returns the mean loss."""
        group = min(self.config.grad_accum_steps, n_batches - self.batch_in_epoch)
        if self.world_size > 1:
            return self._train_step_ddp(batches, group)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(group):
            batch = next(batches)
            loss = self.batch_loss(batch)
            (loss if group == 1 else loss / group).backward()
            total += loss.item()
            self.tokens_seen += self.batch_tokens(batch)
            self.batch_in_epoch += 1
        self.optimizer.step()
        self.global_step += 1
        return total / group

    def _train_step_ddp(self, batches, group):
        """As ``_train_step``, each micro-batch split over the ranks.

        Rank r's loss is (sum of its losses) * world_size / (weight of the whole micro-batch,
        e.g. its counted targets): DDP averages gradients over ranks, so the result is the
        gradient of the whole micro-batch's mean loss, as one process computes it.
        """
        micro = []
        for _ in range(group):
            batch = next(batches)
            if batch is None:
                raise TrainingError("a training batch has fewer rows than processes: use drop_last batches "
                                    "with batch_size >= the number of processes")
            micro.append(batch)
        # Per micro-batch, over all ranks: weight (counted targets) and input tokens (padding included).
        counts = torch.tensor([[self.batch_weight(b), self.batch_tokens(b)] for b in micro], dtype=torch.float64)
        counts = distributed.all_reduce(counts.to(self.device)).cpu()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(group, dtype=torch.float64)
        for i, batch in enumerate(micro):
            last = i == group - 1
            with nullcontext() if last else sharding.no_sync(self._ddp):  # gradients synced once per step
                loss_sum = self.batch_loss(batch, reduction="sum")
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

    def _evaluate_and_record(self):
        t0 = time.perf_counter()
        metrics, self.since_eval = self.eval_metrics(), []
        seconds = time.perf_counter() - t0
        self.history["train_losses"].append(metrics["train_loss"])
        self.history["val_losses"].append(metrics["val_loss"])
        for key, value in (("tokens_seen", self.tokens_seen), ("steps", self.global_step),
                           ("epochs", self.epochs_seen())):
            self.history[key].append(value)
        self._emit("eval", **metrics, eval_seconds=round(seconds, 4))
        if self.snapshots is not None and self.snapshots.due(self.global_step):
            self._emit("snapshot", **metrics, **self.snapshots.take(self.model))

    def _check_finite(self, loss):
        if not math.isfinite(loss):
            raise TrainingError(
                f"the training loss became {loss} at step {self.global_step}: training diverged; the last "
                "checkpoint (saved before this step) is kept",
                [f"a lower learning rate (now {self.config.lr:g})", "precision 'fp32' if it was bf16"])

    def _loop(self):
        cfg, n_batches = self.config, len(self.train_loader)
        if self.batch_in_epoch == 0:
            self.batches.restore_resume_state()
        if self._stop_requested():
            return self._stopped()
        while self.epoch < cfg.epochs and self.global_step + 1 < self.total_steps:
            batches = self.batches.batches(self.epoch, self.batch_in_epoch)
            while self.batch_in_epoch < n_batches:
                loss = self._train_step(batches, n_batches)
                self._emit("step", loss=loss, lr=self.optimizer.param_groups[0]["lr"])
                self._check_finite(loss)
                self.since_eval.append(loss)
                if self.global_step % cfg.eval_freq == 0:
                    self._evaluate_and_record()
                if self.global_step + 1 >= self.total_steps:
                    break
                if self._checkpoint_due():
                    self.checkpoint("periodic")
                if self._stop_requested():
                    return self._stopped()
            if self.batch_in_epoch == n_batches:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.batches.end_epoch()
                self._emit("epoch_end", epoch=self.epoch)
                self.sample(epoch=self.epoch)
                self.checkpoint("epoch_end")
                if self._stop_requested() and self.global_step + 1 < self.total_steps:
                    return self._stopped(save=False)  # the epoch-end checkpoint is the stop point
            elif self.global_step + 1 >= self.total_steps:  # max_steps ended it mid-epoch
                self.sample()
                self.checkpoint("max_steps")
        return "completed"

    def fit(self, *, max_steps=None):
        """Train to the end (epochs or max_steps) or until a stop; returns a summary dict.

        ``max_steps`` (this call only) stops after that many optimizer steps in all, earlier
        than the config's if smaller; a later ``fit`` goes on from there (the benchmark's turns).
        """
        cfg, n_batches = self.config, len(self.train_loader)
        if n_batches == 0:
            raise ValueError("the training data gives no batches: add data or lower batch_size")
        self.total_steps = cfg.epochs * math.ceil(n_batches / cfg.grad_accum_steps)
        for limit in (cfg.max_steps, max_steps):
            if limit is not None:
                self.total_steps = min(self.total_steps, limit)
        self._t0, self._steps_at_start = time.perf_counter(), self.global_step + 1
        self._last_checkpoint = time.monotonic()
        self.snapshots = Snapshots(cfg, self.tokenizer if self.is_main and not self.sharded else None,
                                   self.sample_prompt)
        self.model.train()
        try:
            with tf32(self.device, cfg.tf32):
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
            if isinstance(exc, TrainingError):
                self._emit("error", error=str(exc).splitlines()[0], advice=exc.advice)
            else:
                self._emit("error", error=f"{type(exc).__name__}: {exc}")
            raise
        extra, peak = {}, peak_memory_mb(self.device)  # before FSDP's weights are made whole again
        if self.sharded:  # whole weights again on every rank: the final save and the answers are rank 0's alone
            sharding.unshard(self._ddp, self.model)
        if self.world_size > 1:  # proof that the replicas are identical, and each process's peak memory
            extra = distributed.replicas_report(self.model, peak)
        if state == "completed":
            h = self.history
            self._emit("done", train_loss=h["train_losses"][-1] if h["train_losses"] else None,
                       val_loss=h["val_losses"][-1] if h["val_losses"] else None, **extra)
        elapsed, _ = self._timing()
        return {"state": state, "global_step": self.global_step, "epochs_completed": self.epoch,
                "tokens_seen": self.tokens_seen, "elapsed": elapsed,
                "train_losses": list(self.history["train_losses"]),
                "val_losses": list(self.history["val_losses"]),
                "track_tokens_seen": list(self.history["tokens_seen"]), **extra}
