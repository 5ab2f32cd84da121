"""Not in the book: run folders, shared by the app and the command line.

One folder per run::

    runs/<name>/config.json        TrainConfig
                status.json        {state, pid, device, started, updated, error, advice, progress}
                metrics.jsonl      one Trainer event per line
                snapshots.jsonl    the answers taken at evaluations (sft.studio.snapshots)
                log.txt            the worker's stdout/stderr
                checkpoints/last.pt  model, optimizer, RNG states, position in the epoch (+ previous.pt)
                <model>-sft.pth    final weights (+ .safetensors, .json), the chapter's name
                instruction-data-with-response.json   test-split answers
                stop               present while a stop is requested

Every file is written atomically (``sft.studio.files``). A ``Run`` reads and writes the folder;
the process that trains it is ``sft.studio.worker``'s. A folder that cannot be read (bad JSON, a
setting from another version) is listed as a ``BrokenRun`` with the reason, and can be deleted.
"""
import os
import re
import shutil
import time
from pathlib import Path

import torch

from ..model import canonical_model_name
from .checkpoint import has_checkpoint, load_checkpoint
from .config import ConfigError
from .dpo_config import load_config
from .files import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl, remove_temp_files
from .finetuned import finetuned_filename
from .locks import pid_alive

STATES = ("created", "queued", "starting", "running", "stopping", "stopped", "completed", "failed")
ACTIVE_STATES = ("starting", "running", "stopping")  # a worker owns the run ("queued": waiting, see queue)
RESPONSES_FILE = "instruction-data-with-response.json"  # the chapter's name for the answers
START_TIMEOUT_S = 120  # a "starting" run whose launcher is gone and whose worker never reported


class RunError(RuntimeError):
    """A run cannot do what was asked (already running, nothing to resume, ...)."""


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "run"


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name):
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    return name


