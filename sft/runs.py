"""Run folders (not in the book); the worker process that trains one lives in ``sft.worker``.

One folder per run, shared by the app and the command line::

    runs/<name>/config.json        TrainConfig
                status.json        {state, pid, device, started, updated, error, advice, progress}
                metrics.jsonl      one Trainer event per line
                log.txt            the worker's stdout/stderr
                checkpoints/last.pt  model, optimizer, RNG states, position in the epoch
                <model>-sft.pth    final weights (+ .safetensors, .json), chapter's name
                instruction-data-with-response.json   test-split answers
                stop               present while a stop is requested

Every JSON file is written atomically (temp file + os.replace). Training runs in a detached
process (``python -m sft train --run-dir ...``, see ``sft.worker``), so a closed browser tab
loses nothing; one training per device at a time, enforced by a lock file holding the worker's pid.
``build_trainer``, ``execute_run``, ``load_splits`` and ``build_model`` moved to ``sft.worker``
and are still importable from here.
"""
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

STATES = ("created", "queued", "running", "stopping", "stopped", "completed", "failed")
ACTIVE_STATES = ("queued", "running", "stopping")
RESPONSES_FILE = "instruction-data-with-response.json"  # the chapter's name for the answers


class RunError(RuntimeError):
    """A run cannot do what was asked (already running, nothing to resume, ...)."""


class DeviceBusyError(RunError):
    """Another training holds the device."""


# ============================================================================ atomic files

def _temp_beside(path):
    """A new temp file in ``path``'s folder (unique per process and thread), so os.replace is atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` via a temp file in the same folder and os.replace."""
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path, default=None):
    """The JSON in ``path``, or ``default`` if the file is missing."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


# ============================================================================ checkpoints

def capture_rng_state(generators=None):
    """Every RNG that training touches: torch (CPU and CUDA), Python, NumPy, and named generators."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    try:
        import numpy as np

        _, keys, pos, has_gauss, gauss = np.random.get_state()
        # as a tensor and plain numbers, so the checkpoint loads with weights_only=True
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    return state


def restore_rng_state(state, generators=None):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    for name, gen in (generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])


