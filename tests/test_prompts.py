"""Prompt styles: the chapter's Alpaca text exactly, Phi-3 as exercise 7.1, and token boundaries."""
import pytest

from sft.prompts import (
    PROMPT_STYLES, Alpaca, Phi3, PromptStyle, format_input, get_prompt_style, prompt_token_count,
    register_prompt_style,
)

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def test_entry_50_with_input(instruction_data):
    entry = instruction_data[50]
    assert entry["instruction"] == "Identify the correct spelling of the following word."
    assert entry["input"] == "Ocassion"
    assert format_input(entry) == (
        PREAMBLE + "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion"
    )
    assert Alpaca().format_response(entry) == "\n\n### Response:\n" + entry["output"]
    assert Alpaca().format_response(entry) == "\n\n### Response:\nThe correct spelling is 'Occasion.'"


def test_entry_999_without_input(instruction_data):
    entry = instruction_data[999]
    assert entry["input"] == ""
    assert format_input(entry) == PREAMBLE + "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
    assert "### Input" not in format_input(entry)


def test_missing_input_key_counts_as_empty():
    entry = {"instruction": "Say hi.", "output": "Hi."}
    assert format_input(entry) == PREAMBLE + "\n\n### Instruction:\nSay hi."
    assert Phi3().format_prompt(entry) == "<|user|>\nSay hi."


def test_alpaca_style_is_the_chapter_format(instruction_data):
    style = get_prompt_style("alpaca")
    assert style.response_prefix == "\n\n### Response:\n"
    for entry in instruction_data[:50]:
        assert style.format_prompt(entry) == format_input(entry)
        assert style.format_example(entry) == format_input(entry) + f"\n\n### Response:\n{entry['output']}"


def test_phi3_matches_the_exercise_solution(instruction_data):
    style = get_prompt_style("phi3")
    entry = instruction_data[50]
    assert style.format_prompt(entry) == "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
    assert style.format_response(entry) == "\n<|assistant|>:\nThe correct spelling is 'Occasion.'"
    assert style.format_prompt(instruction_data[999]) == "<|user|>\nWhat is an antonym of 'complicated'?"


@pytest.mark.parametrize("name", ["alpaca", "phi3"])
def test_segments_rebuild_the_example(instruction_data, name):
    style = get_prompt_style(name)
    for entry in instruction_data[45:60]:
        segments = style.segments(entry)
        assert "".join(text for _, text in segments) == style.format_example(entry)
        roles = [role for role, _ in segments]
        assert roles == (["instruction", "input", "response"] if entry["input"] else ["instruction", "response"])


def test_registry():
    assert set(PROMPT_STYLES) >= {"alpaca", "phi3"}
    assert isinstance(get_prompt_style("alpaca"), Alpaca)
    assert isinstance(get_prompt_style("Phi-3"), Phi3)
    style = Phi3()
    assert get_prompt_style(style) is style
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'.*alpaca"):
        get_prompt_style("chatml")


def test_a_third_style_is_a_few_lines(tokenizer):
    @register_prompt_style
    class Plain(PromptStyle):
        name = "plain-test"
        response_prefix = "\nAnswer: "

        def prompt_segments(self, entry):
            return [("instruction", "Question: " + entry["instruction"])]

    try:
        style = get_prompt_style("plain-test")
        entry = {"instruction": "2+2?", "input": "", "output": "4"}
        assert style.format_example(entry) == "Question: 2+2?\nAnswer: 4"
        prompt_ids, response_ids = style.split_ids(entry, tokenizer)
        assert tokenizer.decode(response_ids) == "\nAnswer: 4"
    finally:
        PROMPT_STYLES.pop("plain-test")


def test_extract_response_as_the_chapter():
    style = Alpaca()
    prompt = "PROMPT"
    assert style.extract_response(prompt + "\n\n### Response:\nThe answer.", prompt) == "The answer."
    assert Phi3().extract_response(prompt + "\n<|assistant|>:\n  Four. ", prompt) == "Four."


@pytest.mark.parametrize("name", ["alpaca", "phi3"])
def test_split_ids_is_the_whole_text_split_at_the_response(instruction_data, tokenizer, name):
    style = get_prompt_style(name)
    prefix_ids = tokenizer.encode(style.response_prefix)
    for entry in instruction_data[:100]:
        prompt_ids, response_ids = style.split_ids(entry, tokenizer)
        assert prompt_ids + response_ids == tokenizer.encode(style.format_example(entry))
        assert prompt_ids == tokenizer.encode(style.format_prompt(entry))
        assert response_ids[: len(prefix_ids)] == prefix_ids


class _Completion(PromptStyle):
    """A style with no response prefix: the response may continue the prompt's last word."""

    name = "completion-test"

    def prompt_segments(self, entry):
        return [("instruction", entry["instruction"])]


def test_split_ids_when_bpe_merges_across_the_boundary(tokenizer):
    # "Count the cat" + "s, please." tokenizes " cats" as one token that straddles the seam.
    entry = {"instruction": "Count the cat", "input": "", "output": "s, please."}
    style = _Completion()
    prompt = style.format_prompt(entry)
    full_ids = tokenizer.encode(style.format_example(entry))
    prompt_alone = tokenizer.encode(prompt)
    assert full_ids[: len(prompt_alone)] != prompt_alone  # the seam really moved
    prompt_ids, response_ids = style.split_ids(entry, tokenizer)
    assert prompt_ids + response_ids == full_ids
    # Prompt tokens lie wholly inside the prompt; the straddling token goes to the response.
    assert tokenizer.decode(prompt_ids) == "Count the"
    assert tokenizer.decode(response_ids) == " cats, please."
    assert prompt_token_count(prompt, full_ids, tokenizer) == len(prompt_ids) == 2


def test_module_level_split_ids(instruction_data, tokenizer):
    from sft.prompts import split_ids

    entry = instruction_data[999]
    assert split_ids(entry, tokenizer) == Alpaca().split_ids(entry, tokenizer)
    assert split_ids(entry, tokenizer, "phi3") == Phi3().split_ids(entry, tokenizer)
