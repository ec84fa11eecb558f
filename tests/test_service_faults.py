"""`hpcbatch serve` killed or stopped in the middle of a job, then started again.

A real `hpcbatch serve` process (its own process group, FAST timings through its
``--timing`` flags) runs a job whose tasks each append start/end lines to one marker file
(O_APPEND, one short write a line: ``start|end <task id> <$HPCBATCH_TASK_ID> <attempt>
<pid> <time>``) and hold a per-task ``flock`` while they run (a second run of the same task
that finds the lock held writes an ``overlap`` line), with a few ms of work each so that
some are in flight whenever the server goes.

* SIGKILL of the server's process group when a seeded random number of tasks have
  completed (and some run), then a restart on the same home: once at one point (fast
  tier), and at ten points in one 2,000-task job (slow tier). The seed is printed in
  every assertion message (``HPCBATCH_FAULT_SEED`` replays one).
* SIGTERM of the server mid-job (exit 0, service.json and service.key gone, no agent or
  task left running), then a restart that resumes the job.

After the last restart the job ends and, from the marker file and the store:

* every one of the tasks succeeded, exactly one success attempt each, none lost;
* every run the marker file shows is an attempt the store recorded (its attempt number),
  no attempt ran twice, and every attempt but the success is a requeue (the task's
  requeue_count); a task never requeued ran exactly once, start to end;
* no two runs of a task overlapped (the flock, and the start/end times of whole runs);
* the requeues of each kill are at most what can be in flight (slots x (1 + prefetch)),
  and a task the store had recorded completed at a kill never ran again;
* after each kill, what the killed server left (its agents, their tasks) is gone once the
  next server is up; at the end no process of the test is left (by an environment
  marker every server, agent and task carries, and the autouse leak check).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import FAST_TIMINGS, processes_with, wait_for_service

import hpcbatch
from hpcbatch.state import DEFAULT_PREFETCH

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

START_TIMEOUT_S = 90.0  # a loaded 2-core box: imports, the store, the first agents
PROGRESS_TIMEOUT_S = 120.0  # for a kill point (a number of completed tasks) to be reached
FINISH_TIMEOUT_S = 300.0
GONE_TIMEOUT_S = 20.0  # what a killed server left: its agents end at stdin EOF, the next
# server reaps them (a local fence is sure at once)
NODES, SLOTS = 2, 2
MARK = "HPCBATCH_FAULTS_MARK"  # in the environment of every server, agent and task here


def _seed() -> int:
    env = os.environ.get("HPCBATCH_FAULT_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


# ---------------------------------------------------------------- the server

class Server:
    """One `hpcbatch serve --bind 127.0.0.1:0` on ``home`` in its own process group, with
    a Batch(url=, key=) on it."""

    def __init__(self, home: Path, logs: Path, mark: str):
        self.home = home
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("serve-*.err")))
        self.err_path = logs / f"serve-{n}.err"
        timings = [a for k, v in FAST_TIMINGS.items() for a in ("--timing", f"{k}={v}")]
        env = dict(os.environ, HPCBATCH_HOME=str(home), **{MARK: mark})
        env.pop("HPCBATCH_URL", None)
        env.pop("HPCBATCH_KEY", None)
        with open(logs / f"serve-{n}.out", "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpcbatch.cli", "serve", "--home", str(home),
                 "--bind", "127.0.0.1:0", *timings], stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.batch: hpcbatch.Batch | None = None

    def wait_ready(self) -> hpcbatch.Batch:
        record, key = wait_for_service(self.home, self.proc, self.stderr, START_TIMEOUT_S)
        self.batch = hpcbatch.Batch(url=record["url"], key=key)
        return self.batch

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")[-6000:]

    def close_client(self) -> None:
        if self.batch is not None:
            with contextlib.suppress(Exception):
                self.batch.close()
            self.batch = None

    def kill(self) -> None:
        """SIGKILL of the server's whole process group (its agents and their tasks are in
        sessions of their own: they see the server's end as EOF on stdin)."""
        self.close_client()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait, then SIGKILL of the group: whatever the test did."""
        self.close_client()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            return None
        return self.proc.returncode


@pytest.fixture
def servers(tmp_path):
    """start() -> a ready Server on tmp_path/'hpc home' (each one stopped at the end)."""
    made: list[Server] = []
    mark = uuid.uuid4().hex

    def start() -> Server:
        s = Server(tmp_path / "hpc home", tmp_path / "logs", mark)
        made.append(s)
        s.wait_ready()
        return s

    start.mark = mark  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for s in reversed(made):
            s.stop()


# ---------------------------------------------------------------- the job

@dataclass
class Kill:
    """One kill (or stop) point and what was seen around it."""
    at_completed: int  # the point: this many tasks completed
    completed_then: set[str] = field(default_factory=set)  # the store's, after the kill
    left: dict[int, int] = field(default_factory=dict)  # marked processes alive at the kill
    going_at: float = 0.0  # just before the signal
    down_at: float = 0.0  # once it had exited
    up_at: float = 0.0


def task_script(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(script, marker file, lock directory). bash for $EPOCHREALTIME (no fork for a
    clock); `exec 9>>` + `flock -n 9` holds the task's lock for the whole run."""
    markers = tmp_path / "markers.log"
    locks = tmp_path / "locks"
    locks.mkdir()
    script = tmp_path / "task.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"M={_q(markers)}\n"
        f'exec 9>>{_q(locks)}/"$1"\n'
        'who="$1 $HPCBATCH_TASK_ID $HPCBATCH_TASK_ATTEMPT $$"\n'
        'flock -n 9 || echo "overlap $who $EPOCHREALTIME" >> "$M"\n'
        'echo "start $who $EPOCHREALTIME" >> "$M"\n'
        'sleep "$2"\n'
        'echo "end $who $EPOCHREALTIME" >> "$M"\n')
    return script, markers, locks


