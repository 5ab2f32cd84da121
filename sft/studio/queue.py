"""Not in the book: runs waiting their turn for a device.

One training per device at a time (``locks``). A run queued behind the one training is in state
"queued" with a place in the line (``queue_position`` in its status.json): the queue lives in the
run folders, so it survives a refresh, a server restart and a crash. A queue runner, a small
detached process per device and runs folder (``python -m sft queue run``, itself holding a lock so
there is only ever one), starts the first queued run whenever the device is free, waits for it to
end, and goes on; it exits when nothing is queued. If it dies, ``ensure_runner`` (called by every
``enqueue``, by the pages and by ``python -m sft queue``) starts a new one.
"""
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from .hardware import device_key
from .locks import DeviceBusyError, holder, lock_dir
from .runs import ACTIVE_STATES, Run, RunError, list_runs
from .worker import check_start, launch_worker

QUEUED = "queued"
POLL_S = 1.0  # how often a runner looks at the device while a run trains
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def queued_runs(root, key=None):
    """The queued runs under ``root`` (for device ``key``, or all), first in line first."""
    runs = [r for r in list_runs(root) if not r.is_broken and r.state == QUEUED]
    if key is not None:
        runs = [r for r in runs if r.status().get("device") == key]
    return sorted(runs, key=lambda r: (r.status().get("queue_position") or 0, r.name))


def enqueue(run, *, resume=False, start_runner=True, env=None):
    """Put ``run`` at the end of its device's line; returns its place (1 = next)."""
    if run.is_active or run.state == QUEUED:
        raise RunError(f"run {run.name!r} is already {run.state}")
    check_start(run, resume)
    key = device_key(run.config.device)
    line = queued_runs(run.root, key)
    last = max((r.status().get("queue_position") or 0 for r in line), default=0)
    run.update_status(state=QUEUED, device=key, queue_position=last + 1, queue_resume=bool(resume),
                      queued_at=time.time(), error=None, advice=None)
    if start_runner:
        ensure_runner(run.root, key, env=env)
    return len(line) + 1


def dequeue(run):
    """Take ``run`` out of the line (back to the state it can start from)."""
    if run.state != QUEUED:
        raise RunError(f"run {run.name!r} is not queued (it is {run.state})")
    run.update_status(state="stopped" if run.has_checkpoint else "created", queue_position=None,
                      queue_resume=None)


def move(run, place):
    """Move a queued ``run`` to ``place`` in its line (1 = next); the others keep their order."""
    status = run.status()
    if status.get("state") != QUEUED:
        raise RunError(f"run {run.name!r} is not queued (it is {status.get('state')})")
    line = [r for r in queued_runs(run.root, status.get("device")) if r.name != run.name]
    place = max(1, min(int(place), len(line) + 1))
    line.insert(place - 1, run)
    for i, r in enumerate(line, start=1):
        r.update_status(queue_position=i)


def _runner_lock_path(root, key):
    folder = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]  # one line per runs folder
    return lock_dir() / f"queue-{key}-{folder}.lock"


def runner_alive(root, key):
    path = _runner_lock_path(root, key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def ensure_runner(root, key, *, env=None):
    """Start the queue runner for ``key`` under ``root`` if runs are queued and none is running."""
    if not queued_runs(root, key) or runner_alive(root, key):
        return None
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    log = Path(root) / ".queue.log"
    with open(log, "a", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-m", "sft", "queue", "run", "--runs-root", str(root),
                                 "--device-key", key], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def run_queue(root, key, *, env=None, max_runs=None, poll=POLL_S, idle_exit=True):
    """The runner: while runs are queued, start the next one when the device is free, wait for
    it to end; returns the names it started. Holds a lock so only one runner serves a line."""
    path = _runner_lock_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return []  # another runner serves this line
    started = []
    try:
        while max_runs is None or len(started) < max_runs:
            line = queued_runs(root, key)
            if not line:
                if idle_exit:
                    return started
                time.sleep(poll)
                continue
            if holder(key) is not None:
                time.sleep(poll)  # the device trains something (from any runs folder): wait for it
                continue
            run = line[0]
            resume = bool(run.status().get("queue_resume")) and run.has_checkpoint
            try:
                proc = launch_worker(run, resume=resume, env=env)
            except DeviceBusyError:
                time.sleep(poll)  # someone started a training meanwhile: wait again
                continue
            except RunError as exc:  # it cannot start (e.g. nothing to resume): out of the line
                run.update_status(state="failed", error=f"could not start from the queue: {exc}",
                                  queue_position=None)
                continue
            started.append(run.name)
            run.wait(timeout=float("inf"), proc=proc, poll=poll)
    finally:
        os.close(fd)
    return started


def queue_table(root):
    """Rows for a page or the CLI: each queued run's place, name, model and device."""
    rows = []
    for key in sorted({r.status().get("device") for r in queued_runs(root)}):
        for place, run in enumerate(queued_runs(root, key), start=1):
            rows.append({"place": place, "run": run.name, "device": key, "model": run.config.model,
                         "queued_at": run.status().get("queued_at")})
    return rows


def active_or_queued(run):
    return run.state in (*ACTIVE_STATES, QUEUED)
