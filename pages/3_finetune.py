"""Fine-tune: pick a model and settings, start a training worker, watch it live, stop and resume it;
rename, delete or run again the runs made so far."""
from ui import boot  # noqa: F401  first: a cold server's first visitor sees that it is starting
import time

import pandas  # noqa: F401  imported before Plotly's use: a first-render import race was seen without it
import streamlit as st

from sft.lora import LORA_TARGETS
from sft.model import canonical_model_name
from sft.studio.adapters import lora_counts
from sft.studio.config import QUICK_RUN_ANSWERS, ConfigError, TrainConfig
from sft.studio.hardware import device_key
from sft.studio.jobs import Job, JobError, download_job_folder, start_download_job
from sft.studio.locks import DeviceBusyError, holder
from sft.studio.manage import delete_run, rename_run, settings_changes
from sft.studio.queue import QUEUED, dequeue, enqueue, queued_runs
from sft.studio.runs import ACTIVE_STATES, Run, RunError
from sft.studio.snapshots import read_snapshots
from sft.studio.worker import launch_worker
from sft.weights import weights_available
from ui import checks, evolution, figures, loaders, snippets, state, widgets
from ui import jobs as job_ui
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
        "compile": "ft_compile", "answer_limit": "ft_answer_limit", "snapshot_every": "ft_snapshot_every",
        "snapshot_prompts": "ft_snapshot_prompts"}
WAITING = (*ACTIVE_STATES, QUEUED)  # runs whose state changes without this page: it polls while one is shown


def run_again(name):
    """Callback of "Run again with these settings": the run's TrainConfig into the widgets (before they are drawn)."""
    try:
        config = loaders.open_run(name).config
        model_name = canonical_model_name(config.model)
    except (OSError, ConfigError, ValueError) as exc:  # gone meanwhile, or from another version
        ss.ft_notice = ("error", f"Not loaded: {exc}")
        return
    state.remember(model_name=model_name, prompt_style=config.prompt_style,  # the Data and Batches pages' choices
                   allowed_max_length=config.allowed_max_length, mask_instruction=config.mask_instruction)
    ss.ft_model = model_name
    reset_settings(KEYS, config)
    if config.weights in ("openai", "hf"):
        ss.ft_source = config.weights
    ss.ft_method = config.method
    if config.lora_rank:
        ss.update(ft_lora_rank=int(config.lora_rank), ft_lora_alpha=float(config.lora_alpha),
                  ft_lora_dropout=float(config.lora_dropout),
                  ft_lora_targets=list(config.lora_target_list() or LORA_TARGETS))
    devices = ["auto"] + loaders.device_info()["ids"]
    ss.ft_device = config.device if config.device in devices else "auto"
    ss.ft_chapter_path = config.is_chapter_path()
    ss.ft_run_name = ""  # a new run, named when it starts
    ss.ft_again = name  # the page says what it could not carry over (below, beside Start)
    st.toast(f"The settings of `{name}` are in the widgets: press **Start training**.", icon=":material/replay:")


def rename(name):
    """Callback of Rename: the folder and its records (sft.studio.manage), then the names this app keeps."""
    new = (ss.get("ft_new_name") or "").strip()
    try:
        renamed = rename_run(loaders.open_run(name), new)
    except (RunError, ValueError, OSError) as exc:
        ss.ft_notice = ("error", f"Not renamed: {exc}")
        return
    kept = {"run_name": renamed.name}
    if ss.get("judge_run") == name:
        kept["judge_run"] = renamed.name
    if name in (ss.get("exp_selected") or []):
        kept["exp_selected"] = [renamed.name if n == name else n for n in ss.exp_selected]
    state.remember(**kept)
    ss.update(ft_run=renamed.name, ft_new_name="")
    if ss.get("ft_again") == name:
        ss.ft_again = renamed.name
    ss.ft_notice = ("success", f"Renamed run `{name}` to `{renamed.name}` (folder `{renamed.path}`).")


def delete(name):
    """Callback of the Delete confirmation: the run folder goes (refused while it trains or waits in a queue)."""
    try:
        delete_run(loaders.open_run(name))
    except (RunError, OSError) as exc:
        ss.ft_notice = ("error", f"Not deleted: {exc}")
        return
    ss.pop("ft_run", None)
    if ss.get("ft_again") == name:
        ss.pop("ft_again")
    state.remember(run_name=None)
    ss.ft_notice = ("success", f"Deleted run `{name}` and its folder.")


