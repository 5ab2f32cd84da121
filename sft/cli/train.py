"""``python -m sft train``: fine-tune a model into a run folder (flags generated from ``TrainConfig``)."""
import signal
import sys
import traceback
from pathlib import Path

from ..studio.config import ConfigError, TrainConfig, TrainingError
from .settings import add_config_arguments, given_settings


def add_arguments(p):
    add_config_arguments(p, TrainConfig)
    add_run_arguments(p)


def add_run_arguments(p):
    """The flags of how to run (not settings of the run); ``dpo`` has them too."""
    g = p.add_argument_group("how to run")
    g.add_argument("--chapter-path", action="store_true",
                   help="compute exactly as the chapter: fp32, the book's module bodies, full output head, no "
                        "TF32/fused kernels (a flag contradicting this is an error)")
    g.add_argument("--runs-root", default="runs", help="folder holding run folders")
    g.add_argument("--name", default=None, help="run name (default: date-time and model)")
    g.add_argument("--run-dir", default=None, help="use this run folder; if it has a config.json, its "
                                                   "settings are used (giving settings too is an error)")
    g.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    g.add_argument("--no-responses", action="store_true", help="skip answering the test split at the end")
    g.add_argument("--detach", action="store_true", help="train in a background worker and return at once")
    g.add_argument("--queue", action="store_true", help="queue the run after the device's current training "
                                                       "(it starts by itself when the device is free)")
    g.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                   help="progress display: tqdm bars, plain lines (logs), or nothing")


def config_from_args(args):
    """The TrainConfig the flags ask for: what was given, the model's preset, then the defaults."""
    return TrainConfig.from_settings(given_settings(args, TrainConfig), chapter_path=args.chapter_path)


class Progress:
    """Draws Trainer events: tqdm bars, or plain lines for log files."""

    def __init__(self, mode):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode, self.bar, self.answers = mode, None, None

    def _print(self, text):
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, e):
        kind = e["type"]
        if kind == "step" and self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=e["total_steps"], initial=e["step"], desc="Training", unit="step")
            self.bar.update(e["step"] + 1 - self.bar.n)
            self.bar.set_postfix(loss=f"{e['loss']:.3f}" if e["loss"] is not None else "nan", epoch=e["epoch"],
                                 tok_s=f"{e['tokens_per_s']:.0f}" if e.get("tokens_per_s") else "-")
        elif kind == "eval":
            fmt = lambda x: "nan" if x is None else f"{x:.3f}"  # noqa: E731
            margins = (f", Train reward margins {fmt(e['train_margin'])}, Val reward margins {fmt(e['val_margin'])}"
                       if "train_margin" in e else "")  # a DPO run's, as the DPO notebook prints them
            self._print(f"Ep {e['epoch']} (Step {e['step']:06d}): Train loss {fmt(e['train_loss'])}, "
                        f"Val loss {fmt(e['val_loss'])}{margins}")
        elif kind == "sample":
            self._print(f"Sample answer (epoch {e['epoch']}): {e['response']!r}")
        elif kind == "checkpoint":
            self._print(f"Checkpoint saved ({e['reason']}): {e['path']}")
        elif kind == "stopped":
            self._print(f"Stopped at step {e['step']}; resume with --resume")
        elif kind == "done":
            self.close()
            speed = f", {e['tokens_per_s']:,.0f} tokens/s" if e.get("tokens_per_s") else ""
            self._print(f"Training done: {e['step'] + 1} steps in {e['elapsed'] / 60:.2f} minutes{speed}")
        elif kind == "error":
            self.close()
            self._print(f"Error: {e['error']}" + "".join(f"\n  try: {a}" for a in e.get("advice") or []))
        elif kind == "responses":
            if self.mode == "bar":
                if self.answers is None:
                    from tqdm import tqdm

                    self.answers = tqdm(total=e["total"], desc="Answering test split", unit="entry")
                self.answers.update(e["done"] - self.answers.n)
            elif self.mode == "plain":
                print(f"Answered {e['done']}/{e['total']} test entries", flush=True)

    def close(self):
        for bar in (self.bar, self.answers):
            if bar is not None:
                bar.close()
        self.bar = self.answers = None


def _existing_config(args):
    """--run-dir's config.json where that run exists already, else None."""
    path = Path(args.run_dir) / "config.json" if args.run_dir else None
    return path if path is not None and path.is_file() else None


def _open_run(args):
    """The run the train command works on: --run-dir's (if it has a config) or a new one."""
    from ..studio.runs import Run

    if _existing_config(args):
        given = given_settings(args, TrainConfig)
        if given or args.chapter_path:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given) or "--chapter-path"
            raise ConfigError([f"{args.run_dir} already has its settings (config.json): drop {flags}, or "
                               "create a new run"])
        return Run(args.run_dir)
    if args.resume:
        raise ValueError("--resume needs --run-dir of an existing run")
    config = config_from_args(args)
    if args.run_dir:
        return Run.create(config, root=Path(args.run_dir).parent, name=Path(args.run_dir).name)
    return Run.create(config, root=args.runs_root, name=args.name)


