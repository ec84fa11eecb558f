"""The Python API with an embedded coordinator, real agents and real processes."""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers import gate, pid_alive, poll

import hpcbatch
from hpcbatch.errors import Conflict, CoordinatorBusy, NotFound, ValidationError
from hpcbatch.store import Store
from hpcbatch.timings import Timings


def test_round_trip(batch):
    job = batch.jobs.create("j1")
    job.add_tasks([{"id": "hello", "command_line": "echo hello; echo warn >&2"},
                   hpcbatch.TaskSpec("bad", "exit 4")])
    job.add_task("env", "echo $X", environment={"X": "it's \"quoted\""})
    counts = job.wait(timeout_s=60)
    assert (counts["total"], counts["succeeded"], counts["failed"]) == (3, 2, 1)
    t = job.task("hello")
    assert t.succeeded and t.exit_code == 0 and t.stdout() == "hello\n"
    assert t.stderr() == "warn\n" and t.node_id == "local-1"
    assert job.task("bad").exit_code == 4 and job.task("bad").failure == "exit_code"
    assert job.task("env").stdout() == "it's \"quoted\"\n"
    assert [x.id for x in job.tasks()] == ["hello", "bad", "env"]


def test_bad_specs_store_nothing(batch):
    job = batch.jobs.create("j")
    with pytest.raises(ValidationError, match="required_slots"):
        job.add_tasks([{"id": "a", "command_line": "true"},
                       {"id": "b", "command_line": "true", "required_slots": 0}])
    with pytest.raises(ValidationError, match="appears twice"):
        job.add_tasks([{"id": "a", "command_line": "true"}] * 2)
    with pytest.raises(Conflict, match="exceeds the"):  # the local pool: a slot per core
        job.add_task("wide", "true", required_slots=(os.cpu_count() or 1) + 1)
    assert job.counts()["total"] == 0
    with pytest.raises(hpcbatch.NotFound, match="pool 'missing'"):
        batch.jobs.create("k", pool="missing")


@pytest.mark.slow
def test_hundred_thousand_tasks_in_one_call(batch):
    pool = batch.pools.create("stalled", start_task="exit 1")  # its node never takes tasks
    job = batch.jobs.create("bulk", pool=pool.id)
    t0 = time.monotonic()
    n = job.add_tasks({"id": f"t{i:06d}", "command_line": f"echo {i}"} for i in range(100_000))
    elapsed = time.monotonic() - t0
    assert n == 100_000
    assert job.counts()["active"] == 100_000
    assert elapsed < 60
    poll(lambda: any(nd["state"] == "start_task_failed" for nd in batch.pools.nodes("stalled")),
         what="start task failure")


def test_priority_then_submission_order(make_batch, tmp_path):
    batch = make_batch(prefetch=0)  # strict order: nothing waits queued in the agent
    batch.pools.create("one", task_slots_per_node=1)
    blocker = batch.jobs.create("blocker", pool="one")
    blocker.add_task("b", gate(tmp_path / "go"))  # holds the slot until both jobs are in
    poll(lambda: blocker.task("b").state == "running", what="blocker running")
    low = batch.jobs.create("low", pool="one", priority=-10)
    high = batch.jobs.create("high", pool="one", priority=100)
    low.add_tasks({"id": f"l{i}", "command_line": "true"} for i in range(3))
    high.add_tasks({"id": f"h{i}", "command_line": "true"} for i in range(3))
    (tmp_path / "go").touch()
    low.wait(timeout_s=60)
    high.wait(timeout_s=60)
    order = sorted(low.tasks() + high.tasks(), key=lambda t: t.started_at)
    assert [t.id for t in order] == ["h0", "h1", "h2", "l0", "l1", "l2"]


