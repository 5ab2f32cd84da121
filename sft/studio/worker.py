"""Not in the book: the training worker, the process that trains one run folder.

``launch_worker(run)`` takes the device lock, starts ``python -m sft train --run-dir ...
--progress plain`` detached (its own session, logging to log.txt) and hands it the lock; that
process calls ``execute_run``: build data, model and ``Trainer`` (``build_trainer``), train or
resume, save the final weights, answer the test split, and keep status.json current through
each phase. Under ``torchrun`` every rank runs ``execute_run``; only rank 0 holds the lock,
writes the run folder and answers. A run always reaches a final state: a launch that fails,
a worker that dies, a diverging loss and a full disk each end as "failed" with the reason.
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..batching import create_data_loaders
from ..data import load_instruction_data, split_data
from ..dpo import load_preference_data
from ..model import canonical_model_name
from ..prompts import get_prompt_style
from ..tokenizer import get_tokenizer
from .adapters import save_adapter
from .answers import RESPONSE_BATCH, answer_entries
from .config import TrainingError
from .dpo_config import is_dpo
from .files import DiskFullError, atomic_write_json
from .finetuned import save_finetuned
from .hardware import device_key, keep_freed_memory, peak_memory_mb, resolve_device
from .jobs import answering
from .locks import LOCK_FD_ENV, DeviceLock, create_time
from .models import build_model
from .runs import RunError
from .trainer import Trainer

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


# ============================================================================ launching

def check_start(run, resume):
    """Refuse a resume without a checkpoint, and a fresh start of a run that has one (resume it).

    A run that trained but left no checkpoint (killed before its first) may start again from
    step 0: its earlier events are then superseded (a "resumed" event at step -1).
    """
    if resume and not run.has_checkpoint:
        raise RunError(f"run {run.name!r} has no checkpoint to resume from ({run.checkpoint_path}): "
                       "start it again from step 0 instead")
    if not resume and run.has_checkpoint:
        raise RunError(f"run {run.name!r} has already trained: resume it, or create a new run")


def launch_worker(run, *, resume=False, responses=True, python=None, env=None):
    """Start ``python -m sft train --run-dir RUN`` detached, logging to log.txt; returns the Popen.

    The launcher takes the device lock first (so two clicks, two app sessions or two runs
    folders cannot start two trainings on one device) and passes the locked file to the worker.
    If the worker cannot be started, the run ends "failed" with the reason and the lock is freed.
    """
    if run.is_active:
        raise RunError(f"run {run.name!r} is already {run.state}")
    if answering(run):  # both would write the run's answers file
        raise RunError(f"run {run.name!r} is answering its test split (Compare page): stop that job or let it "
                       "end before training it again")
    check_start(run, resume)
    key = device_key(run.config.device)
    lock = DeviceLock.acquire(key, run=run.name)  # DeviceBusyError: the run is left as it was
    try:
        run.clean_temp_files()
        run.stop_path.unlink(missing_ok=True)
        (run.path / "worker.json").unlink(missing_ok=True)  # else the old worker would look crashed
        run.update_status(state="starting", pid=None, device=key, error=None, advice=None, log_tail=None,
                          finished=None, launcher_pid=os.getpid(), launcher_started=create_time(os.getpid()))
        cmd = [python or sys.executable, "-m", "sft", "train", "--run-dir", str(run.path), "--progress", "plain"]
        cmd += (["--resume"] if resume else []) + ([] if responses else ["--no-responses"])
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[LOCK_FD_ENV] = str(lock.fd)
        with open(run.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                      f"{' '.join(cmd[1:])}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, pass_fds=(lock.fd,))
        record = {"pid": proc.pid, "create_time": create_time(proc.pid), "run": run.name, "since": time.time()}
        atomic_write_json(run.path / "worker.json", record)
        lock.describe(run=run.name, pid=proc.pid)
    except BaseException as exc:
        reason = f"could not start the training worker: {type(exc).__name__}: {exc}"
        try:
            run.update_status(state="failed", finished=time.time(), error=reason)
        except OSError:
            pass  # a full disk: status() reports the launch as failed once its launcher is gone
        raise RunError(reason) from exc
    finally:
        lock.release()  # the worker holds its own copy now (or there is no worker)
    return proc


def resume_worker(run, **kwargs):
    """Continue ``run`` from its last checkpoint in a new worker."""
    return launch_worker(run, resume=True, **kwargs)


# ============================================================================ building

def load_splits(config):
    """(train, test, val) for ``config``: its data source (pairs for DPO), cut to ``limit``, split as the chapter does."""
    if is_dpo(config):
        data = load_preference_data(config.data, duplicates=config.duplicates, identical=config.identical)
    else:
        data = load_instruction_data(config.data, duplicates=config.duplicates)
    if config.limit is not None:
        data = data[:config.limit]
    train, test, val = split_data(data)
    if not train:
        raise ValueError(f"{config.data or 'the bundled data'} gives no training entries "
                         f"({len(data)} entries after limit={config.limit})")
    return train, test, val


def build_trainer(config, *, model=None, splits=None, **trainer_kwargs):
    """Data, loaders, model and Trainer for ``config``, in the chapter's order and seeding.

    Returns (trainer, (train, test, val)). ``trainer_kwargs`` go to ``Trainer`` (callbacks,
    checkpoint_path, stop_file, metrics_path, device).
    """
    if is_dpo(config):  # preference tuning: its pairs, loaders and trainer
        from .dpo_trainer import build_dpo_trainer

        return build_dpo_trainer(config, splits or load_splits(config), model=model, **trainer_kwargs)
    train, test, val = splits or load_splits(config)
    tokenizer = get_tokenizer()
    model = model if model is not None else build_model(config)
    check_lengths(config, model, (train, val), tokenizer)
    # create_data_loaders seeds torch with config.seed first, as listing 7.6 does
    train_loader, val_loader, _ = create_data_loaders(
        train, val, test, tokenizer, batch_size=config.batch_size, num_workers=config.num_workers,
        allowed_max_length=config.allowed_max_length, prompt_style=config.prompt_style,
        mask_instruction=config.mask_instruction, seed=config.seed, group_by_length=config.group_by_length)
    torch.manual_seed(config.seed)  # the chapter seeds again right before training
    sample_entry = (val or test or train)[0]
    trainer = Trainer(model, config, train_loader, val_loader, tokenizer=tokenizer,
                      sample_prompt=get_prompt_style(config.prompt_style).format_prompt(sample_entry),
                      **trainer_kwargs)
    return trainer, (train, test, val)


def check_lengths(config, model, splits, tokenizer):
    """Refuse, before training, examples the model cannot take: longer than its context after the
    collate's cut to ``allowed_max_length`` (they would fail steps later, and again on resume)."""
    context = model.pos_emb.num_embeddings
    if config.allowed_max_length <= context:
        return
    style = get_prompt_style(config.prompt_style)
    for part, entries in zip(("train", "validation"), splits):
        for i, entry in enumerate(entries):
            n = len(tokenizer.encode(style.format_example(entry)))  # + its end-of-text, - the shift: n inputs
            if n > context:
                raise TrainingError(
                    f"{part} entry {i} has {n} tokens, but {canonical_model_name(config.model)} reads at most "
                    f"{context} and allowed_max_length is {config.allowed_max_length}",
                    [f"allowed_max_length={context} (the collate cuts longer examples)"])


