#!/usr/bin/env python3
"""The hpcbatch node agent. Standard library only: uploaded to nodes with protocol.py.

The coordinator starts one agent per node (a local subprocess in its own session, or
over one SSH exec channel) and speaks the protocol of ``protocol.py`` with it over
stdin/stdout: newline-delimited JSON, ``{"op": ...}`` in, ``{"ev": ...}`` out. A line
the agent cannot read is logged to stderr and answered with an ``Error`` item; it never
stops the agent.

The agent runs tasks while their slots fit in its ``--slots``; the coordinator may send
a few more than that (prefetch) and the agent queues them in order, starting the next
the moment a slot frees, so no round trip to the coordinator sits between two tasks.

A task runs as ``/bin/sh -c CMD`` (or a direct exec when the line has no shell syntax)
in ``TASK_DIR/wd``, stdout and stderr in ``TASK_DIR/stdout.txt`` and ``stderr.txt``, in
a session of its own, with ``TMPDIR`` (and the session directory bases of Open MPI and
PRRTE) in ``TASK_DIR/tmp``, which is removed when the attempt ends. Nothing in a task
directory is followed through a symbolic link: directories are opened with O_NOFOLLOW
from the node root down (made 0700), and the logs and ``files`` are created afresh
(an old file or link of that name is removed first, never written through). Anything
that stops one task from starting (a NUL byte in its environment, a missing directory,
a full disk) is that task's failure (``Exited.start_failed``), never the agent's.

On timeout or Kill the task's whole session (and processes under it in other
sessions) gets SIGTERM, then SIGKILL after ``--kill-grace-s``; when a task's main
process exits, whatever is left of its process group is killed.

Fencing: with ``--lease-s`` > 0, every line from the coordinator (``Ping`` included)
renews a lease; when none came for that long, the agent stops every task (SIGTERM,
SIGKILL after the grace), reports, and exits, so a coordinator that lost the node can
run its tasks elsewhere once the lease has surely run out. stdin EOF, ``Shutdown`` and
SIGTERM stop the tasks the same way. SIGHUP and SIGINT are ignored: the coordinator
decides when the agent stops.

Orphan records: the agent keeps ``ROOT/agents/TOKEN.json`` (0600, replaced atomically)
naming its pid and the pid, session and start time of each task it runs, and removes it
on a clean exit. ``reap_stale_agents(root)`` (run at start with ``--reap-stale``) kills
what agents that left a record behind still run: the agent itself, its tasks' sessions
(checked by process start time, so a reused pid is never hit), and every process whose
environment holds ``HPCBATCH_AGENT_TOKEN=<its token>``; the tasks get SIGTERM and the
kill grace first, so an mpiexec among them removes its session directory and /dev/shm
segments.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import json
import math
import os
import re
import selectors
import shutil
import signal
import sys
import time


def _load_protocol():
    """protocol.py beside this file: ``hpcbatch.launch.protocol`` when imported from the
    package, else (run as a script on a node) loaded from this file's own directory by
    path, so neither a stale hpcbatch nor another ``protocol`` module on the node's
    sys.path can stand in for the copy uploaded with this agent."""
    if __package__:
        from . import protocol
        return protocol
    import importlib.util
    name = "_hpcbatch_agent_protocol"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocol.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}: upload protocol.py beside agent.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


P = _load_protocol()

KILL_GRACE_S = 2.0
MPI_PREFIX_ENV = "HPCBATCH_MPI_PREFIX"  # (hpcbatch.env.MPI_PREFIX; the agent knows no env.py)
TASK_SHARED_DIR_ENV = "HPCBATCH_TASK_SHARED_DIR"  # (hpcbatch.env.TASK_SHARED_DIR)
APP_MARKER = ".hpcbatch-app.json"  # (appunpack.MARKER): a package unpacked in full
RECORD_EVERY_S = 0.2  # the agent's record is rewritten at most this often
CLK_TCK = os.sysconf("SC_CLK_TCK")
# a task's leader started within this of when the agent spawned it (the record keeps
# the spawn time, read from CLOCK_BOOTTIME: /proc's start times count from boot too)
START_SLACK_S = 1.0
OUT_LIMIT = 256 << 20  # bytes of unread output: past this the coordinator is gone
TOKEN_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
# where Open MPI / PRRTE put their session directories, for a task's mpiexec (the local
# ones: a remote daemon has no such path; it follows its own node's TMPDIR)
TMPDIR_VARS = ("TMPDIR", "PRTE_MCA_prte_local_tmpdir_base", "OMPI_MCA_orte_local_tmpdir_base")
# ignored by the agent (or by Python) and inherited through exec unless reset
RESET_SIGNALS = tuple(s for s in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE,
                                  getattr(signal, "SIGXFSZ", None)) if s is not None)

# A command line with none of these characters means the same thing with or
# without a shell, so it is exec'd directly (saves a /bin/sh start per task).
SHELL_SYNTAX = frozenset("|&;<>()$`\\\"'*?[]#~=%{}!\n\t")
# shell built-ins whose meaning differs from a same-named program (or have none)
SHELL_ONLY = frozenset({"exit", "cd", "exec", "set", "unset", "export", "source", ".", "eval",
                        "trap", "ulimit", "umask", "wait", "read", "shift", "return", "alias",
                        "readonly", "local", "type", "hash", "command", "times", "jobs",
                        "break", "continue", ":"})
_which_cache: dict = {}
WHICH_CACHE_MAX = 1024  # (multi-instance runs each have a PATH of their own)


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
        if len(_which_cache) >= WHICH_CACHE_MAX:
            _which_cache.clear()
        exe = _which_cache[key] = shutil.which(words[0], path=path) or ""
    if not exe:
        return ["/bin/sh", "-c", cmd]  # let the shell report "not found" (exit 127)
    return [exe, *words[1:]]


def safe_name(name: str) -> str:
    """A plain file name inside the task directory (no separators, no '..')."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise OSError(f"refusing file name {name!r} outside the task directory")
    return name


