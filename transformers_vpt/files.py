"""Crash-safe whole-file writes: the one home of the project's atomic writers (JSON, text, bytes)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_TEMPORARY_NAME_TRIES = 100


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a new temporary file next to ``path``, sync it and rename it over ``path``.

    Readers (and a rerun after a crash) see the old file or the complete new one, never a half-written one. The
    temporary file is created exclusively (``O_EXCL``): it is never an existing file or a symbolic link, so nothing
    but ``path`` itself is ever written. Its name carries the process id and a random part, so two processes (or a
    stale file of a killed run) never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, file = _new_temporary_file(path)
    try:
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_temporary_file(path: Path) -> tuple[Path, IO[bytes]]:
    for _ in range(_TEMPORARY_NAME_TRIES):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, open(tmp, "xb")
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}: every name tried exists")


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) into ``path``, atomically."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """``data`` as JSON (non-ASCII kept, a final newline) into ``path``, atomically."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")
