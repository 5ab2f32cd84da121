"""Not in the book: answering test prompts, the chapter's section 7.7 loop against the fast path."""
import copy

import torch

from ..fast.decode import generate_responses
from ..generation import extract_response, generate
from ..prompts import format_input
from ..studio.hardware import resolve_precision, tf32
from ..tokenizer import text_to_token_ids, token_ids_to_text
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


def bench_generation(args, model, init_state, test, tokenizer, device):
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
    answers, gen = {}, {}
    for label, fn in runs:
        release_memory()
        log(f"answering {len(entries)} test prompts, {label} path, up to {args.max_new_tokens} new tokens ...")
        # no TF32: the chapter's fp32, and exact tokens for fast_fp32 (bf16 does not use it)
        with torch.inference_mode(), tf32(device, False), Meter(device) as meter:
            answers[label] = fn()
        gen[label] = meter.report()
    out["gen"] = gen
    out["gen_seconds"] = {label: r["seconds"] for label, r in gen.items()}
    out["gen_ratio"] = round(gen["chapter"]["seconds"] / gen["fast"]["seconds"], 3)
    out["gen_ratio_cpu"] = round(gen["chapter"]["cpu_seconds"] / gen["fast"]["cpu_seconds"], 3)
    # Greedy answers equal to the chapter's, prompt by prompt (bf16 may flip near-ties, many
    # with random weights, whose logits are nearly flat).
    for label in answers:
        if label != "chapter":
            out[f"gen_same_answers_{label}"] = sum(a == b for a, b in zip(answers["chapter"], answers[label]))
    return out


