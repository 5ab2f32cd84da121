"""The judge's HTTP clients: Ollama's /api/chat and OpenAI-compatible /v1/chat/completions.

Not in the book: section 7.8 posts to Ollama with urllib and no time-out. Here every request has
time-outs, connection errors and HTTP 5xx are retried with backoff, and each failure is an error
a person can act on ("start `ollama serve`", "run `ollama pull llama3`"). A client has
``.chat(prompt) -> str``, ``.status() -> ServerStatus`` and ``.name`` (which judge gave a score).
The chapter's functions built on these live in ``sft.judge``.
"""
import json
import os
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
import urllib3

OLLAMA_URL = "http://localhost:11434/api/chat"
OPENAI_URL = "http://localhost:8000/v1"  # vLLM's default; llama.cpp's server uses port 8080
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the chapter's, for reproducible scores
DEFAULT_TIMEOUT = (5.0, 300.0)  # (connect, read) seconds; a first request may wait for the model to load


# ---------------------------------------------------------------------------------------------
# Errors a person can act on


class JudgeError(RuntimeError):
    """Base class: the judge could not give a reply."""


class ServerUnavailableError(JudgeError):
    """Nothing answers at the URL."""


class ModelNotFoundError(JudgeError):
    """The server answers but does not have the model."""


class JudgeTimeoutError(JudgeError, TimeoutError):
    """The server took longer than the read time-out."""


class MalformedResponseError(JudgeError):
    """The reply was not what the API promises (bad JSON line, error mid-stream, cut short)."""


class JudgeHTTPError(JudgeError):
    """Any other refusal (HTTP 4xx, or 5xx once the retries are spent)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def _error_text(resp):
    """The message in an error reply: Ollama {"error": "..."}, OpenAI {"error": {"message": ...}}."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:200]
    err = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(err, dict):
        err = err.get("message", err)
    return str(err)[:500]


def _is_loopback(url):
    return urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1")


# ---------------------------------------------------------------------------------------------
# Clients: .chat(prompt) -> str, .status() -> ServerStatus, .name identifies the judge


@dataclass
class ServerStatus:
    url: str
    reachable: bool
    models: list = field(default_factory=list)
    error: str | None = None  # what to do, when not reachable or the listing failed
    backend: str = "ollama"

    def has_model(self, model):
        return model_available(model, self.models)

    def problem(self, model):
        """What stops ``model`` being asked here, as advice a person can follow; None when all is well."""
        if self.error:
            return self.error
        if not self.has_model(model):
            if self.backend == "ollama":
                return f"The Ollama server at {self.url} does not have model '{model}': run `ollama pull {model}`."
            return f"The server at {self.url} does not list model '{model}': pick one it lists."
        return None


