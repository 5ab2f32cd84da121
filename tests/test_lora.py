"""LoRA (appendix E, exercise 7.4): the exercise's counts, the book's layer, training only the
adapters, merging, adapter-only state dicts, and the extras a trainer needs."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest

from sft.lora import (
    LORA_TARGETS,
    LinearWithLoRA,
    LoRALayer,
    adapters_disabled,
    freeze_for_lora,
    load_lora_state_dict,
    lora_config,
    lora_parameter_count,
    lora_state_dict,
    merge_lora,
    replace_linear_with_lora,
    trainable_parameters,
)
from sft.model import GPTModel, model_config
from sft.training import calc_loss_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(model):
    """The exercise's count: sum(p.numel() for p in model.parameters() if p.requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def meta_gpt2(name):
    """GPT-2 of the real shape on the meta device: exact parameter counts, no memory, no init time."""
    with torch.device("meta"):
        return GPTModel(model_config(name))


def lora_formula(cfg, rank, targets):
    """rank * (in + out) per adapted linear, from the config alone."""
    c, v = cfg["emb_dim"], cfg["vocab_size"]
    dims = {"query": (c, c), "key": (c, c), "value": (c, c), "attn_out": (c, c),
            "ff_in": (c, 4 * c), "ff_out": (4 * c, c), "head": (c, v)}
    per_block = sum(rank * sum(dims[t]) for t in targets if t != "head")
    return cfg["n_layers"] * per_block + (rank * sum(dims["head"]) if "head" in targets else 0)


@pytest.fixture
def cfg(tiny_cfg):
    return {**tiny_cfg, "n_layers": 2, "qkv_bias": True}  # biases too, so merging must keep them


