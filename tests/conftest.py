"""Fixtures for every test module.

* ``home``        a fresh HPCBATCH_HOME under the test's tmp_path (with a space in it)
* ``cli``         the CLI in a subprocess on that home
* ``batch``       an embedded ``hpcbatch.Batch`` on that home with FAST timings, closed
                  after the test; ``make_batch(**kw)`` makes more (other ``local_slots``,
                  ``prefetch``, or other timings: a test that needs the production clocks
                  passes ``timings=Timings()`` and says why)
* an autouse check that the test left no process behind (see ``_no_process_left``)

Markers: ``ssh`` (needs real sshd nodes; put on every test that uses a cluster fixture
of tests/conftest_ssh.py automatically, skipped where sshd is missing) and ``slow``
(long end-to-end tests): ``pytest -m "not slow"`` is the fast tier.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import FAST_TIMINGS, run_cli, unavailable

import hpcbatch
from hpcbatch.launch import cluster as cluster_tool
from hpcbatch.launch.agent import protected_processes as agent_protected

pytest_plugins = ["conftest_ssh", "conftest_slurm"]  # real sshd / Slurm node fixtures

# fixtures whose use means the test needs sshd nodes (tests/conftest_ssh.py)
SSH_FIXTURES = {"ssh_cluster", "ssh_targets", "ssh_connect", "make_cluster", "ssh_provider"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HPCBATCH_HOME (with a space in its path, on purpose)."""
    h = tmp_path / "hpc home"
    monkeypatch.setenv("HPCBATCH_HOME", str(h))
    return h


@pytest.fixture
def cli(home):
    def call(*args: str, **kw):
        return run_cli(home, *args, **kw)
    return call


@pytest.fixture
def make_batch(home):
    """make_batch(**kw): hpcbatch.Batch(home, **FAST_TIMINGS, **kw), closed after the test.
    ``timings=...`` replaces FAST_TIMINGS as a whole (e.g. ``Timings()``: production)."""
    made: list[hpcbatch.Batch] = []

    def make(**kw) -> hpcbatch.Batch:
        if "timings" not in kw:
            kw = {**FAST_TIMINGS, **kw}
        b = hpcbatch.Batch(home, **kw)
        made.append(b)
        return b

    yield make
    for b in reversed(made):
        b.close()


@pytest.fixture
def batch(make_batch) -> hpcbatch.Batch:
    """An embedded Batch on ``home`` with FAST_TIMINGS."""
    return make_batch()


# ---------------------------------------------------------------- markers

def pytest_collection_modifyitems(config, items):
    no_sshd = None
    for item in items:
        if SSH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ssh)
        if item.get_closest_marker("ssh"):
            if no_sshd is None:
                no_sshd = unavailable(cluster_tool.check_sshd) or ""
            if no_sshd:
                item.add_marker(pytest.mark.skip(reason=f"{no_sshd} (scripts/test.sh "
                                                 "installs them)"))


# ---------------------------------------------------------------- no process left behind
#
# At the end of each test, the processes the test started and left running: those that
# were not there when the test began and either descend from this pytest process or name the
# test's tmp_path (in an environment value, e.g. HPCBATCH_HOME, HPCBATCH_TASK_DIR or
# TMPDIR, or in an argument: an agent's --root, an sshd's -f), with whatever shares
# their sessions or runs under them (mpiexec, prted, hydra, a task's children) and every
# holder of their agent tokens. They get LEAK_GRACE_S to end on their own (agents and
# sshd sessions end a moment after their channel closes); then they are killed and the
# test fails naming them. /proc is read once per test (a listdir when it starts; at the
# end the stat of every process, environ and cmdline only of the new ones). Session-
# and module-scoped clusters were started before the test began, so they are not the
# test's; their fixtures check them when they end, and the session's end checks all.

LEAK_GRACE_S = 3.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_TOKEN = b"HPCBATCH_AGENT_TOKEN="


def _uptime_ticks() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * _CLK_TCK


def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, sid, start time in ticks, state) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[3]), int(fields[19]), fields[0].decode()


