"""App state: the folders the app uses, and session-state keys that survive navigation.

Folders come from the environment so tests (and people) can point the app elsewhere:
SFT_RUNS_DIR (default ./runs), SFT_MODELS_DIR (default ./models) and SFT_OLLAMA_URL
(default http://localhost:11434).
"""
import os
from pathlib import Path

import streamlit as st

from sft.model import MODEL_NAMES, TINY_NAME
from sft.studio.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
GPT2_NAMES = [n for n in MODEL_NAMES if n != TINY_NAME]
TINY = TINY_NAME  # random weights, for offline demos and tests
UPLOAD_LIMIT_MB = 50  # the pages refuse larger files with a message; the server lets them through (maxUploadSize 500)
OLLAMA_URL = "http://localhost:11434"  # Ollama's default; SFT_OLLAMA_URL overrides it (read per call)


def runs_dir() -> Path:
    return Path(os.environ.get("SFT_RUNS_DIR") or ROOT / "runs")


def models_dir() -> Path:
    return Path(os.environ.get("SFT_MODELS_DIR") or ROOT / "models")


def weights_base_url():
    """A mirror to download GPT-2 from instead of OpenAI's or Hugging Face's (SFT_WEIGHTS_BASE_URL), or None."""
    return os.environ.get("SFT_WEIGHTS_BASE_URL") or None


def ollama_url() -> str:
    return os.environ.get("SFT_OLLAMA_URL") or OLLAMA_URL


_DEFAULTS = TrainConfig()
# Plain session_state keys: widget values vanish when their page is not shown, these survive.
STATE_DEFAULTS = {
    "dataset": None,  # list[dict] chosen on the Data page; None means the bundled chapter dataset
    "dataset_name": "chapter dataset (bundled, 1100 entries)",
    "dataset_key": "bundled",  # cache key for whatever depends on the dataset
    "prompt_style": _DEFAULTS.prompt_style,
    "allowed_max_length": _DEFAULTS.allowed_max_length,  # chosen on the Batches page, used by Fine-tune
    "mask_instruction": _DEFAULTS.mask_instruction,  # exercise 7.2, likewise
    "model_name": _DEFAULTS.model,  # the chapter's choice
    "run_name": None,  # the run the Fine-tune and Compare pages show
    "presenting": False,  # the sidebar's "Presenting (projector)": larger batch grids and token views
}


def init_state():
    """Every page starts here: the app's own navigation, then the plain keys with their defaults."""
    from .nav import leave_legacy_navigation
    from .workspace import restore

    leave_legacy_navigation()
    restore()  # the choices kept in the workspace file, once per browser session
    for key, value in STATE_DEFAULTS.items():
        st.session_state.setdefault(key, value)


def presenting() -> bool:
    """Whether the sidebar's "Presenting (projector)" toggle is on (``ui.widgets.presenting_toggle``)."""
    return bool(st.session_state.get("presenting"))


def remember(**values):
    """Set plain keys and keep them in the workspace file (``ui.workspace.remember``)."""
    from .workspace import remember as keep

    keep(**values)


def start_widget(key: str, value, options=None):
    """Give widget `key` its value from a plain key before it is drawn (so no `index=`/default argument,
    and a value set in a callback really shows). Done only when the widget is not on screen already,
    or holds a value no longer among `options`."""
    ss = st.session_state
    if key not in ss or (options is not None and ss[key] not in options):
        ss[key] = value