def log(text: str) -> None:
    try:
        sys.stderr.write(f"hpcbatch-agent[{os.getpid()}]: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# ---- processes (/proc) ---------------------------------------------------------------

def _stat(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat fields from the state on (field 3): state ppid pgrp session ..."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def proc_start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot); None when it is gone or a
    zombie. A pid with another start time is another process (the pid was reused)."""
    fields = _stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _procs() -> list[tuple[int, int, int, int]]:
    """(pid, ppid, session, start time) of every live (non-zombie) process."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(entry)
            if f is not None and f[0] not in (b"Z", b"X"):
                out.append((int(entry), int(f[1]), int(f[3]), int(f[19])))
    return out


def protected_processes() -> tuple[set[int], set[int]]:
    """(pids, sessions) never signalled: this process, its ancestors, their sessions
    (the tests' leak check uses the same rule)."""
    pids, sessions = set(), set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        f = _stat(pid)
        if f is None:
            break
        sessions.add(int(f[3]))
        pid = int(f[1])
    pids.add(1)
    sessions.update((0, 1))
    return pids, sessions


def _with_descendants(procs, chosen: set[int]) -> set[int]:
    """chosen plus every process under one of them (a task's child that made a session
    of its own is still in its process tree)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _sid, _start in procs:
        children.setdefault(ppid, []).append(pid)
    out, todo = set(chosen), list(chosen)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _signal_all(pids, sig: int) -> list[int]:
    hit = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except OSError:
            pass
    return hit


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def session_members(sessions: set[int], procs=None) -> set[int]:
    """Every process of these sessions and every process under one of them."""
    procs = _procs() if procs is None else procs
    bad_pids, bad_sessions = protected_processes()
    sessions = sessions - bad_sessions
    chosen = {pid for pid, _ppid, sid, _start in procs if sid in sessions}
    return _with_descendants(procs, chosen) - bad_pids


def signal_session(sid: int, sig: int) -> list[int]:
    """Signal a task's whole session: its process group, the other groups a launcher
    made inside it (Open MPI puts each local rank in a group of its own), and the
    processes under them that started sessions of their own."""
    if sid <= 1 or sid == os.getsid(0):
        return []
    members = session_members({sid})
    _killpg(sid, sig)  # the main group at once (its shell must not see its child die first)
    _signal_all(members, sig)
    return sorted(members)


SHM_DIR = "/dev/shm"


def shm_files_of(pids) -> set[str]:
    """The files under /dev/shm these processes have mapped (Open MPI's sm segments,
    MPICH's shm): a killed rank never unlinks them, so the agent does once they are gone."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.rstrip("\n").split(None, 5)[-1]
                    if path.startswith(SHM_DIR + "/"):
                        found.add(path.removesuffix(" (deleted)"))
        except (OSError, IndexError):
            continue
    return found


def remove_shm_files(paths) -> None:
    """Unlink those of ``paths`` still there and ours (nothing outside /dev/shm)."""
    uid = os.getuid()
    for path in paths:
        if os.path.dirname(path) != SHM_DIR:
            continue
        try:
            if os.lstat(path).st_uid == uid:
                os.unlink(path)
        except OSError:
            pass


def _env_matches(procs, needles: list[bytes]) -> set[int]:
    found = set()
    for pid, _ppid, _sid, _start in procs:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if all(n in env for n in needles):
            found.add(pid)
    return found


def _needles(match: dict) -> list[bytes]:
    return [b"\0" + f"{k}={v}".encode() + b"\0" for k, v in match.items()]


def reap_matching(match: dict) -> list[int]:
    """SIGKILL every process whose environment holds all NAME=VALUE of ``match`` (the
    ranks Open MPI or Hydra started over ssh carry the task's HPCBATCH_* variables),
    with the rest of their sessions and the processes under them: Open MPI's ``prted``
    carries none of the variables but shares the session sshd made for it."""
    if not match:
        return []
    procs = _procs()
    found = _env_matches(procs, _needles(match))
    sids = {sid for pid, _ppid, sid, _start in procs if pid in found}
    bad_pids, _ = protected_processes()
    targets = (found - bad_pids) | session_members(sids, procs)
    return sorted(_signal_all(targets, signal.SIGKILL))


def reap_sessions(sessions) -> list[int]:
    """SIGKILL every process of these sessions (and under them)."""
    sids = {int(s) for s in sessions if int(s) > 1}
    if not sids:
        return []
    members = session_members(sids)
    for sid in sids - protected_processes()[1]:
        _killpg(sid, signal.SIGKILL)
    _signal_all(members, signal.SIGKILL)
    return sorted(members)


# ---- files in the node root: no symbolic links followed ---------------------------------

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


_umask: list[int] = []


def _umask_strips(mode: int) -> bool:
    """Whether the umask takes bits off ``mode`` (then a made directory is chmod-ed).
    Read from /proc (setting the umask to read it would race other threads)."""
    if not _umask:
        try:
            with open("/proc/self/status") as f:
                _umask.append(next(int(line.split()[1], 8) for line in f
                                   if line.startswith("Umask:")))
        except (OSError, StopIteration, ValueError, IndexError):
            _umask.append(0o777)  # unknown: always chmod
    return bool(mode & _umask[0])


def make_dir_at(dir_fd: int, name: str, where: str, mode: int = 0o700) -> tuple[int, bool]:
    """Open (making it, with exactly ``mode``) the directory ``name`` inside dir_fd; a
    symbolic link (or anything not a directory) there is refused. Returns (its fd,
    whether it was made just now)."""
    created = False
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(name, O_DIR | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, f"refusing {os.path.join(where, name)}: it is a "
                          "symbolic link or not a directory (task directories must be "
                          "real directories)") from None
        raise
    if created and _umask_strips(mode):
        os.fchmod(fd, mode)  # not the umask's idea of it
    return fd, created


def mkdir_at(dir_fd: int, name: str, where: str, mode: int = 0o700) -> int:
    return make_dir_at(dir_fd, name, where, mode)[0]


def new_dir_at(dir_fd: int, name: str, mode: int = 0o700) -> None:
    """Make the directory ``name`` (FileExistsError when something has the name)."""
    os.mkdir(name, mode, dir_fd=dir_fd)
    if _umask_strips(mode):
        os.chmod(name, mode, dir_fd=dir_fd)


def create_at(dir_fd: int, name: str, mode: int = 0o644, fresh: bool = False) -> int:
    """A fresh file ``name`` in dir_fd, open for writing: whatever had the name (an old
    file, a symbolic link planted there) is unlinked first, never written through.
    ``fresh``: the directory was just made, nothing can be there."""
    if not fresh:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise OSError(errno.EISDIR, f"refusing to replace the directory {name!r}") \
                from None
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   mode, dir_fd=dir_fd)


def open_dirs(root: str, path: str) -> int:
    """fd of directory ``path``, made as needed. Below the node root every component is
    made 0700 and opened without following links; a path outside the root (a test's)
    gets its parents as they are and only its last component checked."""
    path = os.path.normpath(os.path.join(root, path))
    rel = os.path.relpath(path, root)
    if rel == "." or rel == ".." or rel.startswith(".." + os.sep):
        if rel == ".":
            raise OSError(errno.EINVAL, f"refusing the node root {root} as a task directory")
        base, parts = os.path.dirname(path), [os.path.basename(path)]
        os.makedirs(base, mode=0o700, exist_ok=True)
    else:
        base, parts = root, rel.split(os.sep)
    fd = os.open(base, O_DIR)
    try:
        where = base
        for part in parts:
            nfd = mkdir_at(fd, part, where)
            os.close(fd)
            fd, where = nfd, os.path.join(where, part)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir_below(base: str, path: str) -> int:
    """open_dirs, where ``path`` may be ``base`` itself."""
    if os.path.normpath(path) == os.path.normpath(base):
        return os.open(base, O_DIR)
    return open_dirs(base, path)


def remove_tree(path: str) -> None:
    """Remove a directory tree; a symbolic link in its place is unlinked, not followed."""
    try:
        os.rmdir(path)  # the common case: an empty TMPDIR
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    if os.path.islink(path):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---- orphan records -------------------------------------------------------------------

def record_dir(root: str) -> str:
    return os.path.join(root, "agents")


def write_record(root: str, token: str, record: dict) -> None:
    """ROOT/agents/TOKEN.json, 0600, replaced atomically (no reader sees half of it)."""
    d = record_dir(root)
    path = os.path.join(d, token + ".json")
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, json.dumps(record, separators=(",", ":")).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_record(root: str, token: str) -> None:
    try:
        os.unlink(os.path.join(record_dir(root), token + ".json"))
    except FileNotFoundError:
        pass


def _read_record(path: str) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            rec = json.loads(f.read())
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _wait_gone(pids, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    pids = list(pids)
    while pids and time.monotonic() < end:
        pids = [p for p in pids if proc_start_time(p) is not None]
        if pids:
            time.sleep(0.01)


def _terminate(find, grace_s: float) -> list[int]:
    """SIGTERM what ``find()`` returns (and what appears meanwhile); wait up to
    ``grace_s`` for it to go. Returns the pids signalled."""
    signalled: set[int] = set()
    end = time.monotonic() + grace_s
    while True:
        found = find()
        if not found or time.monotonic() > end:
            return sorted(signalled)
        signalled.update(_signal_all(found - signalled, signal.SIGTERM))
        time.sleep(0.02)


def _stale_targets(records: list[tuple[str, dict | None]], me: str) -> set[int]:
    """Processes the agents of these records (token, record) left behind."""
    procs = _procs()
    live = {pid: start / CLK_TCK for pid, _ppid, _sid, start in procs}  # s after boot
    sessions: dict[int, float] = {}  # task session -> when its leader was spawned
    targets: set[int] = set()
    needles = []
    for token, rec in records:
        needles.append(_needles({P.AGENT_TOKEN_ENV: token}))
        if rec is None or rec.get("boot") != me:
            continue  # unreadable, or written before the machine rebooted: nothing runs
        tasks = rec.get("tasks")
        for t in tasks if isinstance(tasks, list) else ():
            try:
                sid, spawned = int(t["sid"]), float(t["spawned"])
            except (KeyError, TypeError, ValueError):
                continue
            lead = live.get(sid)
            # the leader itself (it started when it was spawned), or no process has its
            # pid (then none can have taken its session id either)
            if lead is None or abs(lead - spawned) <= START_SLACK_S:
                sessions[sid] = spawned
    # a session whose leader is gone: only processes started after the task was
    chosen = {pid for pid, _ppid, sid, start in procs
              if sid in sessions and (sid in live or
                                      start / CLK_TCK >= sessions[sid] - START_SLACK_S)}
    targets |= _with_descendants(procs, chosen)
    for n in needles:
        targets |= _env_matches(procs, n)
    bad_pids, _ = protected_processes()
    return targets - bad_pids


def reap_stale_agents(root: str, *, keep: str = "", only: str | None = None,
                      deadline_s: float = 5.0, grace_s: float = 0.0) -> list[int]:
    """Kill what agents of this node root left behind, going by their records in
    ROOT/agents/: the agent (when its pid still has the recorded start time), the
    sessions of its tasks (the same check), everything under them, and every process
    whose environment holds its token. Then remove the records. ``keep``: the token of
    a record to leave alone (the calling agent's own); ``only``: reap just that token.
    The agents get SIGKILL at once (they start nothing more); their tasks SIGTERM first
    and ``grace_s`` to end (mpiexec then removes its session directory and /dev/shm
    segments), then SIGKILL. Returns the pids signalled. Scans again until nothing is
    found or ``deadline_s``."""
    root = os.path.abspath(os.path.expanduser(root))
    d = record_dir(root)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    me = boot_id()
    records: list[tuple[str, str, dict | None]] = []
    for name in sorted(names):
        if not name.endswith(".json"):
            continue
        token = name[:-len(".json")]
        if token == keep or (only is not None and token != only) or \
                not TOKEN_RE.fullmatch(token):
            continue
        path = os.path.join(d, name)
        records.append((token, path, _read_record(path)))
    if not records:
        return []
    killed: list[int] = []
    agents: list[int] = []
    protected = protected_processes()[0]
    for _token, _path, rec in records:  # the agents first, so they start nothing more
        try:
            pid, start = int(rec["pid"]), int(rec["start"])
        except (KeyError, TypeError, ValueError):
            continue
        if rec.get("boot") == me and pid not in protected and proc_start_time(pid) == start:
            agents += _signal_all([pid], signal.SIGKILL)
    _wait_gone(agents, 2.0)
    killed += agents
    pairs = [(token, rec) for token, _path, rec in records]
    if grace_s > 0:
        killed += _terminate(lambda: _stale_targets(pairs, me), grace_s)
    end = time.monotonic() + deadline_s
    while True:
        found = _stale_targets(pairs, me)
        if not found:
            break
        hit = _signal_all(found, signal.SIGKILL)
        killed += hit
        _wait_gone(hit, 0.5)
        if time.monotonic() > end:
            log(f"processes {sorted(found)} of stale agents outlived SIGKILL for "
                f"{deadline_s:g} s; their records stay in {d}")
            return sorted(set(killed))
    for _token, path, _rec in records:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    for name in names:  # temporary files of writers that are gone
        m = re.fullmatch(r".+\.json\.tmp-(\d+)", name)
        if m and proc_start_time(int(m.group(1))) is None:
            try:
                os.unlink(os.path.join(d, name))
            except OSError:
                pass
    return sorted(set(killed))


# ---- the agent ------------------------------------------------------------------------

class Task:
    __slots__ = ("id", "pid", "spawned", "slots", "start", "deadline", "kill_at",
                 "timed_out", "killed", "tmp", "shm", "err")

    def __init__(self, tid, pid, slots, start, timeout_s, tmp, spawned):
        self.id = tid
        self.pid = pid  # also its session id and process group id
        self.spawned = spawned  # CLOCK_BOOTTIME at the spawn (reading /proc then is slow)
        self.slots = slots
        self.start = start  # wall clock, for the report
        now = time.monotonic()
        self.deadline = now + timeout_s if timeout_s else None
        self.kill_at = None  # (monotonic) when SIGKILL follows a SIGTERM
        self.timed_out = False
        self.killed = None
        self.tmp = tmp
        self.shm: set[str] = set()  # /dev/shm files its processes had mapped when killed
        self.err = None  # a prefixed run's stderr file: its tail is reported if it fails


STDERR_TAIL = 400  # bytes of a failed coordination command's stderr its Exited carries


def tail_of(path: str) -> str | None:
    """The last STDERR_TAIL bytes of a file, as text (None: unreadable or empty)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - STDERR_TAIL), os.SEEK_SET)
        data = os.read(fd, STDERR_TAIL)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data.decode(errors="replace") or None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Agent:
    def __init__(self, node_id: str, root: str, heartbeat_s: float = 1.0, slots: int = 1, *,
                 token: str = "", lease_s: float = 0.0, kill_grace_s: float = KILL_GRACE_S,
                 reap_stale: bool = False, out_fd: int = 1, mpi_prefix: str = ""):
        self.node_id = node_id
        self.mpi_prefix = mpi_prefix
        self.slots = slots
        self.used = 0
        self.queued: collections.deque = collections.deque()
        self.root = os.path.abspath(os.path.expanduser(root))
        self.heartbeat_s = heartbeat_s
        self.token = token or os.urandom(8).hex()  # (what secrets.token_hex does)
        if not TOKEN_RE.fullmatch(self.token):
            raise ValueError(f"agent token {self.token!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        self.lease_s = lease_s
        self.kill_grace_s = kill_grace_s
        self.reap_stale = reap_stale
        self.out_fd = out_fd
        self.outbuf = bytearray()
        self.tasks: dict[int, Task] = {}  # by pid
        self.by_id: dict[object, Task] = {}
        self.events: list = []
        self.inbuf = b""
        self.running = True
        self.stopping = False
        self.stop_reason = P.KILLED_SHUTDOWN
        # inside a Slurm job step, a task killed by a signal the agent did not send is
        # reported a moment late: when Slurm ends the allocation, it signals the tasks
        # and the agent together, and those tasks were stopped with the agent (requeued),
        # not failed
        self.hold_s = 1.0 if os.environ.get("SLURM_STEP_ID") else 0.0
        self.held: list = []  # (report at, Exited)
        self.dirty = True  # the record needs writing
        self.record_due = 0.0
        self.record_failed = False
        self.base_env = dict(os.environ)
        self.base_env.pop(P.AGENT_TOKEN_ENV, None)
        self.boot = boot_id()
        self.root_fd = -1
        self.pstart = proc_start_time(os.getpid())
        self.dir_fds: dict[str, int] = {}  # kept parents of task directories
        # application packages: unpacked ones (their directories), unpackers running
        # (pid -> directory, stderr file), and runs waiting for them
        self.apps_done: set[str] = set()
        self.installs: dict[int, tuple[str, str]] = {}
        self.app_wait: list = []

    # ---- output ----------------------------------------------------------

    def send(self, msg) -> None:
        if self.out_fd < 0:
            return
        self.outbuf += P.encode(msg)
        self.flush_out()
        if len(self.outbuf) > OUT_LIMIT:
            self.coordinator_gone(f"{len(self.outbuf)} bytes of output unread")

    def flush_out(self) -> None:
        while self.outbuf and self.out_fd >= 0:
            try:
                n = os.write(self.out_fd, self.outbuf)
            except BlockingIOError:
                return
            except OSError as exc:  # EPIPE: nobody reads us any more
                self.outbuf.clear()
                self.out_fd = -1
                self.coordinator_gone(f"output closed ({exc.strerror})")
                return
            del self.outbuf[:n]

    def drain_out(self, timeout_s: float) -> None:
        """Last words: wait (bounded) for the coordinator to take what is buffered."""
        end = time.monotonic() + timeout_s
        while self.outbuf and self.out_fd >= 0 and time.monotonic() < end:
            sel = selectors.DefaultSelector()
            try:
                sel.register(self.out_fd, selectors.EVENT_WRITE)
                sel.select(max(end - time.monotonic(), 0))
            except (OSError, ValueError):
                return
            finally:
                sel.close()
            self.flush_out()

    def coordinator_gone(self, why: str) -> None:
        if self.running:
            log(f"node {self.node_id}: {why}; stopping every task")
        self.running = False

    def flush_events(self) -> None:
        if self.events:
            items, self.events = self.events, []
            self.send(P.Events(tuple(items)))

    # ---- operations ------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        try:
            msg = P.decode_op(line)
        except P.ProtocolError as exc:
            log(f"node {self.node_id}: skipped a line: {exc}")
            self.events.append(P.Error(message=f"agent skipped a line: {exc}"))
            return
        self.handle(msg)

    def handle(self, msg) -> None:
        kind = type(msg)
        if kind is P.Run:
            if msg.apps:  # held until its packages are unpacked (or fails if they cannot be)
                self.app_wait.append(msg)
                if not self.apps_ready(msg):
                    return
                self.app_wait.remove(msg)
            self.queued.append(msg)
            self.start_queued()
        elif kind is P.Ping:
            pass  # every line renews the lease
        elif kind is P.Kill:
            task = self.by_id.get(msg.id)
            if task is not None:
                task.killed = msg.reason
                self.terminate(task)
            for queued in [q for q in self.queued if q.id == msg.id] + \
                    [q for q in self.app_wait if q.id == msg.id]:
                if queued in self.app_wait:
                    self.app_wait.remove(queued)
                else:
                    self.queued.remove(queued)
                now = time.time()
                self.events.append(P.Exited(id=msg.id, exit_code=None, killed=msg.reason,
                                            start=now, end=now))
        elif kind is P.Reap:
            pids = reap_matching(msg.match) + reap_sessions(msg.sessions)
            self.events.append(P.Reaped(match=msg.match, pids=tuple(sorted(set(pids)))))
        elif kind is P.Shutdown:
            self.running = False

    # ---- application packages ----------------------------------------------

    def apps_ready(self, msg) -> bool:
        """Whether every package the run needs is unpacked; starts the unpackers of those
        that are not (one per package, however many runs wait for it)."""
        ready = True
        busy = {d for d, _ in self.installs.values()}
        for app in msg.apps:
            d = app.get("dir", "")
            if d in self.apps_done:
                continue
            try:
                with open(os.path.join(d, APP_MARKER)) as f:
                    if json.load(f).get("sha256") == app.get("sha256"):
                        self.apps_done.add(d)
                        continue
            except (OSError, ValueError):
                pass
            ready = False
            if d not in busy:
                self.start_unpack(app)
                busy.add(d)
        return ready

    def start_unpack(self, app: dict) -> None:
        d = os.path.normpath(app.get("dir", ""))
        archive = os.path.normpath(app.get("archive", ""))
        err = ""
        try:
            for p in (d, archive):
                if not p.startswith(self.root + os.sep):
                    raise OSError(f"{p!r} is not inside the node root {self.root}")
            parent, version = os.path.split(d)
            os.makedirs(parent, mode=0o700, exist_ok=True)
            err = os.path.join(parent, f".{version}.unpack-stderr.txt")
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
            try:
                here = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "appunpack.py")
                argv = [sys.executable, here, "unpack", archive, parent, version,
                        app.get("sha256", "")]
                pid = os.posix_spawn(sys.executable, argv, self.base_env, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, fd, 2)], setsigdef=RESET_SIGNALS)
            finally:
                os.close(fd)
        except OSError as exc:
            self.apps_failed(d, f"application package {app.get('name')} "
                                f"{app.get('version')} could not be unpacked: {_why(exc)}")
            return
        self.installs[pid] = (d, err)

    def unpack_exited(self, pid: int, status: int) -> None:
        d, err = self.installs.pop(pid)
        if os.waitstatus_to_exitcode(status) == 0:
            self.apps_done.add(d)
        else:
            tail = " | ".join((tail_of(err) or "").strip().splitlines()[-2:])
            self.apps_failed(d, f"application package in {d} could not be unpacked: "
                                f"{tail or 'the unpacker failed'}")
        waiting, self.app_wait = self.app_wait, []
        for msg in waiting:
            if all(a.get("dir") in self.apps_done for a in msg.apps):
                self.queued.append(msg)
            else:
                self.app_wait.append(msg)
        self.start_queued()

    def apps_failed(self, d: str, why: str) -> None:
        """The runs waiting for the package in d fail to start (a later run tries again)."""
        now = time.time()
        keep = []
        for msg in self.app_wait:
            if any(os.path.normpath(a.get("dir", "")) == d for a in msg.apps):
                self.events.append(P.Exited(id=msg.id, exit_code=None, start_failed=why,
                                            start=now, end=now))
            else:
                keep.append(msg)
        self.app_wait = keep

    def start_queued(self) -> None:
        """Start queued tasks, in order, while their slots fit."""
        while self.queued and self.running and not self.stopping and \
                (self.used == 0 or self.used + self.queued[0].slots <= self.slots):
            self.run(self.queued.popleft())

    def run(self, msg) -> None:
        now = time.time()
        try:
            pid, tmp, spawned = self.spawn(msg)
        except Exception as exc:  # noqa: BLE001 - any start failure fails this task only
            if not isinstance(exc, (OSError, ValueError)):
                log(f"node {self.node_id}: run {msg.id!r} could not start: {_why(exc)}")
            self.events.append(P.Exited(id=msg.id, exit_code=None, start_failed=_why(exc),
                                        start=now, end=time.time()))
            return
        task = Task(msg.id, pid, msg.slots, now, msg.timeout_s, tmp, spawned)
        if msg.log_prefix:  # a coordination command: its stderr tail comes with a failure
            task.err = os.path.join(os.path.dirname(tmp), safe_name(msg.log_prefix) +
                                    "stderr.txt")
        self.used += task.slots
        self.tasks[pid] = task
        self.by_id[msg.id] = task
        self.dirty = True
        self.events.append(P.Started(id=msg.id, pid=pid, t=now))

    def task_env(self, msg, tmp: str) -> dict:
        env = dict(self.base_env)
        env.update(msg.env)
        for name in TMPDIR_VARS:
            if name not in msg.env:  # a task that names its own keeps it
                env[name] = tmp
        env[P.AGENT_TOKEN_ENV] = self.token
        # the launch layer (hpcbatch-mpiexec) first on every task's PATH, then a
        # multi-instance task's shared directory (its common resource files: a
        # coordination command "setup.sh" is found there)
        path = [os.path.join(self.root, "bin")]
        shared = msg.env.get(TASK_SHARED_DIR_ENV)
        if shared and os.path.isabs(shared):
            path.append(shared)
        for app in msg.apps:  # its application packages' bin/ folders
            bin_dir = os.path.join(app.get("dir", ""), "bin")
            if os.path.isabs(bin_dir) and os.path.isdir(bin_dir):
                path.append(bin_dir)
        env["PATH"] = os.pathsep.join([*path, env.get("PATH", os.defpath)])
        if self.mpi_prefix and MPI_PREFIX_ENV not in msg.env:
            env[MPI_PREFIX_ENV] = self.mpi_prefix
        for k, v in msg.env.items():  # (the agent's own environment cannot hold these)
            if not k or "=" in k or "\0" in k:
                raise ValueError(f"environment variable name {k!r} cannot be passed to a "
                                 "process (empty, or holds '=' or a NUL byte)")
            if "\0" in v:
                raise ValueError(f"environment variable {k}: its value holds a NUL byte, "
                                 "which cannot be passed to a process")
        return env

    def parent_fd(self, path: str) -> int:
        """fd of a task directory's parent (a job's folder), checked link by link from
        the root once and then kept (a few): its tasks' directories are made inside
        that very directory, whatever is done to its path meanwhile."""
        fd = self.dir_fds.pop(path, None)
        if fd is None:
            fd = open_dir_below(self.root, path)
            while len(self.dir_fds) >= 32:
                os.close(self.dir_fds.pop(next(iter(self.dir_fds))))
        self.dir_fds[path] = fd  # (most recently used last)
        return fd

    def task_dir(self, tdir: str) -> tuple[int, bool]:
        parent, leaf = os.path.split(tdir)
        if not leaf or tdir == self.root:
            raise OSError(errno.EINVAL, f"refusing the node root {self.root} as a task "
                          "directory")
        try:
            return make_dir_at(self.parent_fd(parent), leaf, parent)
        except FileNotFoundError:  # the kept folder was removed (a job deleted): again
            os.close(self.dir_fds.pop(parent))
            return make_dir_at(self.parent_fd(parent), leaf, parent)

    def spawn(self, msg) -> tuple[int, str, float]:
        """Make the task's directories and start it: (pid, its TMPDIR, CLOCK_BOOTTIME)."""
        if "\0" in msg.cmd:
            raise ValueError("the command line holds a NUL byte")
        fds = []
        tmp = None
        try:
            tdir = os.path.normpath(os.path.join(self.root, msg.dir))
            tfd, fresh = self.task_dir(tdir)
            fds.append(tfd)
            for name in msg.dirs:
                fds.append(mkdir_at(tfd, safe_name(name), tdir))
            for name, text in (msg.files or {}).items():
                with os.fdopen(create_at(tfd, safe_name(name), fresh=fresh), "w") as f:
                    f.write(text)
            wd = mkdir_at(tfd, "wd", tdir)
            fds.append(wd)
            if msg.cwd:  # the task's own working directory (e.g. where it was submitted)
                try:
                    wd = os.open(msg.cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    raise OSError(f"working directory {msg.cwd} on node {self.node_id}: "
                                  f"{exc.strerror or exc}") from None
                fds.append(wd)
            tmp = os.path.join(tdir, "tmp")
            try:
                new_dir_at(tfd, "tmp")
            except FileExistsError:  # what an earlier attempt left
                remove_tree(tmp)
                new_dir_at(tfd, "tmp")
            env = self.task_env(msg, tmp)
            argv = command_argv(msg.cmd, env.get("PATH", os.defpath))
            prefix = safe_name(msg.log_prefix) if msg.log_prefix else ""
            # (0600: a task's output is its owner's, like the home's files)
            out = create_at(tfd, prefix + "stdout.txt", 0o600, fresh=fresh)
            fds.append(out)
            err = create_at(tfd, prefix + "stderr.txt", 0o600, fresh=fresh)
            fds.append(err)
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, err, 2)]
            # posix_spawn has no cwd argument; the agent is single-threaded, so a chdir
            # around the spawn is safe. Every other fd of ours is close-on-exec.
            os.fchdir(wd)
            try:
                spawned = time.clock_gettime(time.CLOCK_BOOTTIME)
                pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True,
                                     setsigdef=RESET_SIGNALS)
            finally:
                os.fchdir(self.root_fd)
            return pid, tmp, spawned
        except BaseException:
            if tmp:
                remove_tree(tmp)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def terminate(self, task: Task) -> None:
        if task.kill_at is None:
            task.shm = shm_files_of(session_members({task.pid}) | {task.pid})
            signal_session(task.pid, signal.SIGTERM)
            task.kill_at = time.monotonic() + self.kill_grace_s

    def reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.installs:
                self.unpack_exited(pid, status)
                continue
            task = self.tasks.pop(pid, None)
            if task is None:
                continue
            self.by_id.pop(task.id, None)
            self.used -= task.slots
            self.dirty = True
            # nothing of the task outlives it (a killed one: not even in other groups)
            if task.kill_at is not None:
                signal_session(pid, signal.SIGKILL)
            else:
                _killpg(pid, signal.SIGKILL)
            if task.tmp:
                remove_tree(task.tmp)
            if task.shm:  # killed ranks leave their shared-memory segments behind
                remove_shm_files(task.shm)
            code = os.waitstatus_to_exitcode(status)
            ev = P.Exited(
                id=task.id, exit_code=code if code >= 0 else None,
                signal=-code if code < 0 else None, timed_out=task.timed_out,
                killed=task.killed, start=task.start, end=time.time(),
                usage={"utime_s": round(ru.ru_utime, 6), "stime_s": round(ru.ru_stime, 6),
                       "maxrss_kb": ru.ru_maxrss},
                stderr_tail=tail_of(task.err) if task.err and code != 0 else None)
            if not self.running and ev.killed is None and ev.signal:
                ev = dataclasses.replace(ev, killed=self.stop_reason)
            if self.hold_s and ev.killed is None and ev.signal in (signal.SIGTERM,
                                                                   signal.SIGKILL):
                self.held.append((time.monotonic() + self.hold_s, ev))
            else:
                self.events.append(ev)
            self.start_queued()

    def release_held(self, now: float | None = None) -> None:
        """Exits held back (see hold_s) whose moment passed, or all of them once the
        agent stops (then as stopped with it)."""
        keep = []
        for at, ev in self.held:
            if not self.running:
                self.events.append(dataclasses.replace(ev, killed=self.stop_reason))
            elif now is not None and now >= at:
                self.events.append(ev)
            else:
                keep.append((at, ev))
        self.held = keep

    def check_deadlines(self, now: float) -> float | None:
        """Enforce wall-clock limits and kill graces (monotonic ``now``); return the next
        time something is due."""
        nxt = None
        for task in self.tasks.values():
            if task.deadline is not None and task.kill_at is None and now >= task.deadline:
                task.timed_out = True
                self.terminate(task)
            if task.kill_at is not None and now >= task.kill_at:
                signal_session(task.pid, signal.SIGKILL)
                task.kill_at = now + self.kill_grace_s
            for t in (task.deadline if task.kill_at is None else None, task.kill_at):
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
        return nxt

    def heartbeat(self) -> None:
        self.flush_events()
        self.send(P.Heartbeat(t=time.time(), running=tuple(t.id for t in self.tasks.values()),
                              queued=tuple(q.id for q in self.queued)))

    def stop_all(self, reason: str, wait) -> None:
        """Every queued task reported as killed; every running one SIGTERMed (its whole
        session), SIGKILLed after the grace, and waited for (bounded)."""
        self.stopping = True
        now = time.time()
        waiting, self.app_wait = self.app_wait, []
        while self.queued or waiting:
            q = self.queued.popleft() if self.queued else waiting.pop(0)
            self.events.append(P.Exited(id=q.id, exit_code=None, killed=reason, start=now,
                                        end=now))
        for pid in list(self.installs):  # unpackers: a half-unpacked copy is never used
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            self.installs.pop(pid, None)
        for task in list(self.tasks.values()):
            task.killed = task.killed or reason
            self.terminate(task)
        end = time.monotonic() + self.kill_grace_s + 5
        while self.tasks and time.monotonic() < end:
            due = self.check_deadlines(time.monotonic())
            self.reap()
            if self.tasks:  # (SIGCHLD wakes it early)
                wait(0.05 if due is None else min(0.05, max(due - time.monotonic(), 0.001)))
        self.reap()

    # ---- the record of what this agent runs ----------------------------------

    def record(self) -> dict:
        return {"token": self.token, "pid": os.getpid(), "start": self.pstart,
                "boot": self.boot, "node_id": self.node_id, "root": self.root,
                "tasks": [{"id": t.id, "pid": t.pid, "sid": t.pid, "spawned": t.spawned}
                          for t in self.tasks.values()]}

    def save_record(self, now: float) -> None:
        """Rewrite the record, at most every RECORD_EVERY_S (ext4 journals each rename:
        up to a millisecond that would sit between tasks). A task that starts in between
        and outlives a SIGKILLed agent is still found, by the token in its environment."""
        if self.dirty and now >= self.record_due:
            self.record_due = now + RECORD_EVERY_S
            try:
                write_record(self.root, self.token, self.record())
                self.dirty = False
                self.record_failed = False
            except OSError as exc:  # tried again next time, said once
                if not self.record_failed:
                    log(f"node {self.node_id}: cannot write the agent record: {exc}")
                self.record_failed = True

    def write_shims(self) -> None:
        """``<root>/bin/hpcbatch-mpiexec``: the launch layer uploaded beside this agent
        (``mpi.py``), run with this agent's python (the pool's); ``<root>/bin`` leads every
        task's PATH, so a node whose login PATH knows nothing of hpcbatch has it."""
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi.py")
        if not os.path.exists(here):
            return
        bin_fd = mkdir_at(self.root_fd, "bin", self.root, 0o755)
        try:
            text = (f"#!/bin/sh\n# made by the hpcbatch agent: the pool's python runs the "
                    f"launch layer\nexec {_sh_quote(sys.executable)} {_sh_quote(here)} "
                    f'"$@"\n')
            tmp = f".hpcbatch-mpiexec.{os.getpid()}"
            with os.fdopen(create_at(bin_fd, tmp, 0o755), "w") as f:
                f.write(text)
                os.fchmod(f.fileno(), 0o755)
            os.replace(tmp, "hpcbatch-mpiexec", src_dir_fd=bin_fd, dst_dir_fd=bin_fd)
        finally:
            os.close(bin_fd)

    # ---- main loop -------------------------------------------------------

    def setup(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.root_fd = os.open(self.root, O_DIR)
        for name in ("shared", "jobs", "agents"):
            os.close(mkdir_at(self.root_fd, name, self.root))
        self.write_shims()
        if self.reap_stale:
            killed = reap_stale_agents(self.root, keep=self.token, grace_s=self.kill_grace_s)
            if killed:
                log(f"node {self.node_id}: killed {len(killed)} processes earlier agents "
                    f"of {self.root} left: {killed}")
                self.events.append(P.Reaped(match={}, pids=tuple(killed)))
        write_record(self.root, self.token, self.record())
        self.dirty = False
        os.fchdir(self.root_fd)

    def serve(self, inp_fd: int) -> None:
        self.setup()
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGHUP, signal.SIGINT):  # the coordinator decides when we stop
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        for fd in (self.out_fd, 2):  # a stalled reader must not stall us (pipes only: a
            if fd >= 0 and _is_pipe(fd):  # terminal's flags are its shell's too)
                os.set_blocking(fd, False)
        sel = selectors.DefaultSelector()
        sel.register(inp_fd, selectors.EVENT_READ, "in")
        sel.register(rfd, selectors.EVENT_READ, "sig")
        out_registered = False

        def drain_signals() -> None:
            try:
                while os.read(rfd, 4096):
                    pass
            except BlockingIOError:
                pass

        def wait(timeout_s: float) -> None:
            for key, _ in sel.select(timeout_s):
                if key.data == "sig":
                    drain_signals()

        self.send(P.Hello(node_id=self.node_id, root=self.root, pid=os.getpid(),
                          # (in a Slurm job step: the node's name in Slurm)
                          hostname=os.environ.get("SLURMD_NODENAME") or os.uname().nodename,
                          slots=self.slots,
                          cores=os.cpu_count(), python=sys.executable,
                          protocol=P.PROTOCOL_VERSION, token=self.token))
        now = time.monotonic()
        next_hb = now + self.heartbeat_s
        heard = now
        while self.running:
            now = time.monotonic()
            due = self.check_deadlines(now)
            wait_s = next_hb - now
            if due is not None:
                wait_s = min(wait_s, due - now)
            if self.lease_s:
                wait_s = min(wait_s, heard + self.lease_s - now)
            if self.held:
                wait_s = min(wait_s, self.held[0][0] - now)
            if self.dirty:
                wait_s = min(wait_s, self.record_due - now)
            ready = sel.select(max(wait_s, 0))
            now = time.monotonic()
            # before reading: lines that waited in a pipe while we were stopped are old news
            if self.lease_s and now - heard > self.lease_s:
                self.lease_expired(now - heard)
                break
            for key, _ in ready:
                if key.data == "sig":
                    drain_signals()
                elif key.data == "out":
                    self.flush_out()
                else:
                    chunk = os.read(inp_fd, 1 << 16)
                    if not chunk:
                        self.running = False
                        break
                    self.inbuf += chunk
                    *lines, self.inbuf = self.inbuf.split(b"\n")
                    if lines:
                        heard = now
                    for line in lines:
                        if line.strip():
                            self.handle_line(line)
            self.reap()
            if self.held:
                self.release_held(time.monotonic())
            self.save_record(now)
            if time.monotonic() >= next_hb:
                self.heartbeat()
                next_hb = time.monotonic() + self.heartbeat_s
            self.flush_events()
            if bool(self.outbuf) != out_registered and self.out_fd >= 0:
                if self.outbuf:
                    sel.register(self.out_fd, selectors.EVENT_WRITE, "out")
                else:
                    sel.unregister(self.out_fd)
                out_registered = bool(self.outbuf)
        if out_registered and self.out_fd >= 0:
            sel.unregister(self.out_fd)
        sel.unregister(inp_fd)  # (at EOF it would wake every wait below at once)
        self.stop_all(self.stop_reason, wait)
        self.release_held()
        self.flush_events()
        self.send(P.Bye())
        self.drain_out(2.0)
        if self.tasks:  # could not kill them all: the record stays for a later reap
            write_record(self.root, self.token, self.record())
            log(f"node {self.node_id}: tasks {sorted(map(str, self.by_id))} outlived "
                f"SIGKILL; their record stays in {record_dir(self.root)}")
        else:
            remove_record(self.root, self.token)

    def lease_expired(self, silent_s: float) -> None:
        text = (f"no word from the coordinator for {silent_s:.1f} s (lease {self.lease_s:g} s): "
                "stopping every task and exiting")
        log(f"node {self.node_id}: {text}")
        self.events.append(P.Error(message=text))
        self.stop_reason = P.KILLED_LEASE
        self.running = False


