"""Not in the book: the peer a user would pick instead, Hugging Face ``transformers``' GPT-2.

``GPT2LMHeadModel`` is built from the same random weights as the benchmark's ``GPTModel`` (the
mapping ``sft.export.hf`` writes for export), trained on the same batches with its best simple
flags (``attn_implementation="sdpa"``, ``torch.optim.AdamW(fused=True)`` where it runs, bf16
autocast where the fast path uses bf16, no KV cache while training), and answers the same
prompts with ``generate`` (left-padded batches, KV cache, greedy). ``transformers`` is an
optional dependency: without it the benchmark reports how to install it instead.
"""
import time
from contextlib import nullcontext

import torch

from ..batching import IGNORE_INDEX
from ..export.common import model_cfg
from ..export.hf import gpt2_config, gpt2_state_dict
from ..generation import extract_response
from ..prompts import format_input
from ..studio.hardware import tf32
from ..tokenizer import ENDOFTEXT, EOT_ID
from .measure import Meter

INSTALL = "pip install transformers"


def transformers_missing():
    """None if ``transformers`` imports, else a line saying how to install it."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers is not installed ({exc}); `{INSTALL}` adds the Hugging Face peer to the benchmark"
    return None


def hf_model(model, device, attn_implementation="sdpa"):
    """A ``GPT2LMHeadModel`` (fp32) holding ``model``'s weights, on ``device``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # no advice about generation flags on stderr
    state, tied = gpt2_state_dict(model)
    fields = {k: v for k, v in gpt2_config(model_cfg(model), tied).items()
              if k not in ("architectures", "torch_dtype")}
    with torch.random.fork_rng(devices=[]):  # its random init must not move anyone's RNG
        hf = GPT2LMHeadModel._from_config(GPT2Config(**fields), attn_implementation=attn_implementation)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise RuntimeError(f"GPT2LMHeadModel did not take the weights: missing {missing}, unexpected {unexpected}")
    hf.generation_config.pad_token_id = EOT_ID
    hf.generation_config.eos_token_id = EOT_ID
    return hf.to(device)


def hf_batch(inputs, targets, pad_id=EOT_ID):
    """A chapter batch the Hugging Face way: the padded sequences (B, T + 1) as ``input_ids`` and
    as ``labels`` (-100 where the chapter's targets are masked), which HF shifts itself.

    The chapter's collate cuts each padded sequence s (T + 1 tokens) into inputs s[:-1] and
    targets s[1:]; HF takes s whole and predicts label j + 1 from position j, so its loss is over
    the very same (position, target) pairs (its last position's logits go unused).
    """
    last = targets[:, -1:].clone()
    last[last == IGNORE_INDEX] = pad_id  # a masked target there was a pad
    ids = torch.cat([inputs, last], dim=1)
    labels = torch.cat([torch.full_like(inputs[:, :1], IGNORE_INDEX), targets], dim=1)
    return ids, labels


def hf_loss(hf, inputs, targets):
    """HF's own loss (mean cross-entropy over the counted targets) of a chapter batch."""
    if inputs.shape[1] + 1 > hf.config.n_positions:
        raise ValueError(f"a batch of {inputs.shape[1]} positions plus the one HF's shift needs passes "
                         f"the model's {hf.config.n_positions}: lower --allowed-max-length")
    device = next(hf.parameters()).device
    ids, labels = (t.to(device) for t in hf_batch(inputs, targets))
    return hf(input_ids=ids, labels=labels, use_cache=False).loss


