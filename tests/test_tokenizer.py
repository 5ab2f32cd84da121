"""The bundled tokenizer equals tiktoken's own ``gpt2`` encoding, built offline from OpenAI's BPE files."""
import hashlib
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from sft.tokenizer import ENDOFTEXT, EOT_ID, get_tokenizer, text_to_token_ids, token_ids_to_text

TEST_DATA = Path(__file__).resolve().parent / "data"

# tiktoken's gpt2 constructor reads these URLs through read_file_cached, which looks first in
# $TIKTOKEN_CACHE_DIR for a file named sha1(url) and checks its SHA-256 before using it.
BPE_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "It's what they'd've done; we're sure you'll see I'm right. DON'T SHOUT'S",
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "Emoji: 🤖🚀👩‍👩‍👧‍👦 🇩🇪 ✔️ and a lone surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "spaces:    four,\ttab,\t\ttwo tabs\n\n\nthree newlines   \n  trailing   ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: print(f\"{x:>08.3f}\")",
    "Numbers 0 1 12 123 1234 12345 3.14159 -42 1e-10 0x1F 1,000,000 2026-11-01",
    "Below is an instruction that describes a task.\n\n### Instruction:\nIdentify the correct spelling.",
    "Symbols ~!@#$%^&*()_+`-=[]{}|;':\",./<>?\\ «»—–…",
    "<|user|>\nWhat is 2+2?\n<|assistant|>:\n4",
    "A" * 300 + " " + "ab" * 200,
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces\u200bzero-width",
]


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """``tiktoken.get_encoding("gpt2")`` built from the BPE files in tests/data, never the network."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in BPE_URLS.items():
        shutil.copy(TEST_DATA / "gpt2-bpe" / name, cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def no_network(blobpath):
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    mp.setattr(tiktoken.load, "read_file", no_network)
    # tiktoken keeps built encodings in a module-level registry; build ours fresh, restore after.
    saved = tiktoken.registry.ENCODINGS.pop("gpt2", None)
    try:
        enc = tiktoken.get_encoding("gpt2")
    finally:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        if saved is not None:
            tiktoken.registry.ENCODINGS["gpt2"] = saved
        mp.undo()
    return enc


def test_the_reference_is_built_from_openais_files(tiktoken_gpt2):
    assert tiktoken_gpt2.name == "gpt2"
    assert tiktoken_gpt2.n_vocab == 50257
    assert tiktoken_gpt2.eot_token == 50256
    assert tiktoken_gpt2.special_tokens_set == {ENDOFTEXT}


def test_same_vocabulary_and_specials(tokenizer, tiktoken_gpt2):
    assert tokenizer.n_vocab == tiktoken_gpt2.n_vocab == 50257
    assert tokenizer.eot_token == EOT_ID == 50256
    assert tokenizer.special_tokens_set == tiktoken_gpt2.special_tokens_set == {ENDOFTEXT}
    assert tokenizer._mergeable_ranks == tiktoken_gpt2._mergeable_ranks
    assert tokenizer._pat_str == tiktoken_gpt2._pat_str


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_tiktoken(tokenizer, tiktoken_gpt2, text):
    ids = tokenizer.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert tokenizer.decode(ids) == text


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT}) == [50256]


def test_endoftext_with_allowed_special(tokenizer, tiktoken_gpt2):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    assert ids == tiktoken_gpt2.encode(text, allowed_special={ENDOFTEXT})
    assert ids.count(50256) == 1
    with pytest.raises(ValueError):  # by default the special token's text is refused, as in tiktoken
        tokenizer.encode(text)
    assert tokenizer.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())


def test_chapter_dataset_tokenizes_identically(tokenizer, tiktoken_gpt2, instruction_data):
    from sft.prompts import format_input

    texts = [format_input(e) + f"\n\n### Response:\n{e['output']}" for e in instruction_data]
    assert tokenizer.encode_ordinary_batch(texts) == tiktoken_gpt2.encode_ordinary_batch(texts)


def test_text_to_token_ids_roundtrip(tokenizer):
    ids = text_to_token_ids("Every effort moves you", tokenizer)
    assert ids.tolist() == [[6109, 3626, 6100, 345]]
    assert token_ids_to_text(ids, tokenizer) == "Every effort moves you"


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()
