"""Getting a fine-tuned model out: a Hugging Face folder and GGUF files for llama.cpp / Ollama.

Pure engine code: a caller passes the model (a GPTModel) and a provenance dict; nothing here
knows about runs or the app.

    from sft.export import export_model
    result = export_model(model, "exports/my-model", gguf_dtypes=("f32", "q8_0"),
                          prompt_style="alpaca", name="gpt2-alpaca",
                          provenance={"base_model": "gpt2-medium (355M)", "run": "..."})
    result["commands"]  # ['cd .../gguf', 'ollama create gpt2-alpaca -f Modelfile', 'ollama run gpt2-alpaca']

Layout of ``out_dir``: ``hf/`` (load with transformers' ``from_pretrained``) and ``gguf/``
(``<name>-<dtype>.gguf`` files, a ``Modelfile`` for the first dtype, ``sft-export.json``).
"""
import os

from .gguf import DTYPES, export_gguf
from .hf import export_hf
from .modelfile import ollama_commands, ollama_name
from .templates import chat_template, ollama_template, render_prompt, stop_strings

FORMATS = ("hf", "gguf")

__all__ = ["DTYPES", "FORMATS", "chat_template", "export_gguf", "export_hf", "export_model", "ollama_commands",
           "ollama_name", "ollama_template", "render_prompt", "stop_strings"]


def export_model(model, out_dir, *, formats=FORMATS, gguf_dtypes=("f32",), prompt_style="alpaca",
                 name="sft-gpt2", provenance=None, progress=None, overwrite=False):
    """Export ``model`` into ``out_dir/hf`` and/or ``out_dir/gguf``; return what was written.

    Returns {"hf": {file: path} (if asked), "gguf": {dtype: path}, "modelfile": path,
    "commands": [shell lines for Ollama]} (the last three if "gguf" was asked).
    ``progress(done, total, label)`` is called before each step and once at the end.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {FORMATS}, got {formats!r}")
    dtypes = tuple(dict.fromkeys(gguf_dtypes)) if "gguf" in formats else ()
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or ("gguf" in formats and not dtypes):
        raise ValueError(f"gguf_dtypes must be some of {DTYPES}, got {tuple(gguf_dtypes)!r}")
    steps = (["hf"] if "hf" in formats else []) + [f"gguf {d}" for d in dtypes]
    out_dir = os.fspath(out_dir)
    result = {}

    def report(done, label):
        if progress is not None:
            progress(done, len(steps), label)

    done = 0
    if "hf" in formats:
        report(done, "Hugging Face folder")
        result["hf"] = export_hf(model, os.path.join(out_dir, "hf"), prompt_style=prompt_style,
                                 provenance=provenance, overwrite=overwrite)
        done += 1
    if dtypes:
        folder, slug = os.path.join(out_dir, "gguf"), ollama_name(name)
        result["gguf"] = {}
        for i, dtype in enumerate(dtypes):
            report(done, f"GGUF {dtype}")
            written = export_gguf(model, os.path.join(folder, f"{slug}-{dtype}.gguf"), dtype=dtype,
                                  prompt_style=prompt_style, name=name, provenance=provenance,
                                  modelfile=i == 0, overwrite=overwrite)  # the Modelfile uses the first dtype
            result["gguf"][dtype] = written["gguf"]
            if i == 0:
                result["modelfile"], result["commands"] = written["modelfile"], written["commands"]
            done += 1
    report(done, "done")
    return result
