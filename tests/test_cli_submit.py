"""`hpcbatch submit` as a user runs it: a real CLI process, real agent, real tasks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pid_alive, run_cli, snapshot, task_row

from hpcbatch.store import Store


def task_rows(home: Path, job_id: str) -> list[dict]:
    s = Store(home / "state.db")
    try:
        return s.list_tasks(job_id)
    finally:
        s.close()


def job_of(result) -> str:
    m = re.search(r"job (submit-[\w-]+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    return m.group(1)


@pytest.mark.slow
def test_two_thousand_true_lines_all_succeed(cli, tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\n" * 2000)
    r = cli("submit", "--each-line", str(tasks))
    assert r.returncode == 0, r.stderr
    assert re.search(r"│\s+2000 │\s+2000 │\s+0 │", r.stdout), r.stdout


def test_a_failing_line_fails_the_run_and_names_its_stderr(cli, tmp_path, home):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\n" * 20 + "echo oops >&2; exit 3\n")
    r = cli("submit", "--each-line", str(tasks), "--job", "mixed")
    assert r.returncode == 1
    m = re.search(r"line-00021 stderr: (\S.*stderr\.txt)", r.stdout)
    assert m, r.stdout
    with open(m.group(1)) as f:
        assert f.read() == "oops\n"
    logs = cli("task", "logs", "mixed", "line-00021", "--stderr")
    assert logs.returncode == 0 and logs.stdout == "oops\n"
    row = task_row(home, "mixed", "line-00021")
    assert (row["state"], row["result"], row["exit_code"]) == ("completed", "failure", 3)


def test_timeout_kills_the_task_and_its_children(cli, tmp_path, home):
    pidfile = tmp_path / "child.pid"
    r = cli("submit", "--timeout", "1", "--job", "slow", "--",
            "sh", "-c", f"sleep 600 & echo $! > '{pidfile}'; wait")
    assert r.returncode == 1
    assert re.search(r"task-1\s+│ timeout", r.stdout), r.stdout
    child = int(pidfile.read_text())
    assert not pid_alive(child)
    row = task_row(home, "slow", "task-1")
    assert row["failure"] == "timeout" and row["result"] == "failure"


def test_retries_until_success(cli, tmp_path, home):
    counter = tmp_path / "attempts"
    script = (f"n=$(cat '{counter}' 2>/dev/null || echo 0); n=$((n+1)); "
              f"echo $n > '{counter}'; [ $n -ge 3 ]")
    r = cli("submit", "--retries", "2", "--job", "flaky", "--", script)
    assert r.returncode == 0, r.stdout + r.stderr
    row = task_row(home, "flaky", "task-1")
    assert (row["result"], row["retry_count"]) == ("success", 2)
    assert counter.read_text().strip() == "3"


def test_array_sets_the_task_index(cli, home):
    r = cli("submit", "--array", "1-5,9", "--job", "arr", "--",
            'echo "index=$HPCBATCH_TASK_INDEX task=$HPCBATCH_TASK_ID"')
    assert r.returncode == 0, r.stderr
    outs = sorted(Path(t["task_dir"], "stdout.txt").read_text() for t in task_rows(home, "arr"))
    assert outs == sorted(f"index={i} task=task-{i}\n" for i in (1, 2, 3, 4, 5, 9))


def test_array_in_argv_form_expands_variables_but_nothing_else(cli, home):
    # the README's form: each argument quoted, $NAME still expanding in the task
    r = cli("submit", "--array", "1-3", "--job", "argv", "--", "echo", "--seed",
            "$HPCBATCH_TASK_INDEX", "a b;", "$(id)", "`id`", "5$")
    assert r.returncode == 0, r.stderr
    outs = sorted(Path(t["task_dir"], "stdout.txt").read_text()
                  for t in task_rows(home, "argv"))
    assert outs == [f"--seed {i} a b; $(id) `id` 5$\n" for i in (1, 2, 3)]


def test_a_timed_out_task_shows_the_signal_that_ended_it(cli, home):
    r = cli("submit", "--timeout", "0.5", "--job", "sig", "--", "sleep 30")
    assert r.returncode == 1
    assert re.search(r"task-1\s+│ timeout\s+│ signal 15", r.stdout), r.stdout


def test_listings_keep_long_ids_whole_when_piped(cli, home):
    long_id = "a-job-id-that-is-long-" + "x" * 40
    assert cli("submit", "--job", long_id, "--", "true").returncode == 0
    r = cli("job", "list", columns=None)
    assert long_id in r.stdout, r.stdout
    many = cli("submit", "--array", "1-12", "--job", "many", "--", "true")
    assert many.returncode == 0
    limited = cli("task", "list", "many", "--limit", "5")
    assert limited.stdout.count("task-") == 5
    assert "showing 5 of 12 tasks" in limited.stderr


def test_task_environment(cli, home, tmp_path):
    r = cli("submit", "--job", "envjob", "--workdir", "task", "--",
            "env | grep ^HPCBATCH_ | sort; pwd -P")
    assert r.returncode == 0
    *lines, cwd = cli("task", "logs", "envjob", "task-1").stdout.splitlines()
    env = dict(line.split("=", 1) for line in lines)
    assert env["HPCBATCH_JOB_ID"] == "envjob" and env["HPCBATCH_TASK_ID"] == "task-1"
    assert env["HPCBATCH_POOL_ID"] == "local" and env["HPCBATCH_NODE_ID"] == "local-1"
    assert env["HPCBATCH_TASK_WORKING_DIR"] == env["HPCBATCH_TASK_DIR"] + "/wd"
    assert cwd == os.path.realpath(env["HPCBATCH_TASK_WORKING_DIR"])
    # the local pool's default (like sbatch): the directory submit ran in
    r = cli("submit", "--job", "here", "--", 'echo "$HPCBATCH_TASK_WORKING_DIR"; pwd -P',
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "here", "task-1").stdout.splitlines() == [
        str(tmp_path), os.path.realpath(tmp_path)]
    assert env["HPCBATCH_NODE_SHARED_DIR"].endswith("local-1/shared")
    assert "HPCBATCH_TASK_ATTEMPT" in env
    assert "HPCBATCH_JOB_PREP_DIR" not in env  # set only for a job with a preparation task


@pytest.mark.parametrize("args,needle", [
    (["submit", "--job", "bad id", "--", "true"], "--job: 'bad id' is not a valid id"),
    (["submit", "--slots", "0", "--", "true"], "--slots"),
    (["submit", "--pool", "nope", "--", "true"], "pool 'nope' does not exist"),
    (["submit", "--each-line", "/no/such/file.txt"], "/no/such/file.txt"),
    (["submit", "--array", "5-1", "--", "true"], "--array"),
    (["submit"], "give either --each-line FILE or a command"),
    (["task", "logs", "nojob", "t"], "job 'nojob' does not exist"),
    (["submit", "--slots", "100000", "--", "true"], "required_slots"),
    # one more slot than the local pool has (a slot per core)
    (["submit", "--slots", str((os.cpu_count() or 1) + 1), "--", "true"], "exceeds the"),
    (["submit", "--timeout", "nan", "--", "true"], "--timeout: nan is not a number"),
    (["submit", "--array", "0-99999999", "--", "true"], "100,000,000 tasks, more than"),
    (["submit", "--array", "0-600000,700000-1300000", "--", "true"], "more than 1,000,000"),
    (["task", "add", "nojob", "t", "--", "true"], "job 'nojob' does not exist"),
    (["run", "pi", "--nodes", "2"], "more than the 1 nodes of pool 'local'"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(cli, home, args, needle):
    cli("submit", "--job", "keep", "--", "true")  # some accepted state to protect
    before = snapshot(home)
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
    assert snapshot(home) == before  # 'run --nodes 2' leaves no empty job behind


def test_duplicate_task_id_is_rejected(cli, home, tmp_path):
    cli("job", "create", "dup")
    assert cli("task", "add", "dup", "t1", "--", "true").returncode == 0
    before = snapshot(home)
    r = cli("task", "add", "dup", "t1", "--", "echo", "again")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: task id 't1' already exists in job 'dup'; task ids must be unique within a job")
    assert snapshot(home) == before


def test_debug_shows_a_traceback(cli):
    r = cli("--debug", "submit", "--pool", "nope", "--", "true")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_read_commands(cli, home, tmp_path):
    tasks = tmp_path / "t.txt"
    tasks.write_text("echo one\necho two\n")
    assert cli("submit", "--each-line", str(tasks), "--job", "reads").returncode == 0
    assert "local" in cli("pool", "list").stdout
    show = cli("pool", "show", "local").stdout
    assert "local-1" in show and "offline" in show and "coordinator stopped" in show
    assert "reads" in cli("job", "list").stdout
    assert "succeeded 2" in cli("job", "show", "reads").stdout
    listing = cli("task", "list", "reads").stdout
    assert "line-00001" in listing and "line-00002" in listing
    assert '"exit_code": 0' in cli("task", "show", "reads", "line-00002").stdout
    assert cli("task", "logs", "reads", "line-00002").stdout == "two\n"


def test_job_delete_removes_a_finished_job_and_its_directories(cli, home):
    assert cli("submit", "--job", "old", "--array", "1-3", "--", "true").returncode == 0
    dirs = {Path(t["task_dir"]).parent for t in task_rows(home, "old")}
    assert dirs and all(d.is_dir() and d.name == "old" for d in dirs)
    r = cli("job", "delete", "old")
    assert r.returncode == 0 and "job old deleted" in r.stdout, r.stderr
    assert not any(d.exists() for d in dirs)
    gone = cli("job", "show", "old")
    assert gone.returncode == 2 and "old" in gone.stderr
    # the id is free again
    assert cli("submit", "--job", "old", "--", "true").returncode == 0


@pytest.mark.slow
def test_job_delete_refuses_unfinished_work_and_pool_delete_refuses_jobs(cli, home):
    assert cli("pool", "create", "side", "--nodes", "2").returncode == 0
    assert cli("submit", "--no-wait", "--job", "pending", "--pool", "side", "--",
               "true").returncode == 0
    before = snapshot(home)
    r = cli("job", "delete", "pending")
    assert r.returncode == 2 and "job 'pending' has 1 unfinished task(s)" in r.stderr
    r = cli("pool", "delete", "side")
    assert r.returncode == 2 and "pool 'side' still has job(s) pending" in r.stderr
    r = cli("pool", "delete", "local")
    assert r.returncode == 2 and "built in" in r.stderr
    assert snapshot(home) == before
    assert cli("job", "wait", "pending").returncode == 0
    assert cli("job", "delete", "pending").returncode == 0
    assert cli("pool", "delete", "side").returncode == 0
    assert "side" not in cli("pool", "list").stdout


def cli_env(home: Path, extra: dict[str, str], *args: str, **kw):
    """The CLI with more variables in its environment (the tasks inherit them)."""
    env = dict(os.environ, HPCBATCH_HOME=str(home), COLUMNS="200", **extra)
    return subprocess.run([sys.executable, "-m", "hpcbatch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, **kw)


HOSTILE = ["$(touch pwned)", "`touch pwned`", "it's \"quoted\"", "a; touch pwned", "two\nlines",
           "$HOME", "${V}", "\\$(x)"]


def test_argv_commands_run_their_words_as_written(cli, home, tmp_path):
    """submit and task add quote an argv the same way: nothing in a word, nor in a
    variable's value that an inner 'sh -c' expands, is evaluated as shell code."""
    value = "$(touch pwned) `touch pwned` ; touch pwned \" ' \n$HOME"
    r = cli_env(home, {"V": value}, "submit", "--job", "hostile", "--", "sh", "-c",
                'printf "%s|" "$V"; echo', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "hostile", "task-1").stdout == value + "|\n"
    r = cli("submit", "--job", "words", "--", "printf", "%s|", *HOSTILE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "words", "task-1").stdout == "|".join(HOSTILE) + "|"
    assert not list(tmp_path.rglob("pwned")) and not list(home.rglob("pwned"))
    # task add stores the same command line for the same argv
    assert cli("job", "create", "added").returncode == 0
    assert cli("task", "add", "added", "task-1", "--", "printf", "%s|", *HOSTILE
               ).returncode == 0
    assert task_row(home, "added", "task-1")["command_line"] == \
        task_row(home, "words", "task-1")["command_line"]


def test_task_logs_do_not_follow_a_link_the_task_made(cli, home, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the task's\n")
    r = cli("submit", "--job", "sly", "--",
            f'echo hi; ln -sf "{secret}" "$HPCBATCH_TASK_DIR/stderr.txt"')
    assert r.returncode == 0, r.stderr
    assert cli("task", "logs", "sly", "task-1").stdout == "hi\n"
    r = cli("task", "logs", "sly", "task-1", "--stderr")
    assert r.returncode == 2 and "not the task's" not in r.stdout
    assert r.stderr.count("\n") == 1 and "symbolic link" in r.stderr, r.stderr


def test_an_unwritable_home_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli(blocker / "home", "submit", "--no-wait", "--", "true")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker) in lines[0]
