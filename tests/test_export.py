"""Exports, proven against their real consumers: transformers for the Hugging Face folder,
llama.cpp (through llama-cpp-python) and gguf's reader for GGUF, and Ollama's Modelfile syntax.

Tiny models (random, seeded) keep this fast; one random gpt2-small checks full-size shapes.
"""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sft.export import chat_template, export_gguf, export_hf, export_model, ollama_template, render_prompt
from sft.export.modelfile import ollama_name
from sft.export.vocab import gpt2_bpe, gpt2_vocab
from sft.fast.decode import generate_batch
from sft.model import GPTModel, model_config
from sft.prompts import PromptStyle, get_prompt_style

from helpers import TEST_DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads local folders only; never the network
EOT = 50256
LLAMA_CPP_INSTALL = (
    "llama-cpp-python is needed for the GGUF tests (llama.cpp itself, built from source, CPU only, ~10 min): "
    'CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" '
    "pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36"
)
TEXTS = [
    "Hello, world!",
    "<|endoftext|>",
    "Say hi.<|endoftext|>Next one",
    "  two leading spaces, trailing ones   ",
    "Tabs\tand\nnew lines\n\n\nand  double  spaces",
    "I'm sure they'll say it's fine, we've done it, don't worry",
    "Numbers 1234567 and 3.14159, symbols @#$%^&*()",
    "Unicode: café, naïve, 日本語, emoji 🙂, Ελληνικά",
]


# ----------------------------------------------------------------------------- fixtures

def seeded_model(cfg, seed, head_scale=8.0, tied=False):
    """A random GPTModel; its head scaled so the top logits stand well apart (greedy decoding
    then has no near-ties that float rounding in another program could flip)."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random norms and biases too, not just 1s and 0s
            if name.endswith((".bias", ".shift", ".scale")):
                p.add_(torch.randn_like(p) * 0.1)
        if tied:
            model.out_head.weight.copy_(model.tok_emb.weight)
        else:
            model.out_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def tiny():
    return seeded_model(model_config("tiny"), 123)  # context 256, emb 64, 2 layers, 2 heads, qkv bias


@pytest.fixture(scope="module")
def tied_no_qkv_bias(one_thread):
    # The book's test-mode shape (emb 12) without qkv biases, head tied to the embedding.
    cfg = {**model_config("tiny"), "emb_dim": 12, "n_layers": 1, "qkv_bias": False}
    return seeded_model(cfg, 7, tied=True)


@pytest.fixture(scope="module")
def alpaca_prompts(tokenizer, instruction_data):
    style = get_prompt_style("alpaca")
    entries = [instruction_data[i] for i in (2, 0, 50)]  # without input, with input, with input
    return [tokenizer.encode(style.format_prompt(e) + style.response_prefix) for e in entries]


@pytest.fixture(scope="module")
def gguf_dir(tiny, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("export")
    result = export_model(tiny, out, formats=("gguf",), gguf_dtypes=("f32", "f16", "q8_0"), name="Tiny SFT",
                          provenance={"base_model": "tiny (random)", "run": "test"})
    return result


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail(LLAMA_CPP_INSTALL)
    return llama_cpp


def load_llama(path, n_ctx=256):
    return llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, logits_all=False, verbose=False, n_threads=1)


def llama_greedy(llm, prompt, max_new_tokens):
    """llama.cpp's own greedy decoding (its sampler at temperature 0, top_k 1, no penalties),
    stopping before end-of-text as ``generate_batch`` does."""
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token == EOT or len(out) == max_new_tokens:
            break
        out.append(token)
    return out


def llama_logits(llm, prompt):
    """llama.cpp's next-token logits after ``prompt`` (n_vocab,)."""
    llm.reset()
    llm.eval(prompt)
    row = llama_cpp().llama_get_logits_ith(llm.ctx, -1)  # the last evaluated position
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)


# ----------------------------------------------------------------------------- tokenizer files

