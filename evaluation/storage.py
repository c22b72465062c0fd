"""Crash-safe files: atomic whole-file writes and an append-only JSONL log of answers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file next to ``path``, sync it and rename it over ``path``.

    Readers (and a rerun after a crash) see the old file or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class AnswerLog:
    """``answers.jsonl``: one JSON object per answered item, keyed by its ``"index"``, appended and synced per batch.

    A process killed while appending leaves at most a cut-off last line; `load` drops it (truncating the file to its
    last complete line, so later appends start on a fresh line) and that item is answered again.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> dict[int, dict[str, Any]]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning("%s: dropping a cut-off last line (%d bytes)", self.path, len(data) - complete)
            with open(self.path, "r+b") as file:
                file.truncate(complete)
                os.fsync(file.fileno())
        answers = {}
        for number, line in enumerate(data[:complete].decode("utf-8", "replace").splitlines(), 1):
            try:
                answer = json.loads(line)
                answers[int(answer["index"])] = answer
            except (ValueError, LookupError, TypeError):
                logger.warning("%s:%d: skipping an unreadable line", self.path, number)
        return answers

    def append(self, answers: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(answer, ensure_ascii=False) + "\n" for answer in answers)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())
