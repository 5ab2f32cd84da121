"""Issue 11: no dead ends after a crash, a full disk or a bad folder; one training per device, really.

Each test reproduces what a tester's attack did (kill -9 at chosen moments, full disks, racing
launches, hostile files) and checks the run can always reach a final state and be continued.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sft.studio.config import TrainConfig
from sft.studio.files import append_jsonl, atomic_write_json, read_jsonl
from sft.studio.locks import DeviceBusyError, DeviceLock, holder, lock_path
from sft.studio.runs import Run, RunError, list_runs
from sft.studio.worker import execute_run, launch_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**settings):
    return TrainConfig(**{"model": "tiny", "weights": "random", "limit": 20, "batch_size": 2, "epochs": 1,
                          "eval_freq": 1000, "eval_iter": 1, "allowed_max_length": 32, "sample_each_epoch": False,
                          "response_tokens": 2, "device": "cpu", "precision": "fp32", **settings})


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- 1, 6: locks

def test_an_empty_or_garbled_lock_file_means_nothing(tmp_path):
    path = lock_path("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    for content in (b"", b"{not json", b"[1, 2]"):  # a full disk at launch, a kill mid-write
        path.write_bytes(content)
        assert holder("cpu") is None
        run = Run.create(tiny(), root=tmp_path, name=f"r{len(content)}")
        with DeviceLock.acquire("cpu", run=run.name):
            assert holder("cpu")["run"] == run.name
        assert holder("cpu") is None


RACER = """
import sys, time
from sft.studio.locks import DeviceBusyError, DeviceLock
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
try:
    lock = DeviceLock.acquire("cpu", run=sys.argv[2])
except DeviceBusyError:
    print("busy")
except Exception as exc:
    print("error", type(exc).__name__, exc)
else:
    print("ok")
    sys.stdout.flush()
    time.sleep(1.5)
