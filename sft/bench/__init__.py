"""``python -m sft.bench``: the chapter's way, the fast path and Hugging Face's, side by side (not in the book).

One process, one randomly initialised model (seeded; gpt2-small by default), the chapter's
bundled data and split. Each measurement is done every way on identical inputs:

- training, N optimizer steps with the chapter's schedule (batch 8, an evaluation every 5
  steps over 5 batches), all paths in this process, taking turns a step at a time (each with
  its own model copy and RNG state, so each sees the batches it would see alone). Chapter
  path: ``TrainConfig.chapter_path()`` through the ``Trainer`` (fp32, output head and loss over
  every position, the AdamW loop). Fast path: the ``Trainer``'s defaults (bf16 autocast where the
  hardware does bf16 well, head and loss only where targets count, fused AdamW, evaluation
  without autograd); length grouping stays off, so the paths' losses compare step by step.
  HF path (``sft.bench.hf``): ``transformers``' ``GPT2LMHeadModel`` on the same random weights
  and batches, with its best simple flags (SDPA attention, fused AdamW, the fast path's precision).
- answering the first N test prompts with up to ``max_new_tokens`` each. Chapter path: the
  chapter's section 7.7 loop, ``generate`` one prompt at a time, recomputing the whole context
  per token. Fast path: ``generate_responses`` (KV cache, prompts batched by length), on a bf16
  copy of the model where bf16 is fast. HF path: ``generate`` (left-padded batches of the same
  prompts, KV cache, greedy) in the same precision.
- the hardware's ceiling: the best GEMM throughput of a few shapes, per precision used
  (``measure.gemm_ceiling``), and each path's MFU = its FLOPs (``sft.bench.flops``) / its
  seconds / that ceiling; each training path's peak memory in a process of its own
  (``sft.bench.memory``).

Without ``transformers`` the HF fields are null and ``hf_missing`` says how to install it.
Prints ONE JSON line (see ``run``); progress goes to stderr. Timings are wall-clock; CPU
seconds are reported too, since a shared machine's wall clock is noisy. ``--quick`` (6 steps,
8 prompts, 1 memory step, 0.5 s per GEMM shape) gives the same fields in about 9 minutes for
gpt2-small on a 2-core AVX2 CPU (docs/PERFORMANCE.md, issue 18).
"""

import argparse
import copy
import json
import os

import torch

from ..data import load_instruction_data, split_data
from ..model import GPTModel, model_config
from ..studio.files import atomic_write_text
from ..studio.hardware import cpu_has_fast_bf16, keep_freed_memory, resolve_device, resolve_precision
from ..tokenizer import get_tokenizer
from .generate import bench_generation
from .hf import transformers_missing
from .measure import bench_matmul, ceiling_shapes, gemm_ceiling, log
from .train import bench_training, replay_for

DEFAULT_MODEL = "gpt2-small (124M)"
# What --quick changes (and the full run's values): explicit flags win over both.
FULL = {"train_steps": 20, "gen_prompts": 110, "memory_steps": 3, "ceiling_seconds": 1.0}
QUICK = {"train_steps": 6, "gen_prompts": 8, "memory_steps": 1, "ceiling_seconds": 0.5}

