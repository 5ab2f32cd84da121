"""Not in the book: talking to a model one message at a time, the answer streamed as it is written.

GPT-2 fine-tuned as in chapter 7 is single-turn: it saw one prompt (an instruction and maybe an
input, in a prompt style) and learnt to answer it, then write ``<|endoftext|>``. So each message
is answered on its own: ``chat_prompt`` builds the exact text the model receives, and
``stream_reply`` yields the answer's text piece by piece through the KV-cache generator
(``sft.fast.decode.generate_stream``), stopping at end-of-text or where the model starts writing
a next instruction (an under-trained model may).
"""
from ..fast.decode import generate_stream
from ..prompts import get_prompt_style
from ..tokenizer import EOT_ID


def chat_prompt(instruction, input_text="", prompt_style="alpaca"):
    """The text the model receives for one message: the style's prompt plus its response prefix."""
    style = get_prompt_style(prompt_style)
    return style.format_prompt({"instruction": instruction, "input": input_text or ""}) + style.response_prefix


def stop_markers(prompt_style="alpaca"):
    """Texts after which an answer is over: the header that opens the style's next instruction."""
    style = get_prompt_style(prompt_style)
    segments = style.prompt_segments({"instruction": "\x00", "input": ""})
    head = segments[0][1].split("\x00")[0].strip()  # e.g. "...### Instruction:" or "<|user|>"
    return [head.splitlines()[-1]] if head else []


def stream_reply(model, tokenizer, prompt, *, max_new_tokens=256, temperature=0.0, top_k=None,
                 stops=(), eos_id=EOT_ID):
    """Yield the answer to ``prompt`` as text pieces, as its tokens come.

    Pieces are whole characters (a character split over two tokens waits for the second), and the
    answer ends at ``eos_id`` or before the first of ``stops`` it writes. Greedy by default;
    ``temperature``/``top_k`` sample as the chapter's ``generate`` does.
    """
    ids = tokenizer.encode(prompt, allowed_special="all")
    new, shown = [], ""
    for token in generate_stream(model, ids, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                 temperature=temperature, top_k=top_k):
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue  # half a character: wait for the rest
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut > len(shown):
                yield text[len(shown):cut]
            return
        held = max((len(s) - 1 for s in stops), default=0)  # a stop marker may be half written
        ready = text[:max(len(shown), len(text) - held)] if held else text
        if len(ready) > len(shown):
            yield ready[len(shown):]
            shown = ready
    text = tokenizer.decode(new)
    if len(text) > len(shown):
        yield text[len(shown):].rstrip("\ufffd")