"""


def test_racing_launchers_get_exactly_one_lock_and_a_clear_busy(tmp_path):
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(start), f"racer{i}"], env=WORKER_ENV,
                              stdout=subprocess.PIPE, text=True) for i in range(8)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outputs) == ["busy"] * 7 + ["ok"], outputs


def test_the_lock_belongs_to_the_machine_not_to_a_runs_folder(tmp_path):
    a = Run.create(tiny(), root=tmp_path / "runs-a", name="a")
    b = Run.create(tiny(), root=tmp_path / "runs-b", name="b")
    with DeviceLock.acquire("cpu", run=a.name):  # a training from another runs folder (or app session)
        with pytest.raises(DeviceBusyError, match="run 'a'"):
            launch_worker(b, env=WORKER_ENV)
        with pytest.raises(DeviceBusyError):  # a second session of the same server process
            DeviceLock.acquire("cpu", run="b")
    assert b.state == "created"


# ---------------------------------------------------------------------------------------------- 2: failed spawn

def test_a_worker_that_cannot_start_leaves_a_failed_run_and_a_free_device(tmp_path):
    run = Run.create(tiny(), root=tmp_path, name="nospawn")
    with pytest.raises(RunError, match="could not start the training worker"):
        launch_worker(run, python=str(tmp_path / "no-such-python"), env=WORKER_ENV)
    status = run.status()
    assert status["state"] == "failed" and "could not start" in status["error"]
    assert holder("cpu") is None
    proc = launch_worker(run, env=WORKER_ENV)  # and it can start again: a way out
    assert run.wait(timeout=120, proc=proc)["state"] == "completed", run.tail_log()


def test_a_starting_run_whose_launcher_died_is_failed_and_stop_is_no_trap(tmp_path):
    run = Run.create(tiny(), root=tmp_path, name="orphan")
    run.update_status(state="starting", pid=None, launcher_pid=dead_pid(), launcher_started=None)
    assert run.request_stop() is False  # not "stopping" for good: the run is seen to be dead first
    status = run.status()
    assert status["state"] == "failed" and "never started" in status["error"]


# ---------------------------------------------------------------------------------------------- 3: bad folders

def test_one_bad_run_folder_hides_nothing(tmp_path):
    good = Run.create(tiny(), root=tmp_path, name="good")
    for name, config, status in (("bad-json", "{oops", None), ("other-version", {**tiny().to_dict(), "flux": 1}, None),
                                 ("status-list", tiny().to_dict(), [1, 2])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if status is not None:
            (folder / "status.json").write_text(json.dumps(status))
    runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["good", "bad-json", "other-version", "status-list"]
    broken = {r.name: r for r in runs if r.is_broken}
    assert "not valid JSON" in broken["bad-json"].reason
    assert "unknown setting 'flux'" in broken["other-version"].reason
    assert "holds a list" in broken["status-list"].reason
    assert all(r.summary()["state"] == "unreadable" for r in broken.values())
    broken["bad-json"].delete()
    assert not (tmp_path / "bad-json").exists() and good.summary()["state"] == "created"


# ---------------------------------------------------------------------------------------------- 4: no checkpoint yet

def test_a_run_killed_before_its_first_checkpoint_starts_again_from_zero(tmp_path):
    run = Run.create(tiny(max_steps=3), root=tmp_path, name="early")
    run.update_status(state="running", pid=dead_pid())  # it had trained two steps when it was killed
    for step in (0, 1):
        run.record_event({"type": "step", "step": step, "loss": 9.0})
    assert run.state == "failed" and not run.has_checkpoint
    with pytest.raises(RunError, match="start it again from step 0"):
        execute_run(run, resume=True)
    execute_run(run)  # no "already trained": a fresh start
    assert run.state == "completed"
    assert [e["step"] for e in run.read_metrics("step")] == [0, 1, 2]
    assert all(e["loss"] != 9.0 for e in run.read_metrics("step"))


def test_checkpoints_come_by_time_too_and_the_previous_one_is_kept(tmp_path):
    run = Run.create(tiny(max_steps=4, checkpoint_minutes=1e-9), root=tmp_path, name="timed")
    execute_run(run, responses=False)
    reasons = [e["reason"] for e in run.read_metrics("checkpoint")]
    assert reasons.count("periodic") == 3 and reasons[-1] == "max_steps"
    previous = torch.load(run.checkpoint_path.with_name("previous.pt"), weights_only=True)
    assert previous["global_step"] == 2 and torch.load(run.checkpoint_path, weights_only=True)["global_step"] == 3


# ---------------------------------------------------------------------------------------------- 5: duplicates

def test_the_duplicates_choice_travels_into_the_run(tmp_path, instruction_data):
    data = tmp_path / "dups.json"
    data.write_text(json.dumps(instruction_data[:10] + instruction_data[:10]))
    failing = Run.create(tiny(data=str(data), limit=None, max_steps=1), root=tmp_path, name="default-rule")
    with pytest.raises(ValueError, match="entry 10: duplicate of entry 0"):
        execute_run(failing)
    kept = Run.create(tiny(data=str(data), limit=None, max_steps=1, duplicates="keep"), root=tmp_path, name="kept")
    execute_run(kept, responses=False)
    assert kept.state == "completed"


# ---------------------------------------------------------------------------------------------- 7: temp files

def test_temp_files_of_killed_writes_are_cleaned_when_a_run_is_opened_to_train(tmp_path):
    run = Run.create(tiny(max_steps=1), root=tmp_path, name="litter")
    (run.path / "checkpoints").mkdir()
    litter = [run.path / "checkpoints" / ".last.pt.k3j9x.tmp", run.path / "tinyrandom-sft.pth.tmp4242",
              run.path / ".status.json.a1b2.tmp"]
    for path in litter:
        path.write_bytes(b"\0" * 1000)
    keep = run.path / "notes.txt"
    keep.write_text("mine")
    execute_run(run, responses=False)
    assert not any(p.exists() for p in litter) and keep.read_text() == "mine"


# ---------------------------------------------------------------------------------------------- 9, 10: refuse early

def test_examples_longer_than_the_models_context_fail_before_training(tmp_path, instruction_data):
    long = [{"instruction": "Repeat. " * 200, "input": "", "output": "ok"}] + instruction_data[:19]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(long))
    run = Run.create(tiny(data=str(data), limit=None, allowed_max_length=1024), root=tmp_path, name="long")
    with pytest.raises(Exception, match=r"train entry 0 has \d+ tokens, but tiny \(random\) reads at most 256"):
        execute_run(run)
    status = run.status()
    assert status["state"] == "failed" and "allowed_max_length=256" in status["advice"][0]
    assert run.read_metrics("step") == []  # not a single step spent


def test_a_diverging_run_fails_and_keeps_a_finite_checkpoint(tmp_path):
    run = Run.create(tiny(lr=1000.0, max_steps=10, checkpoint_every=1, fused_adamw=False), root=tmp_path,
                     name="boom")
    with pytest.raises(Exception, match="diverged"):
        execute_run(run)
    status = run.status()
    assert status["state"] == "failed" and "diverged" in status["error"] and status["advice"]
    assert not run.model_path.exists()  # no NaN weights saved as final
    if run.has_checkpoint:
        state = torch.load(run.checkpoint_path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------------------------------------- 11: disk full

def _small_disk(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    return folder, mounted


def test_a_full_disk_says_disk_full_and_where(tmp_path, monkeypatch):
    folder, mounted = _small_disk(tmp_path)
    try:
        if not mounted:  # no permission to mount a small tmpfs here: the same failure, raised by the writer
            import errno

            real_save = torch.save

            def full(obj, f, *a, **k):
                if str(f).endswith(".tmp"):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_save(obj, f, *a, **k)

            monkeypatch.setattr(torch, "save", full)
        run = Run.create(tiny(max_steps=2), root=folder, name="full")  # a tiny checkpoint is ~77 MB
        with pytest.raises(OSError):
            execute_run(run, responses=False)
        status = run.status()
        assert status["state"] == "failed" and status["error"].startswith("disk full"), status
        assert str(run.checkpoint_path.parent) in status["error"]
        assert not list(run.path.rglob("*.tmp"))
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)


def test_a_torn_metrics_line_neither_hides_the_next_event_nor_repeats_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"type": "step", "step": 0})
    with open(path, "a") as f:
        f.write('{"type": "step", "st')  # a kill mid-write
    append_jsonl(path, {"type": "resumed", "step": 0})
    append_jsonl(path, {"type": "step", "step": 1})
    assert read_jsonl(path) == [{"type": "step", "step": 0}, {"type": "resumed", "step": 0},
                                {"type": "step", "step": 1}]


# ---------------------------------------------------------------------------------------------- 15: permissions

def test_written_files_are_readable_by_others_like_any_file(tmp_path):
    path = atomic_write_json(tmp_path / "status.json", {"state": "created"})
    assert path.stat().st_mode & 0o777 == 0o644
