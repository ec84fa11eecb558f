#!/usr/bin/env python3
"""The hpcbatch node agent. Standard library only: it is uploaded to nodes as one file.

The coordinator starts one agent per node (a local subprocess, or over one SSH
exec channel) and speaks newline-delimited JSON with it over stdin/stdout:

coordinator -> agent  (one object per line, key "op")
    {"op": "run", "id": K, "cmd": "...", "env": {...}, "dir": TASK_DIR, "timeout_s": S|null,
     "slots": N, "files": {NAME: TEXT}, "dirs": [NAME], "log_prefix": P}
    {"op": "kill", "id": K, "reason": "terminate"}
    {"op": "reap", "match": {NAME: VALUE}}   kill every process whose environment
                                          has all of these (ranks started over ssh)
    {"op": "ping"}
    {"op": "shutdown"}

agent -> coordinator  (key "ev")
    {"ev": "hello", "node_id", "root", "pid", "hostname", "cores", "python", "protocol"}
    {"ev": "events", "items": [...]}   started / exited events, batched per loop turn
    {"ev": "heartbeat", "t", "running": [K, ...], "queued": [K, ...]}
    {"ev": "bye"}

The agent runs tasks while their slots fit in its ``--slots``; the coordinator
may send a few more than that (prefetch) and the agent queues them in order,
starting the next the moment a slot frees, so no round trip to the coordinator
sits between two tasks.

A task runs as ``/bin/sh -c CMD`` in ``TASK_DIR/wd`` with stdout and stderr in
``TASK_DIR/stdout.txt`` and ``stderr.txt``, in its own session (process group).
On timeout or kill the whole group gets SIGTERM, then SIGKILL after a grace
period; when the task's main process exits, whatever is left of its group is
killed so nothing outlives the task. If the coordinator goes away (stdin EOF)
every task is killed and the agent exits.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import time

PROTOCOL = 1
KILL_GRACE_S = 2.0


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    return json.loads(line)


# A command line with none of these characters means the same thing with or
# without a shell, so it is exec'd directly (saves a /bin/sh start per task).
SHELL_SYNTAX = frozenset("|&;<>()$`\\\"'*?[]#~=%{}!\n\t")
# shell built-ins whose meaning differs from a same-named program (or have none)
SHELL_ONLY = frozenset({"exit", "cd", "exec", "set", "unset", "export", "source", ".", "eval",
                        "trap", "ulimit", "umask", "wait", "read", "shift", "return", "alias",
                        "readonly", "local", "type", "hash", "command", "times", "jobs",
                        "break", "continue", ":"})
_which_cache: dict = {}


def command_argv(cmd: str, path: str) -> list[str]:
    """argv for a command line: direct exec when no shell syntax is involved."""
    if not SHELL_SYNTAX.isdisjoint(cmd):
        return ["/bin/sh", "-c", cmd]
    words = cmd.split(" ")
    words = [w for w in words if w]
    if not words or words[0] in SHELL_ONLY:
        return ["/bin/sh", "-c", cmd]
    key = (words[0], path)
    exe = _which_cache.get(key)
    if exe is None:
        exe = _which_cache[key] = shutil.which(words[0], path=path) or ""
    if not exe:
        return ["/bin/sh", "-c", cmd]  # let the shell report "not found" (exit 127)
    return [exe, *words[1:]]


def reap_matching(match: dict) -> list[int]:
    """SIGKILL every process (but us) whose environment holds all NAME=VALUE of ``match``."""
    if not match:
        return []
    needles = [b"\0" + f"{k}={v}".encode() + b"\0" for k, v in match.items()]
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if all(n in env for n in needles):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


def safe_name(name: str) -> str:
    """A plain file name inside the task directory (no separators, no '..')."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise OSError(f"refusing file name {name!r} outside the task directory")
    return name


class Task:
    __slots__ = ("id", "pid", "slots", "start", "deadline", "kill_at", "timed_out", "killed")

    def __init__(self, tid, pid, slots, start, timeout_s):
        self.id = tid
        self.pid = pid
        self.slots = slots
        self.start = start
        self.deadline = start + timeout_s if timeout_s else None
        self.kill_at = None  # when SIGKILL follows a SIGTERM
        self.timed_out = False
        self.killed = None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_session(sid: int, sig: int) -> None:
    """Signal a task's whole session: its process group, and the other groups a launcher
    made inside it (Open MPI puts each local rank in a group of its own)."""
    _killpg(sid, sig)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and int(fields[2]) != sid:  # session, not the main group
            try:
                os.kill(int(entry), sig)
            except OSError:
                pass


