"""What happens to a judge's scores once they exist: parsing replies, the resumable score
store, and the statistics (summary, item-by-item comparison, agreement between judges).

Not in the book: section 7.8 only averages the integers it could parse. Everything here is
our addition; nothing touches the network.
"""
import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Parsing a judge's reply

# ASCII digits only (re.ASCII): "९०" (Devanagari) or "٩٠" is not the judge writing "90".
_MARKUP = re.compile(r"[*_`#>]")  # markdown emphasis and quoting around the number
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# "85/100", "85 / 100", "85 out of 100"
_OUT_OF_100 = re.compile(rf"(?<![\w.])({_NUMBER})\s*(?:/|out\s+of)\s*100\b", re.IGNORECASE | re.ASCII)
# "Score: 85", "score is 85", "I would score it 85", "rating of 85"
# "8/10", "4 out of 5": another scale, so the number is not a 0..100 score
_OTHER_SCALE = re.compile(rf"{_NUMBER}\s*(?:/|out\s+of)\s*(?!100\b)\d+", re.IGNORECASE | re.ASCII)
_LABELLED = re.compile(rf"\b(?:score|rating|grade)\b\D{{0,20}}?({_NUMBER})", re.IGNORECASE | re.ASCII)
_ANY = re.compile(rf"(?<![\w.])({_NUMBER})(?![\w])", re.ASCII)


def _to_score(text):
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= 100:
        return None
    return int(math.floor(value + 0.5))  # 84.5 -> 85: half up, not Python's half-to-even


def parse_score(text):
    """The integer score 0..100 in a judge's reply, or None when there is none (or it is out of range).

    "85", "85.", "Score: 85/100", "**85**", "85 out of 100" -> 85. A reply with several bare numbers
    and no "score"/"/100" label is ambiguous and gives None rather than a guess.
    """
    if text is None:
        return None
    clean = _MARKUP.sub("", str(text)).strip().rstrip(".!").strip()
    if re.fullmatch(_NUMBER + r"\s*%?", clean, re.ASCII):
        return _to_score(clean.rstrip("%").strip())
    match = _OUT_OF_100.search(clean)
    if match:
        return _to_score(match.group(1))
    if _OTHER_SCALE.search(clean):
        return None
    match = _LABELLED.search(clean)
    if match:
        return _to_score(match.group(1))
    numbers = _ANY.findall(clean)
    if len(numbers) == 1:
        return _to_score(numbers[0])
    return None


# ---------------------------------------------------------------------------------------------
# Append-only JSONL store: one line per judged item, written the moment its score arrives