def test_vocab_and_merges_derived_from_tiktoken_equal_openais_files():
    tokens, merges = gpt2_bpe()
    with open(TEST_DATA / "gpt2-bpe" / "encoder.json", encoding="utf-8") as f:
        assert gpt2_vocab() == json.load(f)
    with open(TEST_DATA / "gpt2-bpe" / "vocab.bpe", encoding="utf-8") as f:
        original = f.read()
    assert "#version: 0.2\n" + "\n".join(merges) + "\n" == original
    assert len(tokens) == 50257 and tokens[EOT] == "<|endoftext|>" and tokens[220] == "Ġ" and len(merges) == 50000


class OddStyle(PromptStyle):
    """Quotes, backslashes, braces, non-ASCII and leading newlines: all must survive templating."""

    name = "odd"
    response_prefix = "\n\n« Answer » {it's} \\ here:\n"

    def prompt_segments(self, entry):
        return [("instruction", "Q \"{{x}}\" é\t{% raw %}:\n" + entry["instruction"])]


@pytest.mark.parametrize("style", ["alpaca", "phi3", OddStyle()], ids=["alpaca", "phi3", "odd"])
def test_chat_template_renders_the_styles_prompt_in_jinja(style):
    import jinja2

    # As Hugging Face and llama-cpp-python render chat templates: trim_blocks and lstrip_blocks on.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(chat_template(style))
    style_obj = get_prompt_style(style)
    user = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Name a colour."}]
    expected = style_obj.format_prompt({"instruction": "Name a colour."}) + style_obj.response_prefix
    assert template.render(messages=user, add_generation_prompt=True) == expected
    assert render_prompt(style, "Name a colour.") == expected
    both = user + [{"role": "assistant", "content": "Blue."}]
    example = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    assert template.render(messages=both) == style_obj.format_example(example) + "<|endoftext|>"
    if isinstance(style, OddStyle):
        with pytest.raises(ValueError, match="TEMPLATE"):
            ollama_template(style)


def test_a_style_ollama_cannot_hold_fails_before_writing(tiny, tmp_path):
    with pytest.raises(ValueError, match="TEMPLATE"):
        export_gguf(tiny, tmp_path / "odd.gguf", prompt_style=OddStyle())
    assert list(tmp_path.iterdir()) == []
    export_gguf(tiny, tmp_path / "odd.gguf", prompt_style=OddStyle(), modelfile=False)  # GGUF alone is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf", "sft-export.json"]


# ----------------------------------------------------------------------------- Hugging Face

def hf_logits(folder, ids):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        return hf(ids).logits, hf


@pytest.mark.parametrize("which", ["tiny", "tied_no_qkv_bias"])
def test_hf_export_loads_in_transformers_with_equal_logits(which, request, tmp_path):
    model = request.getfixturevalue(which)
    paths = export_hf(model, tmp_path / "hf", provenance={"base_model": which})
    with open(paths["config.json"]) as f:
        config = json.load(f)
    tied = which == "tied_no_qkv_bias"
    assert config["tie_word_embeddings"] is tied and config["n_embd"] == model.tok_emb.embedding_dim
    with safe_open(paths["model.safetensors"], framework="pt") as f:
        keys = set(f.keys())
        if tied:  # no qkv bias in the model: GPT-2's c_attn bias is written as zeros
            assert torch.count_nonzero(f.get_tensor("transformer.h.0.attn.c_attn.bias")) == 0
    assert ("lm_head.weight" in keys) is not tied and "transformer.h.0.attn.c_attn.weight" in keys
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    got, hf = hf_logits(paths["folder"], ids)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids), atol=1e-4, rtol=0)
    assert torch.equal(hf.lm_head.weight, model.out_head.weight)
    record = json.loads((tmp_path / "hf" / "sft-export.json").read_text())
    assert record["provenance"] == {"base_model": which} and record["prompt_style"] == "alpaca"
    assert record["chat_template"] == chat_template("alpaca") and record["tie_word_embeddings"] is tied


