"""A state.db written by hpcbatch before schema 2 is upgraded in place when opened.

tests/data/state-v1.db was made by that code (commit 32a35ec) with
tests/data/make_state_v1.py: a real coordinator ran the finished tasks; then tasks were
left queued, retried and in flight as that coordinator writes them.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

import hpcbatch.store as store_module
from hpcbatch.errors import Conflict
from hpcbatch.models import failure_text
from hpcbatch.store import SCHEMA_VERSION, Store

V1 = Path(__file__).parent / "data" / "state-v1.db"
NEW_COLUMNS = ("pool_id", "neg_priority", "max_retries", "instances", "slots_per_instance",
               "flags", "failure_kind", "failure_detail")


# Plain sqlite3 here, on purpose: the rows before and after an upgrade are read, and a
# newer database is made, by something other than the Store under test.

def _raw(path: Path) -> dict[str, list[dict]]:
    """Every row of every table, read with plain sqlite3 (not the code under test)."""
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        names = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        return {n: [dict(r) for r in db.execute(f'SELECT * FROM "{n}"')] for n in names}
    finally:
        db.close()


@pytest.fixture
def v1(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(V1, home / "state.db")
    return home / "state.db"


def test_the_fixture_is_a_v1_database(v1):
    rows = _raw(v1)
    assert rows["meta"] == [{"key": "schema_version", "value": "1"}]
    assert "pool_id" not in rows["tasks"][0]
    assert {t["state"] for t in rows["tasks"]} == {"active", "preparing", "running",
                                                   "completed"}


def test_a_v1_database_is_upgraded_in_place(v1):
    before = _raw(v1)
    s = Store(v1)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 5
        assert s.list_autoscale() == [] and s.pool_events("local") == []  # schema 4
        after = _raw(v1)
        # every row kept, every old column unchanged
        for table in ("pools", "jobs", "nodes"):
            assert after[table] == before[table], table
        old_tasks = {t["seq"]: t for t in before["tasks"]}
        new_tasks = {t["seq"]: t for t in after["tasks"]}
        assert set(new_tasks) == set(old_tasks)
        for seq, old in old_tasks.items():
            assert {k: new_tasks[seq][k] for k in old} == old
        tasks = {(t["job_id"], t["id"]): t for t in after["tasks"]}
        got = {key: tuple(t[c] for c in NEW_COLUMNS) for key, t in tasks.items()}
        start_failed = tasks["done", "nofile"]["failure"].removeprefix("start_failed: ")
        assert start_failed.startswith("copying resource files to node local-1 failed")
        assert got == {
            # job 'done': priority 5, max_task_retry_count 1
            ("done", "ok"): ("local", -5, 1, 0, 0, 0, None, None),
            ("done", "flaky"): ("local", -5, 1, 0, 0, 0, "exit_code", None),
            ("done", "second-try"): ("local", -5, 1, 0, 0, 0, None, None),
            ("done", "sig"): ("local", -5, 0, 0, 0, 0, "signal", None),
            ("done", "slow"): ("local", -5, 0, 0, 0, 0, "timeout", None),
            ("done", "nofile"): ("local", -5, 0, 0, 0, 1, "start_failed", start_failed),
            ("done", "stop-me"): ("local", -5, 0, 0, 0, 0, "killed", "terminate"),
            # job 'mpi' on pool 'pair': a multi-instance task with a coordination command
            ("mpi", "mi"): ("pair", 0, 0, 2, 1, 2, None, None),
            # job 'later': priority -3, max_task_retry_count 2
            ("later", "a"): ("local", 3, 2, 0, 0, 0, None, None),
            ("later", "b"): ("local", 3, -1, 0, 0, 0, None, None),
            ("later", "c"): ("local", 3, 2, 0, 0, 0, None, None),
            ("later", "d"): ("local", 3, 2, 0, 0, 0, None, None),
            ("later", "e"): ("local", 3, 2, 0, 0, 0, "exit_code", None),
        }
        for t in tasks.values():  # the display text is what it was
            assert failure_text(t["failure_kind"], t["failure_detail"]) == t["failure"]
        # the one attempt v1 kept of each task that ended one becomes its history
        hist = {key: [(a["attempt"], a["outcome"], a["exit_code"], a["failure_kind"])
                      for a in s.attempts(*key)] for key in tasks}
        assert hist["done", "flaky"] == [(1, "failure", 3, "exit_code")]
        assert hist["done", "second-try"] == [(1, "success", 0, None)]
        assert hist["done", "stop-me"] == [(0, "failure", None, "killed")]
        assert hist["later", "e"] == [(0, "retry", 1, "exit_code")]
        for key in (("later", "a"), ("later", "b"), ("later", "c"), ("later", "d")):
            assert hist[key] == []
        assert sum(map(len, hist.values())) == 9  # 8 completed + 1 retried
        assert after["agents"] == []
        assert s.integrity_problems() == []
        change = s.change_counter()
    finally:
        s.close()
    # opened again: nothing left to do, nothing written
    s = Store(v1)
    try:
        assert s.change_counter() == change
        assert _raw(v1) == after
    finally:
        s.close()


def test_its_active_tasks_are_served_by_runnable_window(v1):
    s = Store(v1)
    try:
        assert [r.id for r in s.runnable_window("local", None, 100)] == ["a", "b", "e"]
        assert [r.id for r in s.new_tasks(0, 100)] == ["a", "b", "e"]
        assert s.open_counts() == {"later": 5}
        e = s.runnable_window("local", None, 100)[-1]
        assert (e.job_id, e.retry_count, e.max_retries, e.neg_priority) == ("later", 1, 2, 3)
        with s.transaction():  # what a coordinator does first on start
            assert s.requeue_in_flight() == 2
        window = s.runnable_window("local", None, 2)
        window += s.runnable_window("local", (window[-1].neg_priority, window[-1].seq), 100)
        assert [r.id for r in window] == ["a", "b", "c", "d", "e"]
        assert [r.requeue_count for r in window] == [0, 0, 1, 1, 0]
        specs = s.dispatch_specs([r.seq for r in window])
        assert [specs[r.seq].command_line for r in window] == [
            "true", "echo b", "true", "true", "exit 1"]
        [att] = s.attempts("later", "d")
        assert (att["attempt"], att["outcome"], att["node_id"]) == (0, "requeue", "local-1")
        # the next attempt of the retried task follows its recorded one
        seq = s.get_task("later", "e")["seq"]
        s.finish_attempt(seq, outcome="success", node_id="local-1", started_at=1.0,
                         ended_at=2.0, exit_code=0, signal=None, failure_kind=None,
                         failure_detail=None, usage={}, retry_count=1)
        assert [a["attempt"] for a in s.attempts("later", "e")] == [0, 1]
        assert s.runnable_window("pair", None, 10) == []  # job 'mpi' is done
    finally:
        s.close()


def test_an_upgraded_database_has_the_schema_of_a_new_one(v1, tmp_path):
    def schema(path: Path) -> list[tuple]:
        db = sqlite3.connect(path)
        try:
            return sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                                     " WHERE name NOT LIKE 'sqlite_%'").fetchall())
        finally:
            db.close()

    Store(v1).close()
    Store(tmp_path / "fresh" / "state.db").close()
    assert schema(v1) == schema(tmp_path / "fresh" / "state.db")


def test_a_failed_upgrade_leaves_the_v1_database_as_it_was(v1, monkeypatch):
    before = _raw(v1)
    steps = list(store_module.MIGRATIONS)
    version, last = steps[-1]

    def broken(db):
        last(db)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*steps[:-1], (version, broken)])
    with pytest.raises(RuntimeError, match="disk on fire"):
        Store(v1)
    assert _raw(v1) == before
    monkeypatch.undo()
    Store(v1).close()
    assert _raw(v1)["meta"][0] == {"key": "schema_version", "value": str(SCHEMA_VERSION)}


def test_a_newer_database_is_refused_untouched(v1):
    db = sqlite3.connect(v1)  # as a newer hpcbatch would have written it
    newer = SCHEMA_VERSION + 1
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))
    db.commit()
    db.close()
    before = _raw(v1)
    with pytest.raises(Conflict, match=rf"schema version {newer}, newer than this hpcbatch "
                                       rf"understands \({SCHEMA_VERSION}\); upgrade hpcbatch"):
        Store(v1)
    assert _raw(v1) == before