@pytest.mark.slow
def test_completions_are_committed_in_batches(make_batch, home, tmp_path):
    """Completions that arrive together are written in one transaction (per loop turn),
    none of them an fsync.

    How busy the machine is must not matter, so the burst is made certain: while another
    connection holds the store's write lock, the coordinator's loop waits at its next
    commit, and all 100 tasks end (a gate file opens them) and are reported meanwhile;
    when the lock goes, those completions are in its inbox together. (The lease and
    node timeout are long: a loop held for seconds judges no node lost.)"""
    batch = make_batch(lease_s=120, node_timeout_s=120)
    store = batch.coordinator.store
    assert store.journal_settings() == {"journal_mode": "wal", "synchronous": 1}  # NORMAL
    go, pids = tmp_path / "go", tmp_path / "pids"
    pids.mkdir()
    batch.pools.create("wide", task_slots_per_node=100)
    job = batch.jobs.create("many", pool="wide")
    job.add_tasks({"id": f"t{i}", "command_line": f"echo $$ > '{pids}/t{i}'; {gate(go)}"}
                  for i in range(100))
    poll(lambda: job.counts()["running"] == 100, timeout_s=60, what="100 tasks running")
    tasks = [int(p.read_text()) for p in pids.iterdir()]
    records = list((home / "nodes" / "wide" / "local-1" / "agents").glob("*.json"))
    holder = Store(home / "state.db")
    try:
        with holder.transaction():
            before = store.commits
            go.touch()
            poll(lambda: not any(pid_alive(p) for p in tasks), timeout_s=60,
                 what="all 100 tasks ended")
            # the agent has reaped them all (and sent their exits in that same pass)
            poll(lambda: not any(json.loads(r.read_text())["tasks"] for r in records),
                 timeout_s=30, what="the agent's record without tasks")
            assert job.counts()["completed"] == 0  # nothing committed meanwhile
    finally:
        holder.close()
    job.wait(timeout_s=120)
    commits = store.commits - before
    assert commits <= 5, f"{commits} transactions for 100 completions that came together"


def test_a_second_coordinator_on_the_same_home_is_refused(batch, home):
    assert batch.coordinator is not None  # the first one runs (it starts when needed)
    second = hpcbatch.Batch(home)  # opening to read needs no coordinator
    try:
        assert [p.id for p in second.pools.list()] == ["local"]
        with pytest.raises(CoordinatorBusy, match="another coordinator"):
            second.pools.create("p")
        with pytest.raises(NotFound):
            second.pools.get("p")  # nothing was stored
    finally:
        second.close()


def test_start_task_runs_before_tasks(batch):
    batch.pools.create("prepped", start_task='echo ready > "$HPCBATCH_NODE_SHARED_DIR/flag"')
    job = batch.jobs.create("uses-prep", pool="prepped")
    job.add_task("t", 'cat "$HPCBATCH_NODE_SHARED_DIR/flag"')
    job.wait(timeout_s=60)
    assert job.task("t").stdout() == "ready\n"


def test_terminate_a_running_task(batch):
    job = batch.jobs.create("term")
    job.add_task("long", "sleep 300")
    poll(lambda: job.task("long").state == "running", what="running")
    job.terminate_task("long")
    job.wait(timeout_s=30)
    t = job.task("long")
    assert (t.result, t.failure) == ("failure", "killed:terminate")


def test_terminate_job_completes_the_job(batch):
    job = batch.jobs.create("auto", on_all_tasks_complete="terminate_job")
    job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(5))
    job.wait(timeout_s=60)
    poll(lambda: job.state == "completed", what="job completed")
    with pytest.raises(Conflict, match="is completed"):
        job.add_task("late", "true")


def test_a_closed_batch_says_so(make_batch):
    from hpcbatch.errors import HpcBatchError
    batch = make_batch()
    job = batch.jobs.create("j")
    batch.close()
    batch.close()  # twice is fine
    with pytest.raises(HpcBatchError, match="this hpcbatch.Batch is closed"):
        job.counts()


def test_tasks_queued_on_a_node_are_preparing_until_they_start(make_batch, tmp_path):
    batch = make_batch(local_slots=1)
    job = batch.jobs.create("q")
    job.add_tasks({"id": f"t{i}", "command_line": gate(tmp_path / "go")} for i in range(3))
    poll(lambda: job.task("t0").state == "running", what="t0 running")
    poll(lambda: job.counts()["preparing"] >= 1, what="a task queued on the node")
    c = job.counts()
    assert c["running"] == 1  # one slot: never more running than that
    assert c["running"] + c["preparing"] + c["active"] == 3
    (tmp_path / "go").touch()
    job.wait(timeout_s=30)
    t1 = job.task("t1")
    # started_at is when the process started, not when the task was sent to the node
    assert t1.started_at >= job.task("t0").ended_at - 0.05


