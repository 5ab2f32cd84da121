"""``python -m sft runs``: list the run folders, rename one, delete one; a busy run is refused."""
import pytest

from sft.cli import main
from sft.studio.config import TrainConfig
from sft.studio.runs import Run


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def two_runs(tmp_path):
    root = tmp_path / "runs"
    done = Run.create(TrainConfig(model="tiny", weights="random", max_steps=1), root=root, name="first")
    done.update_status(state="completed", progress={"step": 1, "total_steps": 1, "train_loss": 9.5, "val_loss": 9.75})
    busy = Run.create(TrainConfig(model="tiny", weights="random", lora_rank=4), root=root, name="second")
    return root, done, busy


def test_runs_list_rename_delete(capsys, tmp_path, two_runs):
    root, done, busy = two_runs
    code, out, _ = cli(capsys, "runs", "list", "--runs-root", str(root))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[1].split()[:4] == ["first", "completed", "tiny", "full"]
    assert "step 1/1" in lines[1] and "train 9.500 val 9.750" in lines[1]
    assert lines[0].split()[0] == "second" and "lora" in lines[0].lower()

    code, out, _ = cli(capsys, "runs", "rename", "first", "renamed", "--runs-root", str(root))
    assert code == 0 and "Renamed first to renamed" in out
    assert (root / "renamed" / "config.json").is_file() and not (root / "first").exists()

    code, _, err = cli(capsys, "runs", "rename", "renamed", "second", "--runs-root", str(root))
    assert code == 1 and "a run named 'second' exists already" in err

    code, out, _ = cli(capsys, "runs", "delete", "renamed", "--yes", "--runs-root", str(root))
    assert code == 0 and "Deleted renamed" in out and not (root / "renamed").exists()


def test_runs_delete_asks_first_and_refuses_a_training_run(capsys, monkeypatch, two_runs):
    root, done, busy = two_runs
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, out, _ = cli(capsys, "runs", "delete", "first", "--runs-root", str(root))
    assert code == 1 and "Nothing deleted" in out and done.path.is_dir()
    monkeypatch.setattr(type(busy), "state", property(lambda self: "running"))
    code, _, err = cli(capsys, "runs", "delete", "second", "--yes", "--runs-root", str(root))
    assert code == 1 and "is running: stop it before deleting it" in err and busy.path.is_dir()
    code, _, err = cli(capsys, "runs", "delete", "nope", "--yes", "--runs-root", str(root))
    assert code == 1 and "nope" in err
