"""``python -m sft``: the chapter's pipeline from the command line (not in the book).

    python -m sft data [FILE]          check a dataset and write its train/test/val split
    python -m sft download             fetch GPT-2 weights
    python -m sft train                fine-tune; writes a run folder under runs/
    python -m sft generate             answer a split (or a JSON file) with a fine-tuned run
    python -m sft judge FILE           score answers with a judge model served by Ollama

Each command's ``--help`` lists its options with their defaults (the chapter's).
"""
import argparse
import json
import signal
import sys
import traceback
from pathlib import Path

COMMANDS = {
    "data": "check a dataset (JSON or JSONL), summarise it and write its train/test/val split",
    "download": "download GPT-2 weights (OpenAI's checkpoint, as the book does, or Hugging Face's)",
    "train": "fine-tune a model; writes a run folder (config, metrics, log, checkpoint, answers)",
    "generate": "answer the test split (or a JSON file) with a run's fine-tuned model or a base model",
    "judge": "score answers against the references with a judge model (Ollama or OpenAI-compatible)",
}
EPILOG = """examples:
  python -m sft train                               the chapter: gpt2-medium, 2 epochs (downloads weights)
  python -m sft train --model tiny --max-steps 20   a tiny RANDOM model: offline demo in seconds
  python -m sft train --resume --run-dir runs/NAME  continue a stopped run
  python -m sft generate --run-dir runs/NAME        answer the test split
  torchrun --nproc_per_node 2 -m sft train ...      data parallel (DDP, gloo on CPU, NCCL on GPU): each
                                                    batch of --batch-size is split over the processes
  python -m sft.bench                               the chapter's way against the fast path (timings)
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each default, except where there is none to show or the help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _model_names():
    from .model import MODEL_NAMES

    return MODEL_NAMES


def _add_train_arguments(p):
    from .config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help=f"model to fine-tune: one of {_model_names()} (also '124M', 'gpt2-small', ...). "
                        "'tiny' is a small RANDOMLY initialised model for offline demos and tests")
    g.add_argument("--weights", choices=("openai", "hf", "random"), default=None,
                   help="where the starting weights come from: OpenAI's TensorFlow checkpoint (the book), "
                        "Hugging Face safetensors (no TensorFlow needed) or random (any size, offline: for "
                        "benchmarks; such runs are labelled RANDOM). Default: openai, random for tiny")
    g.add_argument("--models-dir", default=d.models_dir, help="folder holding downloaded GPT-2 weights")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="dataset path or URL (JSON/JSONL); default: the chapter's "
                                                   "bundled 1100 entries")
    g.add_argument("--limit", type=int, default=d.limit, help="use only the first N entries (quick runs)")
    g.add_argument("--prompt-style", choices=("alpaca", "phi3"), default=d.prompt_style,
                   help="prompt template (alpaca: the chapter; phi3: exercise 7.1)")
    g.add_argument("--allowed-max-length", type=int, default=d.allowed_max_length,
                   help="truncate examples to this many tokens")
    g.add_argument("--mask-instruction", action="store_true", help="exercise 7.2: no loss on prompt tokens")
    g.add_argument("--group-by-length", action="store_true", help="batch similar lengths together "
                                                                  "(less padding; not the chapter's order)")
    g = p.add_argument_group("optimisation (defaults are the chapter's)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per batch")
    g.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                   help="gradient accumulation: micro-batches of --batch-size per optimizer step, so the "
                        "effective batch is batch-size x N in the memory of one micro-batch (e.g. "
                        "--batch-size 2 --grad-accum-steps 4 steps on 8 examples, as the chapter; for "
                        "gpt2-large/xl on smaller GPUs)")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after N optimizer steps")
    g.add_argument("--eval-freq", type=int, default=d.eval_freq, help="evaluate every N steps")
    g.add_argument("--eval-iter", type=int, default=d.eval_iter, help="batches per evaluation")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (data order, random weights)")
    g = p.add_argument_group("speed and hardware")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto = bf16 autocast where the hardware does bf16 well, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="activation checkpointing: recompute each block's activations in backward "
                        "(much less memory, ~30%% slower; for gpt2-large/xl on smaller GPUs)")
    g.add_argument("--chapter-path", action="store_true",
                   help="compute exactly as the chapter: fp32, full output head, no TF32/fused kernels")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="also checkpoint every N steps (always at each epoch end and on stop)")
    g = p.add_argument_group("run folder")
    g.add_argument("--runs-root", default="runs", help="folder holding run folders")
    g.add_argument("--name", default=None, help="run name (default: date-time and model)")
    g.add_argument("--run-dir", default=None, help="use this run folder; if it has a config.json, its "
                                                   "settings are used and the flags above are ignored")
    g.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    g.add_argument("--no-responses", action="store_true", help="skip answering the test split at the end")
    g.add_argument("--response-tokens", type=int, default=d.response_tokens,
                   help="max new tokens per test answer")
    g.add_argument("--detach", action="store_true", help="train in a background worker and return at once")
    g.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                   help="progress display: tqdm bars, plain lines (logs), or nothing")


def build_parser(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sft", description="SFT Studio: instruction fine-tuning of GPT-2, as in chapter 7 of "
        "Build a Large Language Model (From Scratch).", epilog=EPILOG, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs = {name: sub.add_parser(name, help=text, description=text, formatter_class=_Help)
            for name, text in COMMANDS.items()}

    p = subs["data"]
    p.add_argument("source", nargs="?", default=None, help="JSON/JSONL file or URL (default: the bundled "
                                                           "1100 entries)")
    p.add_argument("--out-dir", default=None, help="write train.json, test.json and val.json here")
    p.add_argument("--limit", type=int, default=None, help="use only the first N entries")
    p.add_argument("--prompt-style", choices=("alpaca", "phi3"), default="alpaca", help="for token counts")
    p.add_argument("--allowed-max-length", type=int, default=1024, help="count entries longer than this")

    p = subs["download"]
    p.add_argument("--model", default="gpt2-medium (355M)", help=f"one of {_model_names()[:-1]}")
    p.add_argument("--source", choices=("openai", "hf"), default="openai",
                   help="openai: the book's TensorFlow checkpoint (needs tensorflow to read); "
                        "hf: Hugging Face safetensors")
    p.add_argument("--models-dir", default="models", help="download folder")

    _add_train_arguments(subs["train"])

    p = subs["generate"]
    p.add_argument("--run-dir", default=None, help="a run folder: uses its final weights (or last checkpoint)")
    p.add_argument("--model", default=None, help="or a base model by name (no fine-tuning)")
    p.add_argument("--weights", choices=("openai", "hf", "random"), default=None,
                   help="with --model: where its weights come from (default openai, random for tiny)")
    p.add_argument("--models-dir", default="models", help="with --model: downloaded weights folder")
    p.add_argument("--input", default=None, help="JSON file of entries to answer (default: the run's split)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which split to answer")
    p.add_argument("--data", default=None, help="dataset for --split when there is no run (default: bundled)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N entries")
    p.add_argument("--out", default=None, help="output JSON (default: the run's "
                                               "instruction-data-with-response.json for the test split)")
    p.add_argument("--prompt-style", choices=("alpaca", "phi3"), default=None, help="default: the run's")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--batch-size", type=int, default=8, help="prompts answered at once")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")

    p = subs["judge"]
    if _first_command(argv) == "judge":  # judge's own arguments; imported only when used
        from .judge import add_cli_arguments

        add_cli_arguments(p)
    return parser


def _first_command(argv):
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


# ============================================================================ train

def _config_from_args(args):
    from .config import TrainConfig

    weights = args.weights or ("random" if str(args.model).strip().lower().startswith("tiny") else "openai")
    settings = dict(
        model=args.model, weights=weights, models_dir=args.models_dir, data=args.data, limit=args.limit,
        prompt_style=args.prompt_style, allowed_max_length=args.allowed_max_length,
        mask_instruction=args.mask_instruction, group_by_length=args.group_by_length, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps, max_steps=args.max_steps, eval_freq=args.eval_freq,
        eval_iter=args.eval_iter, seed=args.seed, device=args.device, precision=args.precision,
        compile=args.compile, activation_checkpointing=args.activation_checkpointing,
        checkpoint_every=args.checkpoint_every, response_tokens=args.response_tokens)
    if args.chapter_path:
        settings.pop("group_by_length"), settings.pop("precision"), settings.pop("grad_accum_steps")
        return TrainConfig.chapter_path(**settings)
    return TrainConfig(**settings)


class _Progress:
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
            self._print(f"Ep {e['epoch']} (Step {e['step']:06d}): Train loss {fmt(e['train_loss'])}, "
                        f"Val loss {fmt(e['val_loss'])}")
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
            self._print(f"Error: {e['error']}" + "".join(f"\n  try: {a}" for a in e.get("advice", [])))
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
    from .runs import Run

    if _existing_config(args):
        return Run(args.run_dir)
    if args.resume:
        raise ValueError("--resume needs --run-dir of an existing run")
    config = _config_from_args(args)
    if args.run_dir:
        return Run.create(config, root=Path(args.run_dir).parent, name=Path(args.run_dir).name)
    return Run.create(config, root=args.runs_root, name=args.name)


def _describe(run, world_size=1):
    from .runs import canonical_model_name

    config = run.config
    print(f"Run folder: {run.path}")
    if config.weights == "random":
        print(f"Model: {canonical_model_name(config.model)} with RANDOM weights (a demo/test model, not pretrained "
              "GPT-2: its answers are gibberish)")
    else:
        print(f"Model: {config.model}, {config.weights} weights from {config.models_dir}/")
    if world_size > 1:
        per = config.batch_size // world_size
        print(f"DDP: {world_size} processes; each batch of {config.batch_size} is split {per}-{per + 1} rows "
              "per process" if config.batch_size % world_size else
              f"DDP: {world_size} processes; each batch of {config.batch_size} is split {per} rows per process")


def cmd_train(args):
    from .config import TrainingError
    from .distributed import launched_by_torchrun
    from .runs import RunError
    from .worker import execute_run

    if launched_by_torchrun():
        return _train_distributed(args)
    if args.resume and not _existing_config(args):
        print("error: --resume needs --run-dir of an existing run", file=sys.stderr)
        return 2
    run = _open_run(args)
    _describe(run)
    if args.detach:
        proc = run.launch(resume=args.resume, responses=not args.no_responses)
        print(f"Training in the background (pid {proc.pid}); log: {run.log_path}")
        return 0
    progress = _Progress(args.progress)
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
        if not isinstance(exc, (OSError, ValueError, RunError, TrainingError)):
            traceback.print_exc()  # a bug, not a setting: keep the details for the log
        print(f"error: {exc}", file=sys.stderr)
        print(f"Run state: failed (details in {run.status_path})", file=sys.stderr)
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
    Each process ends in ``sft.distributed.shutdown`` (it never returns).
    """
    import torch.distributed as dist

    from .config import TrainConfig
    from .distributed import init_from_env, shutdown
    from .runs import Run
    from .worker import execute_run

    code = 1
    try:
        if args.detach:
            raise ValueError("--detach cannot be used under torchrun")
        existing = _existing_config(args)
        config = TrainConfig.load(existing) if existing else _config_from_args(args)
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
        progress = _Progress(args.progress if ctx.is_main else "none")
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