def _q(p: Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def make_tasks(script: Path, n: int, rng: random.Random, mark: str) -> list[dict]:
    return [{"id": f"t{i:04d}", "command_line": f"bash {_q(script)} t{i:04d} "
             f"0.0{rng.randint(1, 4)}", "environment": {MARK: mark}} for i in range(n)]


def completed_in_store(home: Path, job: str) -> set[str]:
    """The tasks the store holds completed (read beside no server, or a dead one)."""
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0] for r in db.execute(
            "SELECT id FROM tasks WHERE job_id = ? AND state = 'completed'", (job,))}
    finally:
        db.close()


def marked(mark: str) -> dict[int, int]:
    """{pid: start time} of the live processes carrying the test's mark."""
    out = {}
    for pid in processes_with({MARK: mark}):
        with contextlib.suppress(OSError):
            st = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if st[0] not in (b"Z", b"X"):
                out[pid] = int(st[19])
    return out


def still_alive(procs: dict[int, int]) -> dict[int, int]:
    out = {}
    for pid, start in procs.items():
        with contextlib.suppress(OSError):
            st = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if int(st[19]) == start and st[0] not in (b"Z", b"X"):
                out[pid] = start
    return out


def describe(pids) -> str:
    out = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            out.append(f"{pid} ({Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r})")
    return "; ".join(out)


def wait_counts(batch: hpcbatch.Batch, job: str, until, what: str, timeout_s: float,
                msg: str) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        c = batch.service.job_counts(job)
        if until(c):
            return c
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s (counts {c}); "
                                 f"{msg}")
        time.sleep(0.02)


