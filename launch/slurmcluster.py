"""A throw-away Slurm cluster on this machine: one ``slurmctld``, one ``slurmd`` per node.

``slurm_up(n, dir)`` (root only) makes, in a free private subnet 10.77.K.0/24 (the one
picker ``launch.cluster`` uses, under the same lock, so an SSH and a Slurm test cluster
never pick the same one):

* a bridge ``hs<tag>br`` holding ``10.77.K.1`` (the controller's address), and per node a
  network namespace ``hs<tag>-snI`` with ``eth0`` at ``10.77.K.(10+I)`` joined to the bridge
  by a veth ``hs<tag>vI`` (``<tag>`` random per cluster: two clusters never share a name);
* ``slurm.conf`` (``ClusterName=hs<tag>``, its own free controller and slurmd ports,
  ``proctrack/linuxproc``, ``task/none``: no cgroup set-up), its state, spool and log
  folders, all under ``dir``;
* ``slurmctld -D`` in the root namespace, and per node ``slurmd -D -N snI`` entered into
  its namespace with ``nsenter --net`` (``ip netns exec`` remounts /sys and slurmd then dies);
* ``munged`` only when ``munge -n`` fails (none runs); test clusters share the one they
  started (``/run/hpcbatch-munge/``), and the last one taken down stops it.

``slurm-cluster.json`` records every PID (with its start time, so a reused PID is never
taken for ours) and every name made. ``slurm_down(dir)`` stops exactly those daemons,
kills what is left in the cluster's namespaces (job steps), deletes exactly its veths,
namespaces and bridge, stops munged if it is the last cluster sharing the one a test
cluster started, and removes the files it wrote (the folder itself when ``up`` made it).
Clients find the cluster through ``SLURM_CONF=<dir>/slurm.conf``.

Stdlib only, like the rest of ``launch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from hpcbatch.launch import cluster as C
from hpcbatch.launch.cluster import ClusterError

STATE_FILE = "slurm-cluster.json"
CONF_FILE = "slurm.conf"
# what slurm_up writes inside the folder (removed by slurm_down)
_MADE = (CONF_FILE, "state", "spool", "log", STATE_FILE)
_OWNED = re.compile(r"hs[0-9a-f]{6}(br|v[0-9]{1,3}|-sn[0-9]{1,3})")
PACKAGES = "slurmctld slurmd slurm-client munge"
MAX_NODES = 244


@dataclasses.dataclass
class SlurmNode:
    name: str
    addr: str
    netns: str
    veth: str
    pid: int = 0
    start_time: int = 0
    alive: bool | None = None  # filled in by slurm_status
    state: str | None = None  # Slurm's view (sinfo), filled in by slurm_status

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("alive")
        d.pop("state")
        return d


@dataclasses.dataclass
class SlurmCluster:
    directory: Path
    name: str  # ClusterName, hs<tag>
    bridge: str
    controller_addr: str
    ctld_port: int
    slurmd_port: int
    nodes: list[SlurmNode]
    ctld_pid: int = 0
    ctld_start: int = 0
    munged_pid: int = 0  # only when this cluster started munged
    munged_start: int = 0
    made_dir: bool = False
    ctld_alive: bool | None = None

    @property
    def conf(self) -> Path:
        return self.directory / CONF_FILE

    @property
    def env(self) -> dict[str, str]:
        """What a client command needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def running(self) -> bool:
        return bool(self.ctld_alive) or any(nd.alive for nd in self.nodes)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("nodes", "ctld_alive")}
        d["directory"] = str(self.directory)
        d["nodes"] = [nd.to_json() for nd in self.nodes]
        return d


# ---------------------------------------------------------------- checks

def missing_commands() -> list[str]:
    """Slurm's and munge's programs this machine lacks."""
    return [tool for tool in ("slurmctld", "slurmd", "srun", "sbatch", "squeue", "scancel",
                              "sinfo", "munged", "munge")
            if C._sbin_which(tool) is None]


def check_slurm() -> None:
    """ClusterError unless this process can run a test Slurm cluster (root, the packages)."""
    if os.geteuid() != 0:
        raise ClusterError("a Slurm test cluster needs root (slurmd runs as root, one per "
                           "network namespace)")
    missing = missing_commands()
    if missing:
        raise ClusterError(f"{', '.join(missing)} not found: install the Debian/Ubuntu "
                           f"packages {PACKAGES} (apt-get install {PACKAGES})")
    C.check_netns()


# ---------------------------------------------------------------- files

