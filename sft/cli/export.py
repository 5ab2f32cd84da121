"""``python -m sft export``: a run's model (or a base model) as a Hugging Face folder and GGUF files."""
import sys
from pathlib import Path

from ..export import DTYPES, FORMATS


def add_arguments(p):
    p.add_argument("--run-dir", default=None, help="a run folder: its final weights (or last checkpoint); a LoRA "
                                                   "run's adapters are merged first")
    p.add_argument("--model", default=None, help="or a base model by name (e.g. 'tiny', 'gpt2-small (124M)')")
    p.add_argument("--weights", choices=("openai", "hf", "random"), default=None,
                   help="with --model: where its weights come from (default openai, random for tiny)")
    p.add_argument("--models-dir", default="models", help="with --model: downloaded weights folder")
    p.add_argument("--out", default=None, help="output folder (default: exports/<run or model name>)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, some of {', '.join(FORMATS)}")
    p.add_argument("--gguf-dtypes", default="f32", help=f"comma-separated, some of {', '.join(DTYPES)}")
    p.add_argument("--name", default=None, help="the model's name in Ollama (default: from the run or model)")
    p.add_argument("--prompt-style", default=None, help="prompt style of the chat template (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace files an earlier export did not write")


def _split(text):
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def run(args):
    from ..studio.exports import export_run_or_model

    try:
        result = export_run_or_model(
            run_dir=args.run_dir, model=args.model, weights=args.weights, models_dir=args.models_dir,
            out=args.out, formats=_split(args.formats), gguf_dtypes=_split(args.gguf_dtypes), name=args.name,
            prompt_style=args.prompt_style, overwrite=args.overwrite,
            progress=lambda done, total, label: print(f"[{done}/{total}] {label}", flush=True))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Exported to {result['out']}")
    if "hf" in result:
        print(f"  Hugging Face: {Path(result['hf']['folder'])} (AutoModelForCausalLM.from_pretrained(...))")
    for dtype, path in result.get("gguf", {}).items():
        print(f"  GGUF {dtype}: {path}")
    if result.get("commands"):
        print("Ollama:\n  " + "\n  ".join(result["commands"]))
    return 0


def add_merge_arguments(p):
    p.add_argument("--run-dir", required=True, help="a LoRA run folder")
    p.add_argument("--out", default=None, help="weights file to write (default: <run>/<model>-merged.pth, "
                                               "with its .json and .safetensors beside it)")
    p.add_argument("--from-checkpoint", action="store_true",
                   help="merge the last checkpoint's adapters even where final adapters exist")


def run_merge(args):
    from ..model import canonical_model_name
    from ..studio.checkpoint import load_checkpoint
    from ..studio.finetuned import finetuned_filename, save_finetuned
    from ..studio.runs import Run, RunError

    try:
        run = Run(args.run_dir)
        config = run.config
        adapter = load_checkpoint(run.checkpoint_path)["model"] if args.from_checkpoint else None
        model = run.merged_model(adapter)
        name = canonical_model_name(config.model)
        out = Path(args.out) if args.out else run.path / finetuned_filename(name).replace("-sft.pth", "-merged.pth")
        paths = save_finetuned(model, out, extra={"model_name": name, "prompt_style": config.prompt_style,
                                                  "run": run.name, "weights": config.weights, "method": "LoRA merged"})
    except (OSError, ValueError, RuntimeError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Merged {run.name}'s adapters (rank {config.lora_rank}, alpha {config.lora_alpha:g}) into "
          f"{name}: {paths['pth']}")
    return 0
