"""A throw-away SSH "cluster" on this machine: one real OpenSSH sshd per node.

``cluster_up(n, dir)`` starts N sshd processes on 127.0.0.1 (a free port each, an
ed25519 host key each, no PAM), generates a client key, and writes into ``dir``:

* ``known_hosts``  strict ``[127.0.0.1]:PORT ssh-ed25519 KEY`` lines, one per node
* ``ssh_config``   one ``Host nodeN`` block each (StrictHostKeyChecking yes, BatchMode yes)
* ``pool.json``    what ``hpcbatch pool create NAME --spec dir/pool.json`` takes
* ``cluster.json`` the state: each node's port and sshd PID (with the PID's start
                   time, so a reused PID is never mistaken for ours)
* ``nodeN/``       that node's sshd_config, host key, sshd.pid and sshd.log

``cluster_down(dir)`` stops exactly those sshd processes and everything running
under them (their per-connection sessions), by PID, and removes nothing.
``kill_node(dir, name)`` does the same to one node: a node lost, for fault tests.
Each node's sshd sets ``HPCBATCH_NODE=<name>`` in its sessions, so a process can
tell which node it really runs on. Nothing is installed and nothing outside
``dir`` is written (the user's ``~/.ssh`` is never touched), except ``/run/sshd``,
the privilege-separation directory a root sshd needs.

Stdlib only (this package is what runs on nodes): Linux, ``/proc``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"  # absolute: sshd refuses to re-exec itself otherwise
SSH_KEYGEN = "ssh-keygen"
STATE_FILE = "cluster.json"
PRIVSEP_DIR = "/run/sshd"
_PORT_ATTEMPTS = 5
# characters that sshd_config / ssh_config cannot carry inside a quoted path
_BAD_PATH_CHARS = ('"', "%", "\n", "\r", "\\", "'")


class ClusterError(RuntimeError):
    """A test-cluster problem, in one line that says what to do."""


@dataclasses.dataclass
class NodeInfo:
    name: str
    hostname: str
    port: int
    user: str
    pid: int
    start_time: int  # /proc/PID/stat field 22: tells our sshd from a later reuse of its PID
    host_key: str  # "ssh-ed25519 AAAA..."
    directory: str
    alive: bool | None = None  # filled in by cluster_status

    def __getitem__(self, key: str) -> Any:  # dict-style access, as older callers use
        return getattr(self, key)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("alive")
        return d


@dataclasses.dataclass
class ClusterInfo:
    directory: Path
    user: str
    key: Path
    known_hosts: Path
    ssh_config: Path
    pool_json: Path
    nodes: list[NodeInfo]

    @property
    def running(self) -> bool:
        return any(nd.alive for nd in self.nodes)

    @property
    def pids(self) -> list[int]:
        return [nd.pid for nd in self.nodes]

    def node(self, name: str) -> NodeInfo:
        for nd in self.nodes:
            if nd.name == name:
                return nd
        raise ClusterError(f"no node {name!r} in the cluster in {self.directory}; it has "
                           f"{', '.join(nd.name for nd in self.nodes) or 'no nodes'}")

    def __getitem__(self, key: str) -> Any:  # dict-style access, as older callers use
        return str(self.directory) if key == "dir" else getattr(self, key)


# ---------------------------------------------------------------- processes (by PID)

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _is_ours(node: NodeInfo) -> bool:
    """The PID is still the sshd we started (not a zombie, not a reused PID)."""
    return pid_alive(node.pid) and _start_time(node.pid) == node.start_time


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids = _children_map()
    found, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_tree(pid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL a process and everything under it.

    Everything is frozen first (SIGSTOP, repeated until no new descendant shows up), so
    the listener cannot fork a session and no session can fork a child that escapes
    the kill by being reparented before we see it.
    """
    frozen: list[int] = []
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for p in todo:
            _signal(p, signal.SIGSTOP)
            frozen.append(p)
            seen.add(p)
        todo = [p for p in _descendants(pid) if p not in seen]
    for p in frozen:
        _signal(p, signal.SIGKILL)
    _reap(pid)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in frozen):
        if time.monotonic() > deadline:
            left = [p for p in frozen if pid_alive(p)]
            raise ClusterError(f"processes {left} (under sshd {pid}) survived SIGKILL for "
                               f"{timeout_s:g} s; check them with 'ps -o pid,stat,cmd -p "
                               f"{','.join(map(str, left))}'")
        time.sleep(0.005)


def sshd_pids_under(directory: str | os.PathLike) -> list[int]:
    """Live sshd processes whose command line names a file under directory: how to check
    that nothing of a cluster survived (its listeners run ``sshd -D -f DIR/NODE/...``)."""
    needle = (str(Path(directory).expanduser().resolve()).rstrip("/") + "/").encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"sshd" in cmdline and needle in cmdline and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _reap(pid: int) -> None:
    """Collect the exit status if the sshd is our own child (no zombie left behind)."""
    deadline = time.monotonic() + 2
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.005)


