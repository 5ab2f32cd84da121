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
import gc
import json
import os
import statistics
import sys
import threading
import time

import torch

DEFAULT_MODEL = "gpt2-small (124M)"


class Meter:
    """Wall and CPU seconds of a block, and its peak memory (RSS sampled; CUDA max allocated)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak_rss = self._proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self._done.wait(0.02):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self._done.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        self.cuda_peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        return False

    def report(self):
        out = {"seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3),
               "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if self.cuda_peak is not None:
            out["cuda_max_allocated_mb"] = round(self.cuda_peak / 2**20, 1)
        return out


def _tf32(enabled):
    """TF32 matmuls on NVIDIA GPUs: part of the fast path only (the Trainer turns it on globally)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _release_memory():
    """Free what the previous measurement left, so the next one's peak RSS is its own."""
    gc.collect()
    try:  # glibc keeps freed heap pages mapped; hand them back to the OS (Linux only)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log(text):
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ============================================================================ the hardware's ceiling

def matmul_gflops(device, dtype, shape=(512, 768, 3072), seconds=1.0):
    """Matrix-product throughput (GFLOP/s) of an (m, k) @ (k, n) product, the size of a
    gpt2-small MLP layer on a training batch: what the hardware gives each precision here."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    done, t0 = 0, time.perf_counter()
    while True:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and done >= 3:
            return round(2 * m * k * n * done / elapsed / 1e9, 1)


def bench_matmul(device):
    """fp32 and (where the fast path uses it) bf16 throughput, and their ratio: the fast path's
    matrix products cannot beat the latter (on this CPU: Zen 4, AVX512-BF16, no AMX: ~2.2x)."""
    from .hardware import resolve_precision

    out = {"matmul_shape": [512, 768, 3072], "matmul_gflops": {"fp32": matmul_gflops(device, torch.float32)}}
    if resolve_precision("auto", device) == "bf16":
        out["matmul_gflops"]["bf16"] = matmul_gflops(device, torch.bfloat16)
        out["matmul_bf16_over_fp32"] = round(out["matmul_gflops"]["bf16"] / out["matmul_gflops"]["fp32"], 2)
    return out


# ============================================================================ training

class _Path:
    """One training path: its own model copy, loaders, Trainer and torch RNG state."""

    def __init__(self, label, config, model_cfg, init_state, splits, tokenizer, device):
        from .batching import create_data_loaders
        from .model import GPTModel
        from .trainer import Trainer

        self.label, self.losses = label, []
        model = GPTModel(model_cfg)
        model.load_state_dict(init_state)
        train, test, val = splits
        self.train_loader, self.val_loader, _ = create_data_loaders(
            train, val, test, tokenizer, batch_size=config.batch_size, seed=config.seed,
            allowed_max_length=config.allowed_max_length)
        torch.manual_seed(config.seed)  # as the chapter does before training: same shuffles both ways
        self.rng = torch.get_rng_state()  # each path replays its own draws, whatever runs in between
        self.trainer = Trainer(model, config, self.train_loader, self.val_loader, device=device)
        self.trainer.callbacks.append(lambda e: self.losses.append(e["loss"]) if e["type"] == "step" else None)
        self.wall = self.cpu = self.eval_seconds = 0.0
        self.round_seconds = []  # wall seconds of each run_to (a round: steps and the evaluations due)
        self.peak_rss = self.cuda_peak = 0
        evaluate = self.trainer.evaluate

        def timed_evaluate():
            t0 = time.perf_counter()
            try:
                return evaluate()
            finally:
                self.eval_seconds += time.perf_counter() - t0

        self.trainer.evaluate = timed_evaluate

    def run_to(self, steps):
        """Train on to ``steps`` optimizer steps in all (the Trainer goes on where it stopped)."""
        torch.set_rng_state(self.rng)
        _tf32(self.trainer.config.tf32 and self.trainer.device.type == "cuda")
        self.trainer.config.max_steps = steps
        with Meter(self.trainer.device) as meter:
            self.result = self.trainer.fit()
        self.rng = torch.get_rng_state()
        self.wall, self.cpu = self.wall + meter.wall, self.cpu + meter.cpu
        self.round_seconds.append(round(meter.wall, 3))
        self.peak_rss = max(self.peak_rss, meter.peak_rss)  # both paths' models are resident
        self.cuda_peak = max(self.cuda_peak, meter.cuda_peak or 0)

    def report(self, eval_iter):
        from .training import calc_loss_loader

        trainer, tokens = self.trainer, self.result["tokens_seen"]
        model = trainer.model.eval()
        with torch.no_grad():  # the trained model judged the chapter's way (fp32, every position)
            val_after = calc_loss_loader(self.val_loader, model, trainer.device, num_batches=eval_iter)
        out = {"precision": trainer.precision, "masked_head": trainer.masked_head,
               "steps": self.result["global_step"] + 1, "tokens": tokens,
               "tokens_per_s": round(tokens / self.wall, 2),
               "step_tokens_per_s": round(tokens / (self.wall - self.eval_seconds), 2),
               "seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3),
               "eval_seconds": round(self.eval_seconds, 3), "round_seconds": self.round_seconds,
               "losses": self.losses,
               "val_losses": self.result["val_losses"], "val_loss_after": val_after,
               "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if trainer.device.type == "cuda":
            out["cuda_max_allocated_mb"] = round(self.cuda_peak / 2**20, 1)
        return out


def bench_training(args, model_cfg, init_state, splits, tokenizer, device):
    """Both paths in one process, taking turns ``round_steps`` optimizer steps (and the
    evaluations due) at a time, so a slow spell of a shared machine falls on both rather than on
    one; each path sees the batches it would see alone (its own model copy and RNG state)."""
    from .config import TrainConfig

    common = dict(model=args.model, weights="random", batch_size=args.batch_size, max_steps=args.train_steps,
                  eval_freq=args.eval_freq, eval_iter=args.eval_iter, seed=args.seed, sample_each_epoch=False,
                  allowed_max_length=args.allowed_max_length, device=str(device))
    _release_memory()
    paths = [_Path("chapter", TrainConfig.chapter_path(**common), model_cfg, init_state, splits, tokenizer, device),
             _Path("fast", TrainConfig(**common, group_by_length=False), model_cfg, init_state, splits, tokenizer,
                   device)]
    for stop in range(args.round_steps, args.train_steps + args.round_steps, args.round_steps):
        for path in paths:
            if stop == args.round_steps or stop % args.eval_freq == 0 or stop >= args.train_steps:
                _log(f"training, {path.label} path ({path.trainer.precision}), to step {min(stop, args.train_steps)}")
            path.run_to(min(stop, args.train_steps))
    chapter, fast = (path.report(args.eval_iter) for path in paths)
    for path in paths:
        del path.trainer.evaluate  # break the trainer -> timed_evaluate -> trainer cycle
    last_c, last_f = chapter["losses"][-1], fast["losses"][-1]
    return {
        "train": {"chapter": chapter, "fast": fast},
        "train_tokens_per_s": {"chapter": chapter["tokens_per_s"], "fast": fast["tokens_per_s"]},
        "train_ratio": round(fast["tokens_per_s"] / chapter["tokens_per_s"], 3),
        "train_ratio_cpu": round(chapter["cpu_seconds"] / fast["cpu_seconds"], 3),
        "train_step_ratio": round(fast["step_tokens_per_s"] / chapter["step_tokens_per_s"], 3),
        # Each round's chapter/fast time ratio (same batches, same moment): robust to slow spells.
        "train_round_ratio_median": round(statistics.median(
            c / f for c, f in zip(chapter["round_seconds"], fast["round_seconds"])), 3),
        "losses": {"chapter": chapter["losses"], "fast": fast["losses"]},
        "loss_rel_diff_last": round(abs(last_f - last_c) / abs(last_c), 6),
        "val_loss_after_rel_diff": round(abs(fast["val_loss_after"] - chapter["val_loss_after"])
                                         / abs(chapter["val_loss_after"]), 6),
    }


# ============================================================================ generation

def chapter_answers(model, entries, tokenizer, max_new_tokens, device):
    """Section 7.7 of the chapter: one prompt at a time through ``generate``."""
    from .generation import extract_response, generate
    from .prompts import format_input
    from .tokenizer import text_to_token_ids, token_ids_to_text

    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    answers = []
    for entry in entries:
        input_text = format_input(entry)
        token_ids = generate(model=model, idx=text_to_token_ids(input_text, tokenizer).to(device),
                             max_new_tokens=max_new_tokens, context_size=context_size, eos_id=50256)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        answers.append(extract_response(generated_text, input_text))
    return answers


def fast_answers(model, entries, tokenizer, max_new_tokens, device, precision, batch_size):
    """``generate_responses`` (KV cache, batches sorted by length), on a bf16 copy if asked."""
    from .generation import generate_responses

    gen_model = model if precision == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
    results = generate_responses(gen_model.eval(), entries, tokenizer, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, device=device)
    return [r["model_response"] for r in results]


def bench_generation(args, model, init_state, test, tokenizer, device):
    from .hardware import resolve_precision

    _release_memory()
    model.load_state_dict(init_state)
    entries = test[:args.gen_prompts]
    precision = resolve_precision(args.gen_precision, device)
    out = {"gen_prompts": len(entries), "max_new_tokens": args.max_new_tokens, "gen_batch_size": args.gen_batch_size,
           "gen_precision": precision}
    runs = [("chapter", lambda: chapter_answers(model, entries, tokenizer, args.max_new_tokens, device))]
    if precision != "fp32" and args.gen_fp32_too:  # what the KV cache and batching give alone
        runs.append(("fast_fp32", lambda: fast_answers(model, entries, tokenizer, args.max_new_tokens, device,
                                                       "fp32", args.gen_batch_size)))
    runs.append(("fast", lambda: fast_answers(model, entries, tokenizer, args.max_new_tokens, device,
                                              precision, args.gen_batch_size)))
    answers, gen = {}, {}
    for label, fn in runs:
        _tf32(False)  # the chapter's fp32, and exact tokens for fast_fp32; bf16 does not use TF32
        _release_memory()
        _log(f"answering {len(entries)} test prompts, {label} path, up to {args.max_new_tokens} new tokens ...")
        with torch.inference_mode(), Meter(device) as meter:
            answers[label] = fn()
        gen[label] = meter.report()
    out["gen"] = gen
    out["gen_seconds"] = {label: r["seconds"] for label, r in gen.items()}
    out["gen_ratio"] = round(gen["chapter"]["seconds"] / gen["fast"]["seconds"], 3)
    out["gen_ratio_cpu"] = round(gen["chapter"]["cpu_seconds"] / gen["fast"]["cpu_seconds"], 3)
    # Greedy answers equal to the chapter's, prompt by prompt (bf16 may flip near-ties, many
    # with random weights, whose logits are nearly flat).
    for label in answers:
        if label != "chapter":
            out[f"gen_same_answers_{label}"] = sum(a == b for a, b in zip(answers["chapter"], answers[label]))
    return out


# ============================================================================ main

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
    from .data import load_instruction_data, split_data
    from .hardware import cpu_has_fast_bf16, keep_freed_memory, resolve_device
    from .model import GPTModel, model_config
    from .tokenizer import get_tokenizer

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
    _tf32(False)
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
        from .runs import atomic_write_text

        atomic_write_text(args.out, line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
