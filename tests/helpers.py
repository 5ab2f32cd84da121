"""Small helpers shared by test files (tests/conftest.py puts this folder on sys.path)."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

TEST_DATA = Path(__file__).resolve().parent / "data"  # small files the tests read

# A model small enough that a step takes milliseconds; dropout on, so resuming must restore the RNG.
MINI = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.1, "qkv_bias": False}


def mini_loaders(n=22, batch_size=4):
    """Random sequences as (inputs, targets); every other row ends in three -100 targets."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, MINI["vocab_size"], (n, 13), generator=g)
    x, y = data[:, :-1], data[:, 1:].clone()
    y[::2, -3:] = -100
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=batch_size)
    return train, val


