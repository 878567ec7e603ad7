"""A durable local spool for ledger rows the database could not take.

When the upstream has answered, the request has been paid for: its ledger row
and its budget settlement must not be lost because PostgreSQL is away for a
few seconds (a failover, a restart, a saturated pool). The gateway then
appends the row here and answers the client as usual; the spool is replayed
into the database, idempotently by request id, as soon as it takes writes
again — by the process itself after its next successful write, and by the
``routing.tasks.ledger_spool_replay`` beat task for what a process left
behind when it stopped.

Invariants:

- ``append`` returns only once the record is on disk (``fsync``); each process
  writes its own file (``ledger-<host>-<pid>.jsonl``), one JSON object per
  line, never rewritten in place.
- A replayer first *claims* a file (rename under the file's ``flock``, so no
  writer can be mid-line) and then applies the claimed copy; a writer that
  finds its file renamed or unlinked under it writes a new one.
- Applying a record is idempotent (the ledger insert is ``ON CONFLICT DO
  NOTHING`` on ``request_id`` and settlement runs only when the row is new),
  so a claimed file that fails half-way is simply applied again later, in
  order, and nothing is applied twice.
- A record the database refuses for what it holds (``IntegrityError``,
  ``DataError``: a constraint, a value out of range), which no retry can write,
  is *set aside* (``rejected-*.jsonl``, with the error, for an operator) and the
  file goes on: one bad record never holds back the records behind it, other
  tenants' included, nor makes every later write of the process replay the file
  again. Any other failure (the database down) stops the file there, in order.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DataError, IntegrityError

logger = logging.getLogger(__name__)

LIVE_PREFIX = "ledger-"
CLAIMED_PREFIX = "claimed-"
REJECTED_PREFIX = "rejected-"
# What the database answers when it refuses a record for what the record holds: no retry
# can write it.
REFUSED = (IntegrityError, DataError)


@dataclass(frozen=True)
class ReplayReport:
    applied: int
    pending: int  # records left in the spool (the database still refused them)
    files: int
    rejected: int = 0  # records set aside this replay (``rejected-*.jsonl``)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class LedgerSpool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / f"{LIVE_PREFIX}{socket.gethostname()}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()
        self.dirty = False  # this process appended since its last complete replay

    # --- writing ------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (it is on disk when this returns)."""
        line = _line(record)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            while True:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if not _still_at(fd, self.path):
                        continue  # claimed by a replayer while we waited: start a new file
                    _write_synced(fd, line)
                    self.dirty = True
                    return
                finally:
                    os.close(fd)

    # --- replaying ----------------------------------------------------------------------

    def replay(self, apply: Callable[[dict[str, Any]], None]) -> ReplayReport:
        """Apply every spooled record, oldest file first; stop a file at its first failure."""
        if not self.directory.is_dir():
            self.dirty = False
            return ReplayReport(0, 0, 0)
        for live in sorted(self.directory.glob(f"{LIVE_PREFIX}*.jsonl")):
            _claim(live)
        applied = pending = files = rejected = 0
        for claimed in sorted(self.directory.glob(f"{CLAIMED_PREFIX}*.jsonl")):
            done, left, refused = _apply_file(claimed, apply)
            applied, pending, files = applied + done, pending + left, files + 1
            rejected += refused
        if pending == 0:
            self.dirty = False
        return ReplayReport(applied, pending, files, rejected)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record still waiting in the spool (for operators and tests)."""
        return self._lines(LIVE_PREFIX, CLAIMED_PREFIX)

    def rejected(self) -> Iterator[dict[str, Any]]:
        """Every record set aside, as ``{"record", "error", "at"}``: what the database
        refused, kept for an operator to correct and replay, never dropped."""
        return self._lines(REJECTED_PREFIX)

    def _lines(self, *prefixes: str) -> Iterator[dict[str, Any]]:
        if not self.directory.is_dir():
            return
        for prefix in prefixes:
            for path in sorted(self.directory.glob(f"{prefix}*.jsonl")):
                yield from _read(path)


def _line(record: dict[str, Any]) -> bytes:
    """One spool line: the record as compact JSON and a line break."""
    return (json.dumps(record, cls=DjangoJSONEncoder, separators=(",", ":")) + "\n").encode()


def _write_synced(fd: int, line: bytes) -> None:
    """Append ``line`` and wait until it is on disk."""
    os.write(fd, line)
    os.fsync(fd)


def _still_at(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _claim(live: Path) -> None:
    try:
        fd = os.open(live, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _still_at(fd, live):
            name = f"{CLAIMED_PREFIX}{live.stem}-{uuid.uuid4().hex[:8]}.jsonl"
            os.replace(live, live.with_name(name))
    finally:
        os.close(fd)


def _read(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as handle:
        # One record per b"\n": never str.splitlines(), which also splits on
        # separators (U+2028, form feed…) that JSON strings may carry.
        for raw in handle.read().split(b"\n"):
            if raw.strip():
                try:
                    yield json.loads(raw)
                except ValueError:
                    logger.error("Ledger spool %s: skipping an unreadable line", path.name)


def _apply_file(path: Path, apply: Callable[[dict[str, Any]], None]) -> tuple[int, int, int]:
    """Apply a claimed file's records in order: (applied, left, set aside)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0, 0, 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0, 0, 0  # another replayer has it
        if not _still_at(fd, path):
            return 0, 0, 0
        records = list(_read(path))
        refused = 0
        for index, record in enumerate(records):
            try:
                apply(record)
            except REFUSED as exc:
                _set_aside(path, record, exc)
                refused += 1
            except Exception:
                logger.warning(
                    "Ledger spool %s: %d of %d records left; the database refused %s",
                    path.name,
                    len(records) - index,
                    len(records),
                    _request_id(record),
                    exc_info=True,
                )
                return index - refused, len(records) - index, refused
        os.unlink(path)
        return len(records) - refused, 0, refused
    finally:
        os.close(fd)


def _request_id(record: dict[str, Any]) -> Any:
    row = record.get("row")
    return row.get("request_id") if isinstance(row, dict) else None


def _set_aside(path: Path, record: dict[str, Any], exc: Exception) -> None:
    """Append ``record`` to the claimed file's ``rejected-`` file (fsync'd, before the
    claimed file can be removed), and say so once, as an error."""
    aside = path.with_name(REJECTED_PREFIX + path.name.removeprefix(CLAIMED_PREFIX))
    if aside.exists() and any(e.get("record") == record for e in _read(aside)):
        return  # set aside by a replay of this file that stopped later on
    fd = os.open(aside, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_synced(fd, _line({"record": record, "error": str(exc)[:2000], "at": time.time()}))
    finally:
        os.close(fd)
    logger.error(
        "Ledger spool %s: the database refuses %s for what it holds (%s); set aside in %s",
        path.name,
        _request_id(record),
        str(exc)[:200],
        aside.name,
    )


@lru_cache(maxsize=1)
def ledger_spool() -> LedgerSpool:
    """This process's spool, in ``CASCADEFLOW_SPOOL_DIR``."""
    return LedgerSpool(Path(settings.CASCADEFLOW_SPOOL_DIR))
