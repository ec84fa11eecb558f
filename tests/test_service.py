"""The service layer: one method per operation, typed views, the existing error kinds.

Most tests need no coordinator (the CLI's store-and-read commands); the embedded ones
run the real coordinator, agents and processes."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
from helpers import FAST_TIMINGS, poll

from hpcbatch.errors import Conflict, CoordinatorBusy, HpcBatchError, NotFound, ValidationError
from hpcbatch.models import JobSpec, TaskSpec
from hpcbatch.service import LocalService, Service
from hpcbatch.timings import Timings
from hpcbatch.views import AttemptView, JobView, NodeView, PoolView, TaskView


@pytest.fixture
def service(home):
    s = LocalService(home)
    yield s
    s.close()


def _started(service: LocalService, job_id: str, task_id: str, task_dir: Path,
             node: str = "local-1") -> None:
    """Record a task as placed on a node (what the coordinator does when it sends it)."""
    seq = service.store.get_task(job_id, task_id)["seq"]
    service.store.mark_preparing([(seq, node, str(task_dir), time.time())])


def test_a_local_service_is_a_service_and_refuses_a_missing_home(tmp_path):
    assert issubclass(LocalService, Service)
    with pytest.raises(NotFound, match="no hpcbatch state in"):
        LocalService(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


def test_views_are_frozen_json_and_read_like_rows(service):
    pool = service.create_pool("duo", target_nodes=2, task_slots_per_node=3)
    assert isinstance(pool, PoolView) and pool.where == "2 local node(s)"
    job = service.create_job("j", "duo", priority=5)
    assert isinstance(job, JobView) and (job.pool_id, job.priority, job.state) == \
        ("duo", 5, "active")
    assert service.add_tasks("j", [{"id": "a", "command_line": "echo a",
                                    "environment": {"X": "1"}}]) == 1
    task = service.get_task("j", "a")
    assert isinstance(task, TaskView) and task.spec["environment"] == {"X": "1"}
    service.store.upsert_node("duo", "local-1", "starting", 3, {"hostname": "h",
                                                                "reconnecting": True})
    node = service.list_nodes("duo")[0]
    assert isinstance(node, NodeView) and node["state"] == "starting" and node.reconnecting
    assert not node.usable  # failed once already: being reconnected
    assert service.get_pool("duo").node_states == {"starting": 1}
    for view in (pool, job, task, node):
        data = json.loads(json.dumps(view.to_dict()))
        assert type(view).from_dict(data) == view
        with pytest.raises(AttributeError):
            view.id = "other"  # frozen
    assert task["command_line"] == "echo a" and task.get("nope", 7) == 7
    assert [j.counts["total"] for j in service.list_jobs(counts=True)] == [1]


def test_pools_of_the_service(service):
    assert [p.id for p in service.list_pools()] == ["local"]
    with pytest.raises(Conflict, match="already exists"):
        service.create_pool("local")
    with pytest.raises(ValidationError, match="pool: 'bad id'"):
        service.create_pool("bad id")
    with pytest.raises(ValidationError, match="not options of local pools"):
        service.create_pool("p", hostlist="n1")
    with pytest.raises(Conflict, match="built in"):
        service.delete_pool("local")
    service.create_pool("side")
    service.create_job("busy", "side")
    with pytest.raises(Conflict, match="still has job"):
        service.delete_pool("side")
    with pytest.raises(NotFound, match="pool 'nope'"):
        service.list_nodes("nope")


def test_submit_creates_the_job_and_its_tasks_or_nothing(service):
    wide = [{"id": "t", "command_line": "true", "multi_instance": {"instances": 2}}]
    with pytest.raises(Conflict, match="more than the 1 nodes"):
        service.submit(JobSpec("run-x", "local"), wide)
    with pytest.raises(NotFound):
        service.get_job("run-x")  # no empty job left behind
    assert service.submit(JobSpec("s", "local"), [TaskSpec("a", "true")]) == 1
    assert service.submit(JobSpec("s", "local"), [TaskSpec("b", "true")]) == 1  # added
    assert [t.id for t in service.list_tasks("s")] == ["a", "b"]
    service.create_pool("other")
    with pytest.raises(ValidationError, match="exists on pool 'local', not 'other'"):
        service.submit(JobSpec("s", "other"), [TaskSpec("c", "true")])
    with pytest.raises(Conflict, match="already exists"):
        service.submit(JobSpec("s", "local"), [TaskSpec("c", "true")], existing_ok=False)
    with pytest.raises(ValidationError, match="appears twice"):
        service.submit(JobSpec("s", "local"), [TaskSpec("d", "true")] * 2)
    assert service.job_counts("s")["total"] == 2


def test_task_listings_and_attempts(service):
    service.create_job("j")
    service.add_tasks("j", [TaskSpec(f"t{i}", "true") for i in range(4)])
    assert [t.id for t in service.list_tasks("j", limit=2)] == ["t0", "t1"]
    seq = service.store.get_task("j", "t1")["seq"]
    service.store.finish_attempt(seq, outcome="retry", node_id="local-1", started_at=1.0,
                                 ended_at=2.0, exit_code=3, signal=None,
                                 failure_kind="exit_code", failure_detail=None, usage={},
                                 retry_count=1)
    service.store.finish_attempt(seq, outcome="failure", node_id="local-1", started_at=3.0,
                                 ended_at=4.0, exit_code=3, signal=None,
                                 failure_kind="exit_code", failure_detail=None, usage={},
                                 retry_count=1)
    attempts = service.task_attempts("j", "t1")
    assert all(isinstance(a, AttemptView) for a in attempts)
    assert [(a.attempt, a.outcome, a.exit_code) for a in attempts] == \
        [(0, "retry", 3), (1, "failure", 3)]
    assert [t.id for t in service.list_tasks("j", failed=True)] == ["t1"]
    assert service.get_task("j", "t1").failure == "exit_code"
    with pytest.raises(NotFound, match="task 'zz' does not exist in job 'j'"):
        service.get_task("j", "zz")
    with pytest.raises(NotFound, match="job 'nojob' does not exist"):
        service.list_tasks("nojob")


def test_task_files_come_from_the_node_and_never_through_a_link(service, tmp_path):
    service.create_job("j")
    service.add_tasks("j", [TaskSpec("t", "true"), TaskSpec("u", "true")])
    with pytest.raises(NotFound, match="has not started; it has no stdout.txt yet"):
        service.read_task_file("j", "t", "stdout.txt")
    root = Path(service.home) / "nodes" / "local" / "local-1"
    task_dir = root / "jobs" / "j" / "t"
    task_dir.mkdir(parents=True)
    (task_dir / "stdout.txt").write_text("out\n")
    _started(service, "j", "t", task_dir)
    assert service.read_task_file("j", "t", "stdout.txt") == b"out\n"
    with pytest.raises(NotFound, match="stderr.txt of task j/t does not exist on node local-1"):
        service.read_task_file("j", "t", "stderr.txt")
    assert service.read_task_file("j", "t", "stdout.txt", offset=1, length=2) == b"ut"
    assert service.read_task_file("j", "t", "stdout.txt", offset=99) == b""
    for bad in ("../../state.db", "/etc/passwd", "a/../../x", "", "..", "a\0b"):
        with pytest.raises(ValidationError, match="path"):
            service.read_task_file("j", "t", bad)
    (task_dir / "out").mkdir()
    (task_dir / "out" / "r.csv").write_text("1,2\n")
    assert service.read_task_file("j", "t", "out/r.csv") == b"1,2\n"
    secret = tmp_path / "secret"
    secret.write_text("private\n")
    (task_dir / "stderr.txt").symlink_to(secret)
    (task_dir / "up").symlink_to(tmp_path)  # a directory link out of the task directory
    for linked in ("stderr.txt", "up/secret"):
        with pytest.raises(ValidationError, match="symbolic link"):
            service.read_task_file("j", "t", linked)
    files = {f.name: f for f in service.list_task_files("j", "t")}
    assert sorted(files) == ["out", "out/r.csv", "stderr.txt", "stdout.txt", "up"]
    assert (files["out"].kind, files["up"].kind, files["stderr.txt"].kind) == \
        ("dir", "link", "link")
    assert files["stdout.txt"].size == 4 and files["out/r.csv"].size == 4
    # a task directory recorded outside its node root is not read either
    _started(service, "j", "u", tmp_path)
    (tmp_path / "stdout.txt").write_text("elsewhere\n")
    with pytest.raises(HpcBatchError, match="not inside the node root"):
        service.read_task_file("j", "u", "stdout.txt")


def test_deletes_without_a_coordinator_hold_the_home_lock(service):
    from hpcbatch.home import HomeLock
    service.create_pool("duo", target_nodes=2)
    service.create_job("done", "duo")
    dirs = [Path(service.home) / "nodes" / "duo" / f"local-{i}" / "jobs" / "done"
            for i in (1, 2)]
    for d in dirs:
        (d / "t").mkdir(parents=True)
    lock = HomeLock(Path(service.home))  # a coordinator runs on the home
    try:
        with pytest.raises(CoordinatorBusy, match="another coordinator"):
            service.delete_job("done")
    finally:
        lock.release()
    assert service.get_job("done").id == "done"  # nothing deleted
    assert service.delete_job("done") == []
    assert not any(d.exists() for d in dirs)
    assert service.delete_pool("duo") == []
    assert not (Path(service.home) / "nodes" / "duo").exists()
    with pytest.raises(NotFound):
        service.get_pool("duo")


def test_without_a_coordinator_waits_and_terminates_are_refused(service):
    service.create_job("j")
    service.add_tasks("j", [TaskSpec("t", "true")])
    with pytest.raises(HpcBatchError, match="no coordinator runs here"):
        service.wait_job("j")
    with pytest.raises(HpcBatchError, match="no coordinator runs here"):
        service.terminate_task("j", "t")


class _Unanswering:
    """A coordinator whose commands are accepted and never confirmed (a stuck loop)."""

    error = None

    def __init__(self, failure: BaseException | None = None):
        self.failure = failure

    def notify(self) -> None:
        pass

    def terminate_task(self, job_id: str, task_id: str) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.failure is not None:
            fut.set_exception(self.failure)
        return fut

    def stop(self) -> None:
        pass


def test_coordinator_commands_raise_rather_than_time_out_silently(home):
    service = LocalService(home, _Unanswering(), command_timeout_s=0.2)
    try:
        service.create_job("j")
        service.add_tasks("j", [TaskSpec("t", "true")])
        t0 = time.monotonic()
        with pytest.raises(HpcBatchError, match="did not confirm terminate of task j/t "
                                                "within 0.2 s"):
            service.terminate_task("j", "t")
        assert time.monotonic() - t0 < 5
        service.coordinator = _Unanswering(Conflict("task j/t is completed"))
        with pytest.raises(Conflict, match="is completed"):
            service.terminate_task("j", "t")
    finally:
        service.close()


# ---------------------------------------------------------------- with a coordinator

FAST = Timings(**dict(FAST_TIMINGS, pool_grace_s=1.0))  # the batch fixture's clocks


@pytest.fixture
def embedded(home):
    s = LocalService.embedded(home, local_slots=2, timings=FAST)
    yield s
    s.close()


def test_an_embedded_service_runs_a_job_to_the_end(embedded):
    embedded.create_job("j")
    embedded.add_tasks("j", [{"id": f"t{i}", "command_line": f"echo {i}"} for i in range(5)]
                       + [{"id": "bad", "command_line": "exit 4"}])
    seen: list[dict] = []
    counts = embedded.wait_job("j", timeout_s=60, on_progress=seen.append)
    assert (counts["total"], counts["succeeded"], counts["failed"]) == (6, 5, 1)
    assert seen and seen[-1] == counts
    assert embedded.read_task_file("j", "t3", "stdout.txt") == b"3\n"
    bad = embedded.get_task("j", "bad")
    assert (bad.result, bad.exit_code, bad.failure_kind) == ("failure", 4, "exit_code")
    assert [a.outcome for a in embedded.task_attempts("j", "bad")] == ["failure"]
    assert embedded.get_pool("local").task_slots_per_node == 2


def test_wait_names_a_pool_without_usable_nodes(embedded):
    embedded.create_pool("broken", start_task="exit 3")
    poll(lambda: [n.state for n in embedded.list_nodes("broken")] == ["start_task_failed"],
         what="the start task failed")
    embedded.create_job("never", "broken")
    embedded.add_tasks("never", [TaskSpec("t", "true")])
    with pytest.raises(HpcBatchError, match="pool 'broken' has had no usable node for 1 s"):
        embedded.wait_job("never", timeout_s=30)
    assert embedded.get_task("never", "t").state == "active"  # nothing lost


def test_terminate_through_the_service(embedded, tmp_path):
    gate = tmp_path / "started"
    embedded.create_job("j")
    embedded.add_tasks("j", [TaskSpec("long", f"touch '{gate}'; exec sleep 300")])
    poll(lambda: gate.exists(), what="the task started")
    embedded.terminate_task("j", "long")
    embedded.wait_job("j", timeout_s=30)
    t = embedded.get_task("j", "long")
    assert (t.result, t.failure) == ("failure", "killed:terminate")
    with pytest.raises(TimeoutError):
        embedded.create_job("k")
        embedded.add_tasks("k", [TaskSpec("x", "exec sleep 30")])
        embedded.wait_job("k", timeout_s=0.3)
    embedded.terminate_task("k", "x")
    embedded.wait_job("k", timeout_s=30)
