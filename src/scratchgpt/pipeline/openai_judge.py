"""The LLM judge on an OpenAI-compatible server: vLLM, llama.cpp's server, LM Studio, Ollama's /v1, a hosted API.

    judge = OpenAIJudge("http://localhost:8000/v1", "llama3", api_key_env="OPENAI_API_KEY", timeout=120, retries=3)
    judge.probe()        # JudgeError naming the URL: unreachable, key refused, no such model
    judge_all(judge, records)

The request is `POST <url>/chat/completions`: the book's prompt as one user message, not streamed, with the
book's `seed` 123 and `temperature` 0 (its `num_ctx` is Ollama's own option: an OpenAI-compatible server sets
its context length itself). `probe` lists `GET <url>/models` before any work. The API key is read from the
environment variable `api_key_env` and sent as `Authorization: Bearer <key>` (none is sent when the variable is
unset, as local servers often need none); it is never logged, written or put in an error message.

Plain `httpx` (already installed: the `ollama` client is built on it) rather than the `openai` client: the two
endpoints need a few lines, no dependency is added, and the retry rules stay exactly `scratchgpt.pipeline.judge`'s
(timeouts, lost connections, 5xx and 429 retried with backoff; other answers fail at once), where the `openai`
client would add retries of its own to switch off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from scratchgpt.pipeline.judge import OPTIONS, PROBE_TIMEOUT, Judge, JudgeError, _describe

USER_AGENT = "scratchgpt-judge/0.1"
REQUEST_OPTIONS = {"seed": OPTIONS["seed"], "temperature": OPTIONS["temperature"]}
"""The book's options an OpenAI-compatible API takes."""


class StatusError(RuntimeError):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}{': ' + message if message else ''}")
        self.status = status


class OpenAIJudge(Judge):
    """A model behind an OpenAI-compatible API (`/chat/completions`), asked with plain `httpx`."""

    backend = "openai"
    options = REQUEST_OPTIONS

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str,
        timeout: float,
        retries: int,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx

        super().__init__(url.rstrip("/"), model, timeout=timeout, retries=retries, backoff=backoff, sleep=sleep)
        self.api_key_env = api_key_env
        self._key = os.environ.get(api_key_env) or None
        self._errors = (httpx.HTTPError, StatusError, ValueError, KeyError, IndexError, TypeError)
        self._client = httpx.Client(headers=self._headers(), timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def describe(self) -> str:
        return f"OpenAI-compatible model {self.model!r} at {self.url}"

    def identity(self) -> dict[str, object]:
        """The base identity plus the URL: these servers report no digest, and one name can be two models."""
        return {**super().identity(), "url": self.url}

    def probe(self) -> None:
        """Check, in at most `PROBE_TIMEOUT` seconds, that the server answers, takes the key and has the model."""
        import httpx

        try:
            with httpx.Client(headers=self._headers(), timeout=min(self.timeout, PROBE_TIMEOUT)) as client:
                response = client.get(f"{self.url}/models")
        except httpx.HTTPError as exc:
            raise JudgeError(
                f"cannot reach the OpenAI-compatible judge at {self.url} ({_describe(exc)}). Start the server, point "
                "evaluate.url at its API base URL (for most servers it ends in /v1), or set evaluate.judge: none"
            ) from exc
        if response.status_code in (401, 403):
            key = (f"${self.api_key_env} is not set" if self._key is None else
                   f"the key in ${self.api_key_env} was refused")  # fmt: skip
            raise JudgeError(f"the judge at {self.url} answers HTTP {response.status_code} ({key}): set "
                             f"${self.api_key_env} to an API key it accepts, or evaluate.api_key_env to the "
                             "variable that holds one")  # fmt: skip
        if response.status_code == 404:
            raise JudgeError(f"the judge at {self.url} has no {self.url}/models (HTTP 404): is evaluate.url the "
                             "API's base URL (e.g. http://localhost:8000/v1)?")  # fmt: skip
        if response.status_code != 200:
            raise JudgeError(f"the judge at {self.url} answers {self.url}/models with "
                             f"{self._status(response)}")  # fmt: skip
        try:
            names = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise JudgeError(f"the judge at {self.url}: {self.url}/models is not an OpenAI model list") from exc
        if self.model not in names:
            raise JudgeError(f"the judge at {self.url} has no model {self.model!r} (it has: "
                             f"{', '.join(names) or 'none'}); set evaluate.model")  # fmt: skip

    def _reply(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": False,
                **REQUEST_OPTIONS}  # fmt: skip
        response = self._client.post(f"{self.url}/chat/completions", json=body)
        if response.status_code != 200:
            raise StatusError(response.status_code, self._message(response))
        return response.json()["choices"][0]["message"]["content"] or ""

    def _transient(self, exc: BaseException) -> bool:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
        return isinstance(exc, StatusError) and (exc.status >= 500 or exc.status == 429)

    def _status(self, response: Any) -> str:
        message = self._message(response)
        return f"HTTP {response.status_code}{': ' + message if message else ''}"

    def _message(self, response: Any) -> str:
        """The error's message from the body (OpenAI's `{"error": {"message": ...}}`), short, the key masked."""
        try:
            error = response.json().get("error")
            text = error.get("message", "") if isinstance(error, dict) else str(error or "")
        except (ValueError, AttributeError):
            text = response.text
        text = " ".join(str(text).split())[:200]
        return text.replace(self._key, "***") if self._key else text

    def close(self) -> None:
        self._client.close()
