"""LoRA, low-rank adaptation (appendix E; exercise 7.4 fine-tunes chapter 7's model with it).

Reading order: LoRALayer, LinearWithLoRA, replace_linear_with_lora, with the appendix's names.
The exercise's recipe: freeze every weight, then wrap every ``nn.Linear`` (output head included):

    for param in model.parameters():
        param.requires_grad = False
    replace_linear_with_lora(model, rank=16, alpha=16)  # gpt2-medium: 7,898,384 trainable

Scaling, which printing does what: the book's appendix-E notebook computes ``alpha * (x @ A @ B)``
(its first version draws A from randn / sqrt(rank), the later one Kaiming-uniform); the
``llms_from_scratch`` package's ``appendix_e.py`` did the same at first and now divides by the
rank, ``(alpha / rank) * (x @ A @ B)``, as the LoRA paper and PEFT do: this project's contract.
At the exercise's rank=16, alpha=16 the update is scaled by 1 here, by 16 in the notebook
(alpha=256 here computes the notebook's). The parameter counts are the same either way.

Not in the book (keyword-only, off by default): a choice of ``targets``, dropout on the
adapter's input, ``freeze_for_lora``, counts, ``adapters_disabled`` (the frozen base as DPO's
reference model), ``merge_lora`` back to a plain GPTModel, adapter-only state dicts.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# Not in the book: the layers an adapter can go on, in pipeline order, and where they sit in
# GPTModel (a module path ends with the suffix).
LORA_TARGETS = ("query", "key", "value", "attn_out", "ff_in", "ff_out", "head")
_TARGET_PATHS = {"query": "att.W_query", "key": "att.W_key", "value": "att.W_value",
                 "attn_out": "att.out_proj", "ff_in": "ff.layers.0", "ff_out": "ff.layers.2",
                 "head": "out_head"}


class LoRALayer(nn.Module):
    """x (..., in_dim) -> (alpha / rank) * x A B, (..., out_dim): a rank-``rank`` update."""

    def __init__(self, in_dim, out_dim, rank, alpha, *, dropout=0.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in_dim, rank)
        # Kaiming-uniform with a=sqrt(5), nn.Linear's weight init, as the book does: for this
        # shape it draws from U(-1/sqrt(rank), 1/sqrt(rank)).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (rank, out_dim): zero, so x A B starts at 0
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout  # Not in the book: dropout on the adapter's input (as PEFT's lora_dropout)

    def forward(self, x):
        if self.dropout > 0 and self.training:
            x = F.dropout(x, self.dropout)
        # (..., in) @ (in, r) -> (..., r), then @ (r, out): never builds the (in, out) product.
        return (self.alpha / self.rank) * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """A frozen ``linear`` plus its adapter: linear(x) + lora(x)."""

    def __init__(self, linear, rank, alpha, *, dropout=0.0):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout=dropout)
        # Not in the book: the adapter lives where the linear does (drawn on the CPU first, so a
        # seed gives the same A on every device), and can be switched off (adapters_disabled).
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        self.enabled = True

    def forward(self, x):
        out = self.linear(x)
        return out + self.lora(x) if self.enabled else out

    # Not in the book: read like the nn.Linear it wraps (code that asks for W_query.bias still works).
    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)
    weight = property(lambda self: self.linear.weight)
    bias = property(lambda self: self.linear.bias)


def replace_linear_with_lora(model, rank, alpha, *, targets=None, dropout=0.0):
    """Wrap ``model``'s ``nn.Linear`` layers in ``LinearWithLoRA``, in place; returns ``model``.

    Not in the book: ``targets`` (names from ``LORA_TARGETS``; None = every nn.Linear, the
    book's choice) and ``dropout``. Layers already wrapped are left as they are.
    """
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    chosen = None if targets is None else _check_targets(targets)
    _replace(model, "", rank, alpha, chosen, dropout)
    return model


def _replace(module, prefix, rank, alpha, chosen, dropout):
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, LinearWithLoRA):
            continue  # never wrap twice (the book's recursion would wrap the inner linear)
        if isinstance(child, nn.Linear):
            if chosen is None or _target_of(path) in chosen:
                setattr(module, name, LinearWithLoRA(child, rank, alpha, dropout=dropout))
        else:
            _replace(child, path + ".", rank, alpha, chosen, dropout)  # recurse, as the book does


def _check_targets(targets):
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    choices = ", ".join(LORA_TARGETS)
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {choices} (or None for all)")
    for t in targets:
        if t not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {choices}")
    return set(targets)


def _target_of(path):
    """'trf_blocks.3.att.W_query' -> 'query'; None for a path that is no target."""
    for target, suffix in _TARGET_PATHS.items():
        if path == suffix or path.endswith("." + suffix):
            return target
    return None


# ---------------------------------- Not in the book: freezing, counting, switching off, merging, saving

def _unwrap(model):
    """The module inside DDP / DataParallel / torch.compile, so names are the book's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _wrapped(model):
    """[(module path, LinearWithLoRA)] in module order."""
    return [(path, m) for path, m in _unwrap(model).named_modules() if isinstance(m, LinearWithLoRA)]


def freeze_for_lora(model):
    """requires_grad False for every parameter but the adapters' A and B; returns ``model``.

    Before ``replace_linear_with_lora`` it freezes everything (the book's order); after, too.
    """
    adapter = {id(p) for m in model.modules() if isinstance(m, LoRALayer) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter)
    return model


def trainable_parameters(model):
    """(trainable, total, share): parameters with requires_grad, all of them, their ratio."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, (trainable / total if total else 0.0)


def lora_parameter_count(model):
    """Number of adapter parameters (A and B of every LinearWithLoRA), trainable or not."""
    return sum(m.lora.A.numel() + m.lora.B.numel() for _, m in _wrapped(model))


@contextmanager
def adapters_disabled(model):
    """Inside, every adapter is skipped: ``model`` computes the frozen base's logits exactly.

    For DPO's reference model without a second copy (run it under ``torch.no_grad()``; with
    grads on, A and B get none from such a forward). Activation checkpointing is off inside:
    its backward re-runs the blocks, and would re-run them with the adapters on.
    """
    model = _unwrap(model)
    saved = [(m, "enabled", m.enabled) for _, m in _wrapped(model)]
    saved += [(m, "gradient_checkpointing", m.gradient_checkpointing) for m in model.modules()
              if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    try:
        for m, flag, _ in saved:
            setattr(m, flag, False)
        yield model
    finally:  # restored even on an error, and nested uses restore in turn
        for m, flag, value in saved:
            setattr(m, flag, value)


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its linear, W += (alpha / rank) (A B)^T, and put the nn.Linear back.

    In place; returns the plain model (unwrapped), whose state dict has the book's keys. The
    folded linears keep their requires_grad (False after ``freeze_for_lora``).
    """
    model = _unwrap(model)
    for path, m in _wrapped(model):
        weight = m.linear.weight  # (out, in)
        delta = (m.lora.alpha / m.lora.rank) * (m.lora.A.float() @ m.lora.B.float())  # (in, out), fp32
        weight.add_(delta.T.to(weight.dtype))
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, m.linear)
    return model


