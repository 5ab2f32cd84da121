"""Runs compared (sft.studio.experiments): only the settings that differ, and each run's figures."""
import json

import pytest

from sft.judge import default_scores_path
from sft.studio.config import TrainConfig
from sft.studio.experiments import compare_runs, loss_curves
from sft.studio.runs import Run
from sft.studio.worker import execute_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_what_differs_and_each_runs_figures(tmp_path):
    base = dict(model="tiny", weights="random", limit=30, batch_size=2, max_steps=3, eval_freq=1, eval_iter=1,
                allowed_max_length=48, sample_each_epoch=False, response_tokens=2, device="cpu", precision="fp32")
    a = Run.create(TrainConfig(**base), root=tmp_path, name="a")
    b = Run.create(TrainConfig(**{**base, "prompt_style": "phi3", "lr": 1e-3}), root=tmp_path, name="b")
    for run in (a, b):
        execute_run(run)
    table = compare_runs([a, b])
    assert table["differs"] == {"lr": [5e-05, 0.001], "prompt_style": ["alpaca", "phi3"]}
    row = table["rows"][0]
    assert (row["run"], row["method"], row["state"], row["steps"]) == ("a", "full", "completed", 3)
    done = a.read_metrics("done")[-1]
    assert row["val_loss"] == done["val_loss"] and row["training_s"] == done["elapsed"] > 0
    assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 10
    assert row["judge_mean"] is None and row["judged"] == 0
    # Scored answers: the mean and its interval come from the run's scores file.
    answers = json.loads(a.responses_path.read_text())
    store = default_scores_path(a.responses_path, "model_response")
    store.write_text("".join(json.dumps({"key": f"k{i}", "index": i, "judge": "ollama:llama3 {}", "score": s}) + "\n"
                             for i, s in enumerate([40, 60, None][:len(answers)])))
    row = compare_runs([a])["rows"][0]
    assert row["judged"] == 2 and row["judge_mean"] == 50.0 and row["judge_ci"][0] <= 50 <= row["judge_ci"][1]
    steps, train, val = loss_curves(a)
    assert steps == [0, 1, 2] and len(val) == 3 and compare_runs([a])["differs"] == {}
