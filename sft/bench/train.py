"""Not in the book: training, the chapter's path, the fast path and Hugging Face's, taking turns on the same batches."""
import statistics

import torch

from ..batching import IGNORE_INDEX, create_data_loaders
from ..model import GPTModel
from ..studio.config import TrainConfig
from ..studio.trainer import Trainer
from ..training import calc_loss_loader
from .flops import mfu, sum_parts, train_step_flops
from .hf import HFPath, transformers_missing
from .measure import Meter, log, release_memory
from .profile import profile_steps
from .replay import BatchReplay


class _Path:
    """One training path: its own model copy, loaders, Trainer and torch RNG state."""

    def __init__(self, label, config, model_cfg, init_state, splits, tokenizer, device):
        self.label, self.losses = label, []
        self.precision = None  # set below, once the Trainer has resolved it
        model = GPTModel(model_cfg)
        model.load_state_dict(init_state)
        train, test, val = splits
        self.train_loader, self.val_loader, _ = create_data_loaders(
            train, val, test, tokenizer, batch_size=config.batch_size, seed=config.seed,
            allowed_max_length=config.allowed_max_length)
        torch.manual_seed(config.seed)  # as the chapter does before training: same shuffles both ways
        self.rng = torch.get_rng_state()  # each path replays its own draws, whatever runs in between
        self.trainer = Trainer(model, config, self.train_loader, self.val_loader, device=device)
        self.trainer.callbacks.append(self._on_event)
        self.precision = self.trainer.precision
        self.wall = self.cpu = self.eval_seconds = 0.0
        self.round_seconds = []  # wall seconds of each run_to (a round: steps and the evaluations due)
        self.peak_rss = self.cuda_peak = 0

    def _on_event(self, event):
        if event["type"] == "step":
            self.losses.append(event["loss"])
        elif event["type"] == "eval":
            self.eval_seconds += event["eval_seconds"]  # the trainer times its evaluations

    def run_to(self, steps):
        """Train on to ``steps`` optimizer steps in all (the Trainer goes on where it stopped)."""
        torch.set_rng_state(self.rng)
        with Meter(self.trainer.device) as meter:  # fit() scopes TF32 to the config's choice
            self.result = self.trainer.fit(max_steps=steps)
        self.rng = torch.get_rng_state()
        self.wall, self.cpu = self.wall + meter.wall, self.cpu + meter.cpu
        self.round_seconds.append(round(meter.wall, 3))
        self.peak_rss = max(self.peak_rss, meter.peak_rss)  # both paths' models are resident
        self.cuda_peak = max(self.cuda_peak, meter.cuda_peak or 0)

    def report(self, eval_iter):
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


def path_configs(args, device):
    """The chapter's and the fast path's TrainConfig, as the benchmark trains them."""
    common = dict(model=args.model, weights="random", batch_size=args.batch_size, max_steps=args.train_steps,
                  eval_freq=args.eval_freq, eval_iter=args.eval_iter, seed=args.seed, sample_each_epoch=False,
                  allowed_max_length=args.allowed_max_length, device=str(device))
    # Both on the chapter's evaluation schedule (eval_iter training batches too), so they draw the same batches;
    # the fast path's default, the train loss from the steps, is timed apart (``eval_modes``).
    return (TrainConfig.chapter_path(**common),
            TrainConfig(**common, group_by_length=False, precision=args.precision, train_loss_from_steps=False))


def eval_modes(trainer, repeats=2):
    """Seconds of one evaluation by ``trainer``, both ways: the chapter's schedule (eval_iter training and
    eval_iter validation batches) and the default (the train loss from the steps just computed: the
    validation batches alone)."""
    saved, cheap = trainer.since_eval, trainer.config.train_loss_from_steps
    trainer.config.train_loss_from_steps, out = True, {}
    for label, recent in (("chapter_schedule", []), ("train_loss_from_steps", [0.0])):
        with Meter(trainer.device) as meter:
            for _ in range(repeats):
                trainer.since_eval = list(recent)
                trainer.eval_metrics()
        out[label] = round(meter.wall / repeats, 4)
    trainer.since_eval, trainer.config.train_loss_from_steps = saved, cheap
    return out


def cheap_eval_loop(chapter, fast, per_eval, n_evals):
    """The whole loop with the fast path's default evaluation: its measured step seconds plus ``n_evals``
    evaluations at the measured cost of the cheaper one; against the chapter's whole loop (same tokens)."""
    loop = fast["seconds"] - fast["eval_seconds"] + n_evals * per_eval["train_loss_from_steps"]
    return {"train_eval_seconds_each": per_eval, "train_loop_seconds_cheap_eval": round(loop, 3),
            "train_eval_share_cheap_eval": round(n_evals * per_eval["train_loss_from_steps"] / loop, 3),
            "train_ratio_cheap_eval": round(chapter["seconds"] / loop, 3)}


def replay_for(args, splits, tokenizer):
    return BatchReplay(splits, tokenizer, batch_size=args.batch_size, seed=args.seed,
                       allowed_max_length=args.allowed_max_length, eval_iter=args.eval_iter)


def trained_batches(args, splits, tokenizer):
    """The training batches the paths see, in order (a replay of the Trainer's draws)."""
    replay, batches = replay_for(args, splits, tokenizer), []
    for step in range(args.train_steps):
        batches.append(replay.next_batch())
        if step % args.eval_freq == 0:
            replay.eval_batches()  # an evaluation's draws, as the Trainer makes them
    return batches


