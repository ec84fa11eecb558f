"""Multi-instance tasks on a local pool of several simulated nodes (one agent each)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import gate, pid_alive, poll

from hpcbatch.errors import Conflict


def mi(instances, coordination=None, per=0):
    return {"instances": instances, "coordination_command": coordination,
            "slots_per_instance": per}


def node_file(home, pool, node, job, task, name) -> str:
    return (home / "nodes" / pool / node / "jobs" / job / task / name).read_text()


def test_allocation_environment_hostfile_and_coordination(batch, home):
    batch.pools.create("trio", task_slots_per_node=2, target_nodes=3)
    job = batch.jobs.create("mpi", pool="trio")
    job.add_task("t", 'env | grep ^HPCBATCH_ | sort; cat "$HPCBATCH_HOSTFILE"',
                 multi_instance=mi(3, 'echo "coord $HPCBATCH_INSTANCE_INDEX of '
                                      '$HPCBATCH_NUM_INSTANCES"'))
    job.wait(timeout_s=60)
    t = job.task("t")
    assert t.succeeded, t.stderr()
    out = t.stdout().splitlines()
    env = dict(line.split("=", 1) for line in out if line.startswith("HPCBATCH_"))
    assert env["HPCBATCH_NODE_LIST"] == "local-1,local-2,local-3"
    assert env["HPCBATCH_HOST_LIST"] == "localhost,localhost,localhost"
    assert env["HPCBATCH_MASTER_NODE"] == "localhost"
    assert env["HPCBATCH_NUM_INSTANCES"] == "3" and env["HPCBATCH_INSTANCE_INDEX"] == "0"
    assert env["HPCBATCH_TASK_SHARED_DIR"] == env["HPCBATCH_TASK_DIR"] + "/shared"
    # the hostfile: one line per host, slots summed (both MPI flavours accept it)
    assert out[-2:] == ["HPCBATCH_TASK_WORKING_DIR=" + env["HPCBATCH_TASK_WORKING_DIR"],
                        "localhost slots=6"]
    for i, node in enumerate(["local-1", "local-2", "local-3"]):
        assert node_file(home, "trio", node, "mpi", "t", "coordination-stdout.txt") == \
            f"coord {i} of 3\n"
    # the allocation is released: every node takes work again
    nodes = {n["id"]: n["state"] for n in batch.pools.nodes("trio")}
    assert nodes == {"local-1": "idle", "local-2": "idle", "local-3": "idle"}


def test_wider_than_the_pool_fails_fast(batch):
    batch.pools.create("duo", target_nodes=2)
    job = batch.jobs.create("wide", pool="duo")
    with pytest.raises(Conflict, match="instances 3 is more than the 2 nodes of pool 'duo'"):
        job.add_task("t", "true", multi_instance=mi(3))
    assert job.counts()["total"] == 0


def test_a_failing_instance_fails_the_task_and_it_is_retried(batch, tmp_path):
    batch.pools.create("duo", target_nodes=2)
    job = batch.jobs.create("flaky", pool="duo", max_task_retry_count=1)
    marker = tmp_path / "app-ran"
    job.add_task("t", f"touch '{marker}'",
                 multi_instance=mi(2, '[ "$HPCBATCH_INSTANCE_INDEX" != 1 ]'))
    job.wait(timeout_s=60)
    t = job.task("t")
    assert (t.result, t.retry_count, t.exit_code) == ("failure", 1, 1)
    assert not marker.exists(), "the application ran although a coordination command failed"


def test_a_wide_task_waits_for_running_ones_and_is_not_overtaken(batch, tmp_path):
    """Both nodes busy; the wide task and small ones after it queued. The first node to
    free up must wait for the wide task (not take a small one), so the small ones all
    start after it ends. Gates, not sleeps, decide when each node frees up."""
    batch.pools.create("duo", target_nodes=2)
    poll(lambda: [n.state for n in batch.pools.nodes("duo")] == ["idle"] * 2,
         what="both nodes up")  # (else both first tasks could go to the first one up)
    job = batch.jobs.create("mix", pool="duo")
    job.add_tasks([{"id": f"first-{x}", "command_line": gate(tmp_path / x)} for x in "ab"])
    poll(lambda: len(job.tasks("running")) == 2, what="both nodes busy")
    job.add_task("wide", gate(tmp_path / "wide"), multi_instance=mi(2))
    job.add_tasks({"id": f"later-{i}", "command_line": "true"} for i in range(10))
    (tmp_path / "a").touch()  # one node free: the wide task does not fit yet
    poll(lambda: job.task("first-a").state == "completed", what="first-a done")
    (tmp_path / "b").touch()
    poll(lambda: job.task("wide").state == "running", what="the wide task running")
    assert all(job.task(f"later-{i}").state != "completed" for i in range(10))
    (tmp_path / "wide").touch()
    job.wait(timeout_s=60)
    tasks = {t.id: t for t in job.tasks()}
    assert all(t.succeeded for t in tasks.values())
    wide = tasks["wide"]
    assert wide.started_at >= max(tasks["first-a"].ended_at, tasks["first-b"].ended_at) - 0.01
    later = [t for tid, t in tasks.items() if tid.startswith("later")]
    assert min(t.started_at for t in later) >= wide.ended_at - 0.01


@pytest.mark.slow
def test_a_lost_node_fails_the_task_which_retries_elsewhere(batch, tmp_path):
    batch.pools.create("trio", target_nodes=3)
    job = batch.jobs.create("lossy", pool="trio", max_task_retry_count=1)
    pids = tmp_path / "pids"
    pids.mkdir()
    job.add_task("t", f'echo $$ > "{pids}/$HPCBATCH_TASK_ATTEMPT"; exec sleep 300',
                 multi_instance=mi(2))
    first = poll(lambda: (pids / "0").exists() and (pids / "0").read_text().strip(),
                 what="first attempt running")
    primary = job.task("t").node_id
    victim = {n.id: n for n in batch.pools.nodes("trio")}[primary].info["pid"]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)  # the node's agent dies
    poll(lambda: (pids / "1").exists() and (pids / "1").read_text().strip(), timeout_s=15,
         what="retry running")
    assert time.monotonic() - killed_at < 10
    poll(lambda: not pid_alive(int(first)), timeout_s=5, what="orphan killed")
    states = {n["id"]: (n["state"], n["reason"]) for n in batch.pools.nodes("trio")}
    assert states[primary][0] == "unusable" and "closed" in states[primary][1]
    t = job.task("t")
    assert t.retry_count == 1 and t.node_id != primary
    job.terminate_task("t")
    job.wait(timeout_s=30)


def test_common_resource_files_reach_every_node_before_the_coordination_command(
        batch, home, tmp_path):
    data = tmp_path / "in put.dat"  # a space in the name, on purpose
    data.write_text("42\n")
    script = tmp_path / "solve.sh"
    script.write_text("#!/bin/sh\necho solved\n")
    script.chmod(0o750)
    batch.pools.create("quad", target_nodes=3)
    job = batch.jobs.create("staged", pool="quad")
    job.add_task("t", '"$HPCBATCH_TASK_SHARED_DIR/bin/solve.sh"', multi_instance={
        "instances": 3, "coordination_command": 'cat "$HPCBATCH_TASK_SHARED_DIR/in put.dat"',
        "common_resource_files": [str(data), {"source": str(script),
                                              "file_path": "bin/solve.sh"}]})
    job.wait(timeout_s=60)
    t = job.task("t")
    assert t.succeeded, (t.failure, t.stderr())
    assert t.stdout() == "solved\n"
    for node in ("local-1", "local-2", "local-3"):
        assert node_file(home, "quad", node, "staged", "t", "coordination-stdout.txt") == "42\n"
        shared = home / "nodes" / "quad" / node / "jobs" / "staged" / "t" / "shared"
        assert (shared / "bin" / "solve.sh").stat().st_mode & 0o777 == 0o750  # mode kept


def test_a_common_file_is_found_by_its_bare_name_on_every_node(batch, home, tmp_path):
    """The shared directory is on PATH: coordination_command "setup.sh" (a common
    resource file) and the application's "solve.sh" run as the README spells them."""
    setup = tmp_path / "setup.sh"
    setup.write_text('#!/bin/sh\necho "setup on $HPCBATCH_NODE_ID"\n')
    setup.chmod(0o755)
    batch.pools.create("trio", target_nodes=3)
    job = batch.jobs.create("bare", pool="trio")
    job.add_task("t", "setup.sh", multi_instance={
        "instances": 3, "coordination_command": "setup.sh",
        "common_resource_files": [str(setup)]})
    job.wait(timeout_s=60)
    t = job.task("t")
    assert t.succeeded, (t.failure, t.stderr())
    assert t.stdout() == "setup on local-1\n"
    for node in ("local-1", "local-2", "local-3"):
        assert node_file(home, "trio", node, "bare", "t", "coordination-stdout.txt") == \
            f"setup on {node}\n"


