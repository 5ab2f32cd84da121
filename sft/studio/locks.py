"""Not in the book: one training per device on this machine, and whether a process still lives.

A device's lock is an ``flock`` on ``<lock dir>/<device>.lock``, held for as long as an open
file refers to it. The kernel takes it atomically and drops it when the last holder exits, even
after ``kill -9``: no stale lock, no check-then-delete race, and an empty or garbled lock file
means nothing (its text only says who holds it, for messages). The lock belongs to the machine,
not to a runs folder: ``SFT_LOCK_DIR`` (default ``~/.cache/sft-studio/locks``) is shared by every
runs folder and every app session. A launcher takes the lock, hands the open file to the worker
it starts (``pass_fds``) and closes its own copy.

A leaf module: it imports nothing of ours.
"""
import fcntl
import json
import os
import time
from pathlib import Path

LOCK_FD_ENV = "SFT_DEVICE_LOCK_FD"  # the inherited lock's file descriptor, in a launched worker


class DeviceBusyError(RuntimeError):
    """Another training holds the device; the message names it."""


def lock_dir():
    base = os.environ.get("SFT_LOCK_DIR")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sft-studio" / "locks"


def lock_path(key):
    return lock_dir() / f"{key}.lock"


def pid_alive(pid, create_time=None):
    """Is ``pid`` a live process (not a zombie; the same process if ``create_time`` is given)?"""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except psutil.AccessDenied:  # pragma: no cover - exists, owned by someone else
        return True


def create_time(pid):
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # pragma: no cover
        return None


def _read_holder(fd):
    """The holder's description in an open lock file: {} if it is empty or unreadable."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy(key, info):
    who = f"run {info['run']!r}" if info.get("run") else "another training"
    pid = f" (pid {info['pid']})" if info.get("pid") else ""
    return DeviceBusyError(f"device {key} is busy: {who}{pid} is training on it; stop it or wait for it to finish")


class DeviceLock:
    """A held device lock. ``DeviceLock.acquire(key, run=...)`` takes it or raises DeviceBusyError."""

    def __init__(self, key, fd):
        self.key, self.fd = key, fd

    @classmethod
    def acquire(cls, key, *, run=None, pid=None, attempts=3):
        path = lock_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(attempts):  # a reader's brief shared probe (see holder) can collide
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    info = _read_holder(fd)
                    os.close(fd)
                    raise _busy(key, info) from None
                time.sleep(0.02)
        lock = cls(key, fd)
        lock.describe(run=run, pid=pid or os.getpid())
        return lock

    @classmethod
    def inherited(cls, key, *, run=None):
        """The lock a launcher handed to this process (``LOCK_FD_ENV``), or None if there is none."""
        raw = os.environ.get(LOCK_FD_ENV)
        if not raw:
            return None
        try:
            fd = int(raw)
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path(key)))
        except (ValueError, OSError):
            return None
        if not same:
            return None
        try:  # the same open file: taking it again succeeds at once if we hold it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        os.environ.pop(LOCK_FD_ENV, None)
        lock = cls(key, fd)
        lock.describe(run=run, pid=os.getpid())
        return lock

    def describe(self, *, run=None, pid=None):
        """Say in the file who holds the lock (for messages; the lock itself is the flock)."""
        pid = pid or os.getpid()
        info = {"pid": pid, "create_time": create_time(pid), "run": run, "since": time.time()}
        data = json.dumps(info).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:  # a full disk: the lock holds all the same, only unlabelled
            pass

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the flock with the last open copy
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder(key):
    """{pid, run, ...} of whoever holds device ``key``'s lock ({} if it says nothing), or None if free."""
    path = lock_path(key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
