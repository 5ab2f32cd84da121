"""Fine-tune: pick a model and settings, start a training worker, watch it live, stop and resume it."""
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from sft.lora import LORA_TARGETS
from sft.studio.adapters import lora_counts
from sft.studio.config import ConfigError, TrainConfig
from sft.studio.hardware import device_key
from sft.studio.locks import DeviceBusyError, holder
from sft.studio.runs import ACTIVE_STATES, Run, RunError
from sft.studio.worker import launch_worker
from sft.weights import weights_available
from ui import figures, loaders, snippets, state, widgets
from ui.widgets import reset_settings, setting_input

state.init_state()
ss = st.session_state
st.title("Fine-tune")
st.caption("Stage 2, steps 4-6: load a pretrained GPT-2, fine-tune it on the instructions, watch the loss. "
           "Training runs in its own process: closing this tab loses nothing.")

# Widget key of each setting the page shows (its defaults follow the model's preset).
KEYS = {"epochs": "ft_epochs", "lr": "ft_lr", "weight_decay": "ft_wd", "batch_size": "ft_bs",
        "eval_freq": "ft_eval_freq", "eval_iter": "ft_eval_iter", "seed": "ft_seed", "precision": "ft_precision",
        "limit": "ft_limit", "max_steps": "ft_max_steps", "response_tokens": "ft_response_tokens",
        "grad_accum_steps": "ft_accum", "activation_checkpointing": "ft_ckpt", "group_by_length": "ft_grouped",
        "compile": "ft_compile"}

# ---- model and weights ----
names = state.GPT2_NAMES + [state.TINY]
c1, c2 = st.columns(2)
state.start_widget("ft_model", ss.model_name, names)
model = c1.selectbox("Model", names, key="ft_model",
                     on_change=lambda: reset_settings(KEYS, TrainConfig.defaults_for(ss.ft_model)),
                     help="The chapter fine-tunes gpt2-medium (355M). tiny (random) is a small model with RANDOM "
                          "weights for offline demos: it learns the format, not language.")
ss.model_name = model
defaults = TrainConfig.defaults_for(model)
tiny = model == state.TINY
source = "random" if tiny else c2.radio(
    "Weights source", ["openai", "hf"], horizontal=True, key="ft_source",
    format_func={"openai": "OpenAI checkpoint (the book's, needs TensorFlow)",
                 "hf": "Hugging Face safetensors"}.get)
ready = True  # weights on disk (or none needed): Start is enabled
if tiny:
    c2.info("Random weights, no download: good for trying the workflow, not for real answers.")
elif not weights_available(model, str(state.models_dir()), source=source):
    st.warning(f"{model} ({source}) is not downloaded yet (folder `{state.models_dir()}`).")
    if st.button(f"Download {model}", key="ft_download"):
        error = loaders.download_weights(model, source, st.progress(0.0, text="Starting the download…"))
        if error is None:
            st.rerun()
        st.error(f"Download failed: {error}", icon=":material/cloud_off:")

    def use_tiny():
        ss.update(model_name=state.TINY, ft_model=state.TINY)
        reset_settings(KEYS, TrainConfig.defaults_for(state.TINY))

    st.button("Use the tiny random model instead", key="ft_use_tiny", on_click=use_tiny)
    ready = False

# ---- method: every weight (the chapter) or LoRA adapters (exercise 7.4) ----
given = {}
method = st.radio("Method", ["full", "LoRA"], horizontal=True, key="ft_method",
                  format_func={"full": "Full fine-tuning (the chapter)", "LoRA": "LoRA (exercise 7.4)"}.get,
                  help="LoRA freezes the model and trains small low-rank adapters beside its Linear layers "
                       "(appendix E): far fewer trainable parameters, no optimizer state for the frozen weights.")
