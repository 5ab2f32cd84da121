"""Batches to the digit: the chapter's toy batch, cross-entropy demo and loader shapes, plus masking."""
import pytest
import torch

from sft.batching import (
    CHECK_KINDS, InstructionDataset, LengthGroupedBatchSampler, batch_anatomy, create_data_loaders,
    custom_collate_draft_1, custom_collate_draft_2, custom_collate_fn, get_batch, pretraining_checks,
)
from sft.data import split_data
from sft.prompts import format_input

TOY = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
P = 50256


@pytest.fixture(scope="module")
def splits(instruction_data):
    return split_data(instruction_data)  # train, test, val


@pytest.fixture(scope="module")
def loaders(splits, tokenizer):
    train, test, val = splits
    torch.manual_seed(123)
    return create_data_loaders(train, val, test, tokenizer)


# ---------------------------------------------------------------- the chapter's toy batch

def test_draft_1():
    assert custom_collate_draft_1(TOY).tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]


def test_draft_2():
    inputs, targets = custom_collate_draft_2(TOY)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]
    assert targets.tolist() == [[1, 2, 3, 4, P], [6, P, P, P, P], [8, 9, P, P, P]]


def test_final_collate():
    inputs, targets = custom_collate_fn(TOY)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]
    assert targets.tolist() == [[1, 2, 3, 4, P], [6, P, -100, -100, -100], [8, 9, P, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.int64
    assert TOY == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the batch itself is not modified


def test_collate_options():
    inputs, targets = custom_collate_fn(TOY, pad_token_id=0, ignore_index=-1, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 0], [7, 8, 9]]
    # pad id 0 is also a real token here: the first 0 in each target row counts, later ones are ignored
    assert targets.tolist() == [[1, 2, 3], [6, 0, -1], [8, 9, 0]]


def test_cross_entropy_demo():
    logits_1 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5]])
    targets_1 = torch.tensor([0, 1])
    loss_1 = torch.nn.functional.cross_entropy(logits_1, targets_1)
    assert round(loss_1.item(), 4) == 1.1269

    logits_2 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    loss_2 = torch.nn.functional.cross_entropy(logits_2, torch.tensor([0, 1, 1]))
    assert round(loss_2.item(), 4) == 0.7936

    loss_3 = torch.nn.functional.cross_entropy(logits_2, torch.tensor([0, 1, -100]))
    assert round(loss_3.item(), 4) == 1.1269
    assert loss_3.item() == loss_1.item()


# ---------------------------------------------------------------- the dataset and listing 7.6

def test_instruction_dataset_as_the_chapter(instruction_data, tokenizer):
    entries = instruction_data[48:52]
    dataset = InstructionDataset(entries, tokenizer)
    assert len(dataset) == 4
    for i, entry in enumerate(entries):
        text = format_input(entry) + f"\n\n### Response:\n{entry['output']}"
        assert dataset[i] == tokenizer.encode(text)
        assert dataset.encoded_texts[i] == dataset[i]


def test_train_loader_first_batches(loaders):
    train_loader = loaders[0]
    shapes = []
    for inputs, targets in train_loader:
        assert inputs.shape == targets.shape
        shapes.append(list(inputs.shape))
        if len(shapes) == 3:
            break
    assert shapes == [[8, 61], [8, 76], [8, 73]]
    assert len(train_loader) == 116  # 935 // 8, the last partial batch dropped


def test_validation_loader_shapes(loaders):
    val_loader = loaders[1]
    shapes = [tuple(inputs.shape) for inputs, _ in val_loader]
    assert shapes == [(8, 74), (8, 76), (8, 74), (8, 68), (8, 61), (8, 62), (7, 59)]
    assert [tuple(t.shape) for _, t in val_loader] == shapes
    assert len(loaders[2].dataset) == 110


def test_create_data_loaders_seeds_like_listing_7_6(splits, tokenizer):
    train, test, val = splits
    torch.manual_seed(999)  # create_data_loaders seeds with 123 itself, as the listing does
    train_loader, _, _ = create_data_loaders(train, val, test, tokenizer)
    first = next(iter(train_loader))[0]
    assert list(first.shape) == [8, 61]


# ---------------------------------------------------------------- instruction masking (exercise 7.2)

def test_masking_off_is_the_chapter(instruction_data, tokenizer):
    entries = instruction_data[:4]
    plain = InstructionDataset(entries, tokenizer)
    masked = InstructionDataset(entries, tokenizer, mask_instruction=True)
    assert masked[0] == (plain.prompt_lengths[0], plain[0])
    assert plain.prompt_lengths == [len(tokenizer.encode(format_input(e))) for e in entries]
    inputs_a, targets_a = custom_collate_fn([plain[i] for i in range(4)])
    inputs_b, targets_b = custom_collate_fn([masked[i] for i in range(4)])
    assert torch.equal(inputs_a, inputs_b)
    for row, n in enumerate(plain.prompt_lengths):
        # masking changes exactly the targets that predict prompt tokens 1..n-1
        assert (targets_b[row, : n - 1] == -100).all()
        assert torch.equal(targets_b[row, n - 1:], targets_a[row, n - 1:])
        assert (targets_a[row, : n - 1] != -100).all()