def tokens(cfg, shape=(2, 10), seed=1):
    return torch.randint(0, cfg["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=0, scale=0.2):
    """As if trained: B is zero after wrapping, which would make most checks trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer):
                m.A.copy_(torch.randn(m.A.shape, generator=g) * scale)
                m.B.copy_(torch.randn(m.B.shape, generator=g) * scale)
    return model


# ------------------------------------------------------------------------ the exercise's counts

def test_exercise_counts_on_gpt2_medium():
    model = meta_gpt2("gpt2-medium (355M)")
    assert trainable(model) == 406_286_336  # "Total trainable parameters before"
    for param in model.parameters():  # the exercise's freezing
        param.requires_grad = False
    assert trainable(model) == 0  # "Total trainable parameters after"
    replace_linear_with_lora(model, rank=16, alpha=16)
    assert trainable(model) == 7_898_384  # "Total trainable LoRA parameters"
    assert lora_parameter_count(model) == 7_898_384
    assert lora_formula(model_config("gpt2-medium"), 16, LORA_TARGETS) == 7_898_384
    assert trainable_parameters(model) == (7_898_384, 414_184_720, 7_898_384 / 414_184_720)

    # The book's modules and attribute names; every nn.Linear wrapped, output head included.
    q = model.trf_blocks[0].att.W_query
    assert isinstance(q, LinearWithLoRA) and type(q.linear) is nn.Linear and isinstance(q.lora, LoRALayer)
    assert q.lora.A.shape == (1024, 16) and q.lora.B.shape == (16, 1024)
    assert isinstance(model.out_head, LinearWithLoRA) and model.out_head.lora.B.shape == (16, 50257)
    assert isinstance(model.trf_blocks[23].ff.layers[2], LinearWithLoRA)
    assert not any(type(m) is nn.Linear and not isinstance(p, LinearWithLoRA)
                   for p in model.modules() for m in p.children())


@pytest.mark.parametrize("rank, expected", [(8, 1_333_264), (16, 2_666_528)])
def test_appendix_e_counts_on_gpt2_small_with_a_two_class_head(rank, expected):
    """Appendix E's spam classifier: gpt2-small with chapter 6's new 2-class output head."""
    model = meta_gpt2("gpt2-small (124M)")
    with torch.device("meta"):
        model.out_head = nn.Linear(in_features=768, out_features=2)
    assert trainable(model) == 124_441_346
    freeze_for_lora(model)
    assert trainable(model) == 0
    replace_linear_with_lora(model, rank=rank, alpha=rank)
    assert trainable(model) == expected


def test_freeze_for_lora_before_or_after_wrapping():
    before = freeze_for_lora(meta_gpt2("gpt2-medium"))  # the book's order: freeze, then wrap
    assert trainable(before) == 0
    replace_linear_with_lora(before, 16, 16)
    after = freeze_for_lora(replace_linear_with_lora(meta_gpt2("gpt2-medium"), 16, 16))
    for model in (before, after):
        assert trainable(model) == 7_898_384
        assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"A", "B"}


@pytest.mark.parametrize("rank, targets", [(8, ("query", "value")), (4, ("head",)), (2, ("ff_in", "attn_out"))])
def test_target_subset_counts_match_the_formula(rank, targets):
    model = freeze_for_lora(meta_gpt2("gpt2-small"))
    replace_linear_with_lora(model, rank, 2 * rank, targets=targets)
    assert trainable(model) == lora_formula(model_config("gpt2-small"), rank, targets)
    assert lora_config(model) == {"rank": rank, "alpha": 2 * rank, "dropout": 0.0,
                                  "targets": [t for t in LORA_TARGETS if t in targets]}
    att = model.trf_blocks[5].att
    assert isinstance(att.W_query, LinearWithLoRA) == ("query" in targets)
    assert isinstance(att.W_key, LinearWithLoRA) == ("key" in targets)
    assert isinstance(model.out_head, LinearWithLoRA) == ("head" in targets)


def test_query_value_rank_8_on_gpt2_medium_is_786432():
    model = freeze_for_lora(meta_gpt2("gpt2-medium"))
    replace_linear_with_lora(model, rank=8, alpha=16, targets=("query", "value"))
    assert trainable(model) == 24 * 2 * 8 * (1024 + 1024) == 786_432


def test_all_targets_equal_the_books_default():
    every = replace_linear_with_lora(meta_gpt2("gpt2-small"), 4, 4, targets=LORA_TARGETS)
    default = replace_linear_with_lora(meta_gpt2("gpt2-small"), 4, 4)
    assert list(lora_state_dict(every)) == list(lora_state_dict(default))
    assert lora_config(default)["targets"] == list(LORA_TARGETS)


def test_unknown_target_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown LoRA target 'mlp'; choose from query, key, value, "
                                         r"attn_out, ff_in, ff_out, head"):
        replace_linear_with_lora(meta_gpt2("gpt2-small"), 8, 8, targets=("query", "mlp"))
    with pytest.raises(ValueError, match="no LoRA targets"):
        replace_linear_with_lora(meta_gpt2("gpt2-small"), 8, 8, targets=())
    with pytest.raises(ValueError, match="rank"):
        replace_linear_with_lora(meta_gpt2("gpt2-small"), 0, 8)


def test_wrapping_twice_does_not_nest():
    model = replace_linear_with_lora(meta_gpt2("gpt2-small"), 4, 4, targets=("query",))
    replace_linear_with_lora(model, 4, 4)
    assert type(model.trf_blocks[0].att.W_query.linear) is nn.Linear
    assert lora_parameter_count(model) == lora_formula(model_config("gpt2-small"), 4, LORA_TARGETS)


# ------------------------------------------------------------------------ the layer itself

def test_lora_layer_init_and_the_contracts_formula():
    torch.manual_seed(0)
    layer = LoRALayer(in_dim=64, out_dim=48, rank=16, alpha=8)
    assert layer.A.shape == (64, 16) and layer.B.shape == (16, 48)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / 16 ** 0.5  # Kaiming-uniform, a=sqrt(5), fan_in = A.shape[1] = rank
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), torch.zeros(3, 5, 48))


class BookStyleLoRALinear(nn.Module):
    """An independent reference: the appendix's layer with this project's alpha / rank scaling."""

    def __init__(self, linear, A, B, alpha):
        super().__init__()
        self.linear, self.A, self.B, self.alpha = linear, A, B, alpha

    def forward(self, x):
        rank = self.A.shape[1]
        return self.linear(x) + (self.alpha / rank) * (x @ self.A @ self.B)


def test_linear_with_lora_equals_the_book_style_reference():
    torch.manual_seed(0)
    linear = nn.Linear(20, 30)
    wrapped = randomize_adapters(LinearWithLoRA(linear, rank=4, alpha=12))
    reference = BookStyleLoRALinear(linear, wrapped.lora.A.detach().clone(), wrapped.lora.B.detach().clone(), 12)
    x = torch.randn(2, 7, 20)
    assert torch.equal(wrapped(x), reference(x))
    # The same as the folded weight W + (alpha / rank) (A B)^T, alpha / rank = 12 / 4 = 3.
    folded = linear.weight + 3.0 * (wrapped.lora.A @ wrapped.lora.B).T
    torch.testing.assert_close(wrapped(x), F.linear(x, folded, linear.bias), rtol=0, atol=1e-5)
    assert wrapped.in_features == 20 and wrapped.out_features == 30 and wrapped.bias is linear.bias


def test_logits_unchanged_right_after_wrapping(cfg):
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    ids = tokens(cfg)
    with torch.no_grad():
        before = model(ids)
        replace_linear_with_lora(model, rank=4, alpha=8)
        assert torch.equal(model(ids), before)  # B = 0: the adapters add exact zeros


# ------------------------------------------------------------------------ training

def test_only_adapters_change_and_the_loss_falls(cfg):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    freeze_for_lora(model)  # the book's order: freeze, then wrap
    replace_linear_with_lora(model, rank=4, alpha=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # As in the exercise, the optimizer sees all parameters; the frozen ones never get a grad.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs, targets = tokens(cfg, (2, 12), seed=1), tokens(cfg, (2, 12), seed=2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = calc_loss_batch(inputs, targets, model, "cpu")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    after = model.state_dict()
    adapters = [k for k in after if ".lora." in k]
    assert len(adapters) == 2 * (6 * cfg["n_layers"] + 1)
    for key, value in after.items():
        if key in adapters:
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key  # every base weight bit for bit


def test_bf16_autocast_forward_backward(cfg):
    torch.manual_seed(0)
    model = freeze_for_lora(replace_linear_with_lora(GPTModel(cfg), rank=4, alpha=8)).train()
    inputs, targets = tokens(cfg, seed=1), tokens(cfg, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    assert logits.dtype == torch.bfloat16
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert model.out_head.lora.B.grad.abs().sum() > 0  # B gets a gradient from the start (A not: B = 0)


def adapter_grads(model, inputs, targets, seed):
    model.zero_grad()
    torch.manual_seed(seed)  # the adapters' dropout masks
    calc_loss_batch(inputs, targets, model, "cpu").backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_gives_the_same_grads(cfg):
    torch.manual_seed(0)
    model = freeze_for_lora(replace_linear_with_lora(GPTModel(cfg), rank=4, alpha=8, dropout=0.1))
    randomize_adapters(model).train()
    inputs, targets = tokens(cfg, seed=1), tokens(cfg, seed=2)
    plain = adapter_grads(model, inputs, targets, seed=5)
    model.gradient_checkpointing = True
    recomputed = adapter_grads(model, inputs, targets, seed=5)
    assert plain.keys() == recomputed.keys() and len(plain) == 2 * (6 * cfg["n_layers"] + 1)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6)
    other_masks = adapter_grads(model, inputs, targets, seed=6)  # dropout is really on
    assert not torch.allclose(other_masks["trf_blocks.0.att.W_query.lora.A"], plain["trf_blocks.0.att.W_query.lora.A"])


def test_ddp_trains_the_adapters_like_one_process(cfg, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    base = GPTModel(cfg).state_dict()
    models = []
    for _ in range(2):
        model = GPTModel(cfg)
        model.load_state_dict(base)
        torch.manual_seed(1)
        replace_linear_with_lora(model, rank=4, alpha=8, targets=("query", "value", "head"))
        models.append(freeze_for_lora(model))
    inputs, targets = tokens(cfg, seed=1), tokens(cfg, seed=2)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(models[1])  # find_unused_parameters=False: every A, B is used
        for forward, model in ((models[0], models[0]), (ddp, models[1])):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for _ in range(3):  # a parameter without a grad would fail the second step's forward
                optimizer.zero_grad()
                calc_loss_batch(inputs, targets, forward, "cpu").backward()
                optimizer.step()
        assert list(lora_state_dict(ddp)) == list(lora_state_dict(models[0]))  # no "module." prefix
        for key, value in lora_state_dict(models[0]).items():
            torch.testing.assert_close(lora_state_dict(ddp)[key], value, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ adapters off

def test_adapters_disabled_gives_the_base_logits_and_grads_flow_outside(cfg):
    torch.manual_seed(0)
    base = GPTModel(cfg).eval()
    model = GPTModel(cfg).eval()
    model.load_state_dict(base.state_dict())
    randomize_adapters(freeze_for_lora(replace_linear_with_lora(model, rank=4, alpha=8)))
    ids = tokens(cfg)
    with torch.no_grad():
        expected = base(ids)
        with adapters_disabled(model):
            assert torch.equal(model(ids), expected)
        assert not torch.allclose(model(ids), expected, atol=1e-3)  # the adapters are back
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    for m in model.modules():
        if isinstance(m, LoRALayer):
            assert m.A.grad.abs().sum() > 0 and m.B.grad.abs().sum() > 0


def test_adapters_disabled_under_autograd_with_checkpointing(cfg):
    """Grads of a forward run inside the context, backward run outside, are the base model's.

    Activation checkpointing re-runs the blocks in backward; were it left on, that re-run would
    see the adapters switched back on.
    """
    torch.manual_seed(0)
    base = GPTModel(cfg).train()
    model = GPTModel(cfg).train()
    model.load_state_dict(base.state_dict())
    randomize_adapters(replace_linear_with_lora(model, rank=4, alpha=8))  # base left trainable here
    model.gradient_checkpointing = True
    inputs, targets = tokens(cfg, seed=1), tokens(cfg, seed=2)
    calc_loss_batch(inputs, targets, base, "cpu").backward()
    with adapters_disabled(model):
        loss = calc_loss_batch(inputs, targets, model, "cpu")
    assert model.gradient_checkpointing is True
    assert all(m.enabled for m in model.modules() if isinstance(m, LinearWithLoRA))
    loss.backward()
    grads = {n.replace(".linear.", "."): p.grad for n, p in model.named_parameters() if ".lora." not in n}
    for name, p in base.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6)
    assert all(m.A.grad is None and m.B.grad is None for m in model.modules() if isinstance(m, LoRALayer))


def test_adapters_disabled_restores_on_error(cfg):
    model = replace_linear_with_lora(GPTModel(cfg), rank=2, alpha=2)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(model):
            assert not model.out_head.enabled
            raise RuntimeError("boom")
    assert model.out_head.enabled and model.trf_blocks[0].ff.layers[0].enabled


# ------------------------------------------------------------------------ merging and saving

@pytest.mark.parametrize("targets", [None, ("query", "value")])
def test_merge_gives_a_plain_gpt_model_with_the_same_logits(cfg, targets):
    torch.manual_seed(0)
    model = randomize_adapters(replace_linear_with_lora(GPTModel(cfg), rank=4, alpha=8, targets=targets)).eval()
    ids = tokens(cfg)
    with torch.no_grad():
        wrapped = model(ids)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(ids), wrapped, rtol=0, atol=1e-5)
    assert not any(isinstance(m, (LinearWithLoRA, LoRALayer)) for m in merged.modules())
    assert type(merged.trf_blocks[0].att.W_query) is nn.Linear
    assert list(merged.state_dict()) == list(GPTModel(cfg).state_dict())  # the book's keys, in order
    plain = GPTModel(cfg).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), wrapped, rtol=0, atol=1e-5)


def test_adapter_state_dict_round_trip(cfg, tmp_path):
    torch.manual_seed(0)
    base = GPTModel(cfg).state_dict()
    model = GPTModel(cfg)
    model.load_state_dict(base)
    randomize_adapters(replace_linear_with_lora(model, rank=4, alpha=8)).eval()
    state = lora_state_dict(model)
    assert len(state) == 2 * (6 * cfg["n_layers"] + 1)
    assert state["trf_blocks.0.att.W_query.lora.A"].shape == (12, 4)
    assert state["out_head.lora.B"].shape == (4, cfg["vocab_size"])
    assert all(k.endswith((".lora.A", ".lora.B")) for k in state)
    torch.save({"lora": state, "lora_config": lora_config(model)}, tmp_path / "adapter.pth")

    saved = torch.load(tmp_path / "adapter.pth", weights_only=True)
    fresh = GPTModel(cfg).eval()
    fresh.load_state_dict(base)
    torch.manual_seed(123)  # other adapters than model's, until loaded
    replace_linear_with_lora(fresh, **saved["lora_config"])
    ids = tokens(cfg)
    with torch.no_grad():
        assert not torch.allclose(fresh(ids), model(ids), atol=1e-3)
        load_lora_state_dict(fresh, saved["lora"])
        assert torch.equal(fresh(ids), model(ids))
    assert saved["lora_config"] == {"rank": 4, "alpha": 8, "targets": list(LORA_TARGETS), "dropout": 0.0}


def test_load_lora_state_dict_errors_name_the_key(cfg):
    model = replace_linear_with_lora(GPTModel(cfg), rank=4, alpha=8)
    state = lora_state_dict(model)
    missing = {k: v for k, v in state.items() if k != "trf_blocks.1.ff.layers.2.lora.B"}
    with pytest.raises(ValueError, match=r"1 missing \(first: trf_blocks\.1\.ff\.layers\.2\.lora\.B\)"):
        load_lora_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"1 unexpected \(first: trf_blocks\.0\.att\.W_key\.lora\.C\)"):
        load_lora_state_dict(model, {**state, "trf_blocks.0.att.W_key.lora.C": torch.zeros(1)})
    other_rank = lora_state_dict(replace_linear_with_lora(GPTModel(cfg), rank=2, alpha=8))
    before = lora_state_dict(model)
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.W_query\.lora\.A has shape \(12, 2\), "
                                         r"the model's is \(12, 4\)"):
        load_lora_state_dict(model, other_rank)
    assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(model).items())  # nothing copied
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora_state_dict(GPTModel(cfg), state)
    assert lora_config(GPTModel(cfg)) is None
