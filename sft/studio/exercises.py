"""Not in the book: the chapter's exercises as one experiment, beside the book's published figures.

``chapter_exercises(base)`` gives the variants, as ``TrainConfig`` settings on the same data, model
and seed: the chapter's baseline, the Phi-3 prompt style (exercise 7.1), instruction masking (7.2)
and LoRA with rank 16 and alpha 16 (7.4); then DPO on top of the baseline (the DPO notebook), a
preference-tuning run from the baseline run's final weights. ``start_chapter_exercises`` creates their
runs (``<experiment>-baseline``, ``-phi3``, ``-masking``, ``-lora``, ``-dpo``), records the experiment in ``<runs>/.experiments/<name>.json`` and queues
the runs in that order (``sft.studio.queue``); after training each answers its test split (the
worker does, as every run). ``summarize_experiment`` first has a judge score the answers not yet
scored, when the judge answers, then returns one row per variant beside the book's figures and
writes them as ``<name>.summary.json`` and a Markdown table, ``<name>.md``.
"""
import time
from pathlib import Path

from ..judge import JudgeError, default_scores_path, load_entries, make_client, score_responses, scored_records
from ..model import canonical_model_name, is_tiny
from .config import TrainConfig
from .dpo_config import DPOConfig
from .experiments import run_stats
from .files import atomic_write_json, atomic_write_text, read_json
from .hardware import device_key
from .jobs import Job, JobError, score_job_folder, start_score_job
from .queue import QUEUED, enqueue, ensure_runner, run_queue
from .runs import ACTIVE_STATES, Run, RunError, check_run_name

EXPERIMENTS_DIR = ".experiments"  # under the runs folder: one record per experiment
KEY = "model_response"  # the answers' field, as the chapter names it
# name, where in the book, what it changes, and the settings it changes (on top of the baseline's).
VARIANTS = (
    ("baseline", "chapter 7", "the chapter: Alpaca prompts, loss on every response and prompt token, every weight", {}),
    ("phi3", "exercise 7.1", "the Phi-3 prompt style", {"prompt_style": "phi3"}),
    ("masking", "exercise 7.2", "instruction masking: no loss on the prompt's tokens", {"mask_instruction": True}),
    ("lora", "exercise 7.4", "LoRA, rank 16 and alpha 16, on every Linear layer",
     {"lora_rank": 16, "lora_alpha": 16.0}),
)
# What the baseline fixes whatever the base settings say, so a variant differs from it only in its own.
BASELINE = {"prompt_style": "alpaca", "mask_instruction": False, "lora_rank": 0, "lora_alpha": 16.0,
            "lora_targets": "all", "lora_dropout": 0.0}
VARIANT_SETTINGS = tuple(BASELINE)  # settings the experiment chooses (not offered as the base's)

# DPO on top of the baseline (the book's DPO notebook, issue 14): a DPO run queued after the four others, its
# policy and reference the baseline run's final weights (found when its turn comes), with the notebook's
# settings on the experiment's device and seed, on the bundled preference pairs cut to the same limit.
DPO_VARIANT_READY = True
DPO_VARIANT = ("dpo", "DPO notebook", "DPO on top of the baseline")
DPO_WAITING = "not part of this experiment (made before DPO runs existed)"
DPO_FROM_BASE = ("limit", "seed", "max_steps", "device", "precision")  # what the DPO run takes of the base settings


def dpo_settings(baseline_settings, baseline_run):
    """The DPO variant's run settings: from ``baseline_run`` (its folder), the notebook's defaults otherwise."""
    return {"from_run": str(baseline_run), **{k: baseline_settings[k] for k in DPO_FROM_BASE
                                              if baseline_settings.get(k) is not None}}


# The book's published figures for the same variants: gpt2-medium (355M) fine-tuned as in chapter 7,
# its answers scored 0-100 by Llama 3 8B through Ollama; training minutes on an NVIDIA L4 GPU (the
# chapter's exercise solutions).
BOOK = {"baseline": {"score": 49.45, "training_min": 1.80}, "phi3": {"score": 48.87, "training_min": 1.50},
        "masking": {"score": 47.73, "training_min": 1.77}, "lora": {"score": 50.23, "training_min": 1.30}}
