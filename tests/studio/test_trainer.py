"""The Trainer (sft.studio.trainer): the chapter's path bit for bit, events, checkpoints and exact resume,
the fast path's losses, and what it says when it runs out of memory or diverges."""
import json

import pytest
import torch
from helpers import MINI, mini_loaders

from sft.batching import create_data_loaders
from sft.model import GPTModel
from sft.studio.config import TrainConfig, TrainingError
from sft.studio.trainer import Trainer
from sft.training import calc_loss_batch, train_model_simple

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_trainer(tmp_path=None, model_seed=1, **settings):
    torch.manual_seed(model_seed)
    model = GPTModel(MINI)
    train, val = mini_loaders()
    config = TrainConfig(**{"epochs": 3, "eval_freq": 2, "eval_iter": 2, "lr": 1e-3, "precision": "fp32",
                            **settings})
    return Trainer(model, config, train, val,
                   checkpoint_path=None if tmp_path is None else tmp_path / "ck" / "last.pt")


@pytest.fixture
def real_loaders(instruction_data, tokenizer):
    """The chapter's loaders over 8 train and 4 validation entries, short sequences."""
    torch.manual_seed(123)
    train, val, _ = create_data_loaders(instruction_data[:8], instruction_data[8:12], instruction_data[12:14],
                                        tokenizer, batch_size=2, allowed_max_length=40)
    return train, val


def test_trainer_on_chapter_path_equals_train_model_simple(capsys, tiny_cfg, tokenizer, real_loaders):
    train, val = real_loaders
    torch.manual_seed(123)
    model = GPTModel(tiny_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.00005, weight_decay=0.1)
    torch.manual_seed(123)
    expected = train_model_simple(model, train, val, optimizer, "cpu", 2, 3, 2, "Hi", tokenizer)

    torch.manual_seed(123)
    model2 = GPTModel(tiny_cfg)
    config = TrainConfig.chapter_path(epochs=2, eval_freq=3, eval_iter=2, sample_each_epoch=False)
    assert config.is_chapter_path()
    torch.manual_seed(123)
    result = Trainer(model2, config, train, val, device="cpu").fit()
    assert (result["train_losses"], result["val_losses"], result["track_tokens_seen"]) == expected
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


# ============================================================================ Trainer

@pytest.mark.slow
def test_tiny_model_overfits_a_few_examples(instruction_data, tokenizer):
    cfg = {"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    train, val, _ = create_data_loaders(instruction_data[:3], instruction_data[:3], instruction_data[:3],
                                        tokenizer, batch_size=3, allowed_max_length=48)
    torch.manual_seed(123)
    config = TrainConfig(epochs=25, lr=2e-2, weight_decay=0.0, batch_size=3, eval_freq=5, eval_iter=1,
                         precision="fp32")
    result = Trainer(GPTModel(cfg), config, train, val).fit()
    # measured: 10.0 at step 0, 0.06 at step 20
    assert result["train_losses"][0] > 9.5
    assert result["train_losses"][-1] < 0.5 and result["val_losses"][-1] < 0.5


def test_events_and_metrics_file(tmp_path, tokenizer):
    events = []
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.callbacks.append(events.append)
    trainer.metrics_path = tmp_path / "metrics.jsonl"
    trainer.tokenizer, trainer.sample_prompt = tokenizer, "!"  # token 0: inside MINI's vocabulary
    trainer.config.sample_tokens = 3
    result = trainer.fit()
    assert result["state"] == "completed" and result["global_step"] == 9  # 2 epochs x 5 batches
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(events))
    kinds = [e["type"] for e in events]
    assert kinds.count("step") == 10 and kinds.count("eval") == 5 and kinds.count("epoch_end") == 2
    assert kinds.count("sample") == 2 and kinds.count("checkpoint") == 2 and kinds[-1] == "done"
    for e in events:
        assert {"type", "time", "epoch", "step", "tokens_seen", "elapsed", "eta", "progress", "total_steps"} <= set(e)
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(10)) and steps[-1]["progress"] == 1.0
    assert [e["epoch"] for e in steps] == [1] * 5 + [2] * 5
    assert all(e["lr"] == 1e-3 and e["loss"] > 0 for e in steps)
    assert steps[-1]["tokens_seen"] == 10 * 4 * 12 and steps[-1]["eta"] == 0.0
    assert steps[-1]["tokens_per_s"] == pytest.approx(steps[-1]["tokens_seen"] / steps[-1]["elapsed"], rel=1e-2)
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    assert [e["train_loss"] for e in evals] == result["train_losses"]
    assert events[-1]["val_loss"] == result["val_losses"][-1]


