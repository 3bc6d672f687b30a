"""The LLM judge: the book's prompt and request, through the real `ollama` client against a real local HTTP
server that speaks Ollama's API and misbehaves on request (garbage, slow replies, 5xx, 4xx, no server)."""

from __future__ import annotations

import time

import pytest
from ollama_server import FakeOllama, Reply, Slow, Status

from scratchgpt.pipeline.judge import (
    MAX_CONSECUTIVE_FAILURES,
    JudgeCache,
    JudgeError,
    Judgement,
    OllamaJudge,
    _same_model,
    judge_all,
    parse_score,
    score_prompt,
    summarize,
)

RECORD = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
    "model_response": "The car is as fast as a bullet.",
}
# The book's prompt (ch. 7.8), written out by hand: `format_input(entry)` inside the first backticks.
BOOK_PROMPT = (
    "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is "
    "very fast.` and correct output `The car is as fast as lightning.`, score the model response `The car is as "
    "fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)


def judge_for(server: FakeOllama, **kwargs) -> OllamaJudge:
    settings = {"timeout": 5.0, "retries": 2, "backoff": 0.0, **kwargs}
    return OllamaJudge(server.url, "llama3", **settings)


def test_the_prompt_is_the_books_verbatim():
    assert score_prompt(RECORD) == BOOK_PROMPT
    no_input = {**RECORD, "input": ""}
    assert "### Input" not in score_prompt(no_input)
    assert score_prompt(no_input).startswith(
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.` and correct output `"
    )


@pytest.mark.parametrize(
    ("reply", "score"),
    [("85", 85), (" 85\n", 85), ("0", 0), ("100", 100), ("+7", 7), ("101", None), ("-1", None), ("85.", None),
     ("85.5", None), ("Score: 85", None), ("85/100", None), ("", None), ("eighty", None), (None, None)],
)  # fmt: skip
def test_only_an_integer_from_0_to_100_is_a_score(reply, score):
    assert parse_score(reply) == score


def test_ollama_model_names_without_a_tag_mean_latest():
    assert _same_model("llama3", "llama3:latest") and _same_model("llama3:latest", "llama3")
    assert not _same_model("llama3", "llama3:70b") and not _same_model("llama3", "llama3.1:latest")
    assert _same_model("hf.co/org/model", "hf.co/org/model:latest")


def test_the_real_client_sends_the_books_request_and_gets_the_score():
    with FakeOllama(answer=lambda body: Reply(" 85\n")) as server:
        with judge_for(server) as judge:
            judge.probe()
            verdict = judge.judge(RECORD)
        assert server.requests == [("GET", "/api/tags"), ("POST", "/api/chat")]
        body = server.chats[0]
    assert verdict.status == "scored" and verdict.score == 85 and verdict.reply == " 85\n" and verdict.attempts == 1
    assert body.pop("tools", []) == []  # the client's own (empty) field
    assert body == {
        "model": "llama3",
        "messages": [{"role": "user", "content": BOOK_PROMPT}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
        "stream": False,
    }


def test_garbage_replies_are_counted_not_fatal():
    replies = iter(["90", "I would rate this response 75 out of 100.", "40", "", "101", "60"])
    with FakeOllama(answer=lambda body: Reply(next(replies))) as server, judge_for(server) as judge:
        verdicts = judge_all(judge, [RECORD] * 6)
    assert [v.status for v in verdicts] == ["scored", "unparseable", "scored", "unparseable", "unparseable", "scored"]
    assert verdicts[1].reply == "I would rate this response 75 out of 100." and verdicts[1].score is None
    assert summarize(verdicts) == {"judged": 3, "unparseable": 3, "failed": 0, "mean_score": pytest.approx(190 / 3)}


def test_a_slow_reply_past_the_timeout_is_retried_and_counts_as_failed_when_it_stays_slow():
    with FakeOllama(script=[Slow(3.0, "10"), Reply("70")]) as server, judge_for(server, timeout=0.5) as judge:
        start = time.monotonic()
        verdict = judge.judge(RECORD)
        assert time.monotonic() - start < 2.5  # gave up on the slow reply after about 0.5 s
        assert verdict.status == "scored" and verdict.score == 70 and verdict.attempts == 2

        server.script = [Slow(3.0, "10"), Slow(3.0, "10")]
        start = time.monotonic()
        verdict = judge_for(server, timeout=0.5, retries=1).judge(RECORD)
        assert time.monotonic() - start < 2.5
    assert verdict.status == "failed" and verdict.attempts == 2 and "timed out" in verdict.error
    assert verdict.score is None and verdict.reply is None


def test_5xx_answers_are_retried_with_backoff_then_recover():
    waits: list[float] = []
    script = [Status(500, "llama runner process has terminated"), Status(503), Reply("42")]
    with FakeOllama(script=script) as server:
        judge = OllamaJudge(server.url, "llama3", timeout=5.0, retries=3, backoff=0.5, sleep=waits.append)
        verdict = judge.judge(RECORD)
        assert len(server.chats) == 3
    assert verdict.status == "scored" and verdict.score == 42 and verdict.attempts == 3
    assert waits == [0.5, 1.0]  # doubling

    with FakeOllama(script=[Status(500), Status(500)]) as server, judge_for(server, retries=1) as judge:
        verdict = judge.judge(RECORD)
    assert verdict.status == "failed" and verdict.attempts == 2 and "status code: 500" in verdict.error


def test_a_4xx_answer_is_not_retried():
    with FakeOllama(script=[Status(400, "invalid options")]) as server, judge_for(server) as judge:
        verdict = judge.judge(RECORD)
        assert len(server.chats) == 1
    assert verdict.status == "failed" and verdict.attempts == 1 and "invalid options" in verdict.error


def test_a_judge_that_stops_answering_stops_the_run():
    with FakeOllama(answer=lambda body: Status(502, "bad gateway")) as server, judge_for(server, retries=0) as judge:
        with pytest.raises(JudgeError, match=f"failed on {MAX_CONSECUTIVE_FAILURES} records in a row.*bad gateway"):
            judge_all(judge, [RECORD] * 20)
        assert len(server.chats) == MAX_CONSECUTIVE_FAILURES


def test_a_judge_that_cannot_be_used_is_a_clear_error_naming_the_url():
    url = "http://127.0.0.1:9"  # the discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"cannot reach the ollama judge at http://127\.0\.0\.1:9 .*judge: none"):
        OllamaJudge(url, "llama3", timeout=120.0, retries=3).probe()
    assert time.monotonic() - start < 5

    with FakeOllama(models=["mistral:latest"]) as server:
        with pytest.raises(JudgeError, match=rf"{server.url} has no model 'llama3' \(it has: mistral:latest\)"):
            judge_for(server).probe()
        assert server.chats == []
    with FakeOllama(models=["llama3:latest"]) as server:
        judge_for(server).probe()  # `llama3` is `llama3:latest`


def test_a_server_that_is_not_ollama_is_not_a_judge():
    from http_server import FileServer, Route

    with FileServer({"/index.html": Route(b"hello")}) as server:
        url = server.url("")
        with pytest.raises(JudgeError, match=rf"cannot reach the ollama judge at {url} .*404"):
            OllamaJudge(url, "llama3", timeout=5.0, retries=0).probe()


# --- the cache that lets a killed run resume ---------------------------------------------------------


def scored(record: dict) -> Reply:
    return Reply(str(len(record["model_response"]) % 101))


def test_the_cache_keeps_each_verdict_as_it_arrives_and_a_rerun_asks_only_for_the_rest(tmp_path):
    records = [{**RECORD, "model_response": f"answer {'x' * i}"} for i in range(6)]
    path = tmp_path / "judge-cache.jsonl"
    by_prompt = {score_prompt(r): r for r in records}
    with FakeOllama(answer=lambda body: scored(by_prompt[body["messages"][0]["content"]])) as server:
        with judge_for(server) as judge:
            judge.probe()
            first = judge_all(judge, records[:4], cache=JudgeCache(path, judge))
            assert len(server.chats) == 4 and len(path.read_text().splitlines()) == 4
            again = judge_all(judge, records, cache=JudgeCache(path, judge))  # a new process reads the file
        assert len(server.chats) == 6  # only the two it had not judged
    assert again[:4] == first and [v.score for v in again] == [int(scored(r).text) for r in records]


def test_a_line_cut_short_by_a_kill_is_skipped_and_later_verdicts_stay_readable(tmp_path):
    path = tmp_path / "judge-cache.jsonl"
    with FakeOllama(answer=lambda body: Reply("70")) as server, judge_for(server) as judge:
        judge.probe()
        cache = JudgeCache(path, judge)
        cache.put(RECORD, Judgement("scored", 70, "70"))
        with path.open("ab") as f:
            f.write(b'{"key": "abc", "status": "sco')  # a kill in the middle of a write
        other = {**RECORD, "model_response": "another answer"}
        JudgeCache(path, judge).put(other, Judgement("unparseable", None, "seventy"))
        reread = JudgeCache(path, judge)
    assert reread.get(RECORD) == Judgement("scored", 70, "70")
    assert reread.get(other) == Judgement("unparseable", None, "seventy")


def test_the_cache_is_keyed_by_judge_model_digest_and_prompt_and_keeps_no_failures(tmp_path):
    path = tmp_path / "judge-cache.jsonl"
    with FakeOllama(models=["llama3:latest", "mistral:latest"]) as server:
        llama, mistral = judge_for(server), OllamaJudge(server.url, "mistral", timeout=5.0, retries=0)
        llama.probe()
        mistral.probe()
        JudgeCache(path, llama).put(RECORD, Judgement("scored", 80, "80"))
        JudgeCache(path, llama).put({**RECORD, "output": "x"}, Judgement("failed", error="timed out"))
        assert JudgeCache(path, llama).get(RECORD) == Judgement("scored", 80, "80")
        assert JudgeCache(path, mistral).get(RECORD) is None  # another model
        assert JudgeCache(path, llama).get({**RECORD, "model_response": "other"}) is None  # another prompt
        assert JudgeCache(path, llama).get({**RECORD, "output": "x"}) is None  # a failure is asked again
        llama.digest = "sha256:a-new-pull"
        assert JudgeCache(path, llama).get(RECORD) is None  # the same name pulled anew is another judge
    assert len(path.read_text().splitlines()) == 1
