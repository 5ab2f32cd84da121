"""Text generation (chapters 4, 5 and 7): ``generate_text_simple``, ``generate``, ``extract_response``.

The chapter's ``generate`` runs the whole context through the model for every new token, one
prompt at a time. Not in the book: the fast path beside it (``sft.fast.decode``) feeds each
prompt once, then one token per step through a KV cache, many prompts at once; its greedy
output is token for token this one's.
"""
import torch


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Chapter 4: greedy decoding. idx (B, T) -> (B, T + max_new_tokens)."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # crop to the supported context
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (B, vocab): only the last position predicts the next token
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """Chapter 5 (used in chapter 7): greedy, or top-k / temperature sampling, stopping at eos_id.

    idx (B, T) -> (B, T + n). The end-of-text token itself is not appended. With B > 1 the
    whole batch stops as soon as any row produces ``eos_id`` (the chapter runs B = 1).
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (B, vocab)
        idx_next = next_token(logits, temperature, top_k)  # (B, 1)
        if eos_id is not None and bool((idx_next == eos_id).any()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def next_token(logits, temperature=0.0, top_k=None):
    """The chapter's sampling rule inside ``generate``, on (B, vocab) logits -> (B, 1) ids."""
    if top_k is not None:
        # Keep the top_k largest logits; the rest get -inf, i.e. probability 0.
        top_logits, _ = torch.topk(logits, top_k)
        min_val = top_logits[:, -1:]  # (B, 1): the k-th largest per row
        logits = torch.where(logits < min_val, torch.tensor(float("-inf"), device=logits.device), logits)
    if temperature > 0.0:
        logits = logits / temperature  # > 1 flattens the distribution, < 1 sharpens it
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


def extract_response(generated_text, input_text):
    """Chapter 7: the answer is what follows the prompt, minus the "### Response:" marker."""
    return generated_text[len(input_text):].replace("### Response:", "").strip()
