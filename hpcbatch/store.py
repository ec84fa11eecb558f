"""The durable store: one SQLite file (WAL) under the coordinator's home.

Everything accepted is written here before it is acknowledged. The coordinator
batches its state changes into short transactions (one per scheduling round),
so 10,000 task completions cost a handful of commits, not 10,000 fsyncs.

Each thread opens its own :class:`Store` on the same file; SQLite's WAL lets
readers (CLI ``list``/``show``) run while the coordinator writes. This is the only
module that issues SQL (:mod:`hpcbatch.query` compiles list filters into conditions
with ``?`` parameters over whitelisted columns; they run here).

Task counts are kept, not counted: ``job_counts`` holds one row per job (by state, by
result, retries, requeues ...), moved in the same transaction by every write that
changes a task's state, result, retry or requeue count or failure kind (see
``Store._counted``), so ``task_counts`` and ``unfinished`` read one row whatever the
size of the job; ``count_problems`` checks them against the rows.

The schema is built by versioned migration steps (:data:`MIGRATIONS`); a database
made by an older hpcbatch is upgraded in place, in one transaction, the first time a
newer one opens it, and a newer database than this code knows is refused.

Every transaction that changes a row bumps a change counter (meta key ``change``);
:meth:`Store.wait_for_change` blocks on it (woken at once by a commit through any
Store of this process, polling cheaply for other processes).

The home directory is kept 0700 and the database files 0600, whatever the umask. A
write that finds the disk full raises :class:`StorageFull` naming the directory, and
leaves the database as it was (the transaction is rolled back).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hpcbatch.errors import Conflict, HpcBatchError, NotFound, StorageFull, ValidationError
from hpcbatch.models import (
    FailureKind,
    JobSpec,
    JobState,
    PoolSpec,
    TaskSpec,
    TaskState,
    failure_text,
)

# ---- schema ------------------------------------------------------------------

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS pools (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    pool_id TEXT NOT NULL REFERENCES pools(id),
    id TEXT NOT NULL,
    state TEXT NOT NULL,
    slots INTEGER NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    reason TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (pool_id, id)
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    pool_id TEXT NOT NULL REFERENCES pools(id),
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    completed_at REAL
);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    id TEXT NOT NULL,
    command_line TEXT NOT NULL,
    spec TEXT NOT NULL,
    required_slots INTEGER NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    failure TEXT,
    exit_code INTEGER,
    signal INTEGER,
    retry_count INTEGER NOT NULL DEFAULT 0,
    requeue_count INTEGER NOT NULL DEFAULT 0,
    node_id TEXT,
    task_dir TEXT,
    started_at REAL,
    ended_at REAL,
    usage TEXT,
    UNIQUE (job_id, id)
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (job_id, state);
CREATE INDEX IF NOT EXISTS tasks_runnable ON tasks (state, seq);
"""

# v2: what the coordinator needs to schedule a task without reading its spec JSON or
# its job, a typed failure, every attempt's history, the agents to reap after a crash,
# and the change counter.
SCHEMA_V2 = """
ALTER TABLE tasks ADD COLUMN pool_id TEXT;
ALTER TABLE tasks ADD COLUMN neg_priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN max_retries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN instances INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN slots_per_instance INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN flags INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN failure_kind TEXT;
ALTER TABLE tasks ADD COLUMN failure_detail TEXT;
CREATE TEMP TABLE _job_v2 AS
    SELECT id, pool_id, -COALESCE(json_extract(spec, '$.priority'), 0) AS neg_priority,
           COALESCE(json_extract(spec, '$.max_task_retry_count'), 0) AS max_retries
    FROM jobs;
CREATE UNIQUE INDEX temp._job_v2_id ON _job_v2 (id);
UPDATE tasks SET
    pool_id = (SELECT j.pool_id FROM _job_v2 j WHERE j.id = tasks.job_id),
    neg_priority = COALESCE((SELECT j.neg_priority FROM _job_v2 j WHERE j.id = tasks.job_id), 0),
    max_retries = COALESCE(json_extract(spec, '$.max_task_retry_count'),
                           (SELECT j.max_retries FROM _job_v2 j WHERE j.id = tasks.job_id), 0),
    instances = COALESCE(json_extract(spec, '$.multi_instance.instances'), 0),
    slots_per_instance = COALESCE(json_extract(spec, '$.multi_instance.slots_per_instance'), 0),
    flags = (COALESCE(json_array_length(spec, '$.resource_files'), 0) > 0)
        | ((json_extract(spec, '$.multi_instance.coordination_command') IS NOT NULL) << 1)
        | ((COALESCE(json_array_length(spec, '$.multi_instance.common_resource_files'), 0)
            > 0) << 2),
    failure_kind = CASE
        WHEN failure IS NULL THEN NULL
        WHEN failure = 'start_failed' OR substr(failure, 1, 14) = 'start_failed: '
            THEN 'start_failed'
        WHEN substr(failure, 1, 7) = 'killed:' THEN 'killed'
        WHEN failure IN ('exit_code', 'signal', 'timeout', 'node_lost') THEN failure
        END,
    failure_detail = CASE
        WHEN failure IS NULL THEN NULL
        WHEN substr(failure, 1, 14) = 'start_failed: ' THEN substr(failure, 15)
        WHEN substr(failure, 1, 7) = 'killed:' THEN substr(failure, 8)
        WHEN failure IN ('start_failed', 'exit_code', 'signal', 'timeout', 'node_lost')
            THEN NULL
        ELSE failure
        END;
DROP TABLE temp._job_v2;
CREATE INDEX tasks_window ON tasks (pool_id, state, neg_priority, seq);
CREATE TABLE task_attempts (
    seq INTEGER NOT NULL REFERENCES tasks(seq),
    attempt INTEGER NOT NULL,
    node_id TEXT,
    started_at REAL,
    ended_at REAL,
    exit_code INTEGER,
    signal INTEGER,
    failure_kind TEXT,
    failure_detail TEXT,
    outcome TEXT NOT NULL,
    usage TEXT,
    PRIMARY KEY (seq, attempt)
) WITHOUT ROWID;
-- the one attempt a v1 database kept (its last ended one) becomes history; the
-- attempts before it were never stored
INSERT INTO task_attempts
    SELECT seq, retry_count + requeue_count, node_id, started_at, ended_at, exit_code, signal,
           failure_kind, failure_detail, result, usage
    FROM tasks WHERE state = 'completed' AND result IS NOT NULL;
INSERT INTO task_attempts
    SELECT seq, retry_count + requeue_count - 1, node_id, started_at, ended_at, exit_code,
           signal, failure_kind, failure_detail, 'retry', usage
    FROM tasks WHERE state != 'completed' AND failure IS NOT NULL AND retry_count > 0;
CREATE TABLE agents (
    pool_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    token TEXT NOT NULL,
    pid INTEGER,
    host TEXT,
    root TEXT,
    started_at REAL NOT NULL,
    PRIMARY KEY (pool_id, node_id, token)
);
INSERT OR IGNORE INTO meta VALUES ('change', '0');
"""


# v3: task counts kept per job (job_counts: one row per job, moved by every write that
# changes a task's state, result, retry/requeue count or failure kind, in the same
# transaction), the state index widened to (job_id, state, seq, exit_code) so that a
# filtered page walks it in submission order and tests exit codes without reading rows,
# and the key that signs continuation tokens.
SCHEMA_V3 = """
CREATE TABLE job_counts (
    job_id TEXT PRIMARY KEY,
    active INTEGER NOT NULL DEFAULT 0,
    preparing INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    requeues INTEGER NOT NULL DEFAULT 0,
    retried INTEGER NOT NULL DEFAULT 0,
    requeued INTEGER NOT NULL DEFAULT 0,
    timed_out INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO job_counts
    SELECT j.id, COALESCE(SUM(t.state = 'active'), 0), COALESCE(SUM(t.state = 'preparing'), 0),
           COALESCE(SUM(t.state = 'running'), 0), COALESCE(SUM(t.state = 'completed'), 0),
           COALESCE(SUM(t.result IS 'success'), 0), COALESCE(SUM(t.result IS 'failure'), 0),
           COALESCE(SUM(t.retry_count), 0), COALESCE(SUM(t.requeue_count), 0),
           COALESCE(SUM(t.retry_count > 0), 0), COALESCE(SUM(t.requeue_count > 0), 0),
           COALESCE(SUM(t.result IS 'failure' AND t.failure_kind IS 'timeout'), 0),
           COUNT(t.seq)
    FROM jobs j LEFT JOIN tasks t ON t.job_id = j.id GROUP BY j.id;
DROP INDEX tasks_by_state;
CREATE INDEX tasks_by_state ON tasks (job_id, state, seq, exit_code);
INSERT OR IGNORE INTO meta VALUES ('query_key', lower(hex(randomblob(32))));
"""

# Schema 4: a pool's autoscale formula (at most one per pool) and what its evaluations
# and resizes did (kept bounded: the newest AUTOSCALE_EVENTS_KEPT per pool).
SCHEMA_V4 = """
CREATE TABLE autoscale (
    pool_id TEXT PRIMARY KEY,
    formula TEXT NOT NULL,
    interval_s REAL NOT NULL,
    enabled_at REAL NOT NULL
);
CREATE TABLE pool_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    result TEXT,
    error TEXT
);
CREATE INDEX pool_events_by_pool ON pool_events (pool_id, id);
"""
AUTOSCALE_EVENTS_KEPT = 200


# Schema 5: a job's preparation and release tasks, one row per (job, node, kind).
SCHEMA_V5 = """
CREATE TABLE job_node_tasks (
    job_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    pool_id TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    failure TEXT,
    task_dir TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    ended_at REAL,
    PRIMARY KEY (job_id, node_id, kind)
) WITHOUT ROWID;
"""


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    def step(db: sqlite3.Connection) -> None:
        # statement by statement: executescript() would COMMIT the migration's transaction
        for stmt in _statements(sql):
            db.execute(stmt)
    return step


def _statements(sql: str) -> Iterator[str]:
    """The statements of a script (a ';' in a comment or string does not end one)."""
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {buf.strip()[:80]}")


