"""Instruction data: download, load, validate, split (chapter 7, section 7.2).

``download_and_load_file`` and the 85/10/5 split are the chapter's. Beside them,
``load_instruction_data`` reads the bundled file, a path, a URL or uploaded bytes, as a
JSON array or JSONL (one object per line), e.g. the 52K Alpaca file of exercise 7.3,
and checks every entry: all problems are reported together in one ``DataValidationError``,
never half a file loaded silently. A URL that cannot be fetched raises ``DataFetchError`` saying
why in words (no network, refused, timed out, HTTP status) and what to do.
"""
import json
import os
import statistics
from pathlib import Path

from .download import download_file

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_DATA = ASSETS / "instruction-data.json"
CHAPTER_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch"
    "/main/ch07/01_main-chapter-code/instruction-data.json"
)
ALPACA_52K_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
MAX_PROBLEMS_SHOWN = 20  # the error message lists this many; `.problems` holds them all
ENDOFTEXT = "<|endoftext|>"


class DataValidationError(ValueError):
    """Bad instruction data. ``.problems`` lists every problem found, each naming where."""

    def __init__(self, problems, source="data", hint=""):
        self.problems = list(problems)
        self.source = str(source)
        self.hint = hint
        shown = "\n".join(f"  - {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        n = len(self.problems)
        tail += f"\n{hint}" if hint else ""
        super().__init__(f"{self.source}: {n} problem{'s' if n != 1 else ''} found; nothing loaded:\n{shown}{tail}")


class DataFetchError(OSError):
    """A URL that gave no data: ``.url``, ``.reason`` (what went wrong, e.g. "no network") and
    ``.advice`` (what to do), all in the message."""

    def __init__(self, url, reason, advice):
        self.url, self.reason, self.advice = str(url), reason, advice
        super().__init__(f"{self.url}: {reason}. {advice}")


OFFLINE_ADVICE = ("Check the address and the network and try again; or download the file on a machine that "
                  "has network access and load it from disk (its path, or an upload in the app).")


def _fetch_error(url, exc, timeout):
    """The DataFetchError that says in words why requests could not fetch ``url``."""
    import requests
    import urllib3
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or url
    where = f"{host}:{parts.port}" if parts.port else host
    cause = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's MaxRetryError.reason
    unresolved = getattr(urllib3.exceptions, "NameResolutionError", ())  # urllib3 2.x names it
    text = f"{cause or exc}"
    if isinstance(cause, unresolved) or "Failed to resolve" in text or "Name or service not known" in text:
        return DataFetchError(url, f"no network, or no such host: the name {host} could not be resolved",
                              OFFLINE_ADVICE)
    if isinstance(exc, requests.exceptions.SSLError):
        return DataFetchError(url, f"the secure connection to {where} failed ({text})",
                              "Check the address (http or https) and this machine's clock and certificates.")
    if isinstance(exc, requests.exceptions.Timeout):
        return DataFetchError(url, f"no answer from {where} within {timeout:g} s (a slow or lost network, "
                                   "or the server is down)", OFFLINE_ADVICE)
    if isinstance(exc, requests.exceptions.ConnectionError):
        if "refused" in text.lower():
            return DataFetchError(url, f"{where} refused the connection (nothing serves files there)",
                                  "Check the address and port, or start the server.")
        return DataFetchError(url, f"cannot reach {where}: no network, or the host cannot be reached",
                              OFFLINE_ADVICE)
    return DataFetchError(url, f"{type(exc).__name__}: {exc}", "Check the address.")


def _fetch_text(url, timeout=60):
    import requests

    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as e:
        raise _fetch_error(url, e, timeout) from e
    if response.status_code >= 400:
        raise DataFetchError(url, f"HTTP {response.status_code} {response.reason}",
                             "The server has no file for this address: check it." if response.status_code < 500
                             else "The server failed: try again later.")
    return response.content


def download_and_load_file(file_path, url):
    """Chapter 7: download ``url`` to ``file_path`` once, then read it as JSON."""
    if not os.path.exists(file_path):
        # Not in the book: streamed through a ".part" file renamed when complete (no half file),
        # with a progress bar, resumed if cut short.
        download_file(url, file_path, show_bar=False)
    with open(file_path, "r", encoding="utf-8") as file:
        data = json.load(file)
    return data


# ----------------------------------------------------------------------------- Not in the book:
# loading from anywhere, with every problem reported at once.

def _read_source(source):
    """(raw bytes, name for messages) from None, a path, a URL, bytes or a file-like upload."""
    if source is None:
        return BUNDLED_DATA.read_bytes(), "bundled instruction-data.json"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "uploaded data"
    if hasattr(source, "read"):  # e.g. a Streamlit UploadedFile or an open binary file
        raw = source.read()
        return (raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)), getattr(source, "name", "upload")
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return _fetch_text(text), text
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file not found: {path}")
    return path.read_bytes(), str(path)


def _decode(raw, name):
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataValidationError(
            [f"not UTF-8 text: cannot decode byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason})"],
            name,
        ) from None


