"""DPO (the book's dpo-from-scratch notebook): batches, log-probs and loss checked against
independent loop implementations written here, the notebook's printed facts, a few training
steps on a tiny model, cached reference log-probs, and preference-data validation."""
import copy
import io
import json
import math
import re

import pytest
import torch

from sft.data import DataValidationError
from sft.dpo import (
    BUNDLED_PREFERENCE_DATA, PreferenceDataset, cache_reference_logprobs, compute_dpo_loss,
    compute_dpo_loss_batch, compute_dpo_loss_loader, compute_logprobs, create_dpo_data_loaders,
    custom_collate_fn, decode_tokens_from_batch, evaluate_dpo_loss_loader, identical_pairs,
    load_preference_data, reference_logprobs, split_data, train_model_dpo_simple,
)
from sft.model import GPTModel
from sft.prompts import format_input

EOT = 50256
LN2 = math.log(2)
# The book's --test_mode model (as conftest.TINY_CFG): one layer, 12-dim embeddings, 120-token context.
TINY_CFG = {"vocab_size": 50257, "context_length": 120, "emb_dim": 12, "n_heads": 2, "n_layers": 1,
            "drop_rate": 0.0, "qkv_bias": False}
BOOK_IDENTICAL = [122, 226, 400, 566, 628, 676]  # counted in the bundled file: chosen == rejected


@pytest.fixture(scope="module")
def pref_data():
    return load_preference_data()


@pytest.fixture(scope="module")
def models():
    """A tiny random GPT as the reference and an exact copy as the policy (eval mode, no dropout)."""
    torch.manual_seed(123)
    reference = GPTModel(TINY_CFG).eval()
    return reference, copy.deepcopy(reference)


@pytest.fixture(scope="module")
def short_pairs(pref_data):
    """The twelve shortest pairs (at most 48 tokens; chosen != rejected), for quick tiny-model runs."""
    lengths = [len(format_input(e)) + max(len(e["chosen"]), len(e["rejected"])) for e in pref_data]
    order = sorted((i for i in range(len(pref_data)) if i not in BOOK_IDENTICAL), key=lengths.__getitem__)
    return [pref_data[i] for i in order[:12]]


# ---------------------------------------------------------------- independent implementations

