"""Fake servers on 127.0.0.1: Ollama's HTTP API and OpenAI's for the judge tests, and a file server
(Range requests and a few misbehaviours) for downloads.

Each server runs in a thread on a free port (port 0) and is a context manager::

    with FakeOllama(reply=lambda prompt, model: "85") as srv:
        query_model("hi", url=srv.url)
        srv.chat_requests[0]["body"]  # what the client sent

Knobs (plain attributes, change them between calls): ``models``, ``reply(prompt, model) -> str``,
``fail_first`` (answer HTTP 500 to that many chat requests), ``fail_after`` (answer 500 to every
chat request once that many have succeeded), ``delay`` (seconds before answering; ``delay_in_stream``
puts it after the first line instead), ``split`` (cut the stream into pieces of that many bytes,
one HTTP chunk each, so lines break mid-chunk), ``inject_line`` (raw bytes sent as the second
line), ``drop_done`` (end the stream without its final line), ``gate`` (a threading.Barrier each
chat request waits on, to prove requests run concurrently). ``requests`` logs every request.
"""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfer encoding, as Ollama streams

    def log_message(self, *args):  # keep test output quiet
        pass

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _handle(self, method):
        body = self._body() if method == "POST" else None
        srv = self.server
        with srv.lock:
            srv.requests.append({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
        self.close_connection = True  # one request per connection: nothing lingers at shutdown
        try:
            srv.route(self, method, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a time-out test); nothing to answer

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    # -- helpers the servers answer with
    def send_json(self, status, obj):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_chunked(self, pieces, content_type, pause_after_first=0.0):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for n, piece in enumerate(pieces):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()  # each piece leaves as its own chunk
            if n == 0 and pause_after_first:
                self.server.stopping.wait(pause_after_first)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads

    def __init__(self, *, models=("llama3:latest",), reply=None, delay=0.0, delay_in_stream=False,
                 fail_first=0, fail_after=None, gate=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models = list(models)
        self.reply = reply or (lambda prompt, model: "85")
        self.delay, self.delay_in_stream = delay, delay_in_stream
        self.fail_first, self.fail_after, self.gate = fail_first, fail_after, gate
        self.requests = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.in_flight = self.max_in_flight = self.served = 0
        self._thread = None

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def chat_requests(self):
        return [r for r in self.requests if r["method"] == "POST"]

    def handle_error(self, request, client_address):
        pass  # a client hanging up mid-reply is expected in time-out tests

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.stopping.set()  # wakes handlers waiting out a delay
        if self.gate is not None:
            self.gate.abort()
        self.shutdown()
        self.server_close()
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _known(self, model):
        def tagged(name):
            return name if ":" in name else name + ":latest"
        return tagged(model) in {tagged(m) for m in self.models}

    def _chat_gate(self, handler):
        """Shared chat-request preamble; -> True when the request should be failed with a 500."""
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self.fail_first > 0 or (self.fail_after is not None and self.served >= self.fail_after)
            if self.fail_first > 0:
                self.fail_first -= 1
        try:
            if self.gate is not None and not fail:
                self.gate.wait(timeout=5)
        except threading.BrokenBarrierError:
            fail = True
        with self.lock:
            self.in_flight -= 1
        if not fail and self.delay and not self.delay_in_stream:
            self.stopping.wait(self.delay)
        return fail

    def _mark_served(self):
        with self.lock:
            self.served += 1


class FakeOllama(_FakeServer):
    """/api/chat (streamed NDJSON, or one object with "stream": false), /api/tags, /api/version."""

    def __init__(self, *, split=None, inject_line=None, drop_done=False, trickle=None, **kwargs):
        super().__init__(**kwargs)
        self.split, self.inject_line, self.drop_done = split, inject_line, drop_done
        self.trickle, self.trickled = trickle, 0  # (seconds between lines, lines): a reply that never ends

    @property
    def url(self):
        return self.base_url + "/api/chat"

    def route(self, h, method, body):
        if method == "GET" and h.path == "/api/tags":
            models = [{"name": m, "model": m, "modified_at": "2024-05-01T00:00:00Z", "size": 4661224676,
                       "digest": "0" * 64, "details": {"family": "llama", "parameter_size": "8.0B"}}
                      for m in self.models]
            return h.send_json(200, {"models": models})
        if method == "GET" and h.path == "/api/version":
            return h.send_json(200, {"version": "0.0.0-fake"})
        if method != "POST" or h.path != "/api/chat":
            return h.send_json(404, {"error": "404 page not found"})
        model = body.get("model", "")
        if self._chat_gate(h):
            return h.send_json(500, {"error": "fake server failure"})
        if not self._known(model):
            return h.send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
        content = self.reply(body["messages"][-1]["content"], model)
        self._mark_served()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        if self.trickle:
            return self._send_trickle(h, model, stamp)
        if body.get("stream") is False:
            return h.send_json(200, {"model": model, "created_at": stamp, "done": True,
                                     "message": {"role": "assistant", "content": content}})
        # Like Ollama: a few characters per line, then a final line with done true and timings.
        lines = [{"model": model, "created_at": stamp, "message": {"role": "assistant", "content": content[i:i + 2]},
                  "done": False} for i in range(0, len(content), 2)]
        if not self.drop_done:
            lines.append({"model": model, "created_at": stamp, "message": {"role": "assistant", "content": ""},
                          "done": True, "done_reason": "stop", "total_duration": 1000, "eval_count": len(lines)})
        raw = [json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n" for line in lines]
        if self.inject_line is not None:
            raw.insert(1, self.inject_line + b"\n")
        if self.split:
            data = b"".join(raw)
            raw = [data[i:i + self.split] for i in range(0, len(data), self.split)]
        pause = self.delay if self.delay_in_stream else 0.0
        h.send_chunked(raw, "application/x-ndjson", pause_after_first=pause)


    def _send_trickle(self, h, model, stamp):
        """One line every ``trickle[0]`` seconds, ``trickle[1]`` of them, never "done"."""
        pause, count = self.trickle
        h.send_response(200)
        h.send_header("Content-Type", "application/x-ndjson")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        line = json.dumps({"model": model, "created_at": stamp, "message": {"role": "assistant", "content": "8"},
                           "done": False}).encode() + b"\n"
        try:
            for _ in range(count):
                h.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                h.wfile.flush()
                self.trickled += 1
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up: what the deadline is for


class FakeOpenAI(_FakeServer):
    """/v1/chat/completions (not streamed) and /v1/models; checks the Bearer key if ``api_key`` is set."""

    def __init__(self, *, api_key=None, **kwargs):
        super().__init__(**kwargs)
        self.api_key = api_key

    @property
    def url(self):
        return self.base_url + "/v1"

    def route(self, h, method, body):
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return h.send_json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                               "code": "invalid_api_key"}})
        if method == "GET" and h.path == "/v1/models":
            return h.send_json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
        if method != "POST" or h.path != "/v1/chat/completions":
            return h.send_json(404, {"error": {"message": f"no route {h.path}"}})
        model = body.get("model", "")
        if self._chat_gate(h):
            return h.send_json(500, {"error": {"message": "fake server failure"}})
        if model not in self.models:
            return h.send_json(404, {"error": {"message": f"The model `{model}` does not exist.",
                                               "type": "invalid_request_error", "code": "model_not_found"}})
        if body.get("stream"):
            return h.send_json(400, {"error": {"message": "this fake answers stream=false only"}})
        content = self.reply(body["messages"][-1]["content"], model)
        self._mark_served()
        h.send_json(200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                          "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": content}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class FileServer:
    """127.0.0.1 HTTP server for ``files`` (url path -> bytes), with Range and a few misbehaviours."""

    def __init__(self, files):
        self.files, self.requests = dict(files), []
        self.ignore_range, self.short_body, self.extra_headers = False, set(), {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and not outer.ignore_range:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                # a short body promises more bytes than it sends, then hangs up
                promised = len(body) - start + (1000 if self.path in outer.short_body else 0)
                self.send_header("Content-Length", str(promised))
                for k, v in outer.extra_headers.get(self.path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[start:])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