def lost_start(key):
    """Why a Start did not start: another training took device ``key`` since this view was drawn."""
    who = holder(key)
    if who is None:  # it has ended already
        return f"Not started: `{key}` was busy a moment ago and is free now: press Start training again."
    seconds = time.time() - who["since"] if isinstance(who.get("since"), (int, float)) else 0.0
    ago = f"{seconds:.0f} s ago" if seconds >= 2 else "a moment ago"
    where = "from this page" if who.get("run") == ss.get("run_name") else "from another tab or session"
    return (f"Not started: run `{who.get('run') or '?'}` started on `{key}` {ago}, {where}, and a device trains "
            "one run at a time. Your settings are still here: **Queue after** it trains them as a new run when it "
            "ends; or stop it, or wait, and press Start training again.")


# ---- model and weights ----
names = state.GPT2_NAMES + [state.TINY]
c1, c2 = st.columns(2)
state.start_widget("ft_model", ss.model_name if ss.model_name in names else TrainConfig.model_default(), names)
model = c1.selectbox("Model", names, key="ft_model",
                     on_change=lambda: reset_settings(KEYS, TrainConfig.defaults_for(ss.ft_model)),
                     help="The chapter fine-tunes gpt2-medium (355M). tiny (random) is a small model with RANDOM "
                          "weights for offline demos: it learns the format, not language.")
if model != ss.model_name:
    state.remember(model_name=model)  # a reload, a restart or a new tab finds it (the workspace file)
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
    # A background job: a click elsewhere, a reload or a closed tab does not end the download.
    fetch = Job(download_job_folder(state.models_dir(), model, source))
    if fetch.active:
        job_ui.watch(fetch, key="ft_download_job", counted="MiB downloaded")
    else:
        job_ui.ended(fetch.status() if fetch.exists else {}, counted="MiB downloaded",
                     saved="the part downloaded is kept:", again=f"Download {model} resumes it.")
        if st.button(f"Download {model}", key="ft_download"):
            try:
                start_download_job(state.models_dir(), model, source, base_url=state.weights_base_url())
            except JobError as exc:
                st.error(str(exc), icon=":material/block:")
            else:
                st.rerun()

    def use_tiny():
        state.remember(model_name=state.TINY)
        ss.ft_model = state.TINY
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
    c = st.columns([1, 1, 1, 3])  # the layers get a row of their own: all seven chips show at 1280 px
    for key, value in (("ft_lora_rank", 16), ("ft_lora_alpha", 16.0), ("ft_lora_targets", list(LORA_TARGETS)),
                       ("ft_lora_dropout", 0.0)):  # exercise 7.4's; the values live in session state
        state.start_widget(key, value)
    given["lora_rank"] = int(c[0].number_input("Rank", 1, 1024, key="ft_lora_rank"))
    given["lora_alpha"] = float(c[1].number_input("Alpha", 0.0, 100000.0, key="ft_lora_alpha",
                                                  help="The update is scaled by alpha / rank."))
    given["lora_dropout"] = float(c[2].number_input("Dropout", 0.0, 0.99, step=0.05, key="ft_lora_dropout"))
    targets = st.multiselect("Layers with adapters", list(LORA_TARGETS), key="ft_lora_targets",
                             help="Every Linear is the book's choice.")
    given["lora_targets"] = "all" if set(targets) == set(LORA_TARGETS) else ",".join(targets)
    if targets:
        trainable, total, share = lora_counts(model, given["lora_rank"], targets)
        st.caption(f"**{trainable:,} trainable** of {total:,} parameters ({share:.2%}); the base weights stay "
                   "frozen. Checkpoints keep only the adapters; the final weights are merged into a plain GPT-2.")
    else:
        st.warning("Choose at least one layer for the adapters: Start waits for one.")
        ready = False
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
book = TrainConfig()
st.caption(TrainConfig.preset_note(model) or
           f"These are the chapter's settings (section 7.6): {book.epochs} epochs, AdamW with learning rate "
           f"{book.lr:g} and weight decay {book.weight_decay:g}, batches of {book.batch_size}, an evaluation "
           f"every {book.eval_freq} steps.")
