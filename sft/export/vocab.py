"""GPT-2's vocabulary and merges in the byte-level string form that HF and llama.cpp read.

Both consumers want GPT-2's tokenizer as OpenAI published it: ``encoder.json`` (token string ->
id) and ``vocab.bpe`` (the merges, in the order they were learned). We bundle only tiktoken's
ranks (``sft/assets/gpt2.tiktoken``: token bytes -> rank, and rank == GPT-2's id), and derive
both files from them here, exactly: ``tests/test_export.py`` compares the result with OpenAI's
original files byte for byte.

Two facts make the derivation exact:

- GPT-2 writes token bytes as printable characters: each byte maps to one unicode character
  (printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards, so
  b" the" is "Ġthe"). ``byte_to_unicode`` rebuilds that table from its rule.
- Merge number i created the token of rank 256 + i. Its two halves are what byte-level BPE
  yields for the token's bytes when only merges learned before it (lower ranks) may apply.
"""
from functools import lru_cache

from ..tokenizer import ENDOFTEXT, EOT_ID, get_tokenizer

N_BYTE_TOKENS = 256  # ranks 0..255 are the single bytes; every later rank is one merge


@lru_cache(maxsize=1)
def byte_to_unicode():
    """{byte value: character}: GPT-2's reversible map from bytes to printable characters."""
    # Bytes that print as themselves: '!'..'~', '¡'..'¬', '®'..'ÿ' (188 of them).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # The other 68 (controls, space, DEL, NBSP, soft hyphen) get U+0100, U+0101, ... in byte order.
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


def token_string(token_bytes):
    """b" the" -> "Ġthe": a token's bytes as a vocab.json key."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token_bytes)


def _halves(token, rank, ranks):
    """The two tokens whose merge made ``token``: BPE on its bytes with ranks below ``rank``."""
    # Quick path: usually exactly one split gives two known, older tokens; that is the merge.
    splits = [i for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
        return token[:splits[0]], token[splits[0]:]
    # Otherwise replay byte-level BPE: repeatedly join the adjacent pair of lowest rank.
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= rank:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from earlier merges")
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def gpt2_bpe():
    """(tokens, merges): token strings in id order (50257, the last "<|endoftext|>") and the
    50000 merges as "left right" strings in the order learned (vocab.bpe without its header)."""
    ranks = get_tokenizer()._mergeable_ranks  # {token bytes: rank}; tiktoken has no public getter
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))) or len(by_rank) != EOT_ID:
        raise ValueError("the bundled GPT-2 ranks are not 0..50255 without gaps")
    tokens = [token_string(t) for t, _ in by_rank] + [ENDOFTEXT]
    merges = []
    for token, rank in by_rank[N_BYTE_TOKENS:]:
        left, right = _halves(token, rank, ranks)
        merges.append(f"{token_string(left)} {token_string(right)}")
    return tuple(tokens), tuple(merges)


def gpt2_vocab():
    """{token string: id}, i.e. the contents of GPT-2's encoder.json / HF's vocab.json."""
    tokens, _ = gpt2_bpe()
    return {t: i for i, t in enumerate(tokens)}
