"""Not in the book: files that are never half-written, and readers that survive a torn one.

One helper for every file the studio writes: ``atomic_write`` streams into a temp file beside
the target (``.<name>.<random>.tmp``), flushes it to disk and renames it over the target, so a
reader sees the old file or the new one, never a mix; a kill or a full disk leaves the old file
and a temp file that ``remove_temp_files`` clears later. Written files get mode 0644 like any
other. JSON Lines files (metrics, scores) are appended a line at a time; ``read_jsonl`` skips a
torn last line and ``append_jsonl`` starts on a fresh line after one.

A leaf module: it imports nothing of ours.
"""
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o644


class DiskFullError(OSError):
    """No space left on the device holding a file; the message says where."""

    def __init__(self, message):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _disk_full(exc, path, probe=False):
    """A DiskFullError for ``exc`` if it means the disk is full, else None. Writers that wrap the
    OS error (torch.save's zip writer raises RuntimeError "file write failed") are caught with
    ``probe``: the file system holding ``path`` is asked whether any space is left."""
    folder = os.path.dirname(os.path.abspath(path))
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and probe and isinstance(exc, (OSError, RuntimeError)):
        try:
            full = shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            pass
    if full:
        return DiskFullError(f"disk full: no space left to write {path} (in {folder}); "
                             "free some space there and try again")
    return None


def temp_path(path):
    """A new, unique temp file beside ``path`` (so the final rename stays on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path, *, durable=False):
    """Yield a temp path beside ``path``; when the block ends without an error, the file written
    there replaces ``path`` at once (on any failure the old ``path`` is untouched and the temp file
    removed). A full disk raises ``DiskFullError`` naming the folder. ``durable`` also flushes the
    data to the disk before the rename (survives a power cut, not only a killed process): for
    checkpoints and weights, not for status files written every step."""
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(exc, path, probe=True)  # before the temp file gives its space back
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def atomic_write(path, write, *, durable=False):
    """``write(tmp_path)`` then rename over ``path`` (see ``atomic_path``); ``write`` is any function
    that writes a file at the path it is given (``torch.save``, ``safetensors.torch.save_file``, ...)."""
    with atomic_path(path, durable=durable) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path, data):
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, *, indent=2):
    """Write ``obj`` as JSON atomically; an unserialisable ``obj`` fails before anything is written."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path, default=None):
    """The JSON in ``path``, or ``default`` if the file is missing (other errors are raised)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def append_jsonl(path, obj):
    """Append ``obj`` as one JSON line; if the file ends in a torn line (a killed writer), start afresh."""
    line = json.dumps(obj) + "\n"
    try:
        with open(path, "ab") as f:
            if f.tell() > 0:
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        line = "\n" + line
            f.write(line.encode("utf-8"))  # one write per line: readers never see half an event
    except OSError as exc:
        full = _disk_full(exc, path)
        if full is not None:
            raise full from exc
        raise


def read_jsonl(path):
    """The objects of a JSON Lines file, skipping lines that do not parse (a line being written,
    or torn by a kill). A missing file gives []."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


# Temp files of writes that never finished: ours (".<name>.<random>.tmp"), and those of earlier
# versions of SFT Studio ("<name>.tmp<pid>").
_TEMP_NAME = re.compile(r"\..+\.tmp|.+\.tmp\d+")


def remove_temp_files(folder, *, recursive=True):
    """Delete the temp files of writes a kill or a full disk interrupted under ``folder``; returns
    their paths. Call it only where no write is in flight (a run folder with no worker)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in (folder.rglob("*") if recursive else folder.iterdir()):
        if _TEMP_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
