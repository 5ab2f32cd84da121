"""The Fine-tune page (issue 12): choices kept across a reload, the preset's note and the answer limit, renaming,
deleting and running again a run, and a Start that lost the device to another tab saying so.

A new AppTest is a new browser session (a reload, another tab). Training workers are replaced by a launcher
that records the run (and, where a test says so, holds the device lock as a worker would), so nothing trains."""
import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sft.studio import queue as queue_module
from sft.studio import worker
from sft.studio.config import TrainConfig
from sft.studio.locks import DeviceLock, create_time, holder
from sft.studio.runs import Run

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def session(page="pages/3_finetune.py"):
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.switch_page(page).run()
    assert not at.exception
    return at


def texts(elements):
    return "\n".join(str(e.value) for e in elements)


def workspace(app_dirs):
    return json.loads((app_dirs["runs"].parent / "workspace" / "workspace.json").read_text())


def make_run(app_dirs, name, state="completed", **settings):
    run = Run.create(TrainConfig(**{"model": "tiny", "weights": "random", "models_dir": str(app_dirs["models"]),
                                    **settings}), root=app_dirs["runs"], name=name)
    run.update_status(state=state)
    return run


@pytest.fixture
def launches(monkeypatch):
    """Start training without a worker: the runs the page launched, in order (the pages import launch_worker
    from sft.studio.worker on each run of their script, so the stand-in is what they call)."""
    started = []

    def launch(run, **kwargs):
        started.append((run.name, kwargs))

    monkeypatch.setattr(worker, "launch_worker", launch)
    monkeypatch.setattr(queue_module, "ensure_runner", lambda *a, **k: None)  # no queue runner process
    return started


@pytest.fixture
def held():
    """Device locks the test holds, as another tab's worker would; released at the end."""
    locks = []
    yield locks
    for lock in locks:
        lock.release()


def test_a_reload_keeps_the_model_and_the_run_shown(app_dirs):
    make_run(app_dirs, "older")
    make_run(app_dirs, "newer")
    at = session()
    assert at.selectbox(key="ft_run").value == "newer"  # newest first
    at.button(key="ft_use_tiny").click().run()
    at.selectbox(key="ft_run").set_value("older").run()
    assert not at.exception
    saved = workspace(app_dirs)
    assert (saved["model_name"], saved["run_name"]) == ("tiny (random)", "older")

    again = session()  # a reload: a new browser session reads the workspace file
    assert again.selectbox(key="ft_model").value == "tiny (random)"
    assert not again.button(key="ft_start").disabled and not again.warning
    assert again.selectbox(key="ft_run").value == "older"
    assert again.number_input(key="ft_lr").value == 5e-3  # the tiny model's demo settings, as before the reload


def test_the_preset_note_and_the_answer_limit_setting(app_dirs):
    at = session()
    book = TrainConfig()
    assert (f"These are the chapter's settings (section 7.6): {book.epochs} epochs, AdamW with learning rate "
            f"{book.lr:g}") in texts(at.caption)
    assert "demo settings" not in texts(at.caption)
    at.button(key="ft_use_tiny").click().run()
    assert TrainConfig.preset_note("tiny (random)") in texts(at.caption)
    limit = at.number_input(key="ft_answer_limit")
    assert limit.label == "Test answers after training (0 = auto)" and limit.value == 0
    assert "0 = auto: the whole test split, as the chapter, or the first 32 when 'Stop after N steps'" in limit.help
    limit.set_value(5).run()
    assert "answer_limit=5" in texts(at.code)  # the code behind the page: the config Start builds


