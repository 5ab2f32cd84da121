"""Not in the book: a LoRA-wrapped Linear (``sft.lora.LinearWithLoRA``) in fewer passes over memory.

``linear(layer, x)`` is ``layer(x)`` for any layer, computed differently for an enabled
``LinearWithLoRA`` (no adapter dropout while training):

- the frozen weight is kept cast to autocast's dtype between calls. Autocast caches its casts only
  for tensors that require grad, so a frozen weight was cast from fp32 again at every call, all
  124M of gpt2-small's at every step; the cast copy is remade when the weight changes (its
  ``_version``: a load or an in-place edit), or the dtype or device does;
- the scale goes on the thin product (x A, rank r wide), not on the (tokens, out) update, and the
  update is added inside the matrix product (``addmm``), not by a pass of its own.

Same maths as the book's ``x W^T + b + (alpha / rank) x A B``, other rounding; tests/fast proves them equal.
"""
import torch
import torch.nn.functional as F

from ..lora import LinearWithLoRA


def linear(layer, x):
    """``layer(x)``; for an enabled LinearWithLoRA, the frozen product plus the adapter's in one addmm."""
    if not isinstance(layer, LinearWithLoRA) or not layer.enabled or (layer.lora.dropout > 0 and layer.training):
        return layer(x)
    lora, shape = layer.lora, x.shape
    flat = x.reshape(-1, shape[-1])  # (tokens, in)
    out = F.linear(flat, _compute_weight(layer, x), layer.linear.bias)  # (tokens, out)
    thin = (flat @ lora.A) * (lora.alpha / lora.rank)  # (tokens, r), scaled while it is thin
    out = torch.addmm(out, thin, lora.B)  # out + thin B, inside the product
    return out.view(*shape[:-1], out.shape[-1])


def _compute_weight(layer, x):
    """The frozen weight in the dtype autocast would compute in, cast once per change of the weight."""
    weight = layer.linear.weight
    device_type = x.device.type
    if weight.requires_grad or not torch.is_autocast_enabled(device_type) or torch.compiler.is_compiling():
        return weight  # autocast casts it (under torch.compile, the compiled graph does)
    dtype = torch.get_autocast_dtype(device_type)
    if weight.dtype == dtype:
        return weight
    key = (weight._version, dtype, weight.device, weight.data_ptr())
    cached = getattr(layer, "_frozen_cast", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, weight.detach().to(dtype))
        layer._frozen_cast = cached  # a plain attribute: not a parameter, buffer or state-dict entry
    return cached[1]