def loop_collate(items, pad=EOT, cut=None, mask_prompt=True):
    """Position by position: ids padded to the longest chosen/rejected + 1; mask True at answer tokens."""
    width = max(max(len(it["chosen"]), len(it["rejected"])) for it in items) + 1
    out = {"chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for it in items:
        for key in ("chosen", "rejected"):
            ids, mask = [], []
            for j in range(width):
                real = j < len(it[key])
                ids.append(it[key][j] if real else pad)
                mask.append(real and (not mask_prompt or j >= len(it["prompt"]) + 2))
            out[key].append(ids[:cut] if cut else ids)
            out[key + "_mask"].append(mask[:cut] if cut else mask)
    return {key: torch.tensor(rows) for key, rows in out.items()}


def loop_logprobs(logits, labels, mask=None):
    """Row by row in float64: log_softmax at each position, pick the next token, average the selected."""
    means = []
    for b in range(labels.shape[0]):
        log_probs = torch.log_softmax(logits[b].double(), dim=-1)  # (T, V)
        picked = [log_probs[t, labels[b, t + 1]].item() for t in range(labels.shape[1] - 1)
                  if mask is None or bool(mask[b, t + 1])]
        means.append(sum(picked) / len(picked))
    return torch.tensor(means, dtype=torch.float64)


def loop_dpo(pc, pr, rc, rr, beta):
    losses = [math.log1p(math.exp(-beta * ((a - b) - (c - d)))) for a, b, c, d in zip(pc, pr, rc, rr)]
    n = len(losses)
    return sum(losses) / n, sum(a - c for a, c in zip(pc, rc)) / n, sum(b - d for b, d in zip(pr, rr)) / n


# ---------------------------------------------------------------- dataset and collate

def test_dataset_tokenizes_whole_texts_and_prompts_end_before_two_newlines(pref_data, tokenizer):
    dataset = PreferenceDataset(pref_data, tokenizer)
    assert len(dataset) == 1100
    for i, (entry, item) in enumerate(zip(pref_data, dataset.encoded_texts)):
        prompt = format_input(entry)
        assert item["prompt"] == tokenizer.encode(prompt)
        for key in ("chosen", "rejected"):
            assert item[key] == tokenizer.encode(prompt + "\n\n### Response:\n" + entry[key])
            # the collate's "+2": on every entry the prompt ids are a prefix, then "\n" "\n" "###"
            n = len(item["prompt"])
            assert item[key][:n] == item["prompt"] and item[key][n:n + 3] == [198, 198, 21017], (i, key)


@pytest.mark.parametrize("count,cut", [(8, None), (16, None), (16, 60), (8, 1024)])
def test_collate_equals_loop_version(pref_data, tokenizer, count, cut):
    items = PreferenceDataset(pref_data[:count], tokenizer).encoded_texts
    batch = custom_collate_fn(items, allowed_max_length=cut)
    expected = loop_collate(items, cut=cut)
    assert list(batch) == ["prompt", "chosen", "rejected", "rejected_mask", "chosen_mask"]
    for key, value in expected.items():
        assert batch[key].dtype == (torch.bool if key.endswith("mask") else torch.int64)
        assert torch.equal(batch[key], value), key
    assert [p.tolist() for p in batch["prompt"]] == [it["prompt"] for it in items]
    if cut == 60:
        assert batch["chosen"].shape == (16, 60)
    unmasked = custom_collate_fn(items, allowed_max_length=cut, mask_prompt_tokens=False)
    assert torch.equal(unmasked["rejected_mask"], loop_collate(items, cut=cut, mask_prompt=False)["rejected_mask"])


def test_notebook_first_batch(pref_data, tokenizer):
    """The notebook's example batch of data[:2] (allowed_max_length=1024), printed ids and masks."""
    prompt0 = [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430, 257, 2882, 326, 20431, 32543, 262,
               2581, 13, 198, 198, 21017, 46486, 25, 198, 36, 2100, 4985, 262, 1708, 9546, 416, 25449, 340,
               656, 262, 24993, 1813, 13, 198, 198, 21017, 23412, 25, 198, 19503, 521, 14610, 1545]
    answer0 = [198, 198, 21017, 18261, 25, 198, 464, 24993, 286, 262, 1813, 9546, 366, 19503, 521, 1, 318,
               11491, 11, 262, 3376, 24993, 318, 366, 6726, 1911]
    chosen1_tail = [13, 198, 198, 21017, 18261, 25, 198, 1544, 2925, 284, 262, 3952, 790, 1110, 13]
    loader = torch.utils.data.DataLoader(PreferenceDataset(pref_data[:2], tokenizer), batch_size=2,
                                         collate_fn=lambda b: custom_collate_fn(b, allowed_max_length=1024))
    batch = next(iter(loader))
    assert [len(p) for p in batch["prompt"]] == [48, 45]
    assert batch["prompt"][0].tolist() == prompt0
    assert batch["chosen"].shape == batch["chosen_mask"].shape == batch["rejected"].shape == (2, 81)
    assert batch["chosen"][0].tolist() == prompt0 + answer0 + [EOT] * 7
    assert batch["chosen"][1].tolist()[44:59] == chosen1_tail and batch["chosen"][1].tolist()[59:] == [EOT] * 22
    assert batch["chosen_mask"][0].tolist() == [False] * 50 + [True] * 24 + [False] * 7
    assert decode_tokens_from_batch(batch["chosen"][0][batch["chosen_mask"][0]], tokenizer) == (
        '### Response:\nThe spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".')
    assert decode_tokens_from_batch(batch["rejected"][0][batch["rejected_mask"][0]], tokenizer) == (
        '### Response:\nThe spelling of the given phrase "freind" is flat out wrong, get it together, '
        'the correct spelling is "friend".')
    assert decode_tokens_from_batch(batch["rejected"][0], tokenizer).endswith('"friend".<|endoftext|>')


def test_notebook_data_split_and_train_loader_shapes(pref_data, tokenizer):
    assert pref_data[50]["rejected"] == "The correct spelling is obviously 'Occasion.'"
    assert pref_data[999]["chosen"] == "A suitable antonym for 'complicated' would be 'simple'."
    train, test, val = split_data(pref_data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert val == pref_data[1045:] and test == pref_data[935:1045]
    train_loader, val_loader, test_loader = create_dpo_data_loaders(train, val, test, tokenizer)
    shapes = [tuple(b["chosen"].shape) for b in train_loader]
    assert len(shapes) == 116  # steps 0..115 in the notebook's training log
    assert [s[1] for s in shapes[:12]] == [77, 81, 94, 75, 75, 76, 99, 71, 67, 88, 65, 79]
    assert [s[1] for s in shapes[-5:]] == [67, 84, 78, 85, 70]
    assert max(s[1] for s in shapes) == 115 and {s[0] for s in shapes} == {8}
    assert [len(b["prompt"]) for b in val_loader] == [8] * 6 + [7]
    assert len(test_loader) == 14


# ---------------------------------------------------------------- log-probs and loss

def test_compute_logprobs_equals_loop_version_on_real_batches(pref_data, tokenizer, models):
    reference, _ = models
    for items, cut in ((PreferenceDataset(pref_data[:4], tokenizer).encoded_texts, None),
                       (PreferenceDataset(pref_data[4:8], tokenizer).encoded_texts, 60)):
        batch = custom_collate_fn(items, allowed_max_length=cut)
        with torch.no_grad():
            logits = reference(batch["rejected"])
        got = compute_logprobs(logits, batch["rejected"], batch["rejected_mask"])
        assert got.shape == (4,)
        assert torch.allclose(got.double(), loop_logprobs(logits, batch["rejected"], batch["rejected_mask"]), atol=1e-5)
        no_mask = compute_logprobs(logits, batch["rejected"])
        assert torch.allclose(no_mask.double(), loop_logprobs(logits, batch["rejected"]), atol=1e-5)
        assert not torch.allclose(got, no_mask)


def test_compute_dpo_loss_equals_loop_formula():
    pc, pr = torch.tensor([-1.0, -2.5, -0.3]), torch.tensor([-1.5, -2.0, -4.0])
    rc, rr = torch.tensor([-1.2, -2.2, -0.9]), torch.tensor([-1.1, -2.4, -3.0])
    for beta in (0.1, 0.5, 3.0):
        loss, chosen, rejected = compute_dpo_loss(pc, pr, rc, rr, beta=beta)
        expected = loop_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta)
        assert [loss.item(), chosen.item(), rejected.item()] == pytest.approx(expected, abs=1e-6)
    pc.requires_grad_(True)
    loss, chosen, _ = compute_dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert (pc.grad < 0).all() and not chosen.requires_grad  # raising the chosen log-prob lowers the loss


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(pref_data, tokenizer, models, short_pairs):
    reference, policy = models
    batch = custom_collate_fn(PreferenceDataset(pref_data[:2], tokenizer).encoded_texts)
    with torch.no_grad():
        loss, chosen, rejected = compute_dpo_loss_batch(batch, policy, reference, beta=0.1)
    assert abs(loss.item() - LN2) < 1e-6 and loss.item() == pytest.approx(0.6931471824645996, abs=1e-7)
    assert chosen.item() == 0.0 and rejected.item() == 0.0
    loaders = create_dpo_data_loaders(short_pairs[:4], short_pairs[4:12], [], tokenizer, batch_size=4)
    res = evaluate_dpo_loss_loader(policy, reference, loaders[0], loaders[1], beta=0.1, eval_iter=2)
    assert list(res) == ["train_loss", "train_chosen_reward", "train_rejected_reward",
                         "val_loss", "val_chosen_reward", "val_rejected_reward"]
    assert abs(res["train_loss"] - LN2) < 1e-6 and abs(res["val_loss"] - LN2) < 1e-6
    assert res["train_chosen_reward"] - res["train_rejected_reward"] == 0.0
    assert policy.training  # evaluate_dpo_loss_loader leaves the policy in train mode, as the notebook
    policy.eval()
    empty = torch.utils.data.DataLoader([], batch_size=2, collate_fn=custom_collate_fn)
    assert all(math.isnan(v) for v in compute_dpo_loss_loader(empty, policy, reference, 0.1))


# ---------------------------------------------------------------- training and the cache

def test_training_raises_the_margin_and_cached_reference_gives_the_same_run(capsys, monkeypatch, tokenizer,
                                                                           models, short_pairs):
    reference, init = models
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    pairs = short_pairs[:4]
    dataset = PreferenceDataset(pairs, tokenizer)
    chosen_cache, rejected_cache = cache_reference_logprobs(reference, dataset)
    assert chosen_cache.shape == rejected_cache.shape == (4,)

    def run(reference_model):
        policy = copy.deepcopy(init).train()
        torch.manual_seed(123)
        train_loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True,
                                                   collate_fn=custom_collate_fn)
        val_loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=custom_collate_fn)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.01)
        tracking = train_model_dpo_simple(policy, reference_model, train_loader, val_loader, optimizer,
                                          num_epochs=2, beta=0.1, eval_freq=3, eval_iter=1,
                                          start_context=format_input(pairs[0]), tokenizer=tokenizer)
        return tracking, capsys.readouterr().out.splitlines()

    tracking, lines = run(reference)
    assert list(tracking) == ["train_losses", "train_chosen_rewards", "train_rejected_rewards", "val_losses",
                              "val_chosen_rewards", "val_rejected_rewards", "tokens_seen"]
    pattern = (r"Ep (\d) \(Step (\d{6})\): Train loss \d\.\d{3}, Val loss \d\.\d{3}, "
               r"Train reward margins -?\d+\.\d{3}, Val reward margins -?\d+\.\d{3}")
    assert [re.fullmatch(pattern, line).groups() for line in lines if line.startswith("Ep ")] == [
        ("1", "000000"), ("2", "000003")]
    assert len(lines) == 4 and lines[1].startswith(format_input(pairs[0]).replace("\n", " "))  # a sample an epoch
    # val = the 4 training pairs: after 3 more AdamW steps the policy prefers chosen over rejected far more
    margins = [c - r for c, r in zip(tracking["val_chosen_rewards"], tracking["val_rejected_rewards"])]
    assert margins[0] > 0 and margins[1] > margins[0] + 0.1, margins
    assert tracking["val_losses"][1] < tracking["val_losses"][0] < LN2 + 1e-3
    seen = tracking["tokens_seen"]  # chosen tokens only: 2 rows a step, each step adds 2 * its width
    assert all(n % 2 == 0 for n in seen) and seen[0] <= 2 * 49 and seen[1] <= 4 * 2 * 49
    # the reference model is untouched and, with the reference under no_grad, gets no gradients either
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    assert all(p.grad is None for p in reference.parameters())

    samples = []
    monkeypatch.setattr("sft.dpo.generate_and_print_sample", lambda *args: samples.append(args))
    cached_tracking, cached_lines = run(None)  # reference_model=None: the batches' cached log-probs
    assert len(cached_lines) == 2 and len(samples) == 2 and samples[0][1:] == (
        tokenizer, torch.device("cpu"), format_input(pairs[0]))
    for key, values in tracking.items():
        assert cached_tracking[key] == pytest.approx(values, abs=1e-4), key


