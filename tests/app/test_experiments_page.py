"""The Experiments page: curves overlaid, the settings that differ, the queue's order and moves."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]


def open_page():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    at.switch_page("pages/8_experiments.py").run()
    assert not at.exception, at.exception
    return at


def test_no_runs_says_what_to_do():
    assert "fine-tune one on the Fine-tune page" in open_page().info[0].value


def test_two_runs_compared_and_the_queue_reordered(app_dirs, monkeypatch):
    from sft.studio import queue as queue_module
    from sft.studio.config import TrainConfig
    from sft.studio.queue import enqueue, queued_runs
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    base = dict(model="tiny", weights="random", limit=30, batch_size=2, max_steps=2, eval_freq=1, eval_iter=1,
                allowed_max_length=48, sample_each_epoch=False, response_tokens=2)
    for name, extra in (("plain", {}), ("masked", {"mask_instruction": True})):
        execute_run(Run.create(TrainConfig(**base, **extra), root=app_dirs["runs"], name=name), responses=False)
    waiting = [Run.create(TrainConfig(**base), root=app_dirs["runs"], name=n) for n in ("w1", "w2")]
    for run in waiting:
        enqueue(run, start_runner=False)
    # The page would start a queue runner, which would train the queued runs after this test (holding the device).
    monkeypatch.setattr(queue_module, "ensure_runner", lambda *a, **k: None)
    at = open_page()
    at.multiselect(key="exp_runs").set_value(["plain", "masked"]).run()
    assert not at.exception, at.exception
    results, differs, waiting_table = (d.value for d in at.dataframe)  # results, what differs, the queue
    assert results["run"].tolist() == ["plain", "masked"] and results["method"].tolist() == ["full", "full"]
    assert differs.index.tolist() == ["mask_instruction"] and differs.loc["mask_instruction"].tolist() == ["False",
                                                                                                      "True"]
    assert len(at.get("plotly_chart")) == 1
    assert waiting_table["run"].tolist() == ["w1", "w2"] and waiting_table["place"].tolist() == [1, 2]
    at.selectbox(key="exp_queued").set_value("w2")
    at.number_input(key="exp_place").set_value(1)
    at.button(key="exp_move").click().run()
    assert [r.name for r in queued_runs(app_dirs["runs"])] == ["w2", "w1"]
    at.selectbox(key="exp_queued").set_value("w1")
    at.button(key="exp_dequeue").click().run()
    assert [r.name for r in queued_runs(app_dirs["runs"])] == ["w2"]


def test_the_chapters_exercises_queued_trained_scored_and_set_beside_the_book(app_dirs, monkeypatch):
    import json

    from fake_servers import FakeOllama

    from sft.studio import exercises
    from sft.studio import queue as queue_module
    from sft.judge import default_scores_path
    from sft.studio.jobs import Job, score_job_folder
    from sft.studio.queue import queued_runs
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    for module in (queue_module, exercises):  # no queue runner process: the test trains the runs itself
        monkeypatch.setattr(module, "ensure_runner", lambda *a, **k: None)
    workspace = app_dirs["runs"].parent / "workspace"
    workspace.mkdir()
    with FakeOllama(reply=lambda prompt, model: "60") as srv:
        (workspace / "workspace.json").write_text(json.dumps({"model_name": "tiny (random)", "judge_url": srv.base_url,
                                                              "judge_model": "llama3", "allowed_max_length": 48}))
        at = open_page()
        assert "or queue the chapter's exercises below" in at.info[0].value
        assert f"the judge: `llama3` at {srv.base_url} (Judge page)" in at.caption[2].value
        at.number_input(key="exp_ex_limit").set_value(20)
        at.number_input(key="exp_ex_steps").set_value(1)
        at.button(key="exp_ex_start").click().run()
        assert not at.exception, at.exception
        name = at.selectbox(key="exp_ex_name").value
        assert name.startswith("exercises-") and exercises.list_experiments(app_dirs["runs"]) == [name]
        line = [r.name for r in queued_runs(app_dirs["runs"], "cpu")]
        assert line == [f"{name}-{v}" for v in ("baseline", "phi3", "masking", "lora", "dpo")]
        record = exercises.load_experiment(app_dirs["runs"], name)
        assert record["base_settings"] == {"model": "tiny (random)", "weights": "random",
                                           "models_dir": str(app_dirs["models"]), "data": None,
                                           "allowed_max_length": 48, "limit": 20, "seed": 123, "max_steps": 1}
        assert record["judge"] == {"backend": "ollama", "url": srv.base_url, "model": "llama3"}
        table = exercise_table(at)
        assert table["state"].tolist() == ["queued"] * 5
        assert table["the book's judge mean"].tolist()[:4] == ["49.45", "48.87", "47.73", "50.23"]
        assert table["the book's training (L4)"].tolist()[:4] == ["1.80 min", "1.50 min", "1.77 min", "1.30 min"]
        assert table.iloc[4]["run"] == f"{name}-dpo"  # no book figure for DPO: the book prints none
        assert table.iloc[4].isna()[["the book's judge mean", "val loss"]].all()
        assert at.warning[0].value == "Not comparable with the book (tiny random model)."
        for run_name in line:  # the queue's work, done here
            execute_run(Run.open(run_name, root=app_dirs["runs"]))
        at.run()
        assert exercise_table(at)["state"].tolist() == ["completed"] * 5
        assert exercise_table(at)["judge mean (95% CI)"].tolist() == ["–"] * 5
        at.button(key="exp_ex_score").click().run()
        assert not at.exception, at.exception
        assert "in the background: the table shows the means as they come" in at.info[0].value
        for run_name in line:  # one background score job per run
            store = default_scores_path(Run.open(run_name, root=app_dirs["runs"]).responses_path, "model_response")
            job = Job(score_job_folder(app_dirs["runs"], store))
            assert job.wait(timeout=120)["state"] == "completed", job.tail_log()
            assert store.is_file()
        assert len(srv.chat_requests) == 10  # 5 runs x 2 test answers
    at.run()
    table = exercise_table(at)
    assert table["judge mean (95% CI)"].tolist() == ["60.0 (60.0-60.0), 2 scored"] * 5
    assert table["run"].tolist() == line and table["val loss"].notna().tolist() == [True] * 5
    assert any("; the book: LoRA 28% faster than full fine-tuning on an L4 GPU (1.30 against 1.80 min)." in c.value
               for c in at.caption)


def exercise_table(at):
    """The exercises' table among the page's dataframes (the one with the book's columns)."""
    return next(d.value for d in at.dataframe if "the book's judge mean" in d.value.columns)
