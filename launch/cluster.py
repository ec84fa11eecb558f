"""A throw-away SSH "cluster" on this machine: one real OpenSSH sshd per node.

``cluster_up(n, dir)`` starts N sshd processes on 127.0.0.1 (a free port each, an
ed25519 host key each, no PAM), generates a client key, and writes into ``dir``:

* ``known_hosts``  strict ``[127.0.0.1]:PORT ssh-ed25519 KEY`` lines, one per node
* ``ssh_config``   one ``Host nodeN`` block each (StrictHostKeyChecking yes, BatchMode yes)
* ``pool.json``    what ``hpcbatch pool create NAME --spec dir/pool.json`` takes (its
                   ``authorized_keys`` is the nodes' own, so a pool's inter-node key
                   goes there, never into ``~/.ssh``)
* ``cluster.json`` the state: each node's address and sshd PID (with the PID's start
                   time, so a reused PID is never mistaken for ours), and in netns
                   mode the namespaces, veths and bridge it made
* ``nodeN/``       that node's sshd_config, host key, sshd.pid and sshd.log

``cluster_up(n, dir, netns=True)`` (root only) makes each node a host of its own:
a bridge ``hb<tag>br`` in the root namespace with ``10.77.K.1/24`` (K a third octet
no interface or route uses), and per node a network namespace ``hb<tag>-nodeI``
joined to the bridge by a veth pair (``hb<tag>vI`` on the bridge, ``eth0`` inside
with ``10.77.K.(10+I)/24``), ``lo`` up, ``/etc/netns/<namespace>/hosts`` naming
every node, and sshd inside on port 22 under its own UTS hostname ``nodeI``.
Open MPI 5 needs this: its PRRTE daemons never wire up over a loopback interface.
``<tag>`` is random per cluster, so two clusters never share a name.

``cluster_down(dir)`` stops exactly those sshd processes and everything running
under them (their per-connection sessions), by PID, then (netns mode) whatever is
left inside the cluster's namespaces, and deletes exactly the namespaces, veths,
bridge and ``/etc/netns`` entries it made. Other files stay.
``kill_node(dir, name)`` does the same to one node: a node lost, for fault tests
(in netns mode every process in the node's namespace dies: agent and ranks too).
``set_link(dir, name, up=False)`` cuts a netns node's link instead: the node's
processes live on, unreachable.

Each node's sshd sets ``HPCBATCH_NODE=<name>`` in its sessions (and, as root, the
``OMPI_ALLOW_RUN_AS_ROOT*`` pair Open MPI's remote daemons need), so a process can
tell which node it really runs on. Nothing is installed and nothing outside ``dir``
is written (the user's ``~/.ssh`` is never touched), except ``/run/sshd``, the
privilege-separation directory a root sshd needs, and in netns mode the network
objects above, ``/etc/netns/<namespace>/`` and the lock file ``/run/hpcbatch-netns.lock``.

Stdlib only (this package is what runs on nodes): Linux, ``/proc``, iproute2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"  # absolute: sshd refuses to re-exec itself otherwise
SSH_KEYGEN = "ssh-keygen"
STATE_FILE = "cluster.json"
PRIVSEP_DIR = "/run/sshd"
_PORT_ATTEMPTS = 5
# characters that sshd_config / ssh_config cannot carry inside a quoted path
_BAD_PATH_CHARS = ('"', "%", "\n", "\r", "\\", "'")

# netns mode: only these private test addresses are ever used, 10.77.K.0/24
NETNS_NET = ipaddress.ip_network("10.77.0.0/16")
NETNS_LOCK = "/run/hpcbatch-netns.lock"  # serialises picking K and names between clusters
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc
NETNS_MAX_NODES = 244  # 10.77.K.11 .. 10.77.K.254
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
# Open MPI's remote daemons (prted) refuse to run as root without these
OMPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


class ClusterError(RuntimeError):
    """A test-cluster problem, in one line that says what to do."""


@dataclasses.dataclass
class NodeInfo:
    name: str
    hostname: str  # the address sshd listens on: 127.0.0.1, or 10.77.K.(10+i) in netns mode
    port: int
    user: str
    pid: int
    start_time: int  # /proc/PID/stat field 22: tells our sshd from a later reuse of its PID
    host_key: str  # "ssh-ed25519 AAAA..."
    directory: str
    netns: str | None = None  # netns mode: the node's network namespace
    veth: str | None = None  # netns mode: the root-side end of its veth pair (on the bridge)
    alive: bool | None = None  # filled in by cluster_status
    link_up: bool | None = None  # filled in by cluster_status (netns mode)

    def __getitem__(self, key: str) -> Any:  # dict-style access, as older callers use
        return getattr(self, key)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("alive")
        d.pop("link_up")
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
    bridge: str | None = None  # netns mode: the bridge in the root namespace

    @property
    def netns(self) -> bool:
        return self.bridge is not None

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


# ---------------------------------------------------------------- checks

def check_sshd() -> None:
    """Raise ClusterError if OpenSSH's sshd or ssh-keygen is missing (installs nothing)."""
    if not os.access(SSHD, os.X_OK):
        raise ClusterError(f"{SSHD} not found: install the Debian/Ubuntu packages "
                           "openssh-server and openssh-client "
                           "(apt-get install openssh-server openssh-client)")
    if shutil.which(SSH_KEYGEN) is None:
        raise ClusterError(f"{SSH_KEYGEN} not found: install the Debian/Ubuntu package "
                           "openssh-client (apt-get install openssh-client)")


