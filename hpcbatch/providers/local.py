"""The ``local`` provider: N simulated nodes on this machine, one agent process each.

Node ``local-I`` keeps its task directories in ``<home>/nodes/<pool>/local-I`` (a
home is one directory per coordinator, so these never clash between homes). The
agent is a child process (``hpcbatch.transport.LocalTransport``); being on this
machine, what it and its tasks left can always be found and killed from here, so
``fence`` is sure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.models import PoolSpec
from hpcbatch.providers import reap as reaping
from hpcbatch.providers.base import MAX_LISTED, NodeDesc, NodeFile, Provider, check_relpath
from hpcbatch.timings import Timings

if TYPE_CHECKING:
    from hpcbatch.transport import AgentChannel


# what a fence or an orphan reap gives a task between SIGTERM and SIGKILL (an mpiexec
# cleans up its session directory and /dev/shm segments on SIGTERM)
REAP_GRACE_S = Timings.kill_grace_s


@dataclasses.dataclass(frozen=True, slots=True)
class LocalConfig:
    """A local pool has nothing to configure beyond its PoolSpec."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LocalConfig:
        if raw:
            raise ValidationError("pool.provider_config", f"a local pool takes no provider "
                                  f"config, not {', '.join(sorted(map(str, raw)))}")
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {}


def processes_with_token(token: str) -> set[int]:
    """PIDs on this machine whose environment carries this agent token."""
    return reaping.scan([token], [], [])


def _open_inside(root: str, path: str, flags: int) -> int:
    """An fd of ``path`` under directory ``root``, opened one component at a time without
    following a symbolic link (O_NOFOLLOW): a task that replaced its stdout.txt (or a
    directory on the way) with a link cannot make us read elsewhere."""
    root = os.path.abspath(root)
    rel = os.path.relpath(os.path.abspath(path), root)
    if rel == "." or rel.startswith("../") or rel == "..":
        raise HpcBatchError(f"{path} is not inside the node root {root}")
    parts = rel.split(os.sep)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = _open_nofollow(part, os.O_RDONLY | os.O_DIRECTORY, fd, path)
            os.close(fd)
            fd = nxt
        return _open_nofollow(parts[-1], flags, fd, path)
    finally:
        os.close(fd)


