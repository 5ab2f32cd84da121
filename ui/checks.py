"""The pre-training checks in words: which examples the current settings spoil, counted by kind.

``sft.batching.pretraining_checks`` counts the examples (each under one kind of problem); this
module turns its report into markdown for the Batches page and, through ``settings_warning``,
for any page that is about to train with the session's settings.
"""
from . import loaders


def settings_text(allowed_max_length, mask_instruction) -> str:
    return (f"allowed_max_length {allowed_max_length} and the instruction "
            + ("masked" if mask_instruction else "not masked"))


def report_header(report: dict, split: str, allowed_max_length, mask_instruction) -> str:
    """How many examples of `split` have a problem, of how many, with which settings (markdown)."""
    return (f"**{report['n_affected']} of {report['n_examples']} examples have problem(s) in the {split} split** "
            f"with {settings_text(allowed_max_length, mask_instruction)}:")


def report_lines(report: dict, split: str) -> str:
    """Markdown: one bullet per kind of problem (each example under one kind), the overlapping facts, and the
    allowed_max_length that keeps every example whole."""
    lines = [f"- {sentence}." for sentence in report["summary"]]
    facts = (len(report["truncated"]), len(report["not_one_eot"]), len(report["wholly_masked"]))
    if sum(facts) > report["n_affected"]:  # one example can have several: say why the sum is larger
        lines += ["", f"Each example is counted once, under its first problem. As facts, which overlap: {facts[0]} "
                      f"examples are cut, {facts[1]} do not keep exactly one end-of-text target, {facts[2]} have "
                      f"every target masked ({sum(facts)} problems in {report['n_affected']} examples)."]
    if report["truncated"]:
        longest = max(t["length"] for t in report["truncated"])
        lines += ["", f"allowed_max_length {longest} (or more) keeps every {split} example whole."]
    return "\n".join(lines)


def report_markdown(report: dict, split: str, allowed_max_length, mask_instruction) -> str:
    """Markdown naming the examples affected, by kind; "" when the report is fine."""
    if report["ok"]:
        return ""
    return report_header(report, split, allowed_max_length, mask_instruction) + "\n\n" + report_lines(report, split)


def settings_warning(ss) -> str | None:
    """Markdown naming the train examples the session's settings spoil, by kind; None if all is fine.

    Reads ``allowed_max_length``, ``mask_instruction`` and ``prompt_style`` from ``ss`` (the session
    state) and the dataset as every page reads it (``ui.loaders``), and checks the train split, the
    one that trains."""
    max_len, mask, style = ss["allowed_max_length"], bool(ss["mask_instruction"]), ss["prompt_style"]
    data = loaders.splits()["train"]
    if not data:
        return None  # no train split at all: the Data page and Fine-tune say so themselves
    report = loaders.pretraining_checks(ss.get("dataset_key", "bundled"), "train", max_len, mask, style, data)
    return report_markdown(report, "train", max_len, mask) or None
