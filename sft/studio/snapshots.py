"""Not in the book: watching an answer take shape while the model trains.

The chapter prints one sample answer at each epoch's end (``generate_and_print_sample``). Here
the same greedy answer (KV cache, fp32, at most ``sample_tokens`` new tokens, stopping at
end-of-text: the tokens the chapter's ``generate`` gives) is taken at every ``snapshot_every``-th
evaluation, for the first validation prompt and up to two prompts the person adds
(``snapshot_prompts``). Each snapshot is an event ("snapshot") with the step, epoch, tokens seen,
that evaluation's losses, the answers and the seconds they cost; a run keeps them in
``snapshots.jsonl`` beside metrics.jsonl (``Run.record_event``), one appended line each.

``greedy_answer`` is also the epoch-end sample's; ``read_snapshots`` gives a run's snapshots, less
those a resume re-did; ``snapshot_cost`` sums their seconds against the run's.
"""
import time

from ..fast.decode import generate_batch
from ..prompts import get_prompt_style
from ..tokenizer import EOT_ID
from .config import extra_instructions
from .files import read_jsonl


def snapshot_prompts(config, first_prompt):
    """[(label, prompt)]: the first validation entry's prompt, then each extra instruction formatted
    with the run's prompt style (no input)."""
    style = get_prompt_style(config.prompt_style)
    prompts = [("first validation prompt", first_prompt)] if first_prompt else []
    for instruction in extra_instructions(config.snapshot_prompts):
        prompts.append((instruction, style.format_prompt({"instruction": instruction, "input": ""})))
    return prompts


def greedy_answer(model, tokenizer, prompt, max_new_tokens):
    """(prompt ids, new ids) of ``model``'s greedy answer to ``prompt``, stopping before end-of-text.

    KV cache, greedy, fp32 (no autocast: it keeps no cast cache under inference_mode, so it would
    recast every weight at each new token); the model is left in the mode it was in."""
    ids = tokenizer.encode(prompt)
    new = generate_batch(model, [ids], max_new_tokens=max_new_tokens, eos_id=EOT_ID)[0]
    return ids, new


class Snapshots:
    """The answers a Trainer takes at its evaluations. ``due(step)``: whether the evaluation at
    optimizer step ``step`` takes one (the k-th evaluation, k = step // eval_freq, when k is a
    multiple of ``snapshot_every``: the same steps after a resume). ``take`` returns the event data."""

    def __init__(self, config, tokenizer, first_prompt):
        self.every, self.eval_freq, self.max_new_tokens = config.snapshot_every, config.eval_freq, config.sample_tokens
        self.tokenizer = tokenizer
        self.prompts = snapshot_prompts(config, first_prompt) if tokenizer is not None else []

    def due(self, step):
        return bool(self.every and self.prompts) and (step // self.eval_freq) % self.every == 0

    def take(self, model):
        """{"answers": [{"label", "prompt", "response"}], "seconds"} for the model as it is now."""
        t0 = time.perf_counter()
        answers = []
        for label, prompt in self.prompts:
            _, new = greedy_answer(model, self.tokenizer, prompt, self.max_new_tokens)
            answers.append({"label": label, "prompt": prompt, "response": self.tokenizer.decode(new).strip(),
                            "tokens": len(new)})
        return {"answers": answers, "seconds": round(time.perf_counter() - t0, 4)}


def read_snapshots(run, resumed=None):
    """``run``'s snapshots in order. A resume re-does the steps after its checkpoint: the snapshots
    taken before the resume at later steps are dropped (as ``Run.read_metrics`` drops such events).
    ``resumed``: the run's "resumed" events, where the caller has read them already."""
    kept = read_jsonl(run.snapshots_path)
    for resume in run.read_metrics("resumed") if resumed is None else resumed:
        kept = [s for s in kept if s.get("time", 0) > resume.get("time", 0) or s.get("step", -1) <= resume["step"]]
    return kept


def snapshot_cost(snapshots, elapsed):
    """(seconds spent on snapshots, their share of ``elapsed``, the run's seconds: None when unknown)."""
    total = sum(s.get("seconds") or 0.0 for s in snapshots)
    return total, (total / elapsed if elapsed else None)
