"""An LLM judge for instruction responses (the book's section 7.8): a 0-100 score per response.

    judge = OllamaJudge("http://localhost:11434", "llama3", timeout=120, retries=3)
    judge.probe()                           # JudgeError naming the URL if it cannot be used
    judgements = judge_all(judge, records)  # one Judgement per record, in order

The judge is asked the book's question, verbatim (`score_prompt`), with the book's request options
(`OPTIONS`: seed 123, temperature 0, a 2,048-token context) in one non-streaming user message, through
the official `ollama` client. A request that times out, loses its connection or gets a 5xx/429 answer
is retried `retries` times with exponential backoff; one that still fails counts as `failed`. A reply
that is not an integer from 0 to 100 (whitespace aside; the book's `int(reply)`, range-checked) counts
as `unparseable`. Neither stops the run, but `MAX_CONSECUTIVE_FAILURES` failed records in a row mean
the judge went away: that raises JudgeError.

A `JudgeCache` keeps each verdict as it arrives (one JSON line, synced to disk): a judge run killed
mid-way (Ctrl-C, SIGKILL, a lost server) keeps what it got, and the rerun asks only for the rest. Keyed
by the judge (backend, model and, as the server reports it, the model's digest), the request options and
the prompt's sha256, so another judge, model or response is asked afresh. Scores and unparseable replies
are kept (the request is deterministic); failed requests are not.

Backends: `ollama` (Ollama's native `/api/chat`, `OllamaJudge`) and `openai` (any OpenAI-compatible
`/chat/completions`: vLLM, llama.cpp's server, LM Studio, a hosted API; `scratchgpt.pipeline.openai_judge`).
Both are a `Judge`: the retries, the backoff and the reading of replies are the same for each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from scratchgpt.data.datasets import format_prompt
from scratchgpt.plumbing.progress import progress_bar

log = logging.getLogger(__name__)

JUDGES = ("none", "ollama", "openai")
"""The `evaluate.judge` choices: none (no judge), ollama (Ollama's native API), openai (an OpenAI-compatible API)."""
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
"""The book's request options: deterministic scores, comparable with its 49.45 for gpt2-medium."""
PROBE_TIMEOUT = 5.0
"""Longest wait (seconds) for the cheap reachability check before any work."""
MAX_BACKOFF = 30.0
"""Longest wait (seconds) between two attempts of one request."""
MAX_CONSECUTIVE_FAILURES = 5
"""Records in a row whose request failed after every retry before the judge is declared gone."""
LOG_EVERY = 25
"""A log line every this many judged records (the progress bar shows only on a terminal)."""

_SCORE = re.compile(r"[+-]?\d+")


class JudgeError(RuntimeError):
    """The judge cannot be used: unreachable, lacking the model, or no longer answering."""


class JudgeRequestError(RuntimeError):
    """One judge request failed (after any retries)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one response."""

    status: str
    """scored | unparseable (the reply is not an integer 0-100) | failed (no reply after the retries)."""
    score: int | None = None
    """0-100 when scored."""
    reply: str | None = None
    """The judge's reply as received (None when failed)."""
    error: str | None = None
    """Why the request failed."""
    attempts: int = 1
    """Requests sent for this record (1 + retries used)."""


def score_prompt(record: Mapping[str, str], response_key: str = "model_response") -> str:
    """The book's scoring prompt for one record, verbatim (needed to compare with its 49.45)."""
    return (
        f"Given the input `{format_prompt(record)}` "
        f"and correct output `{record['output']}`, "
        f"score the model response `{record[response_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def parse_score(reply: str | None) -> int | None:
    """The score in `reply` if it is an integer from 0 to 100 and nothing else (whitespace aside); else None."""
    if reply is None:
        return None
    text = reply.strip()
    if not _SCORE.fullmatch(text):
        return None
    value = int(text)
    return value if 0 <= value <= 100 else None


class Judge:
    """A judge model behind an HTTP API: asks the book's question, retries transient failures, reads the score.

    A backend calls this `__init__` (URL, model, timeout, retries, backoff), sets `_errors` (what a request can
    raise) and implements `describe`, `probe`, `_reply(prompt)` (one request: the reply's text) and
    `_transient(exc)`.
    """

    options: Mapping[str, object] = OPTIONS
    """The request options the judge is asked with (the book's, as far as the API takes them)."""
    backend: str
    """The `evaluate.judge` value that selects this backend."""
    digest: str | None = None
    """The served model's digest where the server reports one (set by `probe`): a new pull of the same
    name is another judge."""
    _errors: tuple[type[BaseException], ...]

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout: float,
        retries: int,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep

    def describe(self) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, object]:
        """What makes two verdicts comparable: backend, model (and digest) and the request options."""
        return {"backend": self.backend, "model": self.model, "digest": self.digest, "options": dict(self.options)}

    def probe(self) -> None:
        """JudgeError (naming the URL and what to do) unless the judge can be used."""
        raise NotImplementedError

    def _reply(self, prompt: str) -> str:
        raise NotImplementedError

    def _transient(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def ask(self, prompt: str) -> tuple[str, int]:
        """The judge's reply to `prompt` and the attempts it took; JudgeRequestError after the retries."""
        for attempt in range(1, self.retries + 2):
            try:
                return self._reply(prompt), attempt
            except self._errors as exc:
                if not self._transient(exc) or attempt > self.retries:
                    raise JudgeRequestError(_describe(exc), attempt) from exc
                delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                log.warning("judge request failed (%s); retry %d of %d in %.1f s",
                            _describe(exc), attempt, self.retries, delay)  # fmt: skip
                self._sleep(delay)
        raise AssertionError("unreachable")

    def judge(self, record: Mapping[str, str]) -> Judgement:
        """Score one record's `model_response` against its `output`."""
        try:
            reply, attempts = self.ask(score_prompt(record))
        except JudgeRequestError as exc:
            return Judgement("failed", error=str(exc), attempts=exc.attempts)
        score = parse_score(reply)
        return Judgement("unparseable" if score is None else "scored", score, reply, attempts=attempts)

    def close(self) -> None:
        pass

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OllamaJudge(Judge):
    """A model served by Ollama (`/api/chat`), asked through the official `ollama` client."""

    backend = "ollama"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout: float,
        retries: int,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx
        import ollama

        super().__init__(url, model, timeout=timeout, retries=retries, backoff=backoff, sleep=sleep)
        # what a request can raise: no connection, timeouts and transport errors, HTTP errors, a malformed body
        self._errors = (ConnectionError, httpx.HTTPError, ollama.ResponseError, ollama.RequestError, ValueError)
        self._client = ollama.Client(host=url, timeout=timeout)

    def describe(self) -> str:
        return f"ollama model {self.model!r} at {self.url}"

    def probe(self) -> None:
        """Check, in at most `PROBE_TIMEOUT` seconds, that the server answers and has the model.

        Raises JudgeError naming the URL (and what to do) otherwise.
        """
        import ollama

        hint = (
            f"Start Ollama there (`ollama serve`, then `ollama pull {self.model}`), point evaluate.url at it, "
            "or set evaluate.judge: none"
        )
        try:
            with ollama.Client(host=self.url, timeout=min(self.timeout, PROBE_TIMEOUT)) as client:
                listed = client.list()
        except Exception as exc:  # any failure here means the judge cannot be used
            raise JudgeError(f"cannot reach the ollama judge at {self.url} ({_describe(exc)}). {hint}") from exc
        names = [m.model for m in listed.models if m.model]
        served = [m for m in listed.models if m.model and _same_model(self.model, m.model)]
        if not served:
            raise JudgeError(
                f"the ollama judge at {self.url} has no model {self.model!r} (it has: {', '.join(names) or 'none'}). "
                f"Pull it there (`ollama pull {self.model}`) or set evaluate.model"
            )
        self.digest = served[0].digest or None

    def _reply(self, prompt: str) -> str:
        response = self._client.chat(
            model=self.model, messages=[{"role": "user", "content": prompt}], options=OPTIONS, stream=False
        )
        return response.message.content or ""

    def _transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    def close(self) -> None:
        self._client.close()


class JudgeCache:
    """Verdicts received so far, one JSON line each in `path` (appended and synced as each arrives)."""

    def __init__(self, path: str | os.PathLike[str], judge: Judge) -> None:
        self.path = Path(path)
        self._judge = json.dumps(judge.identity(), sort_keys=True)
        self._verdicts: dict[str, Judgement] = {}
        if self.path.is_file():
            self._read()

    def key(self, record: Mapping[str, str]) -> str:
        """sha256 of the judge's identity and the prompt `record` makes."""
        return hashlib.sha256(f"{self._judge}\n{score_prompt(record)}".encode()).hexdigest()

    def get(self, record: Mapping[str, str]) -> Judgement | None:
        return self._verdicts.get(self.key(record))

    def put(self, record: Mapping[str, str], verdict: Judgement) -> None:
        """Keep `verdict` (a score or an unparseable reply: what asking again would give; not a failure)."""
        if verdict.status == "failed":
            return
        key = self.key(record)
        self._verdicts[key] = verdict
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, **dataclasses.asdict(verdict)}, ensure_ascii=False)
        with self.path.open("a+b") as f:  # appends go to the end whatever was read
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a line a kill cut short: it is skipped on reading
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def _read(self) -> None:
        fields = {f.name for f in dataclasses.fields(Judgement)}
        for line in self.path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
                self._verdicts[entry.pop("key")] = Judgement(**{k: v for k, v in entry.items() if k in fields})
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut short by a kill


