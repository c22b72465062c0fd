"""LLM-as-judge scoring, reproducing the released VPT evaluation protocol.

Each answer is sent to an OpenAI-compatible ``/chat/completions`` endpoint with the upstream prompt, temperature 0
and at most 64 new tokens. How a reply becomes a score is the *score rule* (`extract_score`):

* ``strict`` (the default): the number after ``score:`` (else the reply's only number), accepted only when it lies
  in [0, 1]. A reply without such a score is asked once more (a fresh request); if that one has none either, the
  answer is *unscored*: score None, left out of the mean and counted in the reports.
* ``upstream``: the released rule, for like-for-like comparisons with the published table: the first match of
  ``[01]\\.?\\d*`` (so ``"score: 10"`` gives 10.0), 0 when there is none; every reply is scored.

Unlike upstream, requests are retried with exponential backoff and every raw reply is cached on disk, so an
interrupted or repeated evaluation never pays twice for the same (model, prompt), and rescoring a run with the other
rule makes no request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
from tqdm import tqdm

JUDGE_INSTRUCTION = (
    "Please proofread the model's answer to the question against the standard answer. "
    "The full score is 1 and the minimum score is 0. Output the score in the form 'score: <score>'. "
    "The closer the model's answer is to the standard answer, the higher the score."
)
# Upstream's instruction ends with this unfilled template (Python string-literal concatenation left it in); kept
# verbatim, backtick included, because the judge sees it.
TEMPLATE_QUIRK = "Question: { }\nStandard answer: { }\nModel`s answer: { }"

SCORE_RULES = ("strict", "upstream")
"""How a judge reply becomes a score; see the module docstring and `extract_score`."""

_UPSTREAM_SCORE = re.compile(r"[01]\.?\d*")
_NUMBER = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)"
# A number that is a whole token: not part of a word, a longer number, a fraction ("2/5") or a percentage.
_TOKEN_NUMBER = rf"(?<![\w.]){_NUMBER}(?![\w%/]|\.\d)"
_LABEL = r"\bscore\b[\s*_]*[:=][\s*_]*"  # "score:", "Score =", "**Score:** "
_LABELLED_SCORE = re.compile(rf"{_LABEL}({_TOKEN_NUMBER})", re.IGNORECASE)
_SCORE_LABEL = re.compile(_LABEL, re.IGNORECASE)
_LONE_NUMBER = re.compile(_TOKEN_NUMBER)


def build_prompt(question: str, reference: str, answer: str) -> str:
    """The judge prompt: instruction, the unfilled template quirk, then the real question, reference and answer."""
    return (
        f"{JUDGE_INSTRUCTION}\n{TEMPLATE_QUIRK}\n"
        f"Question: {question}\nStandard answer: {reference}\nModel's answer: {answer}"
    )


def check_score_rule(rule: str) -> str:
    """``rule`` itself when it is one of `SCORE_RULES`."""
    if rule not in SCORE_RULES:
        raise ValueError(f"Unknown judge score rule {rule!r}; choose from {list(SCORE_RULES)}")
    return rule


def extract_score(reply: str, rule: str = "strict") -> float | None:
    """The score of a judge reply under ``rule``; None when the reply has no valid one (``strict`` only).

    ``strict``: the number after the first ``score:`` (or ``score =``, any case, markdown emphasis allowed), else the
    reply's number when it holds exactly one; a fraction, a percentage or a number outside [0, 1] is no score
    ("Score: 100" and "I cannot judge" give None). ``upstream``: the first match of ``[01]\\.?\\d*`` as a float, 0.0
    when there is none, exactly as the released evaluation ("score: 10" gives 10.0).
    """
    if check_score_rule(rule) == "upstream":
        match = _UPSTREAM_SCORE.search(reply)
        return float(match.group()) if match else 0.0
    labelled = _LABELLED_SCORE.search(reply)
    if labelled is not None:
        text = labelled.group(1)
    elif _SCORE_LABEL.search(reply):
        return None  # "score: 2/5", "score: high": a label without a plain number is no score
    else:
        numbers = _LONE_NUMBER.findall(reply)
        if len(numbers) != 1 or re.search(r"\d", _LONE_NUMBER.sub("", reply)):
            return None  # no number, several, or digits of a fraction or percentage ("80%", "4/5")
        text = numbers[0]
    value = float(text)
    return value if 0.0 <= value <= 1.0 else None


@dataclass(frozen=True)
class JudgeResult:
    """One judged answer.

    Attributes:
        score: The score under the client's rule; None for an *unscored* reply (no valid score, even when asked
            twice); 0.0 when ``failed``, as upstream (failed answers are left out of the mean all the same).
        reply: The raw reply (the second one when the first had no valid score).
        failed: No reply after all retries.
        cached: The reply came from the cache (no request).
        error: Why there is no reply (``failed``) or no score (unscored).
        attempts: Replies received for this answer in this run: 2 when the first had no valid score.
    """

    score: float | None
    reply: str
    failed: bool = False
    cached: bool = False
    error: str | None = None
    attempts: int = 1

    @property
    def unscored(self) -> bool:
        """A reply came back but it holds no valid score."""
        return not self.failed and self.score is None


_NO_SCORE = "the reply holds no score in [0, 1]"


def _failure(error: str) -> JudgeResult:
    return JudgeResult(score=0.0, reply="", failed=True, error=error)


class JudgeClient:
    """Concurrent, retrying, disk-cached judge over an OpenAI-compatible chat completions endpoint.

    ``base_url`` is the API root (e.g. ``https://api.openai.com/v1``); the key is read from the environment variable
    ``api_key_env`` and sent as a bearer token (no header when it is unset, for local servers). Connection errors,
    timeouts, HTTP 429 and 5xx are retried up to ``max_retries`` times, waiting ``backoff * 2**k`` seconds; other
    errors fail at once. ``cache_path`` is a JSONL file of raw replies, keyed by sha256 of (model, prompt).
    ``score_rule`` (`SCORE_RULES`) turns replies into scores; under ``strict`` a fresh reply without a valid score is
    asked once more. Cached replies are rescored under the current rule and never asked again.
    """

    def __init__(
        self,
        base_url: str,
        model: str = "gpt-4o",
        api_key_env: str = "OPENAI_API_KEY",
        cache_path: str | os.PathLike[str] | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 1.0,
        score_rule: str = "strict",
    ) -> None:
        self.score_rule = check_score_rule(score_rule)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        api_key = os.environ.get(api_key_env)
        self._http = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency),
        )
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._cache = self._load_cache()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, prompt]).encode()).hexdigest()

    def score_many(self, items: Sequence[tuple[str, str, str]], desc: str = "judge") -> list[JudgeResult]:
        """Judge ``(question, reference, answer)`` triples; results come back in input order.

        Cached prompts make no request, identical prompts are asked once, and each reply is appended to the cache
        as soon as it arrives (an unscored one too, so that a rerun or a rescore with the other rule is free).
        Failed requests are not cached, so a rerun retries them.
        """
        prompts = [build_prompt(*item) for item in items]
        keys = [self.cache_key(prompt) for prompt in prompts]
        pending = {key: prompt for key, prompt in zip(keys, prompts) if key not in self._cache}
        fresh: dict[str, JudgeResult] = {}
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(pending), desc=desc) as progress:
            futures = {pool.submit(self._judge, prompt): key for key, prompt in pending.items()}
            for future in as_completed(futures):
                key = futures[future]
                result = fresh[key] = future.result()
                if not result.failed:
                    self._store(key, pending[key], result.reply)
                progress.update()
        return [fresh[key] if key in fresh else self._cached(self._cache[key]) for key in keys]

    def _cached(self, reply: str) -> JudgeResult:
        score = extract_score(reply, self.score_rule)
        return JudgeResult(score=score, reply=reply, cached=True, error=None if score is not None else _NO_SCORE)

    def _judge(self, prompt: str) -> JudgeResult:
        """Ask for ``prompt``; a reply without a valid score is asked once more (its second reply counts)."""
        first = self._ask(prompt)
        if not first.unscored:
            return first
        second = self._ask(prompt)
        if second.failed:  # keep the reply we have; its answer stays unscored
            error = f"{_NO_SCORE}; asking again failed: {second.error}"
            return JudgeResult(score=None, reply=first.reply, error=error)
        return JudgeResult(
            score=second.score,
            reply=second.reply,
            error=None if second.score is not None else f"{_NO_SCORE} (asked twice)",
            attempts=2,
        )

    def _ask(self, prompt: str) -> JudgeResult:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": 64,
        }
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._http.post(self.url, json=body)
            except httpx.RequestError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.is_error:
                return _failure(f"HTTP {response.status_code}: {response.text[:200]}")
            try:
                reply = response.json()["choices"][0]["message"]["content"] or ""
                if not isinstance(reply, str):
                    raise TypeError(f"content is a {type(reply).__name__}")
            except (ValueError, LookupError, TypeError) as exc:
                return _failure(f"malformed response ({type(exc).__name__}): {response.text[:200]}")
            score = extract_score(reply, self.score_rule)
            return JudgeResult(score=score, reply=reply, error=None if score is not None else _NO_SCORE)
        return _failure(f"gave up after {self.max_retries + 1} attempts; last error: {error}")

    def _load_cache(self) -> dict[str, str]:
        if self.cache_path is None:
            return {}
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.cache_path.exists():
            return {}
        text = self.cache_path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut short by a crash: end it so appends start on a new line
            with self.cache_path.open("a", encoding="utf-8") as file:
                file.write("\n")
        cache = {}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry["reply"]
            except (ValueError, LookupError, TypeError):
                continue
        return cache

    def _store(self, key: str, prompt: str, reply: str) -> None:
        self._cache[key] = reply
        if self.cache_path is None:
            return
        line = json.dumps({"key": key, "model": self.model, "prompt": prompt, "reply": reply}, ensure_ascii=False)
        with self.cache_path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())
