"""A throw-away SSH "cluster" on this machine: one real OpenSSH sshd per node.

``cluster_up(n, dir)`` starts N sshd processes on 127.0.0.1 (a free port each, a
host key each, no PAM), generates a client key, and writes into ``dir``:
``known_hosts`` (strict ``[127.0.0.1]:PORT key`` lines), ``ssh_config`` (one
``Host nodeN`` block each, StrictHostKeyChecking yes), ``pool.json`` (what
``hpcbatch pool create NAME --spec dir/pool.json`` takes) and ``cluster.json``
(the sshd PIDs). ``cluster_down(dir)`` stops exactly those PIDs and removes
nothing else. Each node's sshd sets ``HPCBATCH_NODE=<name>`` in its sessions,
so a process can tell which node it really runs on. Nothing is installed: if
sshd is missing, the error says which package provides it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # absolute: sshd refuses to re-exec itself otherwise


class ClusterError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> str:
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                        str(path)], check=True, capture_output=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    procs = _descendants(pid) + [pid]
    for p in procs:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)


def check_sshd() -> None:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        raise ClusterError(f"{SSHD} or ssh-keygen not found; install the Debian/Ubuntu packages "
                           "openssh-server and openssh-client (apt-get install openssh-server)")


def cluster_up(n: int, directory: str | Path, *, user: str | None = None,
               base_name: str = "node", timeout_s: float = 15.0) -> dict:
    check_sshd()
    d = Path(directory).resolve()
    if (d / "cluster.json").exists() and cluster_status(d)["running"]:
        raise ClusterError(f"a cluster is already running in {d}; 'hpcbatch cluster down "
                           f"--dir {d}' first")
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    user = user or os.environ.get("USER") or _whoami()
    key = d / "id_ed25519"
    _keygen(key, "hpcbatch-cluster")
    (d / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    nodes, procs = [], []
    try:
        for i in range(1, n + 1):
            name = f"{base_name}{i}"
            nd = d / name
            nd.mkdir(exist_ok=True)
            hostkey = nd / "ssh_host_ed25519_key"
            pub = _keygen(hostkey, name)
            port = _free_port()
            log = nd / "sshd.log"
            log.write_text("")
            (nd / "sshd_config").write_text("\n".join([
                "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {hostkey}",
                f"PidFile {nd / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PubkeyAuthentication yes", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                "PermitRootLogin prohibit-password", "MaxStartups 100:30:200",
                "MaxSessions 100", "LogLevel INFO", "Subsystem sftp internal-sftp",
                f"SetEnv HPCBATCH_NODE={name}", ""]))
            proc = subprocess.Popen([SSHD, "-D", "-f", str(nd / "sshd_config"), "-E", str(log)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(proc)
            nodes.append({"name": name, "hostname": "127.0.0.1", "port": port, "user": user,
                          "pid": proc.pid, "host_key": pub})
        deadline = time.monotonic() + timeout_s
        for node, proc in zip(nodes, procs):
            log = d / node["name"] / "sshd.log"
            while "Server listening" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(f"sshd for {node['name']} did not start: "
                                       f"{log.read_text().strip()[-300:] or 'no log'}")
                time.sleep(0.01)
    except BaseException:
        for proc in procs:
            _kill_tree(proc.pid)
        raise
    known = "".join(f"[127.0.0.1]:{nd['port']} {nd['host_key']}\n" for nd in nodes)
    (d / "known_hosts").write_text(known)
    (d / "ssh_config").write_text("".join(
        f"Host {nd['name']}\n  HostName 127.0.0.1\n  Port {nd['port']}\n  User {user}\n"
        f"  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n"
        "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        "  ConnectTimeout 5\n" for nd in nodes))
    pool = {"provider": "ssh", "user": user, "key": str(key), "known_hosts": str(d / "known_hosts"),
            "ssh_config": str(d / "ssh_config"),
            "hosts": [{k: nd[k] for k in ("name", "hostname", "port", "user")} for nd in nodes]}
    (d / "pool.json").write_text(json.dumps(pool, indent=2) + "\n")
    state = {"dir": str(d), "nodes": nodes}
    (d / "cluster.json").write_text(json.dumps(state, indent=2) + "\n")
    return state


def _whoami() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


def _state(directory: str | Path) -> dict:
    path = Path(directory).resolve() / "cluster.json"
    if not path.exists():
        raise ClusterError(f"no cluster in {path.parent} (no cluster.json); start one with "
                           f"'hpcbatch cluster up -n 3 --dir {path.parent}'")
    return json.loads(path.read_text())


def cluster_status(directory: str | Path) -> dict:
    state = _state(directory)
    for nd in state["nodes"]:
        nd["alive"] = pid_alive(nd["pid"]) and _is_sshd(nd["pid"])
    state["running"] = any(nd["alive"] for nd in state["nodes"])
    return state


def _is_sshd(pid: int) -> bool:
    try:
        return "sshd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def kill_node(directory: str | Path, name: str) -> None:
    """Kill one node's sshd and every process under it (its sessions): a node lost."""
    for nd in _state(directory)["nodes"]:
        if nd["name"] == name:
            if pid_alive(nd["pid"]) and _is_sshd(nd["pid"]):
                _kill_tree(nd["pid"])
            return
    raise ClusterError(f"no node {name!r} in the cluster in {directory}")


def cluster_down(directory: str | Path) -> list[str]:
    """Stop exactly the sshd processes this cluster started (and their sessions)."""
    stopped = []
    for nd in _state(directory)["nodes"]:
        if pid_alive(nd["pid"]) and _is_sshd(nd["pid"]):
            _kill_tree(nd["pid"])
            stopped.append(nd["name"])
    return stopped
