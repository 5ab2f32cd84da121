"""A prompt style as the chat templates that other programs read.

The fine-tuned model only ever saw ``style.format_prompt(entry) + style.response_prefix``
before an answer, then the answer and ``<|endoftext|>``. A chat program must rebuild exactly
that text from a user message, so the templates are derived from the style itself: the
style formats an entry whose instruction is a marker, and the text around the marker is the
fixed part of the template. Any registered style whose prompt contains the instruction once,
verbatim, works (both built-in ones do).

- ``chat_template``: Jinja, for Hugging Face (``tokenizer_config.json``) and GGUF
  (``tokenizer.chat_template``, read by llama.cpp and llama-cpp-python).
- ``ollama_template``: Go text/template for an Ollama Modelfile (``{{ .Prompt }}``).
"""
from ..prompts import get_prompt_style
from ..tokenizer import ENDOFTEXT

_MARKER = "\x00SFT-INSTRUCTION\x00"  # cannot occur in a style's own text


def prompt_parts(prompt_style):
    """(before, after) such that ``before + instruction + after`` is the full generation prompt
    (``format_prompt`` of an entry with that instruction and no input, plus the response prefix)."""
    style = get_prompt_style(prompt_style)
    text = style.format_prompt({"instruction": _MARKER, "input": ""}) + style.response_prefix
    if text.count(_MARKER) != 1:
        raise ValueError(f"prompt style {style.name!r} does not contain the instruction exactly once; "
                         "it cannot be written as a chat template")
    before, after = text.split(_MARKER)
    return before, after


def render_prompt(prompt_style, instruction):
    """The prompt the templates produce for one user message (what the model should see)."""
    before, after = prompt_parts(prompt_style)
    return before + instruction + after


def stop_strings(prompt_style):
    """Where a generation should stop: end-of-text, and the header of a next instruction
    (the last line of the prompt's fixed text before the instruction: "### Instruction:",
    "<|user|>"), which an under-trained model may start writing after its answer."""
    before, _ = prompt_parts(prompt_style)
    header = before.strip().splitlines()[-1].strip() if before.strip() else ""
    return [ENDOFTEXT] + ([header] if header else [])


def _jinja_literal(text):
    """``text`` as a single-quoted Jinja string literal, e.g. '\\n\\n### Response:\\n'.

    Literals go through ``{{ '...' }}`` rather than raw template text because Hugging Face and
    llama-cpp-python render chat templates with ``trim_blocks``, which would eat the newline
    that starts e.g. "\\n\\n### Response:\\n" right after a ``{% ... %}`` tag.
    """
    escapes = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "'" + "".join(escapes.get(c, c) for c in text) + "'"


def chat_template(prompt_style):
    """A Jinja chat template for ``prompt_style``.

    A user message becomes the style's prompt around its content; an assistant message the
    response prefix, its content and <|endoftext|> (as in training); ``add_generation_prompt``
    adds the response prefix. So [user] + generation prompt renders ``render_prompt``, and
    [user, assistant] renders the training text ``format_example`` + <|endoftext|>. System
    messages are left out: the model was never trained with one.
    """
    style = get_prompt_style(prompt_style)
    before, after = prompt_parts(style)
    prompt_end = after[: len(after) - len(style.response_prefix)]  # text after the instruction, before the prefix

    def joined(*parts):  # one {{ ... }} expression: literals (empty ones left out) and variables
        return "{{ " + " + ".join(p if p == "message['content']" else _jinja_literal(p) for p in parts if p) + " }}"

    content = "message['content']"
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + joined(before, content, prompt_end)
        + "{% elif message['role'] == 'assistant' %}" + joined(style.response_prefix, content, ENDOFTEXT)
        + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + (joined(style.response_prefix) if style.response_prefix else "")
        + "{% endif %}"
    )


def ollama_template(prompt_style):
    """The Modelfile TEMPLATE body: the style's fixed text around ``{{ .Prompt }}``, then
    ``{{ .Response }}``, Ollama's documented place for the answer: it stops the prompt there
    for a new answer and fills in earlier answers of a conversation (empty, it adds nothing)."""
    before, after = prompt_parts(prompt_style)
    for part in (before, after):
        if "{{" in part or "}}" in part or '"""' in part:
            raise ValueError("the prompt style's text contains '{{', '}}' or '\"\"\"', "
                             "which an Ollama TEMPLATE cannot hold literally")
    return before + "{{ .Prompt }}" + after + "{{ .Response }}"