def test_masking_keeps_response_and_one_end_of_text(instruction_data, tokenizer):
    entry = instruction_data[50]
    dataset = InstructionDataset([entry], tokenizer, mask_instruction=True)
    prompt_length, ids = dataset[0]
    _, targets = custom_collate_fn([dataset[0], [1] * (len(ids) + 3)])
    trained = [t for t in targets[0].tolist() if t != -100]
    assert trained == ids[prompt_length:] + [P]
    assert tokenizer.decode(trained[:-1]) == "\n\n### Response:\nThe correct spelling is 'Occasion.'"


def test_masked_loaders_keep_the_chapter_shapes(splits, tokenizer):
    train, test, val = splits
    _, val_loader, _ = create_data_loaders(train, val, test, tokenizer, mask_instruction=True)
    shapes = [tuple(inputs.shape) for inputs, _ in val_loader]
    assert shapes == [(8, 74), (8, 76), (8, 74), (8, 68), (8, 61), (8, 62), (7, 59)]
    inputs, targets = next(iter(val_loader))
    assert int((targets == P).sum()) == 8  # one trained end-of-text per example


def test_phi3_dataset(instruction_data, tokenizer):
    dataset = InstructionDataset(instruction_data[50:51], tokenizer, prompt_style="phi3")
    assert tokenizer.decode(dataset[0]) == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
        "\n<|assistant|>:\nThe correct spelling is 'Occasion.'")


# ---------------------------------------------------------------- Not in the book: grouped batches

def test_length_grouped_sampler_is_seeded_and_complete():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 51, 4]
    a = LengthGroupedBatchSampler(lengths, 2, drop_last=True, seed=1, bucket_batches=100)
    b = LengthGroupedBatchSampler(lengths, 2, drop_last=True, seed=1, bucket_batches=100)
    epoch_0 = list(a)
    assert epoch_0 == list(b) and len(epoch_0) == len(a) == 5
    assert len({i for batch in epoch_0 for i in batch}) == 10
    # one bucket, sorted by length and cut into pairs; the shortest (4) is the partial batch dropped
    assert sorted(sorted(lengths[i] for i in batch) for batch in epoch_0) == [
        [5, 6], [7, 8], [9, 47], [48, 49], [50, 51]]
    assert list(a) != epoch_0  # the next epoch reshuffles
    full = LengthGroupedBatchSampler(lengths, 3, shuffle=False)
    assert sorted(i for batch in full for i in batch) == list(range(11)) and len(full) == 4


def test_group_by_length_cuts_padding(splits, tokenizer):
    train, test, val = splits
    plain, _, _ = create_data_loaders(train, val, test, tokenizer)
    grouped, grouped_val, _ = create_data_loaders(train, val, test, tokenizer, group_by_length=True)
    plain_cells = sum(x.numel() for x, _ in plain)
    grouped_cells = sum(x.numel() for x, _ in grouped)
    assert len(grouped) == len(plain) == 116
    assert grouped_cells < 0.9 * plain_cells
    # validation is untouched
    assert [tuple(x.shape) for x, _ in grouped_val][-1] == (7, 59)


# ---------------------------------------------------------------- get_batch and batch_anatomy

def test_get_batch_matches_the_loader(splits, tokenizer):
    train, test, val = splits
    torch.manual_seed(123)
    train_loader, val_loader, _ = create_data_loaders(train, val, test, tokenizer)
    state = torch.get_rng_state()
    batches = [b for _, b in zip(range(3), train_loader)]
    for k in range(3):
        got = get_batch(train, tokenizer, batch_number=k)
        assert torch.equal(got["inputs"], batches[k][0]) and torch.equal(got["targets"], batches[k][1])
        assert got["entries"] == [train[i] for i in got["indices"]]
    val_last = get_batch(val, tokenizer, batch_number=6, shuffle=False)
    assert val_last["indices"] == list(range(48, 55)) and tuple(val_last["inputs"].shape) == (7, 59)
    with pytest.raises(IndexError, match="batch 7 out of range"):
        get_batch(val, tokenizer, batch_number=7, shuffle=False)
    torch.set_rng_state(state)


