"""FSDP2 (``strategy="fsdp"``): two CPU processes (gloo) each keep half of the weights and of AdamW's state, and
train as one process does with the same global batch; a checkpoint they save is whole, so it resumes in another
number of processes."""
import pytest
import torch
from test_distributed import ddp_config, finish, stop_after_two_steps, torchrun, train

from sft.model import model_config
from sft.studio.config import CHAPTER_SETTINGS, ConfigError, TrainConfig
from sft.studio.runs import Run
from sft.studio.worker import build_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
EMB = model_config("tiny")["emb_dim"]


def straight(config):
    """One process, straight through: its step losses and final weights."""
    single, _ = build_trainer(config)
    events = []
    single.callbacks.append(events.append)
    single.fit()
    return [e["loss"] for e in events if e["type"] == "step"], single.model.state_dict()


def test_fsdp_is_for_full_fine_tuning():
    assert TrainConfig().strategy == "ddp"
    with pytest.raises(ConfigError, match="LoRA's few trainable parameters need no sharding"):
        TrainConfig(strategy="fsdp", lora_rank=8).validate()
    with pytest.raises(ConfigError, match="strategy"):
        TrainConfig(strategy="zero3").validate()


@pytest.mark.slow
@pytest.mark.parametrize("chapter", [False, True], ids=["fast-path", "chapter-path"])
def test_two_fsdp_processes_train_as_one_process(tmp_path, chapter):
    settings = {"strategy": "fsdp", "max_steps": 6}
    fast = {k: v for k, v in ddp_config(**settings).to_dict().items() if k not in CHAPTER_SETTINGS}
    config = TrainConfig.chapter_path(**fast) if chapter else ddp_config(**settings)
    run = Run.create(config, root=tmp_path, name="fsdp")
    out = finish(torchrun(run))
    assert run.state == "completed", out
    assert "FSDP: 2 processes; each batch of 4 is split 2 rows per process" in out
    done = run.read_metrics("done")[-1]
    assert done["world_size"] == 2 and done["replicas_in_sync"] is True  # whole again on both ranks at the end
    losses, weights = straight(run.config)
    assert [e["loss"] for e in run.read_metrics("step")] == pytest.approx(losses, rel=1e-5)
    saved = torch.load(run.model_path, weights_only=True)
    for name, tensor in weights.items():
        assert torch.allclose(saved[name], tensor, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [((2, "fsdp"), (1, "ddp")), ((1, "ddp"), (2, "fsdp"))],
                         ids=["fsdp-2-then-1", "1-then-fsdp-2"])
def test_a_checkpoint_moves_between_fsdp_and_another_number_of_processes(tmp_path, first, then):
    """Saved by 2 FSDP processes, the checkpoint holds whole tensors and goes on in 1 process; one saved by
    1 process goes on sharded over 2. Either way the run ends as one process straight through."""
    run = Run.create(ddp_config(strategy=first[1]), root=tmp_path, name=f"{first[1]}-{first[0]}-then-{then[0]}")
    out = stop_after_two_steps(run, train(run, first[0]))
    assert run.state == "stopped", out
    state = torch.load(run.checkpoint_path, weights_only=True)
    stopped_at = state["global_step"]
    assert state["model"]["tok_emb.weight"].shape == (50257, EMB)  # the whole embedding, not a shard of it
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (50257, EMB)

    config = run.config
    config.max_steps, config.strategy = stopped_at + 4, then[1]
    config.save(run.config_path)
    out = finish(train(run, then[0], "--resume"))
    assert run.state == "completed", out
    assert ("FSDP: 2 processes" in out) == (then[1] == "fsdp")
    steps = run.read_metrics("step")
    assert [e["step"] for e in steps] == list(range(stopped_at + 4))
    losses, weights = straight(config)
    assert [e["loss"] for e in steps] == pytest.approx(losses, rel=1e-5)
    saved = torch.load(run.model_path, weights_only=True)
    for name, tensor in weights.items():
        assert torch.allclose(saved[name], tensor, atol=1e-5), name


@pytest.mark.slow
def test_the_bench_sets_each_processs_peak_memory_under_fsdp_beside_ddp():
    from argparse import Namespace

    from sft.bench.strategies import bench_strategies

    args = Namespace(model="tiny", seed=123, batch_size=4, train_steps=3, allowed_max_length=48, device="cpu",
                     precision="fp32", threads=2)
    result = bench_strategies(args, 2)
    ddp, fsdp = result["strategies"]["ddp"], result["strategies"]["fsdp"]
    assert result["strategies_processes"] == 2 and ddp["replicas_in_sync"] and fsdp["replicas_in_sync"]
    assert len(ddp["peak_memory_mb_by_rank"]) == len(fsdp["peak_memory_mb_by_rank"]) == 2
    assert all(mb > 0 for mb in ddp["peak_memory_mb_by_rank"] + fsdp["peak_memory_mb_by_rank"])
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5) and len(ddp["losses"]) == 3
    assert result["fsdp_over_ddp_peak_memory"] == pytest.approx(
        max(fsdp["peak_memory_mb_by_rank"]) / max(ddp["peak_memory_mb_by_rank"]), abs=1e-3)