def run_with_faults(servers, tmp_path: Path, *, n_tasks: int, kill_points: list[int],
                    seed: int, how: str = "kill") -> None:
    """Submit n_tasks; at each kill point (completed tasks) kill (SIGKILL of the group) or
    stop (SIGTERM) the server and start another; let the last one finish; check all."""
    msg = f"seed {seed} (HPCBATCH_FAULT_SEED={seed} replays it), kill points {kill_points}"
    rng = random.Random(seed)
    mark = servers.mark
    job = "faults"
    script, markers, _locks = task_script(tmp_path)
    server = servers()
    home = server.home
    b = server.batch
    b.service.create_pool("p", "local", task_slots_per_node=SLOTS, target_nodes=NODES)
    b.jobs.create(job, pool="p")
    assert b.jobs.get(job).add_tasks(make_tasks(script, n_tasks, rng, mark)) == n_tasks, msg
    kills: list[Kill] = []
    for point in kill_points:
        wait_counts(server.batch, job, lambda c, p=point: c["completed"] >= p and (
            c["running"] + c["preparing"]) > 0, f"{point} completed tasks with some running",
            PROGRESS_TIMEOUT_S, msg)
        k = Kill(point)
        k.left = marked(mark)
        k.going_at = time.time()
        if how == "kill":
            server.kill()
        else:
            code = server.stop()
            assert code == 0, f"serve exited {code} after SIGTERM: {server.stderr()}; {msg}"
            for name in ("service.json", "service.key"):
                assert not (home / name).exists(), f"{name} left after SIGTERM; {msg}"
            # a stopped server stops its agents, and they their tasks
            left = _wait_gone(k.left)
            assert not left, f"left running after SIGTERM: {describe(left)}; {msg}"
        k.down_at = time.time()
        k.completed_then = completed_in_store(home, job)
        kills.append(k)
        server = servers()
        k.up_at = time.time()
        # what the dead server left is gone once the next one is up
        left = _wait_gone(k.left)
        assert not left, (f"still running {GONE_TIMEOUT_S} s after the restart at "
                          f"{point}: {describe(left)}; {msg}")
    c = wait_counts(server.batch, job, lambda c: c["completed"] == c["total"],
                    "the job's end", FINISH_TIMEOUT_S, msg)
    assert c["total"] == n_tasks and c["succeeded"] == n_tasks, (c, msg)
    api_counts = c
    code = server.stop()
    assert code == 0, f"serve exited {code} after SIGTERM: {server.stderr()}; {msg}"
    left = _wait_gone(marked(mark))
    assert not left, f"left running after the last stop: {describe(left)}; {msg}"
    check(home, job, n_tasks, markers, kills, api_counts, msg)


def _wait_gone(procs: dict[int, int]) -> dict[int, int]:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    left = still_alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = still_alive(left)
    return left


@dataclass
class Run:
    attempt: int
    pid: int
    start: float
    end: float | None = None


def parse_markers(markers: Path, msg: str) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {}
    open_runs: dict[tuple[str, int, int], Run] = {}
    overlaps = []
    for line in markers.read_text().splitlines():
        parts = line.split()
        assert len(parts) == 6, f"a torn marker line {line!r}; {msg}"
        what, tid, env_tid, attempt, pid, t = parts
        assert env_tid == tid, f"HPCBATCH_TASK_ID {env_tid} in task {tid}; {msg}"
        key = (tid, int(attempt), int(pid))
        if what == "overlap":
            overlaps.append(line)
        elif what == "start":
            assert key not in open_runs, f"{line!r} twice; {msg}"
            run = open_runs[key] = Run(int(attempt), int(pid), float(t))
            runs.setdefault(tid, []).append(run)
        else:
            assert what == "end" and key in open_runs, f"{line!r} without a start; {msg}"
            open_runs[key].end = float(t)
    assert not overlaps, f"two runs of a task at once: {overlaps[:10]}; {msg}"
    return runs


TOLERANCE_S = 0.05  # the store's times (the coordinator's clock) against the markers'


