"""LoRA as a run's method (exercise 7.4): frozen base, adapter-only checkpoints, exact resume, merged weights."""
import pytest
import torch

from sft.lora import LinearWithLoRA, lora_config, trainable_parameters
from sft.model import GPTModel, model_config
from sft.studio.adapters import lora_counts, read_adapter
from sft.studio.config import ConfigError, TrainConfig
from sft.studio.models import build_base_model, build_model
from sft.studio.runs import Run, RunError
from sft.studio.worker import build_trainer, execute_run

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_config_(**settings):
    return TrainConfig(**{"model": "tiny", "weights": "random", "limit": 40, "batch_size": 4, "epochs": 1,
                          "eval_freq": 3, "eval_iter": 1, "allowed_max_length": 48, "sample_each_epoch": False,
                          "response_tokens": 3, "device": "cpu", "precision": "fp32", "lr": 1e-3,
                          "lora_rank": 4, "lora_alpha": 8.0, **settings})


def test_counts_before_building_match_the_book_and_a_built_model():
    trainable, total, share = lora_counts("gpt2-medium (355M)", 16)
    assert trainable == 7_898_384 and total - trainable == 406_286_336  # exercise 7.4's printed counts
    assert share == pytest.approx(0.01907, abs=1e-5)
    for targets in (None, ("query", "value"), ("ff_in", "head")):
        cfg = TrainConfig(model="gpt2-small (124M)", weights="random", lora_rank=8,
                          lora_targets="all" if targets is None else ",".join(targets))
        model = build_model(cfg)
        assert trainable_parameters(model) == lora_counts(cfg.model, 8, targets)[:2] + (
            pytest.approx(lora_counts(cfg.model, 8, targets)[2]),)
        assert lora_config(model)["targets"] == list(targets or lora_config(model)["targets"])


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="lora_targets: unknown LoRA target"):
        lora_config_(lora_targets="query,mlp").validate()
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        lora_config_(lora_rank=-1).validate()
    assert lora_config_(lora_targets=" Value , query").lora_target_list() == ("query", "value")
    assert TrainConfig().method == "full" and lora_config_().method == "LoRA"


def test_a_fresh_lora_model_gives_the_base_logits_and_draws_no_global_randomness():
    cfg = lora_config_()
    base = build_base_model(cfg).eval()
    torch.manual_seed(7)
    wrapped = build_model(cfg).eval()
    after = torch.rand(1)
    torch.manual_seed(7)
    build_base_model(cfg)
    assert torch.equal(after, torch.rand(1))  # adapters drawn on the side: data order as full fine-tuning
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert torch.equal(base(ids), wrapped(ids))  # B is zero


def test_a_lora_run_trains_only_adapters_and_saves_them_and_merged_weights(tmp_path):
    cfg = lora_config_(max_steps=6)
    run = Run.create(cfg, root=tmp_path, name="lora")
    seen = {}
    execute_run(run, callbacks=[lambda e: seen.setdefault(e["type"], e)])
    assert run.state == "completed"
    base = build_base_model(cfg)
    adapter = read_adapter(run.adapter_path)
    assert adapter["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(lora_config(build_model(cfg))["targets"]),
                               "dropout": 0.0}
    assert adapter["base_model"] == "tiny (random)" and adapter["weights"] == "random"
    assert any(t.abs().sum() > 0 for k, t in adapter["tensors"].items() if k.endswith(".B"))  # B trained
    assert run.adapter_path.stat().st_size < 0.1 * run.model_path.stat().st_size

    # The checkpoint holds adapters only; rebuilt on the base, they give the saved merged model.
    ckpt = torch.load(run.checkpoint_path, weights_only=True)
    assert set(ckpt["model"]["tensors"]) == set(adapter["tensors"])
    assert all(len(s["state"]) for s in [ckpt["optimizer"]])
    n_adapter = sum(t.numel() for t in adapter["tensors"].values())
    assert sum(v["exp_avg"].numel() for v in ckpt["optimizer"]["state"].values()) == n_adapter  # no base moments

    merged = run.load_model()
    assert isinstance(merged, GPTModel) and not any(isinstance(m, LinearWithLoRA) for m in merged.modules())
    wrapped = build_model(cfg)
    from sft.lora import load_lora_state_dict

    load_lora_state_dict(wrapped, adapter["tensors"])
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        assert torch.allclose(merged(ids), wrapped.eval()(ids), atol=1e-5)
        merged_again = run.merged_model()
        assert torch.allclose(merged_again(ids), merged(ids), atol=1e-6)
    # Merging changed the linears; embeddings and norms are still the base's, bit for bit.
    for name, p in base.state_dict().items():
        if "emb" in name or "norm" in name:
            assert torch.equal(merged.state_dict()[name], p), name
    assert run.responses_path.is_file()  # downstream reads the merged model like any other


def test_base_weights_stay_bit_for_bit_and_only_adapters_change():
    cfg = lora_config_(max_steps=4)
    trainer, _ = build_trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora." in k for k in changed)
    assert {k for k in changed if k.endswith(".B")} == {k for k in before if k.endswith(".lora.B")}


def test_stop_and_resume_give_the_uninterrupted_runs_adapters(tmp_path):
    cfg = lora_config_(max_steps=7, lora_dropout=0.1)
    whole = Run.create(cfg, root=tmp_path, name="whole")
    execute_run(whole, responses=False)

    parted = Run.create(cfg, root=tmp_path, name="parted")
    stopper = {}

    def stop_at_3(event):
        if event["type"] == "step" and event["step"] == 2:
            stopper["trainer"].request_stop()

    import sft.studio.worker as worker

    real = worker.build_trainer

    def capture(*a, **kw):
        trainer, splits = real(*a, **kw)
        stopper["trainer"] = trainer
        return trainer, splits

    worker.build_trainer = capture
    try:
        execute_run(parted, responses=False, callbacks=[stop_at_3])
    finally:
        worker.build_trainer = real
    assert parted.state == "stopped" and not parted.adapter_path.exists()
    stopped = parted.load_model()  # a stopped LoRA run answers with its checkpoint's adapters, merged
    assert isinstance(stopped, GPTModel)
    execute_run(parted, resume=True, responses=False)
    a, b = read_adapter(whole.adapter_path)["tensors"], read_adapter(parted.adapter_path)["tensors"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in whole.read_metrics("step")] == [e["loss"] for e in parted.read_metrics("step")]


def test_a_full_checkpoint_is_refused_by_a_lora_run_and_merge_needs_lora(tmp_path):
    full = Run.create(lora_config_(lora_rank=0, max_steps=2), root=tmp_path, name="full")
    execute_run(full, responses=False)
    with pytest.raises(RunError, match="no LoRA adapters to merge"):
        full.merged_model()
    trainer, _ = build_trainer(lora_config_())
    with pytest.raises(ValueError, match="holds full weights, not LoRA adapters"):
        trainer.resume(full.checkpoint_path)


@pytest.mark.parametrize("settings", [{"grad_accum_steps": 2}, {"activation_checkpointing": True},
                                      {"precision": "bf16"}, {"fast_kernels": False, "masked_head_loss": False}])
def test_lora_trains_with_accumulation_checkpointing_bf16_and_the_book_bodies(settings):
    cfg = lora_config_(max_steps=3, **settings)
    trainer, _ = build_trainer(cfg)
    base = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".lora." not in k}
    result = trainer.fit()
    assert result["global_step"] == 2 and all(l == l for l in trainer.history["train_losses"])
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the frozen base, bit for bit
    assert any(after[k].abs().sum() > 0 for k in after if k.endswith(".lora.B"))
