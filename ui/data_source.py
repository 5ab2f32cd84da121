"""The Data page's loading, in functions a test can call: an upload read by its file name, its size
checked against the app's limit, the engine's errors in words, and a warning for splits too small to use.

Nothing here draws; the page shows what these return. The engine (``sft.data``) does the validation.
"""
import io

from sft.data import DataFetchError, load_instruction_data, split_data

from .text import MB, megabytes, plural

TINY_SPLIT = 8  # the chapter's batch size: a split under one batch gives a loss or a score from a handful
MAX_PROBLEMS_SHOWN = 30


def load_upload(raw: bytes, name: str, duplicates: str = "error") -> list:
    """The uploaded bytes, validated by ``sft.data.load_instruction_data`` under the file's own name, so
    a ``.json`` file must hold a list and a ``.jsonl`` file one object per line (bytes alone may be either).
    Raises ``sft.data.DataValidationError`` naming the file."""
    upload = io.BytesIO(raw)
    upload.name = name  # the engine reads the name of a file-like source, as it does a Streamlit upload's
    return load_instruction_data(upload, duplicates=duplicates)


def too_big(name: str, size: int, limit_mb: int):
    """Markdown saying why a file over ``limit_mb`` is not loaded and what to do instead; None if it fits."""
    if size <= limit_mb * MB:
        return None
    return (f"**Not loaded: {name} is {megabytes(size)}; the limit is {limit_mb} MB.**\n\n"
            "Load it from a URL instead (the URL source has no size limit), or train on it from the command "
            f"line, which reads files of any size: `python -m sft train --data {name}`.")


def error_message(exc: Exception) -> str:
    """Markdown for an error of the engine's loader, in its own words (every problem, naming the entry)."""
    problems = getattr(exc, "problems", None)  # sft.data.DataValidationError
    if problems:
        shown = "\n".join(f"- {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        return (f"**Not loaded: {plural(len(problems), 'problem', 'problems')} in {exc.source}.**\n\n{shown}"
                + (f"\n- … and {more} more" if more > 0 else "")
                + (f"\n\n{exc.hint}" if getattr(exc, "hint", "") else ""))
    if isinstance(exc, DataFetchError):
        return f"**Not loaded: {exc.reason}.**\n\n{exc.advice}\n\n`{exc.url}`"
    return f"**Not loaded: {type(exc).__name__}.** {exc}"


def split_counts(n: int) -> dict:
    """{"train", "val", "test"}: how many of ``n`` entries the chapter's split (85/10/5) puts in each."""
    train, test, val = split_data(range(n))
    return {"train": len(train), "val": len(val), "test": len(test)}


def smallest_full_size(at_least: int = TINY_SPLIT) -> int:
    """The fewest entries whose chapter split gives every part ``at_least`` entries."""
    n = 3 * at_least
    while min(split_counts(n).values()) < at_least:
        n += 1
    return n


_EMPTY = {"train": "Fine-tune cannot start: there is nothing to train on",
          "val": "Fine-tune measures no validation loss",
          "test": "Compare and Judge have no test split to answer and score"}
_TINY = {"train": "an epoch is less than one batch of {tiny}",
         "val": "the validation loss on Fine-tune comes from {n} only",
         "test": "Compare and Judge answer and score {n} only"}


def split_warning(counts: dict, tiny: int = TINY_SPLIT):
    """Markdown naming each split that is empty or under ``tiny`` entries and the pages it leaves short;
    None when every split has ``tiny`` or more."""
    lines = []
    for part in ("train", "val", "test"):
        n = counts[part]
        if n == 0:
            lines.append(f"- **{part}** is empty: {_EMPTY[part]}.")
        elif n < tiny:
            entries = plural(n, "entry", "entries")
            lines.append(f"- **{part}** has {entries}: " + _TINY[part].format(n=entries, tiny=tiny) + ".")
    if not lines:
        return None
    total = sum(counts.values())
    return (f"**Split too small:** train {counts['train']}, val {counts['val']}, test {counts['test']} "
            f"of {plural(total, 'entry', 'entries')} (the chapter's 85% / 10% / 5%).\n\n" + "\n".join(lines)
            + f"\n\nEvery split has {tiny} or more from {smallest_full_size(tiny)} entries on.")
