"""The coordinator: owns the store, runs the scheduler, talks to agents.

It runs on one thread (embedded in the caller's process, or in ``hpcbatch
serve``). Each turn of its loop drains the inbox (agent events, new work, kill
requests), decides with the pure functions of :mod:`hpcbatch.scheduler`, writes
every change of the turn in ONE store transaction, and only then sends the
run/kill messages. So nothing it acts on is held only in memory: a coordinator
killed at any point and restarted finds the store consistent, requeues the
tasks that were in flight, and never runs a completed task again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import logging
import os
import posixpath
import queue
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

from hpcbatch import env as E
from hpcbatch.errors import CoordinatorBusy
from hpcbatch.models import JobSpec, JobState, NodeState, PoolSpec, TaskResult, TaskState
from hpcbatch.scheduler import (
    Allocation,
    Exit,
    NodeSlots,
    Runnable,
    RunQueue,
    decide_exit,
    failure_of,
    schedule_from_queue,
)
from hpcbatch.store import Store
from hpcbatch.transport import AgentChannel, LocalTransport

log = logging.getLogger("hpcbatch.coordinator")

START_TASK_ID = "__start_task__"
RECONNECT_MAX_S = 10.0  # an unusable node is tried again after 1, 2, 4, .. at most this
# Prefetch: a node's agent may hold tasks queued beyond its slots, starting each the moment
# a slot frees, with no round trip to the coordinator between two tasks. It pays only for
# short tasks, and queued work cannot move to a node that frees up meanwhile, so a slot's
# queue holds about PREFETCH_HORIZON_S of work (by the pool's recent task durations), at
# most `prefetch` tasks (Coordinator argument, default DEFAULT_PREFETCH).
DEFAULT_PREFETCH = 4
PREFETCH_HORIZON_S = 0.02


@dataclasses.dataclass
class TaskMeta:
    """What the coordinator keeps in memory for a task that is not completed."""

    seq: int
    job_id: str
    task_id: str
    pool_id: str
    command_line: str
    environment: dict[str, str]
    required_slots: int
    max_retries: int
    wall_s: float | None
    priority: int
    retry_count: int = 0
    node_id: str | None = None
    instances: int = 0  # > 0: a multi-instance task
    slots_per_instance: int = 0
    coordination_command: str | None = None
    alloc: Allocated | None = None
    resource_files: list[dict] = dataclasses.field(default_factory=list)
    common_files: list[dict] = dataclasses.field(default_factory=list)
    staging: dict[int | str, int] = dataclasses.field(default_factory=dict)  # run id -> gen
    pending_run: dict | None = None  # an ordinary task's run message, sent once staged
    terminated: bool = False  # a terminate was asked: this attempt is the last


@dataclasses.dataclass
class Allocated:
    """A running multi-instance task: its nodes and what is still to exit."""

    nodes: list[NodeHandle]
    slots: list[int]  # per node
    phase: str  # "coordination" or "application"
    pending: set[str]  # run ids still to exit
    task_dir: str
    failed: Exit | None = None
    failed_ev: dict = dataclasses.field(default_factory=dict)  # the first failure's event


@dataclasses.dataclass
class NodeHandle:
    pool_id: str
    node_id: str
    slots: int
    host: str = "localhost"
    channel: AgentChannel | None = None
    state: NodeState = NodeState.STARTING
    root: str | None = None
    used: int = 0  # slots of tasks running or queued here
    held: int = 0  # allocations of multi-instance tasks holding this node
    running: set[int | str] = dataclasses.field(default_factory=set)  # run ids
    pids: dict[int | str, int] = dataclasses.field(default_factory=dict)  # run id -> pid
    local: bool = True  # on this machine: its process groups can be killed from here
    token: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))
    last_seen: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    target: Any = None  # SSH nodes: the SSHTarget
    booting: bool = False  # an SSH bootstrap thread is running for it
    retry_at: float | None = None  # when an unusable node is tried again
    retry_s: float = 1.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool_id, self.node_id)


def _instance_of(rid: str) -> tuple[str, int]:
    """A multi-instance run id 'SEQ.a' / 'SEQ.cI' / 'SEQ.sI' as (kind, instance index):
    the application (on the primary), coordination command I, or staging files to I."""
    part = rid.split(".", 1)[1]
    return ("a", 0) if part == "a" else (part[0], int(part[1:]))


def processes_with_token(token: str) -> set[int]:
    """PIDs on this machine whose environment carries this agent token."""
    needle = f"{E.AGENT_TOKEN}={token}".encode() + b"\0"
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if needle in f.read():
                        found.add(int(entry.name))
            except OSError:
                continue
    return found


DEFAULT_SSH_NODE_ROOT = "~/.hpcbatch-node"


def ssh_node_root(provider_config: dict[str, Any], pool_id: str, node_id: str) -> str:
    """Where an SSH node keeps its task directories (``~`` is the login's home)."""
    base = provider_config.get("node_root") or DEFAULT_SSH_NODE_ROOT
    return f"{base.rstrip('/')}/{pool_id}/{node_id}"


def default_home() -> Path:
    return Path(os.environ.get(E.HOME) or Path.home() / ".hpcbatch").expanduser()


class HomeLock:
    """One coordinator per home directory (an flock; released by the kernel on death)."""

    def __init__(self, home: Path):
        self.path = home / "coordinator.lock"
        home.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise CoordinatorBusy(
                f"another coordinator (pid {other}) is running on {home}; wait for it to "
                f"finish, stop it, or set {E.HOME} to another directory") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Coordinator:
    """The process-wide owner of state for one home directory."""

    def __init__(self, home: Path | str | None = None, *, heartbeat_s: float = 1.0,
                 node_timeout_s: float = 4.0, transport: LocalTransport | None = None,
                 prefetch: int = DEFAULT_PREFETCH):
        self.home = Path(home) if home else default_home()
        self.lock = HomeLock(self.home)
        self.store = Store(self.home / "state.db")
        self.transport = transport or LocalTransport()
        self.heartbeat_s = heartbeat_s
        self.node_timeout_s = node_timeout_s
        self.prefetch = prefetch  # at most this many tasks queued per slot (see above)
        self.run_s: dict[str, float] = {}  # pool -> moving average of task run time
        self.inbox: queue.Queue = queue.Queue()
        self.nodes: dict[tuple[str, str], NodeHandle] = {}
        self.pools: dict[str, PoolSpec] = {}
        self.queues: dict[str, RunQueue] = {}
        self.meta: dict[int, TaskMeta] = {}
        self.outstanding: dict[str, int] = {}  # job -> tasks not completed
        self.jobs: dict[str, JobSpec] = {}
        self.last_seq = 0
        self.requeued_at_start = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._sends: dict[tuple[str, str], list[dict]] = {}  # messages of the current turn
        # notified after a turn in which some job's last known task completed: an
        # embedded waiter returns at once without polling hard through a big job
        self.progress = threading.Condition()
        self._drained = False
        self.error: BaseException | None = None
        self.trust: dict[str, Any] = {}  # pool id -> PoolTrust (inter-node SSH)
        self._gen = 0  # numbers each staging of files, so a late result is recognised
        self._stager_pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- life cycle ------------------------------------------------------

    def start(self) -> None:
        with self.store.transaction():
            self.requeued_at_start = self.store.requeue_in_flight()
            for n in self.store.list_nodes():
                if n["state"] not in (NodeState.OFFLINE.value,):
                    self.store.upsert_node(n["pool_id"], n["id"], NodeState.OFFLINE.value,
                                           n["slots"], json.loads(n["info"]),
                                           "coordinator restarted")
        if self.requeued_at_start:
            log.info("requeued %d tasks that were in flight", self.requeued_at_start)
        try:
            for pool in self.store.list_pools():
                self._start_pool(pool)
            self._load_new_work()
        except BaseException:
            self._release()  # the home's lock and any agents started
            raise
        self._thread = threading.Thread(target=self._run, name="hpcbatch-coordinator",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut agents down (killing running tasks, which stay recorded as in flight)."""
        if self._thread is None:
            self._release()
            return
        self._stop.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout_s)
        self._thread = None
        self._release()

    def _release(self) -> None:
        for node in self.nodes.values():
            if node.channel is not None:
                node.channel.send({"op": "shutdown"})
                node.channel.close()
            try:  # the store must not show nodes as idle/running with nobody driving them
                self.store.upsert_node(node.pool_id, node.node_id, NodeState.OFFLINE.value,
                                       node.slots, node.info, "coordinator stopped")
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("could not record node %s offline", node.node_id)
        self.nodes.clear()
        if self._stager_pool is not None:
            self._stager_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        self.lock.release()

    def notify(self) -> None:
        """New work was written to the store by another thread."""
        self.inbox.put(("work",))

    def kill_task(self, job_id: str, task_id: str) -> None:
        self.inbox.put(("kill", job_id, task_id))

    def add_pool(self, pool: PoolSpec) -> None:
        self.inbox.put(("pool", pool))

    def remove_pool(self, pool_id: str, timeout_s: float = 30.0) -> None:
        """Shut the pool's agents down and forget it (its jobs must be gone)."""
        self._call(("droppool", pool_id), timeout_s)

    def forget_job(self, job_id: str, timeout_s: float = 30.0) -> None:
        """Drop what is cached of a deleted job (a new job may take its id)."""
        self._call(("forgetjob", job_id), timeout_s)

    def _call(self, item: tuple, timeout_s: float) -> None:
        """Have the loop handle item, and wait until it has (no wait when it is stopped)."""
        if self._thread is None or not self._thread.is_alive():
            self._handle((*item, None), {})
            return
        done = threading.Event()
        self.inbox.put((*item, done))
        done.wait(timeout_s)

    # ---- pools and nodes ---------------------------------------------------

    def _node_root(self, pool_id: str, node_id: str) -> Path:
        return self.home / "nodes" / pool_id / node_id

    def _start_pool(self, pool: PoolSpec) -> None:
        if pool.id in self.pools:
            return
        self.pools[pool.id] = pool
        self.queues.setdefault(pool.id, RunQueue())
        if pool.provider == "ssh":
            self._start_ssh_pool(pool)
            return
        # a local pool of N nodes is N agents on this machine, each with its own root
        for i in range(1, pool.target_nodes + 1):
            self._start_node(NodeHandle(pool.id, f"local-{i}", pool.task_slots_per_node))

    def _start_ssh_pool(self, pool: PoolSpec) -> None:
        """Bootstrap every node in parallel, off the loop (see _boot). A pool whose
        inter-node trust cannot be prepared has its nodes unusable, saying why."""
        from hpcbatch.bootstrap import PoolTrust
        from hpcbatch.providers import targets

        nodes = targets(pool.provider_config)
        problem = None
        if pool.inter_node_communication:
            try:
                self.trust[pool.id] = PoolTrust.load_or_create(self.home / "pools" / pool.id,
                                                               pool.id, nodes)
            except (OSError, ValueError) as exc:
                problem = f"pool {pool.id}'s inter-node SSH key could not be prepared: {exc}"
        for target in nodes:
            handle = NodeHandle(pool.id, target.name, pool.task_slots_per_node,
                                host=target.name, local=False, target=target)
            self.nodes[handle.key] = handle
            self.store.upsert_node(pool.id, target.name, NodeState.STARTING.value,
                                   handle.slots, {"hostname": target.hostname,
                                                  "port": target.port})
            if problem:
                self._set_node(handle, NodeState.UNUSABLE, problem)
            else:
                self._boot(handle)

    def _boot(self, node: NodeHandle) -> None:
        """In a thread: connect (host key checked strictly), install the pool's inter-node
        trust, upload the agent and start it; then post the channel to the loop."""
        from hpcbatch.transport import SSHTransport

        pool = self.pools[node.pool_id]
        cfg = pool.provider_config
        transport = SSHTransport(cfg.get("python") or "python3")
        root = ssh_node_root(cfg, pool.id, node.node_id)
        trust = self.trust.get(pool.id)
        setup = None
        if trust is not None:
            def setup(client, abs_root: str) -> None:
                trust.install(client, abs_root, cfg.get("authorized_keys"), node.node_id)
        node.booting = True
        node.channel = None  # until "booted": no heartbeats expected
        key = node.key

        def boot() -> None:
            try:
                chan = transport.start_agent(node.target, node.node_id, root, self.heartbeat_s,
                                             pool.task_slots_per_node, setup)
            except Exception as exc:  # noqa: BLE001 - reported on the node
                self.inbox.put(("bootfail", key, str(exc), node))
            else:
                self.inbox.put(("booted", key, chan, node))

        threading.Thread(target=boot, name=f"bootstrap-{node.node_id}", daemon=True).start()

    def _listen(self, node: NodeHandle) -> None:
        """Deliver the node's agent messages to the loop, tagged with their channel so a
        late message of a replaced channel is recognised and dropped."""
        key, chan = node.key, node.channel
        chan.listen(lambda msg: self.inbox.put(("agent", key, msg, chan)))

    def _schedule_reconnect(self, node: NodeHandle) -> None:
        node.retry_at = time.monotonic() + node.retry_s
        node.retry_s = min(node.retry_s * 2, RECONNECT_MAX_S)

    def _reconnect(self, node: NodeHandle) -> None:
        """Try an unusable node again: a new agent (over a new SSH connection). It is
        'starting' meanwhile, so losing the new agent (or its silence) counts again."""
        node.retry_at = None
        self._set_node(node, NodeState.STARTING, f"reconnecting ({node.reason})")
        if node.local:
            try:
                self._start_node(node)
            except OSError as exc:
                self._set_node(node, NodeState.UNUSABLE, f"agent restart failed: {exc}")
                self._schedule_reconnect(node)
        else:
            self._boot(node)

    def _start_node(self, handle: NodeHandle) -> None:
        root = self._node_root(handle.pool_id, handle.node_id)
        handle.channel = self.transport.start_agent(handle.node_id, root, self.heartbeat_s,
                                                    handle.slots)
        handle.last_seen = time.monotonic()
        self._listen(handle)
        self.nodes[handle.key] = handle
        self.store.upsert_node(handle.pool_id, handle.node_id, NodeState.STARTING.value,
                               handle.slots)

    def _on_hello(self, node: NodeHandle, msg: dict) -> None:
        node.root = msg["root"]
        node.info = {k: msg.get(k) for k in ("hostname", "pid", "cores", "python")}
        pool = self.pools[node.pool_id]
        if pool.start_task:
            tdir = os.path.join(node.root, "starttask")
            node.channel.send({"op": "run", "id": START_TASK_ID, "cmd": pool.start_task,
                               "dir": tdir, "timeout_s": None,
                               "env": {E.POOL_ID: pool.id, E.NODE_ID: node.node_id,
                                       E.TASK_DIR: tdir,
                                       E.TASK_WORKING_DIR: os.path.join(tdir, "wd"),
                                       E.NODE_SHARED_DIR: os.path.join(node.root, "shared")}})
            self._set_node(node, NodeState.STARTING)
        else:
            self._node_ready(node)

    def _node_ready(self, node: NodeHandle) -> None:
        node.used = 0
        node.retry_s = 1.0
        self._set_node(node, NodeState.IDLE)

    def _set_node(self, node: NodeHandle, state: NodeState, reason: str | None = None) -> None:
        if state is not node.state:
            node.state = node.state.check_move(state)
        node.reason = reason
        self.store.upsert_node(node.pool_id, node.node_id, state.value, node.slots, node.info,
                               reason)

    def _drop_pool(self, pool_id: str) -> None:
        for key, node in list(self.nodes.items()):
            if node.pool_id == pool_id:
                if node.channel is not None:
                    node.channel.send({"op": "shutdown"})
                    node.channel.close()
                del self.nodes[key]
        for table in (self.pools, self.queues, self.trust, self.run_s):
            table.pop(pool_id, None)

    def _node_lost(self, node: NodeHandle, reason: str) -> None:
        """The agent is gone: ordinary tasks go back to the queue (a requeue, not a
        retry); a multi-instance task using the node fails (and may be retried)."""
        if node.state in (NodeState.UNUSABLE, NodeState.OFFLINE):
            return
        log.warning("node %s/%s lost: %s", node.pool_id, node.node_id, reason)
        for rid in sorted(node.running, key=str):
            if isinstance(rid, str):  # "SEQ.I": instance I of an allocation is held here
                seq, index = (int(x) for x in rid.split("."))
                meta = self.meta.get(seq)
                if meta is not None and meta.alloc is not None:
                    # what ran here is gone with the node
                    meta.alloc.pending -= {f"{seq}.c{index}", f"{seq}.s{index}",
                                           f"{seq}.a" if index == 0 else ""}
                    self._fail_allocation(meta, Exit(None, node_lost=True))
                continue
            meta = self.meta[rid]
            meta.staging.clear()
            meta.pending_run = None
            if meta.terminated:  # it was being stopped anyway: done, not requeued
                self._record_exit(meta, Exit(None, node_lost=True), {})
                continue
            self.store.db.execute(
                "UPDATE tasks SET state='active', requeue_count=requeue_count+1, node_id=NULL "
                "WHERE seq=?", (rid,))
            meta.node_id = None
            self.queues[meta.pool_id].push(self._runnable(meta))
        node.running.clear()
        node.used = node.held = 0
        if node.local:  # the agent is gone but its tasks may not be: leave no orphans
            for pid in set(node.pids.values()) | processes_with_token(node.token):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        node.pids.clear()
        self._set_node(node, NodeState.UNUSABLE, f"{reason}; trying it again")
        if node.channel is not None:
            node.channel.close()
        self._schedule_reconnect(node)

    # ---- work ------------------------------------------------------------

    def _job(self, job_id: str) -> JobSpec:
        spec = self.jobs.get(job_id)
        if spec is None:
            spec = self.jobs[job_id] = self.store.get_job(job_id)["spec"]
        return spec

    @staticmethod
    def _runnable(meta: TaskMeta) -> Runnable:
        return Runnable.of(meta.seq, meta.priority, meta.required_slots, meta.instances,
                           meta.slots_per_instance)

    def _load_new_work(self) -> int:
        rows = self.store.runnable_tasks(self.last_seq)
        fresh: dict[str, list[Runnable]] = {}
        for r in rows:
            self.last_seq = max(self.last_seq, r["seq"])
            if r["seq"] in self.meta:
                continue
            job = self._job(r["job_id"])
            spec = json.loads(r["spec"])
            retries = spec.get("max_task_retry_count")
            mi = spec.get("multi_instance") or {}
            meta = TaskMeta(
                seq=r["seq"], job_id=r["job_id"], task_id=r["id"], pool_id=r["pool_id"],
                command_line=r["command_line"], environment=spec.get("environment") or {},
                required_slots=r["required_slots"],
                max_retries=job.max_task_retry_count if retries is None else retries,
                wall_s=spec.get("max_wall_clock_time_s"), priority=job.priority,
                retry_count=r["retry_count"], instances=mi.get("instances", 0),
                slots_per_instance=mi.get("slots_per_instance", 0),
                coordination_command=mi.get("coordination_command"),
                resource_files=spec.get("resource_files") or [],
                common_files=mi.get("common_resource_files") or [])
            self.meta[meta.seq] = meta
            self.outstanding[meta.job_id] = self.outstanding.get(meta.job_id, 0) + 1
            fresh.setdefault(meta.pool_id, []).append(self._runnable(meta))
        for pool_id, items in fresh.items():
            if pool_id not in self.pools:
                self._start_pool(self.store.get_pool(pool_id))
            self.queues[pool_id].extend(items)
        return len(rows)

    def _task_env(self, meta: TaskMeta, node: NodeHandle, tdir: str) -> dict[str, str]:
        env = dict(meta.environment)
        env.update({
            E.POOL_ID: meta.pool_id, E.NODE_ID: node.node_id, E.JOB_ID: meta.job_id,
            E.TASK_ID: meta.task_id, E.TASK_DIR: tdir,
            E.TASK_WORKING_DIR: os.path.join(tdir, "wd"),
            E.NODE_SHARED_DIR: os.path.join(node.root, "shared"),
            E.JOB_PREP_DIR: os.path.join(node.root, "jobs", meta.job_id, "jobpreparation"),
            E.TASK_ATTEMPT: str(meta.retry_count),
            E.AGENT_TOKEN: node.token,
        })
        return env

    def _dispatch(self) -> dict[tuple[str, str], list[dict]]:
        """Schedule every pool; record assignments; return run messages per node."""
        out: dict[tuple[str, str], list[dict]] = {}
        now = time.time()
        for pool_id, rq in self.queues.items():
            if not len(rq):
                continue
            nodes = [n for n in self.nodes.values()
                     if n.pool_id == pool_id and n.state in (NodeState.IDLE, NodeState.RUNNING)]
            # no prefetch onto a node an allocation holds: its agent does not see the
            # allocation's slots as busy and would start queued work at once
            per_slot = self._prefetch_per_slot(pool_id)
            slots = [NodeSlots(n.node_id, n.slots, n.used, 0 if n.held else n.slots * per_slot)
                     for n in nodes]
            decisions = schedule_from_queue(rq, slots, self.pools[pool_id].scheduling_policy)
            by_id = {n.node_id: n for n in nodes}
            rows = []
            for d in decisions:
                meta = self.meta[d.seq]
                if isinstance(d, Allocation):
                    tdir = self._allocate(meta, [by_id[nid] for nid in d.node_ids], d.slots, out)
                    rows.append((meta.node_id, tdir, now, d.seq))
                    continue
                node = by_id[d.node_id]
                meta.node_id = node.node_id
                self._occupy(node, d.seq, d.slots)
                tdir = os.path.join(node.root, "jobs", meta.job_id, meta.task_id)
                rows.append((node.node_id, tdir, now, d.seq))
                run = {"op": "run", "id": d.seq, "cmd": meta.command_line, "dir": tdir,
                       "timeout_s": meta.wall_s, "slots": d.slots,
                       "env": self._task_env(meta, node, tdir)}
                if meta.resource_files:  # the run message goes once they are there
                    meta.pending_run = run
                    self._stage(meta, node, d.seq,
                                [(meta.resource_files, os.path.join(tdir, "wd"))])
                else:
                    out.setdefault(node.key, []).append(run)
            if rows:
                self.store.db.executemany(
                    "UPDATE tasks SET state='preparing', node_id=?, task_dir=?, started_at=?, "
                    "ended_at=NULL WHERE seq=?", rows)
        return out

    def _prefetch_per_slot(self, pool_id: str) -> int:
        """Tasks a slot may hold queued: about PREFETCH_HORIZON_S of work, 1 until the
        pool's tasks have been timed, never more than ``self.prefetch``."""
        avg = self.run_s.get(pool_id)
        if avg is None:
            return min(1, self.prefetch)
        return min(self.prefetch, int(PREFETCH_HORIZON_S / max(avg, 1e-4)))

    def _occupy(self, node: NodeHandle, rid: int | str, slots: int) -> None:
        node.used += slots
        node.running.add(rid)
        node.held += isinstance(rid, str)
        if node.state is NodeState.IDLE:
            self._set_node(node, NodeState.RUNNING)

    def _vacate(self, node: NodeHandle, rid: int | str, slots: int) -> None:
        if rid not in node.running:
            return
        node.running.discard(rid)
        node.used -= slots
        node.held -= isinstance(rid, str)
        if not node.running and node.state is NodeState.RUNNING:
            self._set_node(node, NodeState.IDLE)

    # ---- multi-instance tasks --------------------------------------------

    def _allocate(self, meta: TaskMeta, nodes: list[NodeHandle], per_node: int,
                  out: dict[tuple[str, str], list[dict]]) -> str:
        """Hold the nodes; start the coordination command everywhere (or the
        application command on the primary when there is none)."""
        slots = [per_node or n.slots for n in nodes]
        primary = nodes[0]
        meta.node_id = primary.node_id
        tdir = os.path.join(primary.root, "jobs", meta.job_id, meta.task_id)
        alloc = Allocated(nodes, slots, "coordination", set(), tdir)
        meta.alloc = alloc
        for i, node in enumerate(nodes):
            self._occupy(node, f"{meta.seq}.{i}", slots[i])
        if meta.common_files or meta.resource_files:
            alloc.phase = "staging"
            for i, node in enumerate(nodes):
                node_tdir = posixpath.join(node.root, "jobs", meta.job_id, meta.task_id)
                groups = [(meta.common_files, posixpath.join(node_tdir, "shared"))]
                if i == 0:  # the task's own files: the primary's working directory
                    groups.append((meta.resource_files, posixpath.join(node_tdir, "wd")))
                if any(files for files, _ in groups):
                    rid = f"{meta.seq}.s{i}"
                    alloc.pending.add(rid)
                    self._stage(meta, node, rid, groups)
        else:
            self._start_coordination(meta, out)
        return tdir

    def _start_coordination(self, meta: TaskMeta,
                            out: dict[tuple[str, str], list[dict]]) -> None:
        """The coordination command on every node, or straight to the application."""
        alloc = meta.alloc
        alloc.phase = "coordination"
        if meta.coordination_command:
            for i, node in enumerate(alloc.nodes):
                run = self._instance_run(meta, i, meta.coordination_command, f"{meta.seq}.c{i}")
                run["log_prefix"] = "coordination-"
                out.setdefault(node.key, []).append(run)
                alloc.pending.add(f"{meta.seq}.c{i}")
        else:
            self._start_application(meta, out)

    def _instance_env(self, meta: TaskMeta, index: int, tdir: str) -> dict[str, str]:
        alloc = meta.alloc
        node = alloc.nodes[index]
        env = self._task_env(meta, node, tdir)
        env.update({
            E.HOST_LIST: ",".join(n.host for n in alloc.nodes),
            E.NODE_LIST: ",".join(n.node_id for n in alloc.nodes),
            E.MASTER_NODE: alloc.nodes[0].host,
            E.HOSTFILE: os.path.join(tdir, "hostfile"),
            E.TASK_SHARED_DIR: os.path.join(tdir, "shared"),
            E.INSTANCE_INDEX: str(index),
            E.NUM_INSTANCES: str(len(alloc.nodes)),
        })
        if meta.pool_id in self.trust:  # written on every node by bootstrap
            env[E.SSH_CONFIG] = posixpath.join(node.root, "ssh", "config")
        else:  # the nodes' own SSH set-up, or a config the pool spec says they have
            ssh_config = self.pools[meta.pool_id].provider_config.get("node_ssh_config")
            if ssh_config:
                env[E.SSH_CONFIG] = ssh_config
        return env

    def _instance_run(self, meta: TaskMeta, index: int, cmd: str, rid: str) -> dict:
        alloc = meta.alloc
        node = alloc.nodes[index]
        tdir = os.path.join(node.root, "jobs", meta.job_id, meta.task_id)
        hostfile = "".join(f"{n.host} slots={s}\n" for n, s in zip(alloc.nodes, alloc.slots))
        return {"op": "run", "id": rid, "cmd": cmd, "dir": tdir, "timeout_s": meta.wall_s,
                "slots": alloc.slots[index], "env": self._instance_env(meta, index, tdir),
                "files": {"hostfile": hostfile}, "dirs": ["shared"]}

    def _start_application(self, meta: TaskMeta,
                           out: dict[tuple[str, str], list[dict]]) -> None:
        alloc = meta.alloc
        alloc.phase = "application"
        rid = f"{meta.seq}.a"
        alloc.pending.add(rid)
        out.setdefault(alloc.nodes[0].key, []).append(
            self._instance_run(meta, 0, meta.command_line, rid))

    def _fail_allocation(self, meta: TaskMeta, ex: Exit, ev: dict | None = None) -> None:
        """One instance failed or its node died: stop the others."""
        alloc = meta.alloc
        staging = {rid for rid in alloc.pending if _instance_of(rid)[0] == "s"}
        alloc.pending -= staging  # a copy in flight is not waited for; its result is dropped
        for rid in staging:
            meta.staging.pop(rid, None)
        if alloc.failed is None:
            alloc.failed = ex
            alloc.failed_ev = {"killed": ev["killed"]} if ev and ev.get("killed") else {}
            for rid in alloc.pending:
                node = alloc.nodes[_instance_of(rid)[1]]
                if node.channel is not None and node.state not in (NodeState.UNUSABLE,):
                    self._sends.setdefault(node.key, []).append(
                        {"op": "kill", "id": rid, "reason": "instance_failed"})
        if not alloc.pending:
            self._finish_allocation(meta, alloc.failed, alloc.failed_ev)

    def _on_instance_exited(self, node: NodeHandle, rid: str, ev: dict) -> None:
        meta = self.meta.get(int(rid.split(".")[0]))
        if meta is None or meta.alloc is None or rid not in meta.alloc.pending:
            return
        alloc = meta.alloc
        alloc.pending.discard(rid)
        ex = Exit(exit_code=ev.get("exit_code"), signal=ev.get("signal"),
                  timed_out=bool(ev.get("timed_out")), start_failed=ev.get("start_failed"))
        ok = failure_of(ex) is None
        if alloc.failed is not None or not ok:
            self._fail_allocation(meta, alloc.failed or ex, ev)
        elif alloc.phase == "coordination":
            if not alloc.pending and meta.terminated:  # asked to stop: no application
                self._fail_allocation(meta, Exit(None, start_failed="terminated"),
                                      {"killed": "terminate"})
            elif not alloc.pending:
                self._start_application(meta, self._sends)
        else:  # the application command ended: the task is done
            self._finish_allocation(meta, ex, ev)

    def _finish_allocation(self, meta: TaskMeta, ex: Exit, ev: dict) -> None:
        alloc = meta.alloc
        # ranks the application started over ssh are not the agents' children: find them
        # by the ids every rank inherits (hpcbatch-mpiexec forwards HPCBATCH_*)
        match = {E.JOB_ID: meta.job_id, E.TASK_ID: meta.task_id,
                 E.TASK_ATTEMPT: str(meta.retry_count)}
        for i, node in enumerate(alloc.nodes):
            self._vacate(node, f"{meta.seq}.{i}", alloc.slots[i])
            if node.channel is not None and node.state is not NodeState.UNUSABLE:
                self._sends.setdefault(node.key, []).append({"op": "reap", "match": match})
        meta.alloc = None
        self._record_exit(meta, ex, ev)

    # ---- resource files ----------------------------------------------------

    def _stage(self, meta: TaskMeta, node: NodeHandle, rid: int | str,
               groups: list[tuple[list[dict], str]]) -> None:
        """Copy (files, destination folder) groups to the node on a worker thread (SFTP or
        the filesystem, per the node's transport); the loop hears back through a
        ("staged", ...) item."""
        self._gen += 1
        token = (meta.seq, rid, self._gen)
        meta.staging[rid] = self._gen
        chan, inbox = node.channel, self.inbox

        def work() -> None:
            try:
                for files, dest_dir in groups:
                    if files:
                        chan.put_files([(f["source"], f["file_path"]) for f in files],
                                       dest_dir)
            except Exception as exc:  # noqa: BLE001 - reported as the task's failure
                inbox.put(("staged", token, f"copying resource files to node {node.node_id} "
                                            f"failed: {exc}"))
            else:
                inbox.put(("staged", token, None))

        if self._stager_pool is None:
            self._stager_pool = concurrent.futures.ThreadPoolExecutor(
                8, thread_name_prefix="hpcbatch-stage")
        self._stager_pool.submit(work)

    def _on_staged(self, token: tuple, error: str | None,
                   sends: dict[tuple[str, str], list[dict]]) -> None:
        seq, rid, gen = token
        meta = self.meta.get(seq)
        if meta is None or meta.staging.get(rid) != gen:
            return  # the attempt it was for is over (node lost, killed, failed)
        del meta.staging[rid]
        if isinstance(rid, str):
            alloc = meta.alloc
            if alloc is None or rid not in alloc.pending:
                return
            alloc.pending.discard(rid)
            if error:
                self._fail_allocation(meta, Exit(None, start_failed=error))
            elif not alloc.pending:
                self._start_coordination(meta, sends)
            return
        node = self.nodes[(meta.pool_id, meta.node_id)]
        run, meta.pending_run = meta.pending_run, None
        if error:
            self._vacate(node, seq, meta.required_slots)
            self._record_exit(meta, Exit(None, start_failed=error), {})
        else:
            sends.setdefault(node.key, []).append(run)

    # ---- exits -----------------------------------------------------------

    def _on_exited(self, node: NodeHandle, ev: dict) -> None:
        tid = ev["id"]
        if tid == START_TASK_ID:
            if ev.get("exit_code") == 0:
                self._node_ready(node)
            else:
                self._set_node(node, NodeState.START_TASK_FAILED,
                               f"start task exited with {ev.get('exit_code')}; see "
                               f"{os.path.join(node.root, 'starttask', 'stderr.txt')}")
            return
        if isinstance(tid, str):
            self._on_instance_exited(node, tid, ev)
            return
        meta = self.meta.get(tid)
        if meta is None or tid not in node.running:
            return
        self._vacate(node, tid, meta.required_slots)
        if ev.get("start") and ev.get("end"):
            took = ev["end"] - ev["start"]
            avg = self.run_s.get(meta.pool_id)
            self.run_s[meta.pool_id] = took if avg is None else 0.9 * avg + 0.1 * took
        ex = Exit(exit_code=ev.get("exit_code"), signal=ev.get("signal"),
                  timed_out=bool(ev.get("timed_out")), start_failed=ev.get("start_failed"))
        self._record_exit(meta, ex, ev)

    def _on_started(self, ev: dict) -> None:
        """A task's process (for a multi-instance task: the application command) started:
        it moves from preparing (assigned, files being copied, queued in the agent,
        coordination commands running) to running."""
        rid = ev["id"]
        if isinstance(rid, str):
            if not rid.endswith(".a"):
                return
            rid = int(rid.split(".")[0])
        self.store.db.execute("UPDATE tasks SET state='running', started_at=? WHERE seq=? "
                              "AND state='preparing'", (ev.get("t") or time.time(), rid))

    def _record_exit(self, meta: TaskMeta, ex: Exit, ev: dict) -> None:
        """Success, retry (back to the queue) or failure, from how the attempt ended."""
        if meta.terminated:  # however it ended, it is not run again
            ev = {**ev, "killed": "terminate"}
        tid = meta.seq
        outcome = decide_exit(ex, meta.retry_count, meta.max_retries)
        common = dict(exit_code=ex.exit_code, signal=ex.signal, failure=outcome.failure,
                      started_at=ev.get("start"), ended_at=ev.get("end") or time.time(),
                      usage=json.dumps(ev.get("usage") or {}))
        killed = ev.get("killed")
        if killed and not ex.timed_out and outcome.failure:
            common["failure"] = f"killed:{killed}"
        elif ex.start_failed:
            common["failure"] = f"start_failed: {ex.start_failed}"
        if outcome.retry and killed != "terminate":
            meta.retry_count += 1
            meta.node_id = None
            self.store.update_task(tid, state=TaskState.ACTIVE.value, node_id=None,
                                   retry_count=meta.retry_count, **common)
            self.queues[meta.pool_id].push(self._runnable(meta))
            return
        result = outcome.result or TaskResult.FAILURE
        self.store.update_task(tid, state=TaskState.COMPLETED.value, result=result.value,
                               **common)
        self._completed(meta)

    def _completed(self, meta: TaskMeta) -> None:
        del self.meta[meta.seq]
        left = self.outstanding[meta.job_id] = self.outstanding[meta.job_id] - 1
        self._drained |= left == 0
        if left == 0 and self._job(meta.job_id).on_all_tasks_complete == "terminate_job":
            counts = self.store.task_counts(meta.job_id)
            if counts["completed"] == counts["total"]:
                self.store.set_job_state(meta.job_id, JobState.COMPLETED)

    def _kill(self, job_id: str, task_id: str) -> tuple[tuple[str, str], dict] | None:
        for meta in self.meta.values():
            if meta.job_id == job_id and meta.task_id == task_id:
                if meta.node_id is None:  # not started: complete it as terminated
                    self.queues[meta.pool_id].discard({meta.seq})
                    self.store.update_task(meta.seq, state=TaskState.COMPLETED.value,
                                           result=TaskResult.FAILURE.value,
                                           failure="killed:terminate", ended_at=time.time())
                    self._completed(meta)
                    return None
                meta.terminated = True
                if meta.alloc is not None:
                    if meta.alloc.phase == "staging":
                        self._fail_allocation(meta, Exit(None, start_failed="terminated"),
                                              {"killed": "terminate"})
                        return None
                    for rid in meta.alloc.pending:
                        self._sends.setdefault(
                            meta.alloc.nodes[_instance_of(rid)[1]].key, []).append(
                            {"op": "kill", "id": rid, "reason": "terminate"})
                    return None
                if meta.pending_run is not None:  # still copying its files: never started
                    node = self.nodes[(meta.pool_id, meta.node_id)]
                    self._vacate(node, meta.seq, meta.required_slots)
                    meta.staging.clear()
                    meta.pending_run = None
                    self._record_exit(meta, Exit(None, start_failed="terminated"),
                                      {"killed": "terminate"})
                    return None
                return (meta.pool_id, meta.node_id), {"op": "kill", "id": meta.seq,
                                                      "reason": "terminate"}
        return None

    # ---- the loop --------------------------------------------------------

    def _handle(self, item: tuple, sends: dict[tuple[str, str], list[dict]]) -> None:
        kind = item[0]
        if kind == "agent":
            _, key, msg, chan = item
            node = self.nodes.get(key)
            if node is None or chan is not node.channel:
                return  # a replaced channel's last words
            if msg is None:
                words = chan.last_words()
                self._node_lost(node, "agent connection closed" + (f" ({words})" if words
                                                                    else ""))
                return
            node.last_seen = time.monotonic()
            ev = msg.get("ev")
            if ev == "events":
                for item_ev in msg["items"]:
                    kind = item_ev.get("ev")
                    if kind == "exited":
                        node.pids.pop(item_ev["id"], None)
                        self._on_exited(node, item_ev)
                    elif kind == "started":
                        node.pids[item_ev["id"]] = item_ev["pid"]
                        self._on_started(item_ev)
            elif ev == "hello":
                self._on_hello(node, msg)
            elif ev == "garbage" or ev == "error":
                log.warning("node %s: %s", node.node_id, msg)
        elif kind == "booted":
            node = self.nodes.get(item[1])
            if node is not item[3] or self._stop.is_set():  # deleted (or replaced) meanwhile
                item[2].close()
                return
            node.booting = False
            node.channel = item[2]
            node.last_seen = time.monotonic()
            self._listen(node)
        elif kind == "bootfail":
            node = self.nodes.get(item[1])
            if node is item[3]:
                node.booting = False
                retry = f"; trying again in {node.retry_s:g} s"
                self._set_node(node, NodeState.UNUSABLE, f"bootstrap failed: {item[2]}{retry}")
                self._schedule_reconnect(node)
        elif kind == "staged":
            self._on_staged(item[1], item[2], sends)
        elif kind == "droppool":
            self._drop_pool(item[1])
            if item[2] is not None:
                item[2].set()
        elif kind == "forgetjob":
            self.jobs.pop(item[1], None)
            self.outstanding.pop(item[1], None)
            if item[2] is not None:
                item[2].set()
        elif kind == "work":
            self._load_new_work()
        elif kind == "pool":
            self._start_pool(item[1])
        elif kind == "kill":
            kill = self._kill(item[1], item[2])
            if kill:
                sends.setdefault(kill[0], []).append(kill[1])

    def _check_heartbeats(self) -> None:
        """Lose nodes that went quiet; try unusable ones again when their time comes."""
        now = time.monotonic()
        for node in self.nodes.values():
            if node.state is NodeState.UNUSABLE:
                if not node.booting and node.retry_at is not None and now >= node.retry_at:
                    self._reconnect(node)
                continue
            if node.state is NodeState.OFFLINE or node.channel is None:
                continue  # (no channel: still bootstrapping)
            if now - node.last_seen > self.node_timeout_s:
                self._node_lost(node, f"no heartbeat for {now - node.last_seen:.1f} s")

    def _run(self) -> None:
        next_poll = time.monotonic() + 1.0
        try:
            while not self._stop.is_set():
                try:
                    items = [self.inbox.get(timeout=0.5)]
                except queue.Empty:
                    items = []
                while True:
                    try:
                        items.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                sends: dict[tuple[str, str], list[dict]] = {}
                self._sends = sends
                with self.store.transaction():
                    for item in items:
                        self._handle(item, sends)
                    if time.monotonic() >= next_poll:
                        self._load_new_work()  # work written by other processes
                        self._check_heartbeats()
                        next_poll = time.monotonic() + 1.0
                    for key, msgs in self._dispatch().items():
                        sends.setdefault(key, []).extend(msgs)
                for key, msgs in sends.items():
                    node = self.nodes.get(key)
                    if node is not None and node.channel is not None:
                        node.channel.send_many(msgs)
                if self._drained:  # committed: tell waiters
                    self._drained = False
                    with self.progress:
                        self.progress.notify_all()
        except BaseException as exc:  # surface to waiters instead of dying silently
            log.exception("coordinator loop failed")
            self.error = exc
        finally:
            self._stopped.set()
