"""The CLI does what the API does (issue 11): multi-instance tasks, environment, resource
files, the working directory, job completion; unknown options are errors, never words of
the command; a cold pool spreads its first tasks; coordination output is reachable."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import snapshot, task_row


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["submit", "--retires", "2", "--", "true"], "--retires"),
    (["submit", "--bogus", "--", "true"], "--bogus"),
    (["submit", "--nodes", "0", "--", "true"], "--nodes"),
    (["submit", "--nodes", "x", "--", "true"], "--nodes"),
    (["submit", "--env", "1X=2", "--", "true"], "--env"),
    (["submit", "--env", "NOVALUE", "--", "true"], "--env"),
    (["submit", "--file", "/no/such/file", "--", "true"], "--file"),
    (["submit", "--common-file", "/no/such/file", "--nodes", "2", "--", "true"],
     "--common-file"),
    (["submit", "--coordination-command", "setup.sh", "--", "true"], "--coordination-command"),
    (["submit", "--common-file", "x", "--", "true"], "--common-file"),
    (["submit", "--nodes", "2", "--coordination-command", " ", "--", "true"],
     "--coordination-command"),
    (["job", "create", "j", "--on-all-tasks-complete", "never"], "--on-all-tasks-complete"),
    (["task", "add", "keep", "t9", "--retires", "1", "--", "true"], "--retires"),
    (["task", "logs", "keep", "task-1", "--node", "bad id"], "--node"),
])
def test_bad_options_are_one_line_exit_2_and_change_nothing(cli, home, args, needle):
    cli("submit", "--job", "keep", "--", "true")
    before = snapshot(home)
    assert needle in one_line_error(cli(*args))
    assert snapshot(home) == before


def test_everything_after_the_double_dash_is_the_command(cli, home, tmp_path):
    r = cli("submit", "--job", "words", "--", "echo", "--nodes", "3", "--retires", "--", "x",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "words", "task-1").stdout == "--nodes 3 --retires -- x\n"


def test_env_file_and_workdir(cli, home, tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("payload\n")
    (tmp_path / "sim.sh").write_text("echo sim ran in $(pwd -P)\n")
    # the local pool's default: the submit directory, so a relative script is found
    r = cli("submit", "--job", "here", "--env", "A=1", "--env", "B=x=y", "--",
            'sh sim.sh; echo "$A $B"', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "here", "task-1").stdout == (
        f"sim ran in {os.path.realpath(tmp_path)}\n1 x=y\n")
    # --workdir task: the task's own wd/, where --file lands
    r = cli("submit", "--job", "own", "--workdir", "task", "--file", f"{data}:sub/d.txt",
            "--file", str(data), "--", "cat sub/d.txt in.txt; pwd -P", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = cli("task", "logs", "own", "task-1").stdout.splitlines()
    row = task_row(home, "own", "task-1")
    assert out == ["payload", "payload", os.path.realpath(Path(row["task_dir"], "wd"))]
    # --workdir PATH (relative: against the submit directory)
    (tmp_path / "elsewhere").mkdir()
    r = cli("task", "add", "keepme", "t", "--", "true")
    assert r.returncode == 2  # no such job: said before anything
    assert cli("job", "create", "added", "--on-all-tasks-complete", "terminate_job"
               ).returncode == 0
    r = cli("task", "add", "added", "t1", "--workdir", "elsewhere", "--env", "Z=9", "--",
            'echo "$Z $(pwd -P)"', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("job", "wait", "added")
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "added", "t1").stdout == (
        f"9 {os.path.realpath(tmp_path / 'elsewhere')}\n")
    # terminate_job: the job completed once its task had
    assert "state completed" in cli("job", "show", "added").stdout
    # a working directory that is gone is the task's start failure, naming it
    r = cli("submit", "--job", "gone", "--workdir", str(tmp_path / "nope"), "--", "true")
    assert r.returncode == 1
    assert f"working directory {tmp_path / 'nope'}" in task_row(home, "gone", "task-1")[
        "failure_detail"]


def test_multi_instance_from_the_cli_and_its_coordination_logs(cli, home, tmp_path):
    assert cli("pool", "create", "two", "--nodes", "2").returncode == 0
    setup = tmp_path / "setup.sh"
    setup.write_text('echo "setup on $HPCBATCH_NODE_ID" >&2\n'
                     '[ "$HPCBATCH_INSTANCE_INDEX" = 1 ] && { echo "no mpi here" >&2; '
                     "exit 7; }\nexit 0\n")
    ok = tmp_path / "ok.sh"
    ok.write_text('echo "ready $HPCBATCH_INSTANCE_INDEX"\n')
    r = cli("submit", "--pool", "two", "--job", "mi", "--nodes", "2", "--common-file",
            f"{ok}:setup.sh", "--coordination-command", 'sh "$HPCBATCH_TASK_SHARED_DIR/setup.sh"',
            "--", 'echo "$HPCBATCH_NUM_INSTANCES $HPCBATCH_NODE_LIST"', cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli("task", "logs", "mi", "task-1").stdout == "2 local-1,local-2\n"
    logs = cli("task", "logs", "mi", "task-1", "--coordination")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == ("==> node local-1: coordination-stdout.txt <==\nready 0\n"
                           "==> node local-2: coordination-stdout.txt <==\nready 1\n")
    # one node's coordination command fails: the task's failure names it, with its stderr
    r = cli("submit", "--pool", "two", "--job", "bad", "--nodes", "2", "--common-file",
            str(setup), "--coordination-command", 'sh "$HPCBATCH_TASK_SHARED_DIR/setup.sh"',
            "--", "true", cwd=tmp_path)
    assert r.returncode == 1
    row = task_row(home, "bad", "task-1")
    assert row["exit_code"] == 7
    assert row["failure_detail"] == ("coordination command on node local-2 exited with 7; "
                                     "stderr: setup on local-2 | no mpi here")
    assert "coordination command on node local-2" in r.stdout
    one = cli("task", "logs", "bad", "task-1", "--coordination", "--stderr", "--node",
              "local-2")
    assert one.returncode == 0 and one.stdout == "setup on local-2\nno mpi here\n"
    assert "not in pool two" in one_line_error(
        cli("task", "logs", "bad", "task-1", "--coordination", "--node", "local-9"))


def test_a_cold_pool_runs_its_first_tasks_on_distinct_nodes_at_once(cli, home, tmp_path):
    """Issue 11: 3 x sleep on a cold 3-node, 1-slot pool run on three nodes, overlapping
    (told by the tasks' own marks, not by the wall clock)."""
    assert cli("pool", "create", "three", "--nodes", "3").returncode == 0
    marks = tmp_path / "marks"
    marks.mkdir()
    r = cli("submit", "--pool", "three", "--job", "cold", "--array", "1-3", "--",
            "sh", "-c", f'd={marks}/$HPCBATCH_TASK_ID; '
            'echo "$HPCBATCH_NODE_ID $(date +%s.%N)" > "$d.start"; sleep 2; '
            'date +%s.%N > "$d.end"')
    assert r.returncode == 0, r.stdout + r.stderr
    starts, ends, nodes = [], [], set()
    for i in (1, 2, 3):
        node, t = (marks / f"task-{i}.start").read_text().split()
        nodes.add(node)
        starts.append(float(t))
        ends.append(float((marks / f"task-{i}.end").read_text()))
    assert len(nodes) == 3, nodes
    assert max(starts) < min(ends), (starts, ends)  # all three ran at the same time


def test_submit_help_names_the_new_options(cli):
    text = cli("submit", "--help").stdout
    for opt in ("--nodes", "--coordination-command", "--common-file", "--env", "--file",
                "--workdir"):
        assert re.search(rf"{opt}\b", text), opt


def test_a_wide_task_waiting_for_busy_nodes_says_so(cli, home, tmp_path):
    """No silent wait: `job wait` (and submit, run) prints what a multi-instance task
    waits for and which task holds the nodes; the API's on_waiting is told the same."""
    assert cli("pool", "create", "trio", "--nodes", "3").returncode == 0
    assert cli("job", "create", "w", "--pool", "trio").returncode == 0
    gate = tmp_path / "go"
    busy = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    assert cli("task", "add", "w", "busy", "--", "sh", "-c", busy).returncode == 0
    assert cli("task", "add", "w", "wide", "--nodes", "3", "--", "true").returncode == 0
    import threading
    import time
    threading.Thread(target=lambda: (time.sleep(3), gate.touch()), daemon=True).start()
    r = cli("job", "wait", "w", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    said = re.findall(r"task wide: waiting for 3 nodes of pool trio; local-\d runs w/busy\n",
                      r.stderr)
    assert len(said) == 1, r.stderr  # said, and once: not at every poll


def test_job_wait_on_waiting_is_told_and_cleared(batch, tmp_path):
    batch.pools.create("duo", target_nodes=2)
    job = batch.jobs.create("w2", pool="duo")
    gate = tmp_path / "go"
    job.add_task("busy", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    job.add_task("wide", "true", multi_instance={"instances": 2})
    seen: list[str] = []

    def told(text: str) -> None:
        seen.append(text)
        if text:
            gate.touch()  # told while the busy task still holds local-1: now let it end

    job.wait(timeout_s=60, on_waiting=told)
    assert re.fullmatch(r"task wide: waiting for 2 nodes of pool duo; local-\d runs w2/busy",
                        next(t for t in seen if "runs" in t)), seen
    assert seen[-1] == "", seen
    assert job.task("wide").succeeded
