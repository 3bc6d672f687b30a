"""The judge on an OpenAI-compatible API (`evaluate.judge: openai`): plain httpx against a real local HTTP server
that speaks the API and misbehaves on request. The book's prompt and the retry and parse rules are the Ollama
judge's (tests/test_judge.py); the stage end to end, with a key and a server answering 401: tests/test_evaluate.py."""

from __future__ import annotations

import time

import pytest
from openai_server import FakeOpenAI, Reply, Slow, Status

from scratchgpt.pipeline.judge import JudgeError, judge_all, score_prompt
from scratchgpt.pipeline.openai_judge import OpenAIJudge

RECORD = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
    "model_response": "The car is as fast as a bullet.",
}
KEY = "sk-unit-test-key-4242"


def judge_for(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, key: str | None = KEY, **kwargs) -> OpenAIJudge:
    if key is None:
        monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    else:
        monkeypatch.setenv("TEST_JUDGE_KEY", key)
    settings = {"timeout": 5.0, "retries": 2, "backoff": 0.0, **kwargs}
    return OpenAIJudge(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", **settings)


def test_asks_the_books_prompt_with_its_options_and_the_key(monkeypatch):
    with FakeOpenAI(lambda body: Reply(" 85\n"), key=KEY) as server, judge_for(server, monkeypatch) as judge:
        judge.probe()
        verdict = judge.judge(RECORD)
    assert (verdict.status, verdict.score, verdict.attempts) == ("scored", 85, 1)
    (body,) = server.chats
    assert body == {"model": "judge-model", "messages": [{"role": "user", "content": score_prompt(RECORD)}],
                    "stream": False, "seed": 123, "temperature": 0}  # fmt: skip
    assert [h["Authorization"] for h in server.headers] == [f"Bearer {KEY}"] * 2


def test_no_key_set_sends_none(monkeypatch):
    with FakeOpenAI(lambda body: Reply("7")) as server, judge_for(server, monkeypatch, key=None) as judge:
        judge.probe()
        assert judge.judge(RECORD).score == 7
    assert all("Authorization" not in h for h in server.headers)


def test_transient_failures_are_retried_others_are_not(monkeypatch):
    script = [Status(503, "loading"), Status(429, "slow down"), Reply("60"),  # record 0: two retries
              Status(400, "bad request"),                                     # record 1: not retried
              Slow(2.0, "99"), Reply("not a number")]                         # record 2: a timeout, then garbage
    with FakeOpenAI(script=script, key=KEY) as server, judge_for(server, monkeypatch, timeout=0.5) as judge:
        verdicts = judge_all(judge, [RECORD] * 3, total=3)
    assert [(v.status, v.score, v.attempts) for v in verdicts] == [
        ("scored", 60, 3), ("failed", None, 1), ("unparseable", None, 2)]  # fmt: skip
    assert verdicts[1].error == "StatusError: HTTP 400: bad request"


def test_a_key_refused_mid_run_fails_the_record_at_once(monkeypatch):
    with FakeOpenAI(key=KEY) as server, judge_for(server, monkeypatch, key="sk-other-key-1111") as judge:
        verdict = judge.judge(RECORD)
    assert (verdict.status, verdict.attempts) == ("failed", 1)
    assert verdict.error == "StatusError: HTTP 401: Incorrect API key provided: ***"  # the echoed key masked


@pytest.mark.parametrize(
    ("where", "models", "message"),
    [
        ("", ("judge-model",), "has no http://127.0.0.1:{port}/models (HTTP 404): is evaluate.url the API's base URL"),
        ("/v1", ("other-model",), "has no model 'judge-model' (it has: other-model); set evaluate.model"),
    ],
)
def test_probe_names_what_is_wrong(monkeypatch, where, models, message):
    with FakeOpenAI(models=models, key=KEY) as server:
        base = server.url.removesuffix("/v1") + where
        port = base.split(":")[2].split("/")[0]
        monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
        judge = OpenAIJudge(base, "judge-model", api_key_env="TEST_JUDGE_KEY", timeout=5, retries=0)
        with pytest.raises(JudgeError, match=message.format(port=port).replace("(", r"\(").replace(")", r"\)")):
            judge.probe()
        assert server.chats == []


def test_an_unreachable_server_fails_the_probe_quickly(monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "judge-model", api_key_env="TEST_JUDGE_KEY", timeout=120, retries=3)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"cannot reach the OpenAI-compatible judge at http://127.0.0.1:9/v1"):
        judge.probe()
    assert time.monotonic() - started < 10
