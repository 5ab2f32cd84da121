"""The chapter's generation functions: greedy decoding, sampling's rule, stopping, response extraction."""
import torch

from sft.generation import extract_response, generate, generate_text_simple
from sft.model import GPTModel, model_config


def test_generate_text_simple_is_generate_greedy():
    torch.manual_seed(123)
    model = GPTModel(model_config("tiny")).eval()
    prompt = torch.tensor([[15496, 11, 314, 716]])  # "Hello, I am"
    out = generate_text_simple(model, prompt, max_new_tokens=6, context_size=256)
    assert out.shape == (1, 10) and out[0, :4].tolist() == prompt[0].tolist()
    assert torch.equal(generate(model, prompt, 6, 256), out)
    # each new token is the argmax of the model's last position
    with torch.no_grad():
        assert model(out[:, :4])[0, -1].argmax().item() == out[0, 4].item()


def test_generate_stops_before_the_end_of_text_token():
    torch.manual_seed(1)
    model = GPTModel(model_config("tiny")).eval()
    prompt = torch.tensor([[10, 20, 30]])
    free = generate(model, prompt, 5, 256)
    stop_at = free[0, 4].item()  # the second new token
    assert generate(model, prompt, 5, 256, eos_id=stop_at)[0].tolist() == free[0, :4].tolist()


def test_extract_response_chapter_example():
    input_text = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n"
        "### Input:\nThe car is very fast."
    )
    generated = input_text + "\n\n### Response:\nThe car is as fast as lightning."
    assert extract_response(generated, input_text) == "The car is as fast as lightning."


