"""The audit log: one SQLite row per ``/v1/*`` request, answered or refused, committed before the response.

What a row holds: request id, time received (UTC), client address, API key id, method and
path, HTTP status, the input's SHA-256 and size, the model version and threshold, and the
outcome (prediction, calibrated P(PNEUMONIA), risk level and warnings; or error type and reason), and
the latency. Never the image bytes, the upload's file name or anything read from a DICOM header
other than what the reason text of a refusal says (``pneumoscan.dicom`` keeps patient
identifiers out of those).

The database is in WAL mode with ``synchronous=FULL``: a committed row survives the process
being killed and a power cut. One writer thread owns the connection and commits whatever rows
are waiting in one transaction (group commit), so concurrent requests share an fsync. After a
failed commit ``AuditLog.failure`` says why until a commit, or a ``probe`` for the write lock, succeeds
(the service is not ready meanwhile). ``space_problem`` says when the file system holding the log has less
free space than asked: an empty probe transaction succeeds on a full disk, so this is what keeps readiness
from coming back while the next row still could not be written.

The schema version is SQLite's ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes a database
from version i to i + 1, and opening a database applies the missing ones in a transaction. A
later column is one more entry, e.g. ``("ALTER TABLE requests ADD COLUMN uncertainty REAL",)``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the requests table
    ("""CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL UNIQUE,
            time TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            client TEXT,
            api_key_id TEXT,
            status INTEGER NOT NULL,
            input_sha256 TEXT,
            input_bytes INTEGER,
            model_version TEXT,
            threshold REAL,
            prediction TEXT,
            probability REAL,
            risk_level TEXT,
            error_type TEXT,
            error TEXT,
            latency_ms REAL NOT NULL
        )""",
     "CREATE INDEX requests_time ON requests (time)"),
    # 2: an answer's warnings (a JSON list; NULL in rows written before this column), for the drift check
    ("ALTER TABLE requests ADD COLUMN warnings TEXT",),
)
SCHEMA_VERSION = len(MIGRATIONS)


class AuditError(RuntimeError):
    """The audit log cannot be opened or written."""


# How long a commit waits for another program's lock on the log before it fails
WRITE_BUSY_TIMEOUT_S = 10.0


def utc_now() -> str:
    """The current time as the audit log writes it (ISO 8601, UTC, microseconds): sortable as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class AuditRecord:
    """One request as the audit log stores it (the columns of ``requests`` but ``id``)."""

    request_id: str
    time: str
    method: str
    path: str
    client: str | None = None
    api_key_id: str | None = None
    status: int = 0
    input_sha256: str | None = None
    input_bytes: int | None = None
    model_version: str | None = None
    threshold: float | None = None
    prediction: str | None = None
    probability: float | None = None
    risk_level: str | None = None
    error_type: str | None = None
    error: str | None = None
    latency_ms: float = 0.0
    warnings: str | None = None  # JSON list of an answer's warnings ("[]" when it had none)


COLUMNS = tuple(f.name for f in dataclasses.fields(AuditRecord))  # the table's columns after id, in order
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def connect(path: str | os.PathLike, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> sqlite3.Connection:
    """Open (creating if needed) the audit database in WAL mode and bring its schema up to date.

    Raises:
        AuditError: the file cannot be opened or is not SQLite, or its schema is newer than this code.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=WRITE_BUSY_TIMEOUT_S)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=FULL")
        _migrate(conn, path, migrations)
    except sqlite3.DatabaseError as exc:
        raise AuditError(f"audit_db {str(path)!r} cannot be used ({exc})") from exc
    except OSError as exc:
        raise AuditError(f"audit_db {str(path)!r} cannot be created ({exc.strerror or exc})") from exc
    if mode != "wal":
        log.warning("%s: SQLite refused WAL mode (journal_mode=%s); is it on a network file system?", path, mode)
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise AuditError(f"audit_db {str(path)!r} has schema version {version}, newer than this pneumoscan "
                         f"understands ({len(migrations)}); upgrade pneumoscan or use another file")
    for target in range(version + 1, len(migrations) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in migrations[target - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("%s: audit schema migrated to version %d", path, target)


_PROBE = object()  # a queue item that asks the writer whether it can take the write lock


class AuditLog:
    """The writer: ``submit(record)`` returns a Future that completes once the row is committed.

    ``failure`` is None while the log can be written, and the reason of the last failed commit after one,
    until a later commit or ``probe`` succeeds (set by the writer thread, in commit order).

    Raises (from the constructor):
        AuditError: see ``connect``.
    """

    def __init__(self, path: str | os.PathLike, min_free_bytes: int = 0) -> None:
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.failure: str | None = None
        self._conn = connect(self.path)
        self._queue: queue.SimpleQueue[tuple[object, Future] | None] = queue.SimpleQueue()
        self._probing = threading.Lock()  # held while a probe is queued: at most one at a time
        self._thread = threading.Thread(target=self._run, name="pneumoscan-audit", daemon=True)
        self._thread.start()

    def submit(self, record: AuditRecord) -> Future:
        """Queue ``record`` for the next commit; the Future's exception is an AuditError if the commit fails."""
        future: Future = Future()
        self._queue.put((record, future))
        return future

    def probe(self) -> None:
        """Ask the writer, unless it is already asked, to take the write lock and let it go (a transaction
        with no rows): where that works, ``failure`` is cleared without waiting for a request to commit."""
        if not self._probing.acquire(blocking=False):
            return
        future: Future = Future()
        future.add_done_callback(lambda _: self._probing.release())
        self._queue.put((_PROBE, future))

    def space_problem(self) -> str | None:
        """Why the log's file system is too full (less free than ``min_free_bytes``), or None: enough, no
        minimum asked, or the free space cannot be read (the commits will tell)."""
        if self.min_free_bytes <= 0:
            return None
        folder = self.path.resolve().parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        if free >= self.min_free_bytes:
            return None
        return (f"the audit log's disk is nearly full: {free / 2**20:.1f} MiB free in {folder} (at least "
                f"{self.min_free_bytes / 2**20:g} MiB wanted, --audit_min_free_mb); free space there or move the "
                f"log (--audit_db)")

    def close(self) -> None:
        """Commit what is queued, stop the writer and close the database."""
        self._queue.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            if None in batch:
                stop = True
                batch = [item for item in batch if item is not None]
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[object, Future]]) -> None:
        """Commit the batch's records in one transaction (a probe alone: an empty one); its futures get the
        outcome."""
        records = [record for record, _ in batch if record is not _PROBE]
        try:
            rows = [dataclasses.astuple(record) for record in records]
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_INSERT, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # sqlite3.Error, or anything else: the writer thread must live on, and say so
            log.error("audit log %s: %d row(s) not written (%s)", self.path, len(records), exc,
                      exc_info=not isinstance(exc, sqlite3.Error))
            error = AuditError(f"audit log cannot be written ({exc})")
            self.failure = str(error)
            for _, future in batch:
                future.set_exception(error)
            return
        if self.failure is not None:
            log.info("audit log %s: written again", self.path)
        self.failure = None
        for _, future in batch:
            future.set_result(None)