with st.expander("More settings", key="ft_more"):
    chapter = bool(ss.get("ft_chapter_path"))
    c = st.columns(4)
    for col, (name, label) in zip(c + c, [
            ("eval_freq", "Evaluate every N steps"), ("eval_iter", "Batches per evaluation"), ("seed", "Seed"),
            ("precision", "Precision"), ("limit", "Use the first N entries (0 = all)"),
            ("max_steps", "Stop after N steps (0 = no limit)"), ("response_tokens", "Max tokens per test answer"),
            ("answer_limit", "Test answers after training (0 = auto)")]):
        extra = {"help": "How many test entries (the first ones) the run answers once training ends. 0 = auto: "
                         f"the whole test split, as the chapter, or the first {QUICK_RUN_ANSWERS} when 'Stop after "
                         "N steps' cuts training short, so a quick run stays quick (the Compare page answers the "
                         "rest)."} if name == "answer_limit" else {}
        given[name] = setting_input(col, name, label, key=KEYS[name], defaults=defaults,
                                    disabled=chapter and name == "precision", **extra)
    c = st.columns([1, 3])
    given["snapshot_every"] = setting_input(c[0], "snapshot_every", "Keep answers every N evaluations",
                                            key=KEYS["snapshot_every"], defaults=defaults)
    given["snapshot_prompts"] = setting_input(c[1], "snapshot_prompts", "More prompts to watch (up to 2, "
                                              "separated by |)", key=KEYS["snapshot_prompts"], defaults=defaults)
    run_name = st.text_input("Run name (optional)", key="ft_run_name",
                             help="Letters, digits, '.', '_' or '-'; empty: the time and the model.")
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

if ss.get("ft_again"):  # "Run again": say what the widgets hold now that the run's settings did not
    try:
        was = loaders.open_run(ss.ft_again).config
        changes = settings_changes(was, TrainConfig.from_settings(settings, chapter_path=chapter))
    except (OSError, ConfigError, TypeError, ValueError):  # the run went away, or a setting Start will name
        changes = None
    if changes is not None:
        differ = "; ".join(f"{k} {v[1]!r} (the run: {v[0]!r})" for k, v in changes.items())
        st.info(f"The settings of run `{ss.ft_again}` are in the widgets: press **Start training** to train them "
                "again, as a new run." + (f" Not the same as that run (not set on this page, or changed since): "
                                          f"{differ}." if differ else " Every setting is the same."),
                icon=":material/replay:")

problems = checks.settings_warning(ss)  # settings set on Batches that spoil examples: said before Start
if problems:
    st.warning(problems + "\n\nChange them on the Batches page, or start anyway.", icon=":material/warning:")
key = device_key(device)
busy = holder(key)
# A click drawn on a view from before the device became busy (another tab's Start a moment earlier) arrives at
# a button now disabled, which st.button would drop without a word: the session still holds it, so it counts.
clicked = {k: ss.get(k) is True for k in ("ft_start", "ft_queue")}
if busy is not None:  # one training per device: say which run holds it
    st.info(f"`{key}` is busy: run `{busy.get('run') or '?'}` is training on it. Stop it, or wait, "
            "before starting another; or queue this one after it.", icon=":material/hourglass_top:")
c = st.columns([1, 3], vertical_alignment="center")
start = c[0].button("Start training", type="primary", key="ft_start", disabled=not ready or busy is not None)
queue = busy is not None and c[1].button(f"Queue after `{busy.get('run') or '?'}`", key="ft_queue",
                                         disabled=not ready, help="Trains these settings as a new run when the "
                                         "device is free (the Experiments page orders the queue).")
queue = ready and (queue or clicked["ft_queue"])
start = ready and not queue and (start or clicked["ft_start"])
if ss.get("ft_lost_start"):  # kept over the rerun that drew the device as busy, with Queue after beside Start
    st.error(ss.pop("ft_lost_start"), icon=":material/block:")
if start or queue:
    try:
        config = TrainConfig.from_settings(settings, chapter_path=chapter).validate()
        if start and holder(key) is not None:
            raise DeviceBusyError(key)  # taken since this view was drawn: no run folder is made
        run = Run.create(config, root=state.runs_dir(), name=run_name.strip() or None)
        if queue:
            place = enqueue(run)
            ss.ft_notice = ("info", f"Queued run `{run.name}`: number {place} in line for `{key}`; it starts "
                                    "by itself when the device is free.")
        else:
            try:
                launch_worker(run)
            except DeviceBusyError:  # taken between the look and the lock: the unstarted run goes, the settings stay
                delete_run(run)
                raise
    except DeviceBusyError:
        ss.ft_lost_start = lost_start(key)
        st.rerun()  # redraw with the device busy: its holder named, Start disabled, Queue after offered
    except (ConfigError, RunError, ValueError, FileExistsError) as exc:
        st.error(f"Not {'queued' if queue else 'started'}: {exc}", icon=":material/block:")
    else:
        ss.pop("ft_again", None)
        state.remember(run_name=run.name)
        ss.ft_run = run.name  # show the new run (its selectbox is drawn below)
        st.rerun()  # redraw with the device marked busy and the live view polling