def test_get_batch_leaves_the_global_rng_alone(splits, tokenizer):
    state = torch.get_rng_state()
    get_batch(splits[0], tokenizer, batch_number=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_anatomy_roles_and_loss(instruction_data, tokenizer):
    entries = [instruction_data[50], instruction_data[999]]  # with input, without
    inputs, targets = custom_collate_fn(InstructionDataset(entries, tokenizer))
    anatomy = batch_anatomy(inputs, targets, tokenizer, entries=entries)
    B, T = inputs.shape
    assert (anatomy["rows"], anatomy["cols"], len(anatomy["cells"])) == (B, T, B * T)
    roles = anatomy["roles"]
    for row, entry in enumerate(entries):
        n = len(tokenizer.encode(format_input(entry) + "\n\n### Response:\n" + entry["output"]))
        text = {role: "".join(c["token_text"] for c in anatomy["cells"] if c["row"] == row and c["role"] == role)
                for role in ("instruction", "input", "response")}
        assert text["instruction"].endswith("### Instruction:\n" + entry["instruction"])
        assert text["input"] == (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")
        assert text["response"] == "\n\n### Response:\n" + entry["output"]
        assert roles[row][n:] == (["end-of-text"] + ["padding"] * (T - n - 1) if n < T else [])
    longer, shorter = (0, 1) if len(roles[0]) and roles[0][-1] != "padding" else (1, 0)
    assert "end-of-text" not in roles[longer]  # the longest row's end-of-text is only a target
    cells = {(c["row"], c["col"]): c for c in anatomy["cells"]}
    first = cells[(0, 0)]
    assert (first["token_id"], first["token_text"], first["role"]) == (21106, "Below", "instruction")
    assert (first["target_id"], first["target_text"], first["in_loss"]) == (318, " is", True)
    assert anatomy["tokens_in_loss"] == int((targets != -100).sum())
    eot_cell = next(c for c in anatomy["cells"] if c["row"] == shorter and c["role"] == "end-of-text")
    assert (eot_cell["token_id"], eot_cell["target_id"], eot_cell["in_loss"], eot_cell["target_text"]) == (
        P, -100, False, "")


def test_batch_anatomy_without_entries(instruction_data, tokenizer):
    dataset = InstructionDataset(instruction_data[:3], tokenizer, mask_instruction=True)
    inputs, targets = custom_collate_fn([dataset[i] for i in range(3)])
    by_prompt = batch_anatomy(inputs, targets, tokenizer, prompt_lengths=dataset.prompt_lengths)
    full = batch_anatomy(inputs, targets, tokenizer, entries=instruction_data[:3])
    plain = batch_anatomy(inputs, targets, tokenizer)
    for a, b, c in zip(by_prompt["roles"], full["roles"], plain["roles"]):
        assert [r if r in ("end-of-text", "padding", "response") else "prompt" for r in b] == a
        assert [r if r in ("end-of-text", "padding") else "token" for r in a] == c
    # with masking, no prompt cell's target counts except the one predicting the response
    for cell in by_prompt["cells"]:
        nxt = by_prompt["roles"][cell["row"]][cell["col"] + 1] if cell["col"] + 1 < inputs.shape[1] else None
        if cell["role"] == "prompt" and nxt == "prompt":
            assert not cell["in_loss"]


def test_batch_anatomy_rejects_mismatched_entries(instruction_data, tokenizer):
    inputs, targets = custom_collate_fn(InstructionDataset(instruction_data[:2], tokenizer))
    with pytest.raises(ValueError, match="batch row 0"):
        batch_anatomy(inputs, targets, tokenizer, entries=instruction_data[2:4])


# ---------------------------------------------------------------- pre-training checks

def test_pretraining_checks_pass_on_the_chapter_data(splits, tokenizer):
    for mask in (False, True):
        report = pretraining_checks(splits[0][:200], tokenizer, mask_instruction=mask)
        assert report["ok"] and report["problems"] == [] and report["n_examples"] == 200
        assert report["truncated"] == report["not_one_eot"] == report["wholly_masked"] == []
        assert report["n_affected"] == 0 and report["summary"] == []
        assert report["kinds"] == {kind: [] for kind in CHECK_KINDS}
    dataset = InstructionDataset(splits[0][:8], tokenizer)
    _, targets = custom_collate_fn(dataset)
    assert pretraining_checks(dataset, tokenizer)["tokens_in_loss"] == int((targets != -100).sum())


def test_pretraining_checks_name_truncated_and_wholly_masked(instruction_data, tokenizer):
    entries = instruction_data[:3]
    dataset = InstructionDataset(entries, tokenizer, mask_instruction=True)
    lengths = [len(ids) for ids in dataset.encoded_texts]
    prompts = dataset.prompt_lengths
    # cut inside the response of example 0: it loses its end-of-text and the response's tail
    cut = prompts[0] + 3
    report = pretraining_checks(dataset, tokenizer, allowed_max_length=cut)
    assert not report["ok"]
    first = report["truncated"][0]
    response_tokens = lengths[0] - prompts[0] + 1
    assert first == {"index": 0, "length": lengths[0], "prompt_length": prompts[0],
                     "response_tokens": response_tokens, "response_tokens_lost": response_tokens - 4}
    assert 0 in report["not_one_eot"] and 0 in report["kinds"]["cut_in_response"]
    # One line per example, naming each of its problems: the cut, then the end-of-text it loses.
    assert report["problems"][0] == (f"example 0: {lengths[0]} tokens, cut to {cut} inside its response; loses "
                                     f"{response_tokens - 4} of its {response_tokens} response tokens "
                                     "(end-of-text included); 0 trained end-of-text tokens, expected exactly 1")
    assert len(report["problems"]) == report["n_affected"]
    # cut inside the prompt with masking on: nothing left to train
    short = min(prompts) - 5
    report = pretraining_checks(entries, tokenizer, allowed_max_length=short, mask_instruction=True)
    assert report["wholly_masked"] == [0, 1, 2]
    assert all(t["response_tokens_lost"] == t["response_tokens"] for t in report["truncated"])
    assert report["problems"][1].startswith(f"example 1: {lengths[1]} tokens, cut to {short} before its response")
    assert report["problems"][1].endswith("; every target is masked, so it adds nothing to the loss")
    # Three examples, each with three problems (cut, no end-of-text, wholly masked): counted as 3, under one kind.
    assert report["n_affected"] == 3 and len(report["problems"]) == 3
    assert report["kinds"] == {"cut_before_response": [0, 1, 2], "cut_in_response": [], "not_one_eot": [],
                               "wholly_masked": []}
    assert report["summary"] == [
        f"3 of 3 examples are cut to {short} tokens before their response starts: none of the response and no "
        "end-of-text target is left to learn; with the instruction masked, every target is -100, so they add "
        "nothing to the loss"]
    # same cut without masking: prompt targets still train, but no end-of-text is learned
    report = pretraining_checks(entries, tokenizer, allowed_max_length=short)
    assert report["wholly_masked"] == [] and report["not_one_eot"] == [0, 1, 2]
    assert report["summary"][0].endswith("; only their prompt tokens train")


def test_pretraining_checks_count_examples_by_kind_not_problems(splits, tokenizer):
    """allowed_max_length 48 with masking on the chapter's train split: 793 examples are cut (81 before the
    response, 712 inside it); counting each problem (cut, no end-of-text, wholly masked) gave 1667."""
    report = pretraining_checks(splits[0], tokenizer, allowed_max_length=48, mask_instruction=True)
    sizes = {kind: len(found) for kind, found in report["kinds"].items()}
    assert sizes == {"cut_before_response": 81, "cut_in_response": 712, "not_one_eot": 0, "wholly_masked": 0}
    assert report["n_affected"] == len(report["problems"]) == 793 == len(report["truncated"])
    assert len(report["truncated"]) + len(report["not_one_eot"]) + len(report["wholly_masked"]) == 1667
    inside = set(report["kinds"]["cut_in_response"])
    lost = sum(t["response_tokens_lost"] for t in report["truncated"] if t["index"] in inside)
    assert report["summary"][0].startswith("81 of 935 examples are cut to 48 tokens before their response starts")
    assert report["summary"][1].startswith("712 of 935 examples are cut to 48 tokens inside their response")
    assert f"and {lost} of their" in report["summary"][1]


def test_the_exercises_names_as_the_solutions_spell_them(instruction_data, tokenizer):
    from sft import (InstructionDatasetPhi, InstructionDatasetWithMasking, custom_collate_with_masking_fn,
                     format_input_phi)

    entry = instruction_data[50]
    assert format_input_phi(entry) == ("<|user|>\nIdentify the correct spelling of the following word.\n"
                                       "Ocassion")
    phi = InstructionDatasetPhi(instruction_data[:3], tokenizer)
    assert phi[0] == tokenizer.encode(format_input_phi(instruction_data[0]) + "\n<|assistant|>:\n"
                                      + instruction_data[0]["output"])
    masked = InstructionDatasetWithMasking(instruction_data[:3], tokenizer)
    length, ids = masked[1]
    assert ids == InstructionDataset(instruction_data[:3], tokenizer)[1]
    assert ids[:length] == tokenizer.encode(format_input(instruction_data[1]))
    inputs, targets = custom_collate_with_masking_fn([masked[i] for i in range(3)])
    assert (targets[1, :length - 1] == -100).all() and targets[1, length - 1] == ids[length]
    with pytest.raises(ValueError, match="InstructionDatasetWithMasking"):
        custom_collate_with_masking_fn([ids])
