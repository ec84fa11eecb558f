"""The durable store: one SQLite file (WAL) under the coordinator's home.

Everything accepted is written here before it is acknowledged. The coordinator
batches its state changes into short transactions (one per scheduling round),
so 10,000 task completions cost a handful of commits, not 10,000 fsyncs.

Each thread opens its own :class:`Store` on the same file; SQLite's WAL lets
readers (CLI ``list``/``show``) run while the coordinator writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hpcbatch.errors import Conflict, NotFound
from hpcbatch.models import JobSpec, JobState, PoolSpec, TaskSpec, TaskState

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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

TASK_COLUMNS = (
    "seq", "job_id", "id", "command_line", "spec", "required_slots", "state", "result",
    "failure", "exit_code", "signal", "retry_count", "requeue_count", "node_id", "task_dir",
    "started_at", "ended_at", "usage",
)


def _row_dict(cur: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cur.description, row)}


class Store:
    """One connection to the state database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30,
                                  check_same_thread=False)
        self.db.row_factory = _row_dict
        self.commits = 0  # transactions committed through this connection
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self.transaction():
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise Conflict(f"{self.path}: state database has schema version {row['value']}, "
                               f"newer than this hpcbatch understands ({SCHEMA_VERSION}); "
                               "upgrade hpcbatch")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolls back on any error (nothing half-written)."""
        if self.db.in_transaction:  # nested: join the outer transaction
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.commits += 1

    # ---- pools and nodes -------------------------------------------------

    def create_pool(self, spec: PoolSpec, *, exist_ok: bool = False) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM pools WHERE id=?", (spec.id,)).fetchone():
                if exist_ok:
                    return
                raise Conflict(f"pool {spec.id!r} already exists; pick another id or delete it")
            db.execute("INSERT INTO pools VALUES (?, ?, ?)",
                       (spec.id, json.dumps(spec_to_dict(spec)), time.time()))

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
        self.db.execute(
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
        """Remove a pool and its nodes (see check_pool_deletable)."""
        with self.transaction() as db:
            self.check_pool_deletable(pool_id)
            db.execute("DELETE FROM nodes WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM pools WHERE id=?", (pool_id,))

    def list_nodes(self, pool_id: str | None = None) -> list[dict[str, Any]]:
        if pool_id is None:
            return self.db.execute("SELECT * FROM nodes ORDER BY pool_id, id").fetchall()
        return self.db.execute("SELECT * FROM nodes WHERE pool_id=? ORDER BY id",
                               (pool_id,)).fetchall()

    # ---- jobs ------------------------------------------------------------

    def create_job(self, spec: JobSpec) -> None:
        with self.transaction() as db:
            self.get_pool(spec.pool_id)
            if db.execute("SELECT 1 FROM jobs WHERE id=?", (spec.id,)).fetchone():
                raise Conflict(f"job {spec.id!r} already exists; pick another job id")
            db.execute("INSERT INTO jobs (id, pool_id, spec, state, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (spec.id, spec.pool_id, json.dumps(spec_to_dict(spec)),
                        JobState.ACTIVE.value, time.time()))

    def get_job(self, job_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist; 'hpcbatch job list' shows the jobs")
        row["spec"] = JobSpec(**json.loads(row["spec"]))
        return row

    def list_jobs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        for r in rows:
            r["spec"] = JobSpec(**json.loads(r["spec"]))
        return rows

    def delete_job(self, job_id: str) -> None:
        """Remove a completed job and its tasks; refused while a task is unfinished."""
        with self.transaction() as db:
            self.get_job(job_id)
            left = self.unfinished(job_id)
            if left:
                raise Conflict(f"job {job_id!r} has {left} unfinished task(s); wait for them "
                               f"('hpcbatch job wait {job_id}') or terminate them first")
            db.execute("DELETE FROM tasks WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def set_job_state(self, job_id: str, state: JobState) -> None:
        done = time.time() if state is JobState.COMPLETED else None
        self.db.execute("UPDATE jobs SET state=?, completed_at=? WHERE id=?",
                        (state.value, done, job_id))

    # ---- tasks -----------------------------------------------------------

    def add_tasks(self, job_id: str, specs: list[TaskSpec]) -> int:
        """Insert tasks in one transaction; a duplicate id rejects the whole batch."""
        with self.transaction() as db:
            job = self.get_job(job_id)
            if job["state"] != JobState.ACTIVE.value:
                raise Conflict(f"job {job_id!r} is {job['state']}; tasks can only be added "
                               "to an active job")
            pool = self.get_pool(job["pool_id"])
            for t in specs:
                mi = t.multi_instance
                if mi is not None and mi.instances > pool.target_nodes:
                    raise Conflict(
                        f"task {t.id}: multi_instance.instances {mi.instances} is more than "
                        f"the {pool.target_nodes} nodes of pool {pool.id!r}; it could never "
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
            rows = ((job_id, t.id, t.command_line, json.dumps(spec_to_dict(t)),
                     t.required_slots, TaskState.ACTIVE.value) for t in specs)
            try:
                db.executemany("INSERT INTO tasks (job_id, id, command_line, spec, "
                               "required_slots, state) VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                dup = self._first_duplicate(job_id, specs)
                raise Conflict(f"task id {dup!r} already exists in job {job_id!r}; "
                               "task ids must be unique within a job") from None
        return len(specs)

    def _first_duplicate(self, job_id: str, specs: list[TaskSpec]) -> str | None:
        ids = [t.id for t in specs]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            row = self.db.execute(
                f"SELECT id FROM tasks WHERE job_id=? AND id IN ({','.join('?' * len(chunk))}) "
                "LIMIT 1", (job_id, *chunk)).fetchone()
            if row:
                return row["id"]
        return None

    def get_task(self, job_id: str, task_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM tasks WHERE job_id=? AND id=?",
                              (job_id, task_id)).fetchone()
        if row is None:
            self.get_job(job_id)
            raise NotFound(f"task {task_id!r} does not exist in job {job_id!r}")
        return row

    def list_tasks(self, job_id: str, state: str | None = None,
                   limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM tasks WHERE job_id=?"
        args: list[Any] = [job_id]
        if state:
            sql += " AND state=?"
            args.append(state)
        sql += " ORDER BY seq"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return self.db.execute(sql, args).fetchall()

    def task_counts(self, job_id: str) -> dict[str, int]:
        """Counts by state plus 'succeeded'/'failed' among completed tasks."""
        counts = {s.value: 0 for s in TaskState}
        counts.update(succeeded=0, failed=0, retries=0, requeues=0, total=0)
        rows = self.db.execute(
            "SELECT state, result, COUNT(*) AS n, SUM(retry_count) AS r, "
            "SUM(requeue_count) AS q FROM tasks WHERE job_id=? GROUP BY state, result",
            (job_id,)).fetchall()
        for r in rows:
            counts[r["state"]] += r["n"]
            counts["total"] += r["n"]
            counts["retries"] += r["r"] or 0
            counts["requeues"] += r["q"] or 0
            if r["result"] == "success":
                counts["succeeded"] += r["n"]
            elif r["result"] == "failure":
                counts["failed"] += r["n"]
        return counts

    def unfinished(self, job_id: str) -> int:
        """Tasks of a job not yet completed (an index range count: cheap near the end)."""
        return self.db.execute(
            "SELECT COUNT(*) AS n FROM tasks WHERE job_id=? AND state IN "
            "('active', 'preparing', 'running')", (job_id,)).fetchone()["n"]

    def runnable_tasks(self, after_seq: int = 0) -> Iterable[dict[str, Any]]:
        """Active tasks of active jobs with seq > after_seq, oldest first."""
        return self.db.execute(
            "SELECT t.seq, t.job_id, t.id, t.command_line, t.spec, t.required_slots, "
            "t.retry_count, t.requeue_count, j.pool_id, j.spec AS job_spec "
            "FROM tasks t JOIN jobs j ON j.id = t.job_id "
            "WHERE t.state='active' AND j.state='active' AND t.seq > ? ORDER BY t.seq",
            (after_seq,)).fetchall()

    def update_task(self, seq: int, **fields: Any) -> None:
        """Set columns of one task (inside the caller's transaction)."""
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE tasks SET {cols} WHERE seq=?", (*fields.values(), seq))

    def requeue_in_flight(self) -> int:
        """Tasks recorded running/preparing go back to active (a requeue, not a retry)."""
        cur = self.db.execute(
            "UPDATE tasks SET state='active', requeue_count=requeue_count+1, node_id=NULL "
            "WHERE state IN ('running', 'preparing')")
        return cur.rowcount


def spec_to_dict(spec: Any) -> dict[str, Any]:
    return dataclasses.asdict(spec)