# ---- the runs: the one shown, live; renaming, deleting, running again; all of them ----
notice = ss.pop("ft_notice", None)
if notice:
    getattr(st, notice[0])(notice[1])
runs = [r for r in loaders.list_runs() if not r.is_broken]
if not runs:
    st.info("No runs yet: press Start training.")
    st.stop()
run_names = [r.name for r in runs]
state.start_widget("ft_run", ss.run_name if ss.run_name in run_names else run_names[0], run_names)
shown = st.selectbox("Run", run_names, key="ft_run")
if shown != ss.run_name:
    state.remember(run_name=shown)  # a reload shows this run again
shown_run = loaders.open_run(shown)
watch = shown_run.state in WAITING
c = st.columns([2, 1, 1, 3], vertical_alignment="center")
c[0].button("Run again with these settings", key="ft_run_again", on_click=run_again, args=(shown,),
            icon=":material/replay:", help="Puts this run's settings into the widgets above (model, method and "
            "LoRA, every setting, precision, device, the prompt style and batch choices): press Start training "
            "to train them as a new run.")
with c[1].popover("Rename", icon=":material/edit:"):
    st.text_input("New name", key="ft_new_name", placeholder=shown,
                  help="Letters, digits, '.', '_' or '-' (at most 100), as for a new run. Not while it trains.")
    st.button("Rename", key="ft_rename", on_click=rename, args=(shown,))
with c[2].popover("Delete", icon=":material/delete:"):
    st.markdown(f"Delete run `{shown}`: its folder `{shown_run.path}`, with its checkpoint, weights, answers and "
                "scores. This cannot be undone.")
    st.button(f"Yes, delete {shown}", key="ft_delete", type="primary", on_click=delete, args=(shown,))


@st.fragment(run_every=1.5 if watch else None)
def live(name):
    run = loaders.open_run(name)
    status = run.status()
    state_, p = status.get("state"), status.get("progress") or {}
    if watch and state_ not in WAITING:
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
    elif state_ == QUEUED:
        line = [r.name for r in queued_runs(run.root, status.get("device"))]
        place = line.index(name) + 1 if name in line else "?"
        st.info(f"Queued: number {place} in line for `{status.get('device')}`; it starts by itself when the device "
                "is free (the Experiments page orders the queue).", icon=":material/schedule:")
        if st.button("Remove from the queue", key="ft_dequeue"):
            try:
                dequeue(run)
            except RunError as exc:  # it has just started
                st.error(str(exc))
            else:
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
    events = run.read_metrics(("eval", "step", "sample", "resumed"))  # metrics.jsonl read once per poll
    evals, steps, samples, resumed = ([e for e in events if e["type"] == k] for k in ("eval", "step", "sample",
                                                                                       "resumed"))
    x = st.radio("x axis", list(figures.X_AXES), horizontal=True, key="ft_x")
    evolution.show(name, read_snapshots(run, resumed=resumed), evals, steps, x, p.get("elapsed"))
    for s in samples:
        st.markdown(f"**Sample answer, epoch {s['epoch']}** (to the first validation prompt):")
        st.code(s.get("response") or "(empty)", language=None, wrap_lines=True)


live(shown)

st.subheader("All runs")


@st.fragment(run_every=2.0 if any(r.state in WAITING for r in runs) else None)
def all_runs(polling):
    """The table of runs, read again every 2 s while one trains or waits (its step and losses move)."""
    rows = [r.summary() for r in loaders.list_runs() if not r.is_broken]
    if polling and not any(row["state"] in WAITING for row in rows):
        st.rerun()  # every run has ended: redraw the page once, with polling off
    for row in rows:  # the chapter counts steps from 0
        row["steps done"] = row["step"] + 1 if row["step"] is not None else 0
    st.dataframe(figures.frame(rows), hide_index=True, key="ft_runs",
                 column_order=["name", "state", "model", "method", "weights", "path", "epochs", "steps done",
                               "total_steps", "train_loss", "val_loss", "device", "error"])


all_runs(any(r.state in WAITING for r in runs))
