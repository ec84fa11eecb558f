"""A coordinator killed with SIGKILL loses nothing: `hpcbatch job wait` finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers import gate, poll, run_cli

from hpcbatch.store import Store


@pytest.mark.slow
def test_sigkill_mid_job_then_job_wait(home, tmp_path):
    """The last 300 tasks hold on a gate opened only after the kill, so the coordinator
    dies mid-job however fast the machine runs the first 200."""
    markers = tmp_path / "markers"
    markers.mkdir()
    go = tmp_path / "go"
    run = f"echo run >> '{markers}'/$HPCBATCH_TASK_ID"
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"{run}\n" * 200 + f"{run}; {gate(go)}\n" * 300)
    env = dict(os.environ, HPCBATCH_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", "submit", "--each-line",
                             str(tasks), "--job", "crash", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    store_path = home / "state.db"
    poll(store_path.exists, what="state.db")
    store = Store(store_path)
    try:
        def completed() -> set[str]:
            return {t["id"] for t in store.list_tasks("crash", "completed")}

        poll(lambda: len(completed()) >= 100, timeout_s=60, what="100 completed tasks")
        done_before = completed()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(done_before) <= 200
        go.touch()

        r = run_cli(home, "job", "wait", "crash", "--no-progress")
        assert r.returncode == 0, r.stdout + r.stderr

        rows = store.list_tasks("crash")
        assert len(rows) == 500
        assert all(t["state"] == "completed" and t["result"] == "success" for t in rows)
        runs = {t["id"]: (markers / t["id"]).read_text().count("run") for t in rows}
        assert all(n >= 1 for n in runs.values()), "a task never ran"
        for tid in done_before:
            assert runs[tid] == 1, f"{tid} was completed before the kill and ran again"
        twice = {tid for tid, n in runs.items() if n > 1}
        requeued = {t["id"] for t in rows if t["requeue_count"] > 0}
        assert twice <= requeued, "a task ran twice without being counted as requeued"
        # at most what was in flight: the slots plus those prefetched in the agent queue
        from hpcbatch.coordinator import DEFAULT_PREFETCH
        assert len(requeued) <= (1 + DEFAULT_PREFETCH) * (os.cpu_count() or 1)
    finally:
        store.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
