"""`pool resize --target N --deallocation ...` on a local pool with real agents and task
processes, and its CLI; the SSH pool's host list as its capacity is in
tests/test_autoscale_ssh.py.

Cases:
* requeue: the leaving node's running task is killed and requeued (not a retry), waits
  while the pool is at 0, and runs again (its marker written twice) once it grows
* terminate: the task's process is killed and the task completed as killed:terminate
* task_completion: the node takes no new work (leaving), its task finishes (one
  attempt), then the node goes, and its task directories with it
* retained_data: the same, and the node's task directories stay
* a running multi-instance task: with task_completion its nodes go last and only once it
  ends (never cut short); with requeue its attempt ends and it runs again
* each resize is recorded (pool show: when, from -> to, deallocation)
* pending work counted in slots, by the coordinator's samples and by the store's dry run
* a formula that fails at evaluation in the loop: recorded with its line:col, the pool
  unchanged; a new formula replaces it at once and is obeyed
* bad input, each exit 2 with one line and nothing changed: --target -1, an unknown
  --deallocation, a target given twice or not at all, a pool that autoscales
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import gate, poll, snapshot

from hpcbatch.store import Store


def node_ids(batch, pool: str) -> list[str]:
    return [n.id for n in batch.pools.nodes(pool)]


def wait_idle(batch, pool: str, n: int) -> None:
    poll(lambda: sorted(nd.state for nd in batch.pools.nodes(pool)) == ["idle"] * n,
         timeout_s=30, what=f"{n} idle nodes in {pool}: "
         f"{[(nd.id, nd.state) for nd in batch.pools.nodes(pool)]}")


def marked(directory: Path) -> str:
    """Shell text: append this attempt's number and pid to directory/<task>."""
    d = str(directory)
    return f'echo "$HPCBATCH_TASK_ATTEMPT $$" >> "{d}/$HPCBATCH_TASK_ID"'


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_requeue_kills_and_reruns_terminate_kills_for_good(batch, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    batch.pools.create("p", task_slots_per_node=1, target_nodes=2)
    wait_idle(batch, "p", 2)
    job = batch.jobs.create("j", pool="p")
    # 'again' ends at once on its second run; 'gone' would hold forever
    job.add_task("again", f"{marked(marks)}; [ $(wc -l < {marks}/again) -ge 2 ] || "
                          f"exec sleep 300")
    job.add_task("gone", f"{marked(marks)}; exec sleep 300")
    poll(lambda: (marks / "again").exists() and (marks / "gone").exists(), what="both run")
    pid_again = int((marks / "again").read_text().split()[1])
    pid_gone = int((marks / "gone").read_text().split()[1])
    # both nodes busy: a resize to 1 takes the newest, local-2; whichever task runs there
    # is requeued ('again') or terminated ('gone'), then the other with the resize to 0
    nodes = {job.task("again").node_id: "again", job.task("gone").node_id: "gone"}
    assert set(nodes) == {"local-1", "local-2"}
    first = nodes["local-2"]
    p = batch.pools.resize("p", 1, deallocation="terminate" if first == "gone" else "requeue")
    assert p.target_nodes == 1
    poll(lambda: node_ids(batch, "p") == ["local-1"], what="local-2 gone")
    second = "again" if first == "gone" else "gone"
    batch.pools.resize("p", 0, deallocation="requeue" if second == "again" else "terminate")
    poll(lambda: node_ids(batch, "p") == [], what="the pool at 0")
    # terminated: its process is dead, the task completed as killed:terminate
    poll(lambda: not alive(pid_gone), what="gone's process killed")
    t = job.task("gone")
    assert (t.state, t.result, t.failure) == ("completed", "failure", "killed:terminate")
    # requeued: killed, back to active (not a retry), waiting for a node
    poll(lambda: not alive(pid_again), what="again's process killed")
    poll(lambda: job.task("again").state == "active", what="again requeued")
    t = job.task("again")
    assert (t.requeue_count, t.retry_count) == (1, 0)
    batch.pools.resize("p", 1)
    job.wait(timeout_s=60)
    t = job.task("again")
    assert (t.result, len(t.attempts())) == ("success", 2)
    assert [a.outcome for a in t.attempts()] == ["requeue", "success"]
    assert [line.split()[0] for line in (marks / "again").read_text().splitlines()] == \
        ["0", "1"]
    assert len((marks / "gone").read_text().splitlines()) == 1  # never again
    events = batch.pools.get("p").autoscale_events
    assert [(e["kind"], e["result"]["from"], e["result"]["to"]) for e in events][:3] == [
        ("resize", 0, 1), ("resize", 1, 0), ("resize", 2, 1)]


def test_task_completion_lets_it_finish_and_retained_data_keeps_its_directory(batch,
                                                                             tmp_path,
                                                                             home):
    batch.pools.create("p", task_slots_per_node=1, target_nodes=2)
    wait_idle(batch, "p", 2)
    job = batch.jobs.create("j", pool="p")
    job.add_task("a", gate(tmp_path / "go-a"))
    job.add_task("b", gate(tmp_path / "go-b"))
    poll(lambda: job.task("a").state == job.task("b").state == "running", what="both run")
    on = {job.task(t).node_id: t for t in "ab"}
    roots = {n: home / "nodes" / "p" / n for n in on}
    assert all((r / "jobs").is_dir() for r in roots.values())
    # local-2 leaves, its task left to finish; nothing new goes there
    batch.pools.resize("p", 1, deallocation="taskcompletion")
    poll(lambda: {n.id: n.state for n in batch.pools.nodes("p")}.get("local-2") ==
         "leaving", what="local-2 leaving")
    job.add_task("later", "true")
    (tmp_path / f"go-{on['local-2']}").touch()
    poll(lambda: node_ids(batch, "p") == ["local-1"], what="local-2 gone")
    t = job.task(on["local-2"])
    assert (t.result, len(t.attempts()), t.requeue_count) == ("success", 1, 0)
    poll(lambda: not (roots["local-2"] / "jobs").exists(), what="its task directories gone")
    # retained_data: the last node goes the same way, its directories kept
    batch.pools.resize("p", 0, deallocation="retained_data")
    (tmp_path / f"go-{on['local-1']}").touch()
    poll(lambda: node_ids(batch, "p") == [], what="local-1 gone")
    t = job.task(on["local-1"])
    assert (t.result, len(t.attempts())) == ("success", 1)
    assert (roots["local-1"] / "jobs" / "j").is_dir()
    assert job.task("later").state == "active"  # waits for a node
    batch.pools.resize("p", 1)
    job.wait(timeout_s=60)
    assert job.task("later").result == "success"


def test_a_running_multi_instance_task_is_not_cut_short_unless_requeued(batch, tmp_path):
    batch.pools.create("p", task_slots_per_node=1, target_nodes=3)
    wait_idle(batch, "p", 3)
    job = batch.jobs.create("j", pool="p")
    marks = tmp_path / "marks"
    marks.mkdir()
    job.add_task("wide", f"{marked(marks)}; {gate(tmp_path / 'go')}",
                 multi_instance={"instances": 2})
    poll(lambda: job.task("wide").state == "running", what="wide running")
    # to 1 with task_completion: the idle node goes at once; of the two it holds, one
    # leaves only once it has ended
    batch.pools.resize("p", 1, deallocation="task_completion")
    poll(lambda: len(node_ids(batch, "p")) == 2, what="the idle node gone")
    assert job.task("wide").state == "running"
    (tmp_path / "go").touch()
    poll(lambda: len(node_ids(batch, "p")) == 1, what="one node left")
    t = job.task("wide")
    assert (t.result, len(t.attempts())) == ("success", 1)
    # requeue ends the attempt: it runs again once the pool can hold it
    (tmp_path / "go").unlink()
    batch.pools.resize("p", 2)
    wait_idle(batch, "p", 2)
    job.add_task("wide2", f"{marked(marks)}; {gate(tmp_path / 'go')}",
                 multi_instance={"instances": 2})
    poll(lambda: job.task("wide2").state == "running", what="wide2 running")
    batch.pools.resize("p", 1, deallocation="requeue")
    poll(lambda: job.task("wide2").state == "active", what="wide2 requeued")
    (tmp_path / "go").touch()
    batch.pools.resize("p", 2)
    job.wait(timeout_s=60)
    t = job.task("wide2")
    assert t.result == "success" and [a.outcome for a in t.attempts()][-1] == "success"
    assert t.requeue_count == 1
    assert len((marks / "wide2").read_text().splitlines()) == 2


@pytest.mark.slow  # (a dozen CLI processes)
def test_resize_cli_errors_are_one_line_and_change_nothing(cli, home):
    assert cli("pool", "create", "p", "--nodes", "2").returncode == 0
    r = cli("pool", "resize", "p", "--target", "1", "--deallocation", "taskcompletion")
    assert r.returncode == 0 and "target 1 node(s) (deallocation taskcompletion)" in r.stdout
    r = cli("pool", "autoscale", "enable", "q", "--formula", "$TargetNodes = 1")
    assert r.returncode == 2 and "pool 'q' does not exist" in r.stderr
    before = snapshot(home)
    assert cli("pool", "autoscale", "enable", "p", "--formula", "$TargetNodes = 1",
               "--interval", "5s").returncode == 0
    for args, needle in [
        (("pool", "resize", "p", "--target", "-1"), "target_nodes: -1 is not a number of "
         "nodes >= 0"),
        (("pool", "resize", "p", "--target", "2", "--deallocation", "later"),
         "--deallocation: 'later' is not one of requeue, terminate, task_completion"),
        (("pool", "resize", "p"), "--target: give the number of nodes once"),
        (("pool", "resize", "p", "2", "--target", "3"), "give the number of nodes once"),
        (("pool", "resize", "p", "--target", "2"), "sized by its autoscale formula"),
        (("pool", "resize", "p", "--target", "99"), "more than the 64 nodes"),
        (("pool", "autoscale", "enable", "p", "--formula", "$TargetNodes = (1"),
         "formula: line 1:18: expected ')'"),
        (("pool", "autoscale", "enable", "p", "--formula", "$TargetNodes = $Pending"),
         "formula: line 1:16: unknown variable $Pending"),
        (("pool", "autoscale", "enable", "p", "--formula", "$TargetNodes = 1",
          "--interval", "0.1s"), "interval: '0.1s' is not between 1s and 7d"),
        (("pool", "autoscale", "enable", "p"), "--formula: give the formula"),
        (("pool", "autoscale", "evaluate", "p", "$TargetNodes = 1 / ($IdleNodes * 0)"),
         "formula: line 1:18: division by zero"),
    ]:
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
            (args, r.stdout, r.stderr)
        assert needle in lines[0], (args, lines)
    assert snapshot(home) == before  # (the pool's spec: still its target of 1)
    s = Store(home / "state.db")
    try:
        assert s.get_pool("p").target_nodes == 1
        assert s.get_autoscale("p")["formula"] == "$TargetNodes = 1"
    finally:
        s.close()
    r = cli("pool", "autoscale", "evaluate", "p", "$TargetNodes = max(2, $ActiveTasks)")
    assert r.returncode == 0 and "$TargetNodes = 2" in r.stdout and \
        "$PendingTaskSlots = 0 (1 samples)" in r.stdout, r.stdout
    r = cli("pool", "show", "p")
    assert "autoscale: every 5 s: $TargetNodes = 1" in r.stdout, r.stdout
    assert "resize     2 -> 1 node(s) (resize, taskcompletion)" in r.stdout, r.stdout
    r = cli("pool", "autoscale", "disable", "p")
    assert r.returncode == 0 and "autoscale off, target 1 node(s)" in r.stdout
    assert cli("pool", "resize", "p", "2").returncode == 0  # the positional still works


def test_pending_work_is_counted_in_slots_by_the_coordinator_and_without_one(
        batch, make_batch, home):
    from hpcbatch.service import LocalService
    batch.pools.create("s", task_slots_per_node=4, target_nodes=1)
    batch.pools.resize("s", 0)
    job = batch.jobs.create("j", pool="s")
    job.add_tasks([{"id": f"two{i}", "command_line": "true", "required_slots": 2}
                   for i in range(3)])  # 6 slots
    job.add_task("wide3", "true", multi_instance={"instances": 2, "slots_per_instance": 3})
    job.add_task("whole", "true", multi_instance={"instances": 2})  # 2 whole nodes: 8
    formula = "$TargetNodes = ceil($ActiveTaskSlots / 4)"
    want = {"$ActiveTasks": "5", "$ActiveTaskSlots": "20", "$PendingTaskSlots": "20",
            "$RunningTasks": "0", "$TargetNodes": "5"}

    def seen(result):
        return {k: result["variables"][k].split()[0] for k in want}
    poll(lambda: seen(batch.pools.evaluate_autoscale("s", formula)) == want,
         what=f"the coordinator's counts: {seen(batch.pools.evaluate_autoscale('s', formula))}")
    with LocalService(home) as svc:  # no coordinator: the store's counts
        assert svc.coordinator is None
        assert seen(svc.evaluate_autoscale("s", formula)) == want
    beside = make_batch()  # its coordinator would be the other process's: the store's
    assert seen(beside.pools.evaluate_autoscale("s", formula)) == want
    assert batch.pools.get("s").target_nodes == 0  # a dry run changes nothing


def test_a_formula_that_fails_in_the_loop_is_recorded_and_changes_nothing(batch):
    batch.pools.create("f", task_slots_per_node=1, target_nodes=2)
    wait_idle(batch, "f", 2)
    batch.pools.enable_autoscale("f", "$x = 1\n$TargetNodes = 5 / ($IdleNodes - 2)",
                                 interval_s="1s")

    def errors():
        return [e for e in batch.pools.get("f").autoscale_events if e["error"]]
    poll(lambda: len(errors()) >= 2, what="two failed evaluations")
    failed = errors()
    assert failed[0]["kind"] == "evaluation" and failed[0]["result"] is None
    assert failed[0]["error"].startswith("formula: line 2:18: division by zero")
    assert batch.pools.get("f").target_nodes == 2 and len(node_ids(batch, "f")) == 2
    # a good formula replaces it at once, and is obeyed
    batch.pools.enable_autoscale("f", "$TargetNodes = $IdleNodes - 1", interval_s=1)
    poll(lambda: batch.pools.get("f").target_nodes == 1, what="resized by the new formula")
    poll(lambda: len(node_ids(batch, "f")) == 1, what="one node left")