def _sbin_which(tool: str) -> str | None:
    """shutil.which, also looking in the sbin folders a non-root PATH lacks."""
    return shutil.which(tool, path=f"{os.environ.get('PATH', os.defpath)}:{_SBIN_PATH}")


def check_netns() -> None:
    """Raise ClusterError unless this process can make network namespaces (root, iproute2)."""
    if os.geteuid() != 0:
        raise ClusterError("--netns needs root (it makes network namespaces, veths and a "
                           "bridge); without --netns, loopback nodes work for MPICH and every "
                           "SSH test, but not for Open MPI")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                          ("hostname", "hostname")):
        if _sbin_which(tool) is None:
            raise ClusterError(f"{tool} not found: install the Debian/Ubuntu package "
                               f"{package} (apt-get install {package})")
    missing = [name for name, bit in (("CAP_NET_ADMIN", 12), ("CAP_SYS_ADMIN", 21))
               if not _effective_caps() >> bit & 1]
    if missing:
        raise ClusterError(f"--netns needs {' and '.join(missing)}, which this root process "
                           "lacks (a container without --privileged?); without --netns, "
                           "loopback nodes work for MPICH and every SSH test")


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _check_args(n: Any, base_name: str, netns: bool) -> None:
    if not isinstance(n, int) or n < 1:
        raise ClusterError(f"number of nodes must be a whole number >= 1, not {n!r}")
    if netns and n > NETNS_MAX_NODES:
        raise ClusterError(f"a --netns cluster has at most {NETNS_MAX_NODES} nodes (one "
                           f"10.77.K.0/24 subnet), not {n}")
    if not base_name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in base_name):
        raise ClusterError(f"node base name {base_name!r} must be letters, digits, '-' or '_'")


# ---------------------------------------------------------------- files and keys

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


def _known_hosts_name(nd: NodeInfo) -> str:
    """How known_hosts spells a host: the bare address on port 22, else [address]:port."""
    return nd.hostname if nd.port == 22 else f"[{nd.hostname}]:{nd.port}"


def _sshd_config(nd: NodeInfo, cluster_dir: Path) -> str:
    node_dir = Path(nd.directory)
    env = {"HPCBATCH_NODE": nd.name, **(OMPI_ROOT_ENV if os.geteuid() == 0 else {})}
    return "\n".join([
        "# written by hpcbatch cluster up; sshd -D -f this file",
        f"ListenAddress {nd.hostname}",
        f"Port {nd.port}",
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
        "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
        "",
    ])


def _write_client_files(info: ClusterInfo) -> None:
    """known_hosts, ssh_config and pool.json: how clients reach the nodes, strictly."""
    _write(info.known_hosts, "".join(f"{_known_hosts_name(nd)} {nd.host_key}\n"
                                     for nd in info.nodes))
    _write(info.ssh_config, "".join(
        f"Host {nd.name}\n"
        f"  HostName {nd.hostname}\n"
        f"  Port {nd.port}\n"
        f"  User {nd.user}\n"
        f"  IdentityFile {_q(info.key)}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {_q(info.known_hosts)}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 5\n"
        "  LogLevel ERROR\n" for nd in info.nodes))
    _write(info.pool_json, json.dumps({
        "provider": "ssh",
        "hosts": [{"name": nd.name, "hostname": nd.hostname, "port": nd.port, "user": nd.user}
                  for nd in info.nodes],
        "user": info.user,
        "key": str(info.key),
        "known_hosts": str(info.known_hosts),
        "ssh_config": str(info.ssh_config),
        # what the nodes' sshd reads: where bootstrap adds a pool's inter-node key
        "authorized_keys": str(info.directory / "authorized_keys"),
        # the nodes are this machine: the python that made them (a venv with hpcbatch's
        # MPI and mpi4py) is theirs, so `hpcbatch-mpiexec -- python ...` means it
        "python": sys.executable,
    }, indent=2) + "\n")