def slurm_conf(cl: SlurmCluster, cpus: int) -> str:
    d = cl.directory
    first, last = cl.nodes[0].addr.rsplit(".", 1), cl.nodes[-1].addr.rsplit(".", 1)
    return "\n".join([
        "# written by 'hpcbatch cluster up --slurm'; removed by 'hpcbatch cluster down'",
        f"ClusterName={cl.name}",
        f"SlurmctldHost={socket.gethostname()}({cl.controller_addr})",
        f"SlurmctldPort={cl.ctld_port}",
        f"SlurmdPort={cl.slurmd_port}",
        "AuthType=auth/munge",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool/slurmd-%n",
        f"SlurmctldPidFile={d}/state/slurmctld.pid",
        f"SlurmdPidFile={d}/spool/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/log/slurmctld.log",
        f"SlurmdLogFile={d}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MinJobAge=10",
        "KillWait=5",
        f"NodeName=sn[1-{len(cl.nodes)}] NodeAddr={first[0]}.[{first[1]}-{last[1]}] "
        f"CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ""])


def _write_state(cl: SlurmCluster) -> None:
    C._write(cl.directory / STATE_FILE, json.dumps(cl.to_json(), indent=2) + "\n", 0o600)


def _load(directory: str | os.PathLike) -> SlurmCluster:
    d = Path(directory).expanduser().resolve()
    path = d / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        nodes = [SlurmNode(**nd) for nd in raw.pop("nodes")]
        raw["directory"] = d
        cl = SlurmCluster(nodes=nodes, **raw)
    except FileNotFoundError:
        raise ClusterError(f"no Slurm cluster in {d} (no {STATE_FILE}); start one with "
                           f"'hpcbatch cluster up --slurm -n 3 --dir {d}'") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{path} is not a Slurm cluster state file ({exc}); remove the "
                           "folder if it is stale") from None
    for name in [cl.bridge] + [x for nd in cl.nodes for x in (nd.netns, nd.veth)]:
        if not _OWNED.fullmatch(str(name)):
            raise ClusterError(f"{path} names {name!r}, which is not a name 'hpcbatch cluster "
                               "up --slurm' makes; nothing was touched, fix or remove that file")
    return cl


def is_slurm_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory).expanduser() / STATE_FILE).exists()


# ---------------------------------------------------------------- processes

def _ours(pid: int, start: int) -> bool:
    return bool(pid) and C.pid_alive(pid) and C._start_time(pid) == start


def _stop(pid: int, start: int, timeout_s: float = 10.0) -> bool:
    """SIGTERM our daemon (by PID, its start time checked), SIGKILL after timeout_s."""
    if not _ours(pid, start):
        return False
    C._signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while C.pid_alive(pid) and time.monotonic() < deadline:
        if _is_child(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if C.pid_alive(pid):
        C._kill_tree(pid)
    C._reap(pid)
    return True


def _is_child(pid: int) -> bool:
    fields = C._stat_fields(pid)
    return fields is not None and int(fields[1]) == os.getpid()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)


def _munge_ok() -> bool:
    try:
        r = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# munged is shared by every test cluster on the machine: the one that finds none starts
# it (recorded here), each cluster using it leaves a file here, the last one out stops it
MUNGE_DIR = Path("/run/hpcbatch-munge")
MUNGE_STATE = MUNGE_DIR / "munged.json"