def to_utc(moment_text: str, flag: str = "--since", naive_is_utc: bool = False) -> str:
    """A date or time given on the command line (ISO 8601) in the log's format (UTC). Without an offset it
    is this machine's local time, or UTC with ``naive_is_utc`` (where the periods it bounds are UTC days).

    Raises:
        ValueError: not an ISO 8601 date or time.
    """
    try:
        moment = datetime.fromisoformat(moment_text)
    except ValueError as exc:
        raise ValueError(f"{flag} {moment_text!r} is not an ISO 8601 date or time, e.g. 2026-01-31 or "
                         "2026-01-31T08:00:00+01:00") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc) if naive_is_utc else moment.astimezone()  # else local time
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


# How long a reader waits for another program's lock on the log before it says so
READ_BUSY_TIMEOUT_S = 5.0


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed because another connection holds a lock (SQLITE_BUSY / SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def iter_records(path: str | os.PathLike, since: str | None = None) -> Iterator[dict]:
    """The rows of an audit database in the order they were written, optionally from ``since`` on.

    Raises:
        AuditError: the file does not exist or is not a pneumoscan audit database.
        ValueError: ``since`` is not an ISO 8601 date or time.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit_db {str(path)!r} does not exist")
    where, params = ("WHERE time >= ?", (to_utc(since),)) if since else ("", ())
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=READ_BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise AuditError(f"audit_db {str(path)!r} cannot be opened ({exc})") from exc
    try:
        conn.row_factory = sqlite3.Row
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            cursor = conn.execute(f"SELECT * FROM requests {where} ORDER BY id", params)
        except sqlite3.DatabaseError as exc:
            if _is_busy(exc):
                raise AuditError(f"audit_db {str(path)!r} is locked by another program ({exc}), still after "
                                 f"{READ_BUSY_TIMEOUT_S:g} s; try again when it is done") from exc
            raise AuditError(f"audit_db {str(path)!r} is not a pneumoscan audit log ({exc})") from exc
        if version > SCHEMA_VERSION:
            log.warning("%s has schema version %d (this pneumoscan knows %d); exporting its columns as they are",
                        path, version, SCHEMA_VERSION)
        try:
            for row in cursor:
                yield dict(row)
        except sqlite3.DatabaseError as exc:  # locked, or damaged after the first rows
            hint = "; try again when the other program is done" if _is_busy(exc) else ""
            raise AuditError(f"audit_db {str(path)!r} could not be read to the end ({exc}){hint}") from exc
    finally:
        conn.close()


def export(path: str | os.PathLike, out: TextIO, fmt: str = "csv", since: str | None = None) -> int:
    """Write the audit log to ``out`` as CSV (with a header row) or JSON Lines; returns the number of rows.

    Raises:
        AuditError, ValueError: see ``iter_records``; ValueError also for an unknown ``fmt``.
    """
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"unknown format {fmt!r}; choose one of csv, jsonl")
    count = 0
    writer = None
    for row in iter_records(path, since):
        if fmt == "jsonl":
            out.write(json.dumps(row) + "\n")
        else:
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
                writer.writeheader()
            writer.writerow(row)
        count += 1
    if fmt == "csv" and writer is None:
        out.write(",".join(("id",) + COLUMNS) + "\n")
    return count
