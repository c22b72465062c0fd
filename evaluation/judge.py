"""LLM-as-judge scoring, reproducing the released VPT evaluation protocol.

Each answer is sent once to an OpenAI-compatible ``/chat/completions`` endpoint with the upstream prompt,
temperature 0 and at most 64 new tokens; the score is the first match of ``[01]\\.?\\d*`` in the reply.
Unlike upstream, requests are retried with exponential backoff and every reply is cached on disk, so an
interrupted or repeated evaluation never pays twice for the same (model, prompt).
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

_SCORE = re.compile(r"[01]\.?\d*")


def build_prompt(question: str, reference: str, answer: str) -> str:
    """The judge prompt: instruction, the unfilled template quirk, then the real question, reference and answer."""
    return (
        f"{JUDGE_INSTRUCTION}\n{TEMPLATE_QUIRK}\n"
        f"Question: {question}\nStandard answer: {reference}\nModel's answer: {answer}"
    )


def extract_score(reply: str) -> float:
    """First match of ``[01]\\.?\\d*`` as a float; 0.0 when there is none. As upstream, "score: 10" gives 10.0."""
    match = _SCORE.search(reply)
    return float(match.group()) if match else 0.0


@dataclass(frozen=True)
class JudgeResult:
    """One judged answer. ``failed``: no reply after all retries (the score is then 0, as upstream)."""

    score: float
    reply: str
    failed: bool = False
    cached: bool = False
    error: str | None = None


def _failure(error: str) -> JudgeResult:
    return JudgeResult(score=0.0, reply="", failed=True, error=error)


class JudgeClient:
    """Concurrent, retrying, disk-cached judge over an OpenAI-compatible chat completions endpoint.

    ``base_url`` is the API root (e.g. ``https://api.openai.com/v1``); the key is read from the environment variable
    ``api_key_env`` and sent as a bearer token (no header when it is unset, for local servers). Connection errors,
    timeouts, HTTP 429 and 5xx are retried up to ``max_retries`` times, waiting ``backoff * 2**k`` seconds; other
    errors fail at once. ``cache_path`` is a JSONL file of answered prompts, keyed by sha256 of (model, prompt).
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
    ) -> None:
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
        as soon as it arrives. Failed requests are not cached, so a rerun retries them.
        """
        prompts = [build_prompt(*item) for item in items]
        keys = [self.cache_key(prompt) for prompt in prompts]
        pending = {key: prompt for key, prompt in zip(keys, prompts) if key not in self._cache}
        fresh: dict[str, JudgeResult] = {}
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(pending), desc=desc) as progress:
            futures = {pool.submit(self._ask, prompt): key for key, prompt in pending.items()}
            for future in as_completed(futures):
                key = futures[future]
                result = fresh[key] = future.result()
                if not result.failed:
                    self._store(key, pending[key], result.reply)
                progress.update()
        return [
            fresh[key]
            if key in fresh
            else JudgeResult(score=extract_score(self._cache[key]), reply=self._cache[key], cached=True)
            for key in keys
        ]

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
                score = extract_score(reply)
            except (ValueError, LookupError, TypeError) as exc:
                return _failure(f"malformed response ({type(exc).__name__}): {response.text[:200]}")
            return JudgeResult(score=score, reply=reply)
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