@contextlib.contextmanager
def _munge_lock():
    import fcntl
    MUNGE_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(MUNGE_DIR / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _started_munged() -> tuple[int, int] | None:
    """(pid, start time) of the munged a test cluster started, while it runs."""
    try:
        rec = json.loads(MUNGE_STATE.read_text())
        pid, start = int(rec["pid"]), int(rec["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, start) if _ours(pid, start) else None


def _start_munged(cl: SlurmCluster) -> None:
    """Use the munged that answers, or start one (then test clusters share it: the last
    one taken down stops it; one that runs without us is never stopped)."""
    with _munge_lock():
        if not _munge_ok():
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "-c"], capture_output=True, check=False)
            for d in ("/run/munge", "/var/log/munge"):
                os.makedirs(d, exist_ok=True)
                shutil.chown(d, "munge", "munge")
            pidfile = MUNGE_DIR / "munged.pid"
            pidfile.unlink(missing_ok=True)
            r = subprocess.run([C._sbin_which("munged") or "munged", "--force",
                                "--pid-file", str(pidfile)], capture_output=True, text=True)
            if r.returncode != 0:
                raise ClusterError(f"munged did not start: {' '.join(r.stderr.split())[:300]}")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not pidfile.exists():
                time.sleep(0.05)
            pid = int(pidfile.read_text().split()[0])
            MUNGE_STATE.write_text(json.dumps({"pid": pid, "start": C._start_time(pid)}))
            while time.monotonic() < deadline and not _munge_ok():
                time.sleep(0.05)
        started = _started_munged()
        if started is not None:  # ours to share: count this cluster in
            cl.munged_pid, cl.munged_start = started
            (MUNGE_DIR / f"user-{cl.name}").touch()
    _write_state(cl)


def _release_munged(cl: SlurmCluster) -> bool:
    """This cluster no longer needs munged; the last of the clusters sharing the one a
    test cluster started stops it. True when it was stopped."""
    if not cl.munged_pid:
        return False
    with _munge_lock():
        (MUNGE_DIR / f"user-{cl.name}").unlink(missing_ok=True)
        users = [p for p in MUNGE_DIR.glob("user-hs*")
                 if not _cluster_alive(p.name.removeprefix("user-"))]
        for p in users:  # clusters that died without taking themselves down
            p.unlink(missing_ok=True)
        if any(MUNGE_DIR.glob("user-hs*")) or _started_munged() != (cl.munged_pid,
                                                                    cl.munged_start):
            return False
        MUNGE_STATE.unlink(missing_ok=True)
        return _stop(cl.munged_pid, cl.munged_start)


def _cluster_alive(name: str) -> bool:
    """A slurmctld of the cluster of that name still runs (its -f names its folder; its
    ClusterName is in the conf, found through /proc)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"slurmctld") and b"-f" in argv:
            conf = argv[argv.index(b"-f") + 1].decode(errors="replace")
            try:
                if f"ClusterName={name}\n" in Path(conf).read_text():
                    return True
            except OSError:
                continue
    return False


def sinfo_states(cl: SlurmCluster) -> dict[str, str]:
    """node -> Slurm's state of it ({} when the controller does not answer)."""
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True,
                           text=True, timeout=10, env={**os.environ, **cl.env})
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)


# ---------------------------------------------------------------- up / status / down

def slurm_up(n: int, directory: str | os.PathLike, *, timeout_s: float = 30.0,
             cpus: int | None = None) -> SlurmCluster:
    """Start a Slurm cluster of n nodes sn1..snN; see the module docstring."""
    check_slurm()
    if not isinstance(n, int) or not 1 <= n <= MAX_NODES:
        raise ClusterError(f"number of nodes must be a whole number 1..{MAX_NODES}, not {n!r}")
    d = Path(directory).expanduser().resolve()
    if is_slurm_dir(d):
        old = slurm_status(d)
        if old.running:
            raise ClusterError(f"a Slurm cluster is already running in {d}; stop it first "
                               f"with 'hpcbatch cluster down --dir {d}'")
        slurm_down(d)
    made_dir = not d.exists()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    cl = None
    try:
        with C._netns_lock():
            net = C._free_subnet()
            taken = C._ip("-o", "link", "show") + "\n".join(C._netns_names())
            while True:
                tag = os.urandom(3).hex()
                if f"hs{tag}" not in taken:
                    break
            nodes = [SlurmNode(f"sn{i}", str(net[10 + i]), f"hs{tag}-sn{i}", f"hs{tag}v{i}")
                     for i in range(1, n + 1)]
            cl = SlurmCluster(d, f"hs{tag}", f"hs{tag}br", str(net[1]), C._free_port(),
                              C._free_port(), nodes, made_dir=made_dir)
            for sub in ("state", "spool", "log"):
                (d / sub).mkdir(exist_ok=True, mode=0o700)
            _write_state(cl)  # before anything is made: a crash leaves what down cleans
            C._ip("link", "add", cl.bridge, "type", "bridge")
            C._ip("addr", "add", f"{net[1]}/{net.prefixlen}", "dev", cl.bridge)
            C._ip("link", "set", cl.bridge, "up")
        for nd in nodes:
            C._ip("netns", "add", nd.netns)
            C._ip("link", "add", nd.veth, "type", "veth", "peer", "name", "eth0",
                  "netns", nd.netns)
            C._ip("link", "set", nd.veth, "master", cl.bridge, "up")
            C._ip("addr", "add", f"{nd.addr}/24", "dev", "eth0", ns=nd.netns)
            C._ip("link", "set", "eth0", "up", ns=nd.netns)
            C._ip("link", "set", "lo", "up", ns=nd.netns)
            (d / "spool" / f"slurmd-{nd.name}").mkdir(exist_ok=True, mode=0o700)
        C._write(cl.conf, slurm_conf(cl, cpus or os.cpu_count() or 1))
        _start_munged(cl)
        ctld = _spawn([C._sbin_which("slurmctld") or "slurmctld", "-D", "-f", str(cl.conf)],
                      d / "log" / "slurmctld.out")
        cl.ctld_pid, cl.ctld_start = ctld.pid, C._start_time(ctld.pid) or 0
        for nd in nodes:
            p = _spawn([C._sbin_which("nsenter") or "nsenter", f"--net=/var/run/netns/{nd.netns}",
                        C._sbin_which("slurmd") or "slurmd", "-D", "-N", nd.name,
                        "-f", str(cl.conf)], d / "log" / f"slurmd-{nd.name}.out")
            nd.pid, nd.start_time = p.pid, C._start_time(p.pid) or 0
        _write_state(cl)
        deadline = time.monotonic() + timeout_s
        while True:
            states = sinfo_states(cl)
            if len(states) == n and all(s.startswith("idle") for s in states.values()):
                break
            dead = [name for name, pid in [("slurmctld", ctld.pid)] +
                    [(nd.name, nd.pid) for nd in nodes] if not C.pid_alive(pid)]
            if dead or time.monotonic() > deadline:
                why = (f"{', '.join(dead)} exited" if dead else
                       f"nodes not idle after {timeout_s:g} s ({states or 'no answer'})")
                raise ClusterError(f"the Slurm cluster in {d} did not come up: {why}; see "
                                   f"{d}/log/")
            time.sleep(0.1)
    except BaseException:
        if cl is not None:
            with contextlib.suppress(Exception):
                slurm_down(d, keep_logs=True)
        raise
    for nd in nodes:
        nd.alive = True
    cl.ctld_alive = True
    return cl