def test_timings_by_keyword_or_whole(home):
    """Batch's own clocks and keywords: the production defaults on purpose, not the
    fixture's FAST_TIMINGS."""
    with hpcbatch.Batch(heartbeat_s=0.25, node_timeout_s=1.5, pool_grace_s=2) as b:
        t = b.timings
        assert (t.heartbeat_s, t.node_timeout_s, t.pool_grace_s) == (0.25, 1.5, 2)
        assert t.lease_s == Timings().lease_s
    with hpcbatch.Batch(timings=Timings(kill_grace_s=0.5), lease_s=3) as b:
        assert (b.timings.kill_grace_s, b.timings.lease_s) == (0.5, 3)
    # refused before any coordinator starts: the home is free again at once
    with pytest.raises(ValidationError, match="timings.node_timeout_s"):
        hpcbatch.Batch(heartbeat_s=5)
    with pytest.raises(ValidationError, match="timings.pool_grace_s"):
        hpcbatch.Batch(pool_grace_s=float("nan"))
    with pytest.raises(ValidationError, match="timings: must be a hpcbatch.timings.Timings"):
        hpcbatch.Batch(timings={"heartbeat_s": 1})
    hpcbatch.Batch().close()


def test_each_attempt_is_kept(batch, tmp_path):
    marker = tmp_path / "tried"
    job = batch.jobs.create("flaky", max_task_retry_count=2)
    job.add_task("t", f"[ -e '{marker}' ] || {{ touch '{marker}'; exit 3; }}")
    job.wait(timeout_s=60)
    t = job.task("t")
    assert (t.result, t.retry_count) == ("success", 1)
    attempts = t.attempts()
    assert [(a.attempt, a.outcome, a.exit_code, a.node_id) for a in attempts] == \
        [(0, "retry", 3, "local-1"), (1, "success", 0, "local-1")]
    assert attempts[0].failure_kind == "exit_code"
    assert all(a.started_at and a.ended_at >= a.started_at for a in attempts)


def test_views_read_like_the_rows_they_replace(batch):
    job = batch.jobs.create("v")
    job.add_task("t", "echo hi")
    job.wait(timeout_s=60)
    node = batch.pools.nodes("local")[0]
    assert node["state"] == node.state and node["id"] == "local-1"
    assert [j["id"] for j in batch.jobs.list()] == ["v"]
    assert batch.jobs.list(counts=True)[0].counts["succeeded"] == 1
    assert batch.pools.get("local").task_slots_per_node >= 1
    t = job.task("t")
    assert t.view.to_dict()["exit_code"] == 0 and t.refresh().state == "completed"
    assert job.spec.pool_id == "local" and job.state in ("active", "completed")


def test_run_kernel_refuses_bad_shapes_and_leaves_no_job(batch):
    from hpcbatch.errors import HpcBatchError
    with pytest.raises(ValidationError, match="ranks: 0 must be a whole number >= 1"):
        batch.run_kernel("pi", ranks=0)
    with pytest.raises(ValidationError, match="timeout_s"):
        batch.run_kernel("pi", timeout_s=float("nan"))
    with pytest.raises(HpcBatchError, match="more than the 1 nodes of pool 'local'"):
        batch.run_kernel("pi", nodes=2)
    assert batch.jobs.list() == []  # the refused run left no empty job


def test_a_lost_node_is_named_in_a_kernel_failure():
    from hpcbatch.kernelrun import _failure_text
    from hpcbatch.views import AttemptView, NodeView, TaskView
    t = TaskView("j", "kernel", "completed", "x", {}, result="failure", failure="node_lost",
                 failure_kind="node_lost", node_id=None)
    attempts = [AttemptView("j", "kernel", 0, "failure", node_id="node2")]
    nodes = {"node2": NodeView("p", "node2", "unusable", 1, reason="no heartbeat for 4.9 s")}
    assert _failure_text(t, attempts, nodes) == "lost node node2 (no heartbeat for 4.9 s)"
    detailed = TaskView("j", "kernel", "completed", "x", {}, failure_kind="node_lost",
                        failure_detail="connection closed")
    assert _failure_text(detailed, attempts, nodes) == "lost node node2 (connection closed)"
    timed = TaskView("j", "kernel", "completed", "x", {}, failure="timeout")
    assert _failure_text(timed, [], {}) == "timed out"


def test_batch_over_a_given_service(make_batch, home):
    from hpcbatch.service import LocalService
    with make_batch() as b:
        b.jobs.create("made").add_task("t", "echo made")
        b.jobs.get("made").wait(timeout_s=60)
    # the same API over a service without a coordinator here: stores and reads
    batch = hpcbatch.Batch(service=LocalService(home))
    try:
        assert batch.coordinator is None
        assert batch.jobs.get("made").task("t").stdout() == "made\n"
        batch.jobs.create("later").add_task("t", "true")
        assert batch.jobs.get("later").counts()["active"] == 1
    finally:
        batch.close()
