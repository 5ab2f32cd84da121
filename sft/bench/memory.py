"""Not in the book: each training path's peak memory, in a fresh process of its own.

The timed run keeps all paths' models, gradients and AdamW moments in one process, so its RSS
is theirs together. Here each path (chapter, fast, HF) trains its first ``--memory-steps`` steps
on the same batches in a child process (``python -m sft.bench.memory``), with the benchmark's
settings and allocator choice; the child reports its RSS once the model is built, the peak RSS
while training (sampled every 20 ms; the HF child's is taken after the GPTModel it was mapped
from is freed) and, on CUDA, the allocator's peak. No evaluation but the step-0 one the
schedule has (of one batch).
"""
import argparse
import json
import os
import subprocess
import sys


def _child(args):
    import torch

    from ..data import load_instruction_data, split_data
    from ..model import GPTModel, model_config
    from ..studio.hardware import keep_freed_memory, resolve_device, resolve_precision
    from ..tokenizer import get_tokenizer
    from .measure import Meter, release_memory

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        keep_freed_memory()  # as the timed run (and the training worker) does
    args.train_steps, args.eval_freq, args.eval_iter, args.round_steps = args.steps, 10**6, 1, args.steps
    tokenizer = get_tokenizer()
    splits = split_data(load_instruction_data())
    torch.manual_seed(args.seed)
    cfg = model_config(args.model)
    model = GPTModel(cfg)
    init_state = model.state_dict()
    if args.path == "hf":
        from .hf import HFPath
        from .train import replay_for, path_configs

        fast_cfg = path_configs(args, device)[1]
        path = HFPath(model, replay_for(args, splits, tokenizer), device, precision=resolve_precision(
            fast_cfg.precision, device), lr=fast_cfg.lr, weight_decay=fast_cfg.weight_decay, eval_freq=10**6,
            tf32_on=fast_cfg.tf32)
        del model, init_state
    else:
        from .train import _Path, path_configs

        config = path_configs(args, device)[0 if args.path == "chapter" else 1]
        path = _Path(args.path, config, cfg, init_state, splits, tokenizer, device)
        del model, init_state  # _Path loaded its own copy
    release_memory()
    with Meter(device) as meter:
        rss_built = meter.peak_rss
        path.run_to(args.steps)
    out = {"path": args.path, "precision": path.precision, "steps": args.steps,
           "rss_built_mb": round(rss_built / 2**20, 1), "peak_rss_mb": round(meter.peak_rss / 2**20, 1)}
    if meter.cuda_peak is not None:
        out["cuda_max_allocated_mb"] = round(meter.cuda_peak / 2**20, 1)
    print(json.dumps(out), flush=True)
    return 0


def measure_paths(args, paths):
    """{path: the child's report} for each of ``paths``, one fresh process each, one after another."""
    results = {}
    for path in paths:
        cmd = [sys.executable, "-m", "sft.bench.memory", "--path", path, "--model", args.model,
               "--steps", str(args.memory_steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--allowed-max-length", str(args.allowed_max_length), "--device", args.device,
               "--threads", str(args.threads), "--precision", args.precision]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the {path} path's memory process failed:\n{done.stderr[-2000:]}")
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sft.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=("chapter", "fast", "hf"), required=True)
    p.add_argument("--model", default="gpt2-small (124M)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--allowed-max-length", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto")
    return _child(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