def _loads(text):
    """json.loads, with JSON nested too deeply for Python's parser reported as bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply (more levels than any entry needs)", text, 0) from None


def parse_records(text, name="data"):
    """Parse a JSON array or JSONL text into a list of raw records; raise on bad syntax.

    A file named ``.jsonl``/``.ndjson`` is read line by line; a ``.json`` file must hold one
    array; a source without a name (bytes) may be either.
    """
    stripped = text.strip()
    if not stripped:
        raise DataValidationError(["the file is empty"], name)
    lower = str(name).lower()
    if not lower.endswith((".jsonl", ".ndjson")):
        try:
            data = _loads(text)
        except json.JSONDecodeError as e:
            if not stripped.startswith("{") or lower.endswith(".json"):
                hint = " (for one object per line, name the file .jsonl)" if stripped.startswith("{") else ""
                raise DataValidationError([f"bad JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}"],
                                          name) from None
            data = None  # starts like JSONL: parse it line by line below, naming the bad lines
        if isinstance(data, list):
            return data
        if isinstance(data, dict) and len(stripped.splitlines()) > 1:
            raise DataValidationError(["top level is a JSON object; expected a list of entries "
                                       "(a JSON array, or JSONL with one object per line)"], name)
        if isinstance(data, dict) and lower.endswith(".json"):
            raise DataValidationError(["top level is one JSON object, but a .json file must hold a list of "
                                       "entries ([{...}, {...}]); for one object per line, name the file .jsonl"],
                                      name)
        if data is not None and not isinstance(data, dict):
            raise DataValidationError([f"top level is {type(data).__name__}; expected a list of entries"], name)
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_loads(line))
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}, column {e.colno}: bad JSON: {e.msg}")
    if problems:
        raise DataValidationError(problems, name)
    return records


def validate_entries(data, *, duplicates="error", source="data"):
    """Check every entry; return normalised copies (``input`` always a string) or raise.

    Each entry needs non-empty string ``instruction`` and ``output``; ``input`` is optional
    (missing or null means ""). Other keys are kept. ``duplicates`` (same instruction and
    input): "error" reports them, "keep" keeps them (the chapter's file has 25), "drop"
    keeps the first of each.
    """
    if duplicates not in ("error", "keep", "drop"):
        raise ValueError(f"duplicates must be 'error', 'keep' or 'drop', not {duplicates!r}")
    if not isinstance(data, list):
        raise DataValidationError([f"top level is {type(data).__name__}; expected a list of entries"], source)
    problems, entries, first_seen, dropped = [], [], {}, set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            problems.append(f"entry {i}: is {type(entry).__name__}, expected an object with instruction/input/output")
            continue
        entry = dict(entry)
        if entry.get("input") is None:
            entry["input"] = ""
        for key in ("instruction", "input", "output"):
            if key not in entry:
                problems.append(f"entry {i}: missing '{key}'")
            elif not isinstance(entry[key], str):
                problems.append(f"entry {i}: '{key}' is {type(entry[key]).__name__}, expected a string")
            elif key != "input" and not entry[key].strip():
                problems.append(f"entry {i}: '{key}' is empty")
            elif ENDOFTEXT in entry[key]:  # GPT-2's tokenizer refuses special-token text by default
                problems.append(f"entry {i}: '{key}' contains the special token text {ENDOFTEXT}")
        if isinstance(entry.get("instruction"), str) and isinstance(entry.get("input"), str):
            key = (entry["instruction"], entry["input"])
            if key in first_seen:
                if duplicates == "error":
                    problems.append(f"entry {i}: duplicate of entry {first_seen[key]} (same instruction and input)")
                elif duplicates == "drop":
                    dropped.add(i)
            else:
                first_seen[key] = i
        entries.append(entry)
    if problems:
        hint = ""
        if duplicates == "error" and any("duplicate of entry" in p for p in problems):
            hint = "For duplicates, pass duplicates='keep' to keep them or 'drop' to keep only the first."
        raise DataValidationError(problems, source, hint)
    if dropped:
        entries = [e for i, e in enumerate(entries) if i not in dropped]
    return entries


def load_instruction_data(source=None, *, duplicates=None):
    """Load and validate instruction data.

    ``source``: None (the chapter's bundled 1100 entries), a file path, an http(s) URL,
    bytes, or a file-like upload; JSON array or JSONL. Returns a list of dicts with
    string ``instruction``, ``input`` and ``output``. ``duplicates`` defaults to "keep"
    for the bundled file (the chapter trains on all 1100) and "error" otherwise.
    """
    raw, name = _read_source(source)
    if duplicates is None:
        duplicates = "keep" if source is None else "error"
    records = parse_records(_decode(raw, name), name)
    if not records:
        raise DataValidationError(["the file holds no entries (an empty list): nothing to train on"], name)
    return validate_entries(records, duplicates=duplicates, source=name)


def split_data(data, train_frac=0.85, test_frac=0.10):
    """Chapter 7: (train, test, val) = first 85%, next 10%, the rest (935/110/55 for 1100)."""
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    return train_data, test_data, val_data


def length_stats(data, tokenizer, prompt_style="alpaca", *, allowed_max_length=1024):
    """Token counts per entry (prompt + response, as the dataset tokenizes them) and a summary."""
    from .prompts import get_prompt_style

    style = get_prompt_style(prompt_style)
    lengths, prompt_lengths = [], []
    for entry in data:
        prompt_ids, response_ids = style.split_ids(entry, tokenizer)
        lengths.append(len(prompt_ids) + len(response_ids))
        prompt_lengths.append(len(prompt_ids))
    summary = {"count": len(lengths), "allowed_max_length": allowed_max_length}
    if lengths:
        summary.update(
            min=min(lengths),
            median=statistics.median(lengths),
            mean=statistics.fmean(lengths),
            max=max(lengths),
            over_max_length=sum(n > allowed_max_length for n in lengths),
        )
    return {"lengths": lengths, "prompt_lengths": prompt_lengths,
            "response_lengths": [n - p for n, p in zip(lengths, prompt_lengths)], "summary": summary}
