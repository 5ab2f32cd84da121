"""App-side helpers shared by the pages: paths, session-state keys, cached loaders, Plotly figures.

Pages stay thin by calling these and `sft`. Nothing here pads, masks or computes a loss: that is the
engine's job. Folders come from the environment so tests (and people) can point the app elsewhere:
SFT_RUNS_DIR (default ./runs), SFT_MODELS_DIR (default ./models) and SFT_OLLAMA_URL
(default http://localhost:11434).
"""
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
GPT2_NAMES = ["gpt2-small (124M)", "gpt2-medium (355M)", "gpt2-large (774M)", "gpt2-xl (1558M)"]
TINY = "tiny (random)"  # sft.model.TINY_NAME: random weights, for offline demos and tests
UPLOAD_LIMIT_MB = 50  # also the server's maxUploadSize in .streamlit/config.toml


def runs_dir() -> Path:
    return Path(os.environ.get("SFT_RUNS_DIR") or ROOT / "runs")


def models_dir() -> Path:
    return Path(os.environ.get("SFT_MODELS_DIR") or ROOT / "models")


OLLAMA_URL = "http://localhost:11434"  # Ollama's default; SFT_OLLAMA_URL overrides it (read per call)


def ollama_url() -> str:
    return os.environ.get("SFT_OLLAMA_URL") or OLLAMA_URL


# Plain session_state keys: widget values vanish when their page is not shown, these survive.
STATE_DEFAULTS = {
    "dataset": None,  # list[dict] chosen on the Data page; None means the bundled chapter dataset
    "dataset_name": "chapter dataset (bundled, 1100 entries)",
    "dataset_key": "bundled",  # cache key for whatever depends on the dataset
    "prompt_style": "alpaca",
    "allowed_max_length": 1024,  # chosen on the Batches page, used by Fine-tune
    "mask_instruction": False,  # exercise 7.2, likewise
    "model_name": "gpt2-medium (355M)",  # the chapter's choice
    "run_name": None,  # the run the Fine-tune and Compare pages show
}


def init_state():
    """Every page starts here: the app's own navigation, then the plain keys with their defaults."""
    _leave_legacy_navigation()
    for key, value in STATE_DEFAULTS.items():
        st.session_state.setdefault(key, value)


def _leave_legacy_navigation():
    # Streamlit quirk: a server whose very first visit is a page URL (say /judge) finds a pages/ folder
    # and runs that page in the legacy multipage mode, without app.py, so the sidebar lists the files
    # of pages/ (common.py among them) for the server's whole life. app.py's st.navigation is what
    # leaves that mode; a page that finds itself in it clears the flag and reruns through app.py.
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the flag has no such mode
        return
    # Once per session: AppTest puts every run back in that mode, and a rerun there would drop a click.
    if getattr(PagesManager, "uses_pages_directory", None) and not st.session_state.get("_nav_checked"):
        st.session_state["_nav_checked"] = True
        PagesManager.uses_pages_directory = False
        st.rerun()


def start_widget(key: str, value, options=None):
    """Give widget `key` its value from a plain key before it is drawn (so no `index=`/default argument,
    and a value set in a callback really shows). Done only when the widget is not on screen already,
    or holds a value no longer among `options`."""
    ss = st.session_state
    if key not in ss or (options is not None and ss[key] not in options):
        ss[key] = value


# ---- cached loaders -------------------------------------------------------------------------------

@st.cache_resource
def tokenizer():
    from sft.tokenizer import get_tokenizer

    return get_tokenizer()


@st.cache_data(show_spinner=False)
def bundled_data() -> list:
    from sft.data import load_instruction_data

    return load_instruction_data()


@st.cache_data(show_spinner="Loading and checking the data…", max_entries=4)
def load_data(source, duplicates="error") -> list:
    """source: a URL string or uploaded bytes. Raises sft.data.DataValidationError on bad entries."""
    from sft.data import load_instruction_data

    return load_instruction_data(source, duplicates=duplicates)


def dataset() -> list:
    init_state()
    return st.session_state["dataset"] or bundled_data()


def splits() -> dict:
    """The chapter's split of the current dataset: {"train": [...], "val": [...], "test": [...]}."""
    from sft.data import split_data

    train, test, val = split_data(dataset())
    return {"train": train, "val": val, "test": test}


@st.cache_data(show_spinner=False, max_entries=8)
def length_stats(key: str, style: str, _data: list, allowed_max_length: int = 1024) -> dict:
    """sft.data.length_stats of the dataset named by `key` (`_data` is not hashed)."""
    from sft.data import length_stats as stats

    return stats(_data, tokenizer(), style, allowed_max_length=allowed_max_length)


@st.cache_data(show_spinner="Building the batch…", max_entries=16)
def batch_view(key: str, split: str, batch_number: int, batch_size: int, seed: int, allowed_max_length: int,
               mask_instruction: bool, style: str, _data: list) -> dict:
    """One batch of `split` as the loader builds it, and its anatomy (sft.batching)."""
    from sft.batching import batch_anatomy, get_batch

    batch = get_batch(_data, tokenizer(), batch_number=batch_number, batch_size=batch_size,
                      shuffle=split == "train", seed=seed, allowed_max_length=allowed_max_length,
                      prompt_style=style, mask_instruction=mask_instruction)
    anatomy = batch_anatomy(batch["inputs"], batch["targets"], tokenizer(), entries=batch["entries"],
                            prompt_style=style)
    return {"indices": batch["indices"], "inputs": batch["inputs"].tolist(),
            "targets": batch["targets"].tolist(), "anatomy": anatomy}