# ============================================================================ other commands

def cmd_data(args):
    from .data import DataValidationError, length_stats, load_instruction_data, split_data
    from .runs import atomic_write_json
    from .tokenizer import get_tokenizer

    try:
        data = load_instruction_data(args.source)
    except (DataValidationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.limit is not None:
        data = data[:args.limit]
    train, test, val = split_data(data)
    stats = length_stats(data, get_tokenizer(), args.prompt_style,
                         allowed_max_length=args.allowed_max_length)["summary"]
    print(f"Source: {args.source or 'bundled chapter data'}: {len(data)} valid entries")
    print(f"Split: train {len(train)}, test {len(test)}, val {len(val)}")
    if stats["count"]:
        print(f"Tokens per example ({args.prompt_style}): min {stats['min']}, median {stats['median']:g}, "
              f"mean {stats['mean']:.1f}, max {stats['max']}; longer than {args.allowed_max_length}: "
              f"{stats['over_max_length']}")
    if args.out_dir:
        for name, part in (("train", train), ("test", test), ("val", val)):
            atomic_write_json(Path(args.out_dir) / f"{name}.json", part)
        print(f"Wrote train.json, test.json, val.json to {args.out_dir}")
    return 0


def cmd_download(args):
    from .weights import load_pretrained, weights_available

    if str(args.model).strip().lower().startswith("tiny"):
        print("The tiny model has random weights: nothing to download.")
        return 0
    try:
        load_pretrained(args.model, args.models_dir, source=args.source)
    except Exception as exc:  # offline, missing tensorflow, bad files: the message says what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model} ({args.source}) is ready in {args.models_dir}/: "
          f"{weights_available(args.model, args.models_dir, source=args.source)}")
    return 0