def _adapter_tensors(model):
    """{'trf_blocks.0.att.W_query.lora.A': Parameter, ...}"""
    return {f"{path}.lora.{n}" if path else f"lora.{n}": getattr(m.lora, n)
            for path, m in _wrapped(model) for n in ("A", "B")}


def lora_state_dict(model):
    """Only the adapters' tensors (copies), e.g. {'trf_blocks.0.att.W_query.lora.A': (in, r), ...}."""
    return {key: t.detach().clone() for key, t in _adapter_tensors(model).items()}


def load_lora_state_dict(model, state):
    """Copy an adapter state dict into ``model``'s adapters; names and shapes must match exactly.

    Raises ValueError naming the first missing, unexpected or mis-shaped key (nothing is copied then).
    """
    params = _adapter_tensors(model)
    if not params:
        raise ValueError("model has no LoRA adapters: call replace_linear_with_lora first")
    missing, unexpected = [k for k in params if k not in state], [k for k in state if k not in params]
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: {len(missing)} missing (first: "
                         f"{(missing or [None])[0]}), {len(unexpected)} unexpected "
                         f"(first: {(unexpected or [None])[0]})")
    for key, p in params.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise ValueError(f"LoRA state {key} has shape {tuple(state[key].shape)}, the model's is "
                             f"{tuple(p.shape)} (another rank?)")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])
    return model


def lora_config(model):
    """{rank, alpha, targets, dropout} read off the model's adapters; None if it has none.

    ``targets`` lists the ``LORA_TARGETS`` present, in pipeline order: passed back to
    ``replace_linear_with_lora`` it rebuilds the same adapters.
    """
    layers = _wrapped(model)
    if not layers:
        return None
    settings = {(m.lora.rank, m.lora.alpha, m.lora.dropout) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(f"adapters differ in (rank, alpha, dropout): {sorted(settings)}")
    (rank, alpha, dropout), = settings
    present = {_target_of(path) for path, _ in layers}
    return {"rank": rank, "alpha": alpha, "targets": [t for t in LORA_TARGETS if t in present],
            "dropout": dropout}
