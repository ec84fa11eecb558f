"""The ``ssh`` provider: a fixed list of hosts reached over SSH (paramiko).

An SSH pool's ``provider_config`` holds its hosts (name, hostname, port, user,
key, known_hosts), the client key, the known_hosts file (checked strictly), an
optional ssh_config, the remote python, the node root and the nodes'
authorized_keys file (where the pool's inter-node key goes). ``ssh_pool_config``
builds it from a pool.json spec (what ``hpcbatch cluster up`` writes) or from a
host list, through :func:`hpcbatch.ssh.targets_from_spec`, which resolves and
checks every host; :class:`SSHConfig` is its typed form.

A node keeps its task directories in ``<node_root>/<home id>/<pool>/<node>``
(``node_root`` defaults to ``~/.hpcbatch-node``): the home's id keeps two homes on one
login apart even when both have a pool of the same name.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import shutil
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcbatch import env as E
from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.models import PoolSpec
from hpcbatch.providers.base import (
    MAX_LISTED,
    NodeDesc,
    NodeFile,
    Provider,
    check_relpath,
    home_id,
)
from hpcbatch.ssh import GroupResult, SSHTarget, connect, parallel, run, targets_from_spec
from hpcbatch.timings import Timings

if TYPE_CHECKING:
    from hpcbatch.transport import AgentChannel

DEFAULT_NODE_ROOT = "~/.hpcbatch-node"
# what a pool spec (pool.json) may say; anything else is a typo worth naming
SPEC_FIELDS = ("provider", "hosts", "user", "port", "key", "known_hosts", "ssh_config",
               "connect_timeout_s", "python", "node_root", "authorized_keys",
               "node_ssh_config", "mpi_prefix")
_PATH_FIELDS = ("key", "known_hosts", "ssh_config")
_STORED_FIELDS = frozenset(SPEC_FIELDS) - {"provider"}


# ---------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True, slots=True)
class SSHHost:
    name: str
    hostname: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SSHConfig:
    """An SSH pool's provider config, typed (the stored JSON dict is ``to_dict()``)."""

    hosts: tuple[SSHHost, ...]
    python: str = "python3"
    node_root: str | None = None  # default DEFAULT_NODE_ROOT
    authorized_keys: str | None = None  # default ~/.ssh/authorized_keys
    node_ssh_config: str | None = None  # an ssh_config the nodes have (inter-node off)
    mpi_prefix: str | None = None  # the nodes' MPI (<prefix>/bin/mpiexec) for hpcbatch-mpiexec
    connect_timeout_s: float = 10.0
    key: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    user: str | None = None
    port: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SSHConfig:
        if not isinstance(raw, Mapping):
            raise ValidationError("pool.provider_config", "must be a JSON object")
        unknown = sorted(set(raw) - _STORED_FIELDS)
        if unknown:
            raise ValidationError("pool.provider_config", f"unknown field(s) "
                                  f"{', '.join(unknown)}; known: "
                                  f"{', '.join(sorted(_STORED_FIELDS))}")
        hosts = raw.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(
                isinstance(h, Mapping) and h.get("name") and h.get("hostname") for h in hosts):
            raise ValidationError("pool.provider_config.hosts", "must be a non-empty list of "
                                  "{name, hostname, port, user} (make the pool with "
                                  "'hpcbatch pool create --spec' or --ssh)")
        timeout = raw.get("connect_timeout_s") or 10.0
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValidationError("pool.provider_config.connect_timeout_s",
                                  f"must be a number of seconds > 0, not {timeout!r}")
        for field in ("python", "node_root", "authorized_keys", "node_ssh_config",
                      "mpi_prefix"):
            v = raw.get(field)
            if v is not None and (not isinstance(v, str) or not v.strip() or "\0" in v):
                raise ValidationError(f"pool.provider_config.{field}",
                                      f"must be a non-empty path, not {v!r}")
        return cls(
            hosts=tuple(SSHHost(str(h["name"]), str(h["hostname"]), int(h.get("port") or 22),
                                h.get("user"), h.get("key"), h.get("known_hosts"))
                        for h in hosts),
            python=raw.get("python") or "python3", node_root=raw.get("node_root"),
            authorized_keys=raw.get("authorized_keys"),
            node_ssh_config=raw.get("node_ssh_config"), mpi_prefix=raw.get("mpi_prefix"),
            connect_timeout_s=float(timeout),
            key=raw.get("key"), known_hosts=raw.get("known_hosts"),
            ssh_config=raw.get("ssh_config"), user=raw.get("user"), port=raw.get("port"))

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["hosts"] = [dataclasses.asdict(h) for h in self.hosts]
        return out

    def targets(self) -> list[SSHTarget]:
        """The hosts as connectable targets."""
        return [SSHTarget(h.name, h.hostname, h.port, h.user, h.key or self.key,
                          h.known_hosts or self.known_hosts, self.connect_timeout_s)
                for h in self.hosts]