def _write_state(info: ClusterInfo) -> None:
    state: dict[str, Any] = {"dir": str(info.directory), "user": info.user,
                             "nodes": [nd.to_json() for nd in info.nodes]}
    if info.bridge:
        state["bridge"] = info.bridge
    _write(info.directory / STATE_FILE, json.dumps(state, indent=2) + "\n")


# ---------------------------------------------------------------- network namespaces

# every name a netns cluster makes: hb<tag>br, hb<tag>vI, hb<tag>-<node> (<= 15 chars
# for the interfaces); state files naming anything else are refused, never acted on
_OWNED_NAME = re.compile(r"hb[0-9a-f]{6}(br|v[0-9]{1,3}|-[A-Za-z0-9_-]+)")


def _run_ip(args: tuple[str, ...], ns: str | None) -> tuple[list[str], subprocess.CompletedProcess]:
    argv = [_sbin_which("ip") or "ip", *(["-n", ns] if ns else []), *args]
    try:
        return argv, subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                    stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"'{shlex.join(argv)}' could not run: {exc}") from None


def _ip(*args: str, ns: str | None = None) -> str:
    """Run iproute2's ip (in namespace ns); its stdout, or ClusterError naming the command."""
    argv, r = _run_ip(args, ns)
    if r.returncode != 0:
        raise ClusterError(f"'{shlex.join(argv)}' failed: "
                           f"{' '.join(r.stderr.split()) or f'exit {r.returncode}'}")
    return r.stdout


def _ip_or_none(*args: str) -> str | None:
    """The same, but None where ip fails (the link or namespace is not there)."""
    _, r = _run_ip(args, None)
    return r.stdout if r.returncode == 0 else None


@contextlib.contextmanager
def _netns_lock() -> Iterator[None]:
    """Held while a cluster picks its subnet and names and makes its bridge, so two
    clusters started at once never pick the same ones."""
    with open(NETNS_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    nets = [ipaddress.ip_interface(a).network
            for a in re.findall(r"\binet (\S+)", _ip("-4", "-o", "addr", "show"))]
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest[:1].isdigit():
            nets.append(ipaddress.ip_network(dest, strict=False))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    """The first 10.77.K.0/24 that no address or route here overlaps."""
    used = _networks_in_use()
    for net in NETNS_NET.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterError(f"no free /24 left in {NETNS_NET}: every one overlaps an address or "
                       "route here (see 'ip -4 addr', 'ip -4 route'); stop other netns "
                       "clusters with 'hpcbatch cluster down --dir DIR'")


def _netns_names() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.split()}


def _free_tag() -> str:
    """A random tag that no link, namespace or /etc/netns entry here uses yet."""
    taken = _ip("-o", "link", "show") + "\n".join(_netns_names())
    while True:
        tag = secrets.token_hex(3)
        if f"hb{tag}" not in taken and not any(NETNS_ETC.glob(f"hb{tag}*")):
            return tag


def _assign_network(info: ClusterInfo) -> ipaddress.IPv4Network:
    """Give the nodes their namespace, veth and address in a free subnet; name the bridge."""
    net, tag = _free_subnet(), _free_tag()
    for i, nd in enumerate(info.nodes, 1):
        nd.hostname, nd.port = str(net[10 + i]), 22  # 10.77.K.(10+i)
        nd.netns, nd.veth = f"hb{tag}-{nd.name}", f"hb{tag}v{i}"
    info.bridge = f"hb{tag}br"
    return net


def _make_bridge(info: ClusterInfo) -> None:
    """Under the lock: pick the subnet and names, record them, then make the bridge (so
    a crash at any later point leaves a state file that 'cluster down' cleans up)."""
    with _netns_lock():
        net = _assign_network(info)
        _write_state(info)
        _ip("link", "add", info.bridge, "type", "bridge")
        _ip("addr", "add", f"{net[1]}/{net.prefixlen}", "dev", info.bridge)
        _ip("link", "set", info.bridge, "up")


