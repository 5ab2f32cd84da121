"""Not in the book: checkpoints, and resuming so exactly that a stopped run ends as if it never stopped.

A checkpoint holds the model, the optimizer, the trainer's position (epoch, batch within it,
step, tokens seen, loss history) and every random state training touches (torch CPU and CUDA,
Python, NumPy, the loaders' generators, the epoch's shuffle). It is saved with ``torch.save``
atomically and loads with ``torch.load(weights_only=True)``: tensors and plain values only,
nothing is unpickled. The previous checkpoint is kept as ``previous.pt`` until the new one is
complete, so a kill at any moment leaves one that loads.

``EpochBatches`` gives the trainer its batches: at an epoch's start it records the random
state that decides the shuffle; resuming mid-epoch it replays that shuffle, skips the batches
already trained on and puts the random state back as it was at the checkpoint.
"""
import os
import random
from pathlib import Path

import torch

from .files import atomic_write
from .sharding import full_tensors, load_full_state, shard_optimizer_state

CHECKPOINT_FORMAT = "sft-studio-checkpoint"
PREVIOUS_NAME = "previous.pt"


# ============================================================================ random states

def capture_rng_state(generators=None):
    """Every RNG that training touches: torch (CPU and CUDA), Python, NumPy, and named generators."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    try:
        import numpy as np

        _, keys, pos, has_gauss, gauss = np.random.get_state()
        # as a tensor and plain numbers, so the checkpoint loads with weights_only=True
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    return state


def restore_rng_state(state, generators=None):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    for name, gen in (generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])


def loader_generators(*loaders):
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


def seeded_samplers(loader):
    """(name, sampler) of a loader's seeded samplers: they shuffle from seed + epoch."""
    for attr in ("sampler", "batch_sampler"):
        sampler = getattr(loader, attr, None)
        if hasattr(sampler, "set_epoch") and isinstance(getattr(sampler, "epoch", None), int):
            yield attr, sampler


# ============================================================================ files

def save_checkpoint(path, state):
    """torch.save ``state`` to ``path`` atomically; the checkpoint it replaces becomes ``previous.pt``
    once the new one is complete (so one loadable checkpoint exists at every moment)."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:  # closed on any error, so a failed write gives its space back at once
            torch.save(state, f)
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS_NAME))

    atomic_write(path, write, durable=True)
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True`` (tensors and plain Python values only).

    If ``path`` is missing or unreadable but the ``previous.pt`` beside it loads, that one is
    returned (a kill between the two renames of ``save_checkpoint``, or a torn file)."""
    path = Path(path)
    errors = []
    for candidate in (path, path.with_name(PREVIOUS_NAME)):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
        except Exception as exc:  # a torn file, or a pickle with more than tensors in it
            errors.append(f"cannot read checkpoint {candidate}: {exc}")
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            errors.append(f"{candidate} is not an SFT Studio training checkpoint")
            continue
        return state
    if errors:
        raise ValueError("; ".join(errors))
    raise FileNotFoundError(f"no checkpoint at {path}")


def has_checkpoint(path):
    path = Path(path)
    return path.is_file() or path.with_name(PREVIOUS_NAME).is_file()


# ============================================================================ exact resume

