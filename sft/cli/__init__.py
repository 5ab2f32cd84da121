"""``python -m sft``: the chapter's pipeline from the command line (not in the book).

    python -m sft data [FILE]          check a dataset and write its train/test/val split
    python -m sft download             fetch GPT-2 weights
    python -m sft train                fine-tune; writes a run folder under runs/
    python -m sft dpo --from-run R     preference-tune a finished run's model with DPO (a new run folder)
    python -m sft generate             answer a split (or a JSON file) with a fine-tuned run
    python -m sft judge FILE           score answers with a judge model served by Ollama
    python -m sft export --run-dir R   the model for transformers, llama.cpp and Ollama
    python -m sft merge --run-dir R    a LoRA run's adapters folded into its base weights
    python -m sft runs list            the run folders (delete, rename too)
    python -m sft experiment chapter-exercises   the exercises' runs queued, summarised beside the book
    python -m sft job --dir FOLDER     a background job the app started (sft.studio.jobs)

Each command is a module here with ``add_arguments(parser)`` and ``run(args) -> exit code``,
listed once in ``_COMMANDS``; its ``--help`` lists its options with their defaults (the
chapter's). ``train``'s flags are generated from ``TrainConfig``'s fields.
"""
import argparse
import sys
from importlib import import_module

# name -> (module, its add-arguments function, its run function); imported only when used.
_COMMANDS = {
    "data": ("commands", "add_data_arguments", "run_data"),
    "download": ("commands", "add_download_arguments", "run_download"),
    "train": ("train", "add_arguments", "run"),
    "dpo": ("dpo", "add_arguments", "run"),
    "generate": ("commands", "add_generate_arguments", "run_generate"),
    "judge": ("judge", "add_arguments", "run"),
    "export": ("export", "add_arguments", "run"),
    "merge": ("export", "add_merge_arguments", "run_merge"),
    "queue": ("queue", "add_arguments", "run"),
    "runs": ("runs", "add_arguments", "run"),
    "experiment": ("experiment", "add_arguments", "run"),
    "job": ("job", "add_arguments", "run"),
}
COMMANDS = {
    "data": "check a dataset (JSON or JSONL), summarise it and write its train/test/val split",
    "download": "download GPT-2 weights (OpenAI's checkpoint, as the book does, or Hugging Face's)",
    "train": "fine-tune a model; writes a run folder (config, metrics, log, checkpoint, answers)",
    "dpo": "preference-tune with DPO from a finished run (or GPT-2 weights) on chosen/rejected pairs; a run folder",
    "generate": "answer the test split (or a JSON file) with a run's fine-tuned model or a base model",
    "judge": "score answers against the references with a judge model (Ollama or OpenAI-compatible)",
    "export": "export a run's model for transformers (Hugging Face folder) and llama.cpp / Ollama (GGUF, Modelfile)",
    "merge": "write a LoRA run's merged weights (base + adapters, a plain GPTModel) as a .pth file",
    "queue": "runs waiting their turn for a device: list, add, remove, move",
    "runs": "the run folders: list them, delete one, rename one",
    "experiment": "the chapter's exercises as one experiment: queued, trained, scored, beside the book's figures",
    "job": "do a background job the app started (answer a split, score answers): its folder's job.json",
}
EPILOG = """examples:
  python -m sft train                               the chapter: gpt2-medium, 2 epochs (downloads weights)
  python -m sft train --model tiny --max-steps 20   a tiny RANDOM model: offline demo in seconds
  python -m sft train --resume --run-dir runs/NAME  continue a stopped run
  python -m sft train --lora-rank 16 --lora-alpha 16  LoRA (exercise 7.4): adapters on every Linear
  python -m sft dpo --from-run runs/NAME            DPO on the book's preference pairs, from that run's model
  python -m sft merge --run-dir runs/NAME           a LoRA run's adapters merged into its base weights
  python -m sft generate --run-dir runs/NAME        answer the test split
  python -m sft export --run-dir runs/NAME --gguf-dtypes f32,q8_0   Hugging Face folder, GGUF, Modelfile
  torchrun --nproc_per_node 2 -m sft train ...      data parallel (DDP, gloo on CPU, NCCL on GPU): each
                                                    batch of --batch-size is split over the processes
  python -m sft.bench                               the chapter's way against the fast path (timings)
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each default, except where there is none to show or the help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _command(name):
    module, add_name, run_name = _COMMANDS[name]
    mod = import_module(f"{__name__}.{module}")
    return getattr(mod, add_name), getattr(mod, run_name)


def _first_command(argv):
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def build_parser(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sft", description="SFT Studio: instruction fine-tuning of GPT-2, as in chapter 7 of "
        "Build a Large Language Model (From Scratch).", epilog=EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _first_command(argv)
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if wanted in (name, None) or wanted not in COMMANDS:  # only the command asked for imports its module
            _command(name)[0](p)
    return parser


def main(argv=None):
    args = build_parser(argv).parse_args(argv)
    _, run = _command(args.command)
    from ..studio.config import ConfigError

    try:
        return run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
