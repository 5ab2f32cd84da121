"""Run folders: status, metrics, the device lock, and the detached training worker."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sft.studio.config import ConfigError, TrainConfig
from sft.studio.files import atomic_write_json, atomic_write_text
from sft.studio.locks import DeviceBusyError, DeviceLock, holder
from sft.studio.runs import Run, RunError, list_runs
from sft.studio.worker import launch_worker, resume_worker

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


# ============================================================================ run folders

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
        resume_worker(run, env=WORKER_ENV)
    run.checkpoint_path.parent.mkdir()
    run.checkpoint_path.write_bytes(b"a checkpoint")  # a run with a checkpoint is resumed, not restarted
    with pytest.raises(RunError, match="already trained: resume it, or create a new run"):
        launch_worker(run, env=WORKER_ENV)
    assert holder("cpu") is None and not run.log_path.exists()
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
    lock = DeviceLock.acquire("cpu", run="first")
    assert holder("cpu")["run"] == "first" and holder("cpu")["pid"] == os.getpid()
    with pytest.raises(DeviceBusyError, match="run 'first'"):
        DeviceLock.acquire("cpu", run="second")
    run = Run.create(tiny_config(), root=tmp_path, name="second")
    with pytest.raises(DeviceBusyError, match="busy"):
        launch_worker(run, env=WORKER_ENV)
    assert run.state == "created" and not run.log_path.exists()
    lock.release()
    assert holder("cpu") is None
    # A process that took the lock and died (kill -9) leaves it free: the kernel drops it.
    code = "import os; from sft.studio.locks import DeviceLock; DeviceLock.acquire('cpu', run='crashed'); " \
           "os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", code], env=WORKER_ENV, check=False)
    assert holder("cpu") is None
    with DeviceLock.acquire("cpu", run="third"):
        assert holder("cpu")["run"] == "third"
    assert holder("cpu") is None


# ============================================================================ the worker process

@pytest.mark.slow
def test_worker_stop_then_resume_completes(tmp_path):
    root = tmp_path / "runs"
    run = Run.create(tiny_config(epochs=100000), root=root, name="long")
    proc = launch_worker(run, env=WORKER_ENV)
    assert wait_until(lambda: progress_step(run) >= 2, proc), run.tail_log()
    assert run.state == "running" and run.status()["pid"] == proc.pid
    assert holder("cpu")["pid"] == proc.pid
    with pytest.raises(RunError, match="already running"):
        launch_worker(run, env=WORKER_ENV)
    run.request_stop()
    assert proc.wait(timeout=120) == 0, run.tail_log()
    status = run.status()
    assert status["state"] == "stopped", status
    assert not run.stop_path.exists() and holder("cpu") is None
    stopped_at = torch.load(run.checkpoint_path, weights_only=True)["global_step"]
    assert stopped_at >= 2

    config = run.config  # finish three steps later
    config.max_steps = stopped_at + 4
    config.save(run.config_path)
    proc = resume_worker(run, env=WORKER_ENV)
    status = run.wait(timeout=180, proc=proc)
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
    proc = launch_worker(run, env=WORKER_ENV)
    assert wait_until(lambda: progress_step(run) >= 0, proc), run.tail_log()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    status = run.status()
    assert status["state"] == "failed" and str(proc.pid) in status["error"]
    DeviceLock.acquire("cpu", run="next").release()  # the dead worker's lock went with it


@pytest.mark.slow
def test_worker_reports_a_bad_dataset(tmp_path):
    run = Run.create(tiny_config(data=str(tmp_path / "missing.json")), root=tmp_path, name="bad")
    proc = launch_worker(run, env=WORKER_ENV)
    status = run.wait(timeout=120, proc=proc)
    assert proc.returncode == 1
    assert status["state"] == "failed" and "missing.json" in status["error"]
    assert "missing.json" in run.tail_log()
