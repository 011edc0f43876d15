"""The ledger: a run's durable record, one SQLite database in its output directory.

Every job state change (pending, running, succeeded, failed, cancelled) is one
transaction, carrying the job's result when it has one, so a driver killed at any moment
loses no finished result; the report files are derived from the ledger at any time.
A lock file held for the driver's lifetime keeps a second driver off the same directory;
the kernel releases it when the driver dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from jobs.record.records import STATES, empty_record, record_json

LEDGER_NAME = "ledger.sqlite"
# Meta keys of `runjobs cancel`: the request it writes, and the outcome the driver writes back.
CANCEL_REQUEST = "cancel_request"
CANCEL_OUTCOME = "cancel_outcome"
LOCK_NAME = "ledger.lock"

# The ledger's schema version, kept in SQLite's user_version. 0: runjobs 0.1, whose jobs
# table named the status column `state`; 1: `status`, as a record says. An older ledger is
# migrated when opened; a newer one is refused, never misread.
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    record TEXT,
    updated_at REAL NOT NULL
);
"""
MIGRATIONS = {0: "ALTER TABLE jobs RENAME COLUMN state TO status"}


class LedgerError(ValueError):
    """The output directory's ledger cannot be used as asked."""


@dataclass(frozen=True)
class LedgerJob:
    id: str
    position: int
    config: dict[str, Any]
    status: str
    attempts: int
    record: dict[str, Any] | None
    updated_at: float


def is_ledger_directory(path: Path) -> bool:
    try:
        return (path / LEDGER_NAME).is_file()
    except OSError as error:  # a name too long for the filesystem, say: not a usable directory
        raise LedgerError(f"--output {path}: {error.strerror or error}; name another directory") from None


def running_driver(directory: Path) -> int | None:
    """The pid of the driver that holds `directory`'s lock, or None when no driver does."""
    lock_path = directory / LOCK_NAME
    if not lock_path.exists():
        return None
    with lock_path.open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