def _make_node_network(nd: NodeInfo, bridge: str, hosts: str) -> None:
    """The node's namespace: lo, and eth0 with its address, a veth to the bridge;
    /etc/netns/NS/hosts (bind-mounted over /etc/hosts inside) names every node."""
    etc = NETNS_ETC / nd.netns
    etc.mkdir(parents=True, exist_ok=True)
    _write(etc / "hosts", hosts)
    _ip("netns", "add", nd.netns)
    _ip("link", "add", nd.veth, "type", "veth", "peer", "name", "eth0", "netns", nd.netns)
    _ip("link", "set", nd.veth, "master", bridge, "up")
    _ip("addr", "add", f"{nd.hostname}/24", "dev", "eth0", ns=nd.netns)
    _ip("link", "set", "eth0", "up", ns=nd.netns)
    _ip("link", "set", "lo", "up", ns=nd.netns)


def _hosts_file(nodes: list[NodeInfo]) -> str:
    return ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            + "".join(f"{nd.hostname}\t{nd.name}\n" for nd in nodes))


def _netns_pids(ns: str) -> list[int]:
    """Live processes in namespace ns ([] once it is gone)."""
    out = _ip_or_none("netns", "pids", ns) or ""
    return [int(p) for p in out.split() if p.isdigit() and pid_alive(int(p))]


def _kill_netns(ns: str, timeout_s: float = 5.0) -> bool:
    """SIGKILL every process in namespace ns until none is left; True if there were any."""
    found = False
    deadline = time.monotonic() + timeout_s
    while pids := _netns_pids(ns):
        found = True
        for p in pids:
            _signal(p, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {pids} in network namespace {ns} survived SIGKILL "
                               f"for {timeout_s:g} s; check them with 'ip netns pids {ns}'")
        time.sleep(0.005)
    return found


def _link_exists(name: str) -> bool:
    return _ip_or_none("-o", "link", "show", "dev", name) is not None


def _link_up(name: str) -> bool | None:
    out = _ip_or_none("-o", "link", "show", "dev", name)
    flags = re.search(r"<([^>]*)>", out or "")
    return None if flags is None else "UP" in flags.group(1).split(",")


def _remove_network(info: ClusterInfo) -> None:
    """Delete exactly the namespaces, veths, bridge and /etc/netns entries of this
    cluster that still exist, after killing what runs in its namespaces."""
    if not info.bridge:
        return
    spaces = _netns_names()
    for nd in info.nodes:
        if not (nd.netns and nd.veth):
            continue
        _kill_netns(nd.netns)
        if _link_exists(nd.veth):  # explicitly: some sandboxes keep a veth after its netns
            _ip("link", "del", nd.veth)
        if nd.netns in spaces:
            _ip("netns", "del", nd.netns)
        (NETNS_ETC / nd.netns / "hosts").unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (NETNS_ETC / nd.netns).rmdir()
    if _link_exists(info.bridge):
        _ip("link", "del", info.bridge)


def network_leftovers(info: ClusterInfo) -> list[str]:
    """What of this cluster's network still exists (namespaces, links, /etc/netns
    entries): [] after a clean 'cluster down'. For tests and 'cluster status'."""
    if not info.bridge:
        return []
    spaces = _netns_names()
    left = [f"namespace {nd.netns}" for nd in info.nodes if nd.netns in spaces]
    left += [f"link {name}" for name in [nd.veth for nd in info.nodes] + [info.bridge]
             if name and _link_exists(name)]
    left += [str(NETNS_ETC / nd.netns) for nd in info.nodes
             if nd.netns and (NETNS_ETC / nd.netns).exists()]
    return left


# ---------------------------------------------------------------- sshd processes

