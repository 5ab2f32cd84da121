"""GPT-2's byte-pair tokenizer, offline.

``tiktoken.get_encoding("gpt2")`` downloads its BPE files on first use. We build the
same encoding from a copy of GPT-2's ranks bundled in ``sft/assets/gpt2.tiktoken``
(see ``sft/assets/SOURCES.md``), so the app and the tests never need the network.
"""
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ASSETS = Path(__file__).resolve().parent / "assets"
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256  # GPT-2's only special token; also the chapter's pad token
# SHA-256 of the bundled ranks, as tiktoken expects for r50k_base (GPT-2's ranks).
_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenisation regex: contractions, letters, digits, other symbols, spaces.
try:  # take tiktoken's own constant so the split can never drift from its gpt2 encoding
    from tiktoken_ext.openai_public import r50k_pat_str as _GPT2_PATTERN
except ImportError:  # pragma: no cover - tiktoken always ships tiktoken_ext
    _GPT2_PATTERN = (
        r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    )


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The ``gpt2`` encoding, identical to ``tiktoken.get_encoding("gpt2")``, built offline."""
    ranks = load_tiktoken_bpe(str(ASSETS / "gpt2.tiktoken"), expected_hash=_RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=50257,
    )


def text_to_token_ids(text, tokenizer):
    """Chapter 5: encode ``text`` into a (1, n) tensor, a batch of one."""
    import torch

    encoded = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return torch.tensor(encoded).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids, tokenizer):
    """Chapter 5: decode a (1, n) tensor (or a flat list) back into text."""
    flat = token_ids.squeeze(0) if hasattr(token_ids, "squeeze") else token_ids
    return tokenizer.decode(flat.tolist() if hasattr(flat, "tolist") else list(flat))
