"""Not in the book: where a training step's time goes, by kind of op (``python -m sft.bench --profile``).

One more optimizer step of each path on the same batch, under ``torch.profiler``; each aten op's
own (self) time is summed by kind, as ``sft.bench.lora --profile`` does, with the output head's
products, the loss and the embedding told apart from the rest. The profiler slows every op, so
only the split is meaningful, not the total.
"""
import time

import torch

from .lora import _PRODUCTS, _kind

HEAD = "output head products"
BODY = "body weight products (Linear)"
LOSS = "loss (log-softmax, cross-entropy)"
EMBEDDING = "embedding (lookup and its gradient)"


def op_kind(name, shapes, vocab):
    low = name.lower()
    if name in _PRODUCTS and any(s and vocab in s for s in shapes):
        return HEAD
    if any(word in low for word in ("log_softmax", "nll_loss", "cross_entropy")):
        return LOSS
    if "embedding" in low:
        return EMBEDDING
    kind = _kind(name, shapes, rank=-1)  # no adapters here: nothing is "thin"
    return BODY if kind.startswith("weight products") else kind


def by_kind(prof, vocab):
    """{kind: ms} of self time (device time on a GPU), the biggest first."""
    totals = {}
    for event in prof.key_averages(group_by_input_shape=True):
        own = getattr(event, "self_device_time_total", 0) or event.self_cpu_time_total
        kind = op_kind(event.key, event.input_shapes or [], vocab)
        totals[kind] = totals.get(kind, 0.0) + own / 1000
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _trainer_step(trainer, batch):
    """What the Trainer's optimizer step does (one micro-batch), through its public pieces."""
    def step():
        trainer.model.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.batch_loss(batch).backward()
        trainer.optimizer.step()
    return step


def profile_steps(paths, batch, vocab, device):
    """{path label: {"step_ms": wall ms under the profiler, kind: ms, ...}} for one step each."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = {}
    for path in paths:
        step = _trainer_step(path.trainer, batch) if hasattr(path, "trainer") else (lambda p=path: p.step(batch))
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        out[path.label] = {"step_ms": round(wall * 1000, 1), **by_kind(prof, vocab)}
    return out