class _Client:
    backend = ""

    def __init__(self, model, url, *, timeout=DEFAULT_TIMEOUT, retries=3, backoff=0.5, deadline=None):
        self.model, self.url = model, url
        self.timeout = timeout if isinstance(timeout, tuple) else (min(5.0, timeout), timeout)
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got retries={retries}, backoff={backoff}")
        self.retries, self.backoff = retries, backoff
        # The whole reply must arrive within this many seconds (the read time-out bounds each wait
        # between bytes only: a server trickling a line every second would never trip it).
        self.deadline = float(self.timeout[1] if deadline is None else deadline)
        self._local = threading.local()  # one requests.Session per thread (sessions are not thread-safe)

    @property
    def name(self):
        """Where the judge answers, for people: backend, model and URL."""
        return f"{self.backend}:{self.model}@{self.url}"

    @property
    def identity(self):
        """Which judge gave a score: backend, model and its sampling settings, not the URL's spelling
        (localhost and 127.0.0.1 are the same judge; a score is reused whichever was typed)."""
        return f"{self.backend}:{self.model} {json.dumps(self._settings(), sort_keys=True)}"

    def _settings(self):
        return {}

    def _lines(self, resp, url):
        """The reply's lines as they arrive, within the deadline."""
        end, buffer = time.monotonic() + self.deadline, b""
        for chunk in resp.iter_content(chunk_size=4096):
            if time.monotonic() > end:
                raise self._timed_out(url, total=True)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            yield from lines
        if buffer:
            yield buffer

    def _session(self):
        if getattr(self._local, "session", None) is None:
            session = requests.Session()
            session.trust_env = not _is_loopback(self.url)  # never send a local judge through a proxy
            self._local.session = session
        return self._local.session

    def _unavailable(self):
        raise NotImplementedError

    def _timed_out(self, url, total=False):
        if total:
            return JudgeTimeoutError(
                f"The judge at {url} kept sending but did not finish its reply within {self.deadline:g} s; "
                f"raise the time-out (timeout=, --timeout) or check the server.")
        return JudgeTimeoutError(
            f"The judge at {url} did not answer within {self.timeout[1]:g} s: the model may still be "
            f"loading or the server is busy. Raise the time-out (timeout=, --timeout) or try again."
        )

    def _request(self, method, url, read, **kwargs):
        """Send, then ``read(response)``; retry connection errors and 5xx with exponential backoff.
        Time-outs are not retried: a slow judge would only make us wait (retries + 1) times longer."""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with self._session().request(method, url, timeout=self.timeout, **kwargs) as resp:
                    if resp.status_code >= 500 and attempt < self.retries:
                        continue
                    if resp.status_code != 200:
                        raise self._http_error(resp, url)
                    return read(resp)
            except requests.exceptions.ReadTimeout:
                raise self._timed_out(url) from None
            except requests.exceptions.ConnectionError as exc:
                # A read time-out in the middle of a stream surfaces as ConnectionError.
                if exc.args and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError):
                    raise self._timed_out(url) from None
                if attempt == self.retries:
                    raise self._unavailable() from exc
            except requests.exceptions.ChunkedEncodingError as exc:
                if attempt == self.retries:
                    raise MalformedResponseError(f"The reply from {url} was cut off: {exc}") from exc

    def _http_error(self, resp, url):
        return JudgeHTTPError(f"{url} answered HTTP {resp.status_code}: {_error_text(resp)}", resp.status_code)


def _ollama_base(url):
    """http://host:11434/api/chat -> http://host:11434 (a base URL is taken as it is)."""
    url = url.rstrip("/")
    for suffix in ("/api/chat", "/api/generate", "/api/tags", "/api"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


class OllamaClient(_Client):
    """Ollama's /api/chat, streamed NDJSON, as the chapter's ``query_model`` sends it."""

    backend = "ollama"

    def __init__(self, model="llama3", url=OLLAMA_URL, *, options=None, **kwargs):
        base = _ollama_base(url)
        super().__init__(model, base + "/api/chat", **kwargs)
        self.base = base
        self.options = dict(OPTIONS if options is None else options)

    def _unavailable(self):
        return ServerUnavailableError(
            f"No Ollama server answers at {self.base}: start it with `ollama serve` (or check the URL)."
        )

    def _http_error(self, resp, url):
        text = _error_text(resp)
        if resp.status_code == 404 and "not found" in text and "model" in text:
            return ModelNotFoundError(
                f"The Ollama server at {self.base} does not have model '{self.model}': "
                f"run `ollama pull {self.model}`."
            )
        return super()._http_error(resp, url)

    def _settings(self):
        return self.options

    def chat(self, prompt):
        data = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "options": self.options}
        return self._request("POST", self.url, self._read_stream, json=data, stream=True)

    def _read_stream(self, resp):
        # Ollama streams one JSON object per line; lines split across chunks are joined.
        parts = []
        for n, line in enumerate(self._lines(resp, self.url), 1):
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                raise MalformedResponseError(
                    f"Line {n} of the stream from {self.url} is not JSON: {line[:80]!r}"
                ) from None
            if not isinstance(message, dict):
                raise MalformedResponseError(f"Line {n} of the stream from {self.url} is not a JSON object")
            if "error" in message:
                raise MalformedResponseError(f"The Ollama server reported an error mid-stream: {message['error']}")
            parts.append((message.get("message") or {}).get("content", ""))
            if message.get("done"):
                return "".join(parts)
        # Without "done" the reply may be cut short ("8" of "85"): refuse it rather than mis-score.
        raise MalformedResponseError(f"The stream from {self.url} ended before its final 'done' line")

    def status(self, *, timeout=2.0):
        return ollama_status(self.base, timeout=timeout)


def _openai_root(url):
    """Accept http://h:8000, http://h:8000/v1 or the full .../v1/chat/completions."""
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


