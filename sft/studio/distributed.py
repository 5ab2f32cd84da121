"""Not in the book: data-parallel training over several processes (PyTorch DDP, or FSDP2: ``sharding``).

    torchrun --nproc_per_node N -m sft train ...

torchrun starts N copies of the command with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; ``init_from_env`` joins them into one process group (NCCL on CUDA, one GPU
per process; gloo on CPU). The ``Trainer`` sees the group and then

- wraps the model in ``DistributedDataParallel`` (gradients averaged in backward);
- shards its loaders with ``ShardedBatchSampler``: the *global* batch is the chapter's
  ``batch_size``, drawn in exactly the single-process order for the same seed and epoch
  (rank 0 draws it with the chapter's shuffle and broadcasts it), and each rank takes a
  contiguous slice of its rows: ``batch_size // N`` rows, the first ``batch_size % N``
  ranks one more. So N processes train on the same batches as one process would;
- weighs each rank's loss by its share of the batch's counted targets, so the averaged
  gradient, and the loss it reports, are those of the whole batch (as in one process);
- agrees on stops (a stop asked on any rank stops all at the same step).

Only rank 0 reports events, writes metrics and saves checkpoints; a checkpoint from N
processes resumes in any number of processes. Processes end with ``shutdown`` (destroy the
group, then ``os._exit``), since a plain interpreter exit can abort inside gloo's threads.
"""
import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .hardware import resolve_device


@dataclass
class DistContext:
    """Where this process stands: rank among ``world_size`` processes, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "gloo" or "nccl" once a group is joined

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def leave(self):
        """Leave the process group (after training: what remains is rank 0's own work)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun(environ=None):
    """True when torchrun started this process as one of several (WORLD_SIZE > 1)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device="auto"):
    """Join torchrun's process group; returns a ``DistContext`` (rank 0 of 1 without torchrun)."""
    dev = resolve_device(device)
    if not launched_by_torchrun():
        return DistContext(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} needs its own GPU, but torch sees {torch.cuda.device_count()}: "
                             "use --nproc_per_node at most the number of GPUs")
        dev, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(dev)  # NCCL's collectives (and object broadcasts) use the current device
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"DDP trains on CPU (gloo) or CUDA (nccl), not on {dev.type}")
    dist.init_process_group(backend=backend)  # reads MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE
    return DistContext(rank=rank, local_rank=local, world_size=world, device=dev, backend=backend)


def shutdown(code=0):
    """End a torchrun process: flush output, destroy the group, ``os._exit(code)``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)


def world():
    """(rank, world_size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ============================================================================ batches

def shard_rows(n, rank, world_size):
    """The slice of rows [start, stop) that ``rank`` takes from a batch of ``n`` rows."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler:
    """Wraps a loader's batch sampler: the same global batches on every rank, a slice each.

    Rank 0 draws the epoch's batches from the wrapped sampler (the chapter's RandomSampler
    draws from the global RNG, the length-grouped one from its seed and epoch) and
    broadcasts them, so every rank agrees even if their RNGs drift apart (dropout on batches
    of other shapes). Every rank still draws, so each RNG advances as in one process.
    """

    def __init__(self, batch_sampler, rank, world_size):
        self.batch_sampler = batch_sampler
        self.sampler = getattr(batch_sampler, "sampler", None)  # so the Trainer finds its generator
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        batches = [list(b) for b in self.batch_sampler]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            box = [batches]
            dist.broadcast_object_list(box, src=0)
            batches = box[0]
        for batch in batches:
            start, stop = shard_rows(len(batch), self.rank, self.world_size)
            yield batch[start:stop]  # may be empty for a short last batch (evaluation only)

    def __len__(self):
        return len(self.batch_sampler)

    # The Trainer restores a seeded sampler's epoch when resuming: pass it through.
    def set_epoch(self, epoch):
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    @property
    def epoch(self):
        return getattr(self.batch_sampler, "epoch", None)

    @epoch.setter
    def epoch(self, value):
        if hasattr(self.batch_sampler, "epoch"):
            self.batch_sampler.epoch = value


class _EmptyAwareCollate:
    """The loader's collate, except that an empty slice gives None (nothing to compute)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        return self.collate(items) if items else None


def shard_loader(loader, rank, world_size):
    """A DataLoader over the same dataset whose batches are this rank's slices (see above)."""
    from torch.utils.data import DataLoader

    if isinstance(loader.batch_sampler, ShardedBatchSampler):
        return loader
    return DataLoader(loader.dataset, batch_sampler=ShardedBatchSampler(loader.batch_sampler, rank, world_size),
                      collate_fn=_EmptyAwareCollate(loader.collate_fn), num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory)


# ============================================================================ collectives

def all_reduce(tensor, op="sum"):
    """In-place all-reduce (a no-op without a group); returns the tensor."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def param_digest(model):
    """A short hash of every parameter's bytes: equal on all ranks iff the replicas are equal."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def gather_digests(model):
    """Every rank's ``param_digest``, in rank order (a list of one without a group)."""
    digest = param_digest(model)
    rank, world_size = world()
    if world_size == 1:
        return [digest]
    out = [None] * world_size
    dist.all_gather_object(out, digest)
    return out


def replicas_report(model, peak_mb):
    """After training under torchrun: every rank's parameter digest (equal iff the replicas are), and every
    rank's peak memory in MB, in rank order (a collective)."""
    digests = gather_digests(model)
    peaks = [None] * len(digests)
    dist.all_gather_object(peaks, peak_mb)
    return {"world_size": len(digests), "replica_digests": digests, "replicas_in_sync": len(set(digests)) == 1,
            "peak_memory_mb_by_rank": peaks}
