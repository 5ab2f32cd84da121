"""The Chat page's export section: the chosen model as a Hugging Face folder and GGUF files, and the
Ollama commands that serve it (``sft.studio.exports`` does the work, as a background job the section starts
and watches; ``python -m sft export`` too)."""
import os
from pathlib import Path

import streamlit as st

from sft.export import DTYPES, FORMATS
from sft.studio.exports import export_job_folder, slug, start_export_job
from sft.studio.jobs import JOB_ACTIVE, Job, JobError

from . import jobs, state

FORMAT_LABELS = {"hf": "Hugging Face (transformers)", "gguf": "GGUF (llama.cpp, Ollama)"}


def exports_dir() -> Path:
    """Where exports go: SFT_EXPORTS_DIR, default ./exports (ignored by git)."""
    return Path(os.environ.get("SFT_EXPORTS_DIR") or state.ROOT / "exports")


def source_of(choice):
    """``export_run_or_model`` keywords and a default name for a ``ui.chat.model_choices`` value."""
    if choice[0] == "run":
        return {"run_dir": str(choice[1].path)}, choice[1].name
    _, name, source = choice
    return {"model": name, "weights": source, "models_dir": str(state.models_dir())}, name


def section(label, choice, style):
    """Widgets to export ``choice`` (the first chat model) and what the export wrote."""
    kwargs, default = source_of(choice)
    st.caption(f"Exports **{label}**. A LoRA run's adapters are merged into its base first; the export records "
               "where it came from in `sft-export.json`. Same as `python -m sft export`.")
    c = st.columns([2, 2, 2])
    formats = c[0].multiselect("Formats", list(FORMATS), default=list(FORMATS), key="export_formats",
                               format_func=FORMAT_LABELS.get)
    dtypes = c[1].multiselect("GGUF precision", list(DTYPES), default=["f32"], key="export_dtypes",
                              help="f32: exact; f16: half the size; q8_0: a quarter, nearly the same answers.")
    name = c[2].text_input("Name in Ollama", slug(default), key="export_name").strip() or slug(default)
    out = exports_dir() / slug(default)
    overwrite = st.checkbox("Replace an earlier export in that folder", key="export_overwrite")
    job = Job(export_job_folder(exports_dir(), out.name))
    status = job.status() if job.exists else {}
    if st.button("Export", key="export_go", icon=":material/download:", disabled=not formats
                 or ("gguf" in formats and not dtypes) or status.get("state") in JOB_ACTIVE):
        try:  # a background job: a click elsewhere, a reload or another page leaves it running
            job = start_export_job(exports_dir(), out=out, **kwargs, formats=formats, gguf_dtypes=dtypes, name=name,
                                   prompt_style=style, overwrite=overwrite)
        except JobError as exc:
            st.error(f"Not exported: {exc}", icon=":material/error:")
        status = job.status()
    if status.get("state") in JOB_ACTIVE:
        jobs.watch(job, key="export", counted="steps")
    elif jobs.ended(status, counted="steps", saved="the files written so far stay in the folder;",
                    again="export again with \"Replace an earlier export\" ticked.") == "completed":
        show(status.get("result"))


def show(result):
    if not result:
        return
    st.success(f"Exported to `{result['out']}`.", icon=":material/check_circle:")
    if "hf" in result:
        folder = result["hf"]["folder"]
        st.markdown("**Hugging Face**: load it with `transformers`:")
        st.code("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})", language="python")
    for dtype, path in result.get("gguf", {}).items():
        st.markdown(f"**GGUF {dtype}**: `{path}` (`llama-cli -m {path}`)")
    if result.get("modelfile"):
        st.markdown("**Ollama**: the `Modelfile` beside the GGUF file, then these commands:")
        st.code(Path(result["modelfile"]).read_text(encoding="utf-8"), language=None)
        st.code("\n".join(result["commands"]), language="bash")
        st.caption(f"Then the Judge page (or any Ollama client) can use the model `{result['name']}`.")
        if st.button(f"Use `{result['name']}` on the Judge page", key="export_use_judge",
                     help="After the two commands above: the Judge page then asks this model, through Ollama."):
            for key in ("judge_backend_choice", "judge_model_text"):  # its widgets take the new values
                st.session_state.pop(key, None)
            state.remember(judge_backend="ollama", judge_model=result["name"])
            st.success(f"The Judge page now uses `{result['name']}` on Ollama.", icon=":material/check_circle:")
