"""Data-parallel evaluation with files only: which process answers which record, where it writes, how the ranks of
one run share an output directory and how rank 0 learns that the others are done. No torch.distributed process
group and no collective is used, so CPU-only machines work as well as GPUs.

Rules (``torchrun --nproc-per-node N evaluation/evaluation.py ...``, ``accelerate launch --multi_gpu --num_processes
N evaluation/evaluation.py ...``, which runs torchrun's launcher on GPUs and CPUs alike (``accelerate launch --cpu``
starts one process), or any launcher that sets the same variables):

* **Ranks.** `Ranks.from_env` reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Without ``WORLD_SIZE`` (or with 1)
  the run is one process, exactly as before. Each rank loads the models itself, on ``cuda:LOCAL_RANK`` when CUDA is
  present (``--device cuda`` means the same; ``--device cuda:K`` or ``cpu`` is taken as given), else on the CPU.
* **Sharding.** Record ``i`` of a split belongs to rank ``i mod WORLD_SIZE``. A rank answers the records it owns that
  no answer file of the (model, dataset) folder holds yet. The other ranks of the run only ever add answers of their
  own records, so every rank sees the same answered set for its records whenever it reads: the rule needs no
  coordination, no record is answered twice, and the answers are those of one process (greedy; sampling draws record
  ``i`` from its own generator seeded with ``seed + i``, so sampled answers do not depend on the sharding either).
* **Shards.** Rank ``r`` of ``N > 1`` appends to ``<model>/<dataset>/answers.rank<r>-of-<N>.jsonl`` under the rules of
  `storage.AnswerLog` (one JSON line per answer, fsync per batch; a cut-off last line is dropped when the rank that
  writes the file opens it again, and skipped, never truncated, by every other reader). One process appends to
  ``answers.jsonl`` itself.
* **Done markers.** When rank ``r > 0`` has finished the records it owns of a (model, dataset) it writes
  ``.done.rank<r>-of-<N>.json`` there (atomically): the records it could not answer (problems, by index), whether the
  model failed to load on it, and the run's nonce. Rank 0, after its own records of a model, polls for the markers of
  every other rank, then merges.
* **Merge.** Rank 0 reads ``answers.jsonl`` and every shard file of the folder (of any rank and any ``N``: those a
  killed run left too), appends to ``answers.jsonl`` the answers it lacks, ordered by record index, syncs it, then
  deletes the shards and markers. A fresh run's ``answers.jsonl`` is then the one of a single process, line for line.
  Only rank 0 scores, calls the LLM judge (once per record; its cache is rank 0's) and writes the reports.
* **Resume.** Every rank reads the merged file and every shard before choosing its records, so a run killed on any
  rank resumes with the same or another number of processes (or one); a merge cut short is completed by the next one.
* **Locks.** Rank 0 holds ``<output-dir>/.lock`` (the lock of one-process runs: a second evaluation, of any size,
  is refused at once) and ``.lock.rank0``; rank ``r > 0`` holds ``.lock.rank<r>``. Each lock file names its holder
  (pid and host), the run key and rank 0's nonce (random, per run). A rank ``r > 0`` waits until ``.lock.rank0`` is
  held by a live rank 0 with its run key, then takes its own lock; a rank lock held by another process is refused.
  Rank 0 refuses to start while a rank lock of another run is held (a rank left over from a killed run).
* **Run key.** What the ranks of one launch share: ``VPT_EVAL_RUN_ID`` when set, else torchrun's
  ``TORCHELASTIC_RUN_ID``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT`` and ``WORLD_SIZE``.
  A launcher that sets only ``RANK``/``WORLD_SIZE`` should set ``VPT_EVAL_RUN_ID`` to something unique per launch.
* **A rank that dies.** Rank 0 watches the lock of every rank it waits for: when one is released without a marker
  (or a rank has not started within ``VPT_EVAL_RANK_TIMEOUT`` seconds, default 600), rank 0 stops with one line
  naming the rank, the (model, dataset) and the shard file that keeps its answers, and says that a rerun resumes.
  torchrun and accelerate stop the other ranks themselves when one fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers_vpt.errors import VPTUserError
from transformers_vpt.files import write_json

from .storage import LOCK_FILE, AnswerLog, OutputDirError, exclusive_run, prepare_output_dir

logger = logging.getLogger(__name__)

RUN_ID_ENV = "VPT_EVAL_RUN_ID"
"""Environment variable naming the launch the ranks belong to (overrides the run key torchrun's variables give)."""
TIMEOUT_ENV = "VPT_EVAL_RANK_TIMEOUT"
"""Environment variable: how long (seconds) a rank waits for another one to start (default `DEFAULT_TIMEOUT_S`)."""
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.2
"""How often rank 0 looks for the done markers and the other ranks for rank 0, in seconds."""
LOCK_PATIENCE_S = 2.0
"""How long a rank retries its own lock (the other ranks look at it for microseconds, see `_probe`)."""

SHARD_PATTERN = re.compile(r"answers\.rank(\d+)-of-(\d+)\.jsonl")
MARKER_PATTERN = re.compile(r"\.done\.rank(\d+)-of-(\d+)\.json")
RANK_LOCK_PATTERN = re.compile(r"\.lock\.rank(\d+)")
MERGED_FILE = "answers.jsonl"


class RankError(VPTUserError):
    """A data-parallel run that cannot go on: bad rank variables, a rank that did not start or ended early."""


def _env_int(environ: Mapping[str, str], name: str, low: int) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise RankError(
            f"{name}={text} is not an integer >= {low} (torchrun and accelerate launch set it; unset RANK, "
            "WORLD_SIZE and LOCAL_RANK to run in one process)"
        )
    return value


def run_key(environ: Mapping[str, str]) -> str:
    """What the ranks of one launch share (see the module docstring): `RUN_ID_ENV`, else torchrun's variables."""
    if explicit := environ.get(RUN_ID_ENV, "").strip():
        return explicit
    names = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE")
    return hashlib.sha256("\0".join(environ.get(name, "") for name in names).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run: rank ``rank`` of ``world_size``, device ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    key: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        """From ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun, accelerate launch); one process without them."""
        environ = os.environ if environ is None else environ
        world_size = _env_int(environ, "WORLD_SIZE", 1) or 1
        rank = _env_int(environ, "RANK", 0)
        if world_size == 1:
            if rank:
                raise RankError(f"RANK={rank} is not below WORLD_SIZE=1; unset RANK to run in one process")
            return cls()
        if rank is None:
            raise RankError(f"WORLD_SIZE={world_size} but RANK is not set; start the ranks with torchrun or accelerate")
        if rank >= world_size:
            raise RankError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
        local_rank = _env_int(environ, "LOCAL_RANK", 0)
        if local_rank is None:
            local_world_size = _env_int(environ, "LOCAL_WORLD_SIZE", 1)
            local_rank = rank % local_world_size if local_world_size else rank
        return cls(rank, world_size, local_rank, run_key(environ))

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def owns(self, index: int) -> bool:
        """Whether record ``index`` is this rank's (``index mod world_size == rank``)."""
        return index % self.world_size == self.rank

    def shard_name(self, rank: int | None = None) -> str:
        """The answer file of ``rank`` (default: this one) in a (model, dataset) folder."""
        return shard_name(self.rank if rank is None else rank, self.world_size)

    def marker_name(self, rank: int | None = None) -> str:
        return f".done.rank{self.rank if rank is None else rank}-of-{self.world_size}.json"


def shard_name(rank: int, world_size: int) -> str:
    return MERGED_FILE if world_size == 1 else f"answers.rank{rank}-of-{world_size}.jsonl"


def shard_files(directory: Path) -> list[Path]:
    """The shard files of a (model, dataset) folder, of every rank and world size, by (world size, rank)."""
    if not directory.is_dir():
        return []
    found = [(m, path) for path in directory.iterdir() if (m := SHARD_PATTERN.fullmatch(path.name))]
    return [path for m, path in sorted(found, key=lambda pair: (int(pair[0][2]), int(pair[0][1])))]


def read_answers(directory: Path, own: AnswerLog, repair_merged: bool) -> dict[int, dict[str, Any]]:
    """Every answer of a (model, dataset) folder: the merged file's, then those only a shard holds.

    ``own`` (the file this process appends to) is repaired when it ends in a cut-off line, and so is the merged file
    with ``repair_merged`` (its only writer: rank 0, or the one process); every other file is read as is (another
    rank may be appending to it)."""
    merged = AnswerLog(directory / MERGED_FILE)
    answers = merged.load(repair=repair_merged or own.path == merged.path)
    for path in shard_files(directory):
        log = own if own.path == path else AnswerLog(path)
        for index, answer in log.load(repair=log is own).items():
            answers.setdefault(index, answer)
    return answers


def merge_shards(directory: Path) -> dict[int, dict[str, Any]]:
    """Fold every shard of ``directory`` into its ``answers.jsonl`` (rank 0 of a run whose other ranks are done, or
    one process); return all the answers.

    The answers only shards hold are appended in record order and synced before any shard or marker is deleted, so a
    crash at any point loses nothing: the next merge appends what is still missing and deletes the rest."""
    merged = AnswerLog(directory / MERGED_FILE)
    answers = merged.load()
    shards = shard_files(directory)
    new: dict[int, dict[str, Any]] = {}
    for path in shards:
        for index, answer in AnswerLog(path).load(repair=False).items():
            if index not in answers:
                new.setdefault(index, answer)
    if new:
        merged.append(new[index] for index in sorted(new))
        logger.info("%s: merged %d answers from %d shard files", merged.path, len(new), len(shards))
    markers = []
    if directory.is_dir():
        markers = [path for path in directory.iterdir() if MARKER_PATTERN.fullmatch(path.name)]
    for path in [*shards, *markers]:
        path.unlink(missing_ok=True)
    return answers | new


# --- locks ----------------------------------------------------------------------------------------------------------


def _holder_text(ranks: Ranks, nonce: str) -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": ranks.rank, "world_size": ranks.world_size,
            "run": ranks.key, "nonce": nonce}
    return f"{os.getpid()}\n{json.dumps(info)}\n".encode()


def _parse_holder(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data.decode("utf-8").split("\n")[1])
    except (UnicodeDecodeError, ValueError, IndexError):
        return {}
    return info if isinstance(info, dict) else {}


def _probe(path: Path) -> dict[str, Any] | None:
    """The holder of the lock of ``path`` ({} while it is unreadable, e.g. being written), None when nobody holds it.

    A shared lock is tried and released at once: a holder's exclusive lock makes it fail. Whoever takes one of these
    locks retries for `LOCK_PATIENCE_S`, so the probe's microseconds never make it fail."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse_holder(os.pread(fd, 4096, 0))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(info: dict[str, Any]) -> str:
    return f" (pid {info.get('pid')}, rank {info.get('rank')} of {info.get('world_size')})"


def _alive(info: dict[str, Any]) -> bool:
    """Whether the holder named in ``info`` may still run: always on another host, else its pid exists."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except PermissionError:
        return True
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    return True


def _take(path: Path, text: bytes, what: str) -> int:
    """Lock ``path`` (exclusive) and write ``text`` into it; `OutputDirError` naming the holder if another keeps it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputDirError(f"cannot create the lock file {path}: {error.strerror or error}") from error
    deadline = time.monotonic() + LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                info = _parse_holder(os.pread(fd, 4096, 0))
                os.close(fd)
                holder = _describe(info) if info else ""
                raise OutputDirError(
                    f"another evaluation{holder} holds {what} ({path}); wait for it to end or use another --output-dir"
                ) from None
            time.sleep(0.01)
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    return fd


def timeout_s() -> float:
    """`TIMEOUT_ENV`, else `DEFAULT_TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise RankError(f"{TIMEOUT_ENV}={text} is not a number of seconds") from None


@dataclass
class RunLock:
    """The locks a rank holds for a run (see the module docstring) and what it knows of the other ranks."""

    directory: Path
    ranks: Ranks
    nonce: str = ""
    started: float = field(default_factory=time.monotonic)

    def rank_lock(self, rank: int) -> Path:
        return self.directory / f"{LOCK_FILE}.rank{rank}"

    def rank_holder(self, rank: int) -> dict[str, Any] | None:
        """The holder of ``rank``'s lock when it is that rank of this run (alive), else None."""
        info = _probe(self.rank_lock(rank))
        if info is None:
            return None
        if not info:  # being written: count as alive, look again later
            return {}
        return info if info.get("nonce") == self.nonce and info.get("run") == self.ranks.key else None

    def _joined(self, rank: int) -> bool:
        """Whether ``rank`` took its lock in this run (its lock file holds this run's nonce), held or not now."""
        try:
            data = self.rank_lock(rank).read_bytes()
        except OSError:
            return False
        return _parse_holder(data).get("nonce") == self.nonce

    def write_marker(self, folder: Path, problems: list[dict[str, Any]], answered: int, load_error: str | None):
        """The done marker of this rank (r > 0) for the (model, dataset) ``folder``."""
        write_json(folder / self.ranks.marker_name(), {
            "rank": self.ranks.rank, "world_size": self.ranks.world_size, "run": self.ranks.key,
            "nonce": self.nonce, "answered": answered, "problems": problems, "load_error": load_error,
        })

    def _marker(self, folder: Path, rank: int) -> dict[str, Any] | None:
        try:
            marker = json.loads((folder / self.ranks.marker_name(rank)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(marker, dict) and marker.get("nonce") == self.nonce and marker.get("rank") == rank:
            return marker
        return None  # a marker of an earlier run

    def wait_for_markers(self, folder: Path, label: str) -> dict[int, dict[str, Any]]:
        """Rank 0: the done markers of every other rank for ``folder`` (named ``label`` in errors), once all exist.

        `RankError` when a rank's lock is free and it wrote no marker: it ended (its lock file holds this run's
        nonce: it joined) or it did not start within `timeout_s` of this rank's start."""
        waiting = set(range(1, self.ranks.world_size))
        markers: dict[int, dict[str, Any]] = {}
        limit = timeout_s()
        logged = False
        while waiting:
            for rank in sorted(waiting):
                if (marker := self._marker(folder, rank)) is not None:
                    markers[rank] = marker
                    waiting.discard(rank)
                    continue
                if self.rank_holder(rank) is not None:
                    continue
                if (marker := self._marker(folder, rank)) is not None:  # it finished between the two looks
                    markers[rank] = marker
                    waiting.discard(rank)
                    continue
                started = self._joined(rank)
                if started or time.monotonic() - self.started > limit:
                    shard = folder / self.ranks.shard_name(rank)
                    how = "ended" if started else f"did not start within {limit:.0f} s"
                    kept = f"the answers it wrote are kept in {shard}" if shard.exists() else f"no {shard} yet"
                    raise RankError(
                        f"rank {rank} of {self.ranks.world_size} {how} before it finished {label} ({kept}); see "
                        "that rank's output, then rerun the same command, with any number of processes, to resume"
                    )
            if waiting:
                if not logged:
                    logger.info("%s: waiting for rank(s) %s", label, ", ".join(map(str, sorted(waiting))))
                    logged = True
                time.sleep(POLL_S)
        return markers

    def check_no_strays(self) -> None:
        """Rank 0 (or one process): no rank lock of the directory is held by a rank of another run."""
        for path in sorted(self.directory.iterdir()):
            if not (m := RANK_LOCK_PATTERN.fullmatch(path.name)) or int(m[1]) == 0:
                continue
            for _ in range(int(LOCK_PATIENCE_S / 0.05)):
                info = _probe(path)
                if info != {}:
                    break
                time.sleep(0.05)  # being written
            if info is None or (info.get("nonce") == self.nonce and self.nonce):
                continue
            raise OutputDirError(
                f"another evaluation{_describe(info)} is still writing into {self.directory}; wait for it to end or "
                "use another --output-dir"
            )


def _wait_for_rank0(directory: Path, ranks: Ranks) -> str:
    """Rank r > 0: rank 0's nonce, once ``.lock.rank0`` is held by a live rank 0 of this run."""
    path = directory / f"{LOCK_FILE}.rank0"
    limit = timeout_s()
    deadline = time.monotonic() + limit
    other = None
    while True:
        info = _probe(path)
        if info and info.get("run") == ranks.key and info.get("world_size") == ranks.world_size and _alive(info):
            return str(info.get("nonce", ""))
        if info:
            other = info
        if time.monotonic() > deadline:
            why = (
                f"it is held by another evaluation (pid {other.get('pid')}, rank 0 of {other.get('world_size')})"
                if other else "nobody holds it"
            )
            raise RankError(
                f"{ranks.label}: rank 0 of this run did not take {path} within {limit:.0f} s ({why}); see rank 0's "
                f"output (another evaluation writing into {directory}?)"
            )
        time.sleep(POLL_S)


@contextmanager
def run_lock(directory: str | os.PathLike, ranks: Ranks) -> Iterator[RunLock]:
    """Hold the locks of ``ranks`` on the output ``directory`` meanwhile (see the module docstring).

    One process or rank 0: the directory lock (`storage.exclusive_run`, `OutputDirError` at once when another
    evaluation holds it), and for rank 0 its rank lock with a new nonce. Rank r > 0: waits for rank 0, then takes its
    own rank lock."""
    if ranks.rank == 0:
        with exclusive_run(directory) as path:
            lock = RunLock(path, ranks, secrets.token_hex(8) if ranks.parallel else "")
            fd = _take(lock.rank_lock(0), _holder_text(ranks, lock.nonce), "rank 0's lock") if ranks.parallel else None
            try:
                lock.check_no_strays()
                yield lock
            finally:
                if fd is not None:
                    os.close(fd)
        return
    path = prepare_output_dir(directory)
    nonce = _wait_for_rank0(path, ranks)
    lock = RunLock(path, ranks, nonce)
    fd = _take(lock.rank_lock(ranks.rank), _holder_text(ranks, nonce), f"the lock of rank {ranks.rank}")
    try:
        yield lock
    finally:
        os.close(fd)
