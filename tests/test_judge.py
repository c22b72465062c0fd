"""JudgeClient against a scripted OpenAI-compatible server running on 127.0.0.1 inside the test."""

import json
import time

import pytest
from utils import FakeOpenAI

from transformers_vpt.evaluation.judge import TEMPLATE_QUIRK, JudgeClient, build_prompt, extract_score


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake
    assert not fake.thread.is_alive()


@pytest.fixture
def make_client(server, tmp_path):
    clients = []

    def make(**kwargs):
        options = {"cache_path": tmp_path / "judge_cache.jsonl", "max_retries": 2, "timeout": 2.0, "backoff": 0.01}
        client = JudgeClient(server.url, **options | kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


ITEM = ("<image>\nWhat's the dog on?", "pillow", "A pillow.")


def test_prompt_layout():
    prompt = build_prompt(*ITEM)
    instruction, quirk, real = prompt.partition(TEMPLATE_QUIRK)
    assert quirk == "Question: { }\nStandard answer: { }\nModel`s answer: { }"
    assert "score: <score>" in instruction and instruction.endswith("\n")
    assert real == "\nQuestion: <image>\nWhat's the dog on?\nStandard answer: pillow\nModel's answer: A pillow."


@pytest.mark.parametrize(
    ("reply", "strict", "upstream"),
    [
        ("score: 0.8", 0.8, 0.8),
        ("Score: 1", 1.0, 1.0),
        ("score: 0", 0.0, 0.0),
        ("The score is 1.", 1.0, 1.0),
        ("score: 0.75, close to the standard answer", 0.75, 0.75),
        ("**Score:** 0.5", 0.5, 0.5),
        ("The full score is 1; score: 0.5", 0.5, 1.0),  # strict: the labelled number wins
        ("score: 10", None, 10.0),  # upstream regex quirk, kept under the upstream rule
        ("Score: 100", None, 100.0),
        ("score: -0.5", None, 0.5),
        ("80%", None, 0.0),
        ("an excellent answer", None, 0.0),
        ("score: 2/5", None, 0.0),
        ("I give it 0.8 out of 1", None, 0.8),  # two numbers and no label: ambiguous
        ("", None, 0.0),
    ],
)
def test_extract_score(reply, strict, upstream):
    assert extract_score(reply) == extract_score(reply, "strict") == strict
    assert extract_score(reply, "upstream") == upstream


def test_unknown_score_rule():
    with pytest.raises(ValueError, match="choose from"):
        extract_score("score: 1", "lenient")


def test_wire_format(server, make_client, monkeypatch):
    monkeypatch.setenv("VPT_TEST_JUDGE_KEY", "sk-test")
    server.sequence((200, "score: 0.8"))
    [result] = make_client(model="judge-model", api_key_env="VPT_TEST_JUDGE_KEY").score_many([ITEM])
    assert (result.score, result.reply, result.failed, result.cached) == (0.8, "score: 0.8", False, False)
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {
        "model": "judge-model",
        "messages": [{"role": "user", "content": build_prompt(*ITEM)}],
        "temperature": 0.0,
        "max_tokens": 64,
    }


def test_no_authorization_header_without_key(server, make_client, monkeypatch):
    monkeypatch.delenv("VPT_TEST_JUDGE_KEY", raising=False)
    make_client(api_key_env="VPT_TEST_JUDGE_KEY").score_many([ITEM])
    assert "Authorization" not in server.requests[0]["headers"]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_until_success(server, make_client, status):
    server.sequence((status, "busy"), (status, "busy"), (200, "Score: 1"))
    [result] = make_client(max_retries=2).score_many([ITEM])
    assert (result.score, result.failed) == (1.0, False)
    assert len(server.requests) == 3


def test_failure_after_retries_scores_zero_and_is_flagged(server, make_client):
    server.sequence((500, "down"))
    [result] = make_client(max_retries=2).score_many([ITEM])
    assert (result.score, result.reply, result.failed) == (0.0, "", True)
    assert "HTTP 500" in result.error
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(server, make_client):
    server.sequence((401, "bad key"))
    [result] = make_client(max_retries=2).score_many([ITEM])
    assert result.failed and "HTTP 401" in result.error
    assert len(server.requests) == 1


def test_malformed_response_fails_without_crashing(server, make_client):
    server.sequence((200, b"not json"))
    [result] = make_client().score_many([ITEM])
    assert (result.score, result.failed) == (0.0, True)
    assert "malformed" in result.error


def test_timeouts_are_retried_then_flagged(server, make_client):
    server.delay = 0.5
    [result] = make_client(max_retries=1, timeout=0.1).score_many([ITEM])
    assert result.failed and "Timeout" in result.error
    assert len(server.requests) == 2


def test_unreachable_endpoint_is_flagged():
    with JudgeClient("http://127.0.0.1:9", max_retries=1, timeout=1.0, backoff=0.01) as client:
        [result] = client.score_many([ITEM])
    assert (result.score, result.failed) == (0.0, True)


@pytest.mark.parametrize("reply", ["I cannot judge this.", "", None, "Score: 100"])
def test_unparsable_or_empty_reply_is_asked_again_then_unscored(server, make_client, reply):
    server.sequence((200, reply))
    [result] = make_client().score_many([ITEM])
    assert (result.score, result.reply, result.failed, result.unscored) == (None, reply or "", False, True)
    assert result.attempts == 2 and len(server.requests) == 2 and "no score in [0, 1]" in result.error


@pytest.mark.parametrize("reply", ["I cannot judge this.", "", None])
def test_upstream_rule_scores_unparsable_replies_zero_without_asking_again(server, make_client, reply):
    server.sequence((200, reply))
    [result] = make_client(score_rule="upstream").score_many([ITEM])
    assert (result.score, result.reply, result.failed, result.unscored) == (0.0, reply or "", False, False)
    assert len(server.requests) == 1


def test_a_valid_second_reply_counts(server, make_client, tmp_path):
    server.sequence((200, "Score: 100"), (200, "score: 0.9"))
    [result] = make_client().score_many([ITEM])
    assert (result.score, result.reply, result.attempts, result.unscored) == (0.9, "score: 0.9", 2, False)
    [line] = (tmp_path / "judge_cache.jsonl").read_text().splitlines()
    assert json.loads(line)["reply"] == "score: 0.9"


def test_unscored_replies_are_cached_and_rescored_with_the_other_rule(server, make_client):
    server.sequence((200, "Score: 100"))
    assert make_client().score_many([ITEM])[0].unscored
    server.requests.clear()
    [again] = make_client().score_many([ITEM])  # no new request: the cached reply stays unscored
    [upstream] = make_client(score_rule="upstream").score_many([ITEM])
    assert server.requests == []
    assert (again.unscored, again.cached) == (True, True)
    assert (upstream.score, upstream.cached) == (100.0, True)  # the released rule, like for like


def test_cache_makes_a_rerun_free(server, make_client, tmp_path):
    items = [("q", "ref", f"answer {i}") for i in range(5)]
    server.sequence((200, "score: 0.5"))
    first = make_client().score_many(items)
    assert len(server.requests) == 5 and not any(r.cached for r in first)
    lines = (tmp_path / "judge_cache.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0]).keys() == {"key", "model", "prompt", "reply"}

    server.requests.clear()
    second = make_client().score_many(items)
    assert server.requests == []
    assert [r.score for r in second] == [0.5] * 5 and all(r.cached for r in second)

    # The cache is per judge model.
    make_client(model="other-judge").score_many(items[:1])
    assert len(server.requests) == 1


def test_failures_are_not_cached(server, make_client):
    server.sequence((500, "down"))
    assert make_client(max_retries=0).score_many([ITEM])[0].failed
    server.sequence((200, "score: 1"))
    [result] = make_client().score_many([ITEM])
    assert (result.score, result.cached) == (1.0, False)
    assert len(server.requests) == 2


def test_cache_survives_a_truncated_last_line(server, make_client, tmp_path):
    server.sequence((200, "score: 1"))
    make_client().score_many([ITEM])
    cache = tmp_path / "judge_cache.jsonl"
    cache.write_text(cache.read_text() + '{"key": "abc", "rep')  # a crash in the middle of a write
    items = [ITEM, ("q", "ref", "new")]
    results = make_client().score_many(items)
    assert [r.cached for r in results] == [True, False]
    assert len(server.requests) == 2
    assert all(r.cached for r in make_client().score_many(items))


def test_duplicates_are_asked_once(server, make_client):
    results = make_client(cache_path=None).score_many([ITEM, ITEM, ITEM])
    assert [r.score for r in results] == [1.0, 1.0, 1.0]
    assert len(server.requests) == 1


def test_concurrent_requests_are_bounded_and_ordered(server, make_client):
    server.delay = 0.2
    server.script = lambda body: (200, "score: 0." + body["messages"][0]["content"][-1])
    items = [("q", "ref", f"answer {i}") for i in range(8)]
    started = time.monotonic()
    results = make_client(concurrency=4).score_many(items)
    elapsed = time.monotonic() - started
    assert [r.score for r in results] == pytest.approx([i / 10 for i in range(8)])
    assert 2 <= server.max_in_flight <= 4
    assert elapsed < 8 * 0.2  # faster than one request at a time
