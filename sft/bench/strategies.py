"""Not in the book: DDP against FSDP under torchrun, the peak memory of each process (``--strategies N``).

The same run (random weights, the same batches and steps) is trained twice by ``torchrun
--nproc_per_node N -m sft train``: once with ``strategy="ddp"`` (each process holds the whole model,
its gradients and AdamW's two moments) and once with ``"fsdp"`` (each holds 1/N of them between
steps). Each process reports its own peak memory (``peak_memory_mb_by_rank`` in the run's "done"
event: CUDA's peak allocation, or the peak RSS on a CPU) and the losses say that both trained alike.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..studio.config import TrainConfig
from ..studio.runs import Run
from .measure import log

ROOT = Path(__file__).resolve().parents[2]


def bench_strategies(args, nproc, *, fast_kernels=True):
    """{"strategies": {ddp: {...}, fsdp: {...}}, "fsdp_over_ddp_peak_memory": max over ranks, FSDP / DDP}.
    ``fast_kernels`` False: the book's block bodies, where FSDP shards block by block."""
    out, kernels = {}, {} if fast_kernels else {"fast_kernels": False, "masked_head_loss": False}
    with tempfile.TemporaryDirectory(prefix="sft-bench-strategies-") as root:
        for strategy in ("ddp", "fsdp"):
            config = TrainConfig(model=args.model, weights="random", seed=args.seed, batch_size=args.batch_size,
                                 max_steps=max(args.train_steps, 1), eval_freq=max(args.train_steps, 1),
                                 eval_iter=1, allowed_max_length=args.allowed_max_length, sample_each_epoch=False,
                                 snapshot_every=0, device=args.device, precision=args.precision, strategy=strategy,
                                 **kernels)
            run = Run.create(config, root=root, name=strategy)
            log(f"{strategy.upper()}, {nproc} processes under torchrun, {config.max_steps} steps"
                f"{'' if fast_kernels else ', the book block bodies'} ...")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "sft", "train", "--run-dir", str(run.path), "--progress", "plain", "--no-responses"]
            # malloc's defaults: with the worker's keep-freed-memory setting the peak RSS measures the heap's
            # high-water mark (FSDP's varied buffers fragment it), not the tensors alive at once.
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // nproc)), "SFT_KEEP_FREED_MEMORY": "0",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0 or run.state != "completed":
                out[strategy] = {"error": (done.stdout + done.stderr)[-2000:]}
                continue
            last = run.read_metrics("done")[-1]
            out[strategy] = {"peak_memory_mb_by_rank": last["peak_memory_mb_by_rank"],
                             "losses": [e["loss"] for e in run.read_metrics("step")],
                             "seconds": round(last["elapsed"], 3), "replicas_in_sync": last["replicas_in_sync"]}
    peaks = {k: max(v["peak_memory_mb_by_rank"]) for k, v in out.items() if "peak_memory_mb_by_rank" in v}
    ratio = round(peaks["fsdp"] / peaks["ddp"], 3) if len(peaks) == 2 else None
    suffix = "" if fast_kernels else "_book_bodies"
    return {f"strategies{suffix}": out, "strategies_processes": nproc, f"fsdp_over_ddp_peak_memory{suffix}": ratio}
