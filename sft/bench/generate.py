"""Not in the book: answering test prompts, the chapter's section 7.7 loop against the fast path and HF's ``generate``."""
import copy

import torch

from ..fast.decode import generate_responses
from ..generation import extract_response, generate
from ..prompts import format_input
from ..studio.hardware import resolve_precision, tf32
from ..tokenizer import ENDOFTEXT, text_to_token_ids, token_ids_to_text
from .flops import generation_flops, mfu
from .hf import hf_answers, hf_model, transformers_missing
from .measure import Meter, log, release_memory


def chapter_answers(model, entries, tokenizer, max_new_tokens, device):
    """Section 7.7 of the chapter: one prompt at a time through ``generate``."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    answers = []
    for entry in entries:
        input_text = format_input(entry)
        token_ids = generate(model=model, idx=text_to_token_ids(input_text, tokenizer).to(device),
                             max_new_tokens=max_new_tokens, context_size=context_size, eos_id=50256)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        answers.append(extract_response(generated_text, input_text))
    return answers


def fast_answers(model, entries, tokenizer, max_new_tokens, device, precision, batch_size):
    """``generate_responses`` (KV cache, batches sorted by length), on a bf16 copy if asked."""
    gen_model = model if precision == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
    results = generate_responses(gen_model.eval(), entries, tokenizer, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, device=device)
    return [r["model_response"] for r in results]


def _hf_runner(args, model, entries, tokenizer, device, precision):
    """A function answering with HF ``generate`` on a copy of ``model`` in ``precision``."""
    hf = hf_model(model, device)
    if precision == "bf16":
        hf = hf.to(torch.bfloat16)
    return lambda: hf_answers(hf, entries, tokenizer, args.max_new_tokens, args.gen_batch_size)


def bench_generation(args, model, init_state, test, tokenizer, device, ceiling=None, model_cfg=None):
    release_memory()
    model.load_state_dict(init_state)
    entries = test[:args.gen_prompts]
    precision = resolve_precision(args.gen_precision, device)
    out = {"gen_prompts": len(entries), "max_new_tokens": args.max_new_tokens, "gen_batch_size": args.gen_batch_size,
           "gen_precision": precision}
    runs = [("chapter", lambda: chapter_answers(model, entries, tokenizer, args.max_new_tokens, device))]
    if precision != "fp32" and args.gen_fp32_too:  # what the KV cache and batching give alone
        runs.append(("fast_fp32", lambda: fast_answers(model, entries, tokenizer, args.max_new_tokens, device,
                                                       "fp32", args.gen_batch_size)))
    runs.append(("fast", lambda: fast_answers(model, entries, tokenizer, args.max_new_tokens, device,
                                              precision, args.gen_batch_size)))
    hf_missing = transformers_missing() if args.hf else "left out (--no-hf)"
    if hf_missing is None:
        runs.append(("hf", lambda: None))  # built just before its turn, so it is not resident before
    answers, gen = {}, {}
    for label, fn in runs:
        release_memory()
        if label == "hf":
            fn = _hf_runner(args, model, entries, tokenizer, device, precision)
        log(f"answering {len(entries)} test prompts, {label} path, up to {args.max_new_tokens} new tokens ...")
        # no TF32: the chapter's fp32, and exact tokens for fast_fp32 (bf16 does not use it)
        with torch.inference_mode(), tf32(device, False), Meter(device) as meter:
            answers[label] = fn()
        gen[label] = meter.report()
        gen[label]["precision"] = "fp32" if label in ("chapter", "fast_fp32") else precision
    if model_cfg is not None:  # the useful work: each prompt once, then one position per new token
        useful = sum(generation_flops(model_cfg, len(tokenizer.encode(format_input(e), allowed_special={ENDOFTEXT})),
                                      args.max_new_tokens) for e in entries)
        for r in gen.values():
            best = (ceiling or {}).get(r["precision"], {}).get("best")
            r.update({"useful_flops": useful, "mfu": mfu(useful, r["seconds"], best)})
        out["gen_mfu_by_path"] = {label: r["mfu"] for label, r in gen.items()}
    out["gen"] = gen
    out["gen_seconds"] = {label: r["seconds"] for label, r in gen.items()}
    out["gen_ratio"] = round(gen["chapter"]["seconds"] / gen["fast"]["seconds"], 3)
    out["gen_ratio_cpu"] = round(gen["chapter"]["cpu_seconds"] / gen["fast"]["cpu_seconds"], 3)
    out["gen_ratio_vs_hf"] = round(gen["hf"]["seconds"] / gen["fast"]["seconds"], 3) if "hf" in gen else None
    out["gen_peak_rss_mb"] = {label: r["peak_rss_mb"] for label, r in gen.items()}
    if hf_missing is not None:
        out["gen_hf_missing"] = hf_missing
    # Greedy answers equal to the chapter's, prompt by prompt (bf16 may flip near-ties, many
    # with random weights, whose logits are nearly flat).
    for label in answers:
        if label != "chapter":
            out[f"gen_same_answers_{label}"] = sum(a == b for a, b in zip(answers["chapter"], answers[label]))
    if "hf" in answers:  # the same precision on both: how often HF's answer is the fast path's
        out["gen_same_answers_hf_fast"] = sum(a == b for a, b in zip(answers["fast"], answers["hf"]))
    return out