def _read(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def processes_left(before: tuple[set[int], float], needles: list[bytes]) -> dict[int, int]:
    """{pid: start time} of the live processes that started since ``before`` (the pids
    then and the time in clock ticks, from ``_now()``) and belong to this test (see
    above); ``needles``: the test's tmp paths, as bytes."""
    old_pids, since_ticks = before
    procs: dict[int, tuple[int, int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            # new: a pid not there before (or reused: started a whole tick later)
            if st is not None and st[3] not in "ZX" and (
                    int(entry.name) not in old_pids or st[2] > since_ticks + 1):
                procs[int(entry.name)] = st
    protected, protected_sids = agent_protected()
    for pid in protected:
        procs.pop(pid, None)
    if not procs:
        return {}
    me = os.getpid()
    ours: set[int] = set()
    tokens: set[bytes] = set()
    environ: dict[int, bytes] = {}
    for pid, (ppid, _sid, _start, _state) in procs.items():
        env = environ[pid] = b"\0" + _read(pid, "environ")
        if ppid == me or any(n in env or n in _read(pid, "cmdline") for n in needles):
            ours.add(pid)
    # ... with what runs under them, in their sessions, or holds their agent tokens
    for pid in ours:
        env = environ[pid]
        at = env.find(b"\0" + _TOKEN)
        end = env.find(b"\0", at + 1)
        if at >= 0 and end > at + 1 + len(_TOKEN):  # (an empty token names nobody)
            tokens.add(env[at + 1:end])
    changed = True
    while changed:
        changed = False
        sids = {procs[p][1] for p in ours} - protected_sids
        for pid, (ppid, sid, _start, _state) in procs.items():
            if pid not in ours and (ppid in ours or sid in sids or any(
                    b"\0" + t + b"\0" in environ[pid] + b"\0" for t in tokens)):
                ours.add(pid)
                changed = True
    return {pid: procs[pid][2] for pid in ours}


def _describe(pid: int) -> str:
    cmd = _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
    return f"{pid} ({cmd[:400] or '?'})"


def _still_there(pids: dict[int, int]) -> dict[int, int]:
    out = {}
    for pid, start in pids.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[3] not in "ZX":
            out[pid] = start
    return out


def _kill(pids: dict[int, int]) -> None:
    """Stop them all first (none forks an escapee meanwhile), then SIGKILL them."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in _still_there(pids):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    deadline = time.monotonic() + 5
    while _still_there(pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _now() -> tuple[set[int], float]:
    """What processes_left counts from: the pids there now (a listdir, no reads) and
    the time in clock ticks (a process's start time has only that resolution)."""
    return _pids(), _uptime_ticks()


def check_no_process_left(before: tuple[set[int], float], needles: list[bytes],
                          what: str) -> None:
    """Give the test's leftovers LEAK_GRACE_S to end, then kill them and fail."""
    left = processes_left(before, needles)
    deadline = time.monotonic() + LEAK_GRACE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = _still_there(left)
    if left:  # once more in full: whatever they started meanwhile goes too
        left = processes_left(before, needles)
    if not left:
        return
    described = [_describe(pid) for pid in sorted(left)]
    _kill(left)
    pytest.fail(f"{what} left {len(described)} process(es) running {LEAK_GRACE_S:g} s after "
                f"it ended (now killed): " + "; ".join(described), pytrace=False)


@pytest.fixture(autouse=True)
def _no_process_left(tmp_path, request):
    """Fail a test that leaves an agent, task, sshd or MPI process behind (see above).
    Autouse and set up before the test's other fixtures, so it checks after their
    teardown (a Batch closed, a cluster taken down)."""
    before = _now()
    yield
    check_no_process_left(before, [os.fsencode(tmp_path) + b"/", os.fsencode(tmp_path) + b"\0"],
                          f"test {request.node.nodeid}")


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_at_session_end(tmp_path_factory):
    """What session- and module-scoped fixtures started must be gone at the end too."""
    before = _now()
    yield
    base = os.fsencode(tmp_path_factory.getbasetemp())
    check_no_process_left(before, [base + b"/", base + b"\0"], "the test session")