def test_resource_files_of_an_ordinary_task_land_in_its_working_directory(batch, tmp_path):
    src = tmp_path / "params.json"
    src.write_text('{"n": 3}')
    job = batch.jobs.create("rf")
    job.add_task("t", "cat conf/p.json", resource_files=[{"source": str(src),
                                                          "file_path": "conf/p.json"}])
    job.wait(timeout_s=30)
    assert job.task("t").stdout() == '{"n": 3}'


def test_a_resource_file_gone_before_dispatch_fails_the_task_naming_it(batch, tmp_path):
    src = tmp_path / "vanishing.txt"
    src.write_text("x")
    # its node takes no task before the gate opens, after the unlink
    batch.pools.create("slow", start_task=gate(tmp_path / "go"))
    job = batch.jobs.create("gone", pool="slow", max_task_retry_count=1)
    job.add_task("t", "cat vanishing.txt", resource_files=[str(src)])
    src.unlink()  # accepted while it existed; read when the task is dispatched
    (tmp_path / "go").touch()
    job.wait(timeout_s=30)
    t = job.task("t")
    assert t.result == "failure" and t.retry_count == 1
    assert t.failure.startswith("pre_processing_error: resource files for node") and \
        "vanishing.txt" in t.failure and t.failure_kind == "pre_processing_error"