def _model_for_generate(args):
    """(model, prompt_style, run) for the generate command."""
    import torch

    from .config import TrainConfig
    from .runs import Run, load_checkpoint
    from .worker import build_model

    if args.run_dir:
        run = Run(args.run_dir)
        config = run.config
        if run.model_path.is_file():
            from .finetuned import load_finetuned

            return load_finetuned(run.model_path), config.prompt_style, run
        if run.has_checkpoint:
            from .model import GPTModel, model_config

            model = GPTModel(model_config(config.model))
            model.load_state_dict(load_checkpoint(run.checkpoint_path)["model"])
            return model.eval(), config.prompt_style, run
        raise FileNotFoundError(f"run {run.path} has neither final weights nor a checkpoint yet")
    if not args.model:
        raise ValueError("give --run-dir (a fine-tuned run) or --model (a base model)")
    weights = args.weights or ("random" if args.model.strip().lower().startswith("tiny") else "openai")
    config = TrainConfig(model=args.model, weights=weights, models_dir=args.models_dir).validate()
    with torch.random.fork_rng(devices=[]):
        return build_model(config).eval(), "alpaca", None


def cmd_generate(args):
    from .generation import generate_responses
    from .hardware import resolve_device
    from .runs import read_json
    from .worker import load_splits
    from .tokenizer import get_tokenizer
    from .config import TrainConfig

    try:
        model, style, run = _model_for_generate(args)
        if args.input:
            with open(args.input, encoding="utf-8") as f:
                entries = json.load(f)
            if not isinstance(entries, list):
                raise ValueError(f"{args.input}: expected a JSON array of entries")
        elif run is not None and args.split == "test" and run.test_data_path.is_file():
            entries = read_json(run.test_data_path)
        else:
            config = run.config if run is not None else TrainConfig(data=args.data)
            train, test, val = load_splits(config)
            entries = {"train": train, "test": test, "val": val}[args.split]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.limit is not None:
        entries = entries[:args.limit]
    out = args.out
    if out is None:
        out = run.responses_path if (run is not None and args.split == "test" and not args.input) \
            else Path(f"{args.split if not args.input else Path(args.input).stem}-responses.json")
    from tqdm import tqdm

    device = resolve_device(args.device)
    with tqdm(total=len(entries), desc="Answering", unit="entry", disable=not sys.stderr.isatty()) as bar:
        generate_responses(model.to(device), entries, get_tokenizer(), prompt_style=args.prompt_style or style,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                           progress=lambda done, total: bar.update(done - bar.n), out_path=out)
    print(f"Wrote {len(entries)} answers to {out}")
    return 0


def cmd_judge(args):
    from .judge import cli_main

    return cli_main(args)


def main(argv=None):
    args = build_parser(argv).parse_args(argv)
    handler = {"data": cmd_data, "download": cmd_download, "train": cmd_train,
               "generate": cmd_generate, "judge": cmd_judge}[args.command]
    try:
        return handler(args)
    except Exception as exc:
        from .config import ConfigError

        if isinstance(exc, ConfigError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
