"""The user's choices, kept in a small workspace file so a reload, a restart or a new tab finds them.

``workspace/workspace.json`` (beside ``runs/``; SFT_WORKSPACE_DIR overrides it) holds what a person
chose across pages: the dataset (an uploaded or downloaded one is saved as a file in
``workspace/data/``, named by its content's hash), its name, the prompt style, the batch settings,
the model, the runs picked, the judge's server and model. ``restore()`` puts them into the
session's plain keys once per browser session (``ui.state.init_state`` calls it); ``remember()``
sets plain keys and writes the file when a value changed. One workspace per app folder: the app
is a single person's studio, as LlamaBoard and Transformer Lab are.
"""
import hashlib
import json
import os
from pathlib import Path

import streamlit as st

from sft.studio.files import atomic_write_json, read_json

LOADED = "_workspace_restored"  # session key: this browser session has read the file
# Plain session keys kept in the file (the dataset itself goes in data/, by hash).
KEPT = ("dataset_name", "dataset_key", "data_source_kind", "prompt_style", "allowed_max_length",
        "mask_instruction", "batch_size", "batch_seed", "batch_split", "model_name", "run_name",
        "judge_backend", "judge_url", "judge_model", "judge_run", "exp_selected", "presenting")


def workspace_dir() -> Path:
    from .state import runs_dir

    return Path(os.environ.get("SFT_WORKSPACE_DIR") or runs_dir().parent / "workspace")


def workspace_file() -> Path:
    return workspace_dir() / "workspace.json"


def read() -> dict:
    """The saved choices ({} when there is no file, or it is unreadable)."""
    try:
        saved = read_json(workspace_file(), {})
    except (OSError, ValueError):  # torn by hand or unreadable: start from the defaults
        return {}
    return saved if isinstance(saved, dict) else {}


def save_dataset(data: list) -> Path:
    """Keep a chosen dataset as workspace/data/<hash>.json (once per content); returns the path."""
    digest = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    path = workspace_dir() / "data" / f"{digest}.json"
    if not path.is_file():
        atomic_write_json(path, data)
    return path


def restore():
    """Once per browser session: the saved choices into session state (before the defaults)."""
    ss = st.session_state
    if ss.get(LOADED):
        return
    ss[LOADED] = True
    saved = read()
    for key in KEPT:
        if key in saved and saved[key] is not None:
            ss.setdefault(key, saved[key])
    path = saved.get("dataset_file")
    if path and "dataset" not in ss:
        try:
            data = read_json(path)
        except (OSError, ValueError):
            data = None
        if isinstance(data, list) and data:
            ss["dataset"], ss["dataset_file"] = data, path
        else:  # the file went away: back to the bundled data, and say so on the Data page
            for key in ("dataset_name", "dataset_key", "data_source_kind"):
                ss.pop(key, None)
            ss["workspace_note"] = f"The dataset kept in the workspace ({path}) is gone; the bundled one is used."


def remember(**values):
    """Set plain session keys and keep them in the workspace file (written only on a change).

    ``dataset=`` a list (or None for the bundled data) is saved under workspace/data/ first."""
    ss = st.session_state
    if "dataset" in values:
        data = values.pop("dataset")
        ss["dataset"] = data
        values["dataset_file"] = None if data is None else os.fspath(save_dataset(data))
    for key, value in values.items():
        ss[key] = value
    saved = read()
    wanted = {**saved, **values}
    if wanted != saved:
        try:
            atomic_write_json(workspace_file(), wanted)
        except OSError:  # a read-only or full disk: the choices still hold for this session
            pass
