"""Helpers shared by the test modules (import them with `from helpers import ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hpcbatch.launch.cluster import pid_alive  # noqa: F401 - re-exported for tests
from hpcbatch.store import Store


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


def snapshot(home: Path) -> tuple:
    """Everything the store holds, to prove a rejected request changed nothing."""
    if not (home / "state.db").exists():
        return ()
    s = Store(home / "state.db")
    try:
        return tuple(tuple(sorted(map(repr, s.db.execute(f"SELECT * FROM {t}").fetchall())))
                     for t in ("pools", "jobs", "tasks"))
    finally:
        s.close()


def poll(predicate, timeout_s: float = 30.0, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s} s")
