"""The fast LoRA Linear (sft.fast.lora) equals the book's LinearWithLoRA: values, gradients, a whole
LoRA model's forward and loss, and its cached cast of the frozen weight follows the weight."""
import pytest
import torch

from sft.fast.forward import forward
from sft.fast.lora import linear
from sft.lora import LinearWithLoRA, freeze_for_lora, replace_linear_with_lora
from sft.model import GPTModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = {"vocab_size": 300, "context_length": 40, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def wrapped(seed=0, rank=4, alpha=8.0, bias=True):
    torch.manual_seed(seed)
    layer = LinearWithLoRA(torch.nn.Linear(24, 40, bias=bias), rank, alpha)
    layer.linear.requires_grad_(False)
    with torch.no_grad():
        layer.lora.B.normal_()  # B starts at zero, which would hide a wrong update
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_books_layer_with_gradients_in_fp32(bias):
    layer = wrapped(bias=bias)
    x = torch.randn(3, 5, 24, requires_grad=True)
    book = layer(x)
    (book * torch.arange(40.0)).sum().backward()
    want = (x.grad.clone(), layer.lora.A.grad.clone(), layer.lora.B.grad.clone())
    x.grad = layer.lora.A.grad = layer.lora.B.grad = None
    fast = linear(layer, x)
    (fast * torch.arange(40.0)).sum().backward()
    torch.testing.assert_close(fast, book, atol=1e-5, rtol=1e-5)
    for got, expected in zip((x.grad, layer.lora.A.grad, layer.lora.B.grad), want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert layer.linear.weight.grad is None  # the frozen weight gets no gradient


def test_under_bf16_autocast_it_keeps_one_cast_of_the_frozen_weight_until_the_weight_changes():
    layer = wrapped(1)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        book, fast = layer(x), linear(layer, x)
        cast = layer._frozen_cast[1]
        assert cast.dtype == torch.bfloat16 and linear(layer, x) is not None
        assert layer._frozen_cast[1] is cast  # the second call reuses it
    torch.testing.assert_close(fast.float(), book.float(), atol=0.05, rtol=0.02)
    assert "_frozen_cast" not in str(list(layer.state_dict()))
    with torch.no_grad():
        layer.linear.weight.mul_(2.0)  # an in-place edit (a load does copy_): the cast is remade
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = linear(layer, x)
        assert layer._frozen_cast[1] is not cast
        torch.testing.assert_close(again.float(), layer(x).float(), atol=0.1, rtol=0.02)


def test_a_layer_training_its_weight_or_with_adapter_dropout_takes_the_books_forward():
    layer = wrapped(2)
    layer.linear.requires_grad_(True)  # not frozen: autocast's own cache serves it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(layer, torch.randn(2, 24))
    assert getattr(layer, "_frozen_cast", None) is None
    plain = torch.nn.Linear(24, 8)
    x = torch.randn(2, 24)
    assert torch.equal(linear(plain, x), plain(x))


def test_a_lora_gpt_model_gives_the_books_logits_and_gradients_through_the_fast_path():
    torch.manual_seed(3)
    model = GPTModel(SMALL)
    freeze_for_lora(model)
    replace_linear_with_lora(model, rank=4, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
    ids = torch.randint(0, 300, (2, 9))
    book = model(ids)
    book.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    fast = forward(model, ids)
    fast.square().mean().backward()
    torch.testing.assert_close(fast, book, atol=1e-4, rtol=1e-4)
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-3)