def _is_pipe(fd: int) -> bool:
    import stat
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _seconds(text: str) -> float:
    v = float(text)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hpcbatch node agent (speaks JSON lines on stdio)")
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--root", required=True, help="node root directory (task dirs live here)")
    ap.add_argument("--heartbeat-s", type=_seconds, default=1.0)
    ap.add_argument("--slots", type=int, default=os.cpu_count() or 1,
                    help="task slots: tasks beyond them wait in the agent's queue")
    ap.add_argument("--token", default="",
                    help="this agent's identity (its record file, HPCBATCH_AGENT_TOKEN of its "
                         "tasks); default: a random one")
    ap.add_argument("--lease-s", type=_seconds, default=0.0,
                    help="stop every task and exit after this long without a line from the "
                         "coordinator (0: never)")
    ap.add_argument("--kill-grace-s", type=_seconds, default=KILL_GRACE_S,
                    help="SIGKILL this long after SIGTERM")
    ap.add_argument("--reap-stale", action="store_true",
                    help="first kill what earlier agents of this root left running")
    ap.add_argument("--mpi-prefix", default="",
                    help="the pool's MPI installation (its bin/mpiexec), for hpcbatch-mpiexec")
    args = ap.parse_args(argv)
    if args.token and not TOKEN_RE.fullmatch(args.token):
        ap.error(f"--token {args.token!r}: use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)")
    Agent(args.node_id, args.root, args.heartbeat_s, args.slots, token=args.token,
          lease_s=args.lease_s, kill_grace_s=args.kill_grace_s,
          reap_stale=args.reap_stale, mpi_prefix=args.mpi_prefix).serve(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
