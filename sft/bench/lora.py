"""Not in the book: LoRA against full fine-tuning, same model, same batches, one process each.

    python -m sft.bench.lora [--model gpt2-small] [--steps 8] [--batch-size 8] [--rank 16] [--profile] [--json out.json]

Each method trains in a fresh Python process (``--child``), so its peak memory (RSS; on CUDA
also the allocator's peak) is its own: the weights, their gradients and AdamW's two moments for
full fine-tuning; the frozen weights plus the adapters' for LoRA. Both use the fast path on the
same random weights (seed 123) and the same chapter batches; the first step of each is warm-up
and not timed. Reported: training tokens/s, peak memory, trainable parameters, and the ratios.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _child(args):
    import resource

    import torch

    from ..batching import create_data_loaders
    from ..data import load_instruction_data, split_data
    from ..lora import trainable_parameters
    from ..studio.config import TrainConfig
    from ..studio.hardware import peak_memory_mb
    from ..studio.models import build_model
    from ..studio.trainer import Trainer
    from ..tokenizer import get_tokenizer

    config = TrainConfig(model=args.model, weights="random", batch_size=args.batch_size, seed=123,
                         sample_each_epoch=False, eval_freq=10**6, eval_iter=1, device=args.device,
                         allowed_max_length=args.allowed_max_length, lora_rank=args.rank if args.lora else 0,
                         lora_alpha=float(args.rank), checkpoint_minutes=None)
    train, test, val = split_data(load_instruction_data())
    loaders = create_data_loaders(train, val, test, get_tokenizer(), batch_size=config.batch_size, seed=config.seed,
                                  allowed_max_length=config.allowed_max_length)
    model = build_model(config)
    trainer = Trainer(model, config, loaders[0], loaders[1])
    tokens = []
    trainer.callbacks.append(lambda e: e["type"] == "step" and tokens.append((time.perf_counter(), e["tokens_seen"])))
    if args.profile:
        trainer.fit(max_steps=1)  # step 0 warms up (allocations, kernel choice), unprofiled
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.fit(max_steps=args.steps + 1)
    else:
        trainer.fit(max_steps=args.steps + 1)  # step 0 warms up (allocations, kernel choice)
    (t0, n0), (t1, n1) = tokens[0], tokens[-1]
    trainable, total, share = trainable_parameters(model)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    out = {"method": config.method, "precision": trainer.precision, "timed_steps": len(tokens) - 1,
           "tokens_per_s": round((n1 - n0) / (t1 - t0), 1), "peak_rss_mb": round(rss_mb, 1),
           "trainable": trainable, "total": total, "share": round(share, 5),
           "last_loss": trainer.history["train_losses"][-1] if trainer.history["train_losses"] else None}
    if trainer.device.type == "cuda":
        out["cuda_peak_mb"] = peak_memory_mb(trainer.device)
    if args.profile:
        out["profile_ms_per_step"] = where_time_goes(prof, args.rank, args.steps)
    print(json.dumps(out), flush=True)


# What each aten op's own (self) CPU time is spent on, for the profile's summary.
_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm")
_ATTENTION = ("attention", "softmax", "masked_fill", "triu")
_OPTIMIZER = ("adam", "_foreach")


def _kind(name, shapes, rank):
    low = name.lower()
    if any(word in low for word in _OPTIMIZER):
        return "optimizer (AdamW)"
    if name in _PRODUCTS:
        if name in ("aten::bmm", "aten::baddbmm"):
            return "attention"
        thin = any(len(s) == 2 and rank in s for s in shapes if s)  # an adapter's A (in, r) or B (r, out)
        return "adapter products (thin, rank r)" if thin else "weight products (Linear, head)"
    if any(word in low for word in _ATTENTION):
        return "attention"
    if "copy" in low or "to_copy" in low or low.endswith("::to"):
        return "casts and copies"
    return "elementwise and the rest (add, mul, GELU, layer norm, loss, ...)"


def where_time_goes(prof, rank, steps):
    """{kind: ms per step} of self CPU time, the biggest first (torch.profiler over ``steps`` steps)."""
    totals = {}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = _kind(event.key, event.input_shapes, rank)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1000 / steps
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def compare(model="gpt2-small (124M)", steps=8, batch_size=8, rank=16, allowed_max_length=1024, device="auto",
            profile=False):
    """Train each method in its own process; returns {"full": ..., "lora": ..., ratios}."""
    results = {}
    for method in ("full", "lora"):
        cmd = [sys.executable, "-m", "sft.bench.lora", "--child", "--model", model, "--steps", str(steps),
               "--batch-size", str(batch_size), "--rank", str(rank), "--device", device,
               "--allowed-max-length", str(allowed_max_length)] + (["--lora"] if method == "lora" else []) + (
                  ["--profile"] if profile else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the {method} benchmark process failed:\n{done.stderr[-2000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    full, lora = results["full"], results["lora"]
    results["speedup"] = round(lora["tokens_per_s"] / full["tokens_per_s"], 3)
    results["memory_saving"] = round(1 - lora["peak_rss_mb"] / full["peak_rss_mb"], 3)
    if "cuda_peak_mb" in full:
        results["cuda_memory_saving"] = round(1 - lora["cuda_peak_mb"] / full["cuda_peak_mb"], 3)
    results["settings"] = {"model": model, "steps": steps, "batch_size": batch_size, "rank": rank,
                           "threads": os.environ.get("OMP_NUM_THREADS")}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sft.bench.lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-small (124M)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per method (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank), every Linear as the book")
    p.add_argument("--allowed-max-length", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", action="store_true",
                   help="run torch.profiler over the timed steps and report where each method's time goes "
                        "(ms per step by kind of op; the profiler's overhead makes tokens/s lower)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    out = compare(args.model, args.steps, args.batch_size, args.rank, args.allowed_max_length, args.device,
                  args.profile)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
