"""Several clients of one home at once, as real processes.

* With a running ``hpcbatch serve``: a ``hpcbatch submit`` in one "shell" and a Python
  script using ``hpcbatch.Batch()`` in another (both find the service through the home's
  service.json) both finish, and neither stops the other's tasks: the submit ends while
  the script's tasks run, and they go on running to success, never requeued. A
  ``hpcbatch task logs -f`` in a third follows one of them to its end.
* Without a service: a ``Batch()`` that reads opens at once beside a running
  ``hpcbatch job wait`` (no CoordinatorBusy); a task it adds is run by that coordinator;
  what needs its own coordinator (a pool) is refused with CoordinatorBusy; a
  ``hpcbatch task logs -f`` follows a task that coordinator runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import FAST_TIMINGS, gate, poll, run_cli
from test_backends import running_service

import hpcbatch
from hpcbatch.errors import CoordinatorBusy

PROC_TIMEOUT_S = 180


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, HPCBATCH_HOME=str(home), COLUMNS="200")
    env.pop("HPCBATCH_URL", None)
    env.pop("HPCBATCH_KEY", None)
    return env


def _cli(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", *args], env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def _finish(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=PROC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{what} did not finish within {PROC_TIMEOUT_S} s: {out} {err}"
                             ) from None
    assert proc.returncode == 0, f"{what} exited {proc.returncode}: {out}\n{err}"
    return out, err


def _until(predicate, what: str, proc: subprocess.Popen, served=None) -> None:
    """Poll until ``predicate()``; a client that exits meanwhile fails the test at once,
    with its output (and the service's log)."""
    deadline = time.monotonic() + PROC_TIMEOUT_S
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate() if proc.poll() is not None else ("", "")
            log = served.log_text() if served is not None else ""
            raise AssertionError(f"{what}: not reached (client exit {proc.poll()}): {out}\n"
                                 f"{err}\n--- service log ---\n{log}")
        time.sleep(0.02)


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


SCRIPT = textwrap.dedent("""
    import json, sys
    import hpcbatch

    markers, go = sys.argv[1], sys.argv[2]
    with hpcbatch.Batch() as batch:          # finds the running service by itself
        assert batch.url is not None, "not using the service"
        job = batch.jobs.create("script", pool="wide")
        job.add_tasks({"id": f"s{i}", "command_line":
                       f"touch '{markers}/s{i}'; echo from-s{i}; "
                       f"while [ ! -e '{go}' ]; do sleep 0.01; done; echo done-s{i}"}
                      for i in range(3))
        print(json.dumps(job.wait(timeout_s=150)), flush=True)
""")


def test_a_cli_submit_and_a_script_share_a_running_service(home, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    go_script, go_cli = tmp_path / "go-script", tmp_path / "go-cli"
    script_file = tmp_path / "script.py"
    script_file.write_text(SCRIPT)
    procs: list[subprocess.Popen] = []
    with running_service(home) as served:
        with hpcbatch.Batch(url=served.url, key=served.key) as admin:  # room for both
            admin.pools.create("wide", task_slots_per_node=8)
        try:
            script = subprocess.Popen(
                [sys.executable, str(script_file), str(markers), str(go_script)],
                env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                stdin=subprocess.DEVNULL)
            procs.append(script)
            _until(lambda: all((markers / f"s{i}").exists() for i in range(3)),
                   "the script's tasks running", script, served)
            logs = _cli(home, "task", "logs", "-f", "script", "s1")
            procs.append(logs)
            submit = _cli(home, "submit", "--job", "shell", "--pool", "wide", "--array", "1-3",
                          "--no-progress", "--",
                          f"touch '{markers}'/c$HPCBATCH_TASK_INDEX; {gate(go_cli)}")
            procs.append(submit)
            _until(lambda: all((markers / f"c{i}").exists() for i in (1, 2, 3)),
                   "the submit's tasks running", submit, served)
            go_cli.touch()
            out, err = _finish(submit, "hpcbatch submit")
            assert "job shell: 3 tasks on pool wide" in err, err
            assert re.search(r"│\s+3\s+│\s+3\s+│\s+0\s+│", out), out
            # the submit is over; the script's tasks run on, untouched
            with hpcbatch.Batch(url=served.url, key=served.key) as reader:
                job = reader.jobs.get("script")
                assert {t.state for t in job.tasks()} == {"running"}
                assert job.counts()["requeues"] == 0
                go_script.touch()
                out, err = _finish(script, "the script")
                counts = json.loads(out.strip().splitlines()[-1])
                assert counts["succeeded"] == 3 and counts["requeues"] == 0, counts
                for job_id, ids in (("script", ["s0", "s1", "s2"]),
                                    ("shell", ["task-1", "task-2", "task-3"])):
                    for task_id in ids:
                        attempts = reader.jobs.get(job_id).task(task_id).attempts()
                        assert [a.outcome for a in attempts] == ["success"], (job_id, attempts)
            out, err = _finish(logs, "hpcbatch task logs -f")
            assert out == "from-s1\ndone-s1\n", (out, err)
            # neither client was a coordinator: the service kept the home's lock
            lock = (home / "coordinator.lock").read_text().strip()
            assert lock == str(served.proc.pid)
        finally:
            _kill(*procs)


def test_a_reading_batch_opens_beside_a_running_job_wait(home, tmp_path):
    go = tmp_path / "go"
    r = run_cli(home, "pool", "create", "wide", "--slots", "4")  # room for two at once
    assert r.returncode == 0, r.stderr
    r = run_cli(home, "submit", "--no-wait", "--job", "w", "--pool", "wide", "--",
                f"echo first; {gate(go)}; echo last")
    assert r.returncode == 0, r.stderr
    waiter = _cli(home, "job", "wait", "w", "--no-progress")
    follower = None
    try:
        reader = None
        try:
            deadline = time.monotonic() + 90
            while True:  # until that coordinator runs the task (read without one here)
                t0 = time.monotonic()
                reader = hpcbatch.Batch(home, **FAST_TIMINGS)
                opened = time.monotonic() - t0
                job = reader.jobs.get("w")
                if job.task("task-1").state == "running":
                    break
                reader.close()
                assert time.monotonic() < deadline and waiter.poll() is None, waiter.poll()
                time.sleep(0.1)
            assert opened < 5.0, f"a reading Batch took {opened:.1f} s to open"
            assert job.counts()["running"] == 1
            assert [j.id for j in reader.jobs.list(counts=True)] == ["w"]
            assert "local" in {p.id for p in reader.pools.list()}
            poll(lambda: job.task("task-1").stdout() == "first\n", timeout_s=30,
                 what="the task's first line")
            follower = _cli(home, "task", "logs", "-f", "w", "task-1")
            # what needs this process's own coordinator: refused, nothing stored
            with pytest.raises(CoordinatorBusy, match="another coordinator"):
                reader.pools.create("mine")
            assert reader.coordinator is None
            # a task added here is stored, and the running coordinator runs it
            job.add_task("late", "echo late")
            poll(lambda: job.task("late").state == "completed", timeout_s=60,
                 what="the added task run by the other coordinator")
            assert job.task("late").stdout() == "late\n"
            go.touch()
            counts = job.wait(timeout_s=60)  # follows the store
            assert counts["succeeded"] == 2
        finally:
            if reader is not None:
                reader.close()
        out, err = _finish(waiter, "hpcbatch job wait")
        assert re.search(r"│\s+2\s+│\s+2\s+│\s+0\s+│", out), out
        out, err = _finish(follower, "hpcbatch task logs -f")
        assert out == "first\nlast\n", (out, err)
    finally:
        _kill(waiter, *([follower] if follower else []))
