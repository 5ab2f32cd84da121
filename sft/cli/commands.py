"""``python -m sft data``, ``download`` and ``generate``: the pipeline's other steps."""
import json
import sys
from pathlib import Path

from ..model import MODEL_NAMES, is_tiny
from ..prompts import PROMPT_STYLES
from ..studio.config import WEIGHT_SOURCES, TrainConfig


# ============================================================================ data

def add_data_arguments(p):
    d = TrainConfig()
    p.add_argument("source", nargs="?", default=None, help="JSON/JSONL file or URL (default: the bundled "
                                                           "1100 entries)")
    p.add_argument("--out-dir", default=None, help="write train.json, test.json and val.json here")
    p.add_argument("--limit", type=int, default=None, help="use only the first N entries")
    p.add_argument("--duplicates", choices=("error", "keep", "drop"), default=None,
                   help="entries with the same instruction and input (default: keep for the bundled data, "
                        "error for a file)")
    p.add_argument("--prompt-style", choices=sorted(PROMPT_STYLES), default=d.prompt_style, help="for token counts")
    p.add_argument("--allowed-max-length", type=int, default=d.allowed_max_length,
                   help="count entries longer than this")


def run_data(args):
    from ..data import DataValidationError, length_stats, load_instruction_data, split_data
    from ..studio.files import atomic_write_json
    from ..tokenizer import get_tokenizer

    try:
        data = load_instruction_data(args.source, duplicates=args.duplicates)
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


# ============================================================================ download

def add_download_arguments(p):
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help=f"one of {MODEL_NAMES[:-1]}")
    p.add_argument("--source", choices=[s for s in WEIGHT_SOURCES if s != "random"], default=d.weights,
                   help="openai: the book's TensorFlow checkpoint (needs tensorflow to read); "
                        "hf: Hugging Face safetensors")
    p.add_argument("--models-dir", default=d.models_dir, help="download folder")


def run_download(args):
    from ..weights import load_pretrained, weights_available

    if is_tiny(args.model):
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


# ============================================================================ generate

def add_generate_arguments(p):
    d = TrainConfig()
    p.add_argument("--run-dir", default=None, help="a run folder: uses its final weights (or last checkpoint)")
    p.add_argument("--model", default=None, help="or a base model by name (no fine-tuning)")
    p.add_argument("--weights", choices=WEIGHT_SOURCES, default=None,
                   help="with --model: where its weights come from (default openai, random for tiny)")
    p.add_argument("--models-dir", default=d.models_dir, help="with --model: downloaded weights folder")
    p.add_argument("--input", default=None, help="JSON file of entries to answer (default: the run's split)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which split to answer")
    p.add_argument("--data", default=None, help="dataset for --split when there is no run (default: bundled)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N entries")
    p.add_argument("--out", default=None, help="output JSON (default: the run's "
                                               "instruction-data-with-response.json for the test split)")
    p.add_argument("--prompt-style", choices=sorted(PROMPT_STYLES), default=None, help="default: the run's")
    p.add_argument("--max-new-tokens", type=int, default=d.response_tokens, help="longest answer")
    p.add_argument("--batch-size", type=int, default=8, help="prompts answered at once")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def _model_for_generate(args):
    """(model, prompt_style, run) for the generate command."""
    import torch

    from ..studio.runs import Run
    from ..studio.models import build_model

    if args.run_dir:
        run = Run(args.run_dir)
        return run.load_model(), run.config.prompt_style, run
    if not args.model:
        raise ValueError("give --run-dir (a fine-tuned run) or --model (a base model)")
    settings = {"model": args.model, "models_dir": args.models_dir, **({"weights": args.weights} if args.weights else {})}
    config = TrainConfig.from_settings(settings).validate()
    with torch.random.fork_rng(devices=[]):
        return build_model(config).eval(), "alpaca", None


def run_generate(args):
    from tqdm import tqdm

    from ..studio.answers import answer_entries
    from ..studio.config import ConfigError
    from ..studio.files import read_json
    from ..studio.hardware import resolve_device
    from ..studio.runs import RunError
    from ..studio.worker import load_splits
    from ..tokenizer import get_tokenizer

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
    except (OSError, ValueError, RunError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.limit is not None:
        entries = entries[:args.limit]
    out = args.out
    if out is None:
        out = run.responses_path if (run is not None and args.split == "test" and not args.input) \
            else Path(f"{args.split if not args.input else Path(args.input).stem}-responses.json")
    device = resolve_device(args.device)
    with tqdm(total=len(entries), desc="Answering", unit="entry", disable=not sys.stderr.isatty()) as bar:
        answer_entries(model.to(device), entries, get_tokenizer(), prompt_style=args.prompt_style or style,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                       progress=lambda done, total: bar.update(done - bar.n), out_path=out)
    print(f"Wrote {len(entries)} answers to {out}")
    return 0