def _describe(run, world_size=1):
    from ..model import canonical_model_name

    config = run.config
    print(f"Run folder: {run.path}")
    if config.weights == "random":
        print(f"Model: {canonical_model_name(config.model)} with RANDOM weights (a demo/test model, not pretrained "
              "GPT-2: its answers are gibberish)")
    else:
        print(f"Model: {config.model}, {config.weights} weights from {config.models_dir}/")
    if config.lora_rank:
        from ..studio.adapters import lora_counts

        trainable, total, share = lora_counts(config.model, config.lora_rank, config.lora_target_list())
        print(f"Method: LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g}, on {config.lora_targets}: "
              f"{trainable:,} trainable of {total:,} parameters ({share:.2%}); the base stays frozen")
    if world_size > 1:
        per, how = config.batch_size // world_size, config.strategy.upper()
        print(f"{how}: {world_size} processes; each batch of {config.batch_size} is split {per}-{per + 1} rows "
              "per process" if config.batch_size % world_size else
              f"{how}: {world_size} processes; each batch of {config.batch_size} is split {per} rows per process")
        if config.strategy == "fsdp":
            print(f"FSDP: each process keeps 1/{world_size} of the weights, gradients and AdamW state between steps")


def run(args):
    from ..studio.distributed import launched_by_torchrun
    from ..studio.locks import DeviceBusyError
    from ..studio.runs import RunError
    from ..studio.worker import execute_run, launch_worker

    if launched_by_torchrun():
        return _train_distributed(args)
    if args.resume and not _existing_config(args):
        print("error: --resume needs --run-dir of an existing run", file=sys.stderr)
        return 2
    run = _open_run(args)
    _describe(run)
    if args.queue:
        from ..studio.queue import enqueue

        place = enqueue(run, resume=args.resume)
        print(f"Queued: number {place} in line for {run.status().get('device')}; `python -m sft queue list` "
              "shows the line")
        return 0
    if args.detach:
        proc = launch_worker(run, resume=args.resume, responses=not args.no_responses)
        print(f"Training in the background (pid {proc.pid}); log: {run.log_path}")
        return 0
    progress = Progress(args.progress)
    previous = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum, frame):  # first Ctrl-C: checkpoint and stop; second: abort
        signal.signal(signal.SIGINT, previous)
        print("\nStopping after this step (Ctrl-C again to abort)...", file=sys.stderr)
        run.request_stop()

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        result = execute_run(run, resume=args.resume, responses=not args.no_responses, callbacks=[progress])
    except Exception as exc:
        progress.close()
        if not isinstance(exc, (OSError, ValueError, RunError, TrainingError, DeviceBusyError)):
            traceback.print_exc()  # a bug, not a setting: keep the details for the log
        print(f"error: {exc}", file=sys.stderr)
        print(f"Run state: {run.state} (details in {run.status_path})", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    print(f"Run state: {run.state}. Files: {run.path}")
    return 0 if result["state"] in ("completed", "stopped") else 1


def _train_distributed(args):
    """``torchrun --nproc_per_node N -m sft train ...``: one rank of a DDP training.

    Rank 0 creates (or opens) the run folder and tells the others where it is; every rank
    trains its share of each batch; rank 0 alone prints, writes and answers the test split.
    Each process ends in ``sft.studio.distributed.shutdown`` (it never returns).
    """
    import torch.distributed as dist

    from ..studio.distributed import init_from_env, shutdown
    from ..studio.dpo_config import load_config
    from ..studio.runs import Run
    from ..studio.worker import execute_run

    code = 1
    try:
        if args.detach:
            raise ValueError("--detach cannot be used under torchrun")
        existing = _existing_config(args)
        config = load_config(existing) if existing else config_from_args(args)
        ctx = init_from_env(config.validate().device)
        box = [None]
        if ctx.is_main:
            try:
                box = [("ok", str(_open_run(args).path))]
            except Exception as exc:  # tell the other ranks instead of leaving them waiting
                box = [("error", f"{type(exc).__name__}: {exc}")]
        dist.broadcast_object_list(box, src=0)
        status, detail = box[0]
        if status == "error":
            raise RuntimeError(detail)
        run = Run(detail)
        progress = Progress(args.progress if ctx.is_main else "none")
        if ctx.is_main:
            _describe(run, ctx.world_size)
            signal.signal(signal.SIGINT, lambda signum, frame: run.request_stop())
        else:  # rank 0 turns Ctrl-C into a stop that every rank agrees on
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        result = execute_run(run, resume=args.resume, responses=not args.no_responses, callbacks=[progress],
                             dist=ctx)
        progress.close()
        if ctx.is_main:
            print(f"Run state: {run.state}. Files: {run.path}")
        code = 0 if result["state"] in ("completed", "stopped") else 1
    except Exception as exc:
        traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
    shutdown(code)
