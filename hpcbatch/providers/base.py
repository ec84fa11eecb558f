"""The provider seam: where a pool's nodes come from and how an agent reaches them.

One small base class (Parsl's ``providers/base.py`` is the model). A provider is made
for one pool (:func:`hpcbatch.providers.provider_for`) from its stored ``PoolSpec``
(``provider_config`` stays a JSON dict at rest; ``Provider.config`` is its typed form)
and the home directory. Everything that differs between local, SSH and (later) Slurm
nodes lives behind these methods; no module outside ``hpcbatch/providers/`` compares a
provider name.

Blocking methods (``start_agent``, ``fence``, ``read_node_file``, ``remove_tree``,
``cleanup_pool``, ``reap_orphans``, ``preflight``) may take seconds on a remote node:
call them off the coordinator's loop.

A node's root (where its task directories live) is unique per home: two homes on one
login never share one (see :func:`home_id`).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.models import PoolSpec
from hpcbatch.timings import Timings

if TYPE_CHECKING:
    from hpcbatch.ssh import GroupResult
    from hpcbatch.transport import AgentChannel

HOME_ID_FILE = "home-id"
_HOME_ID_RE = re.compile(r"[0-9a-f]{8}")


def home_id(home: str | os.PathLike) -> str:
    """A short random id of this home, made once and kept in ``<home>/home-id``.

    Remote node roots carry it, so two homes on one login that each have a pool of
    the same name never write into (or delete) each other's task directories."""
    path = Path(home) / HOME_ID_FILE
    for _ in range(2):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it meanwhile: read theirs
                continue
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(4) + "\n")
            continue
        except OSError as exc:
            raise HpcBatchError(f"cannot read the home's id {path}: "
                                f"{exc.strerror or exc}") from None
        if not _HOME_ID_RE.fullmatch(text):
            raise HpcBatchError(f"{path} holds {text[:40]!r}, not a home id (8 hex digits); "
                                "remove it only if no pool of this home has remote nodes")
        return text
    raise HpcBatchError(f"cannot create the home's id {path}")  # pragma: no cover


@dataclasses.dataclass(frozen=True, slots=True)
class NodeDesc:
    """A node a provider offers: its id in the pool, the host name MPI uses for it in
    hostfiles, its task slots, and what is known of it before its agent says hello."""

    node_id: str
    host: str
    slots: int
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


MAX_LISTED = 10_000  # entries list_node_dir returns at most


@dataclasses.dataclass(frozen=True, slots=True)
class NodeFile:
    """One entry of a directory on a node: ``name`` relative to the directory listed;
    ``kind`` file, dir, link or other."""

    name: str
    size: int
    modified_at: float
    kind: str


def check_relpath(relpath: str) -> str:
    """A path relative to a node root that stays inside it ('jobs/J', not '../x')."""
    norm = os.path.normpath(relpath)
    if not relpath or os.path.isabs(relpath) or norm in (".", "..") or \
            norm.startswith("../") or "\0" in relpath:
        raise ValidationError("path", f"{relpath!r} is not a path inside a node root")
    return norm


