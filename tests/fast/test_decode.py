"""The KV-cache batch path (sft.fast.decode) must equal the chapter's generate, prompt by prompt."""
import copy
import json

import pytest
import torch

from sft.fast.decode import generate_batch, generate_responses, generate_stream
from sft.generation import extract_response, generate, generate_text_simple
from sft.model import GPTModel, model_config

EOT = 50256


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(123)
    cfg = {**model_config("tiny"), "context_length": 48}  # short context: long prompts hit the window
    return GPTModel(cfg).eval()


def chapter_new_ids(model, prompt, max_new_tokens, context_size, **kw):
    """Reference: the chapter's generate on one prompt, new tokens only."""
    out = generate(model, torch.tensor([prompt]), max_new_tokens, context_size, **kw)
    return out[0, len(prompt):].tolist()


def reference_sample(model, prompt, max_new_tokens, context_size, temperature, top_k):
    """An independent sampler (sort-based top-k, explicit softmax), one prompt, no cache."""
    idx = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([idx[-context_size:]]))[0, -1]
        kth = logits.sort(descending=True).values[top_k - 1]
        logits = logits.masked_fill(logits < kth, float("-inf")) / temperature
        probs = torch.exp(logits - logits.max())
        idx.append(int(torch.multinomial((probs / probs.sum())[None], 1)))
    return idx[len(prompt):]


def test_generate_text_simple_is_greedy(tiny_model):
    prompt = torch.tensor([[15496, 11, 314, 716]])  # "Hello, I am"
    out = generate_text_simple(tiny_model, prompt, max_new_tokens=6, context_size=48)
    assert out.shape == (1, 10) and out[0, :4].tolist() == prompt[0].tolist()
    assert out[0, 4:].tolist() == chapter_new_ids(tiny_model, prompt[0].tolist(), 6, 48)


def test_generate_batch_equals_generate_for_each_prompt(tiny_model):
    torch.manual_seed(0)
    lengths = [5, 1, 23, 12, 40]  # 40 + 20 > context 48: exercises the sliding-window fallback
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in lengths]
    got = generate_batch(tiny_model, prompts, max_new_tokens=20, eos_id=None)
    assert [len(g) for g in got] == [20] * 5
    for prompt, new in zip(prompts, got):
        assert new == chapter_new_ids(tiny_model, prompt, 20, 48)
    # A prompt longer than the context is cropped to its last tokens, as the chapter does.
    long_prompt = torch.randint(0, 50257, (60,)).tolist()
    assert generate_batch(tiny_model, [long_prompt], max_new_tokens=5, eos_id=None)[0] == \
        chapter_new_ids(tiny_model, long_prompt, 5, 48)


def test_stops_each_prompt_at_its_end_of_text():
    torch.manual_seed(1)
    model = GPTModel(model_config("tiny")).eval()
    prompts = [[10, 20, 30], [40, 50], [60, 70, 80, 90]]
    free = generate_batch(model, prompts, max_new_tokens=8, eos_id=None)
    # Make the first prompt's 3rd new token the end-of-text: the row stops there, others go on.
    stop_at = free[0][2]
    got = generate_batch(model, prompts, max_new_tokens=8, eos_id=stop_at)
    assert got[0] == free[0][:2]
    for prompt, new in zip(prompts, got):
        assert new == chapter_new_ids(model, prompt, 8, 256, eos_id=stop_at)
    # Give the output head a bias that makes 50256 win everywhere: nothing is generated.
    head = torch.nn.Linear(model.out_head.in_features, model.out_head.out_features)
    with torch.no_grad():
        head.weight.copy_(model.out_head.weight)
        head.bias.zero_()
        head.bias[EOT] = 1e4
    model.out_head = head
    assert generate(model, torch.tensor([prompts[0]]), 8, 256, eos_id=EOT).shape == (1, 3)
    assert generate_batch(model, prompts, max_new_tokens=8) == [[], [], []]


