"""The training worker (not in the book): the process that trains one run folder.

``Run.launch`` starts ``python -m sft train --run-dir ... --progress plain`` detached, and that
process calls ``execute_run``: take the device lock, build data, model and ``Trainer``
(``build_trainer``), train or resume, save the final weights, answer the test split, and
keep status.json current through each phase. Under ``torchrun`` every rank runs
``execute_run``; only rank 0 takes the lock, writes the run folder and answers (see
``sft.distributed``). One training per device at a time: a lock file holds the worker's pid.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .runs import DeviceBusyError, RunError, atomic_write_json, canonical_model_name, read_json

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
RESPONSE_BATCH = 32  # test prompts answered together (KV cache): more rows per weight read


# ============================================================================ processes and locks

def pid_alive(pid, create_time=None):
    """Is ``pid`` a live process (not a zombie; the same process if ``create_time`` is given)?"""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # pragma: no cover - exists, owned by someone else
        return True


def _create_time(pid):
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # pragma: no cover
        return None


def _lock_path(root, key):
    return Path(root) / ".locks" / f"{key}.lock"


def device_lock_holder(root, key):
    """{pid, run, ...} of the live training holding device ``key`` under ``root``, or None."""
    holder = read_json(_lock_path(root, key))
    if holder and pid_alive(holder.get("pid"), holder.get("create_time")):
        return holder
    return None


def acquire_device_lock(root, key, run_name, pid=None, *, take_over=()):
    """Take the one-training-per-device lock for ``pid``; a lock held by a dead pid is cleared.

    ``take_over``: pids whose lock may pass to us (the launcher that spawned this worker).
    """
    pid = pid or os.getpid()
    path = _lock_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "create_time": _create_time(pid), "run": run_name, "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = read_json(path) or {}
            if holder.get("pid") in (pid, *take_over):
                atomic_write_json(path, record)
                return path
            if not pid_alive(holder.get("pid"), holder.get("create_time")):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise DeviceBusyError(f"device {key} is busy: run {holder.get('run')!r} (pid {holder.get('pid')}) "
                                  "is training on it; stop it or wait for it to finish") from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return path
    raise DeviceBusyError(f"could not take the lock {path}")  # pragma: no cover


def release_device_lock(path, pid=None):
    """Remove the lock if ``pid`` (default: this process) holds it."""
    holder = read_json(path) or {}
    if holder.get("pid") == (pid or os.getpid()):
        Path(path).unlink(missing_ok=True)


# ============================================================================ launching

def check_start(run, resume):
    """Refuse a resume without a checkpoint, and a fresh start of a run that already trained."""
    if resume and not run.has_checkpoint:
        raise RunError(f"run {run.name!r} has no checkpoint to resume from ({run.checkpoint_path})")
    if not resume and run.has_trained:
        raise RunError(f"run {run.name!r} has already trained: resume it, or create a new run")


def launch_worker(run, *, resume=False, responses=True, python=None, env=None):
    """Start ``python -m sft train --run-dir RUN`` detached, logging to log.txt; returns the Popen.

    The launcher takes the device lock first (so two clicks cannot start two trainings) and
    hands it to the worker, which takes it over as its parent's.
    """
    from .hardware import device_key

    if run.is_active:
        raise RunError(f"run {run.name!r} is already {run.state}")
    check_start(run, resume)
    key = device_key(run.config.device)
    lock = acquire_device_lock(run.root, key, run.name, os.getpid())
    try:
        run.stop_path.unlink(missing_ok=True)
        (run.path / "worker.json").unlink(missing_ok=True)  # else the old worker would look crashed
        run.update_status(state="queued", pid=None, device=key, error=None, advice=None,
                          log_tail=None, finished=None)
        cmd = [python or sys.executable, "-m", "sft", "train", "--run-dir", str(run.path), "--progress", "plain"]
        cmd += (["--resume"] if resume else []) + ([] if responses else ["--no-responses"])
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(run.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                      f"{' '.join(cmd[1:])}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
    except BaseException:
        release_device_lock(lock)
        raise
    record = {"pid": proc.pid, "create_time": _create_time(proc.pid), "run": run.name, "since": time.time()}
    atomic_write_json(run.path / "worker.json", record)
    if (read_json(lock) or {}).get("pid") == os.getpid():  # hand the lock to the worker
        atomic_write_json(lock, record)
    return proc


# ============================================================================ building

def load_splits(config):
    """(train, test, val) for ``config``: its data source, cut to ``limit``, split as the chapter does."""
    from .data import load_instruction_data, split_data

    data = load_instruction_data(config.data)
    if config.limit is not None:
        data = data[:config.limit]
    train, test, val = split_data(data)
    if not train:
        raise ValueError(f"{config.data or 'the bundled data'} gives no training entries "
                         f"({len(data)} entries after limit={config.limit})")
    return train, test, val


def build_model(config):
    """A GPTModel: GPT-2 weights from ``config.weights``, or random (seeded) for "random".

    "random" works for every size (the chapter's gpt2 sizes too): for benchmarks and offline
    demos; such a model is labelled RANDOM wherever a run shows it.
    """
    if config.weights == "random":
        from .model import GPTModel, model_config

        torch.manual_seed(config.seed)
        return GPTModel(model_config(config.model))
    from .weights import load_pretrained

    return load_pretrained(config.model, config.models_dir, source=config.weights)


def build_trainer(config, *, model=None, splits=None, **trainer_kwargs):
    """Data, loaders, model and Trainer for ``config``, in the chapter's order and seeding.

    Returns (trainer, (train, test, val)). ``trainer_kwargs`` go to ``Trainer`` (callbacks,
    checkpoint_path, stop_file, metrics_path, device).
    """
    from .batching import create_data_loaders
    from .prompts import get_prompt_style
    from .tokenizer import get_tokenizer
    from .trainer import Trainer

    train, test, val = splits or load_splits(config)
    tokenizer = get_tokenizer()
    # create_data_loaders seeds torch with config.seed first, as listing 7.6 does
    train_loader, val_loader, _ = create_data_loaders(
        train, val, test, tokenizer, batch_size=config.batch_size, num_workers=config.num_workers,
        allowed_max_length=config.allowed_max_length, prompt_style=config.prompt_style,
        mask_instruction=config.mask_instruction, seed=config.seed, group_by_length=config.group_by_length)
    model = model if model is not None else build_model(config)
    torch.manual_seed(config.seed)  # the chapter seeds again right before training
    sample_entry = (val or test or train)[0]
    trainer = Trainer(model, config, train_loader, val_loader, tokenizer=tokenizer,
                      sample_prompt=get_prompt_style(config.prompt_style).format_prompt(sample_entry),
                      **trainer_kwargs)
    return trainer, (train, test, val)


# ============================================================================ running

def execute_run(run, *, resume=False, responses=True, callbacks=(), dist=None):
    """Train ``run`` in this process (what the worker does): lock the device, train (or resume),
    save the final weights, answer the test split; status.json follows each phase.

    ``dist``: a ``sft.distributed.DistContext`` under torchrun. Ranks other than 0 only train
    (no lock, no files); rank 0 does everything else once training ends.
    """
    from .hardware import keep_freed_memory, resolve_device

    if resolve_device(run.config.device if dist is None else dist.device).type == "cpu":
        keep_freed_memory()  # a training process: reuse big tensors' memory instead of re-faulting it
    if dist is not None and not dist.is_main:
        return _execute_replica(run, resume, dist)
    from .hardware import device_key
    from .config import TrainingError

    config = run.config
    key = device_key(config.device if dist is None else dist.device)
    check_start(run, resume)  # refused here, the run's status is left as it was
    lock = acquire_device_lock(run.root, key, run.name, os.getpid(), take_over=(os.getppid(),))
    run._status = read_json(run.status_path, {}) or {}
    run.update_status(state="running", pid=os.getpid(), pid_started=_create_time(os.getpid()), device=key,
                      started=time.time(), finished=None, error=None, advice=None, log_tail=None, phase="setup",
                      world_size=1 if dist is None else dist.world_size)
    trainer = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # a polite kill: stop at the next step with a checkpoint
        if trainer is None:
            raise SystemExit(128 + signum)
        trainer.request_stop()

    if _in_main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        trainer, (_, test, _) = build_trainer(config, callbacks=[run.record_event, *callbacks],
                                              checkpoint_path=run.checkpoint_path, stop_file=run.stop_path,
                                              device=None if dist is None else dist.device)
        atomic_write_json(run.test_data_path, test)
        if resume:
            trainer.resume(run.checkpoint_path)
            run.record_event({"type": "resumed", "time": time.time(), "step": trainer.global_step,
                              "epoch": trainer.epoch + 1, "tokens_seen": trainer.tokens_seen})
        run.update_status(phase="training")
        result = trainer.fit()
        if dist is not None:
            dist.leave()  # the other ranks are done; nothing below talks to them
        if result["state"] == "stopped":
            run.update_status(state="stopped", phase=None, finished=time.time())
            return result
        run.update_status(phase="saving")
        _save_final(run, trainer)
        if responses and test:
            run.update_status(phase="responses")
            _write_responses(run, trainer, test, callbacks)
        run.update_status(state="completed", phase=None, finished=time.time())
        return result
    except TrainingError as exc:
        run.update_status(state="failed", phase=None, finished=time.time(), error=str(exc).splitlines()[0],
                          advice=exc.advice)
        raise
    except BaseException as exc:
        run.update_status(state="failed", phase=None, finished=time.time(),
                          error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        release_device_lock(lock)
        if _in_main_thread():
            signal.signal(signal.SIGTERM, previous)


def _execute_replica(run, resume, dist):
    """A rank > 0 under torchrun: the same trainer on its share of each batch, silent."""
    trainer, _ = build_trainer(run.config, device=dist.device)
    if _in_main_thread():  # torchrun forwards SIGTERM to every rank; all agree on the stop step
        signal.signal(signal.SIGTERM, lambda signum, frame: trainer.request_stop())
    if resume:
        trainer.resume(run.checkpoint_path)
    result = trainer.fit()
    dist.leave()
    return result


def _in_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _save_final(run, trainer):
    from .finetuned import save_finetuned

    config = trainer.config
    extra = {"model_name": canonical_model_name(config.model), "prompt_style": config.prompt_style,
             "run": run.name, "weights": config.weights, "random_init": config.weights == "random"}
    paths = save_finetuned(trainer.model, run.model_path, extra=extra)
    run.record_event({"type": "saved", "time": time.time(), "step": trainer.global_step, "paths": paths})
    return paths


def _write_responses(run, trainer, test, callbacks=()):
    from .generation import generate_responses
    from .tokenizer import get_tokenizer

    def progress(done, total):
        event = {"type": "responses", "time": time.time(), "step": trainer.global_step,
                 "done": done, "total": total}
        run.record_event(event)
        for callback in callbacks:
            callback(event)

    model = trainer.model.eval()
    if trainer.precision == "bf16":
        # Not in the book: answer with a bf16 copy where bf16 is fast (as the model was trained
        # under bf16 autocast); half the weight traffic per decoded token.
        model = copy.deepcopy(model).to(torch.bfloat16)
    return generate_responses(model, test, get_tokenizer(), prompt_style=trainer.config.prompt_style,
                              max_new_tokens=trainer.config.response_tokens,
                              batch_size=max(trainer.config.batch_size, RESPONSE_BATCH),
                              device=trainer.device, progress=progress, out_path=run.responses_path)