def test_run_again_puts_every_setting_of_a_run_into_the_widgets(app_dirs, launches):
    source = make_run(app_dirs, "source", lora_rank=4, lora_alpha=8.0, lora_targets="query,value",
                      lora_dropout=0.1, epochs=1, lr=1e-3, weight_decay=0.05, batch_size=4, eval_freq=7, eval_iter=2,
                      seed=9, precision="fp32", limit=60, max_steps=3, response_tokens=5, answer_limit=3,
                      grad_accum_steps=2, activation_checkpointing=True, group_by_length=True, device="cpu",
                      prompt_style="phi3", allowed_max_length=128, mask_instruction=True, sample_tokens=10)
    at = session()
    assert at.selectbox(key="ft_model").value == "gpt2-medium (355M)"
    at.button(key="ft_run_again").click().run()
    assert not at.exception
    assert "The settings of `source` are in the widgets: press **Start training**." in texts(at.toast)
    assert at.selectbox(key="ft_model").value == "tiny (random)" and at.radio(key="ft_method").value == "LoRA"
    assert (at.number_input(key="ft_lora_rank").value, at.multiselect(key="ft_lora_targets").value) == \
        (4, ["query", "value"])
    assert (at.number_input(key="ft_lr").value, at.number_input(key="ft_answer_limit").value) == (1e-3, 3)
    info = texts(at.info)
    assert "The settings of run `source` are in the widgets" in info
    assert "sample_tokens 50 (the run: 10)" in info  # not on this page: said, not hidden
    at.button(key="ft_start").click().run()
    assert not at.exception and not at.error
    (name, kwargs), = launches
    again = Run.open(name, root=app_dirs["runs"])
    assert name != "source" and kwargs == {}
    expected = {**source.config.to_dict(), "sample_tokens": 50, "model": "tiny (random)"}  # its "tiny", spelt out
    assert again.config.to_dict() == expected
    assert at.session_state["prompt_style"] == "phi3" and workspace(app_dirs)["allowed_max_length"] == 128
    assert at.selectbox(key="ft_run").value == name and "The settings of run" not in texts(at.info)


def test_rename_and_delete_with_their_checks(app_dirs):
    make_run(app_dirs, "old")
    busy = make_run(app_dirs, "busy", state="running")
    busy.update_status(pid=os.getpid(), pid_started=create_time(os.getpid()))  # a live worker: this process
    at = session()
    at.selectbox(key="ft_run").set_value("old").run()
    at.text_input(key="ft_new_name").set_value("no spaces").run()
    at.button(key="ft_rename").click().run()
    assert "Not renamed: run name 'no spaces': use letters, digits" in at.error[0].value
    at.text_input(key="ft_new_name").set_value("busy").run()
    at.button(key="ft_rename").click().run()
    assert "Not renamed: a run named 'busy' exists already" in at.error[0].value
    at.text_input(key="ft_new_name").set_value("renamed-1").run()
    at.button(key="ft_rename").click().run()
    assert not at.exception and not at.error
    assert at.success[0].value.startswith("Renamed run `old` to `renamed-1`")
    assert at.selectbox(key="ft_run").value == "renamed-1" and workspace(app_dirs)["run_name"] == "renamed-1"
    assert sorted(p.name for p in app_dirs["runs"].iterdir()) == ["busy", "renamed-1"]
    assert set(at.dataframe[-1].value["name"]) == {"busy", "renamed-1"}

    at.selectbox(key="ft_run").set_value("busy").run()
    at.text_input(key="ft_new_name").set_value("other").run()
    at.button(key="ft_rename").click().run()
    assert at.error[0].value == "Not renamed: run 'busy' is running: stop it before renaming it"
    at.button(key="ft_delete").click().run()
    assert at.error[0].value == "Not deleted: run 'busy' is running: stop it before deleting it"
    assert (app_dirs["runs"] / "busy" / "config.json").is_file()

    at.selectbox(key="ft_run").set_value("renamed-1").run()
    assert "Delete run `renamed-1`: its folder" in texts(at.markdown)
    at.button(key="ft_delete").click().run()
    assert not at.exception and at.success[0].value == "Deleted run `renamed-1` and its folder."
    assert [p.name for p in app_dirs["runs"].iterdir()] == ["busy"]
    assert at.selectbox(key="ft_run").value == "busy" and at.selectbox(key="ft_run").options == ["busy"]
    busy.update_status(state="stopped")
    at.button(key="ft_delete").click().run()
    assert at.success[0].value == "Deleted run `busy` and its folder." and "No runs yet" in texts(at.info)
    assert list(app_dirs["runs"].iterdir()) == []