def save_checkpoint(path, state):
    """torch.save ``state`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    tmp = _temp_beside(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True`` (tensors and plain Python values only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


# ============================================================================ runs

def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "run"


def canonical_model_name(name):
    """"124M" -> "gpt2-small (124M)", "tiny" -> "tiny (random)" (names as sft.model lists them)."""
    from .model import MODEL_NAMES, model_config

    cfg = model_config(name)
    return next((n for n in MODEL_NAMES if model_config(n) == cfg), name)


class Run:
    """One training run's folder. ``Run.create(config)`` makes one; ``Run(path)`` opens one."""

    def __init__(self, path):
        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no run at {self.path} (config.json missing)")
        self.name, self.root = self.path.name, self.path.parent
        self._proc = None
        self._status = None  # the worker keeps its own status in memory between writes

    # ------------------------------------------------------------------ create / open / list
    @classmethod
    def create(cls, config, root="runs", name=None):
        """A new run folder under ``root`` with ``config`` (validated) and state "created"."""
        config.validate()
        root = Path(root)
        if name is None:
            base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(config.model)}"
            name, i = base, 1
            while (root / name).exists():
                i += 1
                name = f"{base}-{i}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
        path = root / name
        path.mkdir(parents=True, exist_ok=False)  # never mix two runs in one folder
        config.save(path / "config.json")
        run = cls(path)
        now = time.time()
        run.update_status(state="created", pid=None, device=None, created=now, started=None,
                          finished=None, error=None, advice=None, progress={})
        return run

    @classmethod
    def open(cls, name_or_path, root="runs"):
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            path = Path(root) / str(name_or_path)
        return cls(path)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self):
        return self.path / "config.json"

    @property
    def status_path(self):
        return self.path / "status.json"

    @property
    def metrics_path(self):
        return self.path / "metrics.jsonl"

    @property
    def log_path(self):
        return self.path / "log.txt"

    @property
    def stop_path(self):
        return self.path / "stop"

    @property
    def checkpoint_path(self):
        return self.path / "checkpoints" / "last.pt"

    @property
    def responses_path(self):
        return self.path / RESPONSES_FILE

    @property
    def test_data_path(self):
        return self.path / "test-data.json"

    @property
    def model_path(self):
        """Final weights, named as the chapter names them (e.g. gpt2-medium355M-sft.pth)."""
        from .weights import finetuned_filename

        return self.path / finetuned_filename(canonical_model_name(self.config.model))

    @property
    def config(self):
        from .config import TrainConfig

        return TrainConfig.load(self.config_path)

    @property
    def has_checkpoint(self):
        return self.checkpoint_path.is_file()

    @property
    def has_trained(self):
        """True once training has begun here (metrics or a checkpoint exist)."""
        return self.has_checkpoint or self.metrics_path.is_file()

    # ------------------------------------------------------------------ status and metrics
    def update_status(self, **fields):
        """Merge ``fields`` into status.json (atomic write) and return the new status."""
        status = dict(self._status or read_json(self.status_path, {}))
        status.update(fields, updated=time.time())
        atomic_write_json(self.status_path, status)
        self._status = status if self._status is not None else None
        return status

    def status(self):
        """status.json; an active run whose worker died is reported (and recorded) as failed."""
        status = read_json(self.status_path, {}) or {"state": "created"}
        if status.get("state") in ACTIVE_STATES:
            worker = read_json(self.path / "worker.json", {})
            pid = status.get("pid") or worker.get("pid")
            started = status.get("pid_started") if status.get("pid") else worker.get("create_time")
            if self._proc is not None:
                self._proc.poll()  # reap our own child so it is not left a zombie
            if pid and not _worker().pid_alive(pid, started):
                tail = self.tail_log(20)
                status = self.update_status(
                    state="failed", finished=time.time(),
                    error=f"the training worker (pid {pid}) exited without finishing: crashed or killed",
                    log_tail=tail)
        return status

    @property
    def state(self):
        return self.status().get("state")

    @property
    def is_active(self):
        return self.state in ACTIVE_STATES

    def record_event(self, event):
        """A Trainer callback: append ``event`` to metrics.jsonl and update status.json's progress."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")  # one write per line
        if self._status is None:
            self._status = read_json(self.status_path, {})
        progress = dict(self._status.get("progress") or {})
        for key in ("epoch", "epochs", "epochs_seen", "step", "total_steps", "tokens_seen", "progress",
                    "elapsed", "eta", "tokens_per_s", "loss", "train_loss", "val_loss"):
            if key in event:
                progress[key] = event[key]
        if event["type"] == "responses":
            progress["responses"] = [event["done"], event["total"]]
        fields = {"progress": progress}
        if self._status.get("state") in ("running", "stopping"):
            fields["state"] = "stopping" if self.stop_path.exists() else "running"
        self.update_status(**fields)

    def read_metrics(self, types=None):
        """The events in metrics.jsonl (optionally only ``types``); a resumed run's events
        after its checkpoint but before the resume (re-done work) are dropped."""
        events = []
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if event.get("type") == "resumed":
                events = [e for e in events if e.get("step", -1) <= event["step"]]
            events.append(event)
        if types is not None:
            types = {types} if isinstance(types, str) else set(types)
            events = [e for e in events if e.get("type") in types]
        return events

    def tail_log(self, n=40):
        """The last ``n`` lines of log.txt ("" if there is none)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 200 * max(n, 1)))
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-n:])

    def summary(self):
        """One row for a table of runs."""
        status, config = self.status(), self.config
        progress = status.get("progress") or {}
        return {"name": self.name, "state": status.get("state"), "model": config.model,
                "weights": config.weights, "path": "chapter" if config.is_chapter_path() else "fast",
                "epochs": config.epochs, "step": progress.get("step"),
                "total_steps": progress.get("total_steps"), "train_loss": progress.get("train_loss"),
                "val_loss": progress.get("val_loss"), "created": status.get("created"),
                "updated": status.get("updated"), "device": status.get("device"), "error": status.get("error")}

    # ------------------------------------------------------------------ worker control
    def request_stop(self):
        """Ask the worker to checkpoint and stop after its current step; False if none is active."""
        if not self.is_active:
            return False
        atomic_write_text(self.stop_path, f"{time.time()}\n")
        self.update_status(state="stopping")
        return True

    def launch(self, *, resume=False, responses=True, python=None, env=None):
        """Start the training worker, detached; returns its ``subprocess.Popen`` (see sft.worker)."""
        from .worker import launch_worker

        self._proc = launch_worker(self, resume=resume, responses=responses, python=python, env=env)
        return self._proc

    def delete(self):
        """Remove the run folder (refused while it trains)."""
        if self.is_active:
            raise RunError(f"run {self.name!r} is {self.state}: stop it before deleting it")
        shutil.rmtree(self.path)

    def loss_curves(self):
        """Lists for plots: evaluations (step, epochs_seen, tokens_seen, train_loss, val_loss) and
        per-step training losses (step_steps, step_loss)."""
        curves = {k: [] for k in ("step", "epochs_seen", "tokens_seen", "train_loss", "val_loss",
                                  "step_steps", "step_loss")}
        for e in self.read_metrics(("eval", "step")):
            if e["type"] == "eval":
                for k in ("step", "epochs_seen", "tokens_seen", "train_loss", "val_loss"):
                    curves[k].append(e.get(k))
            else:
                curves["step_steps"].append(e["step"])
                curves["step_loss"].append(e.get("loss"))
        return curves

    def resume(self, **kwargs):
        """Continue from checkpoints/last.pt in a new worker."""
        return self.launch(resume=True, **kwargs)

    def wait(self, timeout=60.0, poll=0.2):
        """Block until the run is no longer active (or ``timeout`` s); returns the status."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=max(0.0, min(poll, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
            status = self.status()
            if status.get("state") not in ACTIVE_STATES or time.monotonic() >= deadline:
                if self._proc is not None and status.get("state") not in ACTIVE_STATES:
                    try:  # the worker writes its last status just before it exits
                        self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                return status
            if self._proc is None:
                time.sleep(poll)


def _worker():
    from . import worker

    return worker


def list_runs(root="runs"):
    """Runs under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / "config.json").is_file()]
    return sorted(runs, key=lambda r: (read_json(r.status_path, {}) or {}).get("created") or 0, reverse=True)


# Moved to sft.worker (the worker process and the device lock); resolved lazily (PEP 562) so the two modules import in either order.
_MOVED_TO_WORKER = ("load_splits", "build_model", "build_trainer", "execute_run", "launch_worker", "check_start",
                    "pid_alive", "device_lock_holder", "acquire_device_lock", "release_device_lock")


def __getattr__(name):
    if name in _MOVED_TO_WORKER:
        from . import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'sft.runs' has no attribute {name!r}")