@pytest.mark.slow
def test_hf_export_of_a_random_gpt2_small_equals_ours(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(model_config("gpt2-small (124M)")).eval()
    paths = export_hf(model, tmp_path / "hf")
    ids = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(1))
    got, _ = hf_logits(paths["folder"], ids)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids), atol=1e-4, rtol=0)


def test_hf_tokenizer_gives_tiktokens_ids_and_the_chat_template(tiny, tmp_path, tokenizer, instruction_data):
    import transformers

    folder = export_hf(tiny, tmp_path / "hf")["folder"]
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"} <= files
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    style = get_prompt_style("alpaca")
    entry = instruction_data[0]
    for text in TEXTS + [style.format_example(entry) + "<|endoftext|>"]:
        ids = tokenizer.encode(text, allowed_special="all")
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == EOT and hf_tok.bos_token_id == EOT
    chat = [{"role": "user", "content": "Convert 45 kilometers to meters."}]
    prompt = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == style.format_prompt({"instruction": chat[0]["content"]}) + style.response_prefix
    full = chat + [{"role": "assistant", "content": "45 kilometers is 45000 meters."}]
    done = {"instruction": chat[0]["content"], "input": "", "output": full[1]["content"]}
    assert hf_tok.apply_chat_template(full, tokenize=False) == style.format_example(done) + "<|endoftext|>"
    # transformers' own greedy generate (generation_config.json: no sampling) continues as we do.
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt_ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids = list(prompt_ids["input_ids"])
    assert prompt_ids == tokenizer.encode(prompt)
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=12)[0, len(prompt_ids):].tolist()
    assert [t for t in out if t != EOT] == generate_batch(tiny, [prompt_ids], max_new_tokens=12)[0]


def test_hf_export_refuses_a_foreign_folder_and_updates_its_own(tiny, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an SFT Studio export.*overwrite=True"):
        export_hf(tiny, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]  # nothing written, no temp files
    export_hf(tiny, target, overwrite=True)
    export_hf(tiny, target, prompt_style="phi3")  # an export folder: updated without overwrite
    assert json.loads((target / "sft-export.json").read_text())["prompt_style"] == "phi3"
    assert (target / "notes.txt").read_text() == "keep me"
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="vocabulary"):
        export_hf(GPTModel({**model_config("tiny"), "vocab_size": 500}), tmp_path / "other")


# ----------------------------------------------------------------------------- GGUF

def test_gguf_metadata_reads_back_with_ggufs_reader(gguf_dir, tiny):
    import gguf

    reader = gguf.GGUFReader(gguf_dir["gguf"]["f32"])
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    assert field["general.architecture"] == "gpt2" and field["general.name"] == "Tiny SFT"
    assert (field["gpt2.context_length"], field["gpt2.embedding_length"], field["gpt2.block_count"],
            field["gpt2.attention.head_count"], field["gpt2.feed_forward_length"]) == (256, 64, 2, 2, 256)
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.chat_template"] == chat_template("alpaca")
    assert field["tokenizer.ggml.tokens"] == list(gpt2_bpe()[0])
    assert field["tokenizer.ggml.token_type"][EOT] == gguf.TokenType.CONTROL
    assert field["tokenizer.ggml.bos_token_id"] == field["tokenizer.ggml.eos_token_id"] == EOT
    assert field["tokenizer.ggml.add_bos_token"] is False
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 4 + 12 * 2 + 1 and "output.weight" in tensors  # untied head
    qkv = tensors["blk.1.attn_qkv.weight"]
    w = tiny.trf_blocks[1].att
    expected = torch.cat([w.W_query.weight, w.W_key.weight, w.W_value.weight]).detach().numpy()
    np.testing.assert_array_equal(np.asarray(qkv.data).reshape(expected.shape), expected)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    # q8_0 (one more read: GGUFReader takes seconds over the 100k tokenizer strings): matrices
    # quantized; norms, biases and position embeddings kept in f32, as llama.cpp's converter does.
    Q = gguf.GGMLQuantizationType
    q8 = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_dir["gguf"]["q8_0"]).tensors}
    matrices = ("token_embd.weight", "output.weight", "blk.0.attn_qkv.weight", "blk.1.ffn_down.weight")
    assert {q8[n] for n in matrices} == {Q.Q8_0}
    assert {q8[n] for n in ("position_embd.weight", "blk.0.ffn_up.bias", "blk.0.attn_norm.weight")} == {Q.F32}