class EpochBatches:
    """The training batches of each epoch, resumable in the middle of one.

    ``loader`` is the training loader; ``other_loaders`` are loaders whose generators must be
    restored too (the validation loader's). ``batches(epoch, batch_in_epoch)`` returns the epoch's
    iterator, positioned after ``batch_in_epoch`` batches.
    """

    def __init__(self, loader, *other_loaders):
        self.loader = loader
        self.generators = loader_generators(loader, *other_loaders)
        self.epoch_rng = None  # RNG states at the start of this epoch: they fix its shuffle
        self.resume_rng = None  # RNG states at the checkpoint, put back after replaying the shuffle
        self.resume_sampler_epochs = {}
        self.live = None  # this epoch's iterator, kept so a second fit() in memory goes on

    def batches(self, epoch, batch_in_epoch):
        if batch_in_epoch > 0 and self.live is not None:
            return self.live  # fit() called again in memory (a larger max_steps): go on
        for _, sampler in seeded_samplers(self.loader):
            sampler.set_epoch(epoch)
        if batch_in_epoch == 0:
            self.epoch_rng = capture_rng_state(self.generators)
            self.live = iter(self.loader)
            return self.live
        # Resuming mid-epoch: replay this epoch's shuffle from its starting RNG state, skip the
        # batches already trained on, then put the RNG back as it was at the checkpoint.
        restore_rng_state(self.epoch_rng, self.generators)
        batches = iter(self.loader)
        for _ in range(batch_in_epoch):
            next(batches)
        self.restore_resume_state()
        self.live = batches
        return batches

    def end_epoch(self):
        self.live = None

    def restore_resume_state(self):
        """After a resume: the RNG as it was at the checkpoint (a no-op when there is none pending)."""
        if self.resume_rng is None:
            return
        restore_rng_state(self.resume_rng, self.generators)
        for attr, sampler in seeded_samplers(self.loader):  # evaluations may have advanced the epoch counter
            if attr in self.resume_sampler_epochs:
                sampler.epoch = self.resume_sampler_epochs[attr]
        self.resume_rng = None

    def state_dict(self):
        return {"rng": capture_rng_state(self.generators), "epoch_rng": self.epoch_rng,
                "sampler_epochs": {attr: s.epoch for attr, s in seeded_samplers(self.loader)}}

    def load_state_dict(self, state):
        self.epoch_rng, self.resume_rng = state["epoch_rng"], state["rng"]
        self.resume_sampler_epochs = state.get("sampler_epochs", {})
        self.live = None


POSITION = ("epoch", "batch_in_epoch", "global_step", "tokens_seen")


def training_state(trainer, elapsed):
    """Everything resuming ``trainer`` needs, as a dict ``torch.load(weights_only=True)`` reads."""
    model, optimizer = trainer.trainable_state_dict(), trainer.optimizer.state_dict()
    if getattr(trainer, "sharded", False):  # FSDP: every rank gathers its shards; the file holds whole tensors
        model, optimizer = full_tensors(model, trainer.is_main), full_tensors(optimizer, trainer.is_main)
    return {"format": CHECKPOINT_FORMAT, "version": 1, "model": model, "optimizer": optimizer,
            **{k: getattr(trainer, k) for k in POSITION},
            "n_batches": len(trainer.train_loader), "elapsed": elapsed, "history": trainer.history,
            "since_eval": list(trainer.since_eval),
            "config": trainer.config.to_dict(), **trainer.batches.state_dict()}


def restore_training_state(trainer, state, *, source="checkpoint"):
    """Put ``trainer`` where ``state`` (from ``training_state``) left it."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source} is not an SFT Studio training checkpoint")
    if state["n_batches"] != len(trainer.train_loader):
        raise ValueError(
            f"{source} was taken with {state['n_batches']} training batches per epoch, but the data "
            f"now gives {len(trainer.train_loader)}: resuming needs the same data, limit and batch_size")
    if getattr(trainer, "sharded", False):  # FSDP: each rank keeps its shard of the whole tensors
        load_full_state(trainer.model, state["model"], source=source)
        trainer.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], trainer.optimizer))
    else:
        trainer.load_trainable_state_dict(state["model"], source=source)
        trainer.optimizer.load_state_dict(state["optimizer"])
    for key in POSITION:
        setattr(trainer, key, state[key])
    trainer.history = {k: list(v) for k, v in state["history"].items()}
    trainer.since_eval = list(state.get("since_eval", ()))  # older checkpoints: the next evaluation's batches
    trainer.elapsed_before = state["elapsed"]
    trainer.batches.load_state_dict(state)
