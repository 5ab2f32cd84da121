"""`python -m sft.bench` on a tiny model: one JSON line, both paths on the same batches (no timing asserts)."""
import json

import pytest

from sft import bench


@pytest.mark.slow
def test_bench_prints_one_json_line_and_both_paths_agree(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code = bench.main(["--model", "tiny", "--threads", "1", "--train-steps", "2", "--eval-freq", "1",
                       "--eval-iter", "1", "--allowed-max-length", "64", "--gen-prompts", "2", "--max-new-tokens", "3",
                       "--gen-precision", "fp32", "--out", str(out_file)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == result
    for key in ("device", "threads", "torch", "train_tokens_per_s", "train_ratio", "losses", "loss_rel_diff_last",
                "gen_seconds", "gen_ratio", "gen_prompts", "max_new_tokens", "load_avg_before"):
        assert key in result, key
    assert result["device"] == "cpu" and result["threads"] == 1 and result["weights"] == "random"
    assert result["matmul_gflops"]["fp32"] > 0 and result["matmul_shape"] == [512, 768, 3072]
    chapter_rounds = result["train"]["chapter"]["round_seconds"]
    assert len(chapter_rounds) == len(result["train"]["fast"]["round_seconds"]) == 2  # turns of one step
    assert result["train_round_ratio_median"] > 0
    chapter, fast = result["train"]["chapter"], result["train"]["fast"]
    assert (chapter["precision"], chapter["masked_head"], fast["masked_head"]) == ("fp32", False, True)
    assert chapter["tokens"] == fast["tokens"] > 0  # the same batches
    assert len(result["losses"]["chapter"]) == len(result["losses"]["fast"]) == 2
    assert result["losses"]["fast"] == pytest.approx(result["losses"]["chapter"], rel=2e-2)
    assert result["loss_rel_diff_last"] < 2e-2 and result["val_loss_after_rel_diff"] < 2e-2
    assert chapter["peak_rss_mb"] > 0 and set(result["gen_seconds"]) == {"chapter", "fast"}
    # fp32 on both generation paths: the KV cache gives the chapter's greedy answers
    assert result["gen_same_answers_fast"] == 2