BOOK_SETUP = ("gpt2-medium (355M) fine-tuned on the chapter's data with its settings, the answers scored 0-100 by "
              "Llama 3 8B (Ollama); training minutes on an NVIDIA L4 GPU")
BOOK_LORA_FASTER = 0.28  # LoRA 1.30 min against full fine-tuning's 1.80 on an L4 GPU
BOOK_LORA_NOTE = "the book: LoRA 28% faster than full fine-tuning on an L4 GPU (1.30 against 1.80 min)"
NOT_COMPARABLE_TINY = "not comparable with the book (tiny random model)"
WAITING = (QUEUED, *ACTIVE_STATES)


# ============================================================================ the variants

def chapter_exercises(base_settings=None):
    """The experiment's variants, in queue order: [{variant, exercise, label, changes, settings}].

    ``base_settings`` (a dict, or a TrainConfig) are shared by all: model, data, limit, seed, ...;
    the baseline then takes the chapter's prompt style, no masking and full fine-tuning, and each
    variant changes only its own settings (``changes``) on top of the baseline's."""
    base = base_settings.to_dict() if isinstance(base_settings, TrainConfig) else dict(base_settings or {})
    baseline = {**base, **BASELINE}
    return [{"variant": name, "exercise": exercise, "label": label, "changes": dict(changes),
             "settings": {**baseline, **changes}} for name, exercise, label, changes in VARIANTS]


def judge_spec(judge):
    """{backend, url, model} of a judge given as a dict (url None: the backend's local default), or None."""
    if judge is None:
        return None
    if not isinstance(judge, dict) or not judge.get("model"):
        raise ValueError(f"judge: expected {{'backend', 'url', 'model'}} with a model, got {judge!r}")
    backend = judge.get("backend") or "ollama"
    if backend not in ("ollama", "openai"):
        raise ValueError(f"judge backend {backend!r}: use 'ollama' or 'openai'")
    return {"backend": backend, "url": judge.get("url") or None, "model": str(judge["model"])}


def _missing_weights(config):
    from ..weights import weights_available

    if config.weights == "random" or weights_available(config.model, config.models_dir, source=config.weights):
        return None
    return (f"{canonical_model_name(config.model)} ({config.weights}) is not downloaded in {config.models_dir}/: "
            f"download it first (python -m sft download --model \"{canonical_model_name(config.model)}\" "
            f"--source {config.weights}, or the Fine-tune page), or pick the tiny random model")


# ============================================================================ the record

def experiments_dir(root):
    return Path(root) / EXPERIMENTS_DIR


def record_path(root, name):
    return experiments_dir(root) / f"{check_run_name(name)}.json"


def summary_paths(root, name):
    """(summary JSON, Markdown table) of experiment ``name``."""
    folder = experiments_dir(root)
    return folder / f"{check_run_name(name)}.summary.json", folder / f"{name}.md"


def load_experiment(root, name):
    """The record of experiment ``name`` under ``root``; RunError naming the file when there is none."""
    path = record_path(root, name)
    try:
        record = read_json(path)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc})") from None
    if record is None:
        raise RunError(f"no experiment {name!r} in {root} ({path} is missing)")
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        raise RunError(f"{path} is not an experiment record (no list of runs)")
    return record


def list_experiments(root):
    """The names of the experiments recorded under ``root``, newest first (unreadable records left out)."""
    found = []
    for path in experiments_dir(root).glob("*.json"):
        if path.name.endswith(".summary.json"):
            continue
        try:
            found.append((load_experiment(root, path.stem).get("created") or 0, path.stem))
        except (RunError, ValueError):
            continue
    return [name for _, name in sorted(found, reverse=True)]


