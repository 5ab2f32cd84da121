"""The chapter's exercises as one experiment (sft.studio.exercises): the variants differ from the baseline in
their own settings only, are queued in order, train, answer, get scored by a (fake) judge and are summarised
beside the book's figures, as JSON and as a Markdown table."""
import itertools
import json
import os
from pathlib import Path

import pytest
from fake_servers import FakeOllama

from sft.judge import default_scores_path
from sft.studio import exercises
from sft.studio.config import ConfigError, TrainConfig
from sft.studio.experiments import differing_settings
from sft.studio.files import read_json
from sft.studio.queue import queued_runs
from sft.studio.runs import Run, RunError, list_runs

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# A few steps on a few entries: each run trains 2 steps, evaluates twice and answers its 2 test entries.
TINY = {"model": "tiny", "limit": 20, "seed": 7, "batch_size": 2, "max_steps": 2, "eval_freq": 1, "eval_iter": 1,
        "allowed_max_length": 48, "sample_each_epoch": False, "response_tokens": 3, "device": "cpu",
        "precision": "fp32"}
NAMES = ["baseline", "phi3", "masking", "lora"]
ALL = [*NAMES, "dpo"]  # then DPO on top of the baseline


def test_each_variant_differs_from_the_baseline_in_its_own_settings_only():
    # The workspace's prompt style and masking do not leak into the baseline: it is the chapter's.
    variants = exercises.chapter_exercises({**TINY, "prompt_style": "phi3", "mask_instruction": True})
    assert [v["variant"] for v in variants] == NAMES
    assert [v["exercise"] for v in variants] == ["chapter 7", "exercise 7.1", "exercise 7.2", "exercise 7.4"]
    configs = {v["variant"]: TrainConfig.from_settings(v["settings"]) for v in variants}
    base = configs["baseline"].to_dict()
    assert (base["prompt_style"], base["mask_instruction"], base["lora_rank"]) == ("alpaca", False, 0)
    assert (base["model"], base["limit"], base["seed"], base["weights"]) == ("tiny", 20, 7, "random")
    diffs = {name: {k: v for k, v in c.to_dict().items() if v != base[k]} for name, c in configs.items()}
    assert diffs == {"baseline": {}, "phi3": {"prompt_style": "phi3"}, "masking": {"mask_instruction": True},
                     "lora": {"lora_rank": 16}}  # alpha 16 is the default already: the book's rank 16, alpha 16
    assert configs["lora"].lora_alpha == 16.0 and configs["lora"].lora_targets == "all"
    assert exercises.DPO_VARIANT_READY is True  # DPO on top of the baseline: queued after these four


def test_start_records_the_experiment_and_queues_its_runs_in_order(tmp_path):
    record = exercises.start_chapter_exercises(tmp_path, TINY, experiment="ex", start_runner=False,
                                               judge={"model": "llama3"})
    assert [e["run"] for e in record["runs"]] == [f"ex-{n}" for n in ALL]
    assert read_json(tmp_path / ".experiments" / "ex.json") == record
    assert record["base_settings"] == TINY and record["device"] == "cpu"
    assert record["judge"] == {"backend": "ollama", "url": None, "model": "llama3"}
    assert [r.name for r in queued_runs(tmp_path, "cpu")] == [f"ex-{n}" for n in ALL]
    assert [r.status()["queue_position"] for r in queued_runs(tmp_path, "cpu")] == [1, 2, 3, 4, 5]
    # The DPO run starts from the baseline run's final weights (there when its turn comes), with the DPO
    # notebook's settings on the experiment's data limit, seed and device.
    dpo = Run.open("ex-dpo", root=tmp_path).config
    assert (dpo.kind, dpo.from_run, dpo.model, dpo.weights) == ("dpo", str(tmp_path / "ex-baseline"), "tiny (random)",
                                                               "random")
    assert (dpo.lr, dpo.beta, dpo.epochs, dpo.limit, dpo.seed, dpo.max_steps) == (5e-6, 0.1, 1, 20, 7, 2)
    assert exercises.list_experiments(tmp_path) == ["ex"]
    assert exercises.experiment_busy(tmp_path, "ex") is True
    # Before any run trained: every row is queued, nothing is comparable with the book.
    summary = exercises.summarize_experiment(tmp_path, "ex", score=False, write=False)
    assert [(r["variant"], r["state"]) for r in summary["rows"]] == [(n, "queued") for n in ALL]
    assert summary["note"] == "not comparable with the book (tiny random model)" and summary["lora_faster"] is None
    assert "files" not in summary and not (tmp_path / ".experiments" / "ex.md").exists()


def test_bad_settings_and_taken_names_are_refused_before_any_folder(tmp_path):
    with pytest.raises(ConfigError, match="lr must be > 0"):
        exercises.start_chapter_exercises(tmp_path, {**TINY, "lr": 0.0}, experiment="bad", start_runner=False)
    with pytest.raises(ValueError, match="run name"):
        exercises.start_chapter_exercises(tmp_path, TINY, experiment="no spaces", start_runner=False)
    with pytest.raises(RunError, match=r"gpt2-small \(124M\) \(openai\) is not downloaded"):
        exercises.start_chapter_exercises(tmp_path, {"model": "124M", "models_dir": str(tmp_path / "none")},
                                          experiment="real", start_runner=False)
    assert list_runs(tmp_path) == [] and exercises.list_experiments(tmp_path) == []
    Run.create(TrainConfig(model="tiny", weights="random"), root=tmp_path, name="ex-masking")  # someone's run
    with pytest.raises(RunError, match=r"experiment 'ex' exists already .*\(ex-masking\)"):
        exercises.start_chapter_exercises(tmp_path, TINY, experiment="ex", start_runner=False)
    assert [r.name for r in list_runs(tmp_path)] == ["ex-masking"]
    with pytest.raises(RunError, match="no experiment 'nope'"):
        exercises.summarize_experiment(tmp_path, "nope")