class Agent:
    def __init__(self, node_id: str, root: str, heartbeat_s: float, slots: int = 1, out=None):
        self.node_id = node_id
        self.slots = slots
        self.used = 0
        self.queued: collections.deque[dict] = collections.deque()
        self.root = os.path.abspath(os.path.expanduser(root))
        self.heartbeat_s = heartbeat_s
        self.out = out or sys.stdout.buffer
        self.tasks: dict[int, Task] = {}  # by pid
        self.by_id: dict[object, Task] = {}
        self.events: list[dict] = []
        self.inbuf = b""
        self.running = True
        self.base_env = dict(os.environ)

    # ---- output ----------------------------------------------------------

    def send(self, msg: dict) -> None:
        try:
            self.out.write(encode(msg))
            self.out.flush()
        except (BrokenPipeError, OSError):
            self.running = False

    def flush_events(self) -> None:
        if self.events:
            items, self.events = self.events, []
            self.send({"ev": "events", "items": items})

    # ---- operations ------------------------------------------------------

    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "run":
            self.queued.append(msg)
            self.start_queued()
        elif op == "kill":
            tid = msg.get("id")
            reason = msg.get("reason") or "terminate"
            task = self.by_id.get(tid)
            if task is not None:
                task.killed = reason
                self.terminate(task)
            for queued in [q for q in self.queued if q["id"] == tid]:
                self.queued.remove(queued)
                now = time.time()
                self.events.append({"ev": "exited", "id": tid, "exit_code": None,
                                    "signal": None, "timed_out": False, "killed": reason,
                                    "start": now, "end": now, "usage": {}})
        elif op == "reap":
            killed = reap_matching(msg.get("match") or {})
            self.events.append({"ev": "reaped", "match": msg.get("match"), "pids": killed})
        elif op == "ping":
            self.heartbeat()
        elif op == "shutdown":
            self.running = False
        else:
            self.events.append({"ev": "error", "message": f"unknown op {op!r}"})

    def start_queued(self) -> None:
        """Start queued tasks, in order, while their slots fit."""
        while self.queued and (self.used == 0 or
                               self.used + self.queued[0].get("slots", 1) <= self.slots):
            self.run(self.queued.popleft())

    def run(self, msg: dict) -> None:
        tid = msg["id"]
        tdir = msg["dir"]
        now = time.time()
        try:
            wd = os.path.join(tdir, "wd")
            try:
                os.mkdir(tdir)
                os.mkdir(wd)
            except OSError:  # parents missing (first task of a job) or a retry's old dirs
                os.makedirs(wd, exist_ok=True)
            env = self.base_env
            if msg.get("env"):
                env = dict(env)
                env.update(msg["env"])
            for name in msg.get("dirs") or ():
                os.makedirs(os.path.join(tdir, safe_name(name)), exist_ok=True)
            for name, text in (msg.get("files") or {}).items():
                with open(os.path.join(tdir, safe_name(name)), "w") as f:
                    f.write(text)
            argv = command_argv(msg["cmd"], env.get("PATH", os.defpath))
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            prefix = safe_name(msg["log_prefix"]) if msg.get("log_prefix") else ""
            out = os.path.join(tdir, prefix + "stdout.txt")
            err = os.path.join(tdir, prefix + "stderr.txt")
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_OPEN, 1, out, flags, 0o644),
                       (os.POSIX_SPAWN_OPEN, 2, err, flags, 0o644)]
            # posix_spawn has no cwd argument; the agent is single-threaded, so a chdir
            # around the spawn is safe. Every other fd of ours is close-on-exec.
            os.chdir(wd)
            try:
                pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
            finally:
                os.chdir(self.root)
        except OSError as exc:
            self.events.append({"ev": "exited", "id": tid, "exit_code": None, "signal": None,
                                "timed_out": False, "start_failed": str(exc),
                                "start": now, "end": time.time(), "usage": {}})
            return
        task = Task(tid, pid, msg.get("slots", 1), now, msg.get("timeout_s"))
        self.used += task.slots
        self.tasks[pid] = task
        self.by_id[tid] = task
        self.events.append({"ev": "started", "id": tid, "pid": pid, "t": now})

    def terminate(self, task: Task) -> None:
        if task.kill_at is None:
            signal_session(task.pid, signal.SIGTERM)
            task.kill_at = time.time() + KILL_GRACE_S

    def reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.tasks.pop(pid, None)
            if task is None:
                continue
            self.by_id.pop(task.id, None)
            self.used -= task.slots
            # nothing of the task outlives it (a killed one: not even in other groups)
            if task.kill_at is not None:
                signal_session(pid, signal.SIGKILL)
            else:
                _killpg(pid, signal.SIGKILL)
            code = os.waitstatus_to_exitcode(status)
            self.events.append({
                "ev": "exited", "id": task.id,
                "exit_code": code if code >= 0 else None,
                "signal": -code if code < 0 else None,
                "timed_out": task.timed_out, "killed": task.killed,
                "start": task.start, "end": time.time(),
                "usage": {"utime_s": round(ru.ru_utime, 6), "stime_s": round(ru.ru_stime, 6),
                          "maxrss_kb": ru.ru_maxrss},
            })
            self.start_queued()

    def check_deadlines(self, now: float) -> float | None:
        """Enforce wall-clock limits; return the next time something is due."""
        nxt = None
        for task in self.tasks.values():
            if task.deadline is not None and task.kill_at is None and now >= task.deadline:
                task.timed_out = True
                self.terminate(task)
            if task.kill_at is not None and now >= task.kill_at:
                signal_session(task.pid, signal.SIGKILL)
                task.kill_at = now + KILL_GRACE_S
            for t in (task.deadline if task.kill_at is None else None, task.kill_at):
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
        return nxt

    def heartbeat(self) -> None:
        self.flush_events()
        self.send({"ev": "heartbeat", "t": time.time(),
                   "running": [t.id for t in self.tasks.values()],
                   "queued": [q["id"] for q in self.queued]})

    def kill_all(self) -> None:
        self.queued.clear()
        for task in list(self.tasks.values()):
            task.kill_at = task.kill_at or time.time()
            signal_session(task.pid, signal.SIGKILL)
        deadline = time.time() + 5
        while self.tasks and time.time() < deadline:
            self.reap()
            if self.tasks:
                time.sleep(0.01)

    # ---- main loop -------------------------------------------------------

    def serve(self, inp_fd: int) -> None:
        os.makedirs(os.path.join(self.root, "shared"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "jobs"), exist_ok=True)
        os.chdir(self.root)
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when we stop
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        sel = selectors.DefaultSelector()
        sel.register(inp_fd, selectors.EVENT_READ, "in")
        sel.register(rfd, selectors.EVENT_READ, "sig")
        self.send({"ev": "hello", "node_id": self.node_id, "root": self.root,
                   "pid": os.getpid(), "hostname": socket.gethostname(), "slots": self.slots,
                   "cores": os.cpu_count(), "python": sys.executable, "protocol": PROTOCOL})
        next_hb = time.time() + self.heartbeat_s
        while self.running:
            now = time.time()
            due = self.check_deadlines(now)
            wait = next_hb - now
            if due is not None:
                wait = min(wait, due - now)
            for key, _ in sel.select(max(wait, 0)):
                if key.data == "sig":
                    try:
                        while os.read(rfd, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                chunk = os.read(inp_fd, 1 << 16)
                if not chunk:
                    self.running = False
                    break
                self.inbuf += chunk
                *lines, self.inbuf = self.inbuf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.handle(decode(line))
            self.reap()
            if time.time() >= next_hb:
                self.heartbeat()
                next_hb = time.time() + self.heartbeat_s
            self.flush_events()
        self.kill_all()
        self.flush_events()
        self.send({"ev": "bye"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hpcbatch node agent (speaks JSON lines on stdio)")
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--root", required=True, help="node root directory (task dirs live here)")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--slots", type=int, default=os.cpu_count() or 1,
                    help="task slots: tasks beyond them wait in the agent's queue")
    args = ap.parse_args(argv)
    Agent(args.node_id, args.root, args.heartbeat_s, args.slots).serve(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
