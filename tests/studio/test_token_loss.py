"""Where the loss comes from, token by token (sft.studio.token_loss): the per-position losses are the
chapter's loss taken apart, through the same collate and masks as training."""
import pytest
import torch

from sft.batching import InstructionDataset, custom_collate_fn
from sft.model import GPTModel, model_config
from sft.studio.token_loss import compare_examples, explain_example, position_losses, role_summary
from sft.training import calc_loss_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(123)
    return GPTModel(model_config("tiny")).eval()


@pytest.mark.parametrize("mask_instruction", [False, True])
def test_the_masked_mean_of_the_position_losses_is_calc_loss_batch(tiny, tokenizer, instruction_data,
                                                                  mask_instruction):
    data = InstructionDataset(instruction_data[:6], tokenizer, mask_instruction=mask_instruction)
    inputs, targets = custom_collate_fn([data[i] for i in range(6)], allowed_max_length=200)
    losses, _ = position_losses(tiny, inputs, targets)
    counted = targets != -100
    assert (losses[~counted] == 0).all()
    with torch.no_grad():
        expected = calc_loss_batch(inputs, targets, tiny, "cpu")
    assert losses[counted].mean().item() == pytest.approx(expected.item(), rel=1e-6)


def test_explain_example_shows_what_was_trained(tiny, tokenizer, instruction_data):
    entry = instruction_data[50]  # the chapter's example: "Identify the correct spelling ..." / "Ocassion"
    cells = explain_example(tiny, entry, tokenizer, mask_instruction=True)
    ids = tokenizer.encode(
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{entry['instruction']}\n\n### Input:\n{entry['input']}\n\n### Response:\n"
        f"{entry['output']}")
    assert [c["token_id"] for c in cells] == ids  # one example alone: no padding, its own tokens
    assert cells[-1]["target_id"] == 50256 and cells[-1]["in_loss"] and cells[-1]["target_role"] == "end-of-text"
    trained = [c for c in cells if c["in_loss"]]
    assert all(c["target_role"] in ("response", "end-of-text") for c in trained)  # masking: only the answer
    assert {c["role"] for c in cells} >= {"instruction", "input", "response"}
    masked = [c for c in cells if not c["in_loss"]]
    assert masked and all(c["loss"] is None and 0 < c["prob"] < 1 for c in masked)  # greyed, still guessed
    with torch.no_grad():
        one = custom_collate_fn([InstructionDataset([entry], tokenizer, mask_instruction=True)[0]])
        expected = calc_loss_batch(*one, tiny, "cpu").item()
    assert sum(c["loss"] for c in trained) / len(trained) == pytest.approx(expected, rel=1e-6)
    first = trained[0]
    assert len(first["top"]) == 5 and first["top"][0][1] >= first["top"][-1][1]
    assert first["prob"] == pytest.approx(torch.exp(torch.tensor(-first["loss"])).item(), rel=1e-5)


def test_compare_examples_gives_the_change_fine_tuning_made(tiny, tokenizer, instruction_data):
    tuned = GPTModel(model_config("tiny")).eval()
    tuned.load_state_dict(tiny.state_dict())
    with torch.no_grad():  # make the end-of-text far more likely everywhere
        tuned.out_head.weight[50256] += 3.0 * tuned.final_norm.scale.sign()
    rows = compare_examples(tiny, tuned, instruction_data[0], tokenizer)
    eot = [r for r in rows if r["target_role"] == "end-of-text" and r["in_loss"]]
    assert eot and eot[0]["logprob_change"] > 0
    same = compare_examples(tiny, tiny, instruction_data[0], tokenizer)
    assert all(r["logprob_change"] == 0 for r in same if r["logprob_change"] is not None)


def test_role_summary_counts_what_masking_leaves_unlearnt(tiny, tokenizer, instruction_data):
    entries = instruction_data[:10]
    plain = role_summary(tiny, entries, tokenizer, mask_instruction=False)
    masked = role_summary(tiny, entries, tokenizer, mask_instruction=True)
    assert plain["instruction"]["targets"] == plain["instruction"]["trained"] > 0
    assert masked["instruction"]["targets"] == plain["instruction"]["targets"] and masked["instruction"]["trained"] == 0
    assert masked["response"]["trained"] == masked["response"]["targets"] > 0
    assert plain["end-of-text"]["targets"] == 10  # one end-of-text target per example
    assert plain["response"]["mean_loss"] == pytest.approx(masked["response"]["mean_loss"], rel=1e-6)
