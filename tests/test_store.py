import dataclasses
import errno
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import poll

import hpcbatch.store as store_module
from hpcbatch.errors import Conflict, NotFound, StorageFull
from hpcbatch.models import (
    FailureKind,
    JobSpec,
    JobState,
    MultiInstanceSpec,
    PoolSpec,
    TaskSpec,
    failure_text,
)
from hpcbatch.store import (
    FLAG_COMMON_FILES,
    FLAG_COORDINATION,
    FLAG_RESOURCE_FILES,
    SCHEMA_VERSION,
    DispatchSpec,
    Store,
    TaskRow,
    parse_failure,
    spec_to_dict,
    storage_full,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    s.create_pool(PoolSpec("p", task_slots_per_node=2))
    s.create_job(JobSpec("j", "p"))
    yield s
    s.close()


def test_wal_mode_and_schema_version(store):
    assert store.journal_settings() == {"journal_mode": "wal", "synchronous": 1}
    assert store.schema_version() == SCHEMA_VERSION == 5
    meta = {r["key"]: r["value"] for r in store.dump_tables(["meta"])["meta"]}
    assert meta["schema_version"] == "5"


def test_a_newer_schema_is_refused(tmp_path, store):
    # a database written by a newer hpcbatch: no Store method makes one (SQL on purpose)
    store.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(Conflict, match="newer than this hpcbatch"):
        Store(store.path)


def test_tasks_survive_reopening(store, tmp_path):
    store.add_tasks("j", [TaskSpec(f"t{i}", "true") for i in range(10)])
    again = Store(store.path)
    assert again.task_counts("j")["active"] == 10
    again.close()


def test_duplicate_task_rejects_the_whole_batch(store):
    store.add_tasks("j", [TaskSpec("a", "true")])
    with pytest.raises(Conflict, match="'a' already exists in job 'j'"):
        store.add_tasks("j", [TaskSpec("b", "true"), TaskSpec("a", "true")])
    assert [t["id"] for t in store.list_tasks("j")] == ["a"]


def test_unknown_pool_and_job(store):
    with pytest.raises(NotFound, match="pool 'nope' does not exist"):
        store.create_job(JobSpec("k", "nope"))
    with pytest.raises(NotFound, match="job 'nope'"):
        store.add_tasks("nope", [TaskSpec("a", "true")])
    assert [j["id"] for j in store.list_jobs()] == ["j"]


def test_task_wider_than_a_node_is_rejected(store):
    with pytest.raises(Conflict, match="required_slots 3 exceeds the 2 task slots"):
        store.add_tasks("j", [TaskSpec("a", "true", required_slots=3)])


def test_a_multi_instance_task_wider_than_the_target_waits_under_a_formula(store):
    """Wider than the pool's target: refused on a fixed pool, accepted where an
    autoscale formula moves the target (it may be draining down right now)."""
    store.create_pool(PoolSpec("elastic", task_slots_per_node=2, target_nodes=1))
    store.create_job(JobSpec("je", "elastic"))
    wide = TaskSpec("w", "true", multi_instance=MultiInstanceSpec(3, "true"))
    with pytest.raises(Conflict, match="instances 3 is more than the 1 nodes"):
        store.add_tasks("je", [wide])
    store.set_autoscale("elastic", "$TargetNodes = 3;", 30.0)
    store.add_tasks("je", [wide])
    assert [r["id"] for r in store.list_tasks("je")] == ["w"]


def test_requeue_in_flight(store):
    store.add_tasks("j", [TaskSpec("a", "true"), TaskSpec("b", "true")])
    seq = store.get_task("j", "a")["seq"]
    store.update_task(seq, state="running", node_id="n1")
    assert store.requeue_in_flight() == 1
    a = store.get_task("j", "a")
    assert (a["state"], a["requeue_count"], a["node_id"]) == ("active", 1, None)


def test_a_failed_transaction_leaves_nothing(store):
    before = store.dump_tables()
    with pytest.raises(Conflict), store.transaction():
        store.create_pool(PoolSpec("q"))
        store.create_job(JobSpec("k", "q"))
        store.add_tasks("k", [TaskSpec("a", "true")])
        store.create_pool(PoolSpec("q"))  # exists: the whole transaction goes
    assert [p.id for p in store.list_pools()] == ["p"]
    assert store.dump_tables() == before


# ---- store v2 -------------------------------------------------------------------

def _seq(store, job_id, task_id):
    return store.get_task(job_id, task_id)["seq"]


def test_new_columns_are_filled_at_add(store, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    store.create_pool(PoolSpec("q", target_nodes=3, task_slots_per_node=4))
    store.create_job(JobSpec("k", "q", priority=7, max_task_retry_count=2))
    store.add_tasks("k", [
        TaskSpec("plain", "true"),
        TaskSpec("own", "true", max_task_retry_count=-1, required_slots=3,
                 resource_files=[str(src)]),
        TaskSpec("mi", "true", multi_instance=MultiInstanceSpec(
            3, coordination_command="true", slots_per_instance=2,
            common_resource_files=(str(src),))),
    ])
    rows = {t["id"]: t for t in store.list_tasks("k")}
    got = {tid: (r["pool_id"], r["neg_priority"], r["max_retries"], r["instances"],
                 r["slots_per_instance"], r["flags"], r["required_slots"])
           for tid, r in rows.items()}
    assert got == {
        "plain": ("q", -7, 2, 0, 0, 0, 1),
        "own": ("q", -7, -1, 0, 0, FLAG_RESOURCE_FILES, 3),
        "mi": ("q", -7, 2, 3, 2, FLAG_COORDINATION | FLAG_COMMON_FILES, 1),
    }


def test_spec_json_is_what_asdict_gives(tmp_path):
    """add_tasks skips dataclasses.asdict's deep copy; the JSON must not change."""
    src = tmp_path / "in.txt"
    src.write_text("x")
    specs = [
        TaskSpec("a", "echo $X", environment={"X": "1", "Y": "ü"}),
        TaskSpec("b", "true", required_slots=2, max_task_retry_count=3,
                 max_wall_clock_time_s=1.5, resource_files=[str(src), {
                     "source": str(src), "file_path": "sub/in2.txt"}]),
        TaskSpec("c", "true", multi_instance={"instances": 2, "coordination_command": "x",
                                              "common_resource_files": [str(src)]}),
    ]
    for t in specs:
        assert json.dumps(spec_to_dict(t)) == json.dumps(dataclasses.asdict(t))


def test_windows_follow_priority_then_seq(store):
    store.create_job(JobSpec("hi", "p", priority=5))
    store.create_job(JobSpec("lo", "p", priority=-5))
    store.add_tasks("lo", [TaskSpec(f"l{i}", "true") for i in range(3)])
    store.add_tasks("j", [TaskSpec(f"m{i}", "true") for i in range(3)])
    store.add_tasks("hi", [TaskSpec(f"h{i}", "true") for i in range(3)])
    order = ["h0", "h1", "h2", "m0", "m1", "m2", "l0", "l1", "l2"]
    assert [r.id for r in store.runnable_window("p", None, 100)] == order
    # paging by the last (neg_priority, seq) seen gives the same order, in any window size
    for size in (1, 2, 4):
        seen, after = [], None
        while rows := store.runnable_window("p", after, size):
            assert len(rows) <= size
            seen += [r.id for r in rows]
            after = (rows[-1].neg_priority, rows[-1].seq)
        assert seen == order
    row = store.runnable_window("p", None, 1)[0]
    assert row == TaskRow(seq=_seq(store, "hi", "h0"), job_id="hi", id="h0", pool_id="p",
                          neg_priority=-5, required_slots=1, instances=0, slots_per_instance=0,
                          max_retries=0, retry_count=0, requeue_count=0, flags=0,
                          attempt=0)
    # only active tasks of active jobs
    store.set_job_state("hi", JobState.TERMINATING)
    store.mark_preparing([(_seq(store, "j", "m0"), "n1", "/d", 1.0)])
    assert [r.id for r in store.runnable_window("p", None, 100)] == order[4:]
    assert [r.id for r in store.new_tasks(0, 100)] == ["l0", "l1", "l2", "m1", "m2"]
    assert [r.id for r in store.new_tasks(_seq(store, "lo", "l1"), 2)] == ["l2", "m1"]
    assert store.last_task_seq() == _seq(store, "hi", "h2")
    assert store.runnable_window("other", None, 10) == []


def test_scheduling_queries_search_indexes(store):
    for method in ("new_tasks", "runnable_window", "runnable_window_after"):
        plan = store.explain(method)  # the attempt number: one primary-key seek per row
        assert plan and all(step.startswith("SEARCH") or step == "CORRELATED SCALAR SUBQUERY 1"
                            for step in plan), (method, plan)
        assert "SEARCH a USING PRIMARY KEY (seq=?)" in plan, (method, plan)
        assert not any("TEMP B-TREE" in step for step in plan), (method, plan)
    assert "tasks_window" in store.explain("runnable_window")[0]
    assert all("tasks_window" in step for step in store.explain("runnable_window_after")
               if step.startswith("SEARCH t"))


def test_dispatch_specs_and_open_counts(store, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    store.add_tasks("j", [TaskSpec("a", "echo a", environment={"A": "1"},
                                   max_wall_clock_time_s=9, resource_files=[str(src)]),
                          TaskSpec("b", "echo b")])
    a, b = _seq(store, "j", "a"), _seq(store, "j", "b")
    specs = store.dispatch_specs([a, b, 999])
    assert specs[a] == DispatchSpec("echo a", {"A": "1"}, 9, [
        {"source": str(src), "file_path": "in.txt", "container": None, "blob_prefix": None,
         "container_url": None, "storage_path": None, "url": None, "file_mode": None}],
        None, [])
    assert specs[b] == DispatchSpec("echo b", {}, None, [], None, [])
    assert set(specs) == {a, b}
    many = store.dispatch_specs(list(range(1, 1200)))  # more than one IN (...) chunk
    assert set(many) == {a, b}
    assert store.open_counts() == {"j": 2}
    store.create_job(JobSpec("k", "p"))
    store.finish_attempt(a, outcome="success", node_id="n1", started_at=1, ended_at=2,
                         exit_code=0, signal=None, failure_kind=None, failure_detail=None,
                         usage={}, retry_count=0)
    assert store.open_counts() == {"j": 1}


def test_attempts_record_each_outcome(store):
    store.add_tasks("j", [TaskSpec("a", "true", max_task_retry_count=5)])
    a = _seq(store, "j", "a")
    with store.transaction():
        store.mark_preparing([(a, "n1", "/r/jobs/j/a", 10.0)])
    assert store.get_task("j", "a")["state"] == "preparing"
    store.mark_running([(a, 11.0)])
    t = store.get_task("j", "a")
    assert (t["state"], t["node_id"], t["task_dir"], t["started_at"]) == (
        "running", "n1", "/r/jobs/j/a", 11.0)
    store.finish_attempt(a, outcome="retry", node_id="n1", started_at=11.0, ended_at=12.0,
                         exit_code=3, signal=None, failure_kind=FailureKind.EXIT_CODE,
                         failure_detail=None, usage={"maxrss_kb": 5}, retry_count=1)
    t = store.get_task("j", "a")
    assert (t["state"], t["node_id"], t["retry_count"], t["failure"], t["failure_kind"],
            t["exit_code"]) == ("active", None, 1, "exit_code", "exit_code", 3)
    store.mark_preparing([(a, "n2", "/r2", 13.0)])
    store.mark_running([(a, 13.5)])
    store.finish_attempt(a, outcome="requeue", node_id="n2", started_at=13.5, ended_at=14.0,
                         exit_code=None, signal=None, failure_kind="node_lost",
                         failure_detail="no heartbeat for 4.1 s", usage=None, retry_count=1)
    t = store.get_task("j", "a")
    assert (t["state"], t["node_id"], t["requeue_count"], t["retry_count"]) == (
        "active", None, 1, 1)
    assert t["failure"] == "exit_code"  # a requeue is not the task's failure
    store.mark_preparing([(a, "n3", "/r3", 15.0)])
    store.mark_running([(a, 15.5), (a, 99.0)])  # a second start report changes nothing
    store.finish_attempt(a, outcome="failure", node_id="n3", started_at=15.5, ended_at=16.0,
                         exit_code=None, signal=9, failure_kind=FailureKind.SIGNAL,
                         failure_detail="SIGKILL", usage={"utime_s": 0.1}, retry_count=1)
    t = store.get_task("j", "a")
    assert (t["state"], t["result"], t["node_id"], t["signal"], t["failure"],
            t["failure_kind"], t["failure_detail"], t["started_at"], t["ended_at"]) == (
        "completed", "failure", "n3", 9, "signal", "signal", "SIGKILL", 15.5, 16.0)
    hist = [(r["attempt"], r["node_id"], r["outcome"], r["failure_kind"], r["exit_code"],
             r["started_at"], r["usage"]) for r in store.attempts("j", "a")]
    assert hist == [
        (0, "n1", "retry", "exit_code", 3, 11.0, {"maxrss_kb": 5}),
        (1, "n2", "requeue", "node_lost", None, 13.5, {}),
        (2, "n3", "failure", "signal", None, 15.5, {"utime_s": 0.1}),
    ]
    assert store.open_counts() == {}
    with pytest.raises(ValueError, match="outcome 'done' is not one of"):
        store.finish_attempt(a, outcome="done", node_id=None, started_at=None, ended_at=None,
                             exit_code=None, signal=None, failure_kind=None,
                             failure_detail=None, usage=None, retry_count=0)
    with pytest.raises(NotFound, match="task 'zz' does not exist in job 'j'"):
        store.attempts("j", "zz")


def test_complete_unstarted_and_start_failures(store):
    store.add_tasks("j", [TaskSpec("a", "true"), TaskSpec("b", "true")])
    a, b = _seq(store, "j", "a"), _seq(store, "j", "b")
    store.complete_unstarted(a, FailureKind.KILLED, "terminate", 5.0)
    t = store.get_task("j", "a")
    assert (t["state"], t["result"], t["failure"], t["failure_kind"], t["failure_detail"],
            t["ended_at"]) == ("completed", "failure", "killed:terminate", "killed",
                               "terminate", 5.0)
    [att] = store.attempts("j", "a")
    assert (att["outcome"], att["started_at"], att["node_id"]) == ("failure", None, None)
    store.finish_attempt(b, outcome="failure", node_id="n1", started_at=None, ended_at=6.0,
                         exit_code=None, signal=None, failure_kind="start_failed",
                         failure_detail="no such file: x", usage={}, retry_count=0)
    assert store.get_task("j", "b")["failure"] == "start_failed: no such file: x"


def test_requeue_in_flight_records_the_attempt(store):
    store.add_tasks("j", [TaskSpec("a", "true"), TaskSpec("b", "true"), TaskSpec("c", "true")])
    a, b = _seq(store, "j", "a"), _seq(store, "j", "b")
    store.mark_preparing([(a, "n1", "/a", 1.0), (b, "n1", "/b", 1.0)])
    store.mark_running([(b, 2.0)])
    assert store.requeue_in_flight() == 2
    for tid, started in (("a", 1.0), ("b", 2.0)):
        t = store.get_task("j", tid)
        assert (t["state"], t["requeue_count"], t["node_id"]) == ("active", 1, None)
        [att] = store.attempts("j", tid)
        assert (att["attempt"], att["outcome"], att["node_id"], att["started_at"],
                att["failure_kind"], att["failure_detail"]) == (
            0, "requeue", "n1", started, "node_lost", "coordinator restarted")
    assert store.attempts("j", "c") == []
    assert store.requeue_in_flight() == 0


def test_old_update_task_callers_get_a_typed_failure(store):
    store.add_tasks("j", [TaskSpec("a", "true")])
    a = _seq(store, "j", "a")
    store.update_task(a, state="completed", result="failure",
                      failure="start_failed: cannot copy x")
    t = store.get_task("j", "a")
    assert (t["failure_kind"], t["failure_detail"]) == ("start_failed", "cannot copy x")
    with pytest.raises(ValueError, match="no such task column"):
        store.update_task(a, bogus=1)
    for text in ("exit_code", "signal", "timeout", "node_lost", "killed:terminate",
                 "start_failed: why: it broke", "start_failed"):
        assert failure_text(*parse_failure(text)) == text


def test_agents(store):
    store.record_agent("p", "n1", "tok1", 100, "host1", "/root1")
    store.record_agent("p", "n2", "tok2", 200, "host2", "/root2")
    store.record_agent("p", "n1", "tok1", 101, "host1", "/root1")  # the same agent again
    got = [(a["pool_id"], a["node_id"], a["token"], a["pid"], a["host"], a["root"])
           for a in store.agents()]
    assert got == [("p", "n1", "tok1", 101, "host1", "/root1"),
                   ("p", "n2", "tok2", 200, "host2", "/root2")]
    store.forget_agent("p", "n1", "tok1")
    assert [a["token"] for a in store.agents()] == ["tok2"]
    store.delete_job("j")
    store.delete_pool("p")
    assert store.agents() == []


def test_what_the_cli_and_client_need(store):
    assert store.job_pool_id("j") == "p"
    assert store.job_pool_id("nope") is None
    store.set_pool_spec(PoolSpec("p", task_slots_per_node=8))
    assert store.get_pool("p").task_slots_per_node == 8
    with pytest.raises(NotFound, match="pool 'zz' does not exist"):
        store.set_pool_spec(PoolSpec("zz"))
    tables = store.dump_tables()
    assert {"pools", "jobs", "tasks", "nodes", "meta", "task_attempts", "agents"} <= set(tables)
    assert [p["id"] for p in store.dump_tables(["pools"])["pools"]] == ["p"]
    with pytest.raises(ValueError, match="no table"):
        store.dump_tables(["pools; DROP TABLE jobs"])
    assert store.journal_settings() == {"journal_mode": "wal", "synchronous": 1}


def test_delete_job_removes_its_attempts(store):
    store.add_tasks("j", [TaskSpec("a", "true")])
    store.complete_unstarted(_seq(store, "j", "a"), "killed", "terminate", 1.0)
    store.set_job_state("j", JobState.COMPLETED)
    store.delete_job("j")
    assert store.dump_tables(["task_attempts"])["task_attempts"] == []


# ---- the change counter -----------------------------------------------------------

def test_change_counter_counts_changing_transactions(store):
    c0 = store.change_counter()
    with store.transaction():
        store.list_tasks("j")  # read only
    assert store.change_counter() == c0
    with pytest.raises(Conflict), store.transaction():
        store.add_tasks("j", [TaskSpec("a", "true")])
        store.create_job(JobSpec("j", "p"))  # rolls the add back too
    assert store.change_counter() == c0
    with store.transaction():
        store.add_tasks("j", [TaskSpec("a", "true")])
        store.upsert_node("p", "n1", "idle", 2)
    assert store.change_counter() == c0 + 1
    store.upsert_node("p", "n1", "running", 2)  # outside a transaction: its own
    assert store.change_counter() == c0 + 2


def test_wait_for_change_times_out_with_the_current_value(store):
    c0 = store.change_counter()
    t0 = time.monotonic()
    assert store.wait_for_change(c0, 0.2) == c0
    assert time.monotonic() - t0 >= 0.2
    assert store.wait_for_change(c0 - 1, 10) == c0  # already above: at once


def test_wait_for_change_wakes_at_once_across_stores_and_threads(store, monkeypatch):
    """A commit through another Store of this process wakes the waiter without polling."""
    monkeypatch.setattr(store_module, "CHANGE_POLL_S", 60.0)
    other = Store(store.path)
    try:
        c0 = store.change_counter()
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(store.wait_for_change(c0, 30)))
        t0 = time.monotonic()
        waiter.start()
        poll(lambda: store._changes.cond._waiters, timeout_s=10, what="the waiter waiting")
        writer = threading.Thread(target=lambda: other.add_tasks("j", [TaskSpec("a", "true")]))
        writer.start()
        writer.join(10)
        waiter.join(10)
        assert got == [c0 + 1]
        assert time.monotonic() - t0 < 10  # woken, not by the 60 s poll or the 30 s timeout
    finally:
        other.close()


def test_wait_for_change_sees_another_process(store):
    c0 = store.change_counter()
    code = ("import sys; from hpcbatch.models import TaskSpec; from hpcbatch.store import Store;"
            "s = Store(sys.argv[1]); s.add_tasks('j', [TaskSpec('x', 'true')]); s.close()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.path)])
    try:
        assert store.wait_for_change(c0, 60) == c0 + 1
    finally:
        proc.wait(30)
    assert proc.returncode == 0
    assert store.get_task("j", "x")["state"] == "active"


# ---- modes and a full disk --------------------------------------------------------

def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_home_and_database_modes_under_umask_000(tmp_path):
    old = os.umask(0)
    try:
        home = tmp_path / "new" / "home"
        s = Store(home / "state.db")
        s.create_pool(PoolSpec("p"))
        modes = {p.name: _mode(p) for p in home.iterdir()}
        s.close()
        # a home and files made 0755/0644 before are tightened when opened
        open_home = tmp_path / "old"
        open_home.mkdir(mode=0o755)
        shutil.copyfile(DATA / "state-v1.db", open_home / "state.db")
        os.chmod(open_home / "state.db", 0o644)
        s2 = Store(open_home / "state.db")
        old_modes = {p.name: _mode(p) for p in open_home.iterdir()}
        s2.close()
    finally:
        os.umask(old)
    assert _mode(home) == 0o700
    assert modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    assert _mode(open_home) == 0o700
    assert old_modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}


def test_a_full_database_raises_storage_full_and_keeps_the_store(store):
    store.add_tasks("j", [TaskSpec(f"a{i}", "true") for i in range(10)])
    before = store.dump_tables()
    # fault injection, on this connection only: SQLite's own SQLITE_FULL (SQL on purpose)
    pages = store.db.execute("PRAGMA page_count").fetchone()["page_count"]
    store.db.execute(f"PRAGMA max_page_count={pages + 2}")
    with pytest.raises(StorageFull) as err:
        store.add_tasks("j", [TaskSpec(f"b{i}", "echo " + "x" * 200) for i in range(5000)])
    msg = str(err.value)
    assert msg.startswith(f"{store.path.parent}: no space left") and "\n" not in msg
    assert store.dump_tables() == before
    again = Store(store.path)  # a new connection has no page limit: the store works on
    try:
        assert again.integrity_problems() == []
        again.add_tasks("j", [TaskSpec("c", "true")])
        assert again.task_counts("j")["total"] == 11
    finally:
        again.close()


def test_storage_full_recognises_enospc(tmp_path):
    err = storage_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert isinstance(err, StorageFull) and str(err).startswith(f"{tmp_path}: no space left")
    assert storage_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert storage_full(sqlite3.OperationalError("no such table: x"), tmp_path) is None


FILL_DISK = r"""
import os, sys, json
from hpcbatch.errors import StorageFull
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec
from hpcbatch.store import Store
home = sys.argv[1]
s = Store(os.path.join(home, "state.db"))
s.create_pool(PoolSpec("p"))
s.create_job(JobSpec("j", "p"))
s.add_tasks("j", [TaskSpec(f"a{i}", "true") for i in range(100)])
before = s.dump_tables()
with open(os.path.join(home, "filler"), "wb", buffering=0) as f:  # take every free byte
    for size in (65536, 1):
        try:
            while True:
                f.write(b"\0" * size)
        except OSError:
            pass
out = {}
try:
    s.add_tasks("j", [TaskSpec(f"b{i}", "echo " + "x" * 500) for i in range(5000)])
except StorageFull as exc:
    out["error"] = str(exc)
out["unchanged"] = s.dump_tables() == before
s.close()
os.unlink(os.path.join(home, "filler"))
s = Store(os.path.join(home, "state.db"))
out["integrity"] = s.integrity_problems()
s.add_tasks("j", [TaskSpec("c", "true")])
out["total"] = s.task_counts("j")["total"]
s.close()
print(json.dumps(out))
"""


def test_a_full_disk_raises_storage_full_and_keeps_the_store(tmp_path):
    """On a real full file system: a small tmpfs in a private mount namespace."""
    unshare = shutil.which("unshare")
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = (subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none "
                             f"'{mnt}'"], capture_output=True, text=True, timeout=30)
             if unshare else None)
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs in a user+mount namespace here "
                    f"({'no unshare' if probe is None else probe.stderr.strip()})")
    script = tmp_path / "fill.py"
    script.write_text(FILL_DISK)
    home = mnt / "home"
    r = subprocess.run(
        [unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none '{mnt}' && "
         f"exec '{sys.executable}' '{script}' '{home}'"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["error"].startswith(f"{home}: no space left") and "\n" not in out["error"]
    assert out == {"error": out["error"], "unchanged": True, "integrity": [], "total": 101}


def test_the_schema_1_loader_still_works(store):
    """runnable_tasks: what coordinator.py reads until it moves to new_tasks/windows."""
    store.add_tasks("j", [TaskSpec("a", "echo a"), TaskSpec("b", "true")])
    store.mark_preparing([(_seq(store, "j", "b"), "n1", "/b", 1.0)])
    [row] = store.runnable_tasks(0)
    assert (row["id"], row["command_line"], row["pool_id"]) == ("a", "echo a", "p")
    assert json.loads(row["spec"])["command_line"] == "echo a"
    assert json.loads(row["job_spec"])["id"] == "j"
    assert store.runnable_tasks(row["seq"]) == []
