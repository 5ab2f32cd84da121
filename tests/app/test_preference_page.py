"""The Preference page (issue 14): pairs with their diff, the identical pairs' keep/drop, the collated pair drawn cell
by cell, starting a DPO run from a finished run, and a DPO run's curves, note, stop and resume. Workers are replaced
by a launcher that records the run, so nothing trains."""
import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sft.model import GPTModel, model_config
from sft.studio.answers import answer_entries
from sft.tokenizer import get_tokenizer
from sft.studio import worker
from sft.studio.config import TrainConfig
from sft.studio.dpo_config import DPOConfig
from sft.studio.finetuned import save_finetuned
from sft.studio.runs import Run

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PAGE = "pages/7_preference.py"


def session():
    """A new browser session on the Preference page."""
    at = AppTest.from_file(APP, default_timeout=30).run().switch_page(PAGE).run()
    assert not at.exception
    return at


def texts(elements):  # every value, one a line
    return "\n".join(map(str, (e.value for e in elements)))


@pytest.fixture
def launches(monkeypatch):
    started = []
    monkeypatch.setattr(worker, "launch_worker", lambda run, **kwargs: started.append((run.name, kwargs)))
    return started


def finished_run(app_dirs, name="sft-tiny"):
    run = Run.create(TrainConfig(model="tiny", weights="random", models_dir=str(app_dirs["models"])),
                     root=app_dirs["runs"], name=name)
    save_finetuned(GPTModel(model_config("tiny")), run.model_path)
    run.update_status(state="completed")
    return run


def test_pairs_their_diff_the_identical_choice_and_the_collated_grid():
    at = session()
    assert at.title[0].value == "Preference"
    assert "1100 pairs" in texts(at.caption)
    radio = at.radio(key="pref_identical")
    assert radio.label == "The 6 pairs whose chosen and rejected answers are identical" and radio.value == "keep"
    chosen, rejected = at.code[0].value, at.code[1].value
    assert chosen != rejected
    diff = texts(at.markdown)
    assert "<del" in diff or "<ins" in diff
    assert len(at.get("plotly_chart")) == 1
    grid = [c.value for c in at.caption if c.value.startswith("Chosen and rejected rows share one length")][0]
    assert "pair 1 chosen" in grid and "pair 2 rejected" in grid
    assert "No finished instruction run yet" in texts(at.info)

    at.radio(key="pref_identical").set_value("drop").run()
    assert "1094 pairs" in texts(at.caption)
    at.toggle(key="pref_zoom").set_value(True).run()
    at.toggle(key="pref_mask").set_value(False).run()
    assert not at.exception


def test_start_dpo_from_a_finished_run(app_dirs, launches):
    source = finished_run(app_dirs)
    at = session()
    assert at.selectbox(key="pref_from").value == source.name
    at.number_input(key="pref_max_steps").set_value(7).run()
    at.toggle(key="pref_lora").set_value(True).run()
    at.button(key="pref_start").click().run()
    assert not at.exception and not at.error
    (name, kwargs), = launches
    run = Run(app_dirs["runs"] / name)
    config = run.config
    assert isinstance(config, DPOConfig) and kwargs == {}
    assert (config.from_run, config.max_steps, config.lora_rank, config.beta, config.lr) == (
        str(source.path), 7, 16, 0.1, 5e-6)
    assert at.selectbox(key="pref_run").value == name  # the new run is shown


def test_a_dpo_runs_curves_rewards_note_and_resume(app_dirs, launches):
    source = finished_run(app_dirs)
    run = Run.create(DPOConfig.from_settings(from_run=str(source.path)), root=app_dirs["runs"], name="dpo")
    events = [{"type": "reference", "how": "the policy before its first step", "examples": 1045, "seconds": 2.5,
               "reference_copy_mb_saved": 1549.0, "reference_forwards_per_step": 0, "step": -1}]
    for step in range(4):
        events.append({"type": "step", "step": step, "loss": 0.69 - 0.01 * step, "margin": 0.1 * step})
        events.append({"type": "eval", "step": step, "train_loss": 0.69 - 0.02 * step, "val_loss": 0.69 - 0.01 * step,
                       "train_chosen_reward": -0.1 * step, "train_rejected_reward": -0.3 * step,
                       "train_margin": 0.2 * step, "val_chosen_reward": -0.05 * step,
                       "val_rejected_reward": -0.2 * step, "val_margin": 0.15 * step})
    run.metrics_path.write_text("".join(json.dumps(e) + "\n" for e in events))
    run.checkpoint_path.parent.mkdir()
    run.checkpoint_path.write_bytes(b"x")
    run.update_status(state="stopped", progress={"step": 3, "total_steps": 130, "progress": 4 / 130,
                                                 "elapsed": 12.0, "updated": time.time()})
    at = session()
    assert at.selectbox(key="pref_run").value == "dpo"
    m = {x.label: x.value for x in at.metric}
    assert (m["Val margin"], m["Val chosen reward"], m["Val rejected reward"]) == ("0.450", "-0.150", "-0.600")
    assert len(at.get("plotly_chart")) == 3  # the pair grid, the loss, the rewards
    md = texts(at.markdown)
    assert "Why the chosen reward can fall while the margin grows" in md
    assert "1,549 MB" in texts(at.caption) and "the policy before its first step" in texts(at.caption)
    at.button(key="pref_resume").click().run()
    assert launches == [("dpo", {"resume": True})]


