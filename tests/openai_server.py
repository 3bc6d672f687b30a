"""A real HTTP server on 127.0.0.1, in a thread, speaking the part of the OpenAI API the judge uses.

    with FakeOpenAI(key="sk-test", answer=lambda body: Reply("85")) as server:
        judge = OpenAIJudge(server.url, "judge-model", api_key_env="KEY", timeout=1, retries=1)
        ...
        server.chats     # the JSON body of each POST /v1/chat/completions, in arrival order
        server.headers   # the headers of every request

`GET /v1/models` lists `models`; `POST /v1/chat/completions` answers non-streaming, first from `script` (one
action per request, in order), then from `answer(body)`. With `key` set, a request without
`Authorization: Bearer <key>` gets 401 (an OpenAI-style error body echoing the key it got). Actions:
`Reply(text)`, `Status(code)`, `Slow(seconds, text)`, as in ollama_server. Other paths get 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler

from ollama_server import Action, Reply, ScriptedServer, Slow, Status

__all__ = ["FakeOpenAI", "Reply", "Slow", "Status"]


class FakeOpenAI(ScriptedServer):
    def __init__(
        self,
        answer: Callable[[dict], Action] = lambda body: Reply("50"),
        *,
        script: Iterable[Action] = (),
        models: Iterable[str] = ("judge-model",),
        key: str | None = None,
    ) -> None:
        self.key = key
        self.headers: list[dict[str, str]] = []
        super().__init__(answer, script, models, _handler_for)

    @property
    def url(self) -> str:
        """The API's base URL (what evaluate.url takes)."""
        return f"{self.address}/v1"


def completion_body(model: str, text: str) -> dict:
    """What an OpenAI-compatible server answers on a non-streaming POST /v1/chat/completions."""
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1714564800, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102},
    }  # fmt: skip


def error_body(code: int, message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error" if code < 500 else "server_error",
                      "code": code}}  # fmt: skip


def _handler_for(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def _authorized(self) -> bool:
            with server._lock:
                server.headers.append(dict(self.headers.items()))
            if server.key is None or self.headers.get("Authorization") == f"Bearer {server.key}":
                return True
            got = self.headers.get("Authorization", "")
            shown = got.removeprefix("Bearer ") or "none"  # echoed whole, as a careless server might
            self._json(401, error_body(401, f"Incorrect API key provided: {shown}"))
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"}
                                                            for m in server.models]})  # fmt: skip
            else:
                self._json(404, error_body(404, "not found"))

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if not self._authorized():
                return
            if self.path != "/v1/chat/completions":
                self._json(404, error_body(404, "not found"))
                return
            action = server._next_action(body)
            try:
                if isinstance(action, Status):
                    self._json(action.code, error_body(action.code, action.error))
                    return
                if isinstance(action, Slow) and server._stop.wait(action.seconds):
                    return
                self._json(200, completion_body(body.get("model", ""), action.text))
            except OSError:  # the client hung up (after its timeout)
                self.close_connection = True

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