if method == "LoRA":
    c = st.columns([1, 1, 3, 1])
    given["lora_rank"] = int(c[0].number_input("Rank", 1, 1024, 16, key="ft_lora_rank"))
    given["lora_alpha"] = float(c[1].number_input("Alpha", 0.0, 100000.0, 16.0, key="ft_lora_alpha",
                                                  help="The update is scaled by alpha / rank."))
    targets = c[2].multiselect("Layers with adapters", list(LORA_TARGETS), default=list(LORA_TARGETS),
                               key="ft_lora_targets", help="Every Linear is the book's choice.")
    given["lora_dropout"] = float(c[3].number_input("Dropout", 0.0, 0.99, 0.0, step=0.05, key="ft_lora_dropout"))
    given["lora_targets"] = "all" if set(targets) == set(LORA_TARGETS) else ",".join(targets)
    if targets:
        trainable, total, share = lora_counts(model, given["lora_rank"], targets)
        st.caption(f"**{trainable:,} trainable** of {total:,} parameters ({share:.2%}); the base weights stay "
                   "frozen. Checkpoints keep only the adapters; the final weights are merged into a plain GPT-2.")
    else:
        st.warning("Choose at least one layer for the adapters.")
else:
    total = lora_counts(model, 0)[1]
    st.caption(f"**{total:,} trainable** parameters: every weight, as the chapter.")

# ---- settings: the chapter's defaults (or the model's preset), from TrainConfig ----
c = st.columns(5)
for col, (name, label) in zip(c, [("epochs", "Epochs"), ("lr", "Learning rate"), ("weight_decay", "Weight decay"),
                                  ("batch_size", "Batch size")]):
    given[name] = setting_input(col, name, label, key=KEYS[name], defaults=defaults,
                                fmt="%.1e" if name == "lr" else None)
device = c[4].selectbox("Device", ["auto"] + loaders.device_info()["ids"], key="ft_device")
with st.expander("More settings", key="ft_more"):
    chapter = bool(ss.get("ft_chapter_path"))
    c = st.columns(4)
    for col, (name, label) in zip(c + c[:3], [
            ("eval_freq", "Evaluate every N steps"), ("eval_iter", "Batches per evaluation"), ("seed", "Seed"),
            ("precision", "Precision"), ("limit", "Use the first N entries (0 = all)"),
            ("max_steps", "Stop after N steps (0 = no limit)"), ("response_tokens", "Max tokens per test answer")]):
        given[name] = setting_input(col, name, label, key=KEYS[name], defaults=defaults,
                                    disabled=chapter and name == "precision")
    run_name = c[3].text_input("Run name (optional)", key="ft_run_name")
    chapter = st.toggle("The chapter's exact computation (slow)", key="ft_chapter_path",
                        help="fp32, the book's module bodies, output head and loss at every position, PyTorch's "
                             "default AdamW: what train_model_simple computes. Off: the fast path (same losses "
                             "to bf16 rounding).")
    c = st.columns(4, vertical_alignment="bottom")
    for col, (name, label) in zip(c, [("grad_accum_steps", "Gradient accumulation steps"),
                                      ("activation_checkpointing", "Activation checkpointing"),
                                      ("group_by_length", "Group batches by length"), ("compile", "torch.compile")]):
        given[name] = setting_input(col, name, label, key=KEYS[name], defaults=defaults, disabled=chapter)
st.caption(f"Data: {ss.dataset_name}; prompt style `{ss.prompt_style}`; allowed_max_length "
           f"{ss.allowed_max_length}; instruction masking {'on' if ss.mask_instruction else 'off'} "
           "(set on the Data and Batches pages).")
settings = dict(given, model=model, weights=source, models_dir=str(state.models_dir()),
                data=loaders.dataset_file(), prompt_style=ss.prompt_style, allowed_max_length=ss.allowed_max_length,
                mask_instruction=ss.mask_instruction, device=device)
if chapter:  # the chapter's computation fixes these; the widgets are disabled
    for name in ("precision", "grad_accum_steps", "activation_checkpointing", "group_by_length", "compile"):
        settings.pop(name)
try:
    widgets.code_behind(snippets.finetune(TrainConfig.from_settings(settings, chapter_path=chapter),
                                          run_name.strip() or None, state.runs_dir()))
except (ConfigError, TypeError, ValueError):
    pass  # a setting the Start button will name

busy = holder(device_key(device))
if busy is not None:  # one training per device: say which run holds it
    st.info(f"`{device_key(device)}` is busy: run `{busy.get('run') or '?'}` is training on it. Stop it, or wait, "
            "before starting another.", icon=":material/hourglass_top:")
