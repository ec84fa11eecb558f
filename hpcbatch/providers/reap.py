"""Kill what a gone agent left on a node: standard library only.

Used in-process for local nodes, and sent as the program of ``python3 -c`` over SSH
(its argument: the request as JSON) for remote ones, so a node needs nothing
installed beyond its python. A process is the agent's when

* its environment holds ``HPCBATCH_AGENT_TOKEN=<token>`` or its argv has the token as
  one argument (the agent itself, when it was given it), or
* it is in the process session of a task the agent started (``sessions``: the tasks'
  pids; tasks are session leaders, so Open MPI's daemons and anything that cleared its
  environment are found too), or
* it is a recorded agent pid whose argv still names the recorded node root.

Everything found gets SIGTERM and a grace to end (so mpiexec cleans up), then
SIGKILL, and the scan repeats until nothing is left or the deadline passes. The
result: how many were killed and how many are still there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

TOKEN_VAR = b"HPCBATCH_AGENT_TOKEN="


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _session_of(pid: str) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:  # fields after the ')' closing the command name: state ppid pgrp session
        return int(stat[stat.rindex(b")") + 2:].split()[3])
    except (ValueError, IndexError):
        return None


def scan(tokens: list[str], sessions: list[int], agents: list[list]) -> set[int]:
    me = os.getpid()
    toks = [t.encode() for t in tokens if t]
    env_needles = [TOKEN_VAR + t for t in toks]
    sess = {int(s) for s in sessions if int(s) > 1}
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me or _zombie(entry):
            continue
        pid = int(entry)
        if sess and _session_of(entry) in sess:
            found.add(pid)
            continue
        if toks:
            env = _read(f"/proc/{entry}/environ")
            if env is not None and any(n in env.split(b"\0") for n in env_needles):
                found.add(pid)
                continue
            cmd = _read(f"/proc/{entry}/cmdline")
            if cmd is not None and any(t in cmd.split(b"\0") for t in toks):
                found.add(pid)
    for pid, root in agents:
        cmd = _read(f"/proc/{int(pid)}/cmdline")
        if cmd is not None and int(pid) != me and not _zombie(str(pid)) and \
                str(root).encode() in cmd.split(b"\0"):
            found.add(int(pid))
    return found


def terminate(find, grace_s: float) -> set[int]:
    """SIGTERM what ``find()`` returns (again for what appears meanwhile) and wait up to
    ``grace_s`` for it to go: a launcher such as Open MPI's mpiexec removes its session
    directory and its /dev/shm segments on SIGTERM, never after a SIGKILL. Returns the
    pids signalled."""
    signalled: set[int] = set()
    end = time.monotonic() + grace_s
    while True:
        found = find()
        if not found:
            return signalled
        for pid in found - signalled:
            try:
                os.kill(pid, signal.SIGTERM)
                signalled.add(pid)
            except OSError:
                pass
        if time.monotonic() > end:
            return signalled
        time.sleep(0.02)


def reap(tokens: list[str], sessions: list[int] = (), agents: list[list] = (),
         deadline_s: float = 5.0, grace_s: float = 0.0) -> tuple[int, int]:
    """(killed, still there) after SIGKILLing everything found (first SIGTERM and up to
    ``grace_s`` to go on its own), scanning again until nothing is found or
    ``deadline_s`` has passed."""
    killed: set[int] = set()
    if grace_s > 0:
        killed |= terminate(lambda: scan(list(tokens), list(sessions), list(agents)),
                            grace_s)
    end = time.monotonic() + deadline_s
    while True:
        found = scan(list(tokens), list(sessions), list(agents))
        if not found:
            return len(killed), 0
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        if time.monotonic() > end:
            return len(killed), len(scan(list(tokens), list(sessions), list(agents)))
        time.sleep(0.05)


def _zombie(pid: str) -> bool:
    """Dead, waiting for its parent to collect it (or gone): nothing left to kill."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return True
    try:
        return stat[stat.rindex(b")") + 2:].split()[0] in (b"Z", b"X")
    except (ValueError, IndexError):
        return False


def main(argv: list[str]) -> int:
    req = json.loads(argv[1])
    killed, left = reap(req.get("tokens", []), req.get("sessions", []),
                        req.get("agents", []), float(req.get("deadline_s", 5.0)),
                        float(req.get("grace_s", 0.0)))
    print(json.dumps({"killed": killed, "left": left}))
    return 0 if left == 0 else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
