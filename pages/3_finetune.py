"""Fine-tune: pick a model and settings, start a training worker, watch it live, stop and resume it."""
import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from pages import common
from sft.hardware import device_key
from sft.runs import ACTIVE_STATES, Run, RunError, device_lock_holder
from sft.training import ConfigError, TrainConfig
from sft.weights import weights_available

common.init_state()
ss = st.session_state
st.title("Fine-tune")
st.caption("Stage 2, steps 4-6: load a pretrained GPT-2, fine-tune it on the instructions, watch the loss. "
           "Training runs in its own process: closing this tab loses nothing.")

# ---- model and weights ----
names = common.GPT2_NAMES + [common.TINY]
c1, c2 = st.columns(2)
common.start_widget("ft_model", ss.model_name, names)
model = c1.selectbox("Model", names, key="ft_model",
                     help="The chapter fine-tunes gpt2-medium (355M). tiny (random) is a small model with RANDOM "
                          "weights for offline demos: it learns the format, not language.")
ss.model_name = model
tiny = model == common.TINY
source = "random" if tiny else c2.radio(
    "Weights source", ["openai", "hf"], horizontal=True, key="ft_source",
    format_func={"openai": "OpenAI checkpoint (the book's, needs TensorFlow)",
                 "hf": "Hugging Face safetensors"}.get)
ready = True  # weights on disk (or none needed): Start is enabled
if tiny:
    c2.info("Random weights, no download: good for trying the workflow, not for real answers.")
elif not weights_available(model, str(common.models_dir()), source=source):
    st.warning(f"{model} ({source}) is not downloaded yet (folder `{common.models_dir()}`).")
    if st.button(f"Download {model}", key="ft_download"):
        error = common.download_weights(model, source, st.progress(0.0, text="Starting the download…"))
        if error is None:
            st.rerun()
        st.error(f"Download failed: {error}", icon=":material/cloud_off:")
    st.button("Use the tiny random model instead", key="ft_use_tiny",
              on_click=lambda: ss.update(model_name=common.TINY, ft_model=common.TINY))
    ready = False

# ---- settings, chapter defaults ----
d = TrainConfig()
c = st.columns(5)
epochs = c[0].number_input("Epochs", 1, 100, d.epochs, key="ft_epochs")
lr = c[1].number_input("Learning rate", 1e-7, 1.0, d.lr, format="%.1e", key="ft_lr")
wd = c[2].number_input("Weight decay", 0.0, 1.0, d.weight_decay, key="ft_wd")
batch_size = c[3].number_input("Batch size", 1, 128, d.batch_size, key="ft_bs")
device = c[4].selectbox("Device", ["auto"] + common.device_info()["ids"], key="ft_device")
with st.expander("More settings", key="ft_more"):
    c = st.columns(4)
    eval_freq = c[0].number_input("Evaluate every N steps", 1, 10_000, d.eval_freq, key="ft_eval_freq")
    eval_iter = c[1].number_input("Batches per evaluation", 1, 1_000, d.eval_iter, key="ft_eval_iter")
    seed = c[2].number_input("Seed", 0, 2**31 - 1, d.seed, key="ft_seed")
    precision = c[3].selectbox("Precision", ["auto", "fp32", "bf16"], key="ft_precision",
                               disabled=bool(ss.get("ft_chapter_path")))
    limit = c[0].number_input("Use the first N entries (0 = all)", 0, 10**7, 0, key="ft_limit")
    max_steps = c[1].number_input("Stop after N steps (0 = no limit)", 0, 10**7, 0, key="ft_max_steps")
    response_tokens = c[2].number_input("Max tokens per test answer", 1, 1024, d.response_tokens,
                                        key="ft_response_tokens")
    run_name = c[3].text_input("Run name (optional)", key="ft_run_name")
    chapter = st.toggle("The chapter's exact computation (slow)", key="ft_chapter_path",
                        help="fp32, output head and loss at every position, PyTorch's default AdamW: what "
                             "train_model_simple computes. Off: the fast path (same losses to bf16 rounding).")
    c = st.columns(4, vertical_alignment="bottom")
    accum = c[0].number_input("Gradient accumulation steps", 1, 256, d.grad_accum_steps, key="ft_accum",
                              disabled=chapter, help="Each optimizer step averages this many batches: a "
                              "smaller batch size with the same effective batch, in less memory.")
    ckpt = c[1].checkbox("Activation checkpointing", key="ft_ckpt", disabled=chapter,
                         help="Recompute activations in backward: much less memory, ~30% slower.")
    grouped = c[2].checkbox("Group batches by length", key="ft_grouped", disabled=chapter,
                            help="Less padding; changes the chapter's batch order.")
    compiled = c[3].checkbox("torch.compile", key="ft_compile", disabled=chapter,
                             help="Compiles the model first (tens of seconds); can pay off on GPUs.")
st.caption(f"Data: {ss.dataset_name}; prompt style `{ss.prompt_style}`; allowed_max_length "
           f"{ss.allowed_max_length}; instruction masking {'on' if ss.mask_instruction else 'off'} "
           "(set on the Data and Batches pages).")

