"""Crash-safe files: an append-only JSONL log of answers, the run lock of an output directory, and folder names that
cannot leave it. Whole-file writes are atomic through `transformers_vpt.files`. The files of data-parallel runs
(shards, done markers, rank locks) are in `parallel`."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers_vpt.errors import VPTUserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock file of an output directory, held (``flock``) by the evaluation writing into it."""


class OutputDirError(VPTUserError):
    """An output directory that cannot be used: not creatable or writable, busy, or a name that would leave it."""


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a folder inside the output directory (None when it can).

    A name is one plain path component: not empty, no ``/`` or ``\\``, not ``.`` or ``..``, not hidden (``.lock`` and
    temporary files start with a dot), no NUL or line breaks.
    """
    if not isinstance(name, str) or not name.strip():
        return "it is empty"
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name) or os.path.isabs(name):
        return "it holds a path separator"
    if name.startswith("."):
        return "it starts with a dot (.., hidden files and the run lock)"
    if any(char in name for char in "\0\n\r"):
        return "it holds a NUL or a line break"
    return None


def output_path(root: str | os.PathLike, *names: str) -> Path:
    """``root/names[0]/names[1]/...``, checked to stay inside ``root`` (also through symbolic links)."""
    root = Path(root)
    for name in names:
        if (problem := name_problem(name)) is not None:
            raise OutputDirError(f"{name!r} cannot name an output folder: {problem}; rename it")
    path = root.joinpath(*names)
    if not path.resolve().is_relative_to(root.resolve()):
        raise OutputDirError(f"{path} leads outside the output directory {root} (a symbolic link?); remove the link")
    return path


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) and check it is a writable directory; `OutputDirError` says why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"--output-dir {path} is not a directory (a file is in the way); choose another") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputDirError(f"cannot create --output-dir {path}: {reason}; choose another") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output-dir {path} is not writable; choose another or fix its permissions")
    return path


@contextmanager
def exclusive_run(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock file of ``directory`` meanwhile; `OutputDirError` at once if another process holds it.

    The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``directory/.lock``: the kernel releases it when its holder ends, so
    a killed run leaves no stale lock (the file itself stays; it holds the pid of the last holder).
    """
    directory = prepare_output_dir(directory)
    lock_path = directory / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputDirError(f"cannot create the lock file {lock_path}: {error.strerror or error}") from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            raise OutputDirError(
                f"another evaluation{holder} is writing into {directory}; wait for it to end or use another "
                "--output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield directory
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().partition("\n")[0].strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class AnswerLog:
    """``answers.jsonl``: one JSON object per answered item, keyed by its ``"index"``, appended and synced per batch.

    A process killed while appending leaves at most a cut-off last line; `load` drops it (truncating the file to its
    last complete line, so later appends start on a fresh line) and that item is answered again.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self, repair: bool = True) -> dict[int, dict[str, Any]]:
        """The answers by index (a later line of the same index wins). ``repair=False`` reads a file another process
        may be appending to (a shard of another rank, the merged file on ranks other than 0): a cut-off last line is
        skipped, never truncated."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data) and repair:
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