def test_cached_reference_logprobs_equal_recomputed(tokenizer, models, pref_data, short_pairs):
    reference, policy = models
    dataset = PreferenceDataset(short_pairs, tokenizer)
    chosen, rejected = cache_reference_logprobs(reference, dataset, batch_size=5)
    torch.manual_seed(0)
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=custom_collate_fn)
    for batch in shuffled:  # the cache follows each example, whatever the batch order and padding
        with torch.no_grad():
            ref_c = compute_logprobs(reference(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
            ref_r = compute_logprobs(reference(batch["rejected"]), batch["rejected"], batch["rejected_mask"])
        assert torch.allclose(batch["reference_chosen_logprobs"], ref_c, atol=1e-5)
        assert torch.allclose(batch["reference_rejected_logprobs"], ref_r, atol=1e-5)
    ordered = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=custom_collate_fn)
    again = reference_logprobs(reference, ordered)
    assert torch.allclose(again[0], chosen, atol=1e-5) and torch.allclose(again[1], rejected, atol=1e-5)
    with pytest.raises(ValueError, match="shuffles"):
        reference_logprobs(reference, shuffled)
    with pytest.raises(ValueError, match=r"examples \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \.\.\. have no answer token"):
        reference_logprobs(reference, dataset, allowed_max_length=30)  # every prompt here has >= 31 tokens
    # with a different policy, the cached loss equals the two-model loss
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.out_head.weight.mul_(1.5)
        batch = next(iter(ordered))
        two_models = compute_dpo_loss_batch(batch, other, reference, beta=0.1)
        cached = compute_dpo_loss_batch(batch, other, None, beta=0.1)
    assert abs(two_models[0].item() - LN2) > 1e-4
    assert [v.item() for v in cached] == pytest.approx([v.item() for v in two_models], abs=1e-5)
    plain = custom_collate_fn(PreferenceDataset(pref_data[:2], tokenizer).encoded_texts)
    with pytest.raises(KeyError, match="cache_reference_logprobs"):
        compute_dpo_loss_batch(plain, other, None, beta=0.1)


# ---------------------------------------------------------------- data

PAIR = {"instruction": "Name a color.", "input": "", "chosen": "Red, perhaps.", "rejected": "Red, obviously."}


def problems_of(source, **kwargs):
    with pytest.raises(DataValidationError) as info:
        load_preference_data(source, **kwargs)
    return info.value.problems, str(info.value)


def test_bundled_file_loads_whole_with_six_identical_pairs(pref_data):
    with open(BUNDLED_PREFERENCE_DATA, encoding="utf-8") as f:
        raw = json.load(f)
    assert pref_data == raw and len(pref_data) == 1100
    assert identical_pairs(pref_data) == BOOK_IDENTICAL
    dropped = load_preference_data(identical="drop")
    assert len(dropped) == 1094 and identical_pairs(dropped) == []
    problems, _ = problems_of(None, identical="error")
    assert problems == [f"entry {i}: 'chosen' and 'rejected' are identical" for i in BOOK_IDENTICAL]
    problems, message = problems_of(None, duplicates="error")
    assert len(problems) == 25 and all("duplicate of entry" in p for p in problems) and "duplicates='keep'" in message
    assert len(load_preference_data(duplicates="drop")) == 1075


def test_every_problem_named_by_entry_and_key_together():
    bad = [
        PAIR,
        {"instruction": "Q", "chosen": "A"},                               # 1: rejected missing
        {"instruction": "Q", "input": "x", "chosen": "  ", "rejected": 3},  # 2: empty, wrong type
        ["not", "an", "object"],                                           # 3
        {"input": "x", "chosen": None, "rejected": "B"},                   # 4: instruction missing, None
        {"instruction": "Q5", "chosen": "A <|endoftext|>", "rejected": "B"},  # 5
    ]
    problems, message = problems_of(json.dumps(bad).encode())
    assert problems == [
        "entry 1: missing 'rejected'",
        "entry 2: 'chosen' is empty",
        "entry 2: 'rejected' is int, expected a string",
        "entry 3: is list, expected an object with instruction/input/output",
        "entry 4: missing 'instruction'",
        "entry 4: 'chosen' is NoneType, expected a string",
        "entry 5: 'chosen' contains the special token text <|endoftext|>",
    ]
    assert message.startswith("uploaded data: 7 problems found; nothing loaded:")


def test_identical_pairs_in_uploads_error_by_default_keep_or_drop(tmp_path):
    same = {"instruction": "Say hi.", "chosen": "Hi.", "rejected": "Hi."}
    raw = json.dumps([PAIR, same]).encode()
    problems, message = problems_of(raw)
    assert problems == ["entry 1: 'chosen' and 'rejected' are identical"] and "identical='keep'" in message
    kept = load_preference_data(raw, identical="keep")
    assert kept == [PAIR, {**same, "input": ""}]  # `output` is optional; a missing `input` becomes ""
    assert load_preference_data(raw, identical="drop") == [PAIR]
    with pytest.raises(ValueError, match="identical must be"):
        load_preference_data(raw, identical="maybe")


def test_jsonl_paths_and_uploads(tmp_path):
    rows = [PAIR, {**PAIR, "instruction": "Name a fruit.", "output": "Apple."}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    path = tmp_path / "prefs.jsonl"
    path.write_text(text, encoding="utf-8")
    assert load_preference_data(path) == rows
    assert load_preference_data(str(path)) == rows
    assert load_preference_data(text.encode()) == rows
    upload = io.BytesIO(json.dumps(rows).encode())
    upload.name = "prefs.json"
    assert load_preference_data(upload) == rows
    bad_line = text + '{"instruction": \n'
    problems, _ = problems_of(bad_line.encode())
    assert problems[0].startswith("line 3, column")
    with pytest.raises(FileNotFoundError, match="preference data file not found"):
        load_preference_data(tmp_path / "missing.json")


def test_empty_and_non_list_top_levels_are_clear_errors():
    assert problems_of(b"[]")[0] == ["no entries: the list is empty"]
    assert problems_of(b"42")[0] == ["top level is int; expected a list of entries"]
    assert "top level is a JSON object" in problems_of(b'{"instruction": "Q",\n "chosen": "A"}')[0][0]
    assert problems_of(b"")[0] == ["the file is empty"]
    assert "not UTF-8" in problems_of(b"\xff\xfe[]")[0][0]
