"""``python -m sft runs``: the run folders: list them, delete one, rename one (as the Fine-tune page does).

A run that trains, waits in a queue or is answering its test split is refused, with the reason
(``sft.studio.manage``).
"""
import sys

from ..studio.runs import Run, RunError


def add_arguments(p):
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-root", default="runs", help="folder holding run folders")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", parents=[common], help="the runs, newest first: state, model, method, step, losses")
    d = sub.add_parser("delete", parents=[common], help="remove a run's folder with everything in it")
    d.add_argument("run", help="run name or folder")
    d.add_argument("--yes", action="store_true", help="do not ask first")
    r = sub.add_parser("rename", parents=[common], help="give a run another name (its folder moves)")
    r.add_argument("run", help="run name or folder")
    r.add_argument("new_name")


def _loss(value):
    return "-" if value is None else f"{value:.3f}"


def run(args):
    from ..studio.manage import delete_run, rename_run
    from ..studio.runs import list_runs

    try:
        if args.action == "list":
            runs = list_runs(args.runs_root)
            if not runs:
                print(f"No runs in {args.runs_root}.")
            for found in runs:
                row = found.summary()
                step = f"{row['step']}/{row['total_steps']}" if row["total_steps"] else "-"
                print(f"{row['name']:<28} {row['state'] or '-':<10} {row['model'] or '-':<18} "
                      f"{row['method'] or '-':<5} step {step:<9} train {_loss(row['train_loss'])} "
                      f"val {_loss(row['val_loss'])}" + (f"  ({row['error']})" if row["error"] else ""))
            return 0
        target = Run.open(args.run, root=args.runs_root)
        if args.action == "delete":
            if not args.yes and input(f"Delete run {target.name!r} ({target.path}) and all its files? [y/N] "
                                      ).strip().lower() not in ("y", "yes"):
                print("Nothing deleted.")
                return 1
            delete_run(target)
            print(f"Deleted {target.name} ({target.path})")
        elif args.action == "rename":
            moved = rename_run(target, args.new_name)
            print(f"Renamed {target.name} to {moved.name} ({moved.path})")
        return 0
    except (RunError, OSError, ValueError, EOFError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
