"""TrainConfig (sft.config): the chapter's defaults, every bad setting reported, JSON round trip,
the chapter's path, and the advice given after running out of memory."""
import json

import pytest

from sft.studio.config import ConfigError, TrainConfig, TrainingError, oom_advice


def test_train_config_defaults_are_the_chapters():
    c = TrainConfig()
    assert (c.model, c.epochs, c.lr, c.weight_decay, c.batch_size, c.eval_freq, c.eval_iter, c.seed) == \
        ("gpt2-medium (355M)", 2, 5e-5, 0.1, 8, 5, 5, 123)
    assert c.validate() is c


def test_train_config_reports_every_problem():
    bad = TrainConfig(model="gpt5", epochs=0, lr=-1.0, batch_size=0, precision="fp16", weights="s3",
                      max_steps=0, prompt_style="chatml", device="tpu")
    with pytest.raises(ConfigError) as err:
        bad.validate()
    problems = err.value.problems
    for word in ("model", "epochs", "lr", "batch_size", "precision", "weights", "max_steps", "prompt_style",
                 "device"):
        assert any(p.startswith(word) for p in problems), word
    assert len(problems) == 9
    with pytest.raises(ConfigError, match="has no pretrained weights"):
        TrainConfig(model="tiny", weights="openai").validate()


def test_train_config_json_round_trip(tmp_path):
    c = TrainConfig(model="tiny", weights="random", epochs=3, max_steps=7)
    c.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == c
    (tmp_path / "bad.json").write_text(json.dumps({**c.to_dict(), "learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        TrainConfig.load(tmp_path / "bad.json")


def test_chapter_path_turns_every_fast_path_off():
    c = TrainConfig.chapter_path(model="tiny", weights="random")
    assert c.is_chapter_path() and not TrainConfig().is_chapter_path()
    assert (c.precision, c.masked_head_loss, c.group_by_length, c.fused_adamw, c.tf32, c.compile) == \
        ("fp32", False, False, False, False, False)


def test_oom_advice_keeps_the_effective_batch():
    tips = oom_advice(TrainConfig(batch_size=8, grad_accum_steps=1, allowed_max_length=1024, precision="fp32"))
    assert tips[0] == "a smaller batch_size (now 8): 4 with grad_accum_steps=2 keeps the effective batch"
    assert any("allowed_max_length (now 1024), e.g. 512" in t for t in tips)
    assert any("activation_checkpointing" in t for t in tips) and any("'bf16'" in t for t in tips)
    error = TrainingError("out of memory", tips[:1])
    assert error.advice == tips[:1] and str(error).endswith("keeps the effective batch")


def test_a_setting_that_contradicts_the_chapter_path_is_an_error():
    with pytest.raises(ConfigError) as err:
        TrainConfig.chapter_path(precision="bf16", masked_head_loss=True, epochs=3)
    assert err.value.problems == [
        "precision='bf16' contradicts the chapter's exact computation (precision='fp32')",
        "masked_head_loss=True contradicts the chapter's exact computation (masked_head_loss=False)"]
    assert TrainConfig.chapter_path(precision="fp32", epochs=3).epochs == 3  # agreeing is fine


def test_the_tiny_models_preset_applies_unless_given():
    assert TrainConfig.from_settings(model="tiny").weights == "random"
    assert TrainConfig.from_settings(model="gpt2-small (124M)").weights == "openai"
    with pytest.raises(ConfigError, match="has no pretrained weights"):
        TrainConfig.from_settings(model="tiny", weights="hf").validate()


def test_masked_head_needs_the_fast_kernels():
    with pytest.raises(ConfigError, match="masked_head_loss needs fast_kernels"):
        TrainConfig(fast_kernels=False, masked_head_loss=True).validate()


def test_unreadable_config_json_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        TrainConfig.load(path)
