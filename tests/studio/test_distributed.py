"""DDP: sharded batches keep the chapter's order; two CPU processes train as one process does."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from sft.batching import create_data_loaders
from sft.studio.distributed import ShardedBatchSampler, shard_loader, shard_rows
from sft.studio.runs import Run
from sft.studio.config import TrainConfig
from sft.studio.worker import build_trainer

ROOT = Path(__file__).resolve().parents[2]
PAD = 50256


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_shard_rows_split_every_row_once():
    assert [shard_rows(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [shard_rows(8, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert [shard_rows(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]  # a short last batch


def test_sharded_sampler_keeps_the_single_process_order():
    def batches(rank=None):
        torch.manual_seed(7)  # RandomSampler draws its shuffle from the global RNG, as in the chapter
        inner = BatchSampler(RandomSampler(range(20)), 6, drop_last=True)
        sampler = inner if rank is None else ShardedBatchSampler(inner, rank, 2)
        return [list(b) for epoch in range(2) for b in sampler]

    single, rank0, rank1 = batches(), batches(0), batches(1)
    assert len(single) == 6 and [a + b for a, b in zip(rank0, rank1)] == single
    assert all(len(b) == 3 for b in rank0 + rank1)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_sharded_loader_gives_each_rank_its_rows(instruction_data, tokenizer, group_by_length):
    def loader():
        train, _, _ = create_data_loaders(instruction_data[:24], instruction_data[24:28], [], tokenizer,
                                          batch_size=4, group_by_length=group_by_length)
        return train

    single = list(loader())  # create_data_loaders seeds torch with 123 first, as listing 7.6
    shards = [list(shard_loader(loader(), rank, 2)) for rank in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 6
    for k, (inputs, targets) in enumerate(single):
        for rank, (start, stop) in enumerate([(0, 2), (2, 4)]):
            x, y = shards[rank][k]
            width = x.shape[1]  # a rank pads to its own longest row
            assert torch.equal(x, inputs[start:stop, :width]) and torch.equal(y, targets[start:stop, :width])
            assert (inputs[start:stop, width:] == PAD).all() and (targets[start:stop, width:] == -100).all()


# ============================================================================ two processes

def ddp_config(**settings):
    """The tiny random model on 60 entries: 51 train = 12 batches of 4 per epoch."""
    return TrainConfig(**{"model": "tiny", "weights": "random", "limit": 60, "batch_size": 4, "epochs": 20,
                          "eval_freq": 5, "eval_iter": 2, "allowed_max_length": 48, "sample_each_epoch": False,
                          "device": "cpu", "precision": "fp32", **settings})


def torchrun(run, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sft", "train", "--run-dir", str(run.path), "--progress", "plain", "--no-responses", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def steps_done(run):
    try:
        return max((e["step"] for e in run.read_metrics("step")), default=-1)
    except FileNotFoundError:
        return -1


@pytest.mark.slow
def test_two_processes_stop_resume_and_match_one_process(tmp_path):
    run = Run.create(ddp_config(), root=tmp_path, name="ddp")
    proc = torchrun(run)
    deadline = time.monotonic() + 90
    while steps_done(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.request_stop()  # the stop file: rank 0 sees it, and every rank stops at the same step
    out = finish(proc)
    assert run.state == "stopped", out
    stopped_at = torch.load(run.checkpoint_path, weights_only=True)["global_step"]
    assert 2 <= stopped_at < 200

    config = run.config
    config.max_steps = stopped_at + 4
    config.save(run.config_path)
    out = finish(torchrun(run, "--resume"))
    assert "DDP: 2 processes; each batch of 4 is split 2 rows per process" in out
    assert run.state == "completed", out

    # Rank 0 alone wrote the metrics: one event per step, the work redone after the stop dropped.
    steps = run.read_metrics("step")
    assert [e["step"] for e in steps] == list(range(stopped_at + 4))
    done = run.read_metrics("done")[-1]
    assert done["world_size"] == 2 and done["replicas_in_sync"] is True
    assert len(done["replica_digests"]) == 2 and len(set(done["replica_digests"])) == 1

    # One process, the same global batch of 4, straight through: the same losses and weights.
    single, _ = build_trainer(config)
    events = []
    single.callbacks.append(events.append)
    result = single.fit()
    one = [e["loss"] for e in events if e["type"] == "step"]
    assert [e["loss"] for e in steps] == pytest.approx(one, rel=1e-5)
    assert [e["val_loss"] for e in run.read_metrics("eval")] == pytest.approx(result["val_losses"], rel=1e-5)
    weights = torch.load(run.model_path, weights_only=True)
    for name, tensor in single.model.state_dict().items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name
    assert json.loads(run.status_path.read_text())["world_size"] == 2


def stop_after_two_steps(run, proc):
    """Ask ``run`` to stop once it has done 2 steps (the stop file), wait for ``proc``; its output."""
    deadline = time.monotonic() + 90
    while steps_done(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.request_stop()
    return finish(proc)


def train(run, nproc, *extra):
    """``python -m sft train`` on a run folder: under torchrun with ``nproc`` > 1, else plainly."""
    if nproc > 1:
        return torchrun(run, *extra)
    cmd = [sys.executable, "-m", "sft", "train", "--run-dir", str(run.path), "--progress", "plain",
           "--no-responses", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_stopped_run_resumes_with_another_number_of_processes(tmp_path, first, then):
    """The checkpoint holds the global position and the chapter's shuffle state, not a rank's, so a
    run stopped in N processes goes on in M and ends as one process straight through would."""
    run = Run.create(ddp_config(), root=tmp_path, name=f"ddp-{first}-then-{then}")
    out = stop_after_two_steps(run, train(run, first))
    assert run.state == "stopped", out
    stopped_at = torch.load(run.checkpoint_path, weights_only=True)["global_step"]

    config = run.config
    config.max_steps = stopped_at + 4
    config.save(run.config_path)
    out = finish(train(run, then, "--resume"))
    assert run.state == "completed", out
    assert ("DDP: 2 processes" in out) == (then == 2)

    steps = run.read_metrics("step")
    assert [e["step"] for e in steps] == list(range(stopped_at + 4))
    single, _ = build_trainer(config)
    events = []
    single.callbacks.append(events.append)
    single.fit()
    assert [e["loss"] for e in steps] == pytest.approx([e["loss"] for e in events if e["type"] == "step"], rel=1e-5)
    weights = torch.load(run.model_path, weights_only=True)
    for name, tensor in single.model.state_dict().items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name


@pytest.mark.slow
def test_lora_under_two_processes_matches_one_process(tmp_path):
    from sft.studio.adapters import read_adapter

    config = ddp_config(max_steps=4, lora_rank=4, lora_alpha=8.0, lr=1e-3)
    run = Run.create(config, root=tmp_path, name="ddp-lora")
    out = finish(torchrun(run))
    assert run.state == "completed" and "Method: LoRA rank 4" in out, out
    done = run.read_metrics("done")[-1]
    assert done["world_size"] == 2 and done["replicas_in_sync"] is True
    single, _ = build_trainer(config)
    events = []
    single.callbacks.append(events.append)
    single.fit()
    assert [e["loss"] for e in run.read_metrics("step")] == pytest.approx(
        [e["loss"] for e in events if e["type"] == "step"], rel=1e-5)
    adapters = read_adapter(run.adapter_path)["tensors"]
    mine = {k: v for k, v in single.model.state_dict().items() if ".lora." in k}
    assert adapters.keys() == mine.keys()
    for name, tensor in mine.items():
        assert torch.allclose(adapters[name], tensor, atol=1e-5), name