def _sshd_argv(nd: NodeInfo) -> list[str]:
    node_dir = Path(nd.directory)
    argv = [SSHD, "-D", "-f", str(node_dir / "sshd_config"), "-E", str(node_dir / "sshd.log")]
    if nd.netns:  # ip netns exec, unshare (no --fork) and sh all exec: the PID is the sshd's
        argv = [_sbin_which("ip") or "ip", "netns", "exec", nd.netns,
                _sbin_which("unshare") or "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', nd.name, *argv]
    return argv


def _start_sshd(nd: NodeInfo, cluster_dir: Path) -> subprocess.Popen:
    node_dir = Path(nd.directory)
    (node_dir / "sshd_config").write_text(_sshd_config(nd, cluster_dir))
    log = node_dir / "sshd.log"
    log.write_text("")
    with open(log, "ab") as err:  # the netns wrapper's own errors land in the log too
        return subprocess.Popen(_sshd_argv(nd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, close_fds=True)


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
    return {name: failed[name] for name in procs if name in failed}  # in node order


def _start_error(d: Path, failed: dict[str, str]) -> ClusterError:
    name, log = next(iter(failed.items()))
    return ClusterError(f"sshd for {name} did not start: {log.splitlines()[-1]} "
                        f"(see {d / name / 'sshd.log'})")


def _up_loopback(info: ClusterInfo, procs: dict[str, subprocess.Popen],
                 deadline: float) -> None:
    """sshd on a free 127.0.0.1 port each; a port taken meanwhile is retried."""
    todo = list(info.nodes)
    for attempt in range(_PORT_ATTEMPTS):
        batch = {}
        for nd in todo:  # start them all, then wait: the nodes come up in parallel
            nd.port = _free_port()
            batch[nd.name] = procs[nd.name] = _start_sshd(nd, info.directory)
        failed = _wait_listening(batch, info.directory, deadline)
        for name in failed:
            procs.pop(name).wait()
        todo = [nd for nd in todo if nd.name in failed]
        if not todo:
            return
        if attempt == _PORT_ATTEMPTS - 1 or not all("Address already in use" in log
                                                    for log in failed.values()):
            raise _start_error(info.directory, failed)


def _up_netns(info: ClusterInfo, procs: dict[str, subprocess.Popen],
              deadline: float) -> None:
    """A bridge, a namespace per node, sshd inside each on port 22 of its own address."""
    _make_bridge(info)
    hosts = _hosts_file(info.nodes)
    for nd in info.nodes:
        _make_node_network(nd, info.bridge or "", hosts)
    for nd in info.nodes:
        procs[nd.name] = _start_sshd(nd, info.directory)
    failed = _wait_listening(procs, info.directory, deadline)
    if failed:
        raise _start_error(info.directory, failed)


# ---------------------------------------------------------------- up

def _prepare_dir(directory: str | os.PathLike) -> Path:
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
        if old is not None:
            cluster_down(d)  # what a dead cluster left: namespaces, veths, its bridge
    try:
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    except OSError as exc:
        raise ClusterError(f"cannot create cluster directory {d}: {exc.strerror}") from None
    if os.geteuid() == 0:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)  # a root sshd needs it
    return d


def _new_nodes(d: Path, user: str, base_name: str, n: int) -> list[NodeInfo]:
    """Node records with their host keys (kept from an earlier run); not started yet."""
    nodes = []
    for i in range(1, n + 1):
        name = f"{base_name}{i}"
        (d / name).mkdir(exist_ok=True)
        host_key = _keygen(d / name / "ssh_host_ed25519_key", f"hpcbatch-{name}")
        nodes.append(NodeInfo(name, "127.0.0.1", 0, user, 0, 0, host_key, str(d / name)))
    return nodes


def cluster_up(n: int, directory: str | os.PathLike, *, user: str | None = None,
               base_name: str = "node", timeout_s: float = 15.0,
               netns: bool = False) -> ClusterInfo:
    """Start n sshd nodes named base_name1..n, on 127.0.0.1 ports or (netns, root only)
    each in a network namespace of its own; see the module docstring."""
    check_sshd()
    if netns:
        check_netns()
    _check_args(n, base_name, netns)
    d = _prepare_dir(directory)
    user = user or _whoami()
    key = d / "id_ed25519"
    _keygen(key, "hpcbatch-cluster")
    _write(d / "authorized_keys", (d / "id_ed25519.pub").read_text(), 0o600)
    info = ClusterInfo(d, user, key, d / "known_hosts", d / "ssh_config", d / "pool.json", [])
    procs: dict[str, subprocess.Popen] = {}
    try:
        info.nodes = _new_nodes(d, user, base_name, n)
        deadline = time.monotonic() + timeout_s
        (_up_netns if netns else _up_loopback)(info, procs, deadline)
        for nd in info.nodes:
            nd.pid = procs[nd.name].pid
            nd.start_time = _start_time(nd.pid) or 0
            nd.alive = True
    except BaseException:  # tear down whatever was made, then say why
        for proc in procs.values():
            _kill_tree(proc.pid)
        _remove_network(info)
        raise
    _write_client_files(info)
    _write_state(info)
    return info


# ---------------------------------------------------------------- state, status, teardown

def _load(directory: str | os.PathLike) -> ClusterInfo:
    d = Path(directory).expanduser().resolve()
    path = d / STATE_FILE
    try:
        state = json.loads(path.read_text())
        nodes = [NodeInfo(**{f.name: nd[f.name] for f in dataclasses.fields(NodeInfo)
                             if f.name in nd}) for nd in state["nodes"]]
        bridge = state.get("bridge")
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {d} (no {STATE_FILE}); start one with "
                           f"'hpcbatch cluster up -n 3 --dir {d}'") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{path} is not a cluster state file ({exc}); remove the "
                           "directory if it is stale") from None
    for name in [bridge] + [x for nd in nodes for x in (nd.netns, nd.veth)]:
        if name is not None and not _OWNED_NAME.fullmatch(str(name)):
            raise ClusterError(f"{path} names {name!r}, which is not a name 'hpcbatch cluster "
                               "up' makes; nothing was touched, fix or remove that file")
    return ClusterInfo(d, state.get("user") or _whoami(), d / "id_ed25519", d / "known_hosts",
                       d / "ssh_config", d / "pool.json", nodes, bridge)


