"""The queue (sft.studio.queue): runs wait in line for the device, in an order that can be changed, and the
next one starts when the device frees, even after the runner or a worker is killed."""
import os
import signal
import time
from pathlib import Path

import pytest

from sft.studio.config import TrainConfig
from sft.studio.locks import DeviceLock
from sft.studio.queue import dequeue, enqueue, ensure_runner, move, queue_table, queued_runs, runner_alive
from sft.studio.runs import Run, RunError

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def tiny(**settings):
    return TrainConfig(**{"model": "tiny", "weights": "random", "limit": 20, "batch_size": 2, "max_steps": 2,
                          "eval_freq": 1000, "eval_iter": 1, "allowed_max_length": 32, "sample_each_epoch": False,
                          "response_tokens": 2, "device": "cpu", "precision": "fp32", **settings})


def until(predicate, timeout=180, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def test_the_line_keeps_its_order_and_can_be_changed(tmp_path):
    runs = [Run.create(tiny(), root=tmp_path, name=n) for n in ("a", "b", "c")]
    assert [enqueue(r, start_runner=False) for r in runs] == [1, 2, 3]
    assert [r.name for r in queued_runs(tmp_path, "cpu")] == ["a", "b", "c"]
    move(runs[2], 1)
    assert [r.name for r in queued_runs(tmp_path, "cpu")] == ["c", "a", "b"]
    dequeue(runs[1])
    assert [row["run"] for row in queue_table(tmp_path)] == ["c", "a"] and runs[1].state == "created"
    with pytest.raises(RunError, match="already queued"):
        enqueue(runs[0], start_runner=False)
    with pytest.raises(RunError, match="is not queued"):
        move(runs[1], 1)


@pytest.mark.slow
def test_queued_runs_start_in_turn_when_the_device_frees_even_after_kills(tmp_path):
    busy = DeviceLock.acquire("cpu", run="someone-else")  # the device is training something
    first = Run.create(tiny(max_steps=None, epochs=100000), root=tmp_path, name="first")  # trains until killed
    second = Run.create(tiny(), root=tmp_path, name="second")
    enqueue(first, env=ENV)
    enqueue(second, env=ENV)
    assert until(lambda: runner_alive(tmp_path, "cpu"), timeout=30)
    time.sleep(2)  # the runner waits for the device: nothing starts meanwhile
    assert first.state == "queued" and second.state == "queued"
    # The runner crashes (kill -9): the queue lives in the run folders; a new runner takes it over.
    runner = next(int(line.split()[0]) for line in os.popen("pgrep -af 'sft queue run'").read().splitlines()
                  if str(tmp_path) in line)
    os.kill(runner, signal.SIGKILL)
    assert until(lambda: not runner_alive(tmp_path, "cpu"), timeout=30)
    ensure_runner(tmp_path, "cpu", env=ENV)
    busy.release()  # the device frees
    assert until(lambda: first.state in ("starting", "running", "completed"))
    # Kill the first run's worker mid-way: it fails, and the next queued run starts all the same.
    assert until(lambda: (first.status().get("progress") or {}).get("step", -1) >= 1, timeout=120)
    assert second.state == "queued"
    os.kill(first.status()["pid"], signal.SIGKILL)
    assert until(lambda: second.state == "completed", timeout=240), (second.status(), second.tail_log())
    assert first.state == "failed" and "crashed or killed" in first.status()["error"]
    assert first.status()["started"] < second.status()["started"]
    assert queued_runs(tmp_path) == []