def slurm_status(directory: str | os.PathLike) -> SlurmCluster:
    cl = _load(directory)
    cl.ctld_alive = _ours(cl.ctld_pid, cl.ctld_start)
    states = sinfo_states(cl) if cl.ctld_alive else {}
    for nd in cl.nodes:
        nd.alive = _ours(nd.pid, nd.start_time)
        nd.state = states.get(nd.name)
    return cl


def slurm_down(directory: str | os.PathLike, *, keep_logs: bool = False) -> list[str]:
    """Stop exactly what slurm_up started and remove what it made. Returns the names of
    the daemons stopped ([] on a second call)."""
    cl = _load(directory)
    stopped = [nd.name for nd in cl.nodes if _stop(nd.pid, nd.start_time)]
    if _stop(cl.ctld_pid, cl.ctld_start):
        stopped.append("slurmctld")
    spaces = C._netns_names()
    for nd in cl.nodes:
        if nd.netns in spaces:
            C._kill_netns(nd.netns)  # job steps and whatever they started
        if C._link_exists(nd.veth):  # explicitly: some sandboxes keep a veth after its netns
            C._ip("link", "del", nd.veth)
        if nd.netns in spaces:
            C._ip("netns", "del", nd.netns)
    if C._link_exists(cl.bridge):
        C._ip("link", "del", cl.bridge)
    if _release_munged(cl):
        stopped.append("munged")
    if not keep_logs:
        if cl.made_dir:
            shutil.rmtree(cl.directory, ignore_errors=True)
        else:
            for name in _MADE:
                p = cl.directory / name
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    return stopped


def leftovers(cl: SlurmCluster) -> list[str]:
    """What of this cluster still exists: [] after a clean slurm_down (for tests)."""
    spaces = C._netns_names()
    left = [f"namespace {nd.netns}" for nd in cl.nodes if nd.netns in spaces]
    left += [f"link {x}" for x in [nd.veth for nd in cl.nodes] + [cl.bridge]
             if C._link_exists(x)]
    left += [f"pid {p}" for p, s in [(cl.ctld_pid, cl.ctld_start)] +
             [(nd.pid, nd.start_time) for nd in cl.nodes] if _ours(p, s)]
    if (MUNGE_DIR / f"user-{cl.name}").exists():
        left.append(f"{MUNGE_DIR}/user-{cl.name}")
    if (cl.directory / STATE_FILE).exists():
        left.append(str(cl.directory / STATE_FILE))
    return left
