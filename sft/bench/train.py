"""Not in the book: training, the chapter's path against the fast path, taking turns on the same batches."""
import statistics

import torch

from ..batching import create_data_loaders
from ..model import GPTModel
from ..studio.config import TrainConfig
from ..studio.trainer import Trainer
from ..training import calc_loss_loader
from .measure import Meter, log, release_memory


class _Path:
    """One training path: its own model copy, loaders, Trainer and torch RNG state."""

    def __init__(self, label, config, model_cfg, init_state, splits, tokenizer, device):
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
        self.trainer.callbacks.append(self._on_event)
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


def bench_training(args, model_cfg, init_state, splits, tokenizer, device):
    """Both paths in one process, taking turns ``round_steps`` optimizer steps (and the
    evaluations due) at a time, so a slow spell of a shared machine falls on both rather than on
    one; each path sees the batches it would see alone (its own model copy and RNG state)."""
    common = dict(model=args.model, weights="random", batch_size=args.batch_size, max_steps=args.train_steps,
                  eval_freq=args.eval_freq, eval_iter=args.eval_iter, seed=args.seed, sample_each_epoch=False,
                  allowed_max_length=args.allowed_max_length, device=str(device))
    release_memory()
    paths = [_Path("chapter", TrainConfig.chapter_path(**common), model_cfg, init_state, splits, tokenizer, device),
             _Path("fast", TrainConfig(**common, group_by_length=False), model_cfg, init_state, splits, tokenizer,
                   device)]
    for stop in range(args.round_steps, args.train_steps + args.round_steps, args.round_steps):
        for path in paths:
            if stop == args.round_steps or stop % args.eval_freq == 0 or stop >= args.train_steps:
                log(f"training, {path.label} path ({path.trainer.precision}), to step {min(stop, args.train_steps)}")
            path.run_to(min(stop, args.train_steps))
    chapter, fast = (path.report(args.eval_iter) for path in paths)
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