@st.cache_data(show_spinner="Checking every example…", max_entries=8)
def pretraining_checks(key: str, split: str, allowed_max_length: int, mask_instruction: bool, style: str,
                       _data: list) -> dict:
    from sft.batching import pretraining_checks as checks

    return checks(_data, tokenizer(), allowed_max_length=allowed_max_length,
                  mask_instruction=mask_instruction, prompt_style=style)


@st.cache_resource
def device_info() -> dict:
    """Devices torch can use here, best first ({"id", "name"}), plus sft.hardware's summary."""
    import torch

    from sft.hardware import device_summary

    devices = []
    for i in range(torch.cuda.device_count()):
        devices.append({"id": f"cuda:{i}", "name": f"CUDA GPU: {torch.cuda.get_device_name(i)}"})
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append({"id": "mps", "name": "Apple MPS"})
    summary = device_summary()
    cpu = f"CPU: {summary.get('name') or 'unknown'}, {os.cpu_count()} cores"
    devices.append({"id": "cpu", "name": cpu + (", fast bf16" if summary.get("cpu_bf16") else "")})
    return {"devices": devices, "ids": [d["id"] for d in devices], "summary": summary}


def weights_status() -> dict:
    """{gpt2 name: "openai" | "hf" | None}: which source's files are in models_dir()."""
    from sft.weights import weights_available

    return {name: weights_available(name, os.fspath(models_dir())) for name in GPT2_NAMES}


@st.cache_data(ttl=30, show_spinner=False)
def ollama_status(url: str) -> dict:
    """{"ok", "models", "error"} from sft.judge's health check (GET /api/tags, short time-out)."""
    from sft.judge import ollama_status as ask

    status = ask(url, timeout=1.5)
    return {"ok": bool(status.reachable and not status.error), "models": list(status.models),
            "error": status.error}


@st.cache_resource(max_entries=4, show_spinner="Loading the base model…")
def base_model(name: str, source: str = "openai", bf16: bool = False):
    """The pretrained GPT-2 `name` (or the tiny random model), in eval mode, shared across sessions;
    with `bf16`, a bf16 copy (faster answers where the hardware does bf16 well)."""
    from sft.weights import load_pretrained

    return _in_bf16(load_pretrained(name, models_dir(), source=source), bf16).eval()


def _in_bf16(model, bf16):
    import torch

    return model.to(torch.bfloat16) if bf16 else model


@st.cache_resource(max_entries=4, show_spinner="Loading the fine-tuned model…")
def finetuned_model(run_path: str, weights_path: str, mtime: float, bf16: bool = False):
    """A run's fine-tuned model: its saved weights, or (a stopped run) the model in its last checkpoint.
    `mtime` keys the cache so a newer file is reloaded; `bf16` as in `base_model`."""
    if weights_path.endswith(".pt"):  # checkpoints/last.pt of a run stopped before the end
        from sft.model import GPTModel, model_config
        from sft.runs import Run, load_checkpoint

        model = GPTModel(model_config(Run(run_path).config.model))
        model.load_state_dict(load_checkpoint(weights_path)["model"])
        return _in_bf16(model, bf16).eval()
    from sft.finetuned import load_finetuned

    return _in_bf16(load_finetuned(weights_path), bf16).eval()


def run_weights(run):
    """(path, mtime) of the weights a run can answer with: final weights, else its checkpoint, else None."""
    for path in (run.model_path, run.checkpoint_path):
        if path.is_file():
            return os.fspath(path), path.stat().st_mtime
    return None


# ---- figures --------------------------------------------------------------------------------------

def length_histogram(lengths: list, max_length=None) -> go.Figure:
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=60, marker_color="#4c78a8", name="entries"))
    if max_length:
        fig.add_vline(x=max_length, line_dash="dash", line_color="#e45756",
                      annotation_text=f"allowed_max_length {max_length}")
    fig.update_layout(xaxis_title="tokens per entry (prompt + response)", yaxis_title="entries",
                      height=320, margin=dict(l=10, r=10, t=30, b=10), bargap=0.05)
    return fig


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows)


ROLE_COLORS = {  # one colour per role in sft.batching.batch_anatomy
    "instruction": "#4c78a8", "input": "#72b7b2", "prompt": "#4c78a8", "response": "#f58518",
    "token": "#9d755d", "end-of-text": "#54a24b", "padding": "#d4d4d4",
}


def _discrete_scale(colors):
    """A Plotly colorscale giving integer k in 0..n-1 the flat colour colors[k]."""
    n, scale = len(colors), []
    for k, c in enumerate(colors):
        scale += [[k / n, c], [(k + 1) / n, c]]
    return scale