def _read_spec(spec: str) -> tuple[dict[str, Any], Path]:
    path = Path(spec).expanduser()
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValidationError("--spec", f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValidationError("--spec", f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValidationError("--spec", f"{path} must hold a JSON object with a 'hosts' list")
    unknown = sorted(set(cfg) - set(SPEC_FIELDS))
    if unknown:
        raise ValidationError("--spec", f"{path} has unknown field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(SPEC_FIELDS)}")
    if cfg.get("provider", "ssh") != "ssh":
        raise ValidationError("--spec", f"{path}: provider {cfg['provider']!r} is not 'ssh'")
    return cfg, path.resolve().parent


def ssh_pool_config(*, spec: str | None = None, hostlist: str | None = None,
                    user: str | None = None, key: str | None = None,
                    known_hosts: str | None = None, ssh_config: str | None = None,
                    port: int | None = None, python: str | None = None,
                    node_root: str | None = None, authorized_keys: str | None = None,
                    mpi_prefix: str | None = None) -> dict[str, Any]:
    """Validate and normalise an SSH pool's provider config (no connection made).

    Options given here win over the spec file's."""
    if spec:
        cfg, base = _read_spec(spec)
    elif hostlist:
        cfg, base = {"hosts": hostlist}, Path.cwd()
    else:
        raise ValidationError("pool", "an ssh pool needs --spec FILE or --ssh HOSTLIST")
    for field in _PATH_FIELDS:  # relative paths in a spec file are the file's
        if cfg.get(field):
            cfg[field] = str((base / Path(cfg[field]).expanduser()).resolve())
    for k, v in (("user", user), ("key", key), ("known_hosts", known_hosts),
                 ("ssh_config", ssh_config), ("port", port), ("python", python),
                 ("node_root", node_root), ("authorized_keys", authorized_keys),
                 ("mpi_prefix", mpi_prefix)):
        if v is not None:  # given here: relative to where the command runs
            cfg[k] = str(Path(v).expanduser().resolve()) if k in _PATH_FIELDS else v
    if cfg.get("key") and not Path(cfg["key"]).is_file():
        raise ValidationError("--key", f"key file {cfg['key']} does not exist")
    if cfg.get("ssh_config") and not Path(cfg["ssh_config"]).is_file():
        raise ValidationError("--ssh-config", f"ssh_config {cfg['ssh_config']} does not exist")
    hosts = targets_from_spec(cfg, base_dir=base)
    if not all(t.known_hosts for t in hosts):
        raise ValidationError("--known-hosts", "an ssh pool checks host keys strictly; give "
                              "the known_hosts file that holds the nodes' keys")
    cfg["hosts"] = [{"name": t.name, "hostname": t.hostname, "port": t.port, "user": t.login,
                     "key": t.key_file, "known_hosts": t.known_hosts} for t in hosts]
    cfg["python"] = cfg.get("python") or "python3"
    cfg.pop("provider", None)
    return cfg


def targets(cfg: Mapping[str, Any]) -> list[SSHTarget]:
    """The stored hosts of an SSH pool (its provider_config dict) as connectable targets."""
    return SSHConfig.from_dict(cfg).targets()


def _reap_program() -> str:
    from hpcbatch.providers import reap
    return Path(reap.__file__).read_text()


# ---------------------------------------------------------------- the provider

class SSHProvider(Provider):
    name = "ssh"
    options = frozenset({"spec", "hostlist", "user", "key", "known_hosts", "ssh_config", "port",
                         "python", "node_root", "authorized_keys", "mpi_prefix"})
    config: SSHConfig

    def __init__(self, spec: PoolSpec, home):
        super().__init__(spec, home)
        self._targets = {t.name: t for t in self.config.targets()}
        self._trust = None
        self._trust_lock = threading.Lock()

    @classmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> SSHConfig:
        return SSHConfig.from_dict(raw)

    @classmethod
    def make_spec(cls, pool_id: str, *, task_slots_per_node: int = 1,
                  scheduling_policy: str = "pack", target_nodes: int = 1,
                  start_task: str | None = None, inter_node_communication: bool | None = None,
                  **options: Any) -> PoolSpec:
        """``inter_node_communication`` defaults to on: bootstrap gives the nodes a pool
        key and ssh_config so multi-instance tasks can start MPI across them."""
        config = ssh_pool_config(**options)
        return PoolSpec(pool_id, cls.name, task_slots_per_node=task_slots_per_node,
                        scheduling_policy=scheduling_policy, target_nodes=len(config["hosts"]),
                        start_task=start_task, provider_config=config,
                        inter_node_communication=inter_node_communication is not False)

    def target(self, node_id: str) -> SSHTarget:
        try:
            return self._targets[node_id]
        except KeyError:
            raise ValidationError("node", f"{node_id!r} is not a node of pool "
                                  f"{self.pool_id!r}") from None

    @property
    def node_python(self) -> str:
        return self.config.python

    @property
    def mpi_prefix(self) -> str | None:
        return self.config.mpi_prefix

    def where(self) -> str:
        return ", ".join(self._targets)

    def notes(self) -> list[str]:
        return [self.launch_note(), "inter-node SSH: " + (
            "on: pool key + ssh_config on every node (HPCBATCH_SSH_CONFIG)"
            if self.spec.inter_node_communication else "off: the nodes' own SSH set-up")]

    ordered = True

    def fixed_nodes(self) -> list[NodeDesc]:
        """The first ``target_nodes`` hosts of the host list (the list is the pool's
        capacity: a smaller target leaves the other hosts idle, outside the pool)."""
        return [NodeDesc(t.name, t.name, self.spec.task_slots_per_node,
                         {"hostname": t.hostname, "port": t.port})
                for t in list(self._targets.values())[:self.spec.target_nodes]]

    def capacity(self) -> int:
        return len(self._targets)

    def preflight(self, *, trust_on_first_use: bool = False,
                  timeout_s: float = 30.0) -> GroupResult:
        """Connect to every host once (host key, key, reachability), in parallel."""
        def probe(t: SSHTarget) -> str:
            connect(t, trust_on_first_use=trust_on_first_use).close()
            return "ok"
        return parallel(self._targets.values(), probe, timeout_s)

    def node_root(self, node_id: str) -> str:
        base = (self.config.node_root or DEFAULT_NODE_ROOT).rstrip("/") or "/"
        return posixpath.join(base, home_id(self.home), self.pool_id, node_id)

    # ---- agents ------------------------------------------------------------

    def trust(self):
        """The pool's inter-node trust (key pair, host keys), made once; None when the
        pool has inter-node communication off."""
        if not self.spec.inter_node_communication:
            return None
        with self._trust_lock:
            if self._trust is None:
                from hpcbatch.bootstrap import PoolTrust
                try:
                    self._trust = PoolTrust.load_or_create(self.key_dir, self.pool_id,
                                                           self._targets.values())
                except (OSError, ValueError) as exc:
                    raise HpcBatchError(f"pool {self.pool_id}'s inter-node SSH key could not "
                                        f"be prepared: {exc}") from None
            return self._trust

    def start_agent(self, node: NodeDesc, *, token: str, timings: Timings) -> AgentChannel:
        """Connect (host key checked strictly), install the pool's inter-node trust,
        upload the agent and start it."""
        from hpcbatch.transport import SSHTransport

        target = self.target(node.node_id)
        trust = self.trust()
        setup = None
        if trust is not None:
            def setup(client, abs_root: str) -> None:
                trust.install(client, abs_root, self.config.authorized_keys, node.node_id)
        return SSHTransport(self.config.python, self.mpi_prefix).start_agent(
            target, node.node_id, self.node_root(node.node_id), token=token, timings=timings,
            slots=node.slots, setup=setup)

    def _reap_on(self, node_id: str, request: dict[str, Any], timeout_s: float) -> int:
        """Run the reaper on the node; how many processes it left (its exit status 3)."""
        client = connect(self.target(node_id))
        try:
            code, out, err = run(client, [self.config.python, "-c", _reap_program(),
                                          json.dumps(request)], timeout_s)
        finally:
            client.close()
        try:
            return int(json.loads(out.strip().splitlines()[-1])["left"])
        except (ValueError, KeyError, IndexError):
            raise HpcBatchError(f"{node_id}: the reaper did not answer (exit {code}): "
                                f"{err.strip()[-200:]}") from None

    def fence(self, node: NodeDesc, token: str, pids: Iterable[int]) -> bool:
        request = {"tokens": [token], "sessions": [int(p) for p in pids], "deadline_s": 5.0,
                   "grace_s": Timings.kill_grace_s}
        try:
            return self._reap_on(node.node_id, request, self.config.connect_timeout_s + 15) == 0
        except Exception:  # noqa: BLE001 - unreachable, or no python: not sure
            return False

    def reap_orphans(self, agent_records: Iterable[Mapping[str, Any]]) -> list[str]:
        by_node: dict[str, list[Mapping[str, Any]]] = {}
        for r in agent_records:
            if r.get("pool_id") == self.pool_id and r.get("node_id") in self._targets:
                by_node.setdefault(r["node_id"], []).append(r)
        if not by_node:
            return []

        def reap_one(t: SSHTarget) -> int:
            recs = by_node[t.name]
            return self._reap_on(t.name, {
                "tokens": [r["token"] for r in recs if r.get("token")],
                "agents": [[r["pid"], r["root"]] for r in recs
                           if r.get("pid") and r.get("root")], "deadline_s": 5.0,
                "grace_s": Timings.kill_grace_s}, 60)
        result = parallel([self._targets[n] for n in by_node], reap_one, 90)
        problems = [f"{r.name}: what an earlier agent left could not be reaped ({r.error})"
                    for r in result.failed]
        problems += [f"{r.name}: {r.value} process(es) of an earlier agent could not be "
                     "killed" for r in result.succeeded if r.value]
        return problems

    # ---- files -------------------------------------------------------------

    def _sftp_nofollow(self, sftp, node_id: str, path: str) -> None:
        """Refuse ``path`` (as the agent reported it: absolute) when it or a directory on
        the way from the node root is a symbolic link (lstat, component by component).
        A root under ``~/`` is found in the path by its part below the login's home."""
        root = self.node_root(node_id)
        base = rest = ""
        if root.startswith("~/"):
            below = root.removeprefix("~/").strip("/")
            if path.startswith(below + "/"):  # relative to the login's home
                base, rest = below, path[len(below):]
            else:
                at = path.find(f"/{below}/")
                if path.startswith("/") and at >= 0:
                    base, rest = path[:at + len(below) + 1], path[at + len(below) + 1:]
        elif path.startswith(root.rstrip("/") + "/"):
            base, rest = root.rstrip("/"), path[len(root.rstrip("/")):]
        parts = [p for p in rest.split("/") if p]
        if not base or not parts or ".." in parts:
            raise HpcBatchError(f"{path} is not inside the node root {root} of {node_id}")
        here = base
        for part in parts:
            here = posixpath.join(here, part)
            if stat.S_ISLNK(sftp.lstat(here).st_mode or 0):
                raise ValidationError("path", f"{path}: {here} is a symbolic link on "
                                      f"{node_id}; hpcbatch does not follow links out of "
                                      "a task directory")

    def read_node_file(self, node_id: str, path: str, *, offset: int = 0,
                       length: int | None = None) -> bytes:
        """Over SFTP; a symbolic link (the file or a directory on the way) is refused."""
        client = connect(self.target(node_id))
        try:
            sftp = client.open_sftp()
            try:
                self._sftp_nofollow(sftp, node_id, path)
                if not stat.S_ISREG(sftp.lstat(path).st_mode or 0):
                    raise ValidationError("path", f"{path} on {node_id} is not a regular file")
                with sftp.open(path, "r") as f:
                    if offset:
                        f.seek(offset)
                    return f.read() if length is None else f.read(length)
            finally:
                sftp.close()
        finally:
            client.close()

    def list_node_dir(self, node_id: str, path: str,
                      limit: int = MAX_LISTED) -> list[NodeFile]:
        """Over SFTP, without following links."""
        client = connect(self.target(node_id))
        try:
            sftp = client.open_sftp()
            try:
                self._sftp_nofollow(sftp, node_id, path)
                out: list[NodeFile] = []
                pending = [""]
                while pending and len(out) < limit:
                    prefix = pending.pop()
                    for a in sorted(sftp.listdir_attr(posixpath.join(path, prefix)),
                                    key=lambda a: a.filename):
                        mode = a.st_mode or 0
                        kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                                else "link" if stat.S_ISLNK(mode) else "other")
                        rel = prefix + a.filename
                        out.append(NodeFile(rel, (a.st_size or 0) if kind == "file" else 0,
                                            float(a.st_mtime or 0), kind))
                        if len(out) >= limit:
                            break
                        if kind == "dir":
                            pending.append(rel + "/")
                return sorted(out, key=lambda f: f.name)
            finally:
                sftp.close()
        finally:
            client.close()

    def remove_tree(self, node_id: str, relpath: str) -> None:
        path = f"{self.node_root(node_id)}/{check_relpath(relpath)}"
        client = connect(self.target(node_id))
        try:  # "~/x" as "x": the command runs in the login's home, and is never expanded
            code, _, err = run(client, ["rm", "-rf", "--", path.removeprefix("~/")])
            if code != 0:
                raise OSError(err.strip() or f"rm exited with {code}")
        finally:
            client.close()

    def cleanup_pool(self) -> list[str]:
        """Over one SSH connection per node: take the pool key out of its
        authorized_keys, then remove its node root (its copy of the pool's private key,
        agent records, shared directories); then the key here. One line per node where
        that failed (a node that cannot be reached keeps both)."""
        trust = None
        if (self.key_dir / "id_ed25519.pub").exists():
            from hpcbatch.bootstrap import PoolTrust
            trust = PoolTrust.load_or_create(self.key_dir, self.pool_id,
                                             self._targets.values())

        def clean(target: SSHTarget) -> None:  # a target's name is its node id
            client = connect(target)
            try:
                if trust is not None:
                    try:
                        trust.revoke(client, self.config.authorized_keys)
                    except Exception as exc:  # noqa: BLE001 - said per node, below
                        raise HpcBatchError(f"the pool key is still in its authorized_keys "
                                            f"({exc})") from None
                root = self.node_root(target.name)
                # "~/x" as "x": the command runs in the login's home, never expanded
                code, _, err = run(client, ["rm", "-rf", "--", root.removeprefix("~/")])
                if code != 0:
                    raise HpcBatchError(f"its node root {root} was not removed "
                                        f"({err.strip() or f'rm exited with {code}'})")
            finally:
                client.close()
        result = parallel(self._targets.values(), clean, 60)
        problems = []
        for r in result.failed:
            why = str(r.error)
            if not why.startswith(("the pool key", "its node root")):  # not reached at all
                why = (f"the pool key is still in its authorized_keys and its node root "
                       f"{self.node_root(r.name)} remains ({why})")
            problems.append(f"{r.name}: {why}")
        shutil.rmtree(self.key_dir, ignore_errors=True)
        return problems

    def inter_node_env(self, node_id: str, node_root: str) -> dict[str, str]:
        if self.spec.inter_node_communication:  # written on every node by bootstrap
            from hpcbatch.bootstrap import SSH_DIR
            return {E.SSH_CONFIG: posixpath.join(node_root, SSH_DIR, "config")}
        if self.config.node_ssh_config:  # the nodes' own SSH set-up, in a config they have
            return {E.SSH_CONFIG: self.config.node_ssh_config}
        return {}


PROVIDER = SSHProvider