def _flops_and_mfu(report, label, model_cfg, batches, ceiling):
    """Each path's FLOPs (flops.train_step_flops), counted targets and MFU over its step seconds."""
    parts = sum_parts(train_step_flops(model_cfg, *b, label) for b in batches)
    step_seconds = report["seconds"] - report["eval_seconds"]
    targets = sum(int((b[1] != IGNORE_INDEX).sum()) for b in batches)
    best = (ceiling or {}).get(report["precision"], {}).get("best")
    report.update({"targets": targets, "target_tokens_per_s": round(targets / step_seconds, 2),
                   "flops": parts, "gflops_per_s": round(parts["total"] / step_seconds / 1e9, 1),
                   "ceiling_gflops": best, "mfu": mfu(parts["total"], step_seconds, best),
                   "eval_share": round(report["eval_seconds"] / report["seconds"], 3)})


def bench_training(args, model_cfg, init_state, splits, tokenizer, device, ceiling=None):
    """The chapter's, the fast and (with ``transformers``) Hugging Face's paths in one process,
    taking turns ``round_steps`` optimizer steps (and the evaluations due) at a time, so a slow
    spell of a shared machine falls on all rather than on one; each path sees the batches it
    would see alone (its own model copy and RNG state; HF's a ``BatchReplay`` of them)."""
    chapter_cfg, fast_cfg = path_configs(args, device)
    release_memory()
    paths = [_Path("chapter", chapter_cfg, model_cfg, init_state, splits, tokenizer, device),
             _Path("fast", fast_cfg, model_cfg, init_state, splits, tokenizer, device)]
    hf_missing = transformers_missing() if args.hf else "left out (--no-hf)"
    if hf_missing is None:
        model = GPTModel(model_cfg)
        model.load_state_dict(init_state)
        fast_trainer = paths[1].trainer
        paths.append(HFPath(model, replay_for(args, splits, tokenizer), device, precision=fast_trainer.precision,
                            lr=fast_cfg.lr, weight_decay=fast_cfg.weight_decay, eval_freq=args.eval_freq,
                            tf32_on=fast_cfg.tf32))
        del model
    for stop in range(args.round_steps, args.train_steps + args.round_steps, args.round_steps):
        for path in paths:
            if stop == args.round_steps or stop % args.eval_freq == 0 or stop >= args.train_steps:
                log(f"training, {path.label} path ({path.precision}), to step {min(stop, args.train_steps)}")
            path.run_to(min(stop, args.train_steps))
    reports = {p.label: p.report(args.eval_iter) for p in paths}
    batches = trained_batches(args, splits, tokenizer)
    for label, report in reports.items():
        _flops_and_mfu(report, label, model_cfg, batches, ceiling)
    profile = None
    if args.profile:
        log("profiling one more training step of each path (torch.profiler)")
        profile = profile_steps(paths, batches[0], model_cfg["vocab_size"], device)
    chapter, fast = reports["chapter"], reports["fast"]
    last_c, last_f = chapter["losses"][-1], fast["losses"][-1]
    log("timing one evaluation of the fast path both ways (chapter's schedule; train loss from the steps)")
    cheap = cheap_eval_loop(chapter, fast, eval_modes(paths[1].trainer), len(fast["val_losses"]))
    out = {
        "train": reports,
        "train_tokens_per_s": {k: r["tokens_per_s"] for k, r in reports.items()},
        "train_target_tokens_per_s": {k: r["target_tokens_per_s"] for k, r in reports.items()},
        "train_ratio": round(fast["tokens_per_s"] / chapter["tokens_per_s"], 3),
        "train_ratio_cpu": round(chapter["cpu_seconds"] / fast["cpu_seconds"], 3),
        "train_step_ratio": round(fast["step_tokens_per_s"] / chapter["step_tokens_per_s"], 3),
        # Each round's chapter/fast time ratio (same batches, same moment): robust to slow spells.
        "train_round_ratio_median": round(statistics.median(
            c / f for c, f in zip(chapter["round_seconds"], fast["round_seconds"])), 3),
        "train_mfu": fast["mfu"],
        "train_mfu_by_path": {k: r["mfu"] for k, r in reports.items()},
        "train_eval_share": {k: r["eval_share"] for k, r in reports.items()},
        "same_batches": len({r["tokens"] for r in reports.values()} | {sum(b[0].numel() for b in batches)}) == 1,
        "losses": {k: r["losses"] for k, r in reports.items()},
        "loss_rel_diff_last": round(abs(last_f - last_c) / abs(last_c), 6),
        "val_loss_after_rel_diff": round(abs(fast["val_loss_after"] - chapter["val_loss_after"])
                                         / abs(chapter["val_loss_after"]), 6),
        "train_ratio_vs_hf": None, "train_loop_ratio_vs_hf": None, "hf_missing": hf_missing, **cheap,
    }
    if profile is not None:
        out["train_profile_ms"] = profile
    if "hf" in reports:
        hf = reports["hf"]
        out.update({
            # The training target: optimizer steps (HF has no evaluation of its own to speak of).
            "train_ratio_vs_hf": round(fast["step_tokens_per_s"] / hf["step_tokens_per_s"], 3),
            "train_loop_ratio_vs_hf": round(fast["tokens_per_s"] / hf["tokens_per_s"], 3),
            "train_round_ratio_median_vs_hf": round(statistics.median(
                h / f for h, f in zip(hf["round_seconds"], fast["round_seconds"])), 3),
            "hf_step0_loss_rel_diff": round(abs(hf["losses"][0] - chapter["losses"][0]) / abs(chapter["losses"][0]),
                                            8),
            "loss_rel_diff_last_hf": round(abs(hf["losses"][-1] - last_c) / abs(last_c), 6),
        })
    return out
