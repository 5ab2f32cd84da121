"""Answers taken at evaluations (sft.studio.snapshots): the answers kept in the run equal the chapter's
``generate`` on the weights of the same step, with the step, epoch, tokens seen, losses and cost; the
interval and the extra prompts are settings; a resume drops the snapshots it re-does; the Fine-tune
page scrubs through them."""
import copy
import json
from pathlib import Path

import pytest
import torch

from sft.generation import generate
from sft.model import GPTModel, model_config
from sft.studio.config import ConfigError, TrainConfig
from sft.studio.runs import Run
from sft.studio.snapshots import read_snapshots, snapshot_cost
from sft.studio.worker import build_trainer, execute_run
from sft.tokenizer import EOT_ID, get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
EXTRA = "Name a primary colour.|What is 2 plus 3?"


def tiny_config(**settings):
    return TrainConfig.from_settings({"model": "tiny", "limit": 40, "batch_size": 4, "eval_freq": 2, "eval_iter": 1,
                                      "max_steps": 7, "sample_tokens": 12, "snapshot_prompts": EXTRA,
                                      "precision": "fp32", **settings})


def book_answer(state, prompt, max_new_tokens):
    """The chapter's generate (greedy, no cache) on weights ``state``; the new tokens' text."""
    model = GPTModel(model_config("tiny"))
    model.load_state_dict(state)
    model.eval()
    tokenizer = get_tokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, ids, max_new_tokens, model.pos_emb.num_embeddings, eos_id=EOT_ID)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist()).strip()


def test_the_answers_kept_equal_generate_on_the_weights_of_the_same_step(tmp_path):
    run = Run.create(tiny_config(snapshot_every=2), root=tmp_path, name="watch")
    weights = {}  # step -> the model's weights when its snapshot was taken
    trainer, (train, test, val) = build_trainer(run.config, callbacks=[run.record_event])

    def keep(event):
        if event["type"] == "snapshot":
            weights[event["step"]] = copy.deepcopy(trainer.model.state_dict())

    trainer.callbacks.append(keep)
    assert trainer.fit()["state"] == "completed"
    snaps = read_snapshots(run)
    # evaluations at steps 0, 2, 4, 6; every 2nd one keeps the answers: steps 0 and 4
    assert [s["step"] for s in snaps] == [0, 4] == sorted(weights)
    assert not any(e["type"] == "snapshot" for e in run.read_metrics())  # kept apart from metrics.jsonl
    evals = {e["step"]: e for e in run.read_metrics("eval")}
    for snap in snaps:
        assert [a["label"] for a in snap["answers"]] == ["first validation prompt", "Name a primary colour.",
                                                         "What is 2 plus 3?"]
        assert snap["val_loss"] == evals[snap["step"]]["val_loss"] and snap["epoch"] == 1
        assert snap["tokens_seen"] == evals[snap["step"]]["tokens_seen"] > 0 and snap["seconds"] > 0
        for answer in snap["answers"]:
            assert answer["response"] == book_answer(weights[snap["step"]], answer["prompt"], 12)
    assert snaps[0]["answers"][0]["prompt"] == trainer.sample_prompt  # the first validation entry's prompt
    assert snaps[0]["answers"][2]["prompt"].endswith("### Instruction:\nWhat is 2 plus 3?")  # the run's style
    total, share = snapshot_cost(snaps, 10.0)
    assert total == pytest.approx(snaps[0]["seconds"] + snaps[1]["seconds"]) and share == pytest.approx(total / 10)


def test_the_interval_and_the_prompts_are_settings():
    with pytest.raises(ConfigError, match="snapshot_prompts: at most 2 instructions"):
        TrainConfig(snapshot_prompts="a|b|c").validate()
    from sft.cli import build_parser
    from sft.cli.train import config_from_args

    argv = ["train", "--model", "tiny", "--snapshot-every", "3", "--snapshot-prompts", EXTRA]
    config = config_from_args(build_parser(argv).parse_args(argv))
    assert (config.snapshot_every, config.snapshot_prompts) == (3, EXTRA)


def test_no_snapshots_with_an_interval_of_0_and_a_resume_drops_the_redone_ones(tmp_path):
    run = Run.create(tiny_config(snapshot_every=0, max_steps=3), root=tmp_path, name="none")
    execute_run(run, responses=False)
    assert read_snapshots(run) == [] and not run.snapshots_path.exists()

    run = Run.create(tiny_config(snapshot_every=1, max_steps=5), root=tmp_path, name="again")
    execute_run(run, responses=False)
    assert [s["step"] for s in read_snapshots(run)] == [0, 2, 4]
    run.record_event({"type": "resumed", "time": 1e12, "step": 2, "epoch": 1, "tokens_seen": 0})
    assert [s["step"] for s in read_snapshots(run)] == [0, 2]  # step 4 is re-done after the resume


def test_the_fine_tune_page_scrubs_through_the_answers(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from ui.evolution import shown_text

    runs = tmp_path / "runs"
    monkeypatch.setenv("SFT_RUNS_DIR", str(runs))
    monkeypatch.setenv("SFT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SFT_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("SFT_OLLAMA_URL", "http://127.0.0.1:9")
    run = Run.create(tiny_config(snapshot_every=1), root=runs, name="scrub")
    execute_run(run, responses=False)
    snaps = read_snapshots(run)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app.py"), default_timeout=60).run()
    at.switch_page("pages/3_finetune.py").run()
    assert not at.exception, at.exception
    slider = at.select_slider(key="ft_snap_scrub")
    assert slider.value == len(snaps) - 1 == 3  # the latest first (evaluations at steps 0, 2, 4, 6)
    slider.set_value(1).run()
    assert not at.exception, at.exception
    shown = [c.value for c in at.code]
    assert all(shown_text(a) in shown for a in snaps[1]["answers"])
    captions = " ".join(c.value for c in at.caption)
    assert f"At step {snaps[1]['step']} (epoch 1, {snaps[1]['tokens_seen']:,} tokens seen)" in captions
    curve = json.loads(at.get("plotly_chart")[0].proto.spec)
    marked = next(t for t in curve["data"] if t["name"] == "this snapshot")
    assert (marked["x"], marked["y"]) == ([snaps[1]["step"]], [snaps[1]["val_loss"]])
    assert curve["layout"]["shapes"][0]["x0"] == snaps[1]["step"]  # the line across the curves
    total = sum(s["seconds"] for s in snaps)
    assert f"{total:.2f} s" in captions
