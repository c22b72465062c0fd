"""Crash-safe whole-file writes: the one home of the project's atomic writers (JSON, text, bytes)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file next to ``path``, sync it and rename it over ``path``.

    Readers (and a rerun after a crash) see the old file or the complete new one, never a half-written one. The
    temporary name carries the process id, so two processes writing the same file never share a temporary file.
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
    """``text`` (UTF-8) into ``path``, atomically."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """``data`` as JSON (non-ASCII kept, a final newline) into ``path``, atomically."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")