def test_a_start_from_a_second_tab_says_why_it_did_not_start_and_can_queue(app_dirs, monkeypatch, held):
    def launch_like_a_worker(run, **kwargs):  # the device lock taken and kept, as a training worker keeps it
        held.append(DeviceLock.acquire("cpu", run=run.name))

    monkeypatch.setattr(worker, "launch_worker", launch_like_a_worker)
    monkeypatch.setattr(queue_module, "ensure_runner", lambda *a, **k: None)
    first, second = session(), session()  # two tabs, both drawn while the device is free
    for tab in (first, second):
        tab.button(key="ft_use_tiny").click().run()
        tab.selectbox(key="ft_device").set_value("cpu").run()
        assert not tab.button(key="ft_start").disabled
    second.text_input(key="ft_run_name").set_value("loser").run()
    first.text_input(key="ft_run_name").set_value("winner").run()
    first.button(key="ft_start").click().run()
    assert not first.error and holder("cpu")["run"] == "winner"

    second.button(key="ft_start").click().run()  # its view was drawn before: the click must not vanish
    assert not second.exception
    message = second.error[0].value
    assert message.startswith("Not started: run `winner` started on `cpu` a moment ago, from another tab or "
                              "session, and a device trains one run at a time.")
    assert "**Queue after** it trains them as a new run when it ends" in message
    assert [p.name for p in app_dirs["runs"].iterdir()] == ["winner"]  # no run folder for the click that lost
    assert second.button(key="ft_start").disabled
    assert second.button(key="ft_queue").label == "Queue after `winner`"

    second.button(key="ft_queue").click().run()
    assert not second.exception and not second.error
    queued = Run.open("loser", root=app_dirs["runs"]).status()
    assert (queued["state"], queued["queue_position"], queued["device"]) == ("queued", 1, "cpu")
    assert ("Queued run `loser`: number 1 in line for `cpu`; it starts by itself when the device is free."
            in texts(second.info))
    assert second.selectbox(key="ft_run").value == "loser"
    assert "Queued: number 1 in line for `cpu`" in texts(second.info)
    second.button(key="ft_dequeue").click().run()
    assert Run.open("loser", root=app_dirs["runs"]).state == "created"


def test_a_start_that_loses_the_lock_at_the_last_moment_leaves_no_run_behind(app_dirs, monkeypatch, held):
    from sft.studio.locks import DeviceBusyError

    def beaten(run, **kwargs):  # another launcher took the lock between the page's look and this one's try
        held.append(DeviceLock.acquire("cpu", run="quicker"))
        raise DeviceBusyError("device cpu is busy: run 'quicker' is training on it")

    monkeypatch.setattr(worker, "launch_worker", beaten)
    at = session()
    at.button(key="ft_use_tiny").click().run()
    at.selectbox(key="ft_device").set_value("cpu").run()
    at.button(key="ft_start").click().run()
    assert not at.exception
    assert at.error[0].value.startswith("Not started: run `quicker` started on `cpu` a moment ago")
    assert list(app_dirs["runs"].iterdir()) == []
    assert at.button(key="ft_queue").label == "Queue after `quicker`"


def test_settings_that_spoil_examples_are_warned_of_before_start(app_dirs):
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.switch_page("pages/2_batches.py").run()
    at.number_input(key="bat_maxlen").set_value(48).run()
    at.toggle(key="bat_mask").set_value(True).run()
    at.switch_page("pages/3_finetune.py").run()
    assert not at.exception
    warning = texts(at.warning)
    assert ("**793 of 935 examples have problem(s) in the train split** with allowed_max_length 48 and the "
            "instruction masked:") in warning
    assert "Change them on the Batches page, or start anyway." in warning
    fine = session()  # a new session reads the kept settings: still warned
    assert "793 of 935 examples" in texts(fine.warning)


def test_lora_with_no_layer_chosen_cannot_start(app_dirs, launches):
    at = session()
    at.selectbox(key="ft_model").set_value("tiny (random)").run()
    at.radio(key="ft_method").set_value("LoRA").run()
    at.multiselect(key="ft_lora_targets").set_value([]).run()
    assert "Choose at least one layer for the adapters: Start waits for one." in texts(at.warning)
    assert at.button(key="ft_start").disabled
    at.multiselect(key="ft_lora_targets").set_value(["query", "value"]).run()
    assert not at.button(key="ft_start").disabled