def test_llama_cpp_tokenizer_gives_tiktokens_ids(gguf_dir, tokenizer, instruction_data):
    llm = load_llama(gguf_dir["gguf"]["f32"])
    style = get_prompt_style("alpaca")
    for text in TEXTS + [style.format_example(e) for e in instruction_data[:20]]:
        ids = tokenizer.encode(text, allowed_special="all")
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode("utf-8") == text
    assert llm.token_eos() == EOT and llm.token_bos() == EOT


@pytest.mark.parametrize("which", ["tiny", "tied_no_qkv_bias"])
def test_llama_cpp_greedy_tokens_equal_ours(which, request, alpaca_prompts, tmp_path):
    model = request.getfixturevalue(which)
    path = tmp_path / "model-f32.gguf"
    export_gguf(model, path, modelfile=False)
    llm = load_llama(path)
    ours = generate_batch(model, alpaca_prompts, max_new_tokens=15, eos_id=EOT)
    for prompt, expected in zip(alpaca_prompts, ours):
        assert llama_greedy(llm, prompt, 15) == expected
        with torch.no_grad():
            reference = model(torch.tensor([prompt]))[0, -1].double().numpy()
        assert np.abs(llama_logits(llm, prompt) - reference).max() < 1e-3 * np.abs(reference).max()
    assert sum(len(o) for o in ours) >= 30 and len({t for o in ours for t in o}) >= 10  # real, varied text


def test_llama_cpp_runs_the_f16_and_q8_0_exports(gguf_dir, tiny, alpaca_prompts, capsys):
    reference = [llama_greedy(load_llama(gguf_dir["gguf"]["f32"]), p, 15) for p in alpaca_prompts]
    assert reference == generate_batch(tiny, alpaca_prompts, max_new_tokens=15, eos_id=EOT)
    for dtype in ("f16", "q8_0"):
        llm = load_llama(gguf_dir["gguf"][dtype])
        outs = [llama_greedy(llm, p, 15) for p in alpaca_prompts]
        assert all(outs) and all(0 <= t < 50257 for o in outs for t in o)
        same = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o, r))
        with capsys.disabled():
            print(f"\n{dtype}: {same}/{sum(map(len, reference))} greedy tokens equal to f32's (same position)")
        assert [o[0] for o in outs] == [r[0] for r in reference]  # the first token survives rounding


def test_llama_cpp_chat_completion_uses_the_chat_template(gguf_dir, tiny, tokenizer):
    llm = load_llama(gguf_dir["gguf"]["f32"])
    assert llm.metadata["tokenizer.chat_template"] == chat_template("alpaca")
    instruction = "Convert 45 kilometers to meters."
    ours = generate_batch(tiny, [tokenizer.encode(render_prompt("alpaca", instruction))], max_new_tokens=8)[0]
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": instruction}],
                                       max_tokens=8, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(ours)


# ----------------------------------------------------------------------------- Modelfile

def parse_modelfile(text):
    """{"FROM": str, "TEMPLATE": str, "PARAMETER": [(name, value)]}: one instruction per line,
    except a triple-quoted value, which runs to its closing \"\"\" (Ollama's syntax)."""
    out, pos = {"PARAMETER": []}, 0
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        key, _, value = text[pos:end].partition(" ")
        if value.startswith('"""'):
            start = pos + len(key) + 1 + 3
            close = text.index('"""', start)
            value, end = text[start:close], close + 3
            assert text[end:end + 1] in ("\n", ""), "text after a closing triple quote"
        if key == "PARAMETER":
            name, _, raw = value.partition(" ")
            out["PARAMETER"].append((name, json.loads(raw) if raw.startswith('"') else raw))
        elif key:
            assert key in ("FROM", "TEMPLATE") and key not in out, key
            out[key] = value
        pos = end + 1
    return out