class Provider(abc.ABC):
    """The nodes of one pool and the ways to reach them."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()  # make_spec's provider options
    # elastic: nodes come from grow() and go back through shrink() (Slurm); else the
    # nodes at a target are fixed_nodes() of the spec at that target
    elastic: ClassVar[bool] = False
    # ordered: the nodes at target N are the first N of a fixed list (an SSH host list):
    # a shrink drains the others, whatever they run; else the state picks who leaves
    ordered: ClassVar[bool] = False
    # files_here: the nodes' files are on this machine (read without a connection), so
    # a successful task's logs are kept only when hpcbatch is to remove its directory
    files_here: ClassVar[bool] = False

    def __init__(self, spec: PoolSpec, home: str | os.PathLike):
        self.spec = spec
        self.pool_id = spec.id
        self.home = Path(home)
        self.config = self.parse_config(spec.provider_config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pool={self.pool_id}>"

    # ---- configuration ---------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> Any:
        """The stored provider_config as this provider's typed config (ValidationError
        naming the field when it is not one)."""

    @classmethod
    def make_spec(cls, pool_id: str, *, task_slots_per_node: int = 1,
                  scheduling_policy: str = "pack", target_nodes: int = 1,
                  start_task: str | None = None, inter_node_communication: bool | None = None,
                  **options: Any) -> PoolSpec:
        """A validated PoolSpec from what a user gave (``options`` are the provider's
        own, e.g. an SSH pool's spec= or hostlist=). Makes no connection."""
        if options:
            raise ValidationError("pool", f"{', '.join(sorted(options))} are not options of "
                                  f"{cls.name} pools")
        return PoolSpec(pool_id, cls.name, task_slots_per_node=task_slots_per_node,
                        scheduling_policy=scheduling_policy, target_nodes=target_nodes,
                        start_task=start_task, provider_config={},
                        inter_node_communication=bool(inter_node_communication))

    @property
    def key_dir(self) -> Path:
        """Where this home keeps the pool's own files (its inter-node key pair)."""
        return self.home / "pools" / self.pool_id

    @property
    def node_python(self) -> str:
        """The python that runs hpcbatch on the nodes (kernels' ranks use it)."""
        import sys
        return sys.executable

    @property
    def mpi_prefix(self) -> str | None:
        """The nodes' MPI installation (``<prefix>/bin/mpiexec``) hpcbatch-mpiexec uses;
        None: the mpiexec beside ``node_python`` (a venv's MPI wheel), else the nodes'
        PATH."""
        return None

    def launch_note(self) -> str:
        """What ``hpcbatch-mpiexec -- python ...`` means on this pool's nodes."""
        mpi = (f"{self.mpi_prefix}/bin/mpiexec" if self.mpi_prefix else
               "the mpiexec beside that python, else the nodes' PATH")
        return f"launch: python {self.node_python}; MPI {mpi} (hpcbatch-mpiexec on tasks' PATH)"

    def where(self) -> str:
        """One phrase saying where the nodes are, for messages ('node1, node2')."""
        return ", ".join(n.node_id for n in self.fixed_nodes())

    def notes(self) -> list[str]:
        """Extra lines 'pool show' prints about this pool."""
        return [self.launch_note()]

    def preflight(self, *, trust_on_first_use: bool = False,
                  timeout_s: float = 30.0) -> GroupResult:
        """Check every node can be reached (before a pool is stored); nothing to check
        by default."""
        from hpcbatch.ssh import GroupResult, HostResult
        return GroupResult([HostResult(n.node_id, value="ok") for n in self.fixed_nodes()])

    # ---- nodes -----------------------------------------------------------

    @abc.abstractmethod
    def fixed_nodes(self) -> list[NodeDesc]:
        """The pool's nodes when the provider has a fixed set (local, SSH); [] for an
        elastic provider, whose nodes come from grow()."""

    def capacity(self) -> int | None:
        """The most nodes the pool can have (an SSH pool: its host list); None: no
        limit beyond the provider's own (a resize above it is refused)."""
        return None

    def grow(self, n: int) -> list[NodeDesc]:
        """Ask for n more nodes (elastic providers; the Slurm issue fills this in).
        Called on a worker thread of the coordinator, may block; returns the nodes
        granted (fewer than n, or none, is fine: each joins the pool as it is granted;
        a later resize or autoscale evaluation asks again). The coordinator calls
        ``shrink`` with a node's id once it has left the pool (its agent stopped)."""
        raise NotImplementedError(f"pool {self.pool_id!r}: {self.name} pools have a fixed "
                                  "set of nodes; they cannot grow")

    def shrink(self, node_ids: Iterable[str]) -> None:
        """Give nodes back (elastic providers)."""
        raise NotImplementedError(f"pool {self.pool_id!r}: {self.name} pools have a fixed "
                                  "set of nodes; they cannot shrink")

    def stop(self, final: bool = True) -> None:  # noqa: B027 - a hook: most need nothing
        """hpcbatch stops: give back what the pool holds (elastic providers). Called
        with ``final=False`` first (stop asking for nodes: agent starts that wait give
        up), then, once the agents have shut down, with ``final=True``."""

    @abc.abstractmethod
    def start_agent(self, node: NodeDesc, *, token: str, timings: Timings) -> AgentChannel:
        """Start an agent on the node (blocking) and return its channel."""

    @abc.abstractmethod
    def fence(self, node: NodeDesc, token: str, pids: Iterable[int]) -> bool:
        """Kill whatever the agent started with ``token`` (and the process sessions of
        ``pids``) left running on the node. True only when the provider is sure nothing
        of them runs any more; False when it cannot tell (an unreachable node): then the
        caller waits for the agent's lease to run out before running its tasks again."""

    @abc.abstractmethod
    def reap_orphans(self, agent_records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Kill what earlier agents of this home left on the pool's nodes (records as
        ``Store.agents()`` returns them; those of other pools are skipped). Returns one
        line per node where that could not be done."""

    # ---- files on the nodes ----------------------------------------------

    @abc.abstractmethod
    def node_root(self, node_id: str) -> str:
        """Where the node keeps its task directories (``~/`` is the login's home)."""

    @abc.abstractmethod
    def read_node_file(self, node_id: str, path: str, *, offset: int = 0,
                       length: int | None = None) -> bytes:
        """A regular file of a node (task logs), from byte ``offset``, at most ``length``
        bytes (None: to the end). A symbolic link (the file or a directory on the way
        from the node root) is refused, never followed. FileNotFoundError when it does
        not exist, OSError otherwise."""

    @abc.abstractmethod
    def list_node_dir(self, node_id: str, path: str,
                      limit: int = MAX_LISTED) -> list[NodeFile]:
        """The entries under directory ``path`` of a node, recursively, names relative
        to it, sorted; symbolic links are listed as what they are and never followed.
        At most ``limit`` entries. FileNotFoundError when ``path`` does not exist."""

    @abc.abstractmethod
    def remove_tree(self, node_id: str, relpath: str) -> None:
        """Remove ``<node root>/<relpath>`` on the node (missing is fine); raises
        OSError (or an HpcBatchError) saying why it could not."""

    def remove_trees(self, node_ids: Iterable[str], relpath: str,
                     timeout_s: float = 60.0) -> dict[str, str]:
        """remove_tree on many nodes at once: node id -> why it failed (absent: done)."""
        relpath = check_relpath(relpath)
        node_ids = list(dict.fromkeys(node_ids))
        if not node_ids:
            return {}
        failed: dict[str, str] = {}
        pool = concurrent.futures.ThreadPoolExecutor(min(32, len(node_ids)),
                                                     thread_name_prefix="hpcbatch-rm")
        try:
            futures = {pool.submit(self.remove_tree, n, relpath): n for n in node_ids}
            deadline = time.monotonic() + timeout_s
            for fut, node in futures.items():
                try:
                    fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    failed[node] = f"no answer within {timeout_s:g} s"
                except Exception as exc:  # noqa: BLE001 - reported per node
                    failed[node] = _why(exc)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return failed

    def cleanup_pool(self) -> list[str]:
        """Undo what the pool set up beyond its task directories (the pool is being
        deleted; its agents are stopped). Returns one line per problem."""
        shutil.rmtree(self.key_dir, ignore_errors=True)
        return []

    # ---- multi-instance tasks -------------------------------------------

    def inter_node_env(self, node_id: str, node_root: str) -> dict[str, str]:
        """What a multi-instance task's processes on this node need to reach the other
        nodes (HPCBATCH_SSH_CONFIG); ``node_root`` as the agent reported it."""
        return {}


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__
