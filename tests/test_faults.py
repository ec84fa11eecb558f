"""Real processes, really stopped or killed: what the reshaped core promises."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers import poll

import hpcbatch
from hpcbatch.store import SCHEMA_VERSION, Store

DATA = Path(__file__).parent / "data"
FAST = dict(heartbeat_s=0.25, node_timeout_s=2.0, lease_s=2.0, reconnect_max_s=1.0,
            kill_grace_s=0.5)


def test_a_state_db_of_the_previous_schema_is_upgraded_in_place_and_its_jobs_finish(tmp_path):
    home = tmp_path / "old home"
    home.mkdir()
    shutil.copy(DATA / "state-v1.db", home / "state.db")
    store = Store(home / "state.db")  # upgraded in place on open
    try:
        assert store.schema_version() == SCHEMA_VERSION  # every step since, in order
        before = {t["id"]: t["state"] for t in store.list_tasks("later")}
    finally:
        store.close()
    assert before == {"a": "active", "b": "active", "c": "preparing", "d": "running",
                      "e": "active"}
    with hpcbatch.Batch(home, **FAST) as batch:
        assert batch.requeued_at_start == 2  # c and d were in flight
        job = batch.jobs.get("later")
        counts = job.wait(timeout_s=120)
        assert (counts["succeeded"], counts["failed"]) == (4, 1)
        assert job.task("b").stdout() == "b\n"
        e = job.task("e")
        assert (e.result, e.retry_count, e.failure) == ("failure", 2, "exit_code")
        # every attempt of e is history now, not overwritten
        assert [a.outcome for a in e.attempts()] == ["retry", "retry", "failure"]
        # what finished before the upgrade is still there, as it was
        done = batch.jobs.get("done")
        assert done.state == "completed"
        assert done.task("nofile").failure.startswith("start_failed: copying resource files")


def _agent_pid(batch, pool, node):
    def pid():
        for n in batch.pools.nodes(pool):
            if n.id == node and n.state in ("idle", "running"):
                return n.info.get("pid")
        return None
    return poll(pid, timeout_s=30, what=f"{node}'s agent to say hello")


def test_a_stopped_agent_stalls_nothing_and_its_node_is_lost_within_the_timeout(home):
    """SIGSTOP one node's agent: the other node runs 200 short tasks to the end, and the
    stopped node is marked unusable within the node timeout (plus a turn)."""
    with hpcbatch.Batch(home, **FAST) as batch:
        batch.pools.create("two", "local", target_nodes=2, task_slots_per_node=1)
        stopped = _agent_pid(batch, "two", "local-1")
        _agent_pid(batch, "two", "local-2")
        job = batch.jobs.create("many", pool="two")
        os.kill(stopped, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(200))

            def lost():
                n = {v.id: v for v in batch.pools.nodes("two")}["local-1"]
                return n.state == "unusable" or n.reconnecting
            poll(lost, timeout_s=30, interval_s=0.05, what="the stopped node seen lost")
            took = time.monotonic() - t0
            counts = job.wait(timeout_s=120)
            assert counts["succeeded"] == 200, counts
            # heartbeats every 0.25 s, lost after 2 s of silence; a turn or two of slack
            assert took < FAST["node_timeout_s"] + 3.0, took
            # what was sent to the stopped node ran elsewhere, once
            ran_on = {t.node_id for t in job.tasks()}
            assert "local-2" in ran_on
        finally:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
    # the fenced agent was killed, not left stopped
    poll(lambda: not _alive(stopped), timeout_s=10, what="the stopped agent gone")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("value", ["a\0b"])
def test_a_nul_in_an_environment_value_is_refused_and_nothing_is_stored(home, value):
    from hpcbatch.errors import ValidationError
    with hpcbatch.Batch(home) as batch:
        job = batch.jobs.create("j")
        with pytest.raises(ValidationError, match="NUL byte"):
            job.add_task("t1", "echo $X", environment={"X": value})
        assert job.counts()["total"] == 0


def test_a_clean_stop_leaves_no_agent_record_to_reap(home):
    with hpcbatch.Batch(home) as batch:
        job = batch.jobs.create("j")
        job.add_task("t", "true")
        job.wait(timeout_s=60)
        store = Store(home / "state.db")
        try:
            assert [a["node_id"] for a in store.agents()] == ["local-1"]  # while it runs
        finally:
            store.close()
    store = Store(home / "state.db")
    try:
        assert store.agents() == []  # it shut down cleanly: nothing left to reap
    finally:
        store.close()