def test_the_train_loss_of_an_evaluation_comes_from_the_steps_just_computed():
    """The default: an evaluation's train loss is the mean loss of the steps since the last one, so only the
    validation batches are run; ``train_loss_from_steps=False`` (and the chapter's path) runs eval_iter fresh
    training batches, as evaluate_model does."""
    events, drawn = [], []
    trainer = make_trainer(epochs=2, eval_freq=3, eval_iter=2)
    trainer.callbacks.append(events.append)
    batch_loss = trainer.batch_loss
    trainer.batch_loss = lambda batch, **kw: (drawn.append(trainer.model.training), batch_loss(batch, **kw))[1]
    trainer.fit()
    steps = [e["loss"] for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6, 9]
    assert [e["train_loss"] for e in evals] == pytest.approx(
        [steps[0], sum(steps[1:4]) / 3, sum(steps[4:7]) / 3, sum(steps[7:10]) / 3], rel=1e-12)
    assert drawn.count(True) == 10 and drawn.count(False) == 4 * 2  # the steps; only validation batches
    assert TrainConfig.chapter_path().train_loss_from_steps is False

    chapter, drawn[:] = make_trainer(epochs=2, eval_freq=3, eval_iter=2, train_loss_from_steps=False), []
    batch_loss = chapter.batch_loss
    chapter.batch_loss = lambda batch, **kw: (drawn.append(chapter.model.training), batch_loss(batch, **kw))[1]
    result = chapter.fit()
    assert drawn.count(False) == 4 * (2 + 2)  # eval_iter train and eval_iter validation batches each time
    # Step 0's weights are the same; after it the chapter's evaluation has drawn a shuffle of the training
    # data (iterating a shuffled loader does), so the data order, and the later losses, differ a little.
    assert result["val_losses"][0] == pytest.approx(evals[0]["val_loss"], rel=1e-6)


def test_checkpoint_loads_with_weights_only(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert state["format"] == "sft-studio-checkpoint"
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 0, 4)
    assert set(state["rng"]) >= {"torch", "python", "numpy", "cuda", "generators"}
    assert torch.equal(state["model"]["out_head.weight"], trainer.model.out_head.weight)
    assert not list((tmp_path / "ck").glob("*.tmp"))


@pytest.mark.parametrize("settings, stop_at", [
    ({}, 6),                                              # mid-epoch (epoch 2, batch 2 of 5)
    ({}, 4),                                              # right at an epoch end
    ({"precision": "bf16", "grad_accum_steps": 2, "masked_head_loss": True}, 3),  # accumulation, mid-epoch
])
def test_stop_and_resume_ends_with_the_same_weights(tmp_path, settings, stop_at):
    torch.manual_seed(5)
    straight = make_trainer(tmp_path / "a", **settings)
    expected = straight.fit()

    torch.manual_seed(5)
    first = make_trainer(tmp_path / "b", **settings)
    first.callbacks.append(lambda e: first.request_stop() if e["type"] == "step" and e["step"] == stop_at else None)
    assert first.fit()["state"] == "stopped" and first.global_step == stop_at

    torch.manual_seed(999)  # a new process: other RNG state, other initial weights
    second = make_trainer(tmp_path / "b", model_seed=2, **settings).resume()
    result = second.fit()
    assert result["state"] == "completed"
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert result["val_losses"] == expected["val_losses"] and result["tokens_seen"] == expected["tokens_seen"]


def test_stop_file_is_honoured_and_consumed(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.stop_file = tmp_path / "stop"
    trainer.callbacks.append(lambda e: trainer.stop_file.write_text("x") if e["type"] == "step" else None)
    assert trainer.fit()["state"] == "stopped"
    assert trainer.global_step == 0 and not trainer.stop_file.exists()
    assert torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["batch_in_epoch"] == 1


def test_resume_with_other_data_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    other = make_trainer(tmp_path)
    other.train_loader = mini_loaders(n=30)[0]
    with pytest.raises(ValueError, match="same data, limit and batch_size"):
        other.resume()


def test_out_of_memory_becomes_advice_and_keeps_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, batch_size=8, allowed_max_length=1024)
    events, calls = [], {"n": 0}
    trainer.callbacks.append(events.append)
    forward = trainer.forward_model

    def flaky(*args, **kwargs):  # runs out of memory in the second epoch
        calls["n"] += 1
        if calls["n"] > 7:  # 5 training batches per epoch (evaluation runs the plain model)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    trainer.forward_model = flaky
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    advice = " ".join(err.value.advice)
    assert "batch_size" in advice and "grad_accum_steps=2" in advice
    assert "allowed_max_length" in advice and "activation_checkpointing" in advice
    assert events[-1]["type"] == "error" and events[-1]["oom"] is True
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # the epoch-end checkpoint survives


