"""Job preparation and release tasks with real agents: local pools, the CLI, and the
session's three sshd nodes (tests/conftest_ssh.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import gate, poll, task_row

from hpcbatch.errors import ValidationError
from hpcbatch.store import Store


def node_dir(home: Path, pool: str, node: str, job: str, which: str) -> Path:
    return home / "nodes" / pool / node / "jobs" / job / which


def by_node(status: dict) -> dict[tuple[str, str], dict]:
    return {(n["node_id"], n["kind"]): n for n in status["nodes"]}


def test_prep_runs_once_per_node_before_the_jobs_tasks_and_release_after(
        make_batch, tmp_path, home):
    batch = make_batch()
    log = tmp_path / "preps.log"
    batch.pools.create("three", target_nodes=3, task_slots_per_node=2,
                       scheduling_policy="spread")
    job = batch.jobs.create(
        "prepped", pool="three", on_all_tasks_complete="terminate_job",
        preparation_task={"command_line": f'echo "$HPCBATCH_NODE_ID" >> "{log}"; '
                          'sleep 0.3; echo ready > ready; pwd -P'},
        release_task={"command_line": 'ls "$HPCBATCH_JOB_PREP_DIR" > listed; '
                      'echo "released $HPCBATCH_NODE_ID"'})
    # each task fails unless its node's preparation task finished first, in the directory
    # HPCBATCH_JOB_PREP_DIR names
    job.add_tasks({"id": f"t{i}", "command_line":
                   'test -e "$HPCBATCH_JOB_PREP_DIR/ready" && echo "$HPCBATCH_NODE_ID"'}
                  for i in range(9))
    job.wait(timeout_s=90)
    tasks = list(job.tasks())
    assert all(t.succeeded for t in tasks), [(t.id, t.failure) for t in tasks]
    ran_on = {t.stdout().strip() for t in tasks}
    assert sorted(log.read_text().split()) == sorted(ran_on)  # once per node
    assert batch.jobs.get("prepped").state == "completed"
    status = by_node(job.preparation_and_release())
    for n in ran_on:
        prep = node_dir(home, "three", n, "prepped", "jobpreparation")
        assert (prep / "ready").read_text() == "ready\n"
        assert (prep / "stdout.txt").read_text().strip() == str(prep.resolve())
        rel = node_dir(home, "three", n, "prepped", "jobrelease")
        assert (rel / "stdout.txt").read_text() == f"released {n}\n"
        assert "ready" in (rel / "listed").read_text().split()
        assert status[(n, "preparation")]["state"] == "succeeded"
        assert status[(n, "release")]["state"] == "succeeded"
    # the logs of both, by node, through the service
    one = sorted(ran_on)[0]
    assert batch.service.read_task_file("prepped", "jobrelease", "stdout.txt",
                                        node=one) == f"released {one}\n".encode()


def test_a_failing_prep_makes_its_node_skip_the_job(cli, home, tmp_path):
    assert cli("pool", "create", "skip", "--nodes", "3", "--policy", "spread"
               ).returncode == 0
    r = cli("job", "create", "picky", "--pool", "skip", "--on-all-tasks-complete",
            "terminate_job", "--prep-command",
            'if [ "$HPCBATCH_NODE_ID" = local-2 ]; then echo "no GPU here" >&2; exit 7; fi')
    assert r.returncode == 0, r.stderr
    # every task holds at a gate: each node takes one (one slot each), so local-2 gets
    # one too, prepares, fails, and its task goes back to wait for another node
    go = tmp_path / "go"
    r = cli("submit", "--job", "picky", "--pool", "skip", "--array", "1-6", "--no-wait",
            "--", f'{gate(go)}; echo "$HPCBATCH_NODE_ID"')
    assert r.returncode == 0, r.stdout + r.stderr
    waiter = subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", "job", "wait", "picky"],
                              env={**os.environ, "HPCBATCH_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def failed_there():
            store = Store(home / "state.db")
            try:
                return any(n["node_id"] == "local-2" and n["state"] == "failed"
                           for n in store.job_tasks("picky"))
            finally:
                store.close()
        poll(failed_there, timeout_s=60, what="local-2's preparation task failed")
        go.touch()
        assert waiter.wait(120) == 0, waiter.stdout.read()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    nodes = {task_row(home, "picky", f"task-{i}")["node_id"] for i in range(1, 7)}
    assert "local-2" not in nodes and nodes <= {"local-1", "local-3"}
    shown = cli("job", "show", "picky").stdout
    assert "│ local-2 │ preparation │ failed    │ 7    │" in shown, shown
    assert "exited with 7" in shown
    logs = cli("task", "logs", "picky", "jobpreparation", "--node", "local-2", "--stderr")
    assert logs.stdout == "no GPU here\n"


def test_a_job_no_node_can_prepare_fails_its_tasks_and_does_not_hang(cli, home):
    assert cli("pool", "create", "none", "--nodes", "2").returncode == 0
    assert cli("job", "create", "doomed", "--pool", "none", "--on-all-tasks-complete",
               "terminate_job", "--prep-command", "exit 3", "--prep-retries", "1"
               ).returncode == 0
    t0 = time.monotonic()
    r = cli("submit", "--job", "doomed", "--pool", "none", "--array", "1-4", "--", "true",
            timeout_s=120)
    assert r.returncode == 1 and time.monotonic() - t0 < 90
    shown = cli("task", "show", "doomed", "task-1").stdout
    assert "the job preparation task failed on every node of pool none" in shown, shown
    assert "local-1: exited with 3; local-2: exited with 3" in shown
    shown = cli("job", "show", "doomed").stdout
    assert "state completed" in shown and shown.count("│ preparation │ failed") == 2, shown


def test_release_on_terminate_with_its_wall_clock_limit(make_batch, tmp_path, home):
    batch = make_batch()
    batch.pools.create("rel", target_nodes=2, task_slots_per_node=1)
    job = batch.jobs.create("endless", pool="rel", release_task={
        "command_line": 'echo "$HPCBATCH_NODE_ID" > marker; exec sleep 600',
        "max_wall_clock_time_s": 1.0})
    started = tmp_path / "started"
    started.mkdir()
    job.add_tasks({"id": f"t{i}", "command_line":
                   f'touch "{started}/$HPCBATCH_TASK_ID"; exec sleep 600'} for i in range(2))
    deadline = time.monotonic() + 60
    while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(started.iterdir())) == 2
    t0 = time.monotonic()
    batch.service.terminate_job("endless")
    deadline = time.monotonic() + 60
    while batch.jobs.get("endless").state != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch.jobs.get("endless").state == "completed"
    assert time.monotonic() - t0 < 30  # the 600 s release task was cut at its 1 s limit
    status = by_node(job.preparation_and_release())
    for n in ("local-1", "local-2"):
        assert (node_dir(home, "rel", n, "endless", "jobrelease") / "marker").read_text() \
            == f"{n}\n"
        assert status[(n, "release")]["state"] == "failed"
        assert "timed out" in status[(n, "release")]["failure"]


def test_bad_prep_and_release_input_is_refused(batch, tmp_path, cli):
    with pytest.raises(ValidationError, match="job.preparation_task.command_line"):
        batch.jobs.create("bad1", preparation_task={"command_line": " "})
    with pytest.raises(ValidationError, match="unknown field"):
        batch.jobs.create("bad2", preparation_task={"command_line": "x", "wait": True})
    with pytest.raises(ValidationError, match="is not a file on this machine"):
        batch.jobs.create("bad3", preparation_task={"command_line": "x", "resource_files":
                                                    [str(tmp_path / "missing")]})
    with pytest.raises(ValidationError, match="job.release_task.max_wall_clock_time_s"):
        batch.jobs.create("bad4", release_task={"command_line": "x",
                                                "max_wall_clock_time_s": -1})
    r = cli("submit", "--job", "j", "--", "true")
    assert r.returncode == 0
    r = cli("task", "add", "j", "jobpreparation", "--", "true")
    assert r.returncode == 2 and "pick another id" in r.stderr


def test_prep_resource_files_and_a_pool_app(make_batch, tmp_path, home):
    from test_apps import tool_archive
    batch = make_batch()
    batch.apps.upload("tool", "1.0", tool_archive(tmp_path, "1.0"))
    batch.pools.create("pa", application_package_references=["tool"])
    data = tmp_path / "input.dat"
    data.write_text("payload\n")
    job = batch.jobs.create("files", pool="pa", on_all_tasks_complete="terminate_job",
                            preparation_task={"command_line": "mytool prep > tool.out",
                                              "resource_files": [{"source": str(data),
                                                                  "file_path": "in/i.dat"}]})
    job.add_task("t", 'cat "$HPCBATCH_JOB_PREP_DIR/in/i.dat" "$HPCBATCH_JOB_PREP_DIR/tool.out"')
    job.wait(timeout_s=60)
    assert job.task("t").stdout() == "payload\ntool 1.0 prep\n"


@pytest.mark.slow
def test_prep_and_release_on_each_ssh_node(batch, ssh_cluster, tmp_path):
    from test_ssh_pool import ssh_pool
    ssh_pool(batch, ssh_cluster.directory, tmp_path, "jt", ["node1", "node2", "node3"],
             scheduling_policy="spread")
    job = batch.jobs.create(
        "sshprep", pool="jt", on_all_tasks_complete="terminate_job",
        preparation_task={"command_line": 'echo "$HPCBATCH_NODE" > where'},
        release_task={"command_line": 'cat "$HPCBATCH_JOB_PREP_DIR/where" > released'})
    job.add_tasks({"id": f"t{i}", "command_line": 'cat "$HPCBATCH_JOB_PREP_DIR/where"'}
                  for i in range(6))
    job.wait(timeout_s=120)
    assert {t.stdout().strip() for t in job.tasks()} == {"node1", "node2", "node3"}
    deadline = time.monotonic() + 60
    while batch.jobs.get("sshprep").state != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
    status = job.preparation_and_release()
    assert sorted((n["node_id"], n["kind"], n["state"]) for n in status["nodes"]) == sorted(
        (f"node{i}", k, "succeeded") for i in (1, 2, 3) for k in ("preparation", "release"))
    for i in (1, 2, 3):
        rel = next(n for n in status["nodes"] if n["node_id"] == f"node{i}"
                   and n["kind"] == "release")
        got = batch.service.read_task_file("sshprep", "jobrelease", "released",
                                           node=f"node{i}")
        assert got == f"node{i}\n".encode(), rel


def test_a_coordinator_stopped_during_the_release_completes_the_job_at_its_restart(
        make_batch, home):
    batch = make_batch()
    job = batch.jobs.create("cut", on_all_tasks_complete="terminate_job",
                            release_task={"command_line": "exec sleep 600"})
    job.add_task("t", "true")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            n["kind"] == "release" and n["state"] == "running"
            for n in batch.service.job_task_status("cut")["nodes"]):
        time.sleep(0.05)
    assert batch.jobs.get("cut").state == "active"  # held by its release task
    batch.close()  # its agents stop the release task
    again = make_batch()
    again.jobs.get("cut").wait(timeout_s=60)  # (starts its coordinator)
    rel = by_node(again.service.job_task_status("cut"))[("local-1", "release")]
    assert rel["state"] == "failed" and "coordinator stopped" in rel["failure"]
    assert again.jobs.get("cut").state == "completed"


def test_a_release_task_takes_no_slot(make_batch, tmp_path, home):
    """The node's only slot is busy with another job's task: the release runs anyway."""
    batch = make_batch()
    batch.pools.create("one", target_nodes=1, task_slots_per_node=1)
    rel = batch.jobs.create("rel", pool="one", on_all_tasks_complete="terminate_job",
                            release_task={"command_line": f'touch "{tmp_path}/released"'})
    busy = batch.jobs.create("busy", pool="one", priority=-1)
    go = tmp_path / "go"
    rel.add_task("quick", "true")
    busy.add_task("long", gate(go))
    poll(lambda: (tmp_path / "released").exists(), timeout_s=60,
         what="the release task, beside the busy slot")
    poll(lambda: busy.task("long").state == "running", what="long running")
    go.touch()
    busy.wait(timeout_s=60)
    assert batch.jobs.get("rel").state == "completed"


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    """README's 'Application packages, job preparation and release' blocks, verbatim."""
    import re
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("### Application packages, job preparation and release"):]
    (bash, _), (py, _) = [(b, k) for k, b in re.findall(r"```(bash|python)\n(.*?)```",
                                                         section, re.S)[:2]]
    script = tmp_path / "example.sh"
    script.write_text(f"set -e\n{bash}\npython - <<'PYEOF'\n{py}PYEOF\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCBATCH_")}
    env["TMPDIR"] = str(tmp_path)  # (its mktemp -d folders)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "│ release     │ succeeded │" in r.stdout, r.stdout[-3000:]
    assert "\ncleaned\n" in r.stdout
    assert "release succeeded" in r.stdout.rsplit("cleaned", 1)[1], r.stdout[-2000:]
