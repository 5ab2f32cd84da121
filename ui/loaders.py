"""Cached loaders shared by the pages: the tokenizer, datasets, batches, models, machine status, runs.

Pages stay thin by calling these and ``sft``. Nothing here pads, masks or computes a loss: that
is the engine's job. Models that train are never cached; finished runs' weights are, keyed by
the file's modification time.
"""
import os

import streamlit as st

from .state import GPT2_NAMES, init_state, models_dir, runs_dir


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

    from sft.studio.hardware import device_summary

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
def judge_status(backend: str, url: str) -> dict:
    """{"ok", "models", "error"} from the judge client's health check (short time-out)."""
    from sft.judge import make_client

    status = make_client(backend, "-", url).status(timeout=1.5)
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
    """A run's fine-tuned model (``Run.load_model``: its final weights, or a stopped run's last
    checkpoint). `weights_path` and `mtime` key the cache so a newer file is reloaded."""
    from sft.studio.runs import Run

    return _in_bf16(Run(run_path).load_model(), bf16).eval()


def run_weights(run):
    """(path, mtime) of the weights a run can answer with (``Run.weights_file``), or None."""
    found = run.weights_file()
    return (os.fspath(found[0]), found[1]) if found else None


# ---- runs ---------------------------------------------------------------------------------------

def list_runs() -> list:
    from sft.studio.runs import list_runs as runs

    return runs(runs_dir())


def open_run(name: str):
    from sft.studio.runs import Run

    return Run.open(name, root=runs_dir())


def dataset_file():
    """None for the bundled data (the engine's default); else the chosen dataset's file in the workspace
    (workspace/data/<hash>.json), so the training worker (another process) reads exactly what the page shows."""
    if st.session_state.get("dataset") is None:
        return None
    from .workspace import save_dataset

    return os.fspath(save_dataset(st.session_state["dataset"]))


def dataset_origin():
    """(source, duplicates rule) of the chosen dataset as the engine's loader takes them: (None, None) for the
    bundled data; else its URL or uploaded file name and the rule it was loaded with."""
    ss = st.session_state
    if ss.get("dataset") is None:
        return None, None
    return ss.dataset_name, ss.dataset_key.split(":")[1]  # keys are "<kind>:<rule>:<url or digest>"