def batch_figure(anatomy: dict, row_labels: list) -> go.Figure:
    """Inputs (one row per example, one column per position, coloured by role) above their targets,
    with every target that does not count in the loss (-100) drawn red and labelled."""
    from plotly.subplots import make_subplots

    B, T, cells = anatomy["rows"], anatomy["cols"], anatomy["cells"]
    roles = list(ROLE_COLORS)
    z_in = [[0] * T for _ in range(B)]
    z_tg = [[0] * T for _ in range(B)]
    text_tg = [[""] * T for _ in range(B)]
    hover = [[""] * T for _ in range(B)]
    for c in cells:
        r, j = c["row"], c["col"]
        z_in[r][j] = roles.index(c["role"])
        z_tg[r][j] = 1 if c["in_loss"] else 0
        text_tg[r][j] = "" if c["in_loss"] else str(c["target_id"])
        target = f"{c['target_id']} {c['target_text']!r}" if c["in_loss"] else f"{c['target_id']} (ignored)"
        hover[r][j] = (f"{row_labels[r]}, position {j}<br>token {c['token_id']} {c['token_text']!r}"
                       f"<br>role: {c['role']}<br>target: {target}")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("inputs, coloured by role", "targets (red: -100, not in the loss)"))
    fig.add_trace(go.Heatmap(z=z_in, y=row_labels, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                             colorscale=_discrete_scale(list(ROLE_COLORS.values())), zmin=0, zmax=len(roles),
                             showscale=False, xgap=1, ygap=1), row=1, col=1)
    fig.add_trace(go.Heatmap(z=z_tg, y=row_labels, text=text_tg, texttemplate="%{text}", textfont={"size": 8},
                             customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                             colorscale=_discrete_scale(["#e45756", "#c7e9c0"]), zmin=0, zmax=2,
                             showscale=False, xgap=1, ygap=1), row=2, col=1)
    present = {c["role"] for c in cells}
    for role in roles:  # legend entries only (heatmaps have none)
        if role in present:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=role,
                                     marker=dict(symbol="square", size=12, color=ROLE_COLORS[role])))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="target -100",
                             marker=dict(symbol="square", size=12, color="#e45756")))
    fig.update_yaxes(type="category", autorange="reversed")  # labels like "#8" must not read as numbers
    fig.update_xaxes(title_text="position", row=2, col=1)
    fig.update_layout(height=200 + 2 * 24 * B, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.12 * 8 / max(B, 4)),
                      plot_bgcolor="white")
    return fig


# ---- runs ---------------------------------------------------------------------------------------

def list_runs() -> list:
    from sft.runs import list_runs as runs

    return runs(runs_dir())


def open_run(name: str):
    from sft.runs import Run

    return Run.open(name, root=runs_dir())


def dataset_file():
    """None for the bundled data (the engine's default); else the chosen dataset saved as JSON under
    runs_dir()/.data/, so the training worker (another process) reads exactly what the page shows."""
    if st.session_state.get("dataset") is None:
        return None
    from sft.runs import atomic_write_json

    data = st.session_state["dataset"]
    digest = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    path = runs_dir() / ".data" / f"{digest}.json"
    if not path.is_file():
        atomic_write_json(path, data)
    return os.fspath(path)


def download_weights(name: str, source: str, bar):
    """Fetch `name`'s GPT-2 files into models_dir(), drawing progress on `bar` (an st.progress).
    Returns None, or the exception (offline, no TensorFlow, a failed size check) for the page to show."""
    from sft import weights

    def progress(done, total, filename):
        mib = f"{done / 2**20:.0f} of {total / 2**20:.0f} MiB" if total else f"{done / 2**20:.0f} MiB"
        bar.progress(min(done / total, 1.0) if total else 0.0, text=f"{filename}: {mib}")

    try:
        weights.download_weights(name, os.fspath(models_dir()), source=source, progress=progress, show_bar=False)
    except Exception as exc:  # shown to the person with the tiny model as the alternative
        return exc
    return None


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


X_AXES = {"steps": "step", "epochs": "epochs_seen", "tokens seen": "tokens_seen"}


def loss_figure(evals: list, steps: list, x: str = "steps") -> go.Figure:
    """Training and validation loss (the chapter's evaluations) against steps, epochs or tokens seen,
    with each step's own training loss faint behind them."""
    key = X_AXES[x]
    fig = go.Figure()
    if steps:
        fig.add_trace(go.Scatter(x=[e[key] for e in steps], y=[e.get("loss") for e in steps], mode="lines",
                                 name="loss of each step", line=dict(color="#bbbbbb", width=1)))
    fig.add_trace(go.Scatter(x=[e[key] for e in evals], y=[e.get("train_loss") for e in evals],
                             mode="lines+markers", name="Training loss", line=dict(color="#4c78a8")))
    fig.add_trace(go.Scatter(x=[e[key] for e in evals], y=[e.get("val_loss") for e in evals],
                             mode="lines+markers", name="Validation loss",
                             line=dict(color="#f58518", dash="dashdot")))
    fig.update_layout(xaxis_title=x, yaxis_title="loss", height=360, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", y=1.12))
    return fig
