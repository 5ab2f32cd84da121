"""Not in the book: background jobs, the actions that outlive the page that started them.

Answering a whole test split or scoring it with a judge takes minutes; run inside a Streamlit
script, any click would cut it short. A job runs instead in its own detached process, like a
training worker (``sft.studio.worker``), and a page only starts it, watches it and stops it. A job
is a folder::

    job.json      {kind, params, created}: what to do
    status.json   {state, done, total, message, error, pid, create_time, started, ended, result,
                   stop_requested}; state is queued, running, completed, stopped or failed
    stop          present while a stop is requested
    log.txt       the job process's output

``start_job(folder, kind, params)`` writes them (``create_job``) and launches ``python -m sft
job --dir FOLDER`` (its own session, output to log.txt), refused while a job is active there.
That process calls ``run_job``: the kind's function from ``KINDS`` gets the params and a ``progress(done, total,
message=None)`` that records the counts and raises ``JobStopped`` once a stop is requested (or
SIGTERM came), so a kind saves as it goes and stops at its next progress call. ``Job(folder)``
reads it back: a job whose process is gone while its status says it runs reads as failed.

A kind is one function, ``register_kind("name", fn)`` (or ``@register_kind("name")``):
``fn(params, progress) -> result`` (JSON-able, or None), params being what ``start_job`` got.

Where jobs live: a run's answers job in ``<run>/jobs/answers``; a scoring job in
``<runs dir>/.jobs/score-<sha1 of the scores file's path, 12 hex digits>`` (``score_job_folder``),
one per scores file whatever answers it scores, so two pages cannot write one file at once.
"""
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .locks import create_time, pid_alive

STATES = ("queued", "running", "completed", "stopped", "failed")
ACTIVE_STATES = ("queued", "running")
JOB_ACTIVE = ACTIVE_STATES  # the same, under a name that cannot be mistaken for a run's ACTIVE_STATES
START_TIMEOUT_S = 120  # a "queued" job whose process was never recorded (its launcher died)
DEAD = "the job's process ended unexpectedly"
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class JobStopped(Exception):
    """Raised by a job's progress callback once a stop was requested: the job ends "stopped"."""


class JobError(RuntimeError):
    """A job cannot be started (one is active in that folder, an unknown kind, ...)."""


KINDS = {}  # kind -> function(params, progress) -> result


def register_kind(kind, function=None):
    """Make ``function(params, progress)`` the job kind ``kind``; usable as a decorator."""
    if function is None:
        return lambda fn: register_kind(kind, fn)
    KINDS[kind] = function
    return function


# ============================================================================ a job folder