def build_parser():
    p = argparse.ArgumentParser(prog="python -m sft.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model size, RANDOM weights (or 'tiny' for tests)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (this machine has 2 cores)")
    p.add_argument("--seed", type=int, default=123, help="weights, shuffles")
    p.add_argument("--quick", action="store_true",
                   help="the same fields, fewer steps and prompts: " + ", ".join(
                       f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (full run: " + ", ".join(
                       f"{v}" for v in FULL.values()) + "); gpt2-small in about 9 min on 2 AVX2 cores")
    p.add_argument("--train-steps", type=int, default=argparse.SUPPRESS,
                   help=f"optimizer steps per path (0 skips training; default {FULL['train_steps']})")
    p.add_argument("--batch-size", type=int, default=8, help="the chapter's batch size")
    p.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps (the chapter's schedule)")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--round-steps", type=int, default=1,
                   help="the paths take turns, this many optimizer steps (and the evaluations due) at a time")
    p.add_argument("--allowed-max-length", type=int, default=1024, help="truncate examples (the chapter: 1024)")
    p.add_argument("--gen-prompts", type=int, default=argparse.SUPPRESS,
                   help=f"test prompts to answer (0 skips generation; default {FULL['gen_prompts']}, the test split)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="new tokens per answer; a random model never ends early, so every answer is this long")
    p.add_argument("--gen-batch-size", type=int, default=32, help="prompts per batch on the fast path")
    p.add_argument("--gen-precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="fast path's generation precision (auto: bf16 where the hardware does it well)")
    p.add_argument("--gen-fp32-too", action="store_true", help="also time the fast path in fp32 (exact tokens)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the fast path's (and HF's) training precision (auto: bf16 where the hardware does it well)")
    p.add_argument("--no-hf", dest="hf", action="store_false", default=argparse.SUPPRESS,
                   help="leave out the Hugging Face peer (it needs `pip install transformers`)")
    p.add_argument("--memory-steps", type=int, default=argparse.SUPPRESS,
                   help=f"steps of each path in a process of its own, for its peak memory (0 skips; "
                        f"default {FULL['memory_steps']})")
    p.add_argument("--ceiling-seconds", type=float, default=argparse.SUPPRESS,
                   help=f"seconds per GEMM shape of the ceiling (default {FULL['ceiling_seconds']})")
    p.add_argument("--profile", action="store_true",
                   help="profile one more training step of each path (torch.profiler): ms by kind of op")
    p.add_argument("--strategies", type=int, default=0, metavar="N",
                   help="also train under torchrun in N processes, DDP then FSDP: each process's peak memory")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    return p


def _fill_defaults(args):
    """--quick's or the full run's values where no flag gave one; the HF peer unless --no-hf."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.hf = getattr(args, "hf", True)
    return args


def run(args):
    """All measurements; returns the JSON-ready dict."""
    args = _fill_defaults(args)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # Process-wide, so every path runs with it; as the training worker does.
    allocator = keep_freed_memory() if device.type == "cpu" else False
    tokenizer = get_tokenizer()
    train, test, val = split_data(load_instruction_data())
    torch.manual_seed(args.seed)
    model_cfg = model_config(args.model)
    model = GPTModel(model_cfg).to(device)
    init_state = copy.deepcopy(model.state_dict())
    info = {"model": args.model, "weights": "random", "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": cpu_has_fast_bf16(), "cpu_count": os.cpu_count(), "seed": args.seed, "quick": args.quick,
            "train_steps": args.train_steps, "malloc_keeps_freed_memory": allocator,
            "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    precisions = {"fp32"}  # the chapter's; and what the fast paths use
    if args.train_steps > 0:
        precisions.add(resolve_precision(args.precision, device))
    if args.gen_prompts > 0:
        precisions.add(resolve_precision(args.gen_precision, device))
    rows = replay_for(args, (train, test, val), tokenizer).next_batch()[0].numel()  # B * T of the first batch
    log(f"the GEMM ceiling ({', '.join(sorted(precisions))}) ...")
    ceiling = gemm_ceiling(device, sorted(precisions), ceiling_shapes(model_cfg, rows), args.ceiling_seconds)
    info["gemm_ceiling"] = ceiling
    info.update(bench_matmul(ceiling))
    if args.train_steps > 0:
        info.update(bench_training(args, model_cfg, init_state, (train, test, val), tokenizer, device, ceiling))
    if args.gen_prompts > 0:
        info.update(bench_generation(args, model, init_state, test, tokenizer, device, ceiling, model_cfg))
    info["mfu"] = {"train": info.get("train_mfu_by_path"), "gen": info.get("gen_mfu_by_path")}
    peaks = {"train": None, "gen": info.get("gen_peak_rss_mb")}
    if args.train_steps > 0 and args.memory_steps > 0:
        from .memory import measure_paths  # not at the top: ``python -m sft.bench.memory`` runs that module

        paths = ["chapter", "fast"] + (["hf"] if args.hf and transformers_missing() is None else [])
        log(f"peak memory of each path in a process of its own ({args.memory_steps} steps each) ...")
        alone = measure_paths(args, paths)
        info["train_memory_alone"] = alone
        key = "cuda_max_allocated_mb" if device.type == "cuda" else "peak_rss_mb"
        peaks["train"] = {path: r[key] for path, r in alone.items()}
        if "hf" in alone:
            info["train_peak_memory_fast_over_hf"] = round(alone["fast"][key] / alone["hf"][key], 3)
    info["peak_memory_mb"] = peaks
    if args.strategies > 1:
        from .strategies import bench_strategies

        info.update(bench_strategies(args, args.strategies))  # the fast kernels: the whole model one unit
        info.update(bench_strategies(args, args.strategies, fast_kernels=False))  # the book's blocks: a unit each
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return info


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    return 0