if st.button("Start training", type="primary", key="ft_start", disabled=not ready or busy is not None):
    try:
        config = TrainConfig.from_settings(settings, chapter_path=chapter)
        run = Run.create(config, root=state.runs_dir(), name=run_name.strip() or None)
        try:
            launch_worker(run)
        except DeviceBusyError as exc:  # one training per device: the run stays, unstarted
            run.update_status(state="failed", error=str(exc))
            raise
    except (ConfigError, RunError, DeviceBusyError, ValueError, FileExistsError) as exc:
        st.error(f"Not started: {exc}", icon=":material/block:")
    else:
        ss.run_name = ss.ft_run = run.name  # show the new run (its selectbox is drawn below)
        st.rerun()  # redraw with the device marked busy and the live view polling

# ---- the run being shown, live ----
runs = [r for r in loaders.list_runs() if not r.is_broken]
if not runs:
    st.info("No runs yet: press Start training.")
    st.stop()
run_names = [r.name for r in runs]
state.start_widget("ft_run", ss.run_name if ss.run_name in run_names else run_names[0], run_names)
shown = st.selectbox("Run", run_names, key="ft_run")
ss.run_name = shown
active = loaders.open_run(shown).state in ACTIVE_STATES


@st.fragment(run_every=1.5 if active else None)
def live(name):
    run = loaders.open_run(name)
    status = run.status()
    state_, p = status.get("state"), status.get("progress") or {}
    if active and state_ not in ACTIVE_STATES:
        st.rerun()  # the run ended: redraw the page once, with polling off
    step, total = (p.get("step", -1) + 1), p.get("total_steps")
    st.progress(min(p.get("progress", 0.0), 1.0), text=f"**{state_}**" + (f" ({status['phase']})" if status.get(
        "phase") else "") + (f": step {step} of {total}, epoch {p.get('epoch')} of {p.get('epochs')}" if total else ""))
    c = st.columns(6)
    c[0].metric("Train loss", f"{p['train_loss']:.3f}" if p.get("train_loss") is not None else "–")
    c[1].metric("Val loss", f"{p['val_loss']:.3f}" if p.get("val_loss") is not None else "–")
    c[2].metric("Tokens seen", f"{p.get('tokens_seen', 0):,}")
    c[3].metric("Tokens/s", f"{p['tokens_per_s']:,.0f}" if p.get("tokens_per_s") else "–",
                help="Input tokens (padding included, as the chapter counts them) per second of training.")
    c[4].metric("Elapsed", figures.fmt_seconds(p.get("elapsed")))
    c[5].metric("ETA", figures.fmt_seconds(p.get("eta")) if state_ in ACTIVE_STATES else "–")
    if state_ in ("starting", "running"):
        if st.button("Stop (keeps the checkpoint)", key="ft_stop"):
            run.request_stop()
            st.rerun()
    elif state_ in ("stopped", "failed"):
        # a checkpoint: go on from it; none (killed before its first): start again from step 0
        label = "Resume from the checkpoint" if run.has_checkpoint else "Start again from step 0"
        if st.button(label, key="ft_resume"):
            try:
                launch_worker(run, resume=run.has_checkpoint)
            except (RunError, DeviceBusyError) as exc:
                st.error(str(exc))
            else:
                st.rerun()
    if state_ == "failed":
        st.error(f"Failed: {status.get('error')}", icon=":material/error:")
        for tip in status.get("advice") or []:
            st.markdown(f"- {tip}")
        st.code(status.get("log_tail") or run.tail_log(30) or "(empty log)", language=None)
    elif state_ == "completed":
        st.success(f"Done. Weights: `{run.model_path}`. Answers to the test split: `{run.responses_path}`"
                   " (see the Compare page).", icon=":material/check_circle:")
    evals, steps = run.read_metrics("eval"), run.read_metrics("step")
    x = st.radio("x axis", list(figures.X_AXES), horizontal=True, key="ft_x")
    st.plotly_chart(figures.loss_figure(evals, steps, x), key="ft_curve")
    for s in run.read_metrics("sample"):
        st.markdown(f"**Sample answer, epoch {s['epoch']}** (to the first validation prompt):")
        st.code(s.get("response") or "(empty)", language=None, wrap_lines=True)


live(shown)

st.subheader("All runs")
rows = [r.summary() for r in runs]
for row in rows:  # the chapter counts steps from 0
    row["steps done"] = row["step"] + 1 if row["step"] is not None else 0
st.dataframe(figures.frame(rows), hide_index=True, key="ft_runs",
             column_order=["name", "state", "model", "method", "weights", "path", "epochs", "steps done", "total_steps",
                           "train_loss", "val_loss", "device", "error"])