# ============================================================================ running

def _take_lock(run, key):
    """The lock the launcher handed over, else take it here (a run started from the command line)."""
    return DeviceLock.inherited(key, run=run.name) or DeviceLock.acquire(key, run=run.name)


def execute_run(run, *, resume=False, responses=True, callbacks=(), dist=None):
    """Train ``run`` in this process (what the worker does): lock the device, train (or resume),
    save the final weights, answer the test split (as much as ``config.answers_after_training``
    allows); status.json follows each phase.

    ``dist``: a ``sft.studio.distributed.DistContext`` under torchrun. Ranks other than 0 only
    train (no lock, no files); rank 0 does everything else once training ends.
    """
    config = run.config
    if resolve_device(config.device if dist is None else dist.device).type == "cpu":
        keep_freed_memory()  # a training process: reuse big tensors' memory instead of re-faulting it
    if dist is not None and not dist.is_main:
        return _execute_replica(run, resume, dist)
    key = device_key(config.device if dist is None else dist.device)
    check_start(run, resume)  # refused here, the run's status is left as it was
    lock = _take_lock(run, key)
    trainer = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # a polite kill: stop at the next step with a checkpoint
        if trainer is None:
            raise SystemExit(128 + signum)
        trainer.request_stop()

    try:
        run.clean_temp_files()  # a write a kill interrupted (refused while a launcher's "starting")
        run._status = run._read_status()
        run.update_status(state="running", pid=os.getpid(), pid_started=create_time(os.getpid()), device=key,
                          started=time.time(), finished=None, error=None, advice=None, log_tail=None,
                          phase="setup", world_size=1 if dist is None else dist.world_size)
        if _in_main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        trainer, (_, test, _) = build_trainer(config, callbacks=[run.record_event, *callbacks],
                                              checkpoint_path=run.checkpoint_path, stop_file=run.stop_path,
                                              device=None if dist is None else dist.device)
        atomic_write_json(run.test_data_path, test)
        if resume:
            trainer.resume(run.checkpoint_path)
            run.record_event({"type": "resumed", "time": time.time(), "step": trainer.global_step,
                              "epoch": trainer.epoch + 1, "tokens_seen": trainer.tokens_seen})
        elif run.metrics_path.is_file():  # trained before, no checkpoint: a fresh start supersedes it
            run.record_event({"type": "resumed", "time": time.time(), "step": -1, "epoch": 1, "tokens_seen": 0,
                              "restart": True})
        run.update_status(phase="training")
        result = trainer.fit()
        run.update_status(peak_memory_mb=peak_memory_mb(trainer.device))  # this process's, rank 0's
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
        _record_failure(run, str(exc).splitlines()[0], exc.advice)
        raise
    except DiskFullError as exc:
        _record_failure(run, str(exc))
        raise
    except BaseException as exc:
        _record_failure(run, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        lock.release()
        if _in_main_thread():
            signal.signal(signal.SIGTERM, previous)


def _record_failure(run, error, advice=None):
    try:
        run.update_status(state="failed", phase=None, finished=time.time(), error=error, advice=advice)
    except OSError:  # the disk is full: status() reports the dead worker with the log's reason
        pass


def _execute_replica(run, resume, dist):
    """A rank > 0 under torchrun: the same trainer on its share of each batch, silent."""
    # The checkpoint path too, though only rank 0 writes it: under FSDP every rank gathers its shards into it.
    trainer, _ = build_trainer(run.config, device=dist.device, checkpoint_path=run.checkpoint_path)
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
    config = trainer.config
    bad = [name for name, p in trainer.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"the trained weights hold NaN or infinite values ({bad[0]} and {len(bad) - 1} more): "
                            "training diverged; nothing was saved, the last checkpoint is kept",
                            [f"a lower learning rate (now {config.lr:g})"])
    extra = {"model_name": canonical_model_name(config.model), "prompt_style": config.prompt_style,
             "run": run.name, "weights": config.weights, "random_init": config.weights == "random",
             "method": config.method}
    model, paths = trainer.model, {}
    if config.lora_rank:  # keep the adapters (a few MB), then fold them in: a plain GPTModel downstream
        from ..lora import lora_config, merge_lora

        paths["adapter"] = str(save_adapter(run.adapter_path, model, config))
        extra["lora"] = lora_config(model)
        model = merge_lora(model)
    paths.update(save_finetuned(model, run.model_path, extra=extra))
    run.record_event({"type": "saved", "time": time.time(), "step": trainer.global_step, "paths": paths})
    return paths


def _write_responses(run, trainer, test, callbacks=()):
    def progress(done, total):
        event = {"type": "responses", "time": time.time(), "step": trainer.global_step,
                 "done": done, "total": total}
        run.record_event(event)
        for callback in callbacks:
            callback(event)

    # The run's own limits bound the answers too: answer_limit, or one batch after a max_steps cut.
    config = trainer.config
    full_steps = config.epochs * math.ceil(len(trainer.train_loader) / config.grad_accum_steps)
    test = test[:config.answers_after_training(len(test), cut_short=trainer.total_steps < full_steps)]
    # Answer in bf16 where the model trained under bf16 autocast (bf16 is fast here).
    return answer_entries(trainer.model, test, get_tokenizer(), prompt_style=trainer.config.prompt_style,
                          max_new_tokens=trainer.config.response_tokens,
                          batch_size=max(trainer.config.batch_size, RESPONSE_BATCH), device=trainer.device,
                          precision=trainer.precision, progress=progress, out_path=run.responses_path)