class Ledger:
    def __init__(
        self, path: Path, connection: sqlite3.Connection, lock_handle=None, status_column: str = "status"
    ) -> None:
        self.path = path
        self.status_column = status_column  # `state` in a runjobs 0.1 ledger that could not be migrated
        self.connection = connection
        self.lock_handle = lock_handle
        # When this process opened the ledger: a writer honours cancel requests made since.
        self.opened_at = time.time()
        self.batching = False  # inside batch(): changes join its transaction

    @classmethod
    def open(cls, directory: Path, for_writing: bool) -> Ledger:
        """Open (creating when writing) the ledger in `directory`; writers take the lock."""
        lock_handle = None
        if for_writing:
            directory.mkdir(parents=True, exist_ok=True)
            lock_handle = (directory / LOCK_NAME).open("a+")
            try:
                fcntl.flock(lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_handle.close()
                raise LedgerError(
                    f"another runjobs driver is running on {directory}; wait for it, "
                    f"stop it with `runjobs cancel {directory}`, or choose another --output"
                ) from None
            lock_handle.seek(0)
            lock_handle.truncate()
            lock_handle.write(f"{os.getpid()}\n")
            lock_handle.flush()
        elif not is_ledger_directory(directory):
            raise LedgerError(
                f"{directory} holds no runjobs ledger ({LEDGER_NAME}); name a run's output directory"
            )
        try:
            if for_writing and not (directory / LEDGER_NAME).exists():
                _create(directory)
            connection = sqlite3.connect(directory / LEDGER_NAME, isolation_level=None, timeout=30)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # a committed state change survives a crash
            status_column = _bring_up_to_date(connection, directory, for_writing)
        except sqlite3.DatabaseError as error:
            if lock_handle is not None:
                lock_handle.close()
            raise LedgerError(
                f"{directory / LEDGER_NAME} is not a usable runjobs ledger ({error}); move it away, "
                "or name another directory"
            ) from None
        return cls(directory, connection, lock_handle, status_column)

    def close(self) -> None:
        self.connection.close()
        if self.lock_handle is not None:
            self.lock_handle.close()  # releases the lock

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- writing ------------------------------------------------------------------------

    def set_meta(self, **values: Any) -> None:
        with self._transaction():
            for key, value in values.items():
                self.connection.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value)),
                )

    def add_jobs(self, jobs: list[tuple[str, dict[str, Any]]]) -> None:
        """Add jobs not yet in the ledger as pending; jobs already there keep their state."""
        with self._transaction():
            start = self.connection.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM jobs").fetchone()[0]
            for offset, (job_id, config) in enumerate(jobs):
                self.connection.execute(
                    f"INSERT OR IGNORE INTO jobs (id, position, config, {self.status_column}, updated_at) "
                    "VALUES (?, ?, ?, 'pending', ?)",
                    (job_id, start + offset, json.dumps(config, sort_keys=True), time.time()),
                )

    def mark(self, job_id: str, state: str, record: dict[str, Any] | None = None) -> None:
        """One state change, in one transaction; `running` counts an attempt."""
        assert state in STATES, state
        # orjson writes a non-finite float (a diverged job's NaN) as null, as finite_only does.
        # Text, not bytes: a BLOB is not JSON to every SQLite's json_extract (3.45.0 took it for JSONB).
        text = None if record is None else record_json(record).decode()
        with self._transaction():
            self.connection.execute(
                f"UPDATE jobs SET {self.status_column} = ?, record = COALESCE(?, record), updated_at = ?, "
                "attempts = attempts + (CASE WHEN ? = 'running' THEN 1 ELSE 0 END) WHERE id = ?",
                (state, text, time.time(), state, job_id),
            )

    # ---- reading ------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        rows = self.connection.execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def jobs(self) -> list[LedgerJob]:
        rows = self.connection.execute(f"SELECT {self._job_columns()} FROM jobs ORDER BY position").fetchall()
        return [_job_of_row(row) for row in rows]

    def summaries(self) -> list[dict[str, Any]]:
        """Each job's id, status, attempts, convergence, train_s and total_s, in job order.

        Read by SQLite from the stored records (JSON1), without parsing them here: `runjobs
        status` and `list` stay quick at 10,000 jobs.
        """
        rows = self.connection.execute(
            f"SELECT id, {self.status_column}, attempts, json_extract(record, '$.convergence'), "
            "json_extract(record, '$.timings.train_s'), json_extract(record, '$.timings.total_s') "
            "FROM jobs ORDER BY position"
        ).fetchall()
        keys = ("id", "status", "attempts", "convergence", "train_s", "total_s")
        return [dict(zip(keys, row)) for row in rows]

    def job(self, job_id: str) -> LedgerJob | None:
        """One job, or None when the ledger has no job of that id."""
        row = self.connection.execute(
            f"SELECT {self._job_columns()} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else _job_of_row(row)

    def job_ids(self) -> list[str]:
        return [row[0] for row in self.connection.execute("SELECT id FROM jobs ORDER BY position")]

    def _job_columns(self, record: str = "record") -> str:
        """A jobs-table row as _job_of_row reads it; `record`: the expression selected for the record."""
        return f"id, position, config, {self.status_column}, attempts, {record}, updated_at"

    def cancel_requested(self) -> bool:
        """Whether `runjobs cancel` asked this driver (not an earlier one) to stop."""
        row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (CANCEL_REQUEST,)).fetchone()
        return row is not None and json.loads(row[0]).get("at", 0.0) >= self.opened_at

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        column = self.status_column
        for state, count in self.connection.execute(f"SELECT {column}, COUNT(*) FROM jobs GROUP BY {column}"):
            counts[state] = count
        return counts

    def records(self, light: bool = False) -> list[dict[str, Any]]:
        """Every job's latest record, in job order; a job without one gets a stub.

        `light`: without the per-epoch `history` series (seconds, a line's weights and bias),
        which SQLite drops before Python parses anything: what the report's tables and
        figures read, in a third of the memory at 10,000 jobs (raw_records has them all).
        """
        if not light:
            return [job.record or stub_record(job) for job in self.jobs()]
        columns = self._job_columns(record="json_remove(record, '$.history')")
        rows = self.connection.execute(f"SELECT {columns} FROM jobs ORDER BY position").fetchall()
        return [orjson.loads(row[5]) if row[5] else _stub_of_row(row) for row in rows]

    def raw_records(self, job_ids: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
        """(id, record as compact JSON) of every job (or of `job_ids`), in job order, unparsed."""
        rows = self.connection.execute(f"SELECT {self._job_columns()} FROM jobs ORDER BY position")
        for row in rows:
            if job_ids is not None and row[0] not in job_ids:
                continue
            if row[5]:
                yield row[0], row[5] if isinstance(row[5], bytes) else row[5].encode()
            else:
                yield row[0], record_json(_stub_of_row(row))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Every change inside the block in one transaction: a pack's records, kept together.

        One commit (one fsync) instead of one a change. What the block changed is committed
        even when it ends with an exception: each change is whole on its own. A process
        killed inside the block keeps none of it, and a re-run trains those jobs again.
        """
        if self.batching:
            yield
            return
        try:
            self.connection.execute("BEGIN IMMEDIATE")
            self.batching = True
            yield
        finally:
            self.batching = False
            if self.connection.in_transaction:
                self.connection.execute("COMMIT")

    def _transaction(self):
        return contextlib.nullcontext() if self.batching else _Transaction(self.connection)


def _bring_up_to_date(connection: sqlite3.Connection, directory: Path, for_writing: bool) -> str:
    """Create or migrate the schema; return the name of the jobs table's status column.

    A reader that cannot write (a read-only copy of an old run) reads the old column.
    """
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{directory / LEDGER_NAME} was written by a newer runjobs (ledger schema {version}; this one "
            f"reads up to {SCHEMA_VERSION}); upgrade runjobs to use this directory"
        )
    has_jobs = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone() is not None
    if not has_jobs:
        if not for_writing:
            raise LedgerError(
                f"{directory / LEDGER_NAME} holds no runjobs jobs table; name a run's output directory, "
                "or re-run `runjobs submit` into it"
            )
        _create_schema(connection)
        return "status"
    if version == SCHEMA_VERSION:
        return "status"
    try:
        with _Transaction(connection):
            for step in range(version, SCHEMA_VERSION):
                connection.execute(MIGRATIONS[step])
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.OperationalError:
        if for_writing:
            raise
        return "state"  # read-only: read the 0.1 column as it is
    return "status"


def _create(directory: Path) -> None:
    """Create a ledger whole, then give it its name: a reader never sees one half made.

    A driver creating its ledger while `runjobs status` (or a test) polls the directory
    would otherwise let the reader open a database that has no tables yet.
    """
    partial = directory / f".{LEDGER_NAME}.{os.getpid()}.creating"
    partial.unlink(missing_ok=True)
    connection = sqlite3.connect(partial, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        _create_schema(connection)
    finally:
        connection.close()  # checkpoints and removes the WAL before the rename
    os.replace(partial, directory / LEDGER_NAME)


def _create_schema(connection: sqlite3.Connection) -> None:
    with _Transaction(connection):
        for statement in SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def close_abandoned(directory: Path) -> tuple[int, int]:
    """Record as cancelled the running and pending jobs of a run whose driver has ended.

    A driver killed outright (SIGKILL, its node lost, a scheduler's hard stop) leaves its
    unfinished jobs as it last wrote them. Returns how many were running and pending.
    Refused (LedgerError) while a driver holds the directory.
    """
    with Ledger.open(directory, for_writing=True) as ledger:
        left = [job for job in ledger.jobs() if job.status in ("pending", "running")]
        for job in left:
            error = "cancelled: its driver ended before recording it (closed by runjobs cancel)"
            ledger.mark(job.id, "cancelled", empty_record(job.id, job.config, "cancelled", error))
        running = sum(job.status == "running" for job in left)
        return running, len(left) - running


def request_cancel(directory: Path) -> float:
    """Ask the driver running on `directory` to cancel its run; returns the request's time.

    The request is a row in the ledger, which the driver reads a few times a second. It
    does not depend on signals: a driver started in the background by a non-interactive
    shell (cron, a batch script) has SIGINT ignored, so a signal could not stop it.
    """
    requested_at = time.time()
    ledger = Ledger.open(directory, for_writing=False)
    try:
        ledger.set_meta(**{CANCEL_REQUEST: {"at": requested_at, "pid": os.getpid()}})
    finally:
        ledger.close()
    return requested_at


class _Transaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *rest) -> None:
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")


def _job_of_row(row: tuple) -> LedgerJob:
    """A jobs-table row (Ledger._job_columns) as a LedgerJob, its config and record parsed."""
    return LedgerJob(
        row[0], row[1], orjson.loads(row[2]), row[3], row[4], orjson.loads(row[5]) if row[5] else None, row[6]
    )


def _stub_of_row(row: tuple) -> dict[str, Any]:
    """The stub record of a jobs-table row that has no record yet."""
    return stub_record(_job_of_row(row))


def stub_record(job: LedgerJob) -> dict[str, Any]:
    """A record for a job that has not ended: its config and state, no results."""
    return empty_record(job.id, job.config, job.status, None)