class ScoreStore:
    """Score records in a JSONL file, keyed by ``record["key"]`` (entry index + prompt + judge hash).

    Appending one flushed line per score means an interrupted run loses at most the line being
    written; ``load`` ignores such a cut-off last line and the next ``append`` trims it.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self):
        """-> {key: record}; later lines win. Raises ValueError naming the file and line if corrupt."""
        if not self.path.exists():
            return {}
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        records = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if n == len(lines):  # no newline after it: a write cut short, that item is asked again
                    continue
                raise ValueError(f"{self.path}, line {n}: not a JSON score record") from None
            if not isinstance(record, dict) or "key" not in record:
                raise ValueError(f"{self.path}, line {n}: a score record needs a 'key' field")
            records[record["key"]] = record
        return records

    def append(self, record):
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                size = f.seek(0, os.SEEK_END)
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":  # drop a partial line left by a killed run
                        f.seek(0)
                        keep = f.read().rfind(b"\n") + 1
                        f.truncate(keep)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Statistics


def _scored(scores):
    """Scores as a float array, dropping None (unparsed)."""
    return np.array([s for s in scores if s is not None], dtype=float)


def bootstrap_mean_interval(values, *, confidence=0.95, n_boot=2000, seed=123):
    """Percentile bootstrap interval of the mean: (low, high), or (None, None) without data."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize_scores(scores, *, total=None, bins=10, confidence=0.95, n_boot=2000, seed=123):
    """Summary of one judged set; ``scores`` holds ints, None for unparsed replies.

    -> dict: n (scored), total, unparsed, mean, median, std, ci_low, ci_high, confidence,
    histogram {"edges": [0, 10, ..., 100], "counts": [...]} (the last bin includes 100).
    """
    scores = list(scores)
    x = _scored(scores)
    total = len(scores) if total is None else total
    low, high = bootstrap_mean_interval(x, confidence=confidence, n_boot=n_boot, seed=seed)
    counts, edges = np.histogram(x, bins=bins, range=(0, 100))
    return {
        "n": int(x.size),
        "total": int(total),
        "unparsed": int(total - x.size),
        "mean": float(x.mean()) if x.size else None,
        "median": float(np.median(x)) if x.size else None,
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def _paired(a, b, what):
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(
            f"{what} needs the same items in the same order, but the score lists differ in "
            f"length ({len(a)} vs {len(b)})"
        )
    keep = [i for i in range(len(a)) if a[i] is not None and b[i] is not None]
    x = np.array([a[i] for i in keep], dtype=float)
    y = np.array([b[i] for i in keep], dtype=float)
    return x, y, len(a) - len(keep)


def compare_scores(a, b, *, confidence=0.95, n_boot=2000, seed=123):
    """Two response sets scored on the same items, compared item by item from ``a``'s side.

    Items unparsed in either set are skipped (counted in ``skipped``). -> dict: n, skipped,
    wins (a > b), ties, losses (a < b), mean_a, mean_b, mean_diff (mean of a - b) and its
    bootstrap interval diff_ci_low/diff_ci_high.
    """
    x, y, skipped = _paired(a, b, "comparing two response sets")
    d = x - y
    low, high = bootstrap_mean_interval(d, confidence=confidence, n_boot=n_boot, seed=seed)
    return {
        "n": int(d.size),
        "skipped": int(skipped),
        "wins": int((d > 0).sum()),
        "ties": int((d == 0).sum()),
        "losses": int((d < 0).sum()),
        "mean_a": float(x.mean()) if d.size else None,
        "mean_b": float(y.mean()) if d.size else None,
        "mean_diff": float(d.mean()) if d.size else None,
        "diff_ci_low": low,
        "diff_ci_high": high,
    }


def _average_ranks(x):
    """1-based ranks, ties sharing the mean of their positions (as Spearman's rho wants)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last copy of each distinct value
    return (last - (counts - 1) / 2.0)[inverse]


def _pearson(x, y):
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None  # undefined for constant lists
    return float(np.corrcoef(x, y)[0, 1])


def judge_agreement(a, b):
    """How far two judges agree on the same items: -> dict n, skipped, pearson, spearman,
    mean_abs_diff (correlations are None where undefined, e.g. a constant list)."""
    x, y, skipped = _paired(a, b, "judge agreement")
    return {
        "n": int(x.size),
        "skipped": int(skipped),
        "pearson": _pearson(x, y),
        "spearman": _pearson(_average_ranks(x), _average_ranks(y)) if x.size else None,
        "mean_abs_diff": float(np.abs(x - y).mean()) if x.size else None,
    }


# ---------------------------------------------------------------------------------------------
# Figures (Plotly, imported only when drawn; the Judge page and notebooks use them)


def _layout(fig, **kw):
    return fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), **kw)


def plot_score_histogram(summary):
    """Bars of ``summarize_scores(...)["histogram"]``: answers per 10-point bin of score."""
    import plotly.graph_objects as go

    edges, counts = summary["histogram"]["edges"], summary["histogram"]["counts"]
    centers = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
    width = 0.95 * (edges[1] - edges[0])
    return _layout(go.Figure(go.Bar(x=centers, y=counts, width=width, name="answers")),
                   xaxis_title="score", yaxis_title="answers", xaxis_range=[0, 100])


def plot_score_pairs(a, b, x_title="A", y_title="B"):
    """One point per item scored in both lists (None skipped), with the line of equal scores."""
    import plotly.graph_objects as go

    x, y, _ = _paired(a, b, "plotting two score lists")
    fig = go.Figure(go.Scatter(x=x, y=y, mode="markers", marker=dict(opacity=0.6), name="items"))
    fig.add_shape(type="line", x0=0, y0=0, x1=100, y1=100, line=dict(dash="dot", color="grey"))
    return _layout(fig, xaxis_title=x_title, yaxis_title=y_title)
