"""An Ollama Modelfile beside a GGUF file, and the commands that turn it into an Ollama model.

Ollama reads the GGUF's weights and tokenizer, but takes the prompt format and sampling
settings from the Modelfile. Its TEMPLATE is a Go text/template: ``{{ .Prompt }}`` is the
user's message, the rest is the prompt style's fixed text (see ``templates.ollama_template``).
"""
import os
import re
import shlex
import unicodedata

from .templates import ollama_template, stop_strings

MODELFILE = "Modelfile"


def ollama_name(name):
    """A valid Ollama model name from any text: lowercase letters, digits, '.', '_' and '-'."""
    text = unicodedata.normalize("NFKD", str(name or "")).encode("ascii", "ignore").decode()  # "é" -> "e"
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")
    return slug or "sft-gpt2"


def _quoted(value):
    """A Modelfile PARAMETER value in double quotes (refused if it holds a quote or newline,
    which Ollama's Modelfile parser would not read back as the same text)."""
    if any(c in value for c in '"\\\n'):
        raise ValueError(f"stop string {value!r} cannot be written in a Modelfile")
    return f'"{value}"'


def modelfile_text(gguf_file, prompt_style, context_length):
    """The Modelfile for ``gguf_file`` (a name in the same folder)."""
    lines = [
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{ollama_template(prompt_style)}"""',
        *(f"PARAMETER stop {_quoted(s)}" for s in stop_strings(prompt_style)),
        "PARAMETER temperature 0",  # greedy, as the chapter evaluates the model
        # Ollama's default context is larger than GPT-2's; past it there are no position embeddings.
        f"PARAMETER num_ctx {context_length}",
    ]
    return "\n".join(lines) + "\n"


def ollama_commands(modelfile_path, name):
    """The shell commands a person runs to use the export in Ollama, in order."""
    name = ollama_name(name)
    folder = os.path.dirname(os.path.abspath(modelfile_path))
    return [
        f"cd {shlex.quote(folder)}",
        f"ollama create {name} -f {MODELFILE}",
        f"ollama run {name}",
    ]