@pytest.mark.parametrize("style_name, header", [("alpaca", "### Instruction:"), ("phi3", "<|user|>")])
def test_modelfile_reproduces_the_prompt_style(style_name, header, tiny, tmp_path, instruction_data):
    result = export_gguf(tiny, tmp_path / "x.gguf", dtype="q8_0", prompt_style=style_name, name="My Model 1")
    parsed = parse_modelfile(open(result["modelfile"]).read())
    style = get_prompt_style(style_name)
    assert parsed["FROM"] == "./x.gguf" and (tmp_path / "x.gguf").is_file()
    assert sorted(parsed["PARAMETER"]) == sorted([("stop", "<|endoftext|>"), ("stop", header), ("temperature", "0"),
                                                  ("num_ctx", "256")])
    template = parsed["TEMPLATE"]
    assert template == ollama_template(style_name) and template.count("{{ .Prompt }}") == 1
    assert template.endswith(style.response_prefix + "{{ .Response }}")  # the answer goes after the prefix
    for entry in instruction_data[:5]:
        if entry["input"]:  # the user types the input below the instruction; the style puts it there too
            content = style.format_prompt(entry)[len(style.format_prompt({**entry, "input": ""})):]
            prompt = entry["instruction"] + content
        else:
            prompt = entry["instruction"]
        rendered = template.replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")  # a new answer
        assert rendered == style.format_prompt(entry) + style.response_prefix
    assert result["commands"] == [f"cd {tmp_path}", "ollama create my-model-1 -f Modelfile", "ollama run my-model-1"]


def test_export_model_writes_both_formats_with_progress(tiny, tmp_path):
    calls = []
    result = export_model(tiny, tmp_path / "out", gguf_dtypes=("f32", "q8_0"), name="demo",
                          provenance={"run": "r1"}, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert set(result) == {"hf", "gguf", "modelfile", "commands"}
    assert result["gguf"] == {d: str(tmp_path / "out" / "gguf" / f"demo-{d}.gguf") for d in ("f32", "q8_0")}
    record = json.loads((tmp_path / "out" / "gguf" / "sft-export.json").read_text())
    assert set(record["files"]) == {"demo-f32.gguf", "demo-q8_0.gguf"} and record["modelfile_from"] == "demo-f32.gguf"
    assert record["provenance"] == {"run": "r1"}
    assert parse_modelfile(open(result["modelfile"]).read())["FROM"] == "./demo-f32.gguf"
    assert ollama_name("  Ünïcode Name!! ") == "unicode-name" and ollama_name("") == "sft-gpt2"
    with pytest.raises(ValueError, match="gguf_dtypes"):
        export_model(tiny, tmp_path / "bad", formats=("gguf",), gguf_dtypes=("q4",))


@pytest.mark.slow
def test_llama_cpp_runs_a_random_gpt2_small_export_like_ours(tmp_path, alpaca_prompts):
    model = seeded_model(model_config("gpt2-small (124M)"), 0)  # 12 heads of 64, 768 wide, 12 layers
    path = tmp_path / "small-f32.gguf"
    export_gguf(model, path, modelfile=False)
    llm = load_llama(path, n_ctx=512)
    prompt = alpaca_prompts[0]
    assert llama_greedy(llm, prompt, 5) == generate_batch(model, [prompt], max_new_tokens=5)[0]
    with torch.no_grad():
        reference = model(torch.tensor([prompt]))[0, -1].double().numpy()
    assert np.abs(llama_logits(llm, prompt) - reference).max() < 1e-3 * np.abs(reference).max()
