"""Not in the book: how several processes share the model under torchrun, ``strategy`` "ddp" or "fsdp".

- "ddp" (``DistributedDataParallel``): every process holds the whole model, its gradients and AdamW's
  two moments; gradients are averaged in backward.
- "fsdp" (PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``): each process keeps only its
  shard (1/N) of every parameter, of its gradient and of AdamW's moments between steps. The forward
  gathers the whole parameters, backward reduce-scatters the gradients, and each process's optimizer
  updates its own shard. With the book's block bodies (``fast_kernels=False``) each block is a unit:
  only one block's weights and gradients are whole at a time. The fast kernels run the blocks as
  functions of their weights, which no unit's hooks would see, so there the unit is the whole model:
  AdamW's state, the largest part of full fine-tuning's memory, is still 1/N per process, but the
  step gathers every weight and gradient whole.

Checkpoints stay one file of whole tensors, written by rank 0 in the same format as ever:
``full_tensors`` gathers the shards (a collective: every rank calls it, in the same order), and
``load_full_state`` / ``shard_optimizer_state`` cut a whole checkpoint to each rank's shard on
resume. So a run saved by N processes resumes in M, with either strategy or none. At the end of
training ``unshard`` turns the parameters back into whole tensors on every rank, so what follows
(the final weights, the test answers, rank 0 alone) sees a plain model.
"""
from contextlib import contextmanager

import torch

STRATEGIES = ("ddp", "fsdp")


def wrap(module, config, device):
    """``module`` made ready for data-parallel training by ``config.strategy``: a DDP wrapper, or ``module``
    itself sharded: each transformer block a unit of its own where the book's block bodies run (the
    blocks' weights are then gathered one block at a time), the rest with the whole model."""
    if config.strategy == "fsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in [] if config.fast_kernels else getattr(module, "model", module).trf_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def no_sync(wrapped):
    """Backward without the gradients' communication (all micro-batches of a step but the last)."""
    if hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
        return
    wrapped.set_requires_gradient_sync(False)  # FSDP2: gradients accumulate unsharded until the last
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def take_part(module, device):
    """A forward on a one-token dummy row, its result unused: a rank whose share of a short batch is empty
    still takes part in the sharded forward's weight gathers, which every rank must join."""
    module(torch.zeros(1, 1, dtype=torch.long, device=device))


def is_sharded(tensor):
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(obj, keep=True):
    """``obj`` (a state dict, nested dicts and lists) with every shard gathered into a whole tensor on the
    CPU, one at a time, so a GPU never holds more than one whole tensor. With ``keep`` False (the ranks
    that do not write the file) each gathered tensor is dropped at once: None in its place."""
    if isinstance(obj, dict):
        return {k: full_tensors(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v, keep) for v in obj)
    if not is_sharded(obj):
        return obj
    whole = obj.full_tensor().cpu()
    return whole if keep else None


def shard_as(full, like):
    """This rank's shard of the whole tensor ``full``, laid out as the sharded parameter ``like`` (every
    rank read the same checkpoint, so no communication is needed)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def load_full_state(model, state, *, source="checkpoint"):
    """Copy the whole tensors of ``state`` (a state dict) into ``model``, whose parameters are sharded."""
    kept = set(model.state_dict())  # what a checkpoint holds: parameters and persistent buffers
    own = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()] if k in kept}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, full in state.items():
            target = own[name]
            if tuple(full.shape) != tuple(target.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(full.shape)}, the model {tuple(target.shape)}")
            if is_sharded(target):
                target.to_local().copy_(shard_as(full, target).to_local())
            else:
                target.copy_(full)


def shard_optimizer_state(state, optimizer):
    """An optimizer state dict of whole tensors, its moments cut to the shards of ``optimizer``'s parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        p = params[int(index)]
        out["state"][index] = {k: shard_as(v, p) if is_sharded(p) and torch.is_tensor(v) and v.shape == p.shape
                               else v for k, v in values.items()}
    return out


def unshard(wrapped, model):
    """Every sharded parameter of ``model`` replaced by its whole tensor, on every rank (a collective)."""
    if hasattr(wrapped, "reshard"):
        wrapped.reshard()  # the parameters as their shards (an evaluation may have left them gathered)
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and is_sharded(p):
                    module._parameters[name] = torch.nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
