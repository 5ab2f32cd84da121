"""`python -m sft.bench` on a tiny model: one JSON line, every path on the same batches (no timing asserts)."""
import json
import sys

import pytest
import torch

from sft import bench
from sft.batching import IGNORE_INDEX, get_batch
from sft.bench.flops import body_matmul_params, generation_flops, step_positions, train_step_flops
from sft.bench.hf import hf_batch, hf_loss, hf_model, transformers_missing
from sft.model import GPTModel, model_config
from sft.training import calc_loss_batch

SMALL = model_config("gpt2-small")


@pytest.mark.slow
def test_bench_quick_prints_one_json_line_with_every_paths_figures(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code = bench.main(["--model", "tiny", "--quick", "--threads", "1", "--train-steps", "2", "--eval-freq", "1",
                       "--eval-iter", "1", "--allowed-max-length", "64", "--gen-prompts", "2", "--max-new-tokens", "3",
                       "--gen-precision", "fp32", "--precision", "fp32", "--memory-steps", "1",
                       "--ceiling-seconds", "0.05", "--out", str(out_file)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == result
    for key in ("device", "threads", "torch", "train_tokens_per_s", "train_ratio", "gen_ratio", "train_ratio_vs_hf",
                "gen_ratio_vs_hf", "train_mfu", "mfu", "peak_memory_mb", "losses", "loss_rel_diff_last",
                "gen_seconds", "gen_prompts", "max_new_tokens", "load_avg_before", "load_avg_after", "gemm_ceiling"):
        assert key in result, key
    assert result["device"] == "cpu" and result["threads"] == 1 and result["weights"] == "random"
    assert result["quick"] is True and result["hf_missing"] is None
    # The ceiling: each shape measured, 2048^3 and the head's (B*T, d) @ (d, vocab) among them.
    fp32 = result["gemm_ceiling"]["fp32"]
    rows = result["train"]["chapter"]["tokens"] // 2  # B * T of the first batch: 2 steps of
    assert "2048x2048x2048" in fp32["shapes"] and any(s.endswith("x64x50257") for s in fp32["shapes"])
    assert fp32["best"] == max(fp32["shapes"].values()) > 0 and fp32["shapes"][fp32["best_shape"]] == fp32["best"]
    assert rows > 0 and result["matmul_gflops"]["fp32"] == fp32["shapes"]["512x768x3072"]
    # Three paths, the same batches, the same step-0 loss (fp32), losses close after.
    chapter, fast, hf = (result["train"][k] for k in ("chapter", "fast", "hf"))
    assert result["same_batches"] is True and chapter["tokens"] == fast["tokens"] == hf["tokens"] > 0
    assert chapter["targets"] == fast["targets"] == hf["targets"] > 0
    assert (chapter["masked_head"], fast["masked_head"], hf["masked_head"]) == (False, True, False)
    assert (hf["precision"], hf["attn_implementation"]) == ("fp32", "sdpa") and hf["optimizer"].startswith("AdamW")
    assert result["hf_step0_loss_rel_diff"] < 1e-4
    assert len(result["losses"]["hf"]) == len(result["losses"]["chapter"]) == len(result["losses"]["fast"]) == 2
    assert result["losses"]["hf"] == pytest.approx(result["losses"]["chapter"], rel=1e-3)
    assert result["losses"]["fast"] == pytest.approx(result["losses"]["chapter"], rel=2e-2)
    # FLOPs per path: the fast path counts fewer (no padding, masked head) than the chapter's, HF more (T + 1).
    assert fast["flops"]["total"] < chapter["flops"]["total"] < hf["flops"]["total"]
    for ratio in ("train_ratio", "train_ratio_vs_hf", "train_loop_ratio_vs_hf", "gen_ratio", "gen_ratio_vs_hf",
                  "train_ratio_cheap_eval"):
        assert result[ratio] > 0, ratio
    # The fast path's default evaluation (train loss from the steps) timed beside the chapter's schedule: the
    # whole loop composed of the fast path's measured steps and that many cheaper evaluations.
    each = result["train_eval_seconds_each"]
    assert set(each) == {"chapter_schedule", "train_loss_from_steps"} and all(v > 0 for v in each.values())
    n_evals = len(fast["val_losses"])
    assert result["train_loop_seconds_cheap_eval"] == pytest.approx(
        fast["seconds"] - fast["eval_seconds"] + n_evals * each["train_loss_from_steps"], abs=2e-3)
    assert 0 < result["train_eval_share_cheap_eval"] < 1
    for kind in ("train", "gen"):
        assert set(result["mfu"][kind]) == {"chapter", "fast", "hf"}
        assert all(0 < m <= 1.5 for m in result["mfu"][kind].values()), result["mfu"][kind]
    assert result["train_mfu"] == result["mfu"]["train"]["fast"]
    # Peak memory: each training path in a process of its own, and each answering run.
    for kind in ("train", "gen"):
        assert set(result["peak_memory_mb"][kind]) == {"chapter", "fast", "hf"}
        assert all(mb > 0 for mb in result["peak_memory_mb"][kind].values())
    assert result["train_peak_memory_fast_over_hf"] > 0
    # fp32 everywhere: the KV cache and HF's generate give the chapter's greedy answers.
    assert result["gen_same_answers_fast"] == result["gen_same_answers_hf"] == 2
    assert len(chapter["round_seconds"]) == len(hf["round_seconds"]) == 2  # turns of one step


@pytest.mark.slow
def test_without_transformers_the_bench_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert "pip install transformers" in transformers_missing()
    assert bench.main(["--model", "tiny", "--threads", "1", "--train-steps", "1", "--eval-iter", "1",
                       "--allowed-max-length", "32", "--gen-prompts", "1", "--max-new-tokens", "2",
                       "--gen-precision", "fp32", "--memory-steps", "0", "--ceiling-seconds", "0.01"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "pip install transformers" in result["hf_missing"] and "pip install transformers" in result["gen_hf_missing"]
    assert result["train_ratio_vs_hf"] is None and result["gen_ratio_vs_hf"] is None
    assert set(result["train"]) == {"chapter", "fast"} and result["transformers"] is None
    assert result["train_ratio"] > 0 and result["train_mfu"] > 0


@pytest.fixture
def tiny_pair(tiny_cfg, instruction_data, tokenizer):
    cfg = {**model_config("tiny"), **tiny_cfg}
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    batch = get_batch(instruction_data, tokenizer, batch_size=4)
    inputs, targets = batch["inputs"], batch["targets"]
    return model, hf_model(model, torch.device("cpu")).eval(), inputs, targets


def test_hf_labels_are_the_chapters_padded_sequences_shifted_by_hf(tiny_pair):
    _, _, inputs, targets = tiny_pair
    ids, labels = hf_batch(inputs, targets)
    assert ids.shape == labels.shape == (inputs.shape[0], inputs.shape[1] + 1)
    assert torch.equal(ids[:, :-1], inputs) and torch.equal(labels[:, 1:], targets)  # HF predicts labels[j+1] at j
    assert (labels[:, 0] == IGNORE_INDEX).all()
    counted = targets[:, -1] != IGNORE_INDEX
    assert torch.equal(ids[counted, -1], targets[counted, -1])  # the sequence's last token where it counts


def test_hf_loss_at_step_0_equals_ours_in_fp32(tiny_pair):
    model, hf, inputs, targets = tiny_pair
    with torch.no_grad():
        ours = calc_loss_batch(inputs, targets, model, "cpu").item()
        theirs = hf_loss(hf, inputs, targets).item()
    assert theirs == pytest.approx(ours, rel=1e-4, abs=0)
    assert not hf.config.tie_word_embeddings  # GPTModel's head is its own weight


def test_flop_formula_counts_each_paths_positions():
    assert body_matmul_params(SMALL) == 12 * 12 * 768 * 768 == 84_934_656
    targets = torch.full((2, 5), IGNORE_INDEX)
    targets[0, :3] = 7  # row 0: 3 counted targets; row 1: 1, at position 1
    targets[1, 1] = 7
    inputs = torch.zeros(2, 5, dtype=torch.long)
    assert step_positions(inputs, targets, "chapter") == (10, 10, 2, 5)
    assert step_positions(inputs, targets, "fast") == (3 + 2, 4, 2, 5)
    assert step_positions(inputs, targets, "hf") == (12, 12, 2, 6)
    fast = train_step_flops(SMALL, inputs, targets, "fast")
    assert fast["body"] == 3 * 2 * 84_934_656 * 5
    assert fast["head"] == 3 * 2 * 768 * 50257 * 4
    assert fast["attention"] == 3 * 12 * 2 * 2 * 5 * 768 * 2 * 5
    assert fast["total"] == fast["body"] + fast["head"] + fast["attention"]
    # one prompt of 3 tokens, 2 new: the prompt pass (causal: 1 + 2 + 3 keys), then one position (4 keys)
    body, head = 2 * 84_934_656, 2 * 768 * 50257
    assert generation_flops(SMALL, 3, 2) == body * 3 + head + 12 * 4 * 768 * 6 + body + head + 12 * 4 * 768 * 4