# (version, step): a database at version V runs every step above V, in order, in one
# transaction. A new database starts at 0, so it is built by the same steps.
MIGRATIONS: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [
    (1, _script(SCHEMA_V1)),
    (2, _script(SCHEMA_V2)),
    (3, _script(SCHEMA_V3)),
    (4, _script(SCHEMA_V4)),
    (5, _script(SCHEMA_V5)),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

TASK_COLUMNS = (
    "seq", "job_id", "id", "command_line", "spec", "required_slots", "state", "result",
    "failure", "exit_code", "signal", "retry_count", "requeue_count", "node_id", "task_dir",
    "started_at", "ended_at", "usage", "pool_id", "neg_priority", "max_retries", "instances",
    "slots_per_instance", "flags", "failure_kind", "failure_detail",
)

# TaskRow.flags bits
FLAG_RESOURCE_FILES = 1
FLAG_COORDINATION = 2
FLAG_COMMON_FILES = 4
FLAG_APPS = 8  # it names application packages

OUTCOMES = ("success", "failure", "retry", "requeue")
OPEN_STATES = ("active", "preparing", "running")

# job_counts: what task_counts() answers, in this order after job_id
COUNT_KEYS = ("active", "preparing", "running", "completed", "succeeded", "failed",
              "retries", "requeues", "retried", "requeued", "timed_out", "total")
# the same numbers counted from the rows (grouped by job) of the tasks WHERE {where} picks
_COUNT_SQL = (
    "SELECT job_id, SUM(state = 'active'), SUM(state = 'preparing'), SUM(state = 'running'), "
    "SUM(state = 'completed'), SUM(result IS 'success'), SUM(result IS 'failure'), "
    "SUM(retry_count), SUM(requeue_count), SUM(retry_count > 0), SUM(requeue_count > 0), "
    "SUM(result IS 'failure' AND failure_kind IS 'timeout'), COUNT(*) "
    "FROM tasks WHERE {where} GROUP BY job_id")
_SEQS = "seq IN (SELECT value FROM json_each(?))"  # one parameter: a JSON array of seqs
_STATE_AT = {k: i for i, k in enumerate(COUNT_KEYS[:4])}  # a state's place in COUNT_KEYS
# what a task adds to its job's counts is a function of these (after its seq)
_COUNTED_SQL = ("SELECT seq, job_id, state, result, retry_count, requeue_count, failure_kind "
                "FROM tasks WHERE {where}")
_COUNT_UPSERT = (
    f"INSERT INTO job_counts (job_id, {', '.join(COUNT_KEYS)}) "
    f"VALUES (?, {', '.join('?' * len(COUNT_KEYS))}) ON CONFLICT (job_id) DO UPDATE SET "
    + ", ".join(f"{k} = {k} + excluded.{k}" for k in COUNT_KEYS))
# the first and the last seq of a job's tasks in one state: a seek each
_FIRST_SEQ_SQL = "SELECT seq FROM tasks WHERE job_id = ? AND state = ? ORDER BY seq LIMIT 1"
_LAST_SEQ_SQL = "SELECT seq FROM tasks WHERE job_id = ? AND state = ? ORDER BY seq DESC LIMIT 1"
# tasks added, chunk by chunk, within one transaction
ADD_CHUNK = 1000
# a page whose filter ranges over ids is served from the (job_id, id) index when at most
# this many of the job's ids lie in the range (they are sorted by seq); else it walks the
# job in seq order
SPARSE_ID_ROWS = 5000

# how often wait_for_change looks for a commit made by another process
CHANGE_POLL_S = 0.05
# how long a write waits for another connection's write lock before it fails
BUSY_TIMEOUT_S = 30.0


class TaskRow(NamedTuple):
    """What scheduling needs of a runnable task (no spec JSON, no job lookup)."""

    seq: int
    job_id: str
    id: str
    pool_id: str
    neg_priority: int
    required_slots: int
    instances: int  # 0: an ordinary task
    slots_per_instance: int
    max_retries: int  # -1: without limit
    retry_count: int
    requeue_count: int
    flags: int  # FLAG_* bits
    attempt: int  # the number its next attempt gets (as task_attempts numbers them)


class DispatchSpec(NamedTuple):
    """What sending a task needs, read from its spec when it is dispatched."""

    command_line: str
    environment: dict[str, str]
    max_wall_clock_time_s: float | None
    resource_files: list[dict[str, str]]
    coordination_command: str | None
    common_resource_files: list[dict[str, str]]
    output_files: list[dict[str, str]] = []
    application_package_references: list[dict[str, Any]] = []


_TASKROW_SQL = ("t.seq, t.job_id, t.id, t.pool_id, t.neg_priority, t.required_slots, "
                "t.instances, t.slots_per_instance, t.max_retries, t.retry_count, "
                "t.requeue_count, t.flags, MAX(t.retry_count + t.requeue_count, "
                "COALESCE((SELECT MAX(a.attempt) + 1 FROM task_attempts a "
                "WHERE a.seq = t.seq), 0))")  # the attempt: as _NEXT_ATTEMPT numbers it
# the tasks first (CROSS JOIN fixes the order): an index range of tasks, each job by its id
_NEW_TASKS_SQL = (f"SELECT {_TASKROW_SQL} FROM tasks t CROSS JOIN jobs j ON j.id = t.job_id "
                  "WHERE t.state = 'active' AND t.seq > ? AND j.state = 'active' "
                  "ORDER BY t.seq LIMIT ?")
_WINDOW_SQL = (f"SELECT {_TASKROW_SQL} FROM tasks t CROSS JOIN jobs j ON j.id = t.job_id "
               "WHERE t.pool_id = ? AND t.state = 'active' AND j.state = 'active' "
               "ORDER BY t.neg_priority, t.seq LIMIT ?")
# (neg_priority, seq) > (p, s) as two index ranges: the rest of priority p after seq s, then
# the priorities after p (a row-value '>' seeks on neg_priority only, then scans priority p)
_WINDOW_SAME_SQL = (f"SELECT {_TASKROW_SQL} FROM tasks t CROSS JOIN jobs j ON j.id = t.job_id "
                    "WHERE t.pool_id = ? AND t.state = 'active' AND t.neg_priority = ? "
                    "AND t.seq > ? AND j.state = 'active' ORDER BY t.seq LIMIT ?")
_WINDOW_NEXT_SQL = (f"SELECT {_TASKROW_SQL} FROM tasks t CROSS JOIN jobs j ON j.id = t.job_id "
                    "WHERE t.pool_id = ? AND t.state = 'active' AND t.neg_priority > ? "
                    "AND j.state = 'active' ORDER BY t.neg_priority, t.seq LIMIT ?")
# an attempt's number: after the task's last recorded attempt, and never below the
# attempts its counters say have ended (a v1 database recorded only its last)
_NEXT_ATTEMPT = ("MAX(t.retry_count + t.requeue_count, "
                 "COALESCE((SELECT MAX(a.attempt) + 1 FROM task_attempts a "
                 "WHERE a.seq = t.seq), 0))")
_ATTEMPT_INSERT = ("INSERT INTO task_attempts (seq, attempt, node_id, started_at, ended_at, "
                   "exit_code, signal, failure_kind, failure_detail, outcome, usage) ")


def _row_dict(cur: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cur.description, row)}


def parse_failure(text: str | None) -> tuple[str | None, str | None]:
    """(failure_kind, failure_detail) of a v1 one-string failure ('start_failed: WHY',
    'killed:terminate', 'exit_code', ...); an unknown text is kept as the detail."""
    if text is None:
        return None, None
    if text == "start_failed" or text.startswith("start_failed: "):
        return FailureKind.START_FAILED.value, text[14:] or None
    if text.startswith("killed:"):
        return FailureKind.KILLED.value, text[7:]
    if text in (FailureKind.EXIT_CODE, FailureKind.SIGNAL, FailureKind.TIMEOUT,
                FailureKind.NODE_LOST):
        return text, None
    return None, text


def _kind(value: FailureKind | str | None) -> str | None:
    return None if value is None else FailureKind(value).value


# ---- process-wide change notification -------------------------------------------

class _Changes:
    """Wakes the waiters of one database file in this process when a commit bumps it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()


_changes_lock = threading.Lock()
_changes: dict[str, _Changes] = {}


def _changes_for(path: Path) -> _Changes:
    key = os.path.realpath(path)
    with _changes_lock:
        return _changes.setdefault(key, _Changes())


# ---- files, modes and a full disk ----------------------------------------------

def secure_dir(path: Path) -> None:
    """A home: created 0700 (whatever the umask); an existing one of ours tightened to
    0700, unless it is a shared directory (sticky, like /tmp)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    st = path.stat()
    if (st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX
            and stat.S_IMODE(st.st_mode) != 0o700):
        os.chmod(path, 0o700)


def _secure_file(path: Path, *, create: bool) -> None:
    """A database file: 0600 whatever the umask (SQLite gives its -wal and -shm the main
    file's mode); created empty when ``create`` and missing; an existing one of ours
    tightened."""
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            return
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o600:
        os.chmod(path, 0o600)


def storage_full(exc: BaseException, directory: str | Path) -> StorageFull | None:
    """The StorageFull error for ``exc`` when it says there is no space left (SQLite's
    SQLITE_FULL, an OSError ENOSPC/EDQUOT, or an I/O error while ``directory``'s disk
    has no space), else None."""
    if isinstance(exc, StorageFull):
        return exc
    full = False
    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    elif isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        full = code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)
        if not full and code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(directory).free < 64 * 1024
    if not full:
        return None
    return StorageFull(f"{directory}: no space left to write hpcbatch's state ({exc}); "
                       "free space there (or set HPCBATCH_HOME to another disk) and retry; "
                       "nothing of this request was stored")


