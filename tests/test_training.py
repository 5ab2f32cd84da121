"""The chapter's training functions (chapter 5): loss of a batch and a loader, evaluation, samples,
train_model_simple's printed lines and the loss plot."""
import math
import re

import pytest
import torch
from helpers import MINI, mini_loaders
from torch.utils.data import DataLoader, TensorDataset

from sft.batching import create_data_loaders
from sft.model import GPTModel
from sft.training import (
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    generate_and_print_sample,
    plot_losses,
    train_model_simple,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def real_loaders(instruction_data, tokenizer):
    """The chapter's loaders over 8 train and 4 validation entries, short sequences."""
    torch.manual_seed(123)
    train, val, _ = create_data_loaders(instruction_data[:8], instruction_data[8:12], instruction_data[12:14],
                                        tokenizer, batch_size=2, allowed_max_length=40)
    return train, val


# ============================================================================ chapter functions

def test_calc_loss_batch_ignores_minus_100():
    torch.manual_seed(0)
    model = GPTModel({**MINI, "drop_rate": 0.0})
    x = torch.randint(0, 97, (2, 5))
    y = torch.randint(0, 97, (2, 5))
    y[1, 3:] = -100
    loss = calc_loss_batch(x, y, model, "cpu")
    logits = model(x)
    keep = y != -100
    manual = -torch.log_softmax(logits[keep], dim=-1).gather(1, y[keep][:, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_calc_loss_loader_nan_when_empty_and_caps_num_batches():
    torch.manual_seed(0)
    model = GPTModel({**MINI, "drop_rate": 0.0})
    empty = DataLoader(TensorDataset(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)),
                       batch_size=2)
    assert math.isnan(calc_loss_loader(empty, model, "cpu"))
    _, val = mini_loaders()  # 2 batches
    per_batch = [calc_loss_batch(x, y, model, "cpu").item() for x, y in val]
    assert calc_loss_loader(val, model, "cpu") == pytest.approx(sum(per_batch) / 2)
    assert calc_loss_loader(val, model, "cpu", num_batches=1) == pytest.approx(per_batch[0])
    assert calc_loss_loader(val, model, "cpu", num_batches=10) == pytest.approx(sum(per_batch) / 2)


def test_evaluate_model_returns_to_train_mode():
    torch.manual_seed(0)
    model = GPTModel(MINI)
    train, val = mini_loaders()
    train_loss, val_loss = evaluate_model(model, train, val, "cpu", eval_iter=1)
    assert model.training
    assert 3.0 < train_loss < 6.0 and 3.0 < val_loss < 6.0  # ln(97) = 4.57 for a random model


def test_generate_and_print_sample_prints_one_line(capsys, tiny_cfg, tokenizer):
    torch.manual_seed(123)
    model = GPTModel(tiny_cfg)
    generate_and_print_sample(model, tokenizer, "cpu", "Every effort moves you")
    out = capsys.readouterr().out
    assert out.startswith("Every effort moves you") and out.count("\n") == 1
    assert model.training
    # 4 prompt tokens + the chapter's 50 new ones
    assert len(tokenizer.encode(out.rstrip("\n"))) >= 50


@pytest.mark.slow
def test_train_model_simple_prints_chapter_lines(capsys, tiny_cfg, tokenizer, real_loaders, instruction_data):
    train, val = real_loaders  # 4 batches per epoch
    torch.manual_seed(123)
    model = GPTModel(tiny_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.00005, weight_decay=0.1)
    from sft.prompts import format_input

    torch.manual_seed(123)
    train_losses, val_losses, tokens = train_model_simple(
        model, train, val, optimizer, "cpu", num_epochs=2, eval_freq=3, eval_iter=1,
        start_context=format_input(instruction_data[8]), tokenizer=tokenizer)
    lines = capsys.readouterr().out.splitlines()
    evals = [line for line in lines if line.startswith("Ep ")]
    # 8 steps, evaluated at global steps 0, 3, 6
    assert [line[:18] for line in evals] == ["Ep 1 (Step 000000)", "Ep 1 (Step 000003)", "Ep 2 (Step 000006)"]
    assert all(re.fullmatch(r"Ep \d \(Step \d{6}\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", e) for e in evals)
    assert len(train_losses) == len(val_losses) == len(tokens) == 3
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert sum(line.startswith("Below is an instruction") for line in lines) == 2  # one sample per epoch


def test_plot_losses_draws_chapter_figure(tmp_path):
    fig = plot_losses(torch.linspace(0, 2, 3), [100, 200, 300], [3.0, 2.0, 1.0], [3.5, 2.5, 2.0],
                      path=tmp_path / "loss.html")
    names = [t.name for t in fig.data]
    assert names[:2] == ["Training loss", "Validation loss"]
    assert list(fig.data[0].x) == [0.0, 1.0, 2.0] and list(fig.data[2].x) == [100, 200, 300]
    assert fig.layout.xaxis.title.text == "Epochs" and fig.layout.xaxis2.title.text == "Tokens seen"
    assert fig.layout.yaxis.title.text == "Loss"
    assert (tmp_path / "loss.html").stat().st_size > 1000