def test_a_missing_resource_file_is_refused_at_submit(batch, tmp_path):
    from hpcbatch.errors import ValidationError
    job = batch.jobs.create("bad")
    with pytest.raises(ValidationError, match=r"resource_files\[0\].source: .*nope.txt is not "
                       "a file on this machine"):
        job.add_task("t", "true", resource_files=[str(tmp_path / "nope.txt")])
    assert job.counts()["total"] == 0


def test_a_multi_instance_tasks_own_resource_files_go_to_the_primarys_working_dir(
        batch, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("in\n")
    batch.pools.create("duo", target_nodes=2)
    job = batch.jobs.create("mirf", pool="duo")
    job.add_task("t", "cat input.txt", resource_files=[str(src)],
                 multi_instance=mi(2))
    job.wait(timeout_s=60)
    t = job.task("t")
    assert t.succeeded, (t.failure, t.stderr())
    assert t.stdout() == "in\n"


def test_terminate_during_coordination_never_starts_the_application(batch, tmp_path):
    batch.pools.create("duo", target_nodes=2)
    job = batch.jobs.create("stop", pool="duo", max_task_retry_count=3)
    marker = tmp_path / "app-ran"
    # a coordination command that ends "successfully" when told to stop
    up = tmp_path / "up"
    up.mkdir()
    job.add_task("t", f"touch '{marker}'", multi_instance=mi(
        2, f"trap 'exit 0' TERM; touch '{up}'/$HPCBATCH_INSTANCE_INDEX; sleep 30 & wait"))
    poll(lambda: len(list(up.iterdir())) == 2, what="both coordination commands running")
    job.terminate_task("t")
    job.wait(timeout_s=30)
    t = job.task("t")
    assert (t.result, t.failure, t.retry_count) == ("failure", "killed:terminate", 0)
    assert not marker.exists(), "the application ran although the task was terminated"


@pytest.mark.slow
def test_losing_a_node_whose_start_task_failed_keeps_the_coordinator_up(make_batch):
    from hpcbatch.errors import HpcBatchError
    batch = make_batch(pool_grace_s=1.0)
    batch.pools.create("bad", start_task="exit 3")

    def states():
        return [n["state"] for n in batch.pools.nodes("bad")]
    poll(lambda: states() == ["start_task_failed"], what="start task failed")
    agent = batch.pools.nodes("bad")[0].info["pid"]
    os.kill(agent, signal.SIGKILL)  # its agent dies too
    poll(lambda: states()[0] in ("unusable", "starting"), what="node lost")
    job = batch.jobs.create("never", pool="bad")
    job.add_task("t", "true")
    with pytest.raises(HpcBatchError, match="pool 'bad' has had no usable node"):
        job.wait(timeout_s=30)
    assert batch.coordinator.error is None  # the loop is alive
    assert job.task("t").state == "active"  # nothing lost


def test_deleting_a_job_removes_its_directories_on_every_node(batch, home):
    batch.pools.create("trio", target_nodes=3)
    job = batch.jobs.create("wide", pool="trio")
    job.add_task("t", "true", multi_instance=mi(3, "echo coord"))
    job.wait(timeout_s=60)
    dirs = [home / "nodes" / "trio" / f"local-{i}" / "jobs" / "wide" for i in (1, 2, 3)]
    assert all(d.is_dir() for d in dirs)
    assert batch.jobs.delete("wide") == []
    assert not any(d.exists() for d in dirs)