def _new_name(root):
    base = f"exercises-{time.strftime('%Y%m%d-%H%M%S')}"
    name, i = base, 1
    while record_path(root, name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


def experiment_runs(root, record):
    """[(entry, Run or None)] for the record's runs; None where a run's folder is gone (deleted, renamed)."""
    out = []
    for entry in record["runs"]:
        try:
            out.append((entry, Run.open(entry["run"], root=root)))
        except (OSError, ValueError):
            out.append((entry, None))
    return out


# ============================================================================ starting

def start_chapter_exercises(root, base_settings=None, *, experiment=None, judge=None, start_runner=True, env=None):
    """Create the variants' runs under ``root``, record the experiment and queue the runs in order.

    ``experiment``: its name (default ``exercises-<date>-<time>``); ``judge``: {backend, url, model},
    kept in the record to score the answers with (``summarize_experiment``). Every setting is checked
    (ConfigError) and the names too before any folder is made. Returns the record."""
    root = Path(root)
    name = check_run_name(experiment) if experiment else _new_name(root)
    judge = judge_spec(judge)
    variants = chapter_exercises(base_settings)
    configs = [TrainConfig.from_settings(v["settings"]).validate() for v in variants]
    missing = _missing_weights(configs[0])
    if missing:
        raise RunError(missing)
    names = [check_run_name(f"{name}-{v['variant']}") for v in variants]
    names += [check_run_name(f"{name}-{DPO_VARIANT[0]}")] if DPO_VARIANT_READY else []
    taken = [n for n in names if (root / n).exists()] + ([f"{EXPERIMENTS_DIR}/{name}.json"]
                                                         if record_path(root, name).exists() else [])
    if taken:
        raise RunError(f"experiment {name!r} exists already under {root} ({', '.join(taken)}): choose another name")
    runs = [Run.create(config, root=root, name=n) for config, n in zip(configs, names)]
    entries = [{"variant": v["variant"], "exercise": v["exercise"], "label": v["label"], "changes": v["changes"],
                "run": run.name} for v, run in zip(variants, runs)]
    for run in runs:
        enqueue(run, start_runner=False)
    if DPO_VARIANT_READY:  # queued after the baseline, so its weights are there when its turn comes
        dpo = DPOConfig.from_settings(dpo_settings(variants[0]["settings"], runs[0].path)).validate()
        runs.append(Run.create(dpo, root=root, name=names[-1]))
        enqueue(runs[-1], start_runner=False)
        entries.append({"variant": DPO_VARIANT[0], "exercise": DPO_VARIANT[1], "label": DPO_VARIANT[2],
                        "changes": {"kind": ["sft", "dpo"]}, "run": runs[-1].name})
    base = base_settings.to_dict() if isinstance(base_settings, TrainConfig) else dict(base_settings or {})
    record = {"name": name, "kind": "chapter-exercises", "created": time.time(), "base_settings": base,
              "judge": judge, "runs": entries, "device": device_key(configs[0].device)}
    atomic_write_json(record_path(root, name), record)
    if start_runner:
        ensure_runner(root, record["device"], env=env)
    return record


def experiment_busy(root, name):
    """True while a run of the experiment waits or trains, or a score job scores its answers."""
    for _, run in experiment_runs(root, load_experiment(root, name)):
        if run is not None and (run.state in WAITING or Job(_score_folder(root, run)).active):
            return True
    return False


def wait_for_experiment(root, name, *, poll=1.0, env=None):
    """Serve the queue in this process until every run of the experiment has ended; {run: state}.

    Where another runner serves the device's line already, this only waits for it."""
    record = load_experiment(root, name)
    runs = [run for _, run in experiment_runs(root, record) if run is not None]
    while any(run.state in WAITING for run in runs):
        run_queue(root, record["device"], env=env, poll=poll)  # returns at once if another runner holds the line
        if any(run.state in WAITING for run in runs):
            time.sleep(poll)
    return {run.name: run.state for run in runs}


# ============================================================================ scoring

def _score_folder(root, run):
    return score_job_folder(root, default_scores_path(run.responses_path, KEY))


def _judge_client(spec):
    return make_client(spec["backend"], spec["model"], spec["url"], timeout=(2.0, 120.0), retries=1)


def _scorable(root, record):
    """The runs whose answers can be scored now: completed, with answers, no score job on them."""
    return [run for _, run in experiment_runs(root, record) if run is not None and run.state == "completed"
            and run.responses_path.is_file() and not Job(_score_folder(root, run)).active]


def score_experiment(root, name, judge=None):
    """Have the judge (``judge``, else the record's) score the experiment's answers not yet scored, here.

    -> {state: scored, skipped or failed, reason, judge, runs: {run: {asked, scored}}}; nothing is
    asked when the judge does not answer or lacks its model (``reason`` says what to do)."""
    record = load_experiment(root, name)
    spec = judge_spec(judge) if judge is not None else record.get("judge")
    if not spec:
        return {"state": "skipped", "reason": "no judge was given", "judge": None, "runs": {}}
    client = _judge_client(spec)
    problem = client.status().problem(spec["model"])
    if problem:
        return {"state": "skipped", "reason": problem, "judge": client.name, "runs": {}}
    done = {}
    for run in _scorable(root, record):
        store = default_scores_path(run.responses_path, KEY)
        try:
            entries = load_entries(run.responses_path)
            todo = sum(r is None for r in scored_records(entries, KEY, store, client))
            records = score_responses(entries, KEY, client=client, store=store) if todo else None
        except (JudgeError, ValueError) as exc:
            return {"state": "failed", "reason": f"{run.name}: {exc}", "judge": client.name, "runs": done}
        done[run.name] = {"asked": todo, "scored": None if records is None else
                          sum(r["score"] is not None for r in records)}
    return {"state": "scored", "reason": None, "judge": client.name, "runs": done}


def start_scoring_jobs(root, name, judge):
    """Score the experiment's unscored answers in background jobs (a page's button); {run: job or reason}."""
    record = load_experiment(root, name)
    spec = judge_spec(judge)
    problem = _judge_client(spec).status(timeout=1.5).problem(spec["model"])
    if problem:
        raise RunError(problem)
    started = {}
    for run in _scorable(root, record):
        store = default_scores_path(run.responses_path, KEY)
        entries = load_entries(run.responses_path)
        if not any(r is None for r in scored_records(entries, KEY, store, _judge_client(spec))):
            continue
        try:
            started[run.name] = start_score_job(root, store, key=KEY, backend=spec["backend"], url=spec["url"],
                                                model=spec["model"], entries_file=run.responses_path)
        except JobError as exc:
            started[run.name] = str(exc)
    return started


# ============================================================================ the summary

def book_comparison(config):
    """(comparable, note): whether runs of ``config`` can be set beside the book's figures."""
    if is_tiny(config.model):
        return False, NOT_COMPARABLE_TINY
    if config.weights == "random":
        return False, "not comparable with the book (random weights, not pretrained GPT-2)"
    book, differs = TrainConfig(), []
    if canonical_model_name(config.model) != canonical_model_name(book.model):
        differs.append(f"model {canonical_model_name(config.model)} (the book: {book.model})")
    for key in ("data", "limit", "epochs", "lr", "weight_decay", "batch_size", "max_steps", "allowed_max_length",
                "answer_limit"):
        if getattr(config, key) != getattr(book, key):
            differs.append(f"{key} {getattr(config, key)!r} (the book: {getattr(book, key)!r})")
    if differs:
        return False, "not directly comparable with the book: " + "; ".join(differs)
    return True, ("comparable with the book: its model, data and settings (the judge and the hardware may differ "
                  "from its Llama 3 8B and L4 GPU)")


STATS = ("state", "method", "val_loss", "train_loss", "training_s", "tokens_per_s", "judge_mean", "judge_ci",
         "judged", "judge")  # a summary row's figures of its run (``run_stats``)


def _row(entry, run, state=None):
    """A summary row: the variant, its run's figures (None where it has none yet) and the book's."""
    book = BOOK.get(entry["variant"], {})
    stats = run_stats(run) if run is not None else {"state": state or "missing (deleted or renamed)"}
    return {"variant": entry["variant"], "exercise": entry["exercise"], "label": entry["label"], "run": entry["run"],
            **{k: stats.get(k) for k in STATS}, "book_score": book.get("score"),
            "book_training_min": book.get("training_min")}


def summarize_experiment(root, name, judge=None, *, score=True, write=True):
    """One row per variant (state, losses, training time, tokens/s, judge mean with its 95% interval)
    beside the book's figures, and whether they can be compared; with ``score`` the unscored answers
    are scored first (``score_experiment``), with ``write`` the summary JSON and Markdown are written."""
    record = load_experiment(root, name)
    scoring = score_experiment(root, name, judge) if score else None
    pairs = experiment_runs(root, record)
    rows = [_row(entry, run) for entry, run in pairs]
    if not any(entry["variant"] == DPO_VARIANT[0] for entry, _ in pairs):
        rows.append(_row(dict(zip(("variant", "exercise", "label"), DPO_VARIANT), run=None), None, DPO_WAITING))
    config = next((run.config for _, run in pairs if run is not None), None) or \
        TrainConfig.from_settings({**record.get("base_settings", {}), **BASELINE})
    comparable, note = book_comparison(config)
    times = {r["variant"]: r.get("training_s") for r in rows if r.get("state") == "completed"}
    faster = 1 - times["lora"] / times["baseline"] if times.get("lora") and times.get("baseline") else None
    summary = {"experiment": name, "created": record.get("created"), "model": canonical_model_name(config.model),
               "weights": config.weights, "comparable": comparable, "note": note, "rows": rows,
               "lora_faster": faster, "book": {"setup": BOOK_SETUP, "lora_faster": BOOK_LORA_FASTER,
                                               "lora_note": BOOK_LORA_NOTE},
               "judge": record.get("judge"), "scoring": scoring}
    if write:
        json_path, md_path = summary_paths(root, name)
        summary["files"] = {"json": str(json_path), "markdown": str(md_path)}
        atomic_write_json(json_path, summary)
        atomic_write_text(md_path, markdown_table(summary))
    return summary


def _num(value, spec, suffix=""):
    return "–" if value is None else format(value, spec) + suffix


def judge_text(row):
    """"50.2 (44.1-56.0), 110 scored", or "–" before any score."""
    if row.get("judge_mean") is None:
        return "–"
    low, high = row.get("judge_ci") or (None, None)
    interval = f" ({low:.1f}-{high:.1f})" if low is not None else ""
    return f"{row['judge_mean']:.1f}{interval}, {row['judged']} scored"


def lora_text(summary):
    """LoRA against full fine-tuning, measured here, beside the book's 28%."""
    faster = summary.get("lora_faster")
    here = ("not measured yet (the baseline and LoRA runs have not both completed)" if faster is None else
            f"{abs(faster):.0%} {'faster' if faster >= 0 else 'slower'} than full fine-tuning here")
    return f"LoRA: {here}; {summary['book']['lora_note']}."


def markdown_table(summary):
    """The summary as Markdown: the note, one row per variant beside the book's figures, the LoRA speed."""
    lines = [f"# The chapter's exercises: {summary['experiment']}", "",
             f"Model {summary['model']}, {summary['weights']} weights: **{summary['note']}**.", "",
             "| variant | exercise | run | state | val loss | training | tokens/s | judge mean (95% CI) "
             "| the book's judge mean | the book's training (L4) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in summary["rows"]:
        training = None if r.get("training_s") is None else r["training_s"] / 60
        lines.append(f"| {r['variant']} | {r['exercise']} | {r['run'] or '–'} | {r['state']} "
                     f"| {_num(r.get('val_loss'), '.3f')} | {_num(training, '.2f', ' min')} "
                     f"| {_num(r.get('tokens_per_s'), ',.0f')} | {judge_text(r)} | {_num(r['book_score'], '.2f')} "
                     f"| {_num(r['book_training_min'], '.2f', ' min')} |")
    lines += ["", lora_text(summary), "", f"The book's columns: {summary['book']['setup']}."]
    scoring = summary.get("scoring") or {}
    if scoring.get("state") in ("skipped", "failed"):
        lines += ["", f"Not scored now: {scoring['reason']}"]
    return "\n".join(lines) + "\n"