# ---------------------------------------------------------------- setup

def check_sshd() -> None:
    """Raise ClusterError if OpenSSH's sshd or ssh-keygen is missing (installs nothing)."""
    if not os.access(SSHD, os.X_OK):
        raise ClusterError(f"{SSHD} not found: install the Debian/Ubuntu packages "
                           "openssh-server and openssh-client "
                           "(apt-get install openssh-server openssh-client)")
    if shutil.which(SSH_KEYGEN) is None:
        raise ClusterError(f"{SSH_KEYGEN} not found: install the Debian/Ubuntu package "
                           "openssh-client (apt-get install openssh-client)")


def _whoami() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key at path (kept if already there); returns 'type base64'."""
    pub = path.with_name(path.name + ".pub")
    if not (path.exists() and pub.exists()):
        for p in (path, pub):
            p.unlink(missing_ok=True)
        r = subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                            str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ClusterError(f"ssh-keygen could not write {path}: "
                               f"{(r.stderr or r.stdout).strip() or 'exit ' + str(r.returncode)}")
    return " ".join(pub.read_text().split()[:2])


def _q(path: Path) -> str:
    return f'"{path}"'


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _sshd_config(node_dir: Path, cluster_dir: Path, name: str, port: int) -> str:
    return "\n".join([
        "# written by hpcbatch cluster up; sshd -D -f this file",
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {_q(node_dir / 'ssh_host_ed25519_key')}",
        f"PidFile {_q(node_dir / 'sshd.pid')}",
        f"AuthorizedKeysFile {_q(cluster_dir / 'authorized_keys')}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PermitUserEnvironment no",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        "MaxAuthTries 10",
        "LogLevel INFO",
        "Subsystem sftp internal-sftp",
        f"SetEnv HPCBATCH_NODE={name}",
        "",
    ])


def _start_sshd(node_dir: Path) -> subprocess.Popen:
    log = node_dir / "sshd.log"
    log.write_text("")
    return subprocess.Popen([SSHD, "-D", "-f", str(node_dir / "sshd_config"), "-E", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _wait_listening(procs: dict[str, subprocess.Popen], d: Path,
                    deadline: float) -> dict[str, str]:
    """Poll the logs until each sshd logs 'Server listening' (after bind + listen).

    Returns {name: its log} for the ones that exited instead (a port taken meanwhile, a
    bad config); raises ClusterError when the deadline passes.
    """
    failed: dict[str, str] = {}
    waiting = dict(procs)
    while waiting:
        for name, proc in list(waiting.items()):
            log = (d / name / "sshd.log").read_text(errors="replace")
            if "Server listening" in log:
                del waiting[name]
            elif proc.poll() is not None:
                failed[name] = log.strip() or f"sshd exited with {proc.returncode}"
                del waiting[name]
        if not waiting:
            break
        if time.monotonic() > deadline:
            name = next(iter(waiting))
            raise ClusterError(f"sshd for {name} did not log 'Server listening' in time; "
                               f"see {d / name / 'sshd.log'}")
        time.sleep(0.005)
    return failed


def cluster_up(n: int, directory: str | os.PathLike, *, user: str | None = None,
               base_name: str = "node", timeout_s: float = 15.0) -> ClusterInfo:
    """Start n sshd nodes named base_name1..n on 127.0.0.1; see the module docstring."""
    check_sshd()
    if not isinstance(n, int) or n < 1:
        raise ClusterError(f"number of nodes must be a whole number >= 1, not {n!r}")
    if not base_name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in base_name):
        raise ClusterError(f"node base name {base_name!r} must be letters, digits, '-' or '_'")
    d = Path(directory).expanduser().resolve()
    if any(c in str(d) for c in _BAD_PATH_CHARS):
        raise ClusterError(f"cluster directory {d} contains one of {' '.join(_BAD_PATH_CHARS)!r}"
                           ", which sshd_config cannot quote; choose another --dir")
    if (d / STATE_FILE).exists():
        try:
            old = cluster_status(d)
        except ClusterError:
            old = None
        if old is not None and old.running:
            raise ClusterError(f"a cluster is already running in {d}; stop it first with "
                               f"'hpcbatch cluster down --dir {d}'")
    user = user or _whoami()
    try:
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    except OSError as exc:
        raise ClusterError(f"cannot create cluster directory {d}: {exc.strerror}") from None
    if os.geteuid() == 0:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)  # a root sshd needs it

    key = d / "id_ed25519"
    _keygen(key, "hpcbatch-cluster")
    _write(d / "authorized_keys", (d / "id_ed25519.pub").read_text(), 0o600)

    names = [f"{base_name}{i}" for i in range(1, n + 1)]
    host_keys: dict[str, str] = {}
    ports: dict[str, int] = {}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in names:
            nd = d / name
            nd.mkdir(exist_ok=True)
            host_keys[name] = _keygen(nd / "ssh_host_ed25519_key", f"hpcbatch-{name}")
        deadline = time.monotonic() + timeout_s
        todo = list(names)
        for attempt in range(_PORT_ATTEMPTS):
            batch = {}
            for name in todo:  # start them all, then wait: the nodes come up in parallel
                ports[name] = _free_port()
                (d / name / "sshd_config").write_text(_sshd_config(d / name, d, name,
                                                                   ports[name]))
                batch[name] = procs[name] = _start_sshd(d / name)
            failed = _wait_listening(batch, d, deadline)
            for name in failed:
                procs.pop(name).wait()
            todo = list(failed)
            if not todo:
                break
            if attempt == _PORT_ATTEMPTS - 1 or not all("Address already in use" in log
                                                        for log in failed.values()):
                name, log = next(iter(failed.items()))
                raise ClusterError(f"sshd for {name} did not start: {log.splitlines()[-1]} "
                                   f"(see {d / name / 'sshd.log'})")
        nodes = [NodeInfo(name, "127.0.0.1", ports[name], user, procs[name].pid,
                          _start_time(procs[name].pid) or 0, host_keys[name], str(d / name))
                 for name in names]
    except BaseException:
        for proc in procs.values():
            _kill_tree(proc.pid)
        raise

    info = ClusterInfo(d, user, key, d / "known_hosts", d / "ssh_config", d / "pool.json", nodes)
    _write(info.known_hosts, "".join(f"[{nd.hostname}]:{nd.port} {nd.host_key}\n"
                                     for nd in nodes))
    _write(info.ssh_config, "".join(
        f"Host {nd.name}\n"
        f"  HostName {nd.hostname}\n"
        f"  Port {nd.port}\n"
        f"  User {nd.user}\n"
        f"  IdentityFile {_q(key)}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {_q(info.known_hosts)}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 5\n"
        "  LogLevel ERROR\n" for nd in nodes))
    _write(info.pool_json, json.dumps({
        "provider": "ssh",
        "hosts": [{"name": nd.name, "hostname": nd.hostname, "port": nd.port, "user": nd.user}
                  for nd in nodes],
        "user": user,
        "key": str(key),
        "known_hosts": str(info.known_hosts),
        "ssh_config": str(info.ssh_config),
    }, indent=2) + "\n")
    _write(d / STATE_FILE, json.dumps({"dir": str(d), "user": user,
                                       "nodes": [nd.to_json() for nd in nodes]}, indent=2) + "\n")
    for nd in nodes:
        nd.alive = True
    return info


# ---------------------------------------------------------------- state, status, teardown

def _load(directory: str | os.PathLike) -> ClusterInfo:
    d = Path(directory).expanduser().resolve()
    path = d / STATE_FILE
    try:
        state = json.loads(path.read_text())
        nodes = [NodeInfo(**{f.name: nd[f.name] for f in dataclasses.fields(NodeInfo)
                             if f.name in nd}) for nd in state["nodes"]]
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {d} (no {STATE_FILE}); start one with "
                           f"'hpcbatch cluster up -n 3 --dir {d}'") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{path} is not a cluster state file ({exc}); remove the "
                           "directory if it is stale") from None
    return ClusterInfo(d, state.get("user") or _whoami(), d / "id_ed25519", d / "known_hosts",
                       d / "ssh_config", d / "pool.json", nodes)


def cluster_status(directory: str | os.PathLike) -> ClusterInfo:
    """The cluster's nodes, each with ``alive`` set (its sshd PID is still ours)."""
    info = _load(directory)
    for nd in info.nodes:
        nd.alive = _is_ours(nd)
    return info


def kill_node(directory: str | os.PathLike, name: str) -> bool:
    """Kill one node's sshd and everything under it (its sessions): a node lost.

    Returns False if it was already down."""
    nd = _load(directory).node(name)
    if not _is_ours(nd):
        return False
    _kill_tree(nd.pid)
    return True


def cluster_down(directory: str | os.PathLike) -> list[str]:
    """Stop exactly the sshd processes this cluster started, and their sessions.

    Returns the names of the nodes stopped; a second call stops nothing and returns [].
    Files stay (keys, known_hosts, pool.json, logs)."""
    stopped = []
    for nd in _load(directory).nodes:
        if _is_ours(nd):
            _kill_tree(nd.pid)
            stopped.append(nd.name)
    return stopped
