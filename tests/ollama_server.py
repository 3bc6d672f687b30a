"""A real HTTP server on 127.0.0.1, in a thread, speaking the part of Ollama's API the judge uses.

    with FakeOllama(answer=lambda body: Reply("85")) as server:
        judge = OllamaJudge(server.url, "llama3", timeout=1, retries=1)
        ...
        server.chats  # the JSON body of each POST /api/chat, in arrival order

`GET /api/tags` lists `models`; `POST /api/chat` answers non-streaming, first from `script` (one
action per request, in order), then from `answer(body)`. Actions: `Reply(text)`, `Status(code)`
(an Ollama-style `{"error": ...}` body), `Slow(seconds, text)` (wait, then reply: past a client's
timeout the client has hung up by then). Other paths get 404.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    text: str


@dataclass(frozen=True)
class Status:
    code: int
    error: str = "something went wrong"


@dataclass(frozen=True)
class Slow:
    seconds: float
    text: str


Action = Reply | Status | Slow


class ScriptedServer:
    """The threaded HTTP server on 127.0.0.1 a fake judge runs: each chat request is answered by the next of
    `script`, then by `answer(body)`; `chats` holds the bodies in arrival order. A subclass passes the request
    handler factory and says its `url`."""

    def __init__(
        self,
        answer: Callable[[dict], Action],
        script: Iterable[Action],
        models: Iterable[str],
        handler_for: Callable[[ScriptedServer], type[BaseHTTPRequestHandler]],
    ) -> None:
        self.answer = answer
        self.script = list(script)
        self.models = list(models)
        self.chats: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # ends any Slow wait
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _next_action(self, body: dict) -> Action:
        with self._lock:
            self.chats.append(body)
            if self.script:
                return self.script.pop(0)
        return self.answer(body)


class FakeOllama(ScriptedServer):
    def __init__(
        self,
        answer: Callable[[dict], Action] = lambda body: Reply("50"),
        *,
        script: Iterable[Action] = (),
        models: Iterable[str] = ("llama3:latest",),
    ) -> None:
        self.requests: list[tuple[str, str]] = []
        super().__init__(answer, script, models, _handler_for)

    @property
    def url(self) -> str:
        return self.address


def tags_body(models: list[str]) -> dict:
    """What Ollama answers on GET /api/tags (trimmed to the fields a client reads)."""
    return {
        "models": [
            {"name": m, "model": m, "modified_at": "2024-05-01T12:00:00Z", "size": 4661224676,
             "digest": "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1",
             "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_0"}}
            for m in models
        ]
    }  # fmt: skip


def chat_body(model: str, text: str) -> dict:
    """What Ollama answers on a non-streaming POST /api/chat."""
    return {
        "model": model,
        "created_at": "2024-05-01T12:00:00Z",
        "message": {"role": "assistant", "content": text},
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_000_000,
        "prompt_eval_count": 100,
        "eval_count": 2,
    }


def _handler_for(server: FakeOllama) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            with server._lock:
                server.requests.append(("GET", self.path))
            if self.path == "/api/tags":
                self._json(200, tags_body(server.models))
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            with server._lock:
                server.requests.append(("POST", self.path))
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if self.path != "/api/chat":
                self._json(404, {"error": "not found"})
                return
            action = server._next_action(body)
            try:
                if isinstance(action, Status):
                    self._json(action.code, {"error": action.error})
                    return
                if isinstance(action, Slow) and server._stop.wait(action.seconds):
                    return
                self._json(200, chat_body(body.get("model", ""), action.text))
            except OSError:  # the client hung up (after its timeout)
                self.close_connection = True

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
