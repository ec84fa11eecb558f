"""Helpers shared by the test modules (import them with `from helpers import ...`)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hpcbatch.launch.cluster import pid_alive  # noqa: F401 - re-exported for tests
from hpcbatch.store import Store

# Clocks for tests (the batch fixture's): nothing waits out the production constants (a
# 4 s node timeout, a 30 s pool grace), yet nothing is so tight that a busy 2-core machine
# loses a node.
FAST_TIMINGS = dict(heartbeat_s=0.25, node_timeout_s=2.0, lease_s=3.0, reconnect_min_s=0.25,
                    reconnect_max_s=1.0, kill_grace_s=0.5, pool_grace_s=5.0, work_poll_s=0.25)


def unavailable(check) -> str | None:
    """Why a test-cluster feature cannot run here (check_sshd, check_netns), or None."""
    from hpcbatch.launch.cluster import ClusterError
    try:
        check()
    except ClusterError as exc:
        return str(exc)
    return None


def run_cli(home: Path, *args: str, timeout_s: float = 120, columns: str | None = "200",
            **kw) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, output piped (COLUMNS=None: as a pipe with no COLUMNS)."""
    env = dict(os.environ, HPCBATCH_HOME=str(home))
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([sys.executable, "-m", "hpcbatch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, **kw)


# what users stored: a rejected request must change none of it (the coordinator's own
# bookkeeping, nodes, agents and the change counter, moves whenever one runs)
USER_TABLES = ("pools", "jobs", "tasks", "task_attempts")


def wait_for_service(home: Path, proc: subprocess.Popen, log: Callable[[], str],
                     timeout_s: float = 60.0) -> tuple[dict, str]:
    """The ``service.json`` record and the local key that ``hpcbatch serve`` (``proc``)
    writes in ``home`` once it listens; AssertionError with its log (``log()``) if it
    exits or has not written them within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"hpcbatch serve exited with {proc.returncode}: {log()}")
        try:
            record = json.loads((home / "service.json").read_text())
            key = (home / "service.key").read_text().strip()
        except (OSError, ValueError):
            record, key = None, ""
        if record and record.get("pid") == proc.pid and key:
            return record, key
        if time.monotonic() > deadline:
            raise AssertionError(f"no service.json within {timeout_s:g} s: {log()}")
        time.sleep(0.05)


def task_row(home: Path, job_id: str, task_id: str) -> dict:
    """A task's row as the home's store holds it."""
    s = Store(home / "state.db")
    try:
        return s.get_task(job_id, task_id)
    finally:
        s.close()


def snapshot(home: Path) -> dict:
    """Every row of the home's USER_TABLES, to prove a rejected request changed nothing
    ({} before anything was stored)."""
    if not (home / "state.db").exists():
        return {}
    s = Store(home / "state.db")
    try:
        return s.dump_tables(USER_TABLES)
    finally:
        s.close()


def gate(path: str | os.PathLike) -> str:
    """Shell text that waits until ``path`` exists: a task holds there until the test
    opens the gate (``path.touch()``), however fast or busy the machine is."""
    return f"while [ ! -e {shlex.quote(str(path))} ]; do sleep 0.01; done"


def barrier(directory: str | os.PathLike, n: int) -> str:
    """Shell text for a task to check in at ``directory`` (a file per task attempt) and
    wait until ``n`` tasks have: they all run at once, on as many slots, before any
    goes on."""
    d = shlex.quote(str(directory))
    return (f'mkdir -p {d}; touch {d}/"$HPCBATCH_JOB_ID.$HPCBATCH_TASK_ID.'
            f'$HPCBATCH_TASK_ATTEMPT"; while [ "$(ls {d} | wc -l)" -lt {n} ]; do sleep 0.01; '
            "done")


def processes_with(env: dict[str, str]) -> list[int]:
    """Live processes whose environment holds every NAME=VALUE of ``env``: the rule the
    agent's reap_matching kills by (its own matcher, without the kill)."""
    from hpcbatch.launch import agent
    return sorted(agent._env_matches(agent._procs(), agent._needles(env)))


def poll(predicate, timeout_s: float = 30.0, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s} s")