def check(home: Path, job: str, n_tasks: int, markers: Path, kills: list[Kill],
          api_counts: dict[str, int], msg: str) -> None:
    runs = parse_markers(markers, msg)
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        tasks = {r[0]: r[1:] for r in db.execute(
            "SELECT id, seq, state, result, requeue_count, retry_count FROM tasks "
            "WHERE job_id = ?", (job,))}
        attempts: dict[int, dict[int, tuple]] = {}
        for seq, attempt, outcome, started, ended in db.execute(
                "SELECT a.seq, a.attempt, a.outcome, a.started_at, a.ended_at "
                "FROM task_attempts a JOIN tasks t ON t.seq = a.seq WHERE t.job_id = ?",
                (job,)):
            attempts.setdefault(seq, {})[attempt] = (outcome, started, ended)
    finally:
        db.close()

    assert len(tasks) == n_tasks, f"{len(tasks)} tasks stored of {n_tasks}; {msg}"
    assert set(runs) == set(tasks), (f"never ran: {sorted(set(tasks) - set(runs))[:10]}, "
                                     f"unknown: {sorted(set(runs) - set(tasks))[:10]}; {msg}")
    requeued: set[str] = set()
    requeue_times: list[float] = []
    for tid, (seq, state, result, requeue_count, retry_count) in tasks.items():
        att = attempts.get(seq, {})
        mine = sorted(runs[tid], key=lambda r: r.start)
        what = f"task {tid} (runs {mine}, attempts {att})"
        assert (state, result, retry_count) == ("completed", "success", 0), (
            f"{what}: {state} {result} retries {retry_count}; {msg}")
        # one success, the last attempt; every other one a requeue, each counted
        order = sorted(att)
        assert [att[a][0] for a in order] == ["requeue"] * requeue_count + ["success"], (
            f"{what}: requeue_count {requeue_count}; {msg}")
        if requeue_count:
            requeued.add(tid)
            requeue_times += [att[a][2] for a in order[:-1]]
        else:
            assert len(mine) == 1, f"{what}: never requeued, yet ran {len(mine)} times; {msg}"
        # every run is an attempt the store recorded, no attempt ran twice: in time order,
        # each run began within a later attempt than the run before it (attempt i spans
        # from the end of attempt i-1, as the store has it, to its own end: a requeued
        # one ends when the next server starts)
        i = -1
        for r in mine:
            i += 1
            while i < len(order) and r.start > att[order[i]][2] + TOLERANCE_S:
                i += 1
            assert i < len(order), f"{what}: a run the store has no attempt for; {msg}"
        assert i == len(order) - 1 and mine[-1].end is not None, (
            f"{what}: the last run is not the successful attempt, start to end; {msg}")
        # never two at once: whole runs one after the other (and the flock for all runs)
        for r1, r2 in zip(mine, mine[1:]):
            assert r1.end is None or r1.end <= r2.start, f"{what}: runs overlap; {msg}"

    assert api_counts["requeued"] == len(requeued), (api_counts, len(requeued), msg)
    assert api_counts["requeues"] == len(requeue_times), (api_counts, msg)
    # each kill's requeues: what could be in flight then (and none of what it had done)
    cap = NODES * SLOTS * (1 + DEFAULT_PREFETCH)
    for k in kills:
        during = [t for t in requeue_times if k.going_at <= t <= k.up_at]
        assert 1 <= len(during) <= cap, (f"{len(during)} requeued at the kill at "
                                         f"{k.at_completed} (tasks ran then; at most {cap} "
                                         f"can be in flight); {msg}")
        print(f"kill at {k.at_completed} completed: {len(during)} requeued, the next "
              f"server up {k.up_at - k.going_at:.1f} s later")
        for tid in k.completed_then:  # done at the kill: nothing of it after
            ended = max(e for _, _, e in attempts[tasks[tid][0]].values())
            assert ended < k.down_at, (f"{tid} completed before the kill at "
                                       f"{k.at_completed}, then requeued; {msg}")
            later = [r for r in runs[tid] if r.start > k.down_at]
            assert not later, f"{tid} completed before the kill, ran again: {later}; {msg}"


# ---------------------------------------------------------------- tests

def test_sigkill_mid_job_then_restart_loses_nothing(servers, tmp_path):
    """One SIGKILL of the server's process group in a 2,000-task job."""
    seed = _seed()
    point = random.Random(seed).randrange(200, 1800)
    run_with_faults(servers, tmp_path, n_tasks=2000, kill_points=[point], seed=seed)


@pytest.mark.slow
def test_ten_sigkills_at_random_points_of_one_job(servers, tmp_path):
    """Ten SIGKILLs of the server in one 2,000-task job, each followed by a restart."""
    seed = _seed()
    points = sorted(random.Random(seed).sample(range(50, 1950), 10))
    run_with_faults(servers, tmp_path, n_tasks=2000, kill_points=points, seed=seed)


def test_sigterm_mid_job_then_restart_resumes(servers, tmp_path):
    """SIGTERM: exit 0, nothing left running, the next start requeues and finishes."""
    seed = _seed()
    point = random.Random(seed).randrange(100, 400)
    run_with_faults(servers, tmp_path, n_tasks=600, kill_points=[point], seed=seed,
                    how="term")