def cluster_status(directory: str | os.PathLike) -> ClusterInfo:
    """The cluster's nodes, each with ``alive`` set (its sshd PID is still ours) and, in
    netns mode, ``link_up`` (its veth is up; None once it is gone)."""
    info = _load(directory)
    for nd in info.nodes:
        nd.alive = _is_ours(nd)
        if nd.veth:
            nd.link_up = _link_up(nd.veth)
    return info


def _stop_node(nd: NodeInfo) -> bool:
    """Kill the node's sshd tree by PID and (netns) whatever else is in its namespace."""
    stopped = _is_ours(nd)
    if stopped:
        _kill_tree(nd.pid)
    if nd.netns:
        stopped = _kill_netns(nd.netns) or stopped
    return stopped


def kill_node(directory: str | os.PathLike, name: str) -> bool:
    """Kill one node's sshd and everything under it (its sessions): a node lost. In netns
    mode every process in the node's namespace dies too (agent, ranks, daemons).

    Returns False if it was already down."""
    return _stop_node(_load(directory).node(name))


def start_node(directory: str | os.PathLike, name: str, timeout_s: float = 15.0) -> NodeInfo:
    """Start a stopped node's sshd again: same host key, address and port (a node that
    comes back after a loss). Raises ClusterError if it is running."""
    info = _load(directory)
    nd = info.node(name)
    if _is_ours(nd):
        raise ClusterError(f"node {name} of the cluster in {info.directory} is running "
                           f"(sshd pid {nd.pid})")
    if nd.netns and nd.netns not in _netns_names():
        raise ClusterError(f"node {name}'s namespace {nd.netns} is gone (was the cluster "
                           f"taken down?); start a new cluster with 'hpcbatch cluster up'")
    proc = _start_sshd(nd, info.directory)
    failed = _wait_listening({name: proc}, info.directory, time.monotonic() + timeout_s)
    if failed:
        proc.wait()
        raise _start_error(info.directory, failed)
    nd.pid, nd.start_time = proc.pid, _start_time(proc.pid) or 0
    _write_state(info)
    return nd


def set_link(directory: str | os.PathLike, name: str, up: bool) -> None:
    """Cut (up=False) or restore a netns node's link: its root-side veth goes down, the
    node becomes unreachable while its processes live on."""
    info = _load(directory)
    nd = info.node(name)
    if not nd.veth:
        raise ClusterError(f"node {name} of the cluster in {info.directory} is on loopback; "
                           "cutting a link needs a cluster made with 'cluster up --netns'")
    _ip("link", "set", nd.veth, "up" if up else "down")


def cluster_down(directory: str | os.PathLike) -> list[str]:
    """Stop exactly the sshd processes this cluster started, and their sessions; in netns
    mode also what is left in its namespaces, then delete its namespaces, veths and
    bridge.

    Returns the names of the nodes stopped; a second call stops nothing and returns [].
    Files in the directory stay (keys, known_hosts, pool.json, logs)."""
    info = _load(directory)
    stopped = [nd.name for nd in info.nodes if _stop_node(nd)]
    _remove_network(info)
    return stopped