def test_compare_lists_a_finished_dpo_run_like_any_run(app_dirs):
    source = finished_run(app_dirs)
    run = Run.create(DPOConfig.from_settings(from_run=str(source.path)), root=app_dirs["runs"], name="dpo-done")
    save_finetuned(GPTModel(model_config("tiny")), run.model_path)
    run.update_status(state="completed")
    at = session()
    at.switch_page("pages/4_compare.py").run()
    assert not at.exception
    assert set(at.selectbox(key="cmp_run").options) == {"dpo-done", "sft-tiny"}
    at.selectbox(key="cmp_run").set_value("dpo-done").run()
    assert not at.exception and "prompt style `alpaca`" in texts(at.caption)
    # The base beside a DPO run is its reference: the instruction run it started from, answering as that run.
    base = at.selectbox(key="cmp_base")
    assert base.value == "reference: sft-tiny (the run DPO started from)" and base.options[0] == base.value
    at.number_input(key="cmp_max_new").set_value(4)
    at.selectbox(key="cmp_precision").set_value("fp32")  # token for token the chapter's greedy answers
    at.multiselect(key="cmp_entries").set_value([0])
    at.button(key="cmp_go").click().run()
    assert not at.exception, at.exception
    (result,) = at.session_state["cmp_results"]
    entry = {k: result[k] for k in ("instruction", "input")}
    expected = answer_entries(source.load_model().eval(), [entry], get_tokenizer(), prompt_style="alpaca",
                              max_new_tokens=4)[0]["model_response"]
    assert result["base_name"].startswith("reference: sft-tiny") and result["base"] == expected


def test_the_fine_tune_and_experiments_pages_show_a_dpo_run(app_dirs):
    source = finished_run(app_dirs)
    run = Run.create(DPOConfig.from_settings(from_run=str(source.path)), root=app_dirs["runs"], name="dpo-run")
    run.update_status(state="stopped")
    at = session()
    for page in ("pages/3_finetune.py", "pages/8_experiments.py"):
        at.switch_page(page).run()
        assert not at.exception, page
    at.switch_page("pages/3_finetune.py").run()
    assert "dpo-run" in at.selectbox(key="ft_run").options


def test_on_a_busy_device_a_dpo_run_queues_after_the_run_training_there(app_dirs, launches, monkeypatch):
    from sft.studio import queue as queue_module
    from sft.studio.locks import DeviceLock
    from sft.studio.queue import queued_runs

    monkeypatch.setattr(queue_module, "ensure_runner", lambda *a, **k: None)  # no queue runner process
    finished_run(app_dirs)
    lock = DeviceLock.acquire("cpu", run="other-run")  # another run trains on this device
    try:
        at = session()
        assert "run `other-run` is training on it" in texts(at.info)
        assert at.button(key="pref_start").disabled
        assert at.button(key="pref_queue").label == "Queue after `other-run`"
        at.number_input(key="pref_max_steps").set_value(3).run()
        at.button(key="pref_queue").click().run()
        assert not at.exception and not at.error
        (queued,) = queued_runs(app_dirs["runs"], "cpu")
        assert queued.state == "queued" and queued.config.kind == "dpo" and queued.config.max_steps == 3
        assert queued.config.from_run == str(app_dirs["runs"] / "sft-tiny")
        assert f"Queued DPO run `{queued.name}`: number 1 in line" in texts(at.info)
        assert launches == []  # nothing started: it waits for the device
    finally:
        lock.release()
