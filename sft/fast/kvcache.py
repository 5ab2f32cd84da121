"""Not in the book: a KV cache, so each generated token costs one position, not the whole context.

The chapter's ``generate`` re-runs the whole context for every new token. With a cache, the
prompt runs once (prefill) and each step runs only the new token, attending to the keys and
values kept from earlier positions. It also serves a batch of left-padded prompts: padding is
masked out and each row's positions count only its real tokens.
"""
import torch

JOIN_QKV = True  # answering: Q, K and V in one product (off: three, as the book's modules compute them)


def positions_and_mask(valid, start, past_valid=None):
    """Position ids (B, T) and a bool attention mask (B, 1, T, start + T) for ``T`` new slots.

    valid (B, T): True at real tokens, False at (left) padding. past_valid (B, start): the same
    for slots already in the cache. A row's positions count only its real tokens, so a padded
    prompt gets the positions it would have alone. Each query also sees itself, so a padding
    query never has an all-False row (which would give NaN); its output is never used.
    """
    t = valid.shape[1]
    keys_valid = valid if past_valid is None else torch.cat([past_valid, valid], dim=1)
    seen = 0 if past_valid is None else past_valid.sum(dim=1, keepdim=True)  # (B, 1)
    pos = (seen + valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    q_idx = start + torch.arange(t, device=valid.device)[:, None]  # (T, 1)
    k_idx = torch.arange(start + t, device=valid.device)[None, :]  # (1, T_keys)
    mask = (k_idx <= q_idx) & keys_valid[:, None, :]  # causal and not padding, (B, T, T_keys)
    mask = mask | (k_idx == q_idx)
    return pos, mask[:, None]  # heads broadcast: (B, 1, T, T_keys)


class _LayerKV:
    """One layer's keys and values, (B, H, max_len, head_dim), allocated on first write."""

    def __init__(self, cache):
        self.cache = cache
        self.k = self.v = None
        self.qkv = None  # (weight, bias) of W_query, W_key and W_value joined, for this cache's answers

    def joined_qkv(self, att):
        """The attention's three projections as one (3 d_out, d_in) weight and bias, made on first use:
        at decoding's few rows each product is bound by reading its weight, so one read beats three.
        None when ``JOIN_QKV`` is off or a projection is not a plain ``nn.Linear`` (LoRA adapters)."""
        if self.qkv is None:
            parts = (att.W_query, att.W_key, att.W_value)
            biased = {p.bias is not None for p in parts if type(p) is torch.nn.Linear}
            if not JOIN_QKV or any(type(p) is not torch.nn.Linear for p in parts) or len(biased) != 1:
                self.qkv = False
            else:
                self.qkv = (torch.cat([p.weight for p in parts]),
                            torch.cat([p.bias for p in parts]) if biased == {True} else None)
        return self.qkv or None

    def update(self, k, v):
        c = self.cache
        if self.k is None:
            shape = (k.shape[0], k.shape[1], c.max_len, k.shape[3])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = c.start + k.shape[2]
        self.k[:, :, c.start:end] = k
        self.v[:, :, c.start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of past positions, per layer.

    Use: ``cache = new_kv_cache(model, B, max_len)``; ``forward_hidden(model, prompt_ids,
    pad_mask=m, kv_cache=cache)`` once for (left-padded) prompts, then ``forward_hidden(model,
    next_ids, kv_cache=cache)`` with (B, 1) ids per step. ``keep(rows)`` drops finished rows.
    """

    def __init__(self, n_layers, batch_size, max_len):
        self.batch_size = batch_size
        self.max_len = max_len
        self.layers = [_LayerKV(self) for _ in range(n_layers)]
        self.start = 0  # slots already written: where the next forward pass writes
        self.length = 0  # slots filled after the forward pass in progress
        self.valid = None  # (B, max_len) bool, False at padding; None while there is none
        self.max_position = -1  # largest position id handed out (for the context check)

    def advance(self, t, pad_mask, device):
        """Reserve ``t`` slots; return their position ids ((t,) or (B, t)) and the attention mask."""
        self.start = self.length
        if self.start + t > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} slots); make a larger one")
        self.length = self.start + t
        if pad_mask is None and self.valid is None:  # no padding anywhere: plain positions
            pos = torch.arange(self.start, self.length, device=device)
            self.max_position = self.length - 1
            if self.start == 0 or t == 1:
                return pos, None  # causal (prefill) or "see everything" (one new token)
            q_idx = torch.arange(self.start, self.length, device=device)[:, None]
            return pos, torch.arange(self.length, device=device)[None, :] <= q_idx
        if self.valid is None:  # first padded write: all earlier slots were real tokens
            self.valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=device)
        new_valid = torch.ones(self.batch_size, t, dtype=torch.bool, device=device) if pad_mask is None else pad_mask.bool()
        self.valid[:, self.start:self.length] = new_valid
        pos, mask = positions_and_mask(new_valid, self.start, self.valid[:, :self.start])
        self.max_position = max(self.max_position, int(pos.max()))
        return pos, mask

    def keep(self, rows):
        """Keep only the batch rows ``rows`` (a list or 1-D LongTensor of indices)."""
        for layer in self.layers:
            if layer.k is not None:
                idx = torch.as_tensor(rows, device=layer.k.device)
                layer.k, layer.v = layer.k[idx], layer.v[idx]
        if self.valid is not None:
            self.valid = self.valid[torch.as_tensor(rows, device=self.valid.device)]
        self.batch_size = len(rows)


def new_kv_cache(model, batch_size, max_len):
    """An empty ``KVCache`` for ``model`` (a book ``GPTModel``), ``batch_size`` rows, ``max_len`` slots."""
    return KVCache(len(model.trf_blocks), batch_size, max_len)
