"""sft.bench.lora: each method trains in its own process and reports what it measured (no timing asserted)."""
from sft.bench.lora import compare


def test_lora_bench_reports_both_methods_on_the_tiny_model(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = compare("tiny", steps=2, batch_size=2, rank=4, allowed_max_length=32, device="cpu")
    full, lora = out["full"], out["lora"]
    assert (full["method"], lora["method"]) == ("full", "LoRA")
    assert full["trainable"] == full["total"] == 6_549_376
    assert lora["trainable"] == 4 * (4 * 2 * (64 + 64) + 2 * (64 + 256) + 2 * (256 + 64)) + 4 * (64 + 50257)
    assert full["timed_steps"] == lora["timed_steps"] == 2
    assert full["tokens_per_s"] > 0 and lora["tokens_per_s"] > 0 and full["peak_rss_mb"] > 0
    assert out["speedup"] == round(lora["tokens_per_s"] / full["tokens_per_s"], 3)


def test_the_profile_says_where_each_methods_time_goes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = compare("tiny", steps=2, batch_size=2, rank=4, allowed_max_length=32, device="cpu", profile=True)
    full, lora = out["full"]["profile_ms_per_step"], out["lora"]["profile_ms_per_step"]
    assert "weight products (Linear, head)" in full and "adapter products (thin, rank r)" not in full
    assert lora["adapter products (thin, rank r)"] > 0  # x A (tokens, 4) and (x A) B found by their rank
    # Full fine-tuning's AdamW steps over 6.5M weights; LoRA's over its adapters only.
    assert full["optimizer (AdamW)"] > lora.get("optimizer (AdamW)", 0.0)
    assert all(ms >= 0 for ms in [*full.values(), *lora.values()])