class Job:
    """One job's folder; ``Job(folder)`` reads it (the folder need not exist yet)."""

    def __init__(self, folder):
        self.path = Path(folder).resolve()

    spec_path = property(lambda self: self.path / "job.json")
    status_path = property(lambda self: self.path / "status.json")
    stop_path = property(lambda self: self.path / "stop")
    log_path = property(lambda self: self.path / "log.txt")

    def __repr__(self):
        return f"Job({str(self.path)!r})"

    @property
    def exists(self):
        return self.spec_path.is_file()

    def spec(self):
        """job.json: {kind, params, created}; {} before any job ran here."""
        try:
            spec = read_json(self.spec_path, {})
        except (ValueError, UnicodeDecodeError):
            return {}
        return spec if isinstance(spec, dict) else {}

    kind = property(lambda self: self.spec().get("kind"))
    params = property(lambda self: self.spec().get("params") or {})

    @contextmanager
    def _locked(self, name="status"):
        """An flock on ``.<name>.lock``: status read-modify-writes of the job and its watchers are serial."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self):
        try:
            status = read_json(self.status_path, {})
        except (ValueError, UnicodeDecodeError):
            return {"state": "failed", "error": f"{self.status_path} is unreadable"}
        return status if isinstance(status, dict) else {"state": "failed", "error": f"{self.status_path} is no object"}

    def update(self, **fields):
        """Merge ``fields`` into status.json (atomically, under the folder's lock); the new status."""
        with self._locked():
            status = {**self._read(), **fields, "updated": time.time()}
            atomic_write_json(self.status_path, status)
        return status

    def status(self):
        """status.json ({} before any job); an active job whose process is gone is recorded as failed,
        with what it had done and saved kept."""
        status = self._read()
        if status.get("state") in ACTIVE_STATES and self._gone(status):
            with self._locked():
                status = self._read()  # it may have ended properly meanwhile
                if status.get("state") in ACTIVE_STATES and self._gone(status):
                    status.update(state="failed", ended=time.time(), error=DEAD, log_tail=self.tail_log(20),
                                  updated=time.time())
                    atomic_write_json(self.status_path, status)
        return status

    @staticmethod
    def _gone(status):
        if status.get("pid"):
            return not pid_alive(status["pid"], status.get("create_time"))
        return time.time() - (status.get("updated") or 0) > START_TIMEOUT_S

    @property
    def state(self):
        return self.status().get("state")

    @property
    def active(self):
        return self.state in ACTIVE_STATES

    def request_stop(self):
        """Ask the job to stop at its next progress call; False if none is active."""
        if not self.active:
            return False
        atomic_write_text(self.stop_path, f"{time.time()}\n")
        self.update(stop_requested=time.time(), message="stopping")
        return True

    @property
    def stop_requested(self):
        return self.stop_path.exists()

    def tail_log(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def wait(self, timeout=60.0, poll=0.2):
        """Block until the job is no longer active (or ``timeout`` s); returns its status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.get("state") not in ACTIVE_STATES or time.monotonic() >= deadline:
                return status
            time.sleep(poll)


# ============================================================================ starting one

def create_job(folder, kind, params, *, files=None):
    """Write a job into ``folder`` (job.json, ``files``, status "queued") without starting a process:
    ``start_job`` launches it, or ``run_job(folder)`` does it here. Refused (JobError) while a job is
    active there. ``files``: {name: bytes, or a JSON-able object} the job reads (e.g. an upload)."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    job = Job(folder)
    with job._locked("start"):  # two clicks, two sessions: one job
        current = job.status()
        if current.get("state") in ACTIVE_STATES:
            raise JobError(f"a {job.kind or 'background'} job is already {current['state']} in {job.path} "
                           f"(pid {current.get('pid')}): stop it or wait for it to end")
        job.stop_path.unlink(missing_ok=True)
        for name, content in (files or {}).items():
            if isinstance(content, (bytes, bytearray)):
                atomic_write_bytes(job.path / name, bytes(content))
            else:
                atomic_write_json(job.path / name, content)
        atomic_write_json(job.spec_path, {"kind": kind, "params": params, "created": time.time()})
        with job._locked():
            atomic_write_json(job.status_path, {"state": "queued", "done": 0, "total": None, "message": "starting",
                                                "error": None, "pid": None, "create_time": None, "started": None,
                                                "ended": None, "result": None, "updated": time.time()})
    return job


def start_job(folder, kind, params, *, files=None, python=None, env=None):
    """``create_job``, then ``python -m sft job --dir FOLDER`` launched detached (its own session,
    output to log.txt); returns the Job (its Popen on ``.process``). A launch that fails ends the
    job "failed" with the reason (JobError)."""
    job = create_job(folder, kind, params, files=files)
    cmd = [python or sys.executable, "-m", "sft", "job", "--dir", str(job.path)]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        with open(job.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {kind}: {' '.join(cmd[1:])}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
    except BaseException as exc:
        reason = f"could not start the job: {type(exc).__name__}: {exc}"
        job.update(state="failed", ended=time.time(), error=reason)
        raise JobError(reason) from exc
    with job._locked():  # the job may have written "running" already: only fill in what is missing
        status = job._read()
        if not status.get("pid"):
            status.update(pid=proc.pid, create_time=create_time(proc.pid), updated=time.time())
            atomic_write_json(job.status_path, status)
    job.process = proc
    return job


# ============================================================================ running one

def run_job(folder):
    """Do the job in ``folder`` in this process (``python -m sft job --dir``); returns its final status."""
    job = Job(folder)
    spec = job.spec()
    me = os.getpid()
    job.update(state="running", pid=me, create_time=create_time(me), started=time.time(), message=None)
    stop = {"signal": False}

    def on_sigterm(signum, frame):  # a polite kill: stop at the next progress call
        stop["signal"] = True

    main = threading.current_thread() is threading.main_thread()  # signals can be caught there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None

    def progress(done, total, message=None):
        job.update(done=done, total=total, message=message)
        if stop["signal"] or job.stop_requested:
            raise JobStopped()

    try:
        function = KINDS.get(spec.get("kind"))
        if function is None:
            raise JobError(f"unknown job kind {spec.get('kind')!r} in {job.spec_path}")
        if job.stop_requested:
            raise JobStopped()
        result = function(spec.get("params") or {}, progress)
    except JobStopped:
        return job.update(state="stopped", ended=time.time(), message="stopped")
    except BaseException as exc:  # the reason, with what the kind added (how much was saved)
        error = " ".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])])
        status = job.update(state="failed", ended=time.time(), error=error)
        if not isinstance(exc, Exception):
            raise
        import traceback

        traceback.print_exc()
        return status
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return job.update(state="completed", ended=time.time(), result=result, message=None)


