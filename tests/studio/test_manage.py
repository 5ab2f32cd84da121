"""Deleting and renaming runs (sft.studio.manage): refused while a worker owns the run or it is queued;
a rename moves the folder and what records its name, and the renamed run still loads its model."""
import json
import os

import pytest
import torch

from sft.studio.config import TrainConfig
from sft.studio.manage import delete_run, rename_run, settings_changes
from sft.studio.queue import enqueue
from sft.studio.runs import Run, RunError, list_runs
from sft.studio.worker import execute_run


def tiny_config(**settings):
    return TrainConfig(**{"model": "tiny", "weights": "random", "limit": 20, "batch_size": 2, "epochs": 1,
                          "max_steps": 1, "eval_freq": 1000, "eval_iter": 1, "allowed_max_length": 32,
                          "sample_each_epoch": False, "response_tokens": 2, "device": "cpu", "precision": "fp32",
                          **settings})


def running(run):
    """Mark ``run`` as trained by a live worker (this test process)."""
    from sft.studio.locks import create_time

    run.update_status(state="running", pid=os.getpid(), pid_started=create_time(os.getpid()))


def test_delete_refuses_an_active_or_queued_run_and_removes_a_finished_one(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="r")
    running(run)
    with pytest.raises(RunError, match="run 'r' is running: stop it before deleting it"):
        delete_run(run)
    run.update_status(state="stopped")
    enqueue(run, start_runner=False)
    with pytest.raises(RunError, match="run 'r' is queued: take it out of the queue before deleting it"):
        delete_run(run)
    assert run.path.is_dir()
    run.update_status(state="completed")
    delete_run(run)
    assert not run.path.exists() and list_runs(tmp_path) == []


def test_rename_checks_the_name_and_refuses_what_it_must(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="old")
    Run.create(tiny_config(), root=tmp_path, name="taken")
    with pytest.raises(ValueError, match="use letters, digits"):
        rename_run(run, "no spaces")
    with pytest.raises(ValueError, match="use letters, digits"):
        rename_run(run, "../escape")
    with pytest.raises(RunError, match="a run named 'taken' exists already"):
        rename_run(run, "taken")
    running(run)
    with pytest.raises(RunError, match="run 'old' is running: stop it before renaming it"):
        rename_run(run, "new")
    run.update_status(state="stopped")
    enqueue(run, start_runner=False)
    with pytest.raises(RunError, match="queued: take it out of the queue before renaming it"):
        rename_run(run, "new")
    assert sorted(r.name for r in list_runs(tmp_path)) == ["old", "taken"]
    assert rename_run(Run.open("taken", root=tmp_path), "taken").name == "taken"  # the same name: no change


def test_rename_moves_the_folder_and_what_records_its_name(tmp_path):
    run = Run.create(tiny_config(), root=tmp_path, name="first")
    execute_run(run)
    before = run.load_model()
    old_path, config = run.path, run.config
    assert json.loads(run.model_path.with_suffix(".json").read_text())["extra"]["run"] == "first"
    (run.path / "worker.json").write_text(json.dumps({"pid": 1, "run": "first"}))

    renamed = rename_run(run, "second.v2")
    assert renamed.name == "second.v2" and renamed.path == (tmp_path / "second.v2").resolve()
    assert not old_path.exists() and [r.name for r in list_runs(tmp_path)] == ["second.v2"]
    assert renamed.state == "completed" and renamed.config == config
    info = json.loads(renamed.model_path.with_suffix(".json").read_text())
    assert info["extra"]["run"] == "second.v2"
    assert json.loads((renamed.path / "worker.json").read_text()) == {"pid": 1, "run": "second.v2"}
    saved = renamed.read_metrics("saved")[-1]["paths"]
    assert saved["pth"] == str(renamed.model_path) and all(p.startswith(str(renamed.path)) for p in saved.values())
    after = renamed.load_model()  # the weights' SHA-256 still matches their .json
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name
    assert renamed.responses_path.is_file()


def test_settings_changes_names_what_differs_but_not_where_models_are():
    a = tiny_config()
    b = TrainConfig.from_dict({**a.to_dict(), "lr": 1e-3, "models_dir": "elsewhere"})
    assert settings_changes(a, b) == {"lr": (a.lr, 1e-3)}
    assert settings_changes(a, a) == {}
    assert settings_changes(a, TrainConfig.from_dict({**a.to_dict(), "model": "tiny (random)"})) == {}
    assert settings_changes(a, TrainConfig.from_dict({**a.to_dict(), "model": "124M"}))["model"] == ("tiny", "124M")
