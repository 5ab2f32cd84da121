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