def read_inside(root: str, path: str, offset: int = 0, length: int | None = None) -> bytes:
    """The regular file ``path`` under directory ``root`` (see :func:`_open_inside`), from
    ``offset``, at most ``length`` bytes."""
    ffd = _open_inside(root, path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(ffd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValidationError("path", f"{path} is not a regular file; refusing to "
                                  "read it")
        if offset:
            f.seek(offset)
        return f.read() if length is None else f.read(length)


def list_inside(root: str, path: str, limit: int) -> list[NodeFile]:
    """The entries under directory ``path`` (inside ``root``), recursively, without
    following links (see :func:`_open_inside`)."""
    top = _open_inside(root, path, os.O_RDONLY | os.O_DIRECTORY)
    out: list[NodeFile] = []
    pending: list[tuple[int, str]] = [(top, "")]
    try:
        while pending and len(out) < limit:
            fd, prefix = pending.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    kind = ("dir" if stat.S_ISDIR(st.st_mode) else
                            "file" if stat.S_ISREG(st.st_mode) else
                            "link" if stat.S_ISLNK(st.st_mode) else "other")
                    rel = prefix + name
                    out.append(NodeFile(rel, st.st_size if kind == "file" else 0,
                                        st.st_mtime, kind))
                    if len(out) >= limit:
                        break
                    if kind == "dir":
                        with contextlib.suppress(OSError):
                            pending.append((os.open(name, os.O_RDONLY | os.O_DIRECTORY |
                                                    os.O_NOFOLLOW | os.O_CLOEXEC,
                                                    dir_fd=fd), rel + "/"))
            finally:
                os.close(fd)
    finally:
        for fd, _ in pending:
            os.close(fd)
    return sorted(out, key=lambda f: f.name)


def _open_nofollow(name: str, flags: int, dir_fd: int, path: str) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise ValidationError("path", f"{path}: {name} is a symbolic link; hpcbatch "
                                  "does not follow links out of a task directory") from None
        raise


class LocalProvider(Provider):
    name = "local"
    files_here = True

    MAX_NODES = 64

    @classmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> LocalConfig:
        return LocalConfig.from_dict(raw)

    @classmethod
    def make_spec(cls, pool_id: str, **kw: Any) -> PoolSpec:
        spec = super().make_spec(pool_id, **kw)
        if spec.target_nodes > cls.MAX_NODES:
            raise ValidationError("pool.target_nodes", f"a local pool simulates at most "
                                  f"{cls.MAX_NODES} nodes on this machine")
        return spec

    def fixed_nodes(self) -> list[NodeDesc]:
        return [NodeDesc(f"local-{i}", "localhost", self.spec.task_slots_per_node)
                for i in range(1, self.spec.target_nodes + 1)]

    def where(self) -> str:
        return f"{self.spec.target_nodes} local node(s)"

    def node_root(self, node_id: str) -> str:
        return str(self.home / "nodes" / self.pool_id / node_id)

    def start_agent(self, node: NodeDesc, *, token: str, timings: Timings) -> AgentChannel:
        root = Path(self.node_root(node.node_id))
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        from hpcbatch.transport import LocalTransport
        return LocalTransport().start_agent(node.node_id, root, token=token, timings=timings,
                                            slots=node.slots)

    def fence(self, node: NodeDesc, token: str, pids: Iterable[int]) -> bool:
        _, left = reaping.reap([token], [int(p) for p in pids], [], deadline_s=5.0,
                               grace_s=REAP_GRACE_S)
        return left == 0

    def reap_orphans(self, agent_records: Iterable[Mapping[str, Any]]) -> list[str]:
        """What the records name (by token, and recorded agent pids still running
        with their node root), then whatever the agents' own records under the root of
        each node the records name (hpcbatch.launch.agent.reap_stale_agents): not the
        other nodes' roots, where live agents of this coordinator may run (a node started
        again, or added to the pool, must not kill its siblings; an agent reaps its own
        root when it starts)."""
        from hpcbatch.launch.agent import reap_stale_agents
        mine = [r for r in agent_records if r.get("pool_id") == self.pool_id]
        left = 0
        if mine:
            _, left = reaping.reap([r["token"] for r in mine if r.get("token")], [],
                                   [[r["pid"], r["root"]] for r in mine
                                    if r.get("pid") and r.get("root")], deadline_s=5.0,
                                   grace_s=REAP_GRACE_S)
        problems = []
        for node_id in sorted({str(r["node_id"]) for r in mine if r.get("node_id")}):
            try:
                reap_stale_agents(self.node_root(node_id), grace_s=REAP_GRACE_S)
            except OSError as exc:
                problems.append(f"{node_id}: earlier agents' records could not be read "
                                f"({exc.strerror or exc})")
        if left:
            problems.append(f"{self.pool_id}: {left} process(es) of earlier agents could not "
                            "be killed")
        return problems

    def read_node_file(self, node_id: str, path: str, *, offset: int = 0,
                       length: int | None = None) -> bytes:
        return read_inside(self.node_root(node_id), path, offset, length)

    def list_node_dir(self, node_id: str, path: str,
                      limit: int = MAX_LISTED) -> list[NodeFile]:
        return list_inside(self.node_root(node_id), path, limit)

    def remove_tree(self, node_id: str, relpath: str) -> None:
        root = os.path.realpath(self.node_root(node_id))
        target = os.path.join(root, check_relpath(relpath))
        if not os.path.lexists(target):
            return
        if os.path.realpath(target) != target:  # a link on the way: not ours to follow
            raise HpcBatchError(f"{target} leads through a symbolic link; not removed")
        shutil.rmtree(target)

    def cleanup_pool(self) -> list[str]:
        problems = super().cleanup_pool()
        shutil.rmtree(self.home / "nodes" / self.pool_id, ignore_errors=True)
        return problems


PROVIDER = LocalProvider
