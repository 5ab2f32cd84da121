"""Run folders: atomic files, status, metrics, locks, and the detached training worker."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sft.runs import (
    DeviceBusyError,
    Run,
    RunError,
    acquire_device_lock,
    atomic_write_json,
    atomic_write_text,
    device_lock_holder,
    list_runs,
    release_device_lock,
)
from sft.training import ConfigError, TrainConfig

# Workers get one thread each: the test machine's two cores are shared.
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_config(**settings):
    """The tiny random model on 20 entries (17 train, 2 test, 1 val), short sequences."""
    return TrainConfig(**{"model": "tiny", "weights": "random", "limit": 20, "batch_size": 2, "epochs": 1,
                          "eval_freq": 1000, "eval_iter": 1, "allowed_max_length": 32, "sample_tokens": 3,
                          "response_tokens": 4, "device": "cpu", "precision": "fp32", **settings})


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_until(predicate, proc, timeout=120):
    """Poll ``predicate`` until true, waiting on the worker in between; False on timeout or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        try:
            proc.wait(timeout=0.1)
            return predicate()
        except subprocess.TimeoutExpired:
            pass
    return False


def progress_step(run):
    return (run.status().get("progress") or {}).get("step", -1)


# ============================================================================ files

def test_atomic_writes_leave_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    atomic_write_json(path, {"state": "running"})
    assert json.loads(path.read_text()) == {"state": "running"}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not serialisable: fails before any write
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "half")
    assert json.loads(path.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp files left


def test_create_open_and_list(tmp_path):
    root = tmp_path / "runs"
    a = Run.create(tiny_config(), root=root, name="a")
    b = Run.create(tiny_config(epochs=2), root=root)
    assert a.config == tiny_config() and b.config.epochs == 2
    assert a.status()["state"] == "created" and a.status()["pid"] is None
    assert Run.open("a", root=root).path == a.path and Run.open(a.path).name == "a"
    assert [r.name for r in list_runs(root)] == [b.name, a.name]  # newest first
    assert list_runs(tmp_path / "none") == []
    with pytest.raises(FileExistsError):
        Run.create(tiny_config(), root=root, name="a")
    with pytest.raises(ValueError, match="run name"):
        Run.create(tiny_config(), root=root, name="../escape")
    with pytest.raises(ConfigError):
        Run.create(tiny_config(epochs=0), root=root, name="c")
    assert not (root / "c").exists()
    with pytest.raises(FileNotFoundError, match="no run at"):
        Run(tmp_path)
    summary = a.summary()
    assert summary["name"] == "a" and summary["state"] == "created" and summary["model"] == "tiny"
    assert a.model_path.name == "tinyrandom-sft.pth"


def test_metrics_drop_work_redone_after_a_resume(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="r")
    run.update_status(state="running")
    for step in range(5):
        run.record_event({"type": "step", "step": step, "loss": 1.0 / (step + 1), "epoch": 1})
    run.record_event({"type": "eval", "step": 4, "train_loss": 0.5, "val_loss": 0.6})
    run.record_event({"type": "resumed", "step": 2})  # crashed after step 4, checkpoint at step 2
    for step in range(3, 6):
        run.record_event({"type": "step", "step": step, "loss": 0.1})
    with open(run.metrics_path, "a") as f:
        f.write('{"type": "step", "st')  # a line being written
    assert [e["step"] for e in run.read_metrics("step")] == [0, 1, 2, 3, 4, 5]
    assert run.read_metrics("eval") == []
    status = run.status()
    assert status["progress"]["step"] == 5 and status["progress"]["val_loss"] == 0.6
    curves = run.loss_curves()
    assert curves["step_steps"] == [0, 1, 2, 3, 4, 5] and curves["step_loss"][:2] == [1.0, 0.5]
    assert curves["train_loss"] == [] and curves["step"] == []


def test_launch_refuses_what_cannot_start(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="r")
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        run.resume(env=WORKER_ENV)
    run.record_event({"type": "step", "step": 0})
    with pytest.raises(RunError, match="already trained: resume it, or create a new run"):
        run.launch(env=WORKER_ENV)
    assert device_lock_holder(tmp_path, "cpu") is None and not run.log_path.exists()
    run.delete()
    assert not run.path.exists()


def test_tail_log_and_request_stop(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="r")
    assert run.tail_log() == ""
    run.log_path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert run.tail_log(3) == "line 97\nline 98\nline 99"
    assert run.request_stop() is False and not run.stop_path.exists()  # nothing to stop
    run.update_status(state="running", pid=os.getpid())
    assert run.request_stop() is True
    assert run.stop_path.exists() and run.state == "stopping"


def test_dead_worker_is_reported_failed_with_log_tail(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="r")
    run.log_path.write_text("Traceback (most recent call last):\nMemoryError\n")
    run.update_status(state="running", pid=dead_pid())
    status = run.status()
    assert status["state"] == "failed" and "exited without finishing" in status["error"]
    assert status["log_tail"].endswith("MemoryError")
    assert Run(run.path).status()["state"] == "failed"  # recorded, not only reported


def test_device_lock(tmp_path):
    lock = acquire_device_lock(tmp_path, "cpu", "first", pid=os.getppid())  # a live process
    assert device_lock_holder(tmp_path, "cpu")["run"] == "first"
    with pytest.raises(DeviceBusyError, match="run 'first'"):
        acquire_device_lock(tmp_path, "cpu", "second")
    run = Run.create(tiny_config(), root=tmp_path, name="second")
    with pytest.raises(DeviceBusyError, match="busy"):
        run.launch(env=WORKER_ENV)
    assert run.state == "created" and not run.log_path.exists()
    release_device_lock(lock, pid=os.getppid())
    # a lock left by a process that died is cleared
    acquire_device_lock(tmp_path, "cpu", "crashed", pid=dead_pid())
    assert device_lock_holder(tmp_path, "cpu") is None
    mine = acquire_device_lock(tmp_path, "cpu", "third")
    assert json.loads(mine.read_text())["pid"] == os.getpid()
    release_device_lock(mine)
    assert not mine.exists()


# ============================================================================ the worker process

@pytest.mark.slow
def test_worker_stop_then_resume_completes(tmp_path):
    root = tmp_path / "runs"
    run = Run.create(tiny_config(epochs=100000), root=root, name="long")
    proc = run.launch(env=WORKER_ENV)
    assert wait_until(lambda: progress_step(run) >= 2, proc), run.tail_log()
    assert run.state == "running" and run.status()["pid"] == proc.pid
    assert device_lock_holder(root, "cpu")["pid"] == proc.pid
    with pytest.raises(RunError, match="already running"):
        run.launch(env=WORKER_ENV)
    run.request_stop()
    assert proc.wait(timeout=120) == 0, run.tail_log()
    status = run.status()
    assert status["state"] == "stopped", status
    assert not run.stop_path.exists() and device_lock_holder(root, "cpu") is None
    stopped_at = torch.load(run.checkpoint_path, weights_only=True)["global_step"]
    assert stopped_at >= 2

    config = run.config  # finish three steps later
    config.max_steps = stopped_at + 4
    config.save(run.config_path)
    proc = run.resume(env=WORKER_ENV)
    status = run.wait(timeout=180)
    assert proc.returncode == 0 and status["state"] == "completed", run.tail_log()
    assert [e["step"] for e in run.read_metrics("step")] == list(range(stopped_at + 4))
    assert [e["step"] for e in run.read_metrics("resumed")] == [stopped_at]
    answers = json.loads(run.responses_path.read_text())
    assert len(answers) == 2 and all("model_response" in a for a in answers)
    for suffix in (".pth", ".safetensors", ".json"):
        assert run.model_path.with_suffix(suffix).is_file()
    assert "resume" in run.log_path.read_text()


@pytest.mark.slow
def test_killed_worker_is_failed_and_frees_the_device(tmp_path):
    run = Run.create(tiny_config(epochs=100000), root=tmp_path, name="doomed")
    proc = run.launch(env=WORKER_ENV)
    assert wait_until(lambda: progress_step(run) >= 0, proc), run.tail_log()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    status = run.status()
    assert status["state"] == "failed" and str(proc.pid) in status["error"]
    lock = acquire_device_lock(tmp_path, "cpu", "next")  # the dead worker's lock is stale
    release_device_lock(lock)


@pytest.mark.slow
def test_worker_reports_a_bad_dataset(tmp_path):
    run = Run.create(tiny_config(data=str(tmp_path / "missing.json")), root=tmp_path, name="bad")
    proc = run.launch(env=WORKER_ENV)
    status = run.wait(timeout=120)
    assert proc.returncode == 1
    assert status["state"] == "failed" and "missing.json" in status["error"]
    assert "missing.json" in run.tail_log()