class Run:
    """One training run's folder. ``Run.create(config)`` makes one; ``Run(path)`` opens one."""

    def __init__(self, path):
        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no run at {self.path} (config.json missing)")
        self.name, self.root = self.path.name, self.path.parent
        self._status = None  # the worker keeps its own status in memory between writes

    # ------------------------------------------------------------------ create / open
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
        path = root / check_run_name(name)
        path.mkdir(parents=True, exist_ok=False)  # never mix two runs in one folder
        config.save(path / "config.json")
        run = cls(path)
        run.update_status(state="created", pid=None, device=None, created=time.time(), started=None,
                          finished=None, error=None, advice=None, progress={})
        return run

    @classmethod
    def open(cls, name_or_path, root="runs"):
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            path = Path(root) / check_run_name(str(name_or_path))
        return cls(path)

    # ------------------------------------------------------------------ paths
    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    snapshots_path = property(lambda self: self.path / "snapshots.jsonl")  # answers at evaluations (snapshots)
    log_path = property(lambda self: self.path / "log.txt")
    stop_path = property(lambda self: self.path / "stop")
    checkpoint_path = property(lambda self: self.path / "checkpoints" / "last.pt")
    responses_path = property(lambda self: self.path / RESPONSES_FILE)
    test_data_path = property(lambda self: self.path / "test-data.json")
    adapter_path = property(lambda self: self.path / "adapter.safetensors")  # LoRA runs: the adapters alone

    @property
    def model_path(self):
        """Final weights, named as the chapter names them (e.g. gpt2-medium355M-sft.pth)."""
        return self.path / finetuned_filename(canonical_model_name(self.config.model))

    @property
    def config(self):
        return load_config(self.config_path)  # a TrainConfig, or a DPOConfig for a DPO run

    @property
    def has_checkpoint(self):
        return has_checkpoint(self.checkpoint_path)

    @property
    def has_trained(self):
        """True once training has begun here (metrics or a checkpoint exist)."""
        return self.has_checkpoint or self.metrics_path.is_file()

    # ------------------------------------------------------------------ status and metrics
    def _read_status(self):
        try:
            status = read_json(self.status_path, {})
        except (ValueError, RecursionError, UnicodeDecodeError):
            status = None
        return status if isinstance(status, dict) else {"state": "failed", "error": f"{self.status_path} is unreadable"}

    def update_status(self, **fields):
        """Merge ``fields`` into status.json (atomic write) and return the new status."""
        status = dict(self._status or self._read_status())
        status.update(fields, updated=time.time())
        atomic_write_json(self.status_path, status)
        self._status = status if self._status is not None else None
        return status

    def status(self):
        """status.json; an active run whose worker (or launcher) is gone is reported, and recorded, as failed."""
        status = self._read_status() or {"state": "created"}
        state = status.get("state")
        if state in ACTIVE_STATES:
            worker = read_json(self.path / "worker.json", {}) or {}
            pid = status.get("pid") or worker.get("pid")
            started = status.get("pid_started") if status.get("pid") else worker.get("create_time")
            if pid and not pid_alive(pid, started):
                ended = self._read_status() or {}  # it may have ended, and written so, since the first read
                if ended.get("state") not in ACTIVE_STATES:
                    return ended
                return self.update_status(
                    state="failed", finished=time.time(), log_tail=self.tail_log(20),
                    error=self._exit_reason(pid))
            if not pid and state == "starting" and not pid_alive(status.get("launcher_pid"),
                                                                 status.get("launcher_started")):
                if time.time() - (status.get("updated") or 0) > START_TIMEOUT_S or status.get("launcher_pid"):
                    return self.update_status(state="failed", finished=time.time(),
                                              error="the training worker never started (its launcher is gone)")
        return status

    def _exit_reason(self, pid):
        tail = self.tail_log(40).lower()
        if "no space left on device" in tail or "disk full" in tail:
            return f"the training worker (pid {pid}) stopped: disk full in {self.path}; free space and resume"
        return f"the training worker (pid {pid}) exited without finishing: crashed or killed"

    @property
    def state(self):
        return self.status().get("state")

    @property
    def is_active(self):
        return self.state in ACTIVE_STATES

    def record_event(self, event):
        """A Trainer callback: append ``event`` to metrics.jsonl (a "snapshot" to snapshots.jsonl, which
        the polling pages need not read) and update status.json's progress."""
        append_jsonl(self.snapshots_path if event["type"] == "snapshot" else self.metrics_path, event)
        if self._status is None:
            self._status = self._read_status()
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
        for event in read_jsonl(self.metrics_path):
            if event.get("type") == "resumed":
                events = [e for e in events if e.get("step", -1) <= event.get("step", -1)]
            events.append(event)
        if types is not None:
            types = {types} if isinstance(types, str) else set(types)
            events = [e for e in events if e.get("type") in types]
        return events

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
        return {"name": self.name, "state": status.get("state"), "model": config.model, "method": config.method,
                "weights": config.weights, "path": "chapter" if config.is_chapter_path() else "fast",
                "epochs": config.epochs, "step": progress.get("step"),
                "total_steps": progress.get("total_steps"), "train_loss": progress.get("train_loss"),
                "val_loss": progress.get("val_loss"), "created": status.get("created"),
                "updated": status.get("updated"), "device": status.get("device"), "error": status.get("error")}

    # ------------------------------------------------------------------ control
    def request_stop(self):
        """Ask the worker to checkpoint and stop after its current step; False if none is active."""
        if not self.is_active:
            return False
        atomic_write_text(self.stop_path, f"{time.time()}\n")
        self.update_status(state="stopping")
        return True

    def delete(self):
        """Remove the run folder (refused while it trains)."""
        if self.is_active:
            raise RunError(f"run {self.name!r} is {self.state}: stop it before deleting it")
        shutil.rmtree(self.path)

    def clean_temp_files(self):
        """Temp files of writes a kill interrupted (checkpoints, weights, JSON); only with no worker."""
        return [] if self.is_active else remove_temp_files(self.path)

    def wait(self, timeout=60.0, poll=0.2, proc=None):
        """Block until the run is no longer active (or ``timeout`` s); returns the status.
        ``proc``: the worker's Popen, waited on (and reaped) meanwhile."""
        import subprocess

        deadline = time.monotonic() + timeout
        while True:
            if proc is not None:
                try:
                    proc.wait(timeout=max(0.0, min(poll, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
            status = self.status()
            if status.get("state") not in ACTIVE_STATES or time.monotonic() >= deadline:
                if proc is not None and status.get("state") not in ACTIVE_STATES:
                    try:  # the worker writes its last status just before it exits
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                return status
            if proc is None:
                time.sleep(poll)

    # ------------------------------------------------------------------ the model it trained
    def weights_file(self):
        """(path, mtime) of the weights this run answers with: final weights, else its last
        checkpoint; None before either exists."""
        for path in (self.model_path, self.checkpoint_path, self.checkpoint_path.with_name("previous.pt")):
            if path.is_file():
                return path, path.stat().st_mtime
        return None

    def load_model(self, *, device="cpu"):
        """The ``GPTModel`` this run trained (eval mode): its final weights, or the model in its
        last checkpoint for a run stopped before the end. Raises RunError if it has neither."""
        from ..model import GPTModel, model_config
        from .finetuned import load_finetuned

        if self.model_path.is_file():
            return load_finetuned(self.model_path, device=device)
        if not self.has_checkpoint:
            raise RunError(f"run {self.name!r} has neither final weights nor a checkpoint yet")
        if self.config.lora_rank:  # adapters only: rebuild the base, put them on, fold them in
            return self.merged_model(device=device)
        model = GPTModel(model_config(self.config.model))
        model.load_state_dict(load_checkpoint(self.checkpoint_path)["model"])
        return model.to(device).eval()

    def merged_model(self, adapter=None, *, device="cpu"):
        """A LoRA run's base model with its adapters merged in (a plain ``GPTModel``, eval mode).

        ``adapter``: an adapter state; default the final adapters, else the last checkpoint's.
        Needs the base weights the run started from (downloaded, or the seeded random ones).
        """
        from ..lora import merge_lora
        from .adapters import load_adapter_state, read_adapter
        from .models import build_model

        config = self.config
        if not config.lora_rank:
            raise RunError(f"run {self.name!r} fine-tuned every weight: it has no LoRA adapters to merge")
        source = "given adapters"
        if adapter is None:
            if self.adapter_path.is_file():
                adapter, source = read_adapter(self.adapter_path), str(self.adapter_path)
            elif self.has_checkpoint:
                adapter, source = load_checkpoint(self.checkpoint_path)["model"], str(self.checkpoint_path)
            else:
                raise RunError(f"run {self.name!r} has no adapters yet (no checkpoint)")
        with torch.random.fork_rng(devices=[]):
            model = build_model(config)
        load_adapter_state(model, adapter, source=source)
        return merge_lora(model).to(device).eval()


class BrokenRun:
    """A folder under runs/ that cannot be read as a run; ``reason`` says why. It can be deleted."""

    is_broken = True

    def __init__(self, path, reason):
        self.path = Path(path).resolve()
        self.name, self.root, self.reason = self.path.name, self.path.parent, reason

    def status(self):
        return {"state": "unreadable", "error": self.reason}

    state = property(lambda self: "unreadable")
    is_active = False

    def summary(self):
        return {"name": self.name, "state": "unreadable", "model": None, "method": None, "weights": None, "path": None,
                "epochs": None, "step": None, "total_steps": None, "train_loss": None, "val_loss": None,
                "created": None, "updated": None, "device": None, "error": self.reason}

    def delete(self):
        shutil.rmtree(self.path)


Run.is_broken = False


def _open_listed(path):
    try:
        run = Run(path)
        run.config  # noqa: B018 - reading it is the check
    except ConfigError as exc:
        return BrokenRun(path, "; ".join(exc.problems))
    except (OSError, ValueError) as exc:
        return BrokenRun(path, f"{type(exc).__name__}: {exc}")
    try:
        status = read_json(run.status_path, {})
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        return BrokenRun(path, f"{run.status_path.name} is not valid JSON ({exc})")
    if not isinstance(status, dict):
        return BrokenRun(path, f"{run.status_path.name} holds a {type(status).__name__}, not a JSON object")
    return run


def list_runs(root="runs"):
    """Runs under ``root``, newest first; folders that cannot be read come last, as ``BrokenRun``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [_open_listed(p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()]
    runs = [r for r in found if not r.is_broken]
    created = {r.name: (r._read_status().get("created") or 0) for r in runs}
    runs.sort(key=lambda r: created[r.name], reverse=True)
    return runs + [r for r in found if r.is_broken]
