"""DPO as a run (issue 14): ln 2 at the start, the margin rising, exact resume, the cached reference equal to a
recomputed one, and a LoRA run's adapters-off reference equal to an explicit frozen copy."""
import math

import pytest
import torch

from sft.dpo import PreferenceDataset, compute_dpo_loss_batch, custom_collate_fn, reference_logprobs
from sft.lora import LinearWithLoRA
from sft.studio.config import ConfigError, TrainConfig
from sft.studio.dpo_config import DPOConfig, load_config
from sft.studio.dpo_trainer import REFERENCE_FILE, DPOTrainer, read_reference_cache
from sft.studio.finetuned import load_finetuned
from sft.studio.models import build_base_model
from sft.studio.runs import Run
from sft.studio.worker import build_trainer, execute_run
from sft.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
LN2 = math.log(2)


def dpo_config(**settings):
    return DPOConfig.from_settings({"model": "tiny", "limit": 24, "batch_size": 4, "eval_freq": 2, "eval_iter": 2,
                                    "sample_each_epoch": False, "response_tokens": 3, "device": "cpu",
                                    "precision": "fp32", "checkpoint_minutes": None, **settings})


def events_of(kind, events):
    return [e for e in events if e["type"] == kind]


def trained(cfg):
    """(trainer, its events) after fitting ``cfg`` in this process."""
    events = []
    trainer, _ = build_trainer(cfg, callbacks=[events.append])
    trainer.fit()
    return trainer, events


def test_config_has_the_notebooks_defaults_and_round_trips_through_a_run(tmp_path):
    cfg = DPOConfig()
    assert (cfg.kind, cfg.beta, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size, cfg.eval_freq,
            cfg.eval_iter, cfg.mask_instruction) == ("dpo", 0.1, 5e-6, 0.01, 1, 8, 5, 5, True)
    tiny = dpo_config(beta=0.5)
    assert tiny.weights == "random" and tiny.allowed_max_length == 256 and tiny.lr == 5e-6
    run = Run.create(tiny, root=tmp_path, name="dpo")
    assert isinstance(run.config, DPOConfig) and run.config == tiny
    sft = Run.create(TrainConfig(model="tiny", weights="random"), root=tmp_path, name="sft")
    assert type(load_config(sft.config_path)) is TrainConfig
    with pytest.raises(ConfigError) as e:
        dpo_config(beta=0, prompt_style="phi3", from_run=str(sft.path)).validate()
    text = str(e.value)
    assert "beta must be > 0" in text and "prompt_style must be 'alpaca'" in text and "has no final weights" in text


def test_the_loss_starts_at_ln2_with_zero_rewards_and_events_carry_the_rewards():
    events = []
    trainer, (train, _, val) = build_trainer(dpo_config(max_steps=2), callbacks=[events.append])
    assert isinstance(trainer, DPOTrainer) and len(train) == 20 and len(val) == 2
    trainer.fit()
    first = events_of("step", events)[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)  # policy == reference before the first update
    assert first["chosen_reward"] == pytest.approx(0, abs=1e-6) and first["margin"] == pytest.approx(0, abs=1e-6)
    assert first["tokens_seen"] > 0 and first["elapsed"] > 0 and "eta" in first
    (reference,) = events_of("reference", events)
    assert reference["examples"] == 22 and reference["how"] == "the policy before its first step"
    assert reference["reference_forwards_per_step"] == 0 and reference["reference_copy_mb_saved"] > 10
    evaluation = events_of("eval", events)[0]
    for key in ("train_loss", "val_loss", "train_chosen_reward", "val_rejected_reward", "train_margin", "eta"):
        assert key in evaluation
    assert evaluation["train_margin"] == pytest.approx(
        evaluation["train_chosen_reward"] - evaluation["train_rejected_reward"])


def test_a_few_steps_on_a_handful_of_pairs_raise_their_margin():
    trainer, (train, _, _) = build_trainer(dpo_config(limit=10, epochs=6, lr=3e-3, eval_freq=100))
    assert len(train) == 8
    before = trainer.eval_metrics()
    trainer.fit()
    after = trainer.eval_metrics()
    assert before["train_loss"] == pytest.approx(LN2, abs=1e-6) and before["train_margin"] == pytest.approx(0, abs=1e-6)
    assert after["train_margin"] > 1.0 and after["train_loss"] < 0.65  # measured: margin 0 -> 2.53, loss 0.575


