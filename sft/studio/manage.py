"""Not in the book: tidying runs up, from the app or a script: delete a run, rename it, reuse its settings.

A run that a worker owns (starting, running, stopping) or that waits in a device's queue is
refused, with the reason: its worker writes into the folder, and a queue runner may start it any
moment; so is a run whose answers job (``sft.studio.jobs``) is writing its answers. Renaming moves the folder (one ``os.rename`` under the same runs folder) and rewrites what
records the folder's name or path: the final weights' ``.json`` (``extra.run``), ``worker.json``
and the paths in metrics.jsonl's "saved" events. Exports made earlier keep the name they were made
with in their own ``sft-export.json``: that is where the export came from, at the time.
"""
import json
import os
import shutil

from ..model import canonical_model_name
from .files import atomic_write_json, atomic_write_text, read_json, read_jsonl
from .jobs import answering
from .runs import ACTIVE_STATES, Run, RunError, check_run_name

QUEUED = "queued"  # sft.studio.queue's state for a run waiting its turn
NOT_SETTINGS = ("models_dir",)  # where files are, not how a run trains


def refuse_busy(run, doing):
    """RunError if ``run`` is owned by a worker or waits in a queue; ``doing``: "deleting", "renaming"."""
    state = run.state
    if state in ACTIVE_STATES:
        raise RunError(f"run {run.name!r} is {state}: stop it before {doing} it")
    if state == QUEUED:
        raise RunError(f"run {run.name!r} is queued: take it out of the queue before {doing} it")
    if answering(run):
        raise RunError(f"run {run.name!r} is answering its test split (Compare page): stop that job before "
                       f"{doing} it")


def delete_run(run):
    """Remove ``run``'s folder with everything in it (refused while it trains or is queued)."""
    refuse_busy(run, "deleting")
    shutil.rmtree(run.path)


def rename_run(run, new_name):
    """Move ``run`` to ``<its runs folder>/<new_name>``; returns the run there.

    ``new_name`` is checked as ``Run.create`` checks names (ValueError); a name already taken, an
    active run and a queued one raise RunError. The same name is no change."""
    check_run_name(new_name)
    if new_name == run.name:
        return run
    refuse_busy(run, "renaming")
    target = run.root / new_name
    if target.exists():
        raise RunError(f"a run named {new_name!r} exists already in {run.root}")
    old_path, old_name = run.path, run.name
    os.rename(old_path, target)  # one step: the folder is under its old name or its new one, never half
    renamed = Run(target)
    _update_records(renamed, old_name, old_path)
    return renamed


def _update_records(run, old_name, old_path):
    info_path = run.model_path.with_suffix(".json")  # beside the final weights (sft.studio.finetuned)
    info = _read(info_path)
    if isinstance(info, dict) and isinstance(info.get("extra"), dict) and info["extra"].get("run") == old_name:
        info["extra"]["run"] = run.name
        atomic_write_json(info_path, info)
    worker = run.path / "worker.json"
    record = _read(worker)
    if isinstance(record, dict) and record.get("run") == old_name:
        atomic_write_json(worker, {**record, "run": run.name})
    events, changed = read_jsonl(run.metrics_path), False
    old, new = os.fspath(old_path), os.fspath(run.path)
    for event in events:
        paths = event.get("paths") if event.get("type") == "saved" else None
        if isinstance(paths, dict):
            for kind, path in paths.items():
                if isinstance(path, str) and (path == old or path.startswith(old + os.sep)):
                    paths[kind], changed = new + path[len(old):], True
    if changed:
        atomic_write_text(run.metrics_path, "".join(json.dumps(e) + "\n" for e in events))


def _read(path):
    """A JSON file's content, or None when it is missing or unreadable (then there is nothing to update)."""
    try:
        return read_json(path, None)
    except (OSError, ValueError, RecursionError):
        return None


def settings_changes(wanted, got):
    """{setting: (wanted's value, got's value)} where two ``TrainConfig``s differ (file locations aside):
    what a page could not carry over when it redoes a run's settings. Two spellings of one model
    ("tiny", "tiny (random)") are the same model."""
    a, b = wanted.to_dict(), got.to_dict()
    return {k: (a[k], b.get(k)) for k in a if k not in NOT_SETTINGS and a[k] != b.get(k)
            and not (k == "model" and _same_model(a[k], b.get(k)))}


def _same_model(a, b):
    try:
        return canonical_model_name(a) == canonical_model_name(b)
    except ValueError:  # a name no longer known: only the same text is the same model
        return False