# ============================================================================ the kinds

def answer_job_folder(run):
    return Path(run.path) / "jobs" / "answers"


def answer(params, progress):
    """A run's model answers ``entries_file``'s entries into the run's responses file, batch by batch.

    params: run (its folder), entries_file, max_new_tokens, temperature, top_k, seed, precision,
    batch_size (optional) and resume (keep the answers already in the file for the same entries).
    """
    import torch

    from ..tokenizer import get_tokenizer
    from .answers import RESPONSE_BATCH, answer_entries
    from .runs import Run

    run = Run(params["run"])
    entries = read_json(params["entries_file"])
    progress(0, len(entries), "loading the model")
    model = run.load_model()
    reuse = (read_json(run.responses_path, []) or []) if params.get("resume") else []
    if params.get("seed") is not None:
        torch.manual_seed(int(params["seed"]))  # as the chapter does before sampling
    results = answer_entries(model, entries, get_tokenizer(), prompt_style=run.config.prompt_style,
                             max_new_tokens=int(params.get("max_new_tokens", 256)),
                             temperature=float(params.get("temperature", 0.0)), top_k=params.get("top_k"),
                             precision=params.get("precision", "fp32"),
                             batch_size=int(params.get("batch_size") or RESPONSE_BATCH),
                             progress=progress, out_path=run.responses_path, partial=True, reuse=reuse)
    return {"answered": len(results), "path": str(run.responses_path)}


def answer_job_args(run, entries, *, max_new_tokens=256, temperature=0.0, top_k=None, seed=123, precision="fp32",
                    batch_size=None):
    """(folder, kind, params, files) of the job answering ``entries`` with ``run``'s model (see
    ``start_answer_job``); ``create_job(*args[:3], files=args[3])`` makes it without starting it."""
    folder = answer_job_folder(run)
    weights = run.weights_file()
    params = {"run": str(run.path), "entries_file": str(folder / "entries.json"),
              "entries_sha1": hashlib.sha1(json.dumps(entries, sort_keys=True).encode()).hexdigest(),
              "weights": [str(weights[0]), weights[1]] if weights else None, "max_new_tokens": int(max_new_tokens),
              "temperature": float(temperature), "top_k": int(top_k) if top_k else None,
              "seed": int(seed) if temperature else None,  # greedy decoding draws nothing
              "precision": precision, "batch_size": batch_size}
    before = Job(folder)
    earlier = {k: v for k, v in before.params.items() if k != "resume"}
    resume = before.state in ("stopped", "failed") and earlier == params and run.responses_path.is_file()
    return folder, "answer", {**params, "resume": resume}, {"entries.json": entries}


