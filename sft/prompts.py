"""Prompt styles: how an {instruction, input, output} entry becomes training text.

The chapter formats entries in the Alpaca style (``format_input``, section 7.2);
exercise 7.1 swaps in the Phi-3 style. Each style here is a small class in a name
registry, so a third style is a few lines:

    @register_prompt_style
    class Plain(PromptStyle):
        name = "plain"
        response_prefix = "\\nAnswer: "
        def prompt_segments(self, entry):
            return [("instruction", "Question: " + entry["instruction"])]

A style also says where the response starts *in tokens* (``split_ids``), so masking
(exercise 7.2), batch anatomy and response extraction never search strings.
"""

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_input(entry):
    """Chapter 7: the Alpaca prompt for ``entry`` (instruction, plus the input if non-empty)."""
    instruction_text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    # Not in the book: a missing `input` key counts as empty (Alpaca-52K style entries).
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def format_input_phi(entry):
    """Exercise 7.1: the Phi-3 prompt for ``entry`` (the book's solution's name)."""
    instruction_text = f"<|user|>\n{entry['instruction']}"
    input_text = f"\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


class PromptStyle:
    """Base class. Subclasses set ``name``, ``response_prefix`` and ``prompt_segments``."""

    name = "base"
    response_prefix = ""  # text between the prompt and the output, e.g. "\n\n### Response:\n"

    def prompt_segments(self, entry):
        """[(role, text), ...] whose concatenation is the prompt; roles: "instruction", "input"."""
        raise NotImplementedError

    def format_prompt(self, entry):
        """The text the model sees before it answers."""
        return "".join(text for _, text in self.prompt_segments(entry))

    def format_response(self, entry):
        """The text the model learns to produce: the response prefix plus the output."""
        return self.response_prefix + entry["output"]

    def format_example(self, entry):
        """Prompt and response together: one training example as text."""
        return self.format_prompt(entry) + self.format_response(entry)

    def segments(self, entry):
        """[(role, text), ...] for the whole example; the last one is ("response", ...)."""
        return self.prompt_segments(entry) + [("response", self.format_response(entry))]

    def extract_response(self, generated_text, prompt_text):
        """The answer inside ``generated_text`` (prompt + continuation), as the chapter does it.

        The chapter cuts off the prompt by length, removes the response marker and strips.
        """
        marker = self.response_prefix.strip()
        answer = generated_text[len(prompt_text):]
        return (answer.replace(marker, "") if marker else answer).strip()

    def split_ids(self, entry, tokenizer):
        """Token ids of the whole example, split where the response starts.

        Returns ``(prompt_ids, response_ids)`` with ``prompt_ids + response_ids ==
        tokenizer.encode(format_example(entry))``: the chapter tokenizes the whole text at
        once, and so do we. ``response_ids`` normally begins with the response prefix's
        tokens. BPE may merge across the boundary (e.g. a prompt ending in spaces); then the
        token straddling it goes to the response, so masking never hides response text.
        """
        full_ids = tokenizer.encode(self.format_example(entry))
        n = prompt_token_count(self.format_prompt(entry), full_ids, tokenizer)
        return full_ids[:n], full_ids[n:]

    def __repr__(self):
        return f"{type(self).__name__}()"


def prompt_token_count(prompt_text, full_ids, tokenizer):
    """How many leading tokens of ``full_ids`` belong wholly to ``prompt_text``."""
    prompt_ids = tokenizer.encode(prompt_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:  # the usual case: a clean boundary
        return len(prompt_ids)
    # Not in the book: a merge crossed the boundary; count tokens whose bytes end inside the prompt.
    limit, end, n = len(prompt_text.encode("utf-8")), 0, 0
    for token in full_ids:
        end += len(tokenizer.decode_single_token_bytes(token))
        if end > limit:
            break
        n += 1
    return n


PROMPT_STYLES = {}


def register_prompt_style(cls):
    """Class decorator: make ``cls`` available to ``get_prompt_style(cls.name)``."""
    PROMPT_STYLES[cls.name] = cls
    return cls


@register_prompt_style
class Alpaca(PromptStyle):
    """The chapter's style (section 7.2): Stanford Alpaca's template."""

    name = "alpaca"
    response_prefix = "\n\n### Response:\n"

    def prompt_segments(self, entry):
        segments = [("instruction", f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}")]
        if entry.get("input"):
            segments.append(("input", f"\n\n### Input:\n{entry['input']}"))
        return segments

    def format_prompt(self, entry):
        return format_input(entry)  # the chapter's function itself, so the two can never drift


@register_prompt_style
class Phi3(PromptStyle):
    """Exercise 7.1: Microsoft Phi-3's chat markers, as the book's solution writes them."""

    name = "phi3"
    response_prefix = "\n<|assistant|>:\n"

    def prompt_segments(self, entry):
        segments = [("instruction", f"<|user|>\n{entry['instruction']}")]
        if entry.get("input"):
            segments.append(("input", f"\n{entry['input']}"))
        return segments

    def format_prompt(self, entry):
        return format_input_phi(entry)  # the exercise's function itself


def get_prompt_style(name="alpaca"):
    """A ``PromptStyle`` by name ("alpaca", "phi3"); an instance is passed through."""
    if isinstance(name, PromptStyle):
        return name
    if isinstance(name, type) and issubclass(name, PromptStyle):
        return name()
    key = str(name).lower().replace("-", "").replace("_", "")
    for style_name, cls in PROMPT_STYLES.items():
        if style_name.replace("-", "").replace("_", "") == key:
            return cls()
    raise ValueError(f"unknown prompt style {name!r}; choose one of {sorted(PROMPT_STYLES)}")


def split_ids(entry, tokenizer, prompt_style="alpaca"):
    """``(prompt_ids, response_ids)`` of ``entry`` in ``prompt_style``; see ``PromptStyle.split_ids``."""
    return get_prompt_style(prompt_style).split_ids(entry, tokenizer)
