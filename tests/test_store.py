import sqlite3

import pytest

from hpcbatch.errors import Conflict, NotFound
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec
from hpcbatch.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    s.create_pool(PoolSpec("p", task_slots_per_node=2))
    s.create_job(JobSpec("j", "p"))
    yield s
    s.close()


def test_wal_mode_and_schema_version(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()["journal_mode"] == "wal"
    assert store.db.execute("SELECT value FROM meta").fetchone()["value"] == "1"


def test_a_newer_schema_is_refused(tmp_path, store):
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


def test_requeue_in_flight(store):
    store.add_tasks("j", [TaskSpec("a", "true"), TaskSpec("b", "true")])
    seq = store.get_task("j", "a")["seq"]
    store.update_task(seq, state="running", node_id="n1")
    assert store.requeue_in_flight() == 1
    a = store.get_task("j", "a")
    assert (a["state"], a["requeue_count"], a["node_id"]) == ("active", 1, None)


def test_a_failed_transaction_leaves_nothing(store):
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:
        db.execute("INSERT INTO pools VALUES ('q', '{}', 0)")
        db.execute("INSERT INTO pools VALUES ('q', '{}', 0)")
    assert [p.id for p in store.list_pools()] == ["p"]
