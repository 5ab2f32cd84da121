"""``python -m sft experiment``: the chapter's exercises as one experiment, beside the book's figures.

    python -m sft experiment chapter-exercises --model tiny --limit 100 --wait
    python -m sft experiment summary NAME      # scores unscored answers when the judge answers
    python -m sft experiment list

``chapter-exercises`` queues the baseline, Phi-3 prompt style (7.1), instruction masking (7.2) and
LoRA (7.4) runs on the same data, model and seed (``sft.studio.exercises``); its training flags are
``train``'s, less those the variants set. ``--wait`` serves the queue in this process until they
end, then scores, summarises and prints the Markdown table.
"""
import sys


def _judge_arguments(parser, *, defaults):
    g = parser.add_argument_group("the judge (scores each run's answers when it answers)")
    g.add_argument("--judge-backend", choices=("ollama", "openai"), default="ollama" if defaults else None,
                   help="Ollama's API, or an OpenAI-compatible server" + ("" if defaults else
                                                                          " (default: the experiment's)"))
    g.add_argument("--judge-url", default=None, help="the judge server's URL (default: the backend's local one"
                                                     + ("" if defaults else ", or the experiment's") + ")")
    g.add_argument("--judge-model", default="llama3" if defaults else None,
                   help="judge model, as the server names it" + ("" if defaults else " (default: the experiment's)"))
    g.add_argument("--no-judge", action="store_true", help="score nothing")


def add_arguments(p):
    import argparse

    from ..studio.config import TrainConfig
    from ..studio.exercises import VARIANT_SETTINGS
    from .settings import add_config_arguments

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-root", default="runs", help="folder holding run folders (and .experiments/)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("chapter-exercises", parents=[common], formatter_class=p.formatter_class,
                       help="queue the baseline, Phi-3 (7.1), masking (7.2), LoRA (7.4) and DPO-on-the-baseline runs on "
                            "the same data, model and seed; each answers its test split, and the judge scores them",
                       description="Queue the chapter's exercises as one experiment: the baseline, the Phi-3 prompt "
                                   "style (exercise 7.1), instruction masking (7.2) and LoRA rank 16 alpha 16 (7.4) "
                                   "on the same data, model and seed, then DPO on top of the baseline (the DPO notebook's settings, "
                                   "from the baseline run's final weights).")
    add_config_arguments(c, TrainConfig, exclude=VARIANT_SETTINGS)
    g = c.add_argument_group("the experiment")
    g.add_argument("--name", default=None, help="experiment name; its runs are NAME-baseline, NAME-phi3, ... "
                                                "(default: exercises-<date>-<time>)")
    g.add_argument("--wait", action="store_true", help="train the queued runs in this process, then score, "
                                                       "summarise and print the table")
    _judge_arguments(c, defaults=True)
    s = sub.add_parser("summary", parents=[common], formatter_class=p.formatter_class,
                       help="the experiment's runs beside the book's figures (writes NAME.summary.json and NAME.md)")
    s.add_argument("name", help="experiment name")
    _judge_arguments(s, defaults=False)
    sub.add_parser("list", parents=[common], help="the experiments recorded, newest first")


def _judge(args, *, stored_default):
    """The judge the flags ask for: {backend, url, model}; None: none (or, for summary, the experiment's)."""
    if args.no_judge:
        return None
    if stored_default and not any((args.judge_backend, args.judge_url, args.judge_model)):
        return None
    return {"backend": args.judge_backend or "ollama", "url": args.judge_url, "model": args.judge_model or "llama3"}


def _print_summary(root, name, judge, score):
    from ..studio.exercises import markdown_table, summarize_experiment

    summary = summarize_experiment(root, name, judge=judge, score=score)
    scoring = summary.get("scoring") or {}
    if scoring.get("state") == "scored":
        asked = sum(r["asked"] for r in scoring["runs"].values())
        print(f"Judge {scoring['judge']}: {asked} answers scored now in {len(scoring['runs'])} run(s)")
    elif scoring.get("state") in ("skipped", "failed"):
        print(f"Not scored: {scoring['reason']}", file=sys.stderr)
    print(markdown_table(summary))
    print(f"Wrote {summary['files']['json']} and {summary['files']['markdown']}")
    return 0


def run(args):
    from ..studio import exercises
    from ..studio.config import ConfigError
    from ..studio.runs import RunError

    root = args.runs_root
    try:
        if args.action == "list":
            names = exercises.list_experiments(root)
            if not names:
                print(f"No experiments in {root}.")
            for name in names:
                record = exercises.load_experiment(root, name)
                print(f"{name}: " + ", ".join(f"{e['run']} ({e['exercise']})" for e in record["runs"]))
            return 0
        if args.action == "summary":
            return _print_summary(root, args.name, _judge(args, stored_default=True), score=not args.no_judge)
        return _chapter_exercises(args)
    except ConfigError:
        raise  # main() prints it (exit status 2, as train's)
    except (RunError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _chapter_exercises(args):
    from ..studio import exercises
    from ..studio.config import TrainConfig
    from ..studio.queue import ensure_runner
    from .settings import given_settings

    root = args.runs_root
    record = exercises.start_chapter_exercises(root, given_settings(args, TrainConfig), experiment=args.name,
                                               judge=_judge(args, stored_default=False), start_runner=not args.wait)
    name = record["name"]
    print(f"Experiment {name}: queued {len(record['runs'])} runs on {record['device']}, in this order:")
    for place, entry in enumerate(record["runs"], start=1):
        print(f"  {place}. {entry['run']}  ({entry['exercise']}: {entry['label']})")
    if not args.wait:
        print(f"Each starts when the device is free (python -m sft queue list shows the line). When they have "
              f"ended: python -m sft experiment summary {name}")
        return 0
    try:
        states = exercises.wait_for_experiment(root, name)
    except KeyboardInterrupt:
        ensure_runner(root, record["device"])  # the rest of the line goes on in the background
        print(f"\nStopped waiting; the queued runs go on in the background. Later: python -m sft experiment "
              f"summary {name}", file=sys.stderr)
        return 130
    print("Runs ended: " + ", ".join(f"{run} {state}" for run, state in states.items()))
    code = _print_summary(root, name, None, score=True)
    return code if all(state == "completed" for state in states.values()) else 1
