"""`python -m sft dpo`: flags generated from DPOConfig with the notebook's defaults, and a tiny DPO run from a
finished tiny instruction run."""
import pytest

from sft.cli import main
from sft.studio.config import TrainConfig
from sft.studio.dpo_config import DPOConfig
from sft.studio.dpo_trainer import REFERENCE_FILE
from sft.studio.runs import Run
from sft.studio.worker import execute_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_help_shows_the_notebooks_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--from-run FROM_RUN", "--beta BETA", "(the notebook: 0.1) (default: 0.1)",
                     "AdamW learning rate (the notebook: 5e-6) (default: 5e-06)", "--identical {error,keep,drop}",
                     "--resume", "--max-steps"):
        assert expected in text, expected
    assert "--kind" not in text


def test_dpo_from_a_finished_run(capsys, tmp_path):
    source = Run.create(TrainConfig.from_settings(model="tiny", limit=20, max_steps=2, batch_size=4, device="cpu",
                                                  sample_each_epoch=False, precision="fp32"),
                        root=tmp_path, name="sft")
    execute_run(source, responses=False)
    code = main(["dpo", "--from-run", str(source.path), "--limit", "24", "--max-steps", "3", "--batch-size", "4",
                 "--eval-freq", "2", "--eval-iter", "1", "--device", "cpu", "--no-sample-each-epoch",
                 "--no-responses", "--runs-root", str(tmp_path), "--name", "dpo", "--progress", "plain"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = Run(tmp_path / "dpo")
    config = run.config
    assert isinstance(config, DPOConfig) and config.from_run == str(source.path) and config.beta == 0.1
    assert run.state == "completed" and run.model_path.is_file() and (run.path / REFERENCE_FILE).is_file()
    assert f"start from run {source.path}" in out and "Training done: 3 steps" in out
    assert "Ep 1 (Step 000000): Train loss 0.69" in out and ", Train reward margins " in out
    evals = run.read_metrics("eval")
    assert [e["step"] for e in evals] == [0, 2] and all("train_margin" in e for e in evals)
    # a second call on the same folder with settings is refused; --resume needs a DPO run
    assert main(["dpo", "--run-dir", str(run.path), "--beta", "0.2"]) == 2
    assert main(["dpo", "--run-dir", str(source.path), "--resume"]) == 2
    assert "not a DPO run" in capsys.readouterr().err