def test_top_k_1_equals_greedy_and_sampling_is_seeded(tiny_model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    greedy = generate_batch(tiny_model, prompts, max_new_tokens=10, eos_id=None)
    assert generate_batch(tiny_model, prompts, max_new_tokens=10, eos_id=None, temperature=1.5, top_k=1) == greedy
    assert chapter_new_ids(tiny_model, prompts[0], 10, 48, temperature=1.5, top_k=1) == greedy[0]
    torch.manual_seed(7)
    first = generate_batch(tiny_model, prompts, max_new_tokens=10, eos_id=None, temperature=1.0, top_k=50)
    torch.manual_seed(7)
    again = generate_batch(tiny_model, prompts, max_new_tokens=10, eos_id=None, temperature=1.0, top_k=50)
    assert first == again and first != greedy


def test_sampling_one_prompt_follows_the_chapters_random_stream(tiny_model):
    # With one prompt, the chapter's generate, an independent sampler and generate_batch draw the
    # same tokens from the same seed: same top-k rule, temperature and multinomial draws.
    prompt = [464, 3290, 318]
    runs = []
    for fn in (
        lambda: chapter_new_ids(tiny_model, prompt, 12, 48, temperature=0.8, top_k=5),
        lambda: reference_sample(tiny_model, prompt, 12, 48, temperature=0.8, top_k=5),
        lambda: generate_batch(tiny_model, [prompt], max_new_tokens=12, eos_id=None, temperature=0.8, top_k=5)[0],
    ):
        torch.manual_seed(11)
        runs.append(fn())
    assert runs[0] == runs[1] == runs[2]


def test_generate_stream_yields_the_batch_tokens(tiny_model):
    prompt = [464, 3290, 318, 257]
    stream = generate_stream(tiny_model, prompt, max_new_tokens=7, eos_id=None)
    first = next(stream)
    assert isinstance(first, int)
    assert [first, *stream] == generate_batch(tiny_model, [prompt], max_new_tokens=7, eos_id=None)[0]


def test_generation_keeps_training_mode_and_rejects_empty_prompts(tiny_model):
    tiny_model.train()
    try:
        generate_batch(tiny_model, [[1, 2]], max_new_tokens=2)
        assert tiny_model.training
    finally:
        tiny_model.eval()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(tiny_model, [[1], []], max_new_tokens=2)


def test_generate_responses_gives_the_chapters_answers(tmp_path, tokenizer, instruction_data):
    from sft.studio.answers import answer_entries

    torch.manual_seed(2)
    model = GPTModel(model_config("tiny")).eval()
    entries = instruction_data[:5]
    calls = []
    results = generate_responses(model, entries, tokenizer, max_new_tokens=6, batch_size=2,
                                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    out = tmp_path / "run" / "instruction-data-with-response.json"  # a run folder's copy, as the chapter saves it
    assert answer_entries(model, entries, tokenizer, max_new_tokens=6, batch_size=2, out_path=out) == results
    assert json.loads(out.read_text(encoding="utf-8")) == results
    assert out.read_text(encoding="utf-8").startswith('[\n    {\n        "instruction"')  # indent=4
    assert [r["instruction"] for r in results] == [e["instruction"] for e in entries]  # order kept
    for entry, result in zip(entries, results):
        assert set(result) == set(entry) | {"model_response"}
        assert {k: result[k] for k in entry} == entry
        # The chapter's section 7.7 loop, one entry at a time.
        from sft.prompts import format_input

        input_text = format_input(entry)
        ids = generate(model, torch.tensor([tokenizer.encode(input_text)]), 6, 256, eos_id=EOT)
        assert result["model_response"] == extract_response(tokenizer.decode(ids[0].tolist()), input_text)
    assert list(tmp_path.joinpath("run").iterdir()) == [out]  # no temp file left behind


def test_generate_responses_names_a_bad_entry(tokenizer):
    model = GPTModel(model_config("tiny")).eval()
    with pytest.raises(ValueError, match="entry 1"):
        generate_responses(model, [{"instruction": "a", "input": "", "output": "b"}, {"output": "x"}],
                           tokenizer, max_new_tokens=1)


def test_on_token_is_called_after_each_new_token(tiny_model):
    seen = []
    new = generate_batch(tiny_model, [[1, 2, 3], [4, 5]], max_new_tokens=5, eos_id=None, on_token=seen.append)
    assert seen == [1, 2, 3, 4, 5] and all(len(ids) == 5 for ids in new)
    assert new == generate_batch(tiny_model, [[1, 2, 3], [4, 5]], max_new_tokens=5, eos_id=None)  # no effect on them


def test_answering_joins_the_three_projections_into_one_product_with_the_same_tokens(tiny_model, monkeypatch):
    """With a cache and no gradients, Q, K and V come from one product of the three weights joined (once per
    cache); the greedy tokens are those of the three separate products, and of the chapter's generate."""
    from sft.fast import kvcache
    from sft.lora import replace_linear_with_lora

    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6]]
    made = []
    joined = kvcache._LayerKV.joined_qkv
    monkeypatch.setattr(kvcache._LayerKV, "joined_qkv", lambda self, att: made.append(joined(self, att)) or made[-1])
    one = generate_batch(tiny_model, prompts, max_new_tokens=6)
    assert made and all(isinstance(m, tuple) and m[0].shape == (3 * 64, 64) and m[1].shape == (192,) for m in made)
    monkeypatch.setattr(kvcache, "JOIN_QKV", False)
    assert generate_batch(tiny_model, prompts, max_new_tokens=6) == one
    for ids, new in zip(prompts, one):
        assert new == chapter_new_ids(tiny_model, ids, 6, 48)
    monkeypatch.setattr(kvcache, "JOIN_QKV", True)
    made.clear()
    adapted = copy.deepcopy(tiny_model)  # the module's fixture stays as it is
    replace_linear_with_lora(adapted, rank=2, alpha=4)  # adapters: the three stay apart
    generate_batch(adapted, prompts, max_new_tokens=2)
    assert made and all(m is None for m in made)