@pytest.mark.slow
def test_the_exercises_end_to_end_on_the_tiny_model_with_a_fake_judge(tmp_path):
    record = exercises.start_chapter_exercises(tmp_path, TINY, experiment="ex", start_runner=False)
    states = exercises.wait_for_experiment(tmp_path, "ex", env=ENV, poll=0.2)  # the queue, served here
    runs = [Run.open(f"ex-{n}", root=tmp_path) for n in NAMES]
    every = [*runs, Run.open("ex-dpo", root=tmp_path)]
    assert states == {r.name: "completed" for r in every}, [r.tail_log() for r in every]
    started = [r.status()["started"] for r in every]
    assert started == sorted(started)  # in the queue's order, one after the other
    statuses = [r.status() for r in every]
    assert all(a["finished"] <= b["started"] for a, b in zip(statuses, statuses[1:]))  # never two at once
    for run, (name, changes) in zip(runs, (("baseline", {}), ("phi3", {"prompt_style": ["alpaca", "phi3"]}),
                                           ("masking", {"mask_instruction": [False, True]}),
                                           ("lora", {"lora_rank": [0, 16]}))):
        assert differing_settings([runs[0], run]) == changes, name
        answers = json.loads(run.responses_path.read_text())
        assert len(answers) == 2 and all(isinstance(a["model_response"], str) for a in answers)
    assert runs[3].adapter_path.is_file() and runs[3].config.method == "LoRA"

    # No judge answers: nothing is scored and the summary says what to do.
    down = exercises.summarize_experiment(tmp_path, "ex", judge={"url": "http://127.0.0.1:9", "model": "llama3"})
    assert down["scoring"]["state"] == "skipped" and "ollama serve" in down["scoring"]["reason"]
    assert all(r.get("judge_mean") is None for r in down["rows"])

    scores = itertools.count(10, 10)  # 10, 20, ...: the runs are scored one by one, in the experiment's order
    with FakeOllama(reply=lambda prompt, model: str(next(scores))) as srv:
        summary = exercises.summarize_experiment(tmp_path, "ex", judge={"url": srv.base_url, "model": "llama3"})
        assert len(srv.chat_requests) == 10  # 5 runs x 2 answers
        again = exercises.summarize_experiment(tmp_path, "ex", judge={"url": srv.base_url, "model": "llama3"})
        assert len(srv.chat_requests) == 10  # scored answers are not asked again
    assert summary["scoring"]["state"] == "scored"
    assert summary["scoring"]["runs"] == {r.name: {"asked": 2, "scored": 2} for r in every}
    assert {r["asked"] for r in again["scoring"]["runs"].values()} == {0}
    assert all(default_scores_path(r.responses_path, "model_response").is_file() for r in every)
    rows = {r["variant"]: r for r in summary["rows"]}
    assert list(rows) == ALL and rows["dpo"]["state"] == "completed" and rows["dpo"]["method"] == "DPO"
    assert {n: rows[n]["judge_mean"] for n in ALL} == {"baseline": 15.0, "phi3": 35.0, "masking": 55.0,
                                                        "lora": 75.0, "dpo": 95.0}
    assert 30.0 <= rows["phi3"]["judge_ci"][0] < rows["phi3"]["judge_ci"][1] <= 40.0 and rows["lora"]["judged"] == 2
    for n, book in (("baseline", 49.45), ("phi3", 48.87), ("masking", 47.73), ("lora", 50.23)):
        done = Run.open(f"ex-{n}", root=tmp_path).read_metrics("done")[-1]
        assert rows[n]["book_score"] == book and rows[n]["state"] == "completed"
        assert rows[n]["val_loss"] == done["val_loss"] and rows[n]["training_s"] == done["elapsed"] > 0
        assert rows[n]["tokens_per_s"] > 0
    assert summary["lora_faster"] == pytest.approx(1 - rows["lora"]["training_s"] / rows["baseline"]["training_s"])
    assert summary["note"] == "not comparable with the book (tiny random model)" and summary["comparable"] is False

    # The files: the summary JSON as returned, and the Markdown table beside the book's figures.
    json_path, md_path = exercises.summary_paths(tmp_path, "ex")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(again))
    md = md_path.read_text().splitlines()
    assert "**not comparable with the book (tiny random model)**" in md[2]
    table = [line for line in md if line.startswith("| ")]
    assert len(table) == 1 + 1 + 5  # header, rule, 4 variants and the DPO row
    phi3 = table[3].split(" | ")
    assert phi3[:4] == ["| phi3", "exercise 7.1", "ex-phi3", "completed"]
    low, high = rows["phi3"]["judge_ci"]
    assert phi3[7] == f"35.0 ({low:.1f}-{high:.1f}), 2 scored" and phi3[8] == "48.87" and phi3[9] == "1.50 min |"
    assert table[6].startswith("| dpo | DPO notebook | ex-dpo | completed |")
    assert any("the book: LoRA 28% faster than full fine-tuning on an L4 GPU" in line for line in md)
    assert record["runs"][0]["run"] == "ex-baseline"
