"""The service operations that go through the coordinator, with a real coordinator, agents
and processes (hpcbatch.Batch on a tmp home): resize a pool, disable / enable scheduling on
a node (requeue, terminate, taskcompletion), remove a node, terminate a job, reactivate and
delete a task; the same operations in the store when no coordinator runs (the CLI's), with
their one-line errors; and an SSH pool, whose host list is its size.

Cases:
* a local pool grows, then shrinks with its idle nodes leaving first (the busy one keeps
  its task, which runs once)
* shrinking below the busy nodes requeues a task (not a retry) that then runs once, on a
  node that stays
* disable + taskcompletion: the running task finishes there, new ones go elsewhere; enable
  makes the node take work again; the flag is in the node's info and survives a restart
* disable + requeue: killed, requeued (requeue_count 1, retry_count 0), run elsewhere
* disable + terminate: killed and completed failed, killed:terminate
* remove a node (requeue): its task runs elsewhere, the node and its agent are gone, the
  pool is one node smaller; the last node and an unknown one are refused
* terminate a job: its running task killed, the queued ones completed as killed:terminate,
  the job completed; adding tasks and terminating it again are Conflicts
* reactivate a failed task of a completed job: the job reopens, the task runs from retry 0
  with its history kept; a succeeded or unfinished task is a Conflict naming its state
* delete a running task: terminated first, then its row, attempts and directory are gone,
  and the job's counts follow
* the CLI with no coordinator: resize, disable/enable, remove, terminate, reactivate,
  delete in the store; every bad input exits 2 with one line
* an SSH pool: resize refused (its host list is its size); removing a host drops it from
  the pool's host list while its task is requeued onto the other host
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import gate, poll

from hpcbatch.errors import Conflict, NotFound, ValidationError


def wait_idle(batch, pool: str, n: int) -> None:
    poll(lambda: sorted(nd.state for nd in batch.pools.nodes(pool)) == ["idle"] * n,
         timeout_s=30, what=f"{n} idle nodes in pool {pool}: "
         f"{[(nd.id, nd.state) for nd in batch.pools.nodes(pool)]}")


def local_pool(batch, pool: str, nodes: int, **kw) -> None:
    batch.pools.create(pool, task_slots_per_node=1, target_nodes=nodes, **kw)
    wait_idle(batch, pool, nodes)


def running(job, task_id: str) -> bool:
    return job.task(task_id).state == "running"


def node_ids(batch, pool: str) -> list[str]:
    return [nd.id for nd in batch.pools.nodes(pool)]


# ---- resize ----------------------------------------------------------------------

def test_a_local_pool_grows_then_shrinks_its_idle_nodes_first(batch, tmp_path):
    svc = batch.service
    local_pool(batch, "p", 2)
    assert svc.resize_pool("p", 4).target_nodes == 4
    wait_idle(batch, "p", 4)
    assert node_ids(batch, "p") == ["local-1", "local-2", "local-3", "local-4"]
    job = batch.jobs.create("j", pool="p")
    job.add_task("busy", gate(tmp_path / "go"))
    poll(lambda: running(job, "busy"), what="busy running")
    busy_on = job.task("busy").node_id
    assert svc.resize_pool("p", 1).target_nodes == 1
    poll(lambda: node_ids(batch, "p") == [busy_on], what=f"only {busy_on} left")
    (tmp_path / "go").touch()
    job.wait(timeout_s=30)
    t = job.task("busy")
    assert (t.result, t.requeue_count, len(t.attempts())) == ("success", 0, 1)


def test_shrinking_below_the_busy_nodes_requeues_a_task_that_then_runs_once(batch, tmp_path):
    svc = batch.service
    local_pool(batch, "p", 2)
    job = batch.jobs.create("j", pool="p")
    marks = tmp_path / "marks"
    marks.mkdir()
    for name in ("a", "b"):  # each leaves a mark per attempt that starts, then holds
        job.add_task(name, f"touch {marks}/$HPCBATCH_TASK_ID.$HPCBATCH_TASK_ATTEMPT."
                           f"$HPCBATCH_NODE_ID; {gate(tmp_path / name)}")
    poll(lambda: len(list(marks.iterdir())) == 2, what="both running, past their marks")
    svc.resize_pool("p", 1)
    poll(lambda: len(node_ids(batch, "p")) == 1, what="one node left")
    kept = node_ids(batch, "p")[0]
    moved = next(t.id for t in job.tasks() if t.node_id != kept)
    poll(lambda: job.task(moved).state == "active", what=f"{moved} requeued")
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    job.wait(timeout_s=30)
    t = job.task(moved)
    assert (t.result, t.retry_count, t.requeue_count, t.node_id) == ("success", 0, 1, kept)
    outcomes = [(a.outcome, a.failure_kind, a.failure_detail) for a in t.attempts()]
    assert outcomes == [("requeue", "killed", "requeue"), ("success", None, None)]
    # each run was told the attempt number the store records for it
    runs = sorted(p.name.rsplit(".", 1)[0] for p in marks.iterdir() if p.name.startswith(moved))
    assert runs == [f"{moved}.{a.attempt}" for a in t.attempts()] == [f"{moved}.0", f"{moved}.1"]


def test_resize_input_is_checked(batch):
    with pytest.raises(ValidationError, match="target_nodes"):
        batch.service.resize_pool("local", -1)
    with pytest.raises(ValidationError, match="at most|more than the 64"):
        batch.service.resize_pool("local", 65)
    with pytest.raises(NotFound, match="pool 'nope'"):
        batch.service.resize_pool("nope", 2)


# ---- node scheduling --------------------------------------------------------------

def test_disable_lets_the_running_task_finish_and_places_nothing_new_there(batch, tmp_path):
    svc = batch.service
    local_pool(batch, "p", 2)
    job = batch.jobs.create("j", pool="p")
    job.add_task("first", gate(tmp_path / "go"))
    poll(lambda: running(job, "first"), what="first running")
    there = job.task("first").node_id
    other = ({"local-1", "local-2"} - {there}).pop()
    view = svc.disable_node_scheduling("p", there)
    assert view.info.get("scheduling") == "disabled" and view.state == "running"
    (tmp_path / "go").touch()
    poll(lambda: job.task("first").state == "completed", what="first done")
    job.add_tasks({"id": f"n{i}", "command_line": "true"} for i in range(4))
    job.wait(timeout_s=30)
    assert job.task("first").succeeded and job.task("first").node_id == there
    assert {job.task(f"n{i}").node_id for i in range(4)} == {other}
    view = svc.enable_node_scheduling("p", there)
    assert "scheduling" not in view.info
    svc.disable_node_scheduling("p", other)
    job.add_task("last", "true")
    job.wait(timeout_s=30)
    assert job.task("last").node_id == there


def test_disable_with_requeue_runs_the_task_again_elsewhere_without_a_retry(batch, tmp_path):
    local_pool(batch, "p", 2)
    job = batch.jobs.create("j", pool="p", max_task_retry_count=0)
    job.add_task("t", f"test -e {tmp_path / 'moved'} || {{ touch {tmp_path / 'moved'}; "
                      f"{gate(tmp_path / 'never')}; }}")
    poll(lambda: (tmp_path / "moved").exists(), what="t running")  # past its mark
    first = job.task("t").node_id
    batch.service.disable_node_scheduling("p", first, running="requeue")
    job.wait(timeout_s=30)
    t = job.task("t")
    assert (t.result, t.retry_count, t.requeue_count) == ("success", 0, 1)
    assert t.node_id != first
    assert [a.outcome for a in t.attempts()] == ["requeue", "success"]


def test_disable_with_terminate_fails_the_task_as_killed(batch, tmp_path):
    local_pool(batch, "p", 2)
    job = batch.jobs.create("j", pool="p", max_task_retry_count=3)
    job.add_task("t", gate(tmp_path / "never"))
    poll(lambda: running(job, "t"), what="t running")
    batch.service.disable_node_scheduling("p", job.task("t").node_id, running="terminate")
    job.wait(timeout_s=30)
    t = job.task("t")
    assert (t.result, t.failure, t.retry_count) == ("failure", "killed:terminate", 0)


def test_disabled_scheduling_survives_a_restart_and_bad_input_is_refused(make_batch):
    batch = make_batch()
    local_pool(batch, "p", 2)
    svc = batch.service
    with pytest.raises(ValidationError, match="running"):
        svc.disable_node_scheduling("p", "local-1", running="later")
    with pytest.raises(NotFound, match="node 'local-9' is not in pool 'p'"):
        svc.disable_node_scheduling("p", "local-9")
    svc.disable_node_scheduling("p", "local-1")
    batch.close()
    again = make_batch()
    job = again.jobs.create("j", pool="p")
    job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(3))  # starts it
    job.wait(timeout_s=30)
    wait_idle(again, "p", 2)
    nodes = {nd.id: nd for nd in again.pools.nodes("p")}
    assert nodes["local-1"].info.get("scheduling") == "disabled"
    assert "scheduling" not in nodes["local-2"].info
    assert {t.node_id for t in job.tasks()} == {"local-2"}


# ---- remove a node ----------------------------------------------------------------

def test_removing_a_busy_node_requeues_its_task_and_the_pool_is_one_smaller(batch, tmp_path):
    svc = batch.service
    local_pool(batch, "p", 3)
    job = batch.jobs.create("j", pool="p")
    job.add_task("t", f"test -e {tmp_path / 'moved'} || {{ touch {tmp_path / 'moved'}; "
                      f"{gate(tmp_path / 'never')}; }}")
    poll(lambda: (tmp_path / "moved").exists(), what="t running")  # past its mark
    node = job.task("t").node_id
    pid = next(nd.info["pid"] for nd in batch.pools.nodes("p") if nd.id == node)
    svc.remove_node("p", node)
    poll(lambda: node not in node_ids(batch, "p"), what=f"{node} gone")
    assert svc.get_pool("p").target_nodes == 2 and len(node_ids(batch, "p")) == 2
    job.wait(timeout_s=30)
    t = job.task("t")
    assert (t.result, t.requeue_count, t.retry_count) == ("success", 1, 0)
    assert t.node_id != node
    from hpcbatch.launch.cluster import pid_alive
    poll(lambda: not pid_alive(pid), timeout_s=10, what="the removed node's agent gone")
    with pytest.raises(NotFound, match=f"node {node!r} is not in pool 'p'"):
        svc.remove_node("p", node)
    left = node_ids(batch, "p")
    svc.remove_node("p", left[0])
    poll(lambda: len(node_ids(batch, "p")) == 1, what="one node left")
    with pytest.raises(ValidationError, match="last node"):
        svc.remove_node("p", left[1])


# ---- terminate a job ----------------------------------------------------------------

def test_terminate_job_kills_what_runs_and_completes_what_waits(batch, tmp_path):
    local_pool(batch, "one", 1)
    job = batch.jobs.create("j", pool="one", max_task_retry_count=2)
    job.add_task("run", gate(tmp_path / "never"))
    poll(lambda: running(job, "run"), what="run running")
    job.add_tasks({"id": f"q{i}", "command_line": "true"} for i in range(5))
    view = batch.service.terminate_job("j")
    assert view.state == "completed"
    tasks = {t.id: t for t in job.tasks()}
    assert {(t.state, t.result, t.failure) for t in tasks.values()} == {
        ("completed", "failure", "killed:terminate")}
    assert tasks["run"].signal or tasks["run"].exit_code
    assert [a.outcome for a in tasks["q0"].attempts()] == ["failure"]
    counts = job.counts()
    assert (counts["completed"], counts["failed"], counts["active"]) == (6, 6, 0)
    with pytest.raises(Conflict, match="completed"):
        job.add_task("late", "true")
    with pytest.raises(Conflict, match="already completed"):
        batch.service.terminate_job("j")


# ---- reactivate and delete ----------------------------------------------------------

def test_a_reactivated_task_runs_again_and_reopens_its_job(batch, tmp_path):
    flag = tmp_path / "fixed"
    job = batch.jobs.create("j", on_all_tasks_complete="terminate_job", max_task_retry_count=1)
    job.add_task("flaky", f"test -e {flag}")
    job.add_task("fine", "true")
    job.wait(timeout_s=30)
    poll(lambda: job.state == "completed", what="job completed")
    t = job.task("flaky")
    assert (t.result, t.retry_count, len(t.attempts())) == ("failure", 1, 2)
    with pytest.raises(Conflict, match="succeeded"):
        batch.service.reactivate_task("j", "fine")
    flag.touch()
    view = batch.service.reactivate_task("j", "flaky")
    assert view.retry_count == 0 and view.state in ("active", "preparing", "running",
                                                    "completed")
    job.wait(timeout_s=30)
    t = job.task("flaky")
    assert (t.result, t.retry_count) == ("success", 0)
    assert [a.outcome for a in t.attempts()] == ["retry", "failure", "success"]
    poll(lambda: job.state == "completed", what="job completed again")


def test_reactivate_refuses_a_task_that_has_not_failed(batch, tmp_path):
    job = batch.jobs.create("j")
    job.add_task("wait", gate(tmp_path / "go"))
    poll(lambda: running(job, "wait"), what="wait running")
    with pytest.raises(Conflict, match="task j/wait is running"):
        batch.service.reactivate_task("j", "wait")
    (tmp_path / "go").touch()
    job.wait(timeout_s=30)


def test_deleting_a_running_task_terminates_it_and_removes_its_traces(batch, tmp_path):
    job = batch.jobs.create("j")
    job.add_task("keep", "true")
    job.add_task("gone", f"echo hi; {gate(tmp_path / 'never')}")
    poll(lambda: running(job, "gone"), what="gone running")
    task_dir = Path(job.task("gone").task_dir)
    assert task_dir.is_dir()
    batch.service.delete_task("j", "gone")
    with pytest.raises(NotFound):
        job.task("gone")
    with pytest.raises(NotFound):
        batch.service.task_attempts("j", "gone")
    assert not task_dir.exists()
    job.wait(timeout_s=30)
    counts = job.counts()
    assert (counts["total"], counts["succeeded"]) == (1, 1)


# ---- the CLI, with no coordinator -------------------------------------------------

def test_cli_operations_in_the_store_and_their_one_line_errors(cli, home):
    assert cli("pool", "create", "p", "--nodes", "2").returncode == 0
    r = cli("pool", "resize", "p", "3")
    assert r.returncode == 0 and "target 3 node(s)" in r.stdout, r.stderr
    r = cli("node", "disable", "p", "local-2", "--running", "requeue")
    assert r.returncode == 0 and "scheduling disabled" in r.stdout, r.stderr
    from hpcbatch.store import Store
    store = Store(home / "state.db")
    try:
        info = {n["id"]: json.loads(n["info"]) for n in store.list_nodes("p")}
        assert info["local-2"].get("scheduling") == "disabled"
        assert cli("node", "enable", "p", "local-2").returncode == 0
        assert "scheduling" not in json.loads(store.list_nodes("p")[0]["info"])
        assert cli("node", "remove", "p", "local-3").returncode == 0
        assert store.get_pool("p").target_nodes == 2
        assert cli("job", "create", "j", "--pool", "p").returncode == 0
        assert cli("task", "add", "j", "t1", "--", "false").returncode == 0
        r = cli("job", "terminate", "j")
        assert r.returncode == 0 and "terminated (completed)" in r.stdout, r.stderr
        assert store.get_task("j", "t1")["failure"] == "killed:terminate"
        r = cli("task", "reactivate", "j", "t1")
        assert r.returncode == 0 and "reactivated (active)" in r.stdout, r.stderr
        assert store.get_job("j")["state"] == "active"
        assert cli("task", "delete", "j", "t1").returncode == 0
        assert store.task_counts("j")["total"] == 0
    finally:
        store.close()
    for args, needle in [
        (("pool", "resize", "p", "--", "-1"), "target_nodes"),
        (("pool", "resize", "p", "many"), "TARGET_NODES"),
        (("pool", "resize", "nope", "2"), "pool 'nope'"),
        (("node", "disable", "p", "local-9"), "node 'local-9' is not in pool 'p'"),
        (("node", "disable", "p", "local-1", "--running", "soon"), "--running"),
        (("node", "remove", "p", "local-9"), "local-9"),
        (("job", "terminate", "j"), None),
        (("job", "terminate", "nope"), "job 'nope'"),
        (("task", "reactivate", "j", "t9"), "task 't9'"),
        (("task", "delete", "j", "t9"), "task 't9'"),
    ]:
        r = cli(*args)
        if needle is None:  # terminating an active job with no tasks: it completes
            assert r.returncode == 0, r.stderr
            continue
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
            (args, r.stderr)
        assert needle in lines[0], (args, lines)
    r = cli("node", "remove", "p", "local-1")
    assert r.returncode == 0, r.stderr
    r = cli("node", "remove", "p", "local-2")
    assert r.returncode == 2 and "last node" in r.stderr


# ---- an SSH pool ------------------------------------------------------------------

def test_an_ssh_pools_host_list_is_its_size_and_a_host_can_be_removed(ssh_cluster, batch,
                                                                       tmp_path):
    import sys
    spec = json.loads((ssh_cluster.directory / "pool.json").read_text())
    spec["hosts"] = [h for h in spec["hosts"] if h["name"] in ("node1", "node2")]
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node roots")
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(spec))
    batch.pools.create("duo", "ssh", spec=str(path), task_slots_per_node=1)
    wait_idle(batch, "duo", 2)
    with pytest.raises(ValidationError, match="fixed list of 2 host"):
        batch.service.resize_pool("duo", 3)
    job = batch.jobs.create("j", pool="duo")
    job.add_task("t", f"test -e {tmp_path / 'moved'} || {{ touch {tmp_path / 'moved'}; "
                      f"{gate(tmp_path / 'never')}; }}")
    poll(lambda: (tmp_path / "moved").exists(), what="t running")  # past its mark
    node = job.task("t").node_id
    batch.service.remove_node("duo", node)
    poll(lambda: node_ids(batch, "duo") == sorted({"node1", "node2"} - {node}),
         what=f"{node} gone")
    hosts = [h["name"] for h in batch.service.get_pool("duo").provider_config["hosts"]]
    assert hosts == sorted({"node1", "node2"} - {node})
    assert batch.service.get_pool("duo").target_nodes == 1
    job.wait(timeout_s=60)
    t = job.task("t")
    assert (t.result, t.requeue_count, t.node_id) == ("success", 1, hosts[0])