def test_stop_and_resume_ends_with_the_weights_of_a_straight_run(tmp_path):
    cfg = dpo_config(max_steps=5, limit=40)
    straight = Run.create(cfg, root=tmp_path, name="straight")
    execute_run(straight, responses=False)
    stopped = Run.create(cfg, root=tmp_path, name="stopped")
    seen = []

    def stop_at_2(event):
        seen.append(event)
        if event["type"] == "step" and event["step"] == 2:
            stopped.stop_path.write_text("stop")

    assert execute_run(stopped, responses=False, callbacks=[stop_at_2])["state"] == "stopped"
    assert (stopped.path / REFERENCE_FILE).is_file()
    execute_run(stopped, resume=True, responses=False, callbacks=[seen.append])
    assert stopped.state == "completed"
    assert events_of("reference", seen)[-1]["how"] == "read from the run's cache"
    a, b = (load_finetuned(r.model_path).state_dict() for r in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [e["step"] for e in stopped.read_metrics("step")]
    assert steps == [0, 1, 2, 3, 4]


def test_cached_reference_logprobs_equal_recomputed_ones(tmp_path):
    cfg = dpo_config(max_steps=1, fast_kernels=False, masked_head_loss=False)
    run = Run.create(cfg, root=tmp_path, name="cached")
    execute_run(run, responses=False)
    trainer, (train, _, val) = build_trainer(cfg)
    cached = read_reference_cache(run.path / REFERENCE_FILE, trainer.reference_key())
    assert cached is not None and cached[0].shape == (22,)
    model = build_base_model(cfg).eval()
    tokenizer = get_tokenizer()
    for data, part in ((train, slice(0, 20)), (val, slice(20, 22))):
        chosen, rejected = reference_logprobs(model, PreferenceDataset(data, tokenizer), batch_size=3)
        assert torch.allclose(chosen, cached[0][part], atol=1e-5) and torch.allclose(rejected, cached[1][part], atol=1e-5)
    # ... and the notebook's two separate forwards of one pair give the same values
    batch = custom_collate_fn([PreferenceDataset(train[:1], tokenizer)[0]])
    with torch.no_grad():
        from sft.dpo import compute_logprobs

        ours = compute_logprobs(model(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
    assert ours.item() == pytest.approx(cached[0][0].item(), abs=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_reference_rebuilt_after_training_equals_the_first(lora_rank):
    """Full: a frozen copy of the start weights, freed after; LoRA: the policy with its adapters off."""
    cfg = dpo_config(max_steps=3, lr=1e-3, lora_rank=lora_rank)
    trainer, _ = build_trainer(cfg)
    trainer.fit()
    first = trainer.reference
    trainer.reference, events = None, []
    trainer.callbacks.append(events.append)
    again = trainer.prepare_reference()
    assert torch.allclose(first[0], again[0], atol=1e-6) and torch.allclose(first[1], again[1], atol=1e-6)
    how = events[-1]["how"]
    assert how == ("the LoRA policy with its adapters switched off" if lora_rank
                   else "a frozen copy of the start weights, freed after")


def test_a_lora_runs_loss_equals_the_notebooks_with_an_explicit_frozen_copy():
    cfg = dpo_config(max_steps=3, lr=1e-3, lora_rank=4, lora_alpha=8.0)
    trainer, _ = build_trainer(cfg)
    trainer.fit()
    assert any(isinstance(m, LinearWithLoRA) for m in trainer.model.modules())
    frozen = build_base_model(cfg).eval()  # the second copy the notebook holds
    trainer.model.eval()
    batch = next(iter(trainer.val_loader))
    with torch.no_grad():
        ours = trainer.pair_metrics(batch)
        book = compute_dpo_loss_batch(batch, trainer.model, frozen, cfg.beta)
    for a, b in zip(ours, book):
        assert a.item() == pytest.approx(b.item(), abs=1e-5)
    assert ours[0].item() != pytest.approx(LN2, abs=1e-4)  # the adapters have moved the policy


def test_a_dpo_run_from_a_finished_run_starts_from_its_weights(tmp_path):
    sft_cfg = TrainConfig.from_settings(model="tiny", limit=20, max_steps=2, batch_size=4, device="cpu",
                                        sample_each_epoch=False, response_tokens=3, precision="fp32")
    source = Run.create(sft_cfg, root=tmp_path, name="sft")
    execute_run(source, responses=False)
    cfg = DPOConfig.from_settings(from_run=str(source.path), limit=24, batch_size=4, max_steps=2, device="cpu",
                                  sample_each_epoch=False, response_tokens=3)
    assert (cfg.model, cfg.weights, cfg.allowed_max_length, cfg.lr) == ("tiny (random)", "random", 256, 5e-6)
    run = Run.create(cfg, root=tmp_path, name="dpo")
    execute_run(run)
    start = load_finetuned(source.model_path).state_dict()
    built = build_base_model(run.config).state_dict()
    assert all(torch.equal(start[k], built[k]) for k in start)
    assert run.state == "completed" and run.model_path.is_file() and run.responses_path.is_file()


@pytest.mark.slow
def test_two_processes_train_a_dpo_run_as_one_process_does(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = dpo_config(max_steps=4, lr=1e-3, eval_freq=2)
    run = Run.create(cfg, root=tmp_path, name="ddp-dpo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sft",
           "train", "--run-dir", str(run.path), "--progress", "plain", "--no-responses"]
    out = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and run.state == "completed", out.stdout + out.stderr
    done = run.read_metrics("done")[-1]
    assert done["world_size"] == 2 and done["replicas_in_sync"] is True
    single, events = trained(cfg)  # one process, the same global batches
    for kind, key in (("step", "loss"), ("step", "margin"), ("eval", "val_loss"), ("eval", "train_margin"),
                      ("eval", "val_chosen_reward")):
        assert [e[key] for e in run.read_metrics(kind)] == pytest.approx(
            [e[key] for e in events_of(kind, events)], rel=1e-4, abs=1e-6), key
    weights = load_finetuned(run.model_path).state_dict()
    for name, tensor in single.model.state_dict().items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name
