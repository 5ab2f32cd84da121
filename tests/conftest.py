"""Shared fixtures: the bundled tokenizer, the chapter's dataset and the book's tiny test model config."""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "sft" / "assets"
TEST_DATA = Path(__file__).resolve().parent / "data"
if str(Path(__file__).resolve().parent) not in sys.path:  # `from helpers import ...` from any test folder
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests use tiny models, where one thread beats two (no sync overhead, no oversubscription).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Device locks belong to the machine (~/.cache/sft-studio/locks). Tests, and the workers and app
# servers they start, use a folder of their own, set before any test module copies os.environ,
# so they never meet a real training's lock (or another test session's).
os.environ["SFT_LOCK_DIR"] = tempfile.mkdtemp(prefix="sft-test-locks-")

# The book's --test_mode model: one layer, 12-dimensional embeddings, runs in milliseconds.
TINY_CFG = {
    "vocab_size": 50257,
    "context_length": 120,
    "emb_dim": 12,
    "n_heads": 2,
    "n_layers": 1,
    "drop_rate": 0.0,
    "qkv_bias": False,
}


@pytest.fixture(scope="session")
def tokenizer():
    from sft.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def instruction_data():
    with open(ASSETS / "instruction-data.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def tiny_cfg():
    return dict(TINY_CFG)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster than two, and the machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    from fake_servers import FileServer

    servers = []

    def start(files):
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