def _adamw(params, lr, weight_decay, device):
    """torch's AdamW, fused where this torch runs it on the device (else its default loop)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), "AdamW fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "AdamW (foreach/loop)"


class HFPath:
    """Hugging Face's model trained as a user would, on a ``BatchReplay`` of the Trainer's
    batches, evaluated on the chapter's schedule (every ``eval_freq`` steps, ``eval_iter``
    batches of each loader, the mean of batch means), taking turns like the Trainer's paths."""

    label = "hf"

    def __init__(self, model, replay, device, *, precision, lr, weight_decay, eval_freq, tf32_on):
        self.model = hf_model(model, device).train()
        self.replay, self.device, self.precision = replay, device, precision
        self.eval_freq, self.tf32_on = eval_freq, tf32_on
        self.optimizer, self.optimizer_name = _adamw(self.model.parameters(), lr, weight_decay, device)
        self.global_step, self.tokens, self.targets = -1, 0, 0
        self.losses, self.val_losses, self.batches = [], [], []
        self.wall = self.cpu = self.eval_seconds = 0.0
        self.round_seconds = []
        self.peak_rss = self.cuda_peak = 0

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = hf_loss(self.model, *batch)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def evaluate(self):
        train_batches, val_batches = self.replay.eval_batches()
        self.model.eval()
        grad_off = torch.no_grad() if self.precision == "bf16" else torch.inference_mode()
        with grad_off, self._autocast():
            means = [sum(hf_loss(self.model, *b).item() for b in bs) / len(bs) if bs else float("nan")
                     for bs in (train_batches, val_batches)]
        self.model.train()
        return means

    def run_to(self, steps):
        """Train on to ``steps`` optimizer steps in all, evaluating where the chapter's schedule says."""
        with tf32(self.device, self.tf32_on), Meter(self.device) as meter:
            while self.global_step + 1 < steps:
                batch = self.replay.next_batch()
                self.batches.append(batch)
                self.losses.append(self.step(batch))
                self.global_step += 1
                self.tokens += batch[0].numel()
                self.targets += int((batch[1] != IGNORE_INDEX).sum())
                if self.global_step % self.eval_freq == 0:
                    t0 = time.perf_counter()
                    self.val_losses.append(self.evaluate()[1])
                    self.eval_seconds += time.perf_counter() - t0
        self.wall, self.cpu = self.wall + meter.wall, self.cpu + meter.cpu
        self.round_seconds.append(round(meter.wall, 3))
        self.peak_rss = max(self.peak_rss, meter.peak_rss)
        self.cuda_peak = max(self.cuda_peak, meter.cuda_peak or 0)

    def report(self, eval_iter):
        self.model.eval()
        with torch.inference_mode():  # the trained model judged in fp32, as the Trainer's paths are
            batches = [b for _, b in zip(range(eval_iter), self.replay.val_loader)]
            val_after = sum(hf_loss(self.model, *b).item() for b in batches) / len(batches)
        self.model.train()
        steps_seconds = self.wall - self.eval_seconds
        out = {"precision": self.precision, "attn_implementation": self.model.config._attn_implementation,
               "optimizer": self.optimizer_name, "masked_head": False, "steps": self.global_step + 1,
               "tokens": self.tokens, "tokens_per_s": round(self.tokens / self.wall, 2),
               "step_tokens_per_s": round(self.tokens / steps_seconds, 2),
               "seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3),
               "eval_seconds": round(self.eval_seconds, 3), "round_seconds": self.round_seconds,
               "losses": self.losses, "val_losses": self.val_losses, "val_loss_after": val_after,
               "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = round(self.cuda_peak / 2**20, 1)
        return out


def hf_answers(hf, entries, tokenizer, max_new_tokens, batch_size):
    """The chapter's section 7.7 answers through HF ``generate``: prompts sorted by length (as
    ``generate_responses`` batches them), left-padded with an attention mask, KV cache, greedy,
    ``pad_token_id`` 50256; each answer cut at its first end-of-text, decoded and extracted as the
    chapter does."""
    device = next(hf.parameters()).device
    texts = [format_input(e) for e in entries]
    ids = [tokenizer.encode(t, allowed_special={ENDOFTEXT}) for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers = [None] * len(ids)
    hf.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), EOT_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        out = hf.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                          num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=EOT_ID, eos_token_id=EOT_ID,
                          use_cache=True)
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            new = new[:new.index(EOT_ID)] if EOT_ID in new else new
            answers[i] = extract_response(tokenizer.decode(ids[i] + new), texts[i])
    return answers