def test_bf16_autocast_and_masked_head_on_cpu():
    from sft.studio.hardware import cpu_has_fast_bf16, resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    trainer = make_trainer(precision="bf16", masked_head_loss=True, epochs=1)
    assert trainer.precision == "bf16" and trainer.masked_head
    x, y = next(iter(mini_loaders()[1]))
    fp32 = make_trainer(precision="fp32", masked_head_loss=False, epochs=1)
    with torch.no_grad():
        masked, full = trainer.loss(x, y).item(), fp32.loss(x, y).item()
    assert masked == pytest.approx(full, rel=2e-2)  # same loss, computed in bf16 on fewer positions
    assert trainer.model.out_head.weight.dtype == torch.float32  # fp32 master weights
    assert trainer.fit()["state"] == "completed"


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_with_the_chapters_loaders(tmp_path, tiny_cfg, tokenizer, instruction_data, group_by_length):
    """DATA's loaders: the chapter's global-RNG shuffle, and the seeded length-grouped sampler."""
    def trainer(folder):
        train, val, _ = create_data_loaders(instruction_data[:10], instruction_data[10:12], [], tokenizer,
                                            batch_size=2, allowed_max_length=32, group_by_length=group_by_length)
        torch.manual_seed(123)
        config = TrainConfig(epochs=2, eval_freq=3, eval_iter=2, precision="fp32", group_by_length=group_by_length)
        return Trainer(GPTModel({**tiny_cfg, "drop_rate": 0.1}), config, train, val,
                       checkpoint_path=tmp_path / folder / "last.pt")

    expected = trainer("a").fit()
    first = trainer("b")
    first.callbacks.append(lambda e: first.request_stop() if e["type"] == "step" and e["step"] == 6 else None)
    first.fit()
    torch.manual_seed(7)
    second = trainer("b").resume()
    result = second.fit()
    assert (result["train_losses"], result["val_losses"]) == (expected["train_losses"], expected["val_losses"])
    assert result["tokens_seen"] == expected["tokens_seen"] and len(result["train_losses"]) == 4


# ============================================================================ fast paths compute the same loss

@pytest.mark.parametrize("checkpointing", [False, True])
def test_masked_head_loss_and_grads_equal_the_chapters(checkpointing):
    """fp32: the body up to each row's last counted target and the head where targets count give
    the chapter's loss and gradients (padding never changes earlier positions)."""
    x, y = next(iter(mini_loaders()[1]))  # rows 0 and 2 end in three -100 targets
    fast = make_trainer(precision="fp32", masked_head_loss=True, activation_checkpointing=checkpointing)
    assert fast.masked_head and fast.body.checkpointing is checkpointing  # the switch reaches the model's forward
    for module in fast.model.modules():  # dropout draws depend on shapes: off for an exact comparison
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    chapter = GPTModel({**MINI, "drop_rate": 0.0})
    chapter.load_state_dict(fast.model.state_dict())
    expected = calc_loss_batch(x, y, chapter, "cpu")
    expected.backward()
    loss = fast.loss(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), q in zip(fast.model.named_parameters(), chapter.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_fused_adamw_on_cpu_and_chapter_path_without_it():
    assert make_trainer().optimizer.defaults["fused"] is True
    assert not make_trainer(**{k: v for k, v in TrainConfig.chapter_path().to_dict().items()
                               if k in ("fused_adamw", "precision")}).optimizer.defaults["fused"]


def test_fit_again_with_more_steps_goes_on_in_memory():
    """fit() with max_steps 3, then 7 (mid-epoch both times) equals one fit() to 7 (the benchmark's rounds)."""
    torch.manual_seed(5)
    straight = make_trainer(max_steps=7)
    expected = straight.fit()
    torch.manual_seed(5)
    rounds = make_trainer()
    assert rounds.fit(max_steps=3)["global_step"] == 2
    result = rounds.fit(max_steps=7)
    assert result["global_step"] == 6 and result["val_losses"] == expected["val_losses"]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, rounds.model.state_dict()[name]), name


@pytest.mark.slow
def test_compile_trains_the_same_and_breaks_graphs_only_where_asked():
    """``compile=True``: the packed forward's data-sized steps (``Packed``'s methods) are marked to
    run outside the graphs, so torch.compile meets no other break (each would print a warning)
    and the losses are those of the plain model."""
    from torch._dynamo.utils import counters

    def build(compile):  # no dropout: compiled code draws its random masks differently
        torch.manual_seed(1)
        train, val = mini_loaders()
        config = TrainConfig(epochs=3, eval_freq=2, eval_iter=2, lr=1e-3, precision="fp32", max_steps=4,
                             compile=compile)
        return Trainer(GPTModel({**MINI, "drop_rate": 0.0}), config, train, val)

    losses = {}
    counters.clear()
    for name, trainer in (("plain", build(False)), ("compiled", build(True))):
        events = []
        trainer.callbacks.append(events.append)
        torch.manual_seed(5)
        trainer.fit()
        losses[name] = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses["compiled"]) == 4
    assert losses["compiled"] == pytest.approx(losses["plain"], rel=1e-4)
    breaks = list(counters["graph_break"])
    assert breaks and all(b.startswith("Skip inlining `torch.compiler.disable()`d function") for b in breaks), breaks
