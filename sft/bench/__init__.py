"""``python -m sft.bench``: the chapter's way against the fast path, side by side (not in the book).

One process, one randomly initialised model (seeded; gpt2-small by default), the chapter's
bundled data and split. Two measurements, each done both ways on identical inputs:

- training, N optimizer steps through the ``Trainer`` with the chapter's schedule (batch 8,
  an evaluation every 5 steps over 5 batches), both paths in this process, taking turns a
  step at a time (each with its own model copy and RNG state, so each sees the batches it
  would see alone). Chapter path: ``TrainConfig.chapter_path()``
  (fp32, output head and loss over every position, the AdamW loop). Fast path: the defaults
  (bf16 autocast where the hardware does bf16 well, head and loss only where targets count,
  fused AdamW, evaluation without autograd); length grouping stays off, so both paths see
  the same batches and their losses compare step by step.
- answering the first N test prompts with up to ``max_new_tokens`` each. Chapter path: the
  chapter's section 7.7 loop, ``generate`` one prompt at a time, recomputing the whole context
  per token. Fast path: ``generate_responses`` (KV cache, prompts batched by length), on a bf16
  copy of the model where bf16 is fast.

Prints ONE JSON line (see ``run``); progress goes to stderr. Timings are wall-clock; CPU
seconds are reported too, since a shared machine's wall clock is noisy.
"""

import argparse
import copy
import json
import os
import sys

import torch

from ..data import load_instruction_data, split_data
from ..model import GPTModel, model_config
from ..studio.files import atomic_write_text
from ..studio.hardware import cpu_has_fast_bf16, keep_freed_memory, resolve_device
from ..tokenizer import get_tokenizer
from .generate import bench_generation
from .measure import bench_matmul
from .train import bench_training

DEFAULT_MODEL = "gpt2-small (124M)"

def build_parser():
    p = argparse.ArgumentParser(prog="python -m sft.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model size, RANDOM weights (or 'tiny' for tests)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (this machine has 2 cores)")
    p.add_argument("--seed", type=int, default=123, help="weights, shuffles")
    p.add_argument("--train-steps", type=int, default=20, help="optimizer steps per path (0 skips training)")
    p.add_argument("--batch-size", type=int, default=8, help="the chapter's batch size")
    p.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps (the chapter's schedule)")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--round-steps", type=int, default=1,
                   help="the paths take turns, this many optimizer steps (and the evaluations due) at a time")
    p.add_argument("--allowed-max-length", type=int, default=1024, help="truncate examples (the chapter: 1024)")
    p.add_argument("--gen-prompts", type=int, default=110, help="test prompts to answer (0 skips generation)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="new tokens per answer; a random model never ends early, so every answer is this long")
    p.add_argument("--gen-batch-size", type=int, default=32, help="prompts per batch on the fast path")
    p.add_argument("--gen-precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="fast path's generation precision (auto: bf16 where the hardware does it well)")
    p.add_argument("--gen-fp32-too", action="store_true", help="also time the fast path in fp32 (exact tokens)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    return p


def run(args):
    """Both measurements; returns the JSON-ready dict."""
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # Process-wide, so both paths run with it; as the training worker does.
    allocator = keep_freed_memory() if device.type == "cpu" else False
    tokenizer = get_tokenizer()
    train, test, val = split_data(load_instruction_data())
    torch.manual_seed(args.seed)
    model_cfg = model_config(args.model)
    model = GPTModel(model_cfg).to(device)
    init_state = copy.deepcopy(model.state_dict())
    info = {"model": args.model, "weights": "random", "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": cpu_has_fast_bf16(), "cpu_count": os.cpu_count(), "seed": args.seed,
            "malloc_keeps_freed_memory": allocator, "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(bench_matmul(device))
    if args.train_steps > 0:
        info.update(bench_training(args, model_cfg, init_state, (train, test, val), tokenizer, device))
    if args.gen_prompts > 0:
        info.update(bench_generation(args, model, init_state, test, tokenizer, device))
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