def judge_all(
    judge: Judge,
    records: Iterable[Mapping[str, str]],
    *,
    total: int | None = None,
    cache: JudgeCache | None = None,
) -> list[Judgement]:
    """Judge every record in order (progress bar on a terminal); JudgeError when the judge stops answering.

    With a `cache`, a record it holds a verdict for is not sent again, and each new verdict goes into it.
    """
    records = list(records)
    cached = [cache.get(record) if cache is not None else None for record in records]
    if cache is not None and any(cached):
        log.info("judge: %d of %d verdicts from %s (an earlier run's); asking for the other %d",
                 len(records) - cached.count(None), len(records), cache.path, cached.count(None))  # fmt: skip
    out: list[Judgement] = []
    in_a_row = 0
    with progress_bar(show=None, total=total, desc="judging", unit="response") as bar:
        for index, record in enumerate(records):
            verdict = cached[index]
            if verdict is None:
                verdict = judge.judge(record)
                if cache is not None:
                    cache.put(record, verdict)
            if verdict.status == "failed":
                log.warning("record %d: judge request failed: %s", index, verdict.error)
                in_a_row += 1
                if in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    raise JudgeError(
                        f"the judge ({judge.describe()}) failed on {in_a_row} records in a row; last error: "
                        f"{verdict.error}"
                    )
            else:
                in_a_row = 0
                if verdict.status == "unparseable":
                    log.warning("record %d: the judge's reply is not a score 0-100: %r", index, verdict.reply)
            out.append(verdict)
            bar.update(1)
            if (index + 1) % LOG_EVERY == 0:
                log.info("judged %d of %s records", index + 1, total if total is not None else "?")
    return out


def summarize(judgements: Iterable[Judgement]) -> dict[str, float]:
    """`judged`/`unparseable`/`failed` counts and, when any was scored, `mean_score`."""
    judgements = list(judgements)
    scores = [j.score for j in judgements if j.score is not None]
    out: dict[str, float] = {
        "judged": len(scores),
        "unparseable": sum(j.status == "unparseable" for j in judgements),
        "failed": sum(j.status == "failed" for j in judgements),
    }
    if scores:
        out["mean_score"] = sum(scores) / len(scores)
    return out


def _same_model(wanted: str, listed: str) -> bool:
    """Ollama names without a tag mean `:latest` (`llama3` is `llama3:latest`)."""

    def full(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return full(wanted) == full(listed)


def _transient(exc: BaseException) -> bool:
    """Worth retrying: no connection, a timeout or cut connection, or a 5xx/429 answer."""
    import httpx
    import ollama

    if isinstance(exc, ConnectionError | httpx.TransportError):
        return True
    return isinstance(exc, ollama.ResponseError) and (exc.status_code >= 500 or exc.status_code == 429)


def _describe(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, ConnectionError):
        return "could not connect"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