def start_answer_job(run, entries, **settings):
    """Answer ``entries`` (the run's test split) with ``run``'s model in the background; the Job.
    ``settings``: max_new_tokens, temperature, top_k, seed, precision, batch_size.

    A job that stopped (or failed) with the same entries, weights and settings goes on from the
    answers it saved; anything else starts again (the file then holds only the new answers)."""
    if run.is_active:  # its worker writes the same answers file when training ends
        raise JobError(f"run {run.name!r} is {run.state}: its answers are written when training ends; "
                       "stop it first to answer with its last checkpoint")
    folder, kind, params, files = answer_job_args(run, entries, **settings)
    return start_job(folder, kind, params, files=files)


def answering(run):
    """True while ``run``'s answers job is active: training or deleting the run must wait for it."""
    return Job(answer_job_folder(run)).active


def score_job_folder(runs_dir, store):
    digest = hashlib.sha1(str(Path(store).resolve()).encode()).hexdigest()[:12]
    return Path(runs_dir) / ".jobs" / f"score-{digest}"


def score(params, progress):
    """The judge scores ``entries_file``'s ``key`` answers (the first ``limit``) into ``store``.

    params: backend, url, model, entries_file, key, limit, concurrency, retry_unparsed, store.
    Each score is saved as it arrives (``sft.judge.score_responses``), so a stop keeps them."""
    from .. import judge

    entries = judge.load_entries(params["entries_file"])
    if params.get("limit"):
        entries = entries[:int(params["limit"])]
    client = judge.make_client(params.get("backend", "ollama"), params.get("model", "llama3"), params.get("url"),
                               timeout=(2.0, 120.0), retries=1)
    try:
        records = judge.score_responses(entries, params["key"], client=client, store=params["store"],
                                        concurrency=int(params.get("concurrency", 1)),
                                        retry_unparsed=bool(params.get("retry_unparsed")), progress=progress)
    except JobStopped as exc:  # the answers in flight were saved too: count them, then stop
        progress(len(getattr(exc, "records", ())), len(entries))
        raise
    return {"scored": sum(r["score"] is not None for r in records), "asked": len(records),
            "unparsed": sum(r["score"] is None for r in records), "store": str(params["store"])}


def start_score_job(runs_dir, store, *, key, backend="ollama", url=None, model="llama3", entries_file=None,
                    entries=None, limit=None, concurrency=1, retry_unparsed=False):
    """Score into ``store`` in the background (``score_job_folder``); the Job. The answers come from
    ``entries_file``, or ``entries`` (the bytes of an upload), kept in the job folder."""
    folder = score_job_folder(runs_dir, store)
    files = {}
    if entries is not None:
        files["entries"] = bytes(entries)
        entries_file = folder / "entries"
    if entries_file is None:
        raise JobError("a score job needs entries_file or entries")
    params = {"backend": backend, "url": url, "model": model, "entries_file": str(entries_file), "key": key,
              "limit": int(limit) if limit else None, "concurrency": int(concurrency),
              "retry_unparsed": bool(retry_unparsed), "store": str(store)}
    return start_job(folder, "score", params, files=files)


def download_job_folder(models_dir, name, source):
    slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
    return Path(models_dir) / ".jobs" / f"download-{slug}-{source}"


def download(params, progress):
    """GPT-2 ``name``'s files from ``source`` into ``models_dir`` (``sft.weights.download_weights``), with
    progress in MiB. A stop leaves the partial file, which the next download resumes."""
    from ..weights import download_weights

    mib = 2 ** 20
    path = download_weights(params["name"], params["models_dir"], source=params["source"], show_bar=False,
                            base_url=params.get("base_url"),
                            progress=lambda done, total, name: progress(done // mib, total // mib if total else None,
                                                                        name))
    return {"path": str(path)}


def start_download_job(models_dir, name, source, *, base_url=None):
    """Download in the background (``download_job_folder``); the Job."""
    params = {"name": name, "source": source, "models_dir": str(models_dir), "base_url": base_url}
    return start_job(download_job_folder(models_dir, name, source), "download", params)


register_kind("answer", answer)
register_kind("score", score)
register_kind("download", download)
