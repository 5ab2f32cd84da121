"""``python -m sft dpo``: preference-tune a model with DPO into a run folder (flags generated from ``DPOConfig``).

    python -m sft dpo --from-run runs/NAME            policy and reference start from that run's weights
    python -m sft dpo --model tiny --max-steps 10     or from GPT-2 weights (here the tiny random model)
    python -m sft dpo --run-dir runs/DPO --resume     continue a stopped DPO run

The run trains exactly as ``train``'s do (the same worker, checkpoints, stop and resume; under
torchrun: ``torchrun ... -m sft train --run-dir runs/DPO`` once the run folder exists).
"""
import argparse
import sys
from pathlib import Path

from ..studio.config import ConfigError
from ..studio.dpo_config import DPOConfig
from .settings import add_config_arguments, given_settings
from .train import add_run_arguments

RUN_FLAGS = ("runs_root", "name", "run_dir", "resume", "no_responses", "detach", "queue", "progress")


def add_arguments(p):
    add_config_arguments(p, DPOConfig)
    add_run_arguments(p)


def _dpo_run(args):
    """The run folder to train: --run-dir's existing DPO run, or a new one from the flags."""
    from ..studio.runs import Run

    existing = Path(args.run_dir) if args.run_dir else None
    if existing is not None and (existing / "config.json").is_file():
        given = given_settings(args, DPOConfig)
        if given or args.chapter_path:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given) or "--chapter-path"
            raise ConfigError([f"{args.run_dir} already has its settings (config.json): drop {flags}, or "
                               "create a new run"])
        run = Run(existing)
        if getattr(run.config, "kind", "sft") != "dpo":
            raise ConfigError([f"{args.run_dir} is an instruction fine-tuning run, not a DPO run: pass it as "
                               "--from-run to preference-tune its model"])
        return run
    if args.resume:
        raise ConfigError(["--resume needs --run-dir of an existing DPO run"])
    config = DPOConfig.from_settings(given_settings(args, DPOConfig), chapter_path=args.chapter_path)
    if existing is not None:
        return Run.create(config, root=existing.parent, name=existing.name)
    return Run.create(config, root=args.runs_root, name=args.name)


def run(args):
    from ..studio.dpo_trainer import describe_start
    from . import train

    dpo_run = _dpo_run(args)
    config = dpo_run.config
    print(f"DPO: beta {config.beta:g}, policy and frozen reference start {describe_start(config)}; the "
          "reference's log-probabilities are computed once per pair and cached in the run")
    # The run has its settings now: train it exactly as `train --run-dir` does (worker, progress, stop).
    plain = argparse.Namespace(**{k: getattr(args, k) for k in RUN_FLAGS}, chapter_path=False)
    plain.run_dir = str(dpo_run.path)
    sys.stdout.flush()
    return train.run(plain)
