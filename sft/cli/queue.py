"""``python -m sft queue``: runs waiting their turn for a device (list, add, remove, move; the runner)."""
import sys

from ..studio.runs import Run, RunError


def add_arguments(p):
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-root", default="runs", help="folder holding run folders")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", parents=[common], help="the queued runs, in order, per device")
    a = sub.add_parser("add", parents=[common], help="queue a run after the current training")
    a.add_argument("run", help="run name or folder")
    a.add_argument("--resume", action="store_true", help="continue it from its checkpoint when its turn comes")
    r = sub.add_parser("remove", parents=[common], help="take a run out of the queue")
    r.add_argument("run")
    m = sub.add_parser("move", parents=[common], help="move a queued run to another place (1 = next)")
    m.add_argument("run")
    m.add_argument("place", type=int)
    w = sub.add_parser("run", parents=[common],
                       help="serve the queue (started for you; waits for the device, trains each in turn)")
    w.add_argument("--device-key", default="cpu", help="the device's lock name (cpu, cuda0, ...)")


def run(args):
    from ..studio import queue

    try:
        if args.action == "list":
            rows = queue.queue_table(args.runs_root)
            if not rows:
                print("No runs are queued.")
            for row in rows:
                print(f"{row['device']:>6}  {row['place']:>3}. {row['run']}  ({row['model']})")
            return 0
        if args.action == "run":
            started = queue.run_queue(args.runs_root, args.device_key)
            print(f"Queue done: started {len(started)} run(s): {', '.join(started) or '-'}")
            return 0
        target = Run.open(args.run, root=args.runs_root)
        if args.action == "add":
            place = queue.enqueue(target, resume=args.resume)
            print(f"Queued {target.name}: number {place} in line for {target.status().get('device')}")
        elif args.action == "remove":
            queue.dequeue(target)
            print(f"Removed {target.name} from the queue")
        elif args.action == "move":
            queue.move(target, args.place)
            print(f"Moved {target.name} to place {args.place}")
        return 0
    except (RunError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