class OpenAIClient(_Client):
    """An OpenAI-compatible /v1/chat/completions (llama.cpp server, vLLM, hosted APIs), not streamed.

    The key is read from the environment variable ``api_key_env`` unless given; without one no
    Authorization header is sent (local servers rarely want one).
    """

    backend = "openai"

    def __init__(self, model="llama3", url=OPENAI_URL, *, api_key=None, api_key_env="OPENAI_API_KEY",
                 temperature=0, seed=123, **kwargs):
        self.root = _openai_root(url)
        super().__init__(model, self.root + "/v1/chat/completions", **kwargs)
        self.api_key_env = api_key_env
        self._key_given = api_key is not None
        self._key = api_key if self._key_given else os.environ.get(api_key_env)
        self.temperature, self.seed = temperature, seed

    def _headers(self):
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _unavailable(self):
        return ServerUnavailableError(
            f"No server answers at {self.root}: start your OpenAI-compatible server "
            f"(llama.cpp, vLLM, ...) or check the URL."
        )

    def _http_error(self, resp, url):
        text = _error_text(resp)
        if resp.status_code in (401, 403):
            fix = "check the api_key given" if self._key_given else f"set ${self.api_key_env} to a valid key"
            return JudgeHTTPError(f"{url} refused the API key (HTTP {resp.status_code}: {text}): {fix}.",
                                  resp.status_code)
        if resp.status_code == 404 and ("model" in text.lower()):
            return ModelNotFoundError(
                f"The server at {self.root} does not serve model '{self.model}': {text}. "
                f"Use a model it lists (GET {self.root}/v1/models).")
        return super()._http_error(resp, url)

    def _settings(self):
        return {"temperature": self.temperature, "seed": self.seed}

    def chat(self, prompt):
        data = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "seed": self.seed, "stream": False}
        return self._request("POST", self.url, self._read_reply, json=data, headers=self._headers(), stream=True)

    def _read_reply(self, resp):
        body = b"\n".join(self._lines(resp, self.url))
        try:
            return json.loads(body)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise MalformedResponseError(
                f"The reply from {self.url} is not a chat completion: {body[:200]!r}") from None

    def status(self, *, timeout=2.0):
        url = self.root + "/v1/models"
        try:
            resp = self._session().get(url, timeout=timeout, headers=self._headers())
        except requests.exceptions.RequestException:
            return ServerStatus(self.root, False, [], str(self._unavailable()), "openai")
        if resp.status_code != 200:
            return ServerStatus(self.root, True, [], str(self._http_error(resp, url)), "openai")
        try:
            models = [m["id"] for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return ServerStatus(self.root, True, [], f"{url} did not list models in OpenAI's format", "openai")
        return ServerStatus(self.root, True, models, backend="openai")


def make_client(backend="ollama", model="llama3", url=None, **kwargs):
    """Client by backend name ("ollama" or "openai"); url None = that backend's local default."""
    if backend == "ollama":
        return OllamaClient(model, url or OLLAMA_URL, **kwargs)
    if backend == "openai":
        return OpenAIClient(model, url or OPENAI_URL, **kwargs)
    raise ValueError(f"unknown judge backend {backend!r}; use 'ollama' or 'openai'")


# ---------------------------------------------------------------------------------------------
# Health check: ask the server itself, never block for long


def ollama_status(url=OLLAMA_URL, *, timeout=2.0):
    """Ask the server itself (GET /api/tags): -> ServerStatus(url, reachable, models, error)."""
    base = _ollama_base(url)
    session = requests.Session()
    session.trust_env = not _is_loopback(base)
    try:
        with session:
            resp = session.get(base + "/api/tags", timeout=timeout)
    except requests.exceptions.RequestException:
        return ServerStatus(base, False, [], f"No Ollama server answers at {base}: start it with `ollama serve`.")
    if resp.status_code != 200:
        return ServerStatus(base, True, [], f"{base}/api/tags answered HTTP {resp.status_code}: {_error_text(resp)}")
    try:
        models = [m["name"] for m in resp.json()["models"]]
    except (ValueError, KeyError, TypeError):
        return ServerStatus(base, True, [], f"{base}/api/tags did not list models in Ollama's format")
    return ServerStatus(base, True, models)


def model_available(model, models):
    """Whether ``model`` is among ``models``; an untagged name means ":latest" ("llama3")."""
    def tagged(name):
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
    return tagged(model) in {tagged(m) for m in models}