busy = device_lock_holder(common.runs_dir(), device_key(device))
if busy:  # one training per device: say which run holds it
    st.info(f"`{device_key(device)}` is busy: run `{busy.get('run')}` is training on it. Stop it, or wait, "
            "before starting another.", icon=":material/hourglass_top:")
if st.button("Start training", type="primary", key="ft_start", disabled=not ready or bool(busy)):
    settings = dict(model=model, weights=source, models_dir=str(common.models_dir()),
                    data=common.dataset_file(), limit=limit or None, prompt_style=ss.prompt_style,
                    allowed_max_length=ss.allowed_max_length, mask_instruction=ss.mask_instruction,
                    epochs=epochs, lr=lr, weight_decay=wd, batch_size=batch_size, eval_freq=eval_freq,
                    eval_iter=eval_iter, seed=seed, device=device, max_steps=max_steps or None,
                    response_tokens=response_tokens)
    config = (TrainConfig.chapter_path(**settings) if chapter else
              TrainConfig(**settings, precision=precision, grad_accum_steps=accum, activation_checkpointing=ckpt,
                          group_by_length=grouped, compile=compiled))
    try:
        run = Run.create(config, root=common.runs_dir(), name=run_name.strip() or None)
        try:
            run.launch()
        except RunError as exc:  # DeviceBusyError included: one training per device
            run.update_status(state="failed", error=str(exc))
            raise
    except (ConfigError, RunError, ValueError, FileExistsError) as exc:
        st.error(f"Not started: {exc}", icon=":material/block:")
    else:
        ss.run_name = ss.ft_run = run.name  # show the new run (its selectbox is drawn below)
        st.rerun()  # redraw with the device marked busy and the live view polling

# ---- the run being shown, live ----
runs = common.list_runs()
if not runs:
    st.info("No runs yet: press Start training.")
    st.stop()
run_names = [r.name for r in runs]
common.start_widget("ft_run", ss.run_name if ss.run_name in run_names else run_names[0], run_names)
shown = st.selectbox("Run", run_names, key="ft_run")
ss.run_name = shown
active = common.open_run(shown).state in ACTIVE_STATES


@st.fragment(run_every=1.5 if active else None)
def live(name):
    run = common.open_run(name)
    status = run.status()
    state, p = status.get("state"), status.get("progress") or {}
    if active and state not in ACTIVE_STATES:
        st.rerun()  # the run ended: redraw the page once, with polling off
    step, total = (p.get("step", -1) + 1), p.get("total_steps")
    st.progress(min(p.get("progress", 0.0), 1.0), text=f"**{state}**" + (f" ({status['phase']})" if status.get(
        "phase") else "") + (f": step {step} of {total}, epoch {p.get('epoch')} of {p.get('epochs')}" if total else ""))
    c = st.columns(6)
    c[0].metric("Train loss", f"{p['train_loss']:.3f}" if p.get("train_loss") is not None else "–")
    c[1].metric("Val loss", f"{p['val_loss']:.3f}" if p.get("val_loss") is not None else "–")
    c[2].metric("Tokens seen", f"{p.get('tokens_seen', 0):,}")
    c[3].metric("Tokens/s", f"{p['tokens_per_s']:,.0f}" if p.get("tokens_per_s") else "–",
                help="Input tokens (padding included, as the chapter counts them) per second of training.")
    c[4].metric("Elapsed", common.fmt_seconds(p.get("elapsed")))
    c[5].metric("ETA", common.fmt_seconds(p.get("eta")) if state in ACTIVE_STATES else "–")
    if state in ("queued", "running"):
        if st.button("Stop (keeps the checkpoint)", key="ft_stop"):
            run.request_stop()
            st.rerun()
    elif state in ("stopped", "failed") and run.has_checkpoint:
        if st.button("Resume from the checkpoint", key="ft_resume"):
            try:
                run.resume()
            except RunError as exc:
                st.error(str(exc))
            else:
                st.rerun()
    if state == "failed":
        st.error(f"Failed: {status.get('error')}", icon=":material/error:")
        for tip in status.get("advice") or []:
            st.markdown(f"- {tip}")
        st.code(status.get("log_tail") or run.tail_log(30) or "(empty log)", language=None)
    elif state == "completed":
        st.success(f"Done. Weights: `{run.model_path}`. Answers to the test split: `{run.responses_path}`"
                   " (see the Compare page).", icon=":material/check_circle:")
    evals, steps = run.read_metrics("eval"), run.read_metrics("step")
    x = st.radio("x axis", list(common.X_AXES), horizontal=True, key="ft_x")
    st.plotly_chart(common.loss_figure(evals, steps, x), key="ft_curve")
    for s in run.read_metrics("sample"):
        st.markdown(f"**Sample answer, epoch {s['epoch']}** (to the first validation prompt):")
        st.code(s.get("response") or "(empty)", language=None, wrap_lines=True)


live(shown)

st.subheader("All runs")
rows = [r.summary() for r in runs]
for row in rows:  # the chapter counts steps from 0
    row["steps done"] = row["step"] + 1 if row["step"] is not None else 0
st.dataframe(common.frame(rows), hide_index=True, key="ft_runs",
             column_order=["name", "state", "model", "weights", "path", "epochs", "steps done", "total_steps",
                           "train_loss", "val_loss", "device", "error"])