class Store:
    """One connection to the state database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.commits = 0  # transactions committed through this connection
        self._pending_counts: dict[str, list[int]] = {}  # job_counts changes not yet written
        self._count_cursor: sqlite3.Cursor | None = None  # the reads of _counted
        self.db: sqlite3.Connection | None = None
        self._changes = _changes_for(self.path)
        try:
            self._open()
        except BaseException as exc:
            if self.db is not None:
                self.db.close()
            full = storage_full(exc, self.path.parent)
            if full is not None:
                raise full from exc
            raise

    def _open(self) -> None:
        secure_dir(self.path.parent)
        _secure_file(self.path, create=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                  check_same_thread=False)
        self.db.row_factory = _row_dict
        self._busy_ms = int(BUSY_TIMEOUT_S * 1000)  # what connect(timeout=) set
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._count_cursor = self.db.cursor()
        self._count_cursor.row_factory = None
        for suffix in ("-wal", "-shm"):  # made 0644 by hpcbatch before schema 2
            _secure_file(Path(f"{self.path}{suffix}"), create=False)
        self._migrate()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    # ---- schema ------------------------------------------------------------

    def schema_version(self) -> int:
        """The database's schema version (0: nothing created yet)."""
        has_meta = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return 0 if row is None else int(row["value"])

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise Conflict(f"{self.path}: state database has schema version {version}, "
                           f"newer than this hpcbatch understands ({SCHEMA_VERSION}); "
                           "upgrade hpcbatch")

    def _migrate(self) -> None:
        """Run the steps above the database's version, all in one transaction (a look
        without the write lock first: an up-to-date database is not locked to open)."""
        version = self.schema_version()
        self._check_not_newer(version)
        if version == SCHEMA_VERSION:
            return
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta "
                       "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            version = self.schema_version()  # again, under the lock
            self._check_not_newer(version)
            for target, step in MIGRATIONS:
                if target > version:
                    step(db)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) "
                       "DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),))

    # ---- transactions and changes ----------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, while_waiting: Callable[[], None] | None = None,
                    wait_slice_s: float = 0.5) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolls back on any error (nothing half-written).
        A transaction that changed any row bumps the change counter. No space left:
        StorageFull (rolled back). While another connection holds the write lock (a
        1M-task submit holds it for seconds), ``while_waiting`` is called every
        ``wait_slice_s``, up to the usual BUSY_TIMEOUT_S."""
        db = self.db
        if db.in_transaction:  # nested: join the outer transaction
            yield db
            return
        try:
            self._begin(while_waiting, wait_slice_s)
        except sqlite3.Error as exc:
            full = storage_full(exc, self.path.parent)
            if full is not None:
                raise full from exc
            raise
        before = db.total_changes
        changed = False
        self._pending_counts = {}
        try:
            yield db
            self._flush_counts()
            if db.total_changes != before:
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                           "WHERE key='change'")
                changed = True
            db.execute("COMMIT")
        except BaseException as exc:
            self._pending_counts = {}
            if db.in_transaction:  # SQLite may have rolled it back already (a full disk)
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            full = storage_full(exc, self.path.parent)
            if full is not None:
                raise full from exc
            raise
        self.commits += 1
        if changed:
            self._changes.notify()

    def _begin(self, while_waiting: Callable[[], None] | None, slice_s: float) -> None:
        db = self.db
        if while_waiting is None:
            self._busy_timeout(int(BUSY_TIMEOUT_S * 1000))
            db.execute("BEGIN IMMEDIATE")
            return
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        # (left set for the next transaction: a coordinator's every turn waits this way)
        self._busy_timeout(max(1, int(slice_s * 1000)))
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY or \
                        time.monotonic() >= deadline:
                    raise
            while_waiting()

    def _busy_timeout(self, ms: int) -> None:
        """How long a statement waits for a lock held by another connection (set only
        when it changes)."""
        if self._busy_ms != ms:
            self.db.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_ms = ms

    def change_counter(self) -> int:
        """Bumped by every committed transaction that changed a row."""
        row = self.db.execute("SELECT value FROM meta WHERE key='change'").fetchone()
        return 0 if row is None else int(row["value"])

    def wait_for_change(self, after: int, timeout_s: float) -> int:
        """The change counter once it is above ``after``, or its value at the timeout.
        A commit through any Store of this process wakes it at once; one by another
        process is seen within CHANGE_POLL_S."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        changes = self._changes
        while True:
            with changes.cond:
                generation = changes.generation
            value = self.change_counter()
            left = deadline - time.monotonic()
            if value > after or left <= 0:
                return value
            with changes.cond:
                if changes.generation == generation:
                    changes.cond.wait(min(left, CHANGE_POLL_S))

    # ---- pools and nodes ---------------------------------------------------

    def create_pool(self, spec: PoolSpec, *, exist_ok: bool = False) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM pools WHERE id=?", (spec.id,)).fetchone():
                if exist_ok:
                    return
                raise Conflict(f"pool {spec.id!r} already exists; pick another id or delete it")
            db.execute("INSERT INTO pools VALUES (?, ?, ?)",
                       (spec.id, json.dumps(spec_to_dict(spec)), time.time()))

    def set_pool_spec(self, spec: PoolSpec) -> None:
        """Replace a pool's stored spec (the automatic local pool's slots follow the
        machine)."""
        with self.transaction() as db:
            cur = db.execute("UPDATE pools SET spec=? WHERE id=?",
                             (json.dumps(spec_to_dict(spec)), spec.id))
            if cur.rowcount == 0:
                self.get_pool(spec.id)  # raises NotFound

    def get_pool(self, pool_id: str) -> PoolSpec:
        row = self.db.execute("SELECT spec FROM pools WHERE id=?", (pool_id,)).fetchone()
        if row is None:
            known = ", ".join(p.id for p in self.list_pools()) or "none"
            raise NotFound(f"pool {pool_id!r} does not exist (known pools: {known}); "
                           "create it with 'hpcbatch pool create'")
        return PoolSpec(**json.loads(row["spec"]))

    def list_pools(self) -> list[PoolSpec]:
        rows = self.db.execute("SELECT spec FROM pools ORDER BY created_at").fetchall()
        return [PoolSpec(**json.loads(r["spec"])) for r in rows]

    def upsert_node(self, pool_id: str, node_id: str, state: str, slots: int,
                    info: dict | None = None, reason: str | None = None) -> None:
        """Record a node's state; ``info`` None (or empty) keeps what is known of it."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, COALESCE(?, '{}'), ?, ?) "
                "ON CONFLICT (pool_id, id) DO UPDATE SET state=excluded.state, "
                "slots=excluded.slots, info=COALESCE(?, nodes.info), reason=excluded.reason, "
                "updated_at=excluded.updated_at",
                (pool_id, node_id, state, slots, json.dumps(info) if info else None, reason,
                 time.time(), json.dumps(info) if info else None))

    def check_pool_deletable(self, pool_id: str) -> None:
        """Raise unless the pool exists and no job (even a completed one) is bound to it."""
        self.get_pool(pool_id)
        jobs = [r["id"] for r in self.db.execute(
            "SELECT id FROM jobs WHERE pool_id=? ORDER BY seq", (pool_id,)).fetchall()]
        if jobs:
            more = f" and {len(jobs) - 3} more" if len(jobs) > 3 else ""
            raise Conflict(f"pool {pool_id!r} still has job(s) {', '.join(jobs[:3])}{more}; "
                           f"delete them first ('hpcbatch job delete JOB')")

    def delete_pool(self, pool_id: str) -> None:
        """Remove a pool, its nodes and its agents' records (see check_pool_deletable)."""
        with self.transaction() as db:
            self.check_pool_deletable(pool_id)
            db.execute("DELETE FROM nodes WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM agents WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM autoscale WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM pool_events WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM pools WHERE id=?", (pool_id,))

    # ---- autoscale (hpcbatch.autoscaling) ----------------------------------------

    def set_autoscale(self, pool_id: str, formula: str, interval_s: float) -> None:
        with self.transaction() as db:
            self.get_pool(pool_id)
            db.execute("INSERT INTO autoscale VALUES (?, ?, ?, ?) ON CONFLICT (pool_id) DO "
                       "UPDATE SET formula=excluded.formula, interval_s=excluded.interval_s, "
                       "enabled_at=excluded.enabled_at",
                       (pool_id, formula, float(interval_s), time.time()))

    def clear_autoscale(self, pool_id: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM autoscale WHERE pool_id=?",
                              (pool_id,)).rowcount > 0

    def get_autoscale(self, pool_id: str) -> dict[str, Any] | None:
        return self.db.execute("SELECT * FROM autoscale WHERE pool_id=?",
                               (pool_id,)).fetchone()

    def list_autoscale(self) -> list[dict[str, Any]]:
        return self.db.execute("SELECT * FROM autoscale ORDER BY pool_id").fetchall()

    def record_pool_event(self, pool_id: str, kind: str, result: Mapping[str, Any] | None,
                          error: str | None, at: float | None = None) -> None:
        """An autoscale evaluation or a resize (``kind``), what it gave or its error; the
        newest AUTOSCALE_EVENTS_KEPT of the pool are kept."""
        with self.transaction() as db:
            cur = db.execute("INSERT INTO pool_events (pool_id, at, kind, result, error) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (pool_id, time.time() if at is None else at, kind,
                              None if result is None else json.dumps(result), error))
            db.execute("DELETE FROM pool_events WHERE pool_id=? AND id <= ?",
                       (pool_id, cur.lastrowid - AUTOSCALE_EVENTS_KEPT))

    def pool_events(self, pool_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The pool's newest events, newest first."""
        rows = self.db.execute("SELECT at, kind, result, error FROM pool_events WHERE "
                               "pool_id=? ORDER BY id DESC LIMIT ?",
                               (pool_id, int(limit))).fetchall()
        for r in rows:
            r["result"] = json.loads(r["result"]) if r["result"] else None
        return rows

    def pool_task_slots(self, pool_id: str) -> tuple[int, int, int, int]:
        """(tasks active, slots they need, tasks placed (preparing or running), slots
        they use) of the pool's jobs: an ordinary task its required slots, a
        multi-instance one instances x slots per instance (0: a whole node, counted as
        ``task_slots_per_node``). For a dry run; the coordinator samples its state."""
        per_node = self.get_pool(pool_id).task_slots_per_node
        rows = self._tuples(
            "SELECT state = 'active', COUNT(*), SUM(CASE WHEN instances > 0 THEN instances * "
            "(CASE WHEN slots_per_instance > 0 THEN slots_per_instance ELSE ? END) ELSE "
            "required_slots END) FROM tasks WHERE pool_id=? AND state != 'completed' "
            "GROUP BY state = 'active'", (per_node, pool_id))
        out = [0, 0, 0, 0]
        for active, n, slots in rows:
            i = 0 if active else 2
            out[i], out[i + 1] = int(n), int(slots or 0)
        return out[0], out[1], out[2], out[3]

    def pool_last_ended(self, pool_id: str) -> float | None:
        """When a task of the pool last ended (None: none has). For a dry run."""
        row = self._tuples("SELECT MAX(ended_at) FROM tasks WHERE pool_id=?", (pool_id,))
        return row[0][0] if row else None

    def list_nodes(self, pool_id: str | None = None) -> list[dict[str, Any]]:
        if pool_id is None:
            return self.db.execute("SELECT * FROM nodes ORDER BY pool_id, id").fetchall()
        return self.db.execute("SELECT * FROM nodes WHERE pool_id=? ORDER BY id",
                               (pool_id,)).fetchall()

    # ---- agents (to find and reap what earlier agents of this home left) ------

    def record_agent(self, pool_id: str, node_id: str, token: str, pid: int | None,
                     host: str | None, root: str | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (pool_id, node_id, token) DO UPDATE SET pid=excluded.pid, "
                       "host=excluded.host, root=excluded.root",
                       (pool_id, node_id, token, pid, host, root, time.time()))

    def forget_agent(self, pool_id: str, node_id: str, token: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM agents WHERE pool_id=? AND node_id=? AND token=?",
                       (pool_id, node_id, token))

    def agents(self) -> list[dict[str, Any]]:
        """Every recorded agent: pool_id, node_id, token, pid, host, root, started_at."""
        return self.db.execute("SELECT * FROM agents ORDER BY started_at, pool_id, node_id"
                               ).fetchall()

    # ---- jobs --------------------------------------------------------------

    def create_job(self, spec: JobSpec) -> None:
        with self.transaction() as db:
            self.get_pool(spec.pool_id)
            if db.execute("SELECT 1 FROM jobs WHERE id=?", (spec.id,)).fetchone():
                raise Conflict(f"job {spec.id!r} already exists; pick another job id")
            db.execute("INSERT INTO jobs (id, pool_id, spec, state, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (spec.id, spec.pool_id, json.dumps(spec_to_dict(spec)),
                        JobState.ACTIVE.value, time.time()))
            db.execute("INSERT OR IGNORE INTO job_counts (job_id) VALUES (?)", (spec.id,))

    def get_job(self, job_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist; 'hpcbatch job list' shows the jobs")
        row["spec"] = JobSpec(**json.loads(row["spec"]))
        return row

    def job_pool_id(self, job_id: str) -> str | None:
        """The pool of a job, or None when there is no such job."""
        row = self.db.execute("SELECT pool_id FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else row["pool_id"]

    def list_jobs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        for r in rows:
            r["spec"] = JobSpec(**json.loads(r["spec"]))
        return rows

    def delete_job(self, job_id: str) -> None:
        """Remove a completed job, its tasks and their attempts; refused while a task is
        unfinished."""
        with self.transaction() as db:
            self.get_job(job_id)
            left = self.unfinished(job_id)
            if left:
                raise Conflict(f"job {job_id!r} has {left} unfinished task(s); wait for them "
                               f"('hpcbatch job wait {job_id}') or terminate them first")
            db.execute("DELETE FROM task_attempts WHERE seq IN "
                       "(SELECT seq FROM tasks WHERE job_id=?)", (job_id,))
            db.execute("DELETE FROM tasks WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM job_counts WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM job_node_tasks WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def upsert_job_task(self, job_id: str, pool_id: str, node_id: str, kind: str, state: str,
                        t: float, task_dir: str = "", exit_code: int | None = None,
                        failure: str | None = None, retry_count: int = 0) -> None:
        """A job's preparation or release task on a node: running (its start), or how it
        ended (succeeded, failed, skipped)."""
        with self.transaction() as db:
            if state == "running":
                db.execute(
                    "INSERT INTO job_node_tasks (job_id, node_id, kind, pool_id, state, "
                    "task_dir, retry_count, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (job_id, node_id, kind) DO UPDATE SET state=excluded.state, "
                    "task_dir=excluded.task_dir, retry_count=excluded.retry_count, "
                    "started_at=excluded.started_at, exit_code=NULL, failure=NULL, "
                    "ended_at=NULL", (job_id, node_id, kind, pool_id, state, task_dir or None,
                                      retry_count, t))
            else:
                db.execute(
                    "INSERT INTO job_node_tasks (job_id, node_id, kind, pool_id, state, "
                    "exit_code, failure, task_dir, retry_count, ended_at) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, node_id, kind) DO "
                    "UPDATE SET state=excluded.state, exit_code=excluded.exit_code, "
                    "failure=excluded.failure, task_dir=COALESCE(excluded.task_dir, task_dir),"
                    " retry_count=excluded.retry_count, ended_at=excluded.ended_at",
                    (job_id, node_id, kind, pool_id, state, exit_code, failure,
                     task_dir or None, retry_count, t))

    def job_releasing(self, job_id: str) -> bool:
        """Whether a release task of the job still runs (the job completes after it)."""
        return bool(self._tuples("SELECT 1 FROM job_node_tasks WHERE job_id=? AND "
                                 "kind='release' AND state='running' LIMIT 1", (job_id,)))

    def end_running_job_tasks(self, t: float) -> int:
        """At a coordinator's start: preparation and release tasks recorded running were
        stopped with the coordinator before them (their agents stop their tasks)."""
        with self.transaction() as db:
            return db.execute(
                "UPDATE job_node_tasks SET state='failed', ended_at=?, failure='stopped: "
                "the coordinator stopped while it ran' WHERE state='running'", (t,)).rowcount

    def job_tasks(self, job_id: str) -> list[dict[str, Any]]:
        """The job's preparation and release tasks, by node then kind."""
        self.get_job(job_id)
        names = ("job_id", "node_id", "kind", "pool_id", "state", "exit_code", "failure",
                 "task_dir", "retry_count", "started_at", "ended_at")
        return [dict(zip(names, row)) for row in self._tuples(
            f"SELECT {', '.join(names)} FROM job_node_tasks WHERE job_id=? "
            "ORDER BY node_id, kind", (job_id,))]

    def set_job_state(self, job_id: str, state: JobState) -> None:
        """Move a job to ``state`` (through the transitions table: an illegal move raises)."""
        done = time.time() if state is JobState.COMPLETED else None
        with self.transaction() as db:
            JobState(self.get_job(job_id)["state"]).check_move(state)
            db.execute("UPDATE jobs SET state=?, completed_at=? WHERE id=?",
                       (state.value, done, job_id))

    # ---- tasks -------------------------------------------------------------

    def add_tasks(self, job_id: str, specs: Iterable[TaskSpec | Mapping[str, Any]]) -> int:
        """Validate and insert tasks in one transaction, all or nothing: the first bad
        task (ValidationError), one that does not fit the pool, or a duplicate id
        (Conflict; twice in this request: ValidationError) rolls every one back.
        ``specs`` may be any iterable: it is read and inserted ADD_CHUNK at a time."""
        return self.add_task_collection(job_id, specs, atomic=True)[0]

    def add_task_collection(self, job_id: str, tasks: Iterable[Any], *, atomic: bool = True
                            ) -> tuple[int, list[tuple[int, str | None, HpcBatchError]]]:
        """(tasks added, [(index, task id, error)]). ``atomic``: the first error is raised
        and nothing is added; else every valid task is stored and each bad one (a spec
        that does not validate, one that cannot fit the pool, an id already in the job or
        twice in this request) is reported. Bounded memory: tasks are read, validated and
        inserted ADD_CHUNK at a time, in one transaction."""
        errors: list[tuple[int, str | None, HpcBatchError]] = []
        added = 0
        with self.transaction() as db:
            job = self.get_job(job_id)
            if job["state"] != JobState.ACTIVE.value:
                raise Conflict(f"job {job_id!r} is {job['state']}; tasks can only be added "
                               "to an active job")
            pool = self.get_pool(job["pool_id"])
            elastic = self.get_autoscale(pool.id) is not None
            jspec: JobSpec = job["spec"]
            before = self._tuples("SELECT COALESCE(MAX(seq), 0) FROM tasks")[0][0]
            chunk: list[tuple[int, TaskSpec]] = []

            def flush() -> int:
                rows = chunk if atomic else self._new_ids(job_id, chunk, before, errors)
                n = self._insert_tasks(db, job_id, job["pool_id"], -jspec.priority,
                                       jspec.max_task_retry_count, rows, before)
                chunk.clear()
                return n

            for index, item in enumerate(tasks):
                try:
                    spec = TaskSpec.coerce(item)
                    _check_fits(spec, pool, elastic=elastic)
                except HpcBatchError as exc:
                    if atomic:
                        raise
                    errors.append((index, _item_id(item), exc))
                    continue
                chunk.append((index, spec))
                if len(chunk) >= ADD_CHUNK:
                    added += flush()
            if chunk:
                added += flush()
            if added:
                db.execute(_COUNT_UPSERT, (job_id, added, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, added))
        errors.sort(key=lambda e: e[0])
        return added, errors

    def _new_ids(self, job_id: str, chunk: list[tuple[int, TaskSpec]], before: int,
                 errors: list) -> list[tuple[int, TaskSpec]]:
        """The tasks of ``chunk`` whose id is not in the job yet (nor earlier in the
        chunk); the others are reported in ``errors``."""
        found = dict(self._tuples(
            "SELECT id, seq FROM tasks WHERE job_id = ? AND id IN "
            "(SELECT value FROM json_each(?))", (job_id, json.dumps([t.id for _, t in chunk]))))
        seen: set[str] = set()
        keep = []
        for index, t in chunk:
            seq = found.get(t.id)
            if t.id in seen or (seq is not None and seq > before):
                errors.append((index, t.id, _twice(t.id)))
            elif seq is not None:
                errors.append((index, t.id, _exists(t.id, job_id)))
            else:
                seen.add(t.id)
                keep.append((index, t))
        return keep

    def _insert_tasks(self, db: sqlite3.Connection, job_id: str, pool_id: str,
                      neg_priority: int, job_retries: int, chunk: list[tuple[int, TaskSpec]],
                      before: int) -> int:
        last: list[TaskSpec] = []

        def specs() -> Iterator[TaskSpec]:
            for _, t in chunk:
                last[:] = [t]
                yield t

        try:
            db.executemany(
                "INSERT INTO tasks (job_id, id, command_line, spec, required_slots, state, "
                "pool_id, neg_priority, max_retries, instances, slots_per_instance, flags) "
                "VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?)",
                _task_rows(job_id, pool_id, neg_priority, job_retries, specs()))
        except sqlite3.IntegrityError:
            if not last:
                raise
            task_id = last[0].id
            row = self._tuples("SELECT seq FROM tasks WHERE job_id=? AND id=?",
                               (job_id, task_id))
            if not row:
                raise
            raise (_twice(task_id) if row[0][0] > before else _exists(task_id, job_id)) \
                from None
        return len(chunk)

    def get_task(self, job_id: str, task_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM tasks WHERE job_id=? AND id=?",
                              (job_id, task_id)).fetchone()
        if row is None:
            self.get_job(job_id)
            raise NotFound(f"task {task_id!r} does not exist in job {job_id!r}")
        return row

    def list_tasks(self, job_id: str, state: str | None = None,
                   limit: int | None = None, *, result: str | None = None
                   ) -> list[dict[str, Any]]:
        """A job's tasks in seq order (of one state, one result), at most ``limit``."""
        sql = "SELECT * FROM tasks WHERE job_id=?"
        args: list[Any] = [job_id]
        if state:
            sql += " AND state=?"
            args.append(state)
        if result:
            sql += " AND result=?"
            args.append(result)
        sql += " ORDER BY seq"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return self.db.execute(sql, args).fetchall()

    # ---- kept counts ---------------------------------------------------------------

    def task_counts(self, job_id: str) -> dict[str, int]:
        """Counts by state, 'succeeded'/'failed' (by result), 'retries'/'requeues' (the
        sums of the tasks' counts), 'retried'/'requeued' (tasks retried or requeued at
        least once), 'timed_out' (failed by timeout) and 'total': one row read, kept by
        every write (zeros for a job with no tasks or no such job)."""
        self._flush_counts()
        row = self._tuples(f"SELECT {', '.join(COUNT_KEYS)} FROM job_counts WHERE job_id=?",
                           (job_id,))
        return dict(zip(COUNT_KEYS, row[0] if row else (0,) * len(COUNT_KEYS)))

    def all_task_counts(self) -> dict[str, dict[str, int]]:
        """job id -> task_counts(job id), for every job."""
        self._flush_counts()
        return {r[0]: dict(zip(COUNT_KEYS, r[1:])) for r in self._tuples(
            f"SELECT job_id, {', '.join(COUNT_KEYS)} FROM job_counts")}

    def counted_task_counts(self, job_id: str) -> dict[str, int]:
        """task_counts counted from the job's rows (a scan: for checks and benchmarks)."""
        row = self._tuples(_COUNT_SQL.format(where="job_id = ?"), (job_id,))
        return dict(zip(COUNT_KEYS, row[0][1:] if row else (0,) * len(COUNT_KEYS)))

    def count_problems(self) -> list[str]:
        """Where a job's kept counts differ from its rows ([]: none); a scan of every
        task, for tests and 'is my home sound' checks."""
        self._flush_counts()
        counted = {r[0]: r[1:] for r in self._tuples(_COUNT_SQL.format(where="1"))}
        kept = {r[0]: r[1:] for r in self._tuples(
            f"SELECT job_id, {', '.join(COUNT_KEYS)} FROM job_counts")}
        jobs = [r[0] for r in self._tuples("SELECT id FROM jobs ORDER BY seq")]
        problems = [f"job {j!r} has no kept counts" for j in jobs if j not in kept]
        problems += [f"kept counts for {j!r}, which is not a job" for j in kept
                     if j not in jobs]
        zero = (0,) * len(COUNT_KEYS)
        for j in jobs:
            have, want = kept.get(j), counted.get(j, zero)
            if have is not None and tuple(have) != tuple(want):
                diff = {k: (h, w) for k, h, w in zip(COUNT_KEYS, have, want) if h != w}
                problems.append(f"job {j!r}: kept != counted {diff}")
        return problems

    def recount(self) -> None:
        """Count every job's tasks again into job_counts (a scan; repairs a home whose
        counts were changed outside the store)."""
        with self.transaction() as db:
            self._pending_counts = {}
            db.execute("DELETE FROM job_counts")
            db.execute("INSERT INTO job_counts (job_id) SELECT id FROM jobs")
            for r in self._tuples(_COUNT_SQL.format(where="1")):
                db.execute(f"UPDATE job_counts SET {', '.join(f'{k}=?' for k in COUNT_KEYS)} "
                           "WHERE job_id=?", (*r[1:], r[0]))

    def unfinished(self, job_id: str) -> int:
        """Tasks of a job not yet completed (from the kept counts: one row read)."""
        self._flush_counts()
        row = self._tuples("SELECT active + preparing + running FROM job_counts "
                           "WHERE job_id=?", (job_id,))
        return row[0][0] if row else 0

    def open_counts(self) -> dict[str, int]:
        """Job id -> its tasks not completed, for the jobs that have any (kept counts)."""
        self._flush_counts()
        rows = self._tuples(
            "SELECT j.id, c.active + c.preparing + c.running FROM jobs j "
            "JOIN job_counts c ON c.job_id = j.id ORDER BY j.seq")
        return {job_id: n for job_id, n in rows if n}

    @contextlib.contextmanager
    def _counted(self, where: str, args: tuple,
                 after: Callable[[tuple], tuple] | None = None) -> Iterator[None]:
        """Keep job_counts right across a change to the tasks ``where`` picks (the same
        tasks before and after: by seq). Their counted columns are read before the
        change; after it they are read again, or, when the caller knows what its
        statements did to each row, computed by ``after(row)`` (row: seq, job_id, state,
        result, retry_count, requeue_count, failure_kind). The difference is kept for the
        transaction and written to job_counts, one row per job, when it commits (a
        count read before that sees it). Every write that changes a task's state,
        result, retry_count, requeue_count, failure_kind or job goes through here (or
        moves the counts itself)."""
        sql = _COUNTED_SQL.format(where=where)
        cur = self._count_cursor
        before = cur.execute(sql, args).fetchall()
        yield
        now = [after(r) for r in before] if after is not None else \
            cur.execute(sql, args).fetchall()
        if len(before) + len(now) > 32:
            delta: dict[tuple, int] = collections.Counter(r[1:] for r in now)
            delta.subtract(r[1:] for r in before)
        else:  # a few rows (a coordinator turn): plain dict arithmetic is cheaper
            delta = {}
            for r in now:
                k = r[1:]
                delta[k] = delta.get(k, 0) + 1
            for r in before:
                k = r[1:]
                delta[k] = delta.get(k, 0) - 1
        pending = self._pending_counts
        for key, n in delta.items():
            if n:
                job_id, state, result, retries, requeues, kind = key
                have = pending.get(job_id)
                if have is None:
                    have = pending[job_id] = [0] * len(COUNT_KEYS)
                at = _STATE_AT.get(state)
                if at is not None:
                    have[at] += n
                if result == "success":
                    have[4] += n
                elif result == "failure":
                    have[5] += n
                    if kind == "timeout":
                        have[10] += n
                if retries:
                    have[6] += n * retries
                    have[8] += n
                if requeues:
                    have[7] += n * requeues
                    have[9] += n
                have[11] += n

    def _counted_seqs(self, seqs: Iterable[int], after: Callable[[tuple], tuple] | None = None
                      ) -> contextlib.AbstractContextManager[None]:
        seqs = list(seqs)
        if len(seqs) <= 32:  # a short list binds faster than a JSON array is parsed
            return self._counted(f"seq IN ({','.join('?' * len(seqs))})", tuple(seqs), after)
        return self._counted(_SEQS, (json.dumps(seqs),), after)

    def _flush_counts(self) -> None:
        """Write the transaction's pending count changes to job_counts."""
        pending, self._pending_counts = self._pending_counts, {}
        for job_id, delta in pending.items():
            if any(delta):
                self.db.execute(_COUNT_UPSERT, (job_id, *delta))

    # ---- list queries (hpcbatch.query builds the conditions) --------------------------

    def query_key(self) -> bytes:
        """The key that signs this home's continuation tokens."""
        key = getattr(self, "_query_key", None)
        if key is None:
            row = self._tuples("SELECT value FROM meta WHERE key='query_key'")
            if not row:
                raise Conflict(f"{self.path}: no query key in the state database; open it "
                               "once with this hpcbatch to upgrade it")
            key = self._query_key = bytes.fromhex(row[0][0])
        return key

    def _id_index(self) -> str:
        """The name SQLite gave the UNIQUE (job_id, id) index of tasks."""
        name = getattr(self, "_id_index_name", None)
        if name is None:
            for _, idx, unique, *_ in self._tuples("PRAGMA index_list('tasks')"):
                cols = [r[2] for r in self._tuples(f"PRAGMA index_info('{idx}')")]
                if unique and cols == ["job_id", "id"]:
                    name = self._id_index_name = idx
                    break
            else:
                raise Conflict(f"{self.path}: tasks has no (job_id, id) index")
        return name

    def _job_seq_range(self, job_id: str) -> tuple[int, int] | None:
        """The lowest and highest seq of the job's tasks (None: it has none): eight
        seeks in tasks_by_state (MIN and MAX in one SELECT would walk each state's
        range instead)."""
        ends = [r[0] for st in TaskState for sql in (_FIRST_SEQ_SQL, _LAST_SEQ_SQL)
                for r in self._tuples(sql, (job_id, st.value))]
        return (min(ends), max(ends)) if ends else None

    def _task_query(self, job_id: str, flt: Any, columns: Iterable[str], after: int | None,
                    limit: int) -> tuple[str, tuple] | None:
        """The SQL of a page of a job's tasks in seq order after ``after``, and how it is
        walked: the (job_id, id) index when the filter's top-level id range holds few of
        the job's ids (sorted by seq), else tasks_by_state when it has a top-level
        ``state eq``, else the job's seq range in the table itself. None: no rows."""
        cols = list(columns)
        bad = sorted(set(cols) - set(TASK_COLUMNS))
        if bad:
            raise ValueError(f"query_tasks: no such task column(s) {', '.join(bad)}")
        what = ", ".join(cols)
        where, params = (flt.sql, tuple(flt.params)) if flt is not None else ("1", ())
        after = after or 0
        id_range = getattr(flt, "id_range", None)
        if id_range is not None:
            lo, hi = id_range
            bound = " AND id < ?" if hi is not None else ""
            bounds = (lo, hi) if hi is not None else (lo,)
            few = self._tuples(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE job_id = ? AND id >= ?{bound} "
                "LIMIT ?)", (job_id, *bounds, SPARSE_ID_ROWS + 1))[0][0] <= SPARSE_ID_ROWS
            if few:
                return (f"SELECT {what} FROM tasks INDEXED BY {self._id_index()} "
                        f"WHERE job_id = ? AND id >= ?{bound} AND seq > ? AND {where} "
                        "ORDER BY seq LIMIT ?", (job_id, *bounds, after, *params, limit))
        state = getattr(flt, "state", None)
        if state is not None:
            return (f"SELECT {what} FROM tasks INDEXED BY tasks_by_state WHERE job_id = ? "
                    f"AND state = ? AND seq > ? AND {where} ORDER BY seq LIMIT ?",
                    (job_id, state, after, *params, limit))
        span = self._job_seq_range(job_id)
        if span is None or after >= span[1]:
            return None
        return (f"SELECT {what} FROM tasks NOT INDEXED WHERE seq > ? AND seq <= ? "
                f"AND job_id = ? AND {where} ORDER BY seq LIMIT ?",
                (max(after, span[0] - 1), span[1], job_id, *params, limit))

    def query_tasks(self, job_id: str, flt: Any, columns: Iterable[str], after: int | None,
                    limit: int) -> list[tuple]:
        """Up to ``limit`` rows (tuples of the named columns) of the job's tasks that
        match ``flt`` (a :class:`hpcbatch.query.Filter`, or None), in seq order after seq
        ``after``."""
        q = self._task_query(job_id, flt, columns, after, limit)
        return [] if q is None else self._tuples(*q)

    def explain_query_tasks(self, job_id: str, flt: Any, after: int | None = None,
                            limit: int = 1000) -> list[str]:
        """The query plan of that page (to check it searches an index or a seq range)."""
        q = self._task_query(job_id, flt, ["seq"], after, limit)
        return [] if q is None else [r[-1] for r in self._tuples(f"EXPLAIN QUERY PLAN {q[0]}",
                                                                  q[1])]

    def query_jobs(self, flt: Any, after: int | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` jobs that match ``flt`` in seq order after ``after``: the jobs
        row (spec as JSON text) with its kept counts (COUNT_KEYS, null when none)."""
        where, params = (flt.sql, tuple(flt.params)) if flt is not None else ("1", ())
        return self.db.execute(
            "SELECT j.seq, j.id, j.pool_id, j.spec, j.state, j.created_at, j.completed_at, "
            f"{', '.join('c.' + k for k in COUNT_KEYS)} FROM jobs j "
            f"LEFT JOIN job_counts c ON c.job_id = j.id WHERE j.seq > ? AND {where} "
            "ORDER BY j.seq LIMIT ?", (after or 0, *params, limit)).fetchall()

    def last_task_seq(self) -> int:
        """The highest task seq stored (0: none): where new_tasks starts after loading."""
        return self._tuples("SELECT COALESCE(MAX(seq), 0) FROM tasks")[0][0]

    def runnable_tasks(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """Active tasks of active jobs with seq > after_seq, oldest first, with their
        spec and their job's (the schema-1 coordinator's loader; new code: new_tasks and
        runnable_window, which are bounded)."""
        return self.db.execute(
            "SELECT t.seq, t.job_id, t.id, t.command_line, t.spec, t.required_slots, "
            "t.retry_count, t.requeue_count, j.pool_id, j.spec AS job_spec "
            "FROM tasks t JOIN jobs j ON j.id = t.job_id "
            "WHERE t.state='active' AND j.state='active' AND t.seq > ? ORDER BY t.seq",
            (after_seq,)).fetchall()

    def new_tasks(self, after_seq: int, limit: int) -> list[TaskRow]:
        """Active tasks of active jobs with seq > after_seq, oldest first, at most limit."""
        return [TaskRow._make(r) for r in self._tuples(_NEW_TASKS_SQL, (after_seq, limit))]

    def runnable_window(self, pool_id: str, after: tuple[int, int] | None,
                        limit: int) -> list[TaskRow]:
        """The pool's next ``limit`` active tasks of active jobs in (neg_priority, seq)
        order after ``after`` (None: from the start), from the tasks_window index."""
        if after is None:
            rows = self._tuples(_WINDOW_SQL, (pool_id, limit))
        else:
            neg_priority, seq = after
            rows = self._tuples(_WINDOW_SAME_SQL, (pool_id, neg_priority, seq, limit))
            if len(rows) < limit:
                rows += self._tuples(_WINDOW_NEXT_SQL, (pool_id, neg_priority, limit - len(rows)))
        return [TaskRow._make(r) for r in rows]

    def completed_on_node(self, pool_id: str, node_id: str) -> list[tuple[str, str, int, str]]:
        """(job id, task id, last attempt, task directory) of the pool's completed tasks
        whose last attempt ran on the node: what its kept logs would be of."""
        return self._tuples(
            "SELECT t.job_id, t.id, a.attempt, t.task_dir FROM tasks t "
            "JOIN task_attempts a ON a.seq = t.seq AND a.attempt = "
            "(SELECT MAX(b.attempt) FROM task_attempts b WHERE b.seq = t.seq) "
            "WHERE t.pool_id = ? AND t.state = 'completed' AND t.node_id = ? "
            "AND t.task_dir IS NOT NULL ORDER BY t.seq", (pool_id, node_id))

    def dispatch_specs(self, seqs: Iterable[int]) -> dict[int, DispatchSpec]:
        """seq -> DispatchSpec for the given tasks (those that exist)."""
        seqs = list(seqs)
        out: dict[int, DispatchSpec] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            for seq, spec in self._tuples(
                    f"SELECT seq, spec FROM tasks WHERE seq IN ({','.join('?' * len(chunk))})",
                    chunk):
                s = json.loads(spec)
                mi = s.get("multi_instance") or {}
                out[seq] = DispatchSpec(
                    command_line=s["command_line"], environment=s.get("environment") or {},
                    max_wall_clock_time_s=s.get("max_wall_clock_time_s"),
                    resource_files=list(s.get("resource_files") or ()),
                    coordination_command=mi.get("coordination_command"),
                    common_resource_files=list(mi.get("common_resource_files") or ()),
                    output_files=list(s.get("output_files") or ()),
                    application_package_references=list(
                        s.get("application_package_references") or ()))
        return out

    def mark_preparing(self, rows: Iterable[tuple[int, str, str, float]]) -> None:
        """(seq, node_id, task_dir, t): assigned to a node, not yet started."""
        rows = list(rows)
        with self.transaction() as db, self._counted_seqs((r[0] for r in rows), _preparing):
            db.executemany(
                "UPDATE tasks SET state='preparing', node_id=?, task_dir=?, started_at=?, "
                "ended_at=NULL WHERE seq=?",
                ((node_id, task_dir, t, seq) for seq, node_id, task_dir, t in rows))

    def mark_running(self, items: Iterable[tuple[int, float]]) -> None:
        """(seq, t): its process started (only where the task is still preparing)."""
        items = list(items)
        with self.transaction() as db, self._counted_seqs((seq for seq, _ in items), _running):
            db.executemany("UPDATE tasks SET state='running', started_at=? WHERE seq=? "
                           "AND state='preparing'", ((t, seq) for seq, t in items))

    def finish_attempts(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Many ``finish_attempt`` calls (keyword dicts, seq included) in one go: a turn's
        completions cost one statement per kind, not per task."""
        self.write_turn(finished=items)

    def write_turn(self, running: Iterable[tuple[int, float]] = (),
                   finished: Iterable[Mapping[str, Any]] = (),
                   preparing: Iterable[tuple[int, str, str, float]] = ()) -> None:
        """``mark_running(running)``, then ``finish_attempts(finished)``, then
        ``mark_preparing(preparing)``, with one read of the counted columns for all three
        (a turn of the coordinator: tasks that started, ended, and were placed). A task
        that started and ended (not requeued) in the same call gets no separate running
        write: its finish sets what that would have (its state, started_at)."""
        running, finished, preparing = list(running), list(finished), list(preparing)
        for it in finished:
            if it["outcome"] not in OUTCOMES:
                raise ValueError(f"outcome {it['outcome']!r} is not one of "
                                 f"{', '.join(OUTCOMES)}")
        rows = [(it["seq"], _kind(it["failure_kind"]), json.dumps(it["usage"] or {}), it)
                for it in finished]
        by_seq = {seq: (it["outcome"], it["retry_count"], kind) for seq, kind, _, it in rows}
        if running and by_seq:
            fused = {seq for seq, _, _, it in rows
                     if it["outcome"] != "requeue" and it["started_at"] is not None}
            running = [r for r in running if r[0] not in fused]
        run_seqs = {seq for seq, _ in running}
        prep_seqs = {r[0] for r in preparing}
        exact = (len(by_seq) == len(rows) and len(run_seqs) == len(running)
                 and len(prep_seqs) == len(preparing))
        after = _turn_after(run_seqs, by_seq, prep_seqs) if exact else None  # twice: read
        seqs = run_seqs | by_seq.keys() | prep_seqs
        if not seqs:
            return
        with self.transaction() as db, self._counted_seqs(seqs, after):
            if running:
                db.executemany("UPDATE tasks SET state='running', started_at=? WHERE seq=? "
                               "AND state='preparing'", ((t, seq) for seq, t in running))
            if rows:
                db.executemany(
                    f"{_ATTEMPT_INSERT} SELECT t.seq, {_NEXT_ATTEMPT}, ?, ?, ?, ?, ?, ?, ?, ?, ? "
                    "FROM tasks t WHERE t.seq = ?",
                    ((it["node_id"], it["started_at"], it["ended_at"], it["exit_code"],
                      it["signal"], kind, it["failure_detail"], it["outcome"], usage, seq)
                     for seq, kind, usage, it in rows))
                requeues = [(seq,) for seq, _, _, it in rows if it["outcome"] == "requeue"]
                if requeues:
                    db.executemany(
                        "UPDATE tasks SET state='active', requeue_count=requeue_count+1, "
                        "node_id=NULL WHERE seq=?", requeues)
                retries = [(it["retry_count"], it["exit_code"], it["signal"],
                            failure_text(kind, it["failure_detail"]), kind,
                            it["failure_detail"], it["started_at"], it["ended_at"], usage, seq)
                           for seq, kind, usage, it in rows if it["outcome"] == "retry"]
                if retries:
                    db.executemany(
                        "UPDATE tasks SET state='active', node_id=NULL, retry_count=?, "
                        "exit_code=?, signal=?, failure=?, failure_kind=?, failure_detail=?, "
                        "started_at=COALESCE(?, started_at), ended_at=?, usage=? WHERE seq=?",
                        retries)
                ends = [(it["outcome"], it["node_id"], it["retry_count"], it["exit_code"],
                         it["signal"], failure_text(kind, it["failure_detail"]), kind,
                         it["failure_detail"], it["started_at"], it["ended_at"], usage, seq)
                        for seq, kind, usage, it in rows
                        if it["outcome"] in ("success", "failure")]
                if ends:
                    db.executemany(
                        "UPDATE tasks SET state='completed', result=?, "
                        "node_id=COALESCE(?, node_id), retry_count=?, exit_code=?, signal=?, "
                        "failure=?, failure_kind=?, failure_detail=?, "
                        "started_at=COALESCE(?, started_at), ended_at=?, usage=? WHERE seq=?",
                        ends)
            if preparing:
                db.executemany(
                    "UPDATE tasks SET state='preparing', node_id=?, task_dir=?, started_at=?, "
                    "ended_at=NULL WHERE seq=?",
                    ((node_id, task_dir, t, seq) for seq, node_id, task_dir, t in preparing))

    def finish_attempt(self, seq: int, *, outcome: str, node_id: str | None,
                       started_at: float | None, ended_at: float | None,
                       exit_code: int | None, signal: int | None,
                       failure_kind: FailureKind | str | None, failure_detail: str | None,
                       usage: dict | None, retry_count: int) -> None:
        """Append the attempt to the task's history and set the task: success/failure ->
        completed with that result; retry -> active again with ``retry_count``; requeue ->
        active again, requeue_count + 1 (a requeue is not the task's failure: its last
        exit is left as it was)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        kind = _kind(failure_kind)
        usage_json = json.dumps(usage or {})
        with self.transaction() as db, self._counted("seq = ?", (seq,)):
            db.execute(
                f"{_ATTEMPT_INSERT} SELECT t.seq, {_NEXT_ATTEMPT}, ?, ?, ?, ?, ?, ?, ?, ?, ? "
                "FROM tasks t WHERE t.seq = ?",
                (node_id, started_at, ended_at, exit_code, signal, kind, failure_detail,
                 outcome, usage_json, seq))
            if outcome == "requeue":
                db.execute("UPDATE tasks SET state='active', requeue_count=requeue_count+1, "
                           "node_id=NULL WHERE seq=?", (seq,))
                return
            text = failure_text(kind, failure_detail)
            if outcome == "retry":
                db.execute(
                    "UPDATE tasks SET state='active', node_id=NULL, retry_count=?, "
                    "exit_code=?, signal=?, failure=?, failure_kind=?, failure_detail=?, "
                    "started_at=COALESCE(?, started_at), ended_at=?, usage=? WHERE seq=?",
                    (retry_count, exit_code, signal, text, kind, failure_detail, started_at,
                     ended_at, usage_json, seq))
                return
            db.execute(
                "UPDATE tasks SET state='completed', result=?, node_id=COALESCE(?, node_id), "
                "retry_count=?, exit_code=?, signal=?, failure=?, failure_kind=?, "
                "failure_detail=?, started_at=COALESCE(?, started_at), ended_at=?, usage=? "
                "WHERE seq=?",
                (outcome, node_id, retry_count, exit_code, signal, text, kind,
                 failure_detail, started_at, ended_at, usage_json, seq))

    def complete_unstarted(self, seq: int, failure_kind: FailureKind | str,
                           failure_detail: str | None, t: float) -> None:
        """A task that ends before it ran (terminated while queued): completed as a
        failure, with an attempt row that never started."""
        kind = _kind(failure_kind)
        with self.transaction() as db, self._counted("seq = ?", (seq,)):
            db.execute(
                f"{_ATTEMPT_INSERT} SELECT t.seq, {_NEXT_ATTEMPT}, NULL, NULL, ?, NULL, NULL, "
                "?, ?, 'failure', NULL FROM tasks t WHERE t.seq = ?",
                (t, kind, failure_detail, seq))
            db.execute(
                "UPDATE tasks SET state='completed', result='failure', failure=?, "
                "failure_kind=?, failure_detail=?, ended_at=? WHERE seq=?",
                (failure_text(kind, failure_detail), kind, failure_detail, t, seq))

    def attempts(self, job_id: str, task_id: str) -> list[dict[str, Any]]:
        """A task's attempts, oldest first: attempt (0-based), node_id, started_at,
        ended_at, exit_code, signal, failure_kind, failure_detail, outcome, usage (dict)."""
        seq = self.get_task(job_id, task_id)["seq"]
        rows = self.db.execute("SELECT * FROM task_attempts WHERE seq=? ORDER BY attempt",
                               (seq,)).fetchall()
        for r in rows:
            r["usage"] = json.loads(r["usage"]) if r["usage"] else {}
        return rows

    def update_task(self, seq: int, **fields: Any) -> None:
        """Set columns of one task (inside the caller's transaction). A v1-style
        ``failure`` text also sets failure_kind/failure_detail."""
        if "failure" in fields and "failure_kind" not in fields:
            fields["failure_kind"], fields["failure_detail"] = parse_failure(fields["failure"])
        bad = sorted(set(fields) - set(TASK_COLUMNS) | ({"seq"} & set(fields)))
        if bad:
            raise ValueError(f"update_task: no such task column(s) {', '.join(bad)}")
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db, self._counted("seq = ?", (seq,)):
            db.execute(f"UPDATE tasks SET {cols} WHERE seq=?", (*fields.values(), seq))

    def requeue_in_flight(self) -> int:
        """At start-up: tasks recorded running/preparing go back to active (a requeue, not
        a retry), each with an attempt row (node_lost, 'coordinator restarted')."""
        with self.transaction() as db:
            seqs = [r[0] for r in self._tuples(
                "SELECT seq FROM tasks WHERE state IN ('running', 'preparing')")]
            if not seqs:
                return 0
            with self._counted_seqs(seqs):
                db.execute(
                    f"{_ATTEMPT_INSERT} SELECT t.seq, {_NEXT_ATTEMPT}, t.node_id, t.started_at, "
                    "?, NULL, NULL, ?, 'coordinator restarted', 'requeue', NULL FROM tasks t "
                    "WHERE t.state IN ('running', 'preparing')",
                    (time.time(), FailureKind.NODE_LOST.value))
                cur = db.execute(
                    "UPDATE tasks SET state='active', requeue_count=requeue_count+1, "
                    "node_id=NULL WHERE state IN ('running', 'preparing')")
            return cur.rowcount

    # ---- for tests and tools -------------------------------------------------

    def dump_tables(self, names: Iterable[str] | None = None) -> dict[str, list[dict]]:
        """Every row of the named tables (default: all), to compare a store before and
        after a request that must change nothing."""
        known = [r["name"] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name").fetchall()]
        names = known if names is None else list(names)
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"dump_tables: no table(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
        return {n: self.db.execute(f'SELECT * FROM "{n}"').fetchall() for n in names}

    def journal_settings(self) -> dict[str, Any]:
        """{'journal_mode': 'wal', 'synchronous': 1} (NORMAL: commits do not fsync)."""
        return {"journal_mode": self.db.execute("PRAGMA journal_mode").fetchone()
                ["journal_mode"],
                "synchronous": self.db.execute("PRAGMA synchronous").fetchone()["synchronous"]}

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity and foreign-key checks find: [] for a sound database."""
        found = [r["integrity_check"] for r in self.db.execute("PRAGMA integrity_check")]
        problems = [] if found == ["ok"] else found
        problems += [f"foreign key: {r}" for r in self.db.execute("PRAGMA foreign_key_check")]
        return problems

    def explain(self, method: str) -> list[str]:
        """The query plans of a scheduling query ('new_tasks', 'runnable_window' from the
        start, 'runnable_window_after'), to check that they search an index, never scan."""
        queries = {
            "new_tasks": [(_NEW_TASKS_SQL, (0, 10))],
            "runnable_window": [(_WINDOW_SQL, ("p", 10))],
            "runnable_window_after": [(_WINDOW_SAME_SQL, ("p", 0, 0, 10)),
                                      (_WINDOW_NEXT_SQL, ("p", 0, 10))],
        }[method]
        return [r[-1] for sql, args in queries
                for r in self._tuples(f"EXPLAIN QUERY PLAN {sql}", args)]

    def _tuples(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        cur = self.db.cursor()
        cur.row_factory = None
        return cur.execute(sql, tuple(args)).fetchall()

    # ---- service operations: nodes leaving or disabled, job terminate, reactivate, delete

    def delete_node(self, pool_id: str, node_id: str) -> None:
        """Forget a node that left its pool."""
        with self.transaction() as db:
            db.execute("DELETE FROM nodes WHERE pool_id=? AND id=?", (pool_id, node_id))

    def set_node_scheduling(self, pool_id: str, node_id: str, disabled: bool,
                            slots: int) -> dict[str, Any]:
        """Record scheduling disabled (info 'scheduling': 'disabled') or enabled on a node
        while no coordinator runs (the next one reads it); a node never recorded gets an
        offline record. Returns the node's row."""
        with self.transaction() as db:
            row = db.execute("SELECT info FROM nodes WHERE pool_id=? AND id=?",
                             (pool_id, node_id)).fetchone()
            info = json.loads(row["info"] or "{}") if row else {}
            if disabled:
                info["scheduling"] = "disabled"
            else:
                info.pop("scheduling", None)
            if row is None:
                db.execute("INSERT INTO nodes VALUES (?, ?, 'offline', ?, ?, NULL, ?)",
                           (pool_id, node_id, slots, json.dumps(info), time.time()))
            else:
                db.execute("UPDATE nodes SET info=?, updated_at=? WHERE pool_id=? AND id=?",
                           (json.dumps(info), time.time(), pool_id, node_id))
            return db.execute("SELECT * FROM nodes WHERE pool_id=? AND id=?",
                              (pool_id, node_id)).fetchone()

    def terminate_job_tasks(self, job_id: str, t: float, *, in_flight: bool = False) -> int:
        """The job terminates: it moves to 'terminating' (when active), and its active
        tasks (with ``in_flight``: its preparing and running ones too, recorded by a
        coordinator that is gone) complete as failed, killed:terminate, each with an
        attempt row. Two statements over the (job_id, state) index, whatever the size.
        Returns how many tasks it completed."""
        states = OPEN_STATES if in_flight else ("active",)
        marks = ",".join("?" * len(states))
        kind = FailureKind.KILLED.value
        with self.transaction() as db:
            job = self.get_job(job_id)
            if job["state"] == JobState.ACTIVE.value:
                JobState.ACTIVE.check_move(JobState.TERMINATING)
                db.execute("UPDATE jobs SET state=? WHERE id=?",
                           (JobState.TERMINATING.value, job_id))
            seqs = [r[0] for r in self._tuples(
                f"SELECT seq FROM tasks WHERE job_id = ? AND state IN ({marks})",
                (job_id, *states))]
            with self._counted_seqs(seqs):  # job_counts follow
                db.execute(
                    f"{_ATTEMPT_INSERT} SELECT t.seq, {_NEXT_ATTEMPT}, "
                    "CASE WHEN t.state = 'active' THEN NULL ELSE t.node_id END, "
                    "CASE WHEN t.state = 'active' THEN NULL ELSE t.started_at END, ?, NULL, NULL, "
                    "?, 'terminate', 'failure', NULL FROM tasks t "
                    f"WHERE t.job_id = ? AND t.state IN ({marks})", (t, kind, job_id, *states))
                cur = db.execute(
                    "UPDATE tasks SET state='completed', result='failure', failure=?, "
                    "failure_kind=?, failure_detail='terminate', ended_at=? "
                    f"WHERE job_id=? AND state IN ({marks})",
                    (failure_text(kind, "terminate"), kind, t, job_id, *states))
            return cur.rowcount

    def reactivate_task(self, seq: int) -> None:
        """A completed task is active again: its result and last exit cleared, its retry
        count 0, its attempts kept; its job, when completed, active again."""
        with self.transaction() as db:
            row = db.execute("SELECT job_id, state FROM tasks WHERE seq=?", (seq,)).fetchone()
            if row is None:
                raise NotFound(f"no task with seq {seq}")
            TaskState(row["state"]).check_move(TaskState.ACTIVE)
            with self._counted("seq = ?", (seq,)):  # job_counts follow
                db.execute(
                    "UPDATE tasks SET state='active', result=NULL, failure=NULL, "
                    "failure_kind=NULL, failure_detail=NULL, exit_code=NULL, signal=NULL, "
                    "retry_count=0, node_id=NULL, task_dir=NULL, started_at=NULL, "
                    "ended_at=NULL, usage=NULL WHERE seq=?", (seq,))
            job = self.get_job(row["job_id"])
            if job["state"] == JobState.COMPLETED.value:
                JobState.COMPLETED.check_move(JobState.ACTIVE)
                db.execute("UPDATE jobs SET state=?, completed_at=NULL WHERE id=?",
                           (JobState.ACTIVE.value, row["job_id"]))

    def delete_task(self, seq: int) -> None:
        """Remove a task and its attempts."""
        with self.transaction() as db, self._counted("seq = ?", (seq,)):  # job_counts follow
            db.execute("DELETE FROM task_attempts WHERE seq=?", (seq,))
            db.execute("DELETE FROM tasks WHERE seq=?", (seq,))


# ---- what the batch writes do to a task's counted columns ----------------------------
# (row: seq, job_id, state, result, retry_count, requeue_count, failure_kind; see _counted)

def _preparing(r: tuple) -> tuple:
    return (*r[:2], "preparing", *r[3:])


def _running(r: tuple) -> tuple:
    return (*r[:2], "running", *r[3:]) if r[2] == "preparing" else r


def _turn_after(running: set[int], by_seq: Mapping[int, tuple[str, int, str | None]],
                preparing: set[int]) -> Callable[[tuple], tuple]:
    """write_turn's statements on one row, in their order: running, finished, preparing."""
    finished = _finished(by_seq)

    def after(r: tuple) -> tuple:
        seq = r[0]
        if seq in running:
            r = _running(r)
        if seq in by_seq:
            r = finished(r)
        if seq in preparing:
            r = _preparing(r)
        return r
    return after


def _finished(by_seq: Mapping[int, tuple[str, int, str | None]]) -> Callable[[tuple], tuple]:
    """finish_attempts' statements on one row: requeue -> active with one more requeue;
    retry -> active with the new retry count and failure kind (its result unchanged);
    success/failure -> completed with that result, retry count and kind."""
    def after(r: tuple) -> tuple:
        outcome, retries, kind = by_seq[r[0]]
        if outcome == "requeue":
            return (r[0], r[1], "active", r[3], r[4], r[5] + 1, r[6])
        if outcome == "retry":
            return (r[0], r[1], "active", r[3], retries, r[5], kind)
        return (r[0], r[1], "completed", outcome, retries, r[5], kind)
    return after


# ---- adding tasks -------------------------------------------------------------------

def _check_fits(t: TaskSpec, pool: PoolSpec, *, elastic: bool) -> None:
    """Conflict when the task could never start on the pool."""
    mi = t.multi_instance
    # the most nodes it can have: its target, or a longer host list it can be resized
    # to; a pool at 0 (scaled down) or under an autoscale formula (its target moves,
    # down too while it drains) waits for whatever it grows to
    most = max(pool.target_nodes, len(pool.provider_config.get("hosts") or ()))
    if mi is not None and pool.target_nodes and not elastic and mi.instances > most:
        raise Conflict(
            f"task {t.id}: multi_instance.instances {mi.instances} is more than "
            f"the {most} nodes of pool {pool.id!r}; it could never "
            "start (lower instances or grow the pool)")
    if mi is not None and mi.slots_per_instance > pool.task_slots_per_node:
        raise Conflict(
            f"task {t.id}: multi_instance.slots_per_instance "
            f"{mi.slots_per_instance} exceeds the {pool.task_slots_per_node} task "
            f"slots per node of pool {pool.id!r}")
    if t.required_slots > pool.task_slots_per_node:
        raise Conflict(
            f"task {t.id}: required_slots {t.required_slots} exceeds the "
            f"{pool.task_slots_per_node} task slots per node of pool {pool.id!r}")


def _item_id(item: Any) -> str | None:
    """The id a task (a spec or a mapping, valid or not) claims, when it is text."""
    value = item.id if isinstance(item, TaskSpec) else \
        item.get("id") if isinstance(item, Mapping) else None
    return value if isinstance(value, str) else None


def _twice(task_id: str) -> ValidationError:
    return ValidationError("task.id", f"{task_id!r} appears twice in this request")


def _exists(task_id: str, job_id: str) -> Conflict:
    return Conflict(f"task id {task_id!r} already exists in job {job_id!r}; "
                    "task ids must be unique within a job")


# ---- specs as JSON ----------------------------------------------------------------

def spec_to_dict(spec: Any) -> dict[str, Any]:
    if type(spec) is TaskSpec and _FAST_TASK_DICT:
        return _task_dict(spec)
    return dataclasses.asdict(spec)


_TASK_FIELDS = ("id", "command_line", "environment", "required_slots", "max_task_retry_count",
                "max_wall_clock_time_s", "multi_instance", "resource_files", "output_files",
                "application_package_references")
_RF_FIELDS = ("source", "file_path", "container", "blob_prefix", "container_url",
              "storage_path", "url", "file_mode")
_MI_FIELDS = ("instances", "coordination_command", "slots_per_instance",
              "common_resource_files")


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _fast_task_dict_ok() -> bool:
    from hpcbatch.models import MultiInstanceSpec, ResourceFile
    return (_fields(TaskSpec) == _TASK_FIELDS and _fields(MultiInstanceSpec) == _MI_FIELDS
            and _fields(ResourceFile) == _RF_FIELDS)


_FAST_TASK_DICT = _fast_task_dict_ok()  # else dataclasses.asdict (a new field: same JSON)


def _task_dict(t: TaskSpec) -> dict[str, Any]:
    """dataclasses.asdict(t) (same keys, same order: the same JSON) without its deep copy:
    the 100,000-task add spends most of its time here otherwise."""
    mi = t.multi_instance
    return {
        "id": t.id, "command_line": t.command_line, "environment": t.environment,
        "required_slots": t.required_slots, "max_task_retry_count": t.max_task_retry_count,
        "max_wall_clock_time_s": t.max_wall_clock_time_s,
        "multi_instance": None if mi is None else {
            "instances": mi.instances, "coordination_command": mi.coordination_command,
            "slots_per_instance": mi.slots_per_instance,
            "common_resource_files": [_rf_dict(r) for r in mi.common_resource_files]},
        "resource_files": [_rf_dict(r) for r in t.resource_files],
        "output_files": [dataclasses.asdict(o) for o in t.output_files],
        "application_package_references": [
            {"application_id": a.application_id, "version": a.version}
            for a in t.application_package_references],
    }


def _rf_dict(r: Any) -> dict[str, Any]:
    return {"source": r.source, "file_path": r.file_path, "container": r.container,
            "blob_prefix": r.blob_prefix, "container_url": r.container_url,
            "storage_path": r.storage_path, "url": r.url, "file_mode": r.file_mode}


def _task_rows(job_id: str, pool_id: str, neg_priority: int, job_retries: int,
               specs: Iterable[TaskSpec]) -> Iterator[tuple]:
    dumps = json.dumps
    for t in specs:
        mi = t.multi_instance
        flags = FLAG_RESOURCE_FILES if t.resource_files else 0
        if t.application_package_references:
            flags |= FLAG_APPS
        if mi is not None:
            if mi.coordination_command is not None:
                flags |= FLAG_COORDINATION
            if mi.common_resource_files:
                flags |= FLAG_COMMON_FILES
        retries = t.max_task_retry_count
        yield (job_id, t.id, t.command_line, dumps(spec_to_dict(t)), t.required_slots,
               pool_id, neg_priority, job_retries if retries is None else retries,
               0 if mi is None else mi.instances, 0 if mi is None else mi.slots_per_instance,
               flags)


__all__ = [
    "DispatchSpec", "FLAG_APPS", "FLAG_COMMON_FILES", "FLAG_COORDINATION",
    "FLAG_RESOURCE_FILES",
    "MIGRATIONS", "SCHEMA_VERSION", "Store", "TaskRow", "parse_failure",
    "secure_dir", "spec_to_dict", "storage_full",
]
