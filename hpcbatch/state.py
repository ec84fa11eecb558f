"""The coordinator's decisions as a pure state machine: events in, instructions out.

``CoordinatorState.handle(*events) -> list[Instruction]`` does no I/O and reads no
clock: time arrives in the events (every event carries ``t``). It owns what happens
to nodes (start, hello, start task, heartbeats, loss, fencing, reconnect back-off),
to tasks (windows of runnable work, placement and prefetch, retry vs requeue,
terminate) and to multi-instance tasks (the phase machine), and when a job drains.
The coordinator (:mod:`hpcbatch.coordinator`) is the shell that performs the
instructions: persistence first, in one store transaction, then sends, file copies
and agent starts/stops off its loop.

Queries are instructions too (``LoadWindow``, ``LoadNewWork``): the shell answers them
within the same turn with ``WindowLoaded`` / ``WorkAdded`` events, so the state never
holds more than a bounded window of the stored work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from collections.abc import Iterable
from typing import Any

from hpcbatch import env as E
from hpcbatch.launch.protocol import KILLED_LEASE, KILLED_SHUTDOWN
from hpcbatch.models import (
    JOB_PREPARATION_ID,
    JOB_RELEASE_ID,
    FailureKind,
    MIPhase,
    NodeState,
    RunId,
    RunKind,
    TaskResult,
    TaskState,
)
from hpcbatch.scheduler import (
    Allocation,
    Exit,
    Placer,
    Runnable,
    RunQueue,
    decide_exit,
    failure_of,
    schedule_from_queue,
)
from hpcbatch.timings import Timings

# at most this many queued per slot: 20 ms of millisecond tasks (at 4, a slot's agent
# ran dry in a quarter of the exits while the coordinator's refill was under way)
DEFAULT_PREFETCH = 16
PREFETCH_HORIZON_S = 0.02  # a slot's agent-side queue holds about this much work
WINDOW_MIN = 1000  # runnable tasks loaded per pool at a time: at least this many ..
WINDOW_MAX = 50_000  # .. at most this many (memory stays bounded whatever is stored)
PLACE_BUDGET = 20_000  # placements per turn (bounded turns)
NEW_WORK_SLICE = 5000  # new tasks read per query (a 1M-task submit is read in slices)
# a task's 'running' is written this long after it started (or at the next turn after),
# unless it ended first: then its end's one write says both. Safe to hold back: the task
# is stored 'preparing' from before it was sent, and a restart requeues either alike.
RUNNING_WRITE_DELAY_S = 0.05
FLAG_RESOURCE_FILES, FLAG_COORDINATION, FLAG_COMMON_FILES = 1, 2, 4
FLAG_APPS = 8  # the task names application packages: their archives go to its node(s)
# what happens to the tasks on a node whose scheduling is disabled or that leaves the pool
# (Azure Batch's nodeDisableSchedulingOption / nodeDeallocationOption): killed and
# requeued (not a retry), killed and completed as failed (killed:terminate), or left to
# finish (what is queued on its agent and has not started is requeued)
REQUEUE, TERMINATE, TASK_COMPLETION = "requeue", "terminate", "taskcompletion"
RUNNING_OPTIONS = (REQUEUE, TERMINATE, TASK_COMPLETION)
# a pool that shrinks (resize, autoscale) may also keep the leaving nodes' task
# directories: like taskcompletion, and its jobs/ stay (the other options remove them
# once the node is gone, as a Batch node's go with it)
RETAINED_DATA = "retaineddata"
DEALLOCATION_OPTIONS = (*RUNNING_OPTIONS, RETAINED_DATA)

usable = frozenset({NodeState.IDLE, NodeState.RUNNING})
AGENT_STOPPED = frozenset({KILLED_LEASE, KILLED_SHUTDOWN})  # an agent's own reasons to kill


def _ev(cls):
    """A frozen, slotted dataclass (an event or an instruction), with a faster __init__."""
    return _fast_init(dataclasses.dataclass(frozen=True, slots=True)(cls))


def _fast_init(cls):
    """Replace a frozen slotted dataclass's generated __init__ (an object.__setattr__
    looked up and called by name per field) with one that stores through each slot's
    descriptor: the same signature, defaults and result, about half the cost. Left as
    generated for a class with __post_init__ or a field that is not a plain init one."""
    fields = dataclasses.fields(cls)
    if hasattr(cls, "__post_init__") or any(
            not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING
            for f in fields):
        return cls
    ns: dict[str, Any] = {}
    params, body = [], []
    for f in fields:
        ns[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            ns[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"    _set_{f.name}(self, {f.name})\n")
    exec(f"def __init__(self, {', '.join(params)}):\n" + ("".join(body) or "    pass\n"), ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init
    return cls


# ---- what the state is told --------------------------------------------------------

@_ev
class NodeInfo:
    node_id: str
    host: str
    slots: int
    disabled: bool = False  # its scheduling was disabled (kept across restarts)


@_ev
class PoolInfo:
    pool_id: str
    slots_per_node: int
    policy: str = "pack"
    start_task: str | None = None
    apps: bool = False  # it names application packages: every node gets them first


@_ev
class JobInfo:
    job_id: str
    pool_id: str
    priority: int = 0
    terminate_when_done: bool = False
    # its preparation task (see hpcbatch.models.JobPreparationTask) and release task
    prep: bool = False
    prep_wait: bool = True
    prep_retries: int = 0
    prep_rerun: bool = True
    release: bool = False


@_ev
class TaskRow:
    """A runnable task as the store serves it (no command line: that is read at dispatch)."""

    seq: int
    job_id: str
    task_id: str
    pool_id: str
    neg_priority: int
    required_slots: int = 1
    instances: int = 0
    slots_per_instance: int = 0
    max_retries: int = 0
    retry_count: int = 0
    flags: int = 0
    attempt: int = 0  # the number of its next attempt (HPCBATCH_TASK_ATTEMPT); every
    # attempt that ends (retry or requeue) adds one, as the store's task_attempts do

    @property
    def key(self) -> tuple[int, int]:
        return (self.neg_priority, self.seq)


@_ev
class Started:
    """The coordinator started: what the store holds of open work."""
    t: float
    open_counts: tuple[tuple[str, int], ...] = ()
    last_seq: int = 0


@_ev
class PoolAdded:
    t: float
    pool: PoolInfo
    nodes: tuple[NodeInfo, ...]


@_ev
class PoolRemoved:
    t: float
    pool_id: str


@_ev
class NodeGranted:
    """An elastic pool got a node (or a dialled-in agent registered)."""
    t: float
    pool_id: str
    node: NodeInfo


@_ev
class NodeLeaving:
    """A node leaves the pool (removed, or an elastic pool gives it back): what runs
    there is handled as ``running`` says (see RUNNING_OPTIONS), then its agent is stopped
    and the node forgotten (DropNode)."""
    t: float
    pool_id: str
    node_id: str
    running: str = TASK_COMPLETION
    reply: int = 0


@_ev
class PoolResized:
    """The pool's target size changed: nodes are added from ``nodes`` (the provider's
    nodes for the new size, in order; those the pool has are skipped) or, to shrink,
    the nodes not in ``keep`` leave (a provider whose nodes at a size are the first of a
    list: SSH), or else the idle ones first, then the least busy. What runs on a node
    that leaves goes as ``running`` says (DEALLOCATION_OPTIONS); with taskcompletion or
    retaineddata a node held by a running multi-instance task is the last chosen, and
    its task is never cut short."""
    t: float
    pool_id: str
    target: int
    nodes: tuple[NodeInfo, ...] = ()
    reply: int = 0
    running: str = REQUEUE
    keep: tuple[str, ...] | None = None


@_ev
class NodeSchedulingSet:
    """Disable (``enabled`` False: nothing new is placed there; what runs is handled as
    ``running`` says) or enable scheduling on a node."""
    t: float
    pool_id: str
    node_id: str
    enabled: bool
    running: str = TASK_COMPLETION
    reply: int = 0


@_ev
class JobsKnown:
    t: float
    jobs: tuple[JobInfo, ...]


@_ev
class JobForgotten:
    t: float
    job_id: str


@_ev
class WorkAdded:
    """New tasks (seq above every one seen before), read in slices; ``more``: the slice
    was full, ask again."""
    t: float
    rows: tuple[TaskRow, ...]
    more: bool = False


@_ev
class WorkNoticed:
    """Somebody stored new work (or the poll interval passed): look for it."""
    t: float


@_ev
class WindowLoaded:
    t: float
    pool_id: str
    rows: tuple[TaskRow, ...]
    exhausted: bool  # fewer than asked: nothing beyond these is stored


@_ev
class AgentUp:
    """The shell has a channel to the node's agent of generation ``gen``."""
    t: float
    pool_id: str
    node_id: str
    gen: int


@_ev
class AgentStartFailed:
    t: float
    pool_id: str
    node_id: str
    gen: int
    reason: str


@_ev
class AgentHello:
    t: float
    pool_id: str
    node_id: str
    gen: int
    root: str
    protocol: int
    info: tuple[tuple[str, Any], ...] = ()


@_ev
class Heartbeat:
    t: float
    pool_id: str
    node_id: str
    gen: int


@_ev
class RunStarted:
    t: float
    pool_id: str
    node_id: str
    gen: int
    run: RunId
    pid: int


@_ev
class RunExited:
    t: float
    pool_id: str
    node_id: str
    gen: int
    run: RunId
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    killed: str | None = None
    start_failed: str | None = None
    start: float | None = None
    end: float | None = None
    usage: tuple[tuple[str, Any], ...] = ()
    stderr_tail: str | None = None  # a failed coordination command's last stderr bytes
    upload_error: str | None = None  # its output files could not be uploaded (why)


@_ev
class AgentError:
    t: float
    pool_id: str
    node_id: str
    gen: int
    message: str
    run: RunId | None = None


@_ev
class AgentClosed:
    """The channel ended (the agent died, or its connection); ``words``: what its end said."""
    t: float
    pool_id: str
    node_id: str
    gen: int
    words: str = ""


@_ev
class NodeFenced:
    """The provider made sure (``sure``) nothing of agent ``gen`` runs any more, or could
    not (then the state waits for the agent's lease to run out)."""
    t: float
    pool_id: str
    node_id: str
    gen: int
    sure: bool


@_ev
class PoolHeld:
    """The coordinator (re)started with tasks requeued from these nodes, whose earlier
    agents may still run them (a cut-off agent runs until its lease ends): place nothing
    in the pool until each node is reaped (NodeReaped, sure) or ``until``."""
    t: float
    pool_id: str
    until: float
    nodes: tuple[str, ...]


@_ev
class NodeReaped:
    """What earlier agents left on the node was killed (``sure``), or could not be."""
    t: float
    pool_id: str
    node_id: str
    sure: bool


@_ev
class FilesStaged:
    t: float
    seq: int
    run: RunId
    token: int
    error: str | None = None


@_ev
class NodeAppsStaged:
    """The pool's application package archives reached the node (or ``error``)."""
    t: float
    pool_id: str
    node_id: str
    gen: int
    error: str | None = None


@_ev
class TerminateAsked:
    t: float
    seq: int
    job_id: str
    reply: int = 0


@_ev
class JobTerminateAsked:
    """Terminate a job: its unstarted tasks complete as killed:terminate (in the store,
    all at once), its running ones are killed; the job completes once they have ended."""
    t: float
    job_id: str
    reply: int = 0


@_ev
class ReactivateAsked:
    """A failed completed task (the shell checked) runs again: active, retry count 0."""
    t: float
    row: TaskRow
    reply: int = 0


@_ev
class Tick:
    t: float


@_ev
class Clock:
    """Only the time (the shell's wake-up at ``running_due()``)."""
    t: float


# ---- what the state asks for -------------------------------------------------------

@_ev
class StartAgent:
    pool_id: str
    node_id: str
    gen: int


@_ev
class StopAgent:
    pool_id: str
    node_id: str
    gen: int
    lost: bool = False  # close hard (a lost node: nothing buffered may reach it later)


@_ev
class FenceNode:
    pool_id: str
    node_id: str
    gen: int
    pids: tuple[int, ...]


@_ev
class RunTask:
    """Start ``run`` on the node: the shell adds the task's command line, environment and
    wall-clock limit from the store (the coordination command for a COORDINATION run)."""
    pool_id: str
    node_id: str
    seq: int
    run: RunId
    task_dir: str
    env: dict[str, str]
    slots: int
    files: tuple[tuple[str, str], ...] = ()
    dirs: tuple[str, ...] = ()
    log_prefix: str = ""
    instance: bool = False  # a multi-instance run: add the provider's inter-node env


@_ev
class RunJobTask:
    """Start a job's preparation or release task (``run.kind``) on the node: the shell
    adds the command line, environment, files and limit from the job's spec."""
    pool_id: str
    node_id: str
    job_id: str
    run: RunId
    task_dir: str
    env: tuple[tuple[str, str], ...]


@_ev
class PersistJobTask:
    """Record a job's preparation or release task on a node (``kind``: 'preparation' or
    'release'; ``state``: running, succeeded, failed, skipped)."""
    job_id: str
    pool_id: str
    node_id: str
    kind: str
    state: str
    t: float
    task_dir: str = ""
    exit_code: int | None = None
    detail: str | None = None
    retry_count: int = 0


@_ev
class RunStartTask:
    pool_id: str
    node_id: str
    command: str
    task_dir: str
    env: tuple[tuple[str, str], ...]


@_ev
class KillRun:
    pool_id: str
    node_id: str
    run: RunId
    reason: str


@_ev
class Reap:
    pool_id: str
    node_id: str
    match: tuple[tuple[str, str], ...]
    sessions: tuple[int, ...] = ()


@_ev
class Ping:
    pool_id: str
    node_id: str
    t: float


@_ev
class StageFiles:
    """Copy the task's files to the node: ``groups`` are (which, destination directory),
    which = 'resource' (the task's resource_files) or 'common' (common_resource_files)."""
    pool_id: str
    node_id: str
    seq: int
    run: RunId
    token: int
    groups: tuple[tuple[str, str], ...]


@_ev
class StageNodeApps:
    """Copy the pool's application package archives to a node that said hello (its
    agent unpacks them when a run first needs them); answered by NodeAppsStaged."""
    pool_id: str
    node_id: str
    gen: int


@_ev
class LoadWindow:
    pool_id: str
    after: tuple[int, int] | None
    limit: int


@_ev
class LoadNewWork:
    after_seq: int
    limit: int


@_ev
class PersistNode:
    pool_id: str
    node_id: str
    state: NodeState
    slots: int
    reason: str | None = None
    info: tuple[tuple[str, Any], ...] = ()


@_ev
class MarkPreparing:
    seq: int
    node_id: str
    task_dir: str
    t: float


@_ev
class MarkRunning:
    seq: int
    t: float


@_ev
class FinishAttempt:
    seq: int
    outcome: str  # success | failure | retry | requeue
    node_id: str | None
    started_at: float | None
    ended_at: float
    exit_code: int | None
    signal: int | None
    failure_kind: FailureKind | None
    failure_detail: str | None
    usage: tuple[tuple[str, Any], ...]
    retry_count: int


@_ev
class CompleteUnstarted:
    seq: int
    failure_kind: FailureKind
    failure_detail: str
    t: float


@_ev
class CompleteJobIfDone:
    job_id: str


@_ev
class TerminateJobTasks:
    """The job is terminating: every task of it still active in the store completes as
    failed (killed:terminate) with an attempt that never started."""
    job_id: str
    t: float


@_ev
class ReactivateTask:
    """The completed task becomes active again (retry count 0, its attempts kept); its
    job, when completed, is active again."""
    seq: int
    job_id: str
    t: float


@_ev
class DropNode:
    """The node left the pool: forget its record."""
    pool_id: str
    node_id: str


@_ev
class RemoveNodeData:
    """The node left a pool that shrank (not with retaineddata): remove its task
    directories (``<node root>/jobs``)."""
    pool_id: str
    node_id: str


@_ev
class JobDrained:
    job_id: str


@_ev
class Reply:
    reply: int
    error: str | None = None


@_ev
class Log:
    level: int
    message: str


Instruction = Any  # one of the instruction classes above
PERSIST = (PersistNode, MarkPreparing, MarkRunning, FinishAttempt, CompleteUnstarted,
           CompleteJobIfDone, TerminateJobTasks, ReactivateTask, DropNode, PersistJobTask)


# ---- what the state keeps ----------------------------------------------------------

@dataclasses.dataclass(slots=True)
class Node:
    pool_id: str
    node_id: str
    host: str
    slots: int
    state: NodeState = NodeState.STARTING
    reason: str | None = None
    gen: int = 0
    connected: bool = False  # the shell has a channel to agent `gen`
    root: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    used: int = 0
    held: int = 0  # allocations holding this node
    runs: dict[RunId, int] = dataclasses.field(default_factory=dict)  # run -> slots
    pids: dict[RunId, int] = dataclasses.field(default_factory=dict)
    last_heard: float = 0.0
    last_ping: float = 0.0
    retry_at: float | None = None
    retry_s: float = 1.0
    fence_until: float | None = None  # lost: its runs are held until fenced or then
    fenced_runs: dict[RunId, int] = dataclasses.field(default_factory=dict)
    lost_reason: str = ""
    leaving: bool = False
    drop_data: bool = False  # leaving: its task directories go once it is gone
    disabled: bool = False  # scheduling disabled: nothing new is placed here
    reconnecting: bool = False
    persisted: Any = None  # the PersistNode last emitted

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool_id, self.node_id)


@dataclasses.dataclass(slots=True)
class Alloc:
    nodes: list[tuple[str, str]]  # node keys; the first is the primary
    hosts: list[str]
    slots: list[int]
    phase: MIPhase
    pending: set[RunId]
    task_dir: str
    failed: Exit | None = None
    killed: str | None = None
    fencing: set[int] = dataclasses.field(default_factory=set)  # instances on lost nodes

    def over(self) -> bool:
        return not self.pending and not self.fencing


_PLACED = TaskState.ACTIVE.check_move(TaskState.PREPARING)  # (a legal move, checked once)


@dataclasses.dataclass(slots=True)
class Attempt:
    """A task with an attempt in flight (placed, staging, queued on an agent, running)."""

    row: TaskRow
    node_key: tuple[str, str] | None = None
    task_dir: str = ""
    started_at: float | None = None
    terminated: bool = False
    requeue: bool = False  # its node is disabled or leaves: however it ends, requeued
    staging: dict[RunId, int] = dataclasses.field(default_factory=dict)  # run -> token
    pending_run: RunTask | None = None  # sent once its files are staged
    prep_wait: bool = False  # .. and its job's preparation task succeeded on its node
    alloc: Alloc | None = None
    # placed: preparing (files, agent queue, coordination) until its process starts
    task_state: TaskState = _PLACED


PREP, RELEASE = "preparation", "release"
RUNNING, SUCCEEDED, FAILED, SKIPPED = "running", "succeeded", "failed", "skipped"


@dataclasses.dataclass(slots=True)
class JobNode:
    """A job on one node: its preparation task there, whether its tasks ran there, and
    its release task."""

    prep: str | None = None  # None (not run), RUNNING, SUCCEEDED, FAILED
    prep_tries: int = 0  # retries used
    gen: int = 0  # the agent generation the preparation task ran under
    waiting: list[int] = dataclasses.field(default_factory=list)  # held task seqs
    ran: bool = False
    release: str | None = None


@dataclasses.dataclass(slots=True)
class PoolState:
    info: PoolInfo
    queue: RunQueue
    placer: Placer
    nodes: dict[str, Node] = dataclasses.field(default_factory=dict)
    cursor: tuple[int, int] | None = None  # every active task with key <= this is in memory
    exhausted: bool = False  # .. and nothing stored beyond it
    loading: bool = False
    avg_run_s: float | None = None
    per_slot: int = -1  # the prefetch depth the placer's nodes were last given
    total_slots: int = 0
    dirty: bool = True
    hold_until: float | None = None  # PoolHeld: nothing placed before this ..
    suspects: set[str] = dataclasses.field(default_factory=set)  # .. or these are reaped
    # its last resize: the target and the provider's nodes for it, so a node that still
    # leaves when the pool grows again (an SSH host draining) is taken in once it is gone
    target: int | None = None
    offered: tuple[NodeInfo, ...] = ()
    gens: dict[str, int] = dataclasses.field(default_factory=dict)  # of nodes gone


def _coordination_failed(node_id: str, ev: RunExited) -> str:
    """A failed coordination command in one line: the node, how it ended, its stderr's
    last line(s) (see 'hpcbatch task logs JOB TASK --coordination --node NODE')."""
    how = (f"exited with {ev.exit_code}" if ev.exit_code is not None else
           f"was killed by signal {ev.signal}" if ev.signal else
           f"did not start ({ev.start_failed})" if ev.start_failed else "failed")
    tail = " | ".join(line.strip() for line in (ev.stderr_tail or "").strip().splitlines()
                      [-3:] if line.strip())
    return (f"coordination command on node {node_id} {how}"
            + (f"; stderr: {tail[-300:]}" if tail else "; its stderr is empty"))


def _job_task_failure(ev: RunExited) -> str:
    if ev.start_failed:
        return f"did not start: {ev.start_failed}"
    if ev.timed_out:
        return "timed out (its max_wall_clock_time_s)"
    if ev.killed:
        return f"killed ({ev.killed})"
    if ev.signal:
        return f"killed by signal {ev.signal}"
    return f"exited with {ev.exit_code}"


def _exit_of(ev: RunExited) -> Exit:
    ex = Exit(exit_code=ev.exit_code, signal=ev.signal, timed_out=ev.timed_out,
              start_failed=ev.start_failed)
    if ev.upload_error:  # the command's own failure, if any, comes first
        if failure_of(ex) is None:
            return dataclasses.replace(ex, kind=FailureKind.FILE_UPLOAD_ERROR.value,
                                       detail=ev.upload_error)
        return dataclasses.replace(ex, detail=f"and {ev.upload_error}")
    return ex


def _failure(ex: Exit, killed: str | None, terminated: bool, failed: bool
             ) -> tuple[FailureKind | None, str | None]:
    if not failed:
        return None, None
    if terminated:
        return FailureKind.KILLED, "terminate"
    if killed and not ex.timed_out:
        return FailureKind.KILLED, killed
    kind = FailureKind(failure_of(ex) or "exit_code")
    if kind in (FailureKind.START_FAILED, FailureKind.PRE_PROCESSING_ERROR):
        return kind, ex.start_failed
    if kind is FailureKind.FILE_UPLOAD_ERROR:
        return kind, ex.detail
    if kind is FailureKind.SIGNAL:
        return kind, str(ex.signal) + (f": {ex.detail}" if ex.detail else "")
    return kind, ex.detail


class CoordinatorState:
    """Everything the coordinator decides, as a function of the events it was told."""

    def __init__(self, timings: Timings | None = None, *, prefetch: int = DEFAULT_PREFETCH,
                 protocol: int = 2):
        self.timings = timings or Timings()
        self.prefetch = prefetch
        self.protocol = protocol
        self.pools: dict[str, PoolState] = {}
        self.jobs: dict[str, JobInfo] = {}
        self.rows: dict[int, TaskRow] = {}  # queued in a window
        self.attempts: dict[int, Attempt] = {}  # in flight
        self.started: dict[int, float] = {}  # seq -> start: its MarkRunning, held back
        self.open: dict[str, int] = {}  # job -> tasks not completed
        self.terminating: set[str] = set()  # jobs terminated: completed once drained
        self.last_seq = 0
        self.loading_new = False
        self.want_new = False
        self._token = 0
        self._out: list[Instruction] = []
        self._dirty_nodes: dict[tuple[str, str], Node] = {}
        self._handlers: dict[type, Any] = {}
        self.now = 0.0
        # multi-instance tasks waiting for busy nodes (their pool's reservation): seq ->
        # (job, task, "waiting for 3 nodes; node2 runs job/task"); replaced, never
        # changed in place, so another thread may read it (the service's wait_job)
        self.waiting: dict[int, tuple[str, str, str]] = {}
        # job preparation and release tasks: a number per job (their run ids), each job's
        # record per node, the nodes a job skips (its preparation task failed there: node
        # -> why), jobs no node can run, and jobs whose release tasks run
        self.job_nums: dict[str, int] = {}
        self.num_jobs: dict[int, str] = {}
        self.job_nodes: dict[tuple[str, str, str], JobNode] = {}
        self.excluded: dict[str, dict[str, str]] = {}
        self.dead: dict[str, str] = {}
        self.releasing: dict[str, set[tuple[str, str]]] = {}

    # ---- entry point ---------------------------------------------------------------

    def handle(self, *events: Any) -> list[Instruction]:
        out = self._out = []
        handlers = self._handlers
        for ev in events:
            if ev.t > self.now:
                self.now = ev.t
            kind = type(ev)
            fn = handlers.get(kind)
            if fn is None:
                fn = handlers[kind] = getattr(self, "_on_" + kind.__name__)
            fn(ev)
        self._dispatch()
        self._flush_nodes()
        if self.started:
            self._flush_running()
        self._out = []
        return out

    def running_due(self) -> float | None:
        """When the first held-back MarkRunning is due (None: none is held)."""
        first = next(iter(self.started.values()), None)
        return None if first is None else first + RUNNING_WRITE_DELAY_S

    def _on_Clock(self, ev: Clock) -> None:
        pass  # (handle's end makes what is due)

    def _flush_running(self) -> None:
        """MarkRunning for the tasks that started RUNNING_WRITE_DELAY_S ago and run on
        (in the order they started)."""
        now, started = self.now, self.started
        while started:
            seq = next(iter(started))
            t = started[seq]
            if t + RUNNING_WRITE_DELAY_S > now:
                break
            del started[seq]
            att = self.attempts.get(seq)
            if att is not None and att.task_state is TaskState.RUNNING and \
                    att.started_at == t:
                self._emit(MarkRunning(seq, t))

    def _emit(self, ins: Instruction) -> None:
        self._out.append(ins)

    def node(self, pool_id: str, node_id: str) -> Node | None:
        pool = self.pools.get(pool_id)
        return pool.nodes.get(node_id) if pool else None

    def _live(self, ev: Any) -> Node | None:
        """The node an agent event is about, if it comes from its current agent."""
        node = self.node(ev.pool_id, ev.node_id)
        if node is None or ev.gen != node.gen or node.fence_until is not None:
            return None
        return node

    # ---- start, pools, jobs, work --------------------------------------------------

    def _on_Started(self, ev: Started) -> None:
        self.open.update(dict(ev.open_counts))
        self.last_seq = max(self.last_seq, ev.last_seq)

    def _on_PoolHeld(self, ev: PoolHeld) -> None:
        pool = self.pools.get(ev.pool_id)
        if pool is not None and ev.nodes:
            pool.hold_until = max(pool.hold_until or 0.0, ev.until)
            pool.suspects.update(ev.nodes)

    def _on_NodeReaped(self, ev: NodeReaped) -> None:
        pool = self.pools.get(ev.pool_id)
        if pool is not None and ev.sure:
            pool.suspects.discard(ev.node_id)

    def _held(self, pool: PoolState) -> bool:
        """Whether the pool still waits for what earlier agents ran (see PoolHeld)."""
        if pool.hold_until is None:
            return False
        if pool.suspects and self.now < pool.hold_until:
            return True
        pool.hold_until = None
        pool.suspects.clear()
        pool.dirty = True
        return False

    def _on_JobsKnown(self, ev: JobsKnown) -> None:
        for job in ev.jobs:
            self.jobs[job.job_id] = job

    def _on_JobForgotten(self, ev: JobForgotten) -> None:
        self.jobs.pop(ev.job_id, None)
        self.open.pop(ev.job_id, None)
        self.terminating.discard(ev.job_id)
        num = self.job_nums.pop(ev.job_id, None)
        self.num_jobs.pop(num, None)
        for key in [k for k in self.job_nodes if k[0] == ev.job_id]:
            del self.job_nodes[key]
        self.excluded.pop(ev.job_id, None)
        self.dead.pop(ev.job_id, None)
        self.releasing.pop(ev.job_id, None)

    def _on_PoolAdded(self, ev: PoolAdded) -> None:
        if ev.pool.pool_id in self.pools:
            return
        pool = PoolState(ev.pool, RunQueue(), Placer(ev.pool.policy))
        self.pools[ev.pool.pool_id] = pool
        for info in ev.nodes:
            self._add_node(pool, info)
        self._want_window(pool)

    def _add_node(self, pool: PoolState, info: NodeInfo) -> None:
        # a node id that was in the pool before goes on from its last generation, so
        # nothing its old agent still says is taken for the new one's
        node = Node(pool.info.pool_id, info.node_id, info.host, info.slots,
                    retry_s=self.timings.reconnect_min_s, disabled=info.disabled,
                    gen=pool.gens.pop(info.node_id, 0))
        pool.nodes[info.node_id] = node
        pool.total_slots += node.slots
        # the placer breaks ties by the order nodes were first given: the pool's order,
        # not the order their agents happen to say hello in
        pool.placer.set_node(info.node_id, info.slots, info.slots, 0)
        pool.placer.remove_node(info.node_id)
        self._persist_node(node)
        self._start_agent(node)

    def _on_NodeGranted(self, ev: NodeGranted) -> None:
        pool = self.pools.get(ev.pool_id)
        if pool is not None and ev.node.node_id not in pool.nodes:
            self._add_node(pool, ev.node)

    def _on_NodeLeaving(self, ev: NodeLeaving) -> None:
        node = self.node(ev.pool_id, ev.node_id)
        if node is None:
            self._reply(ev.reply, f"node {ev.node_id!r} is not in pool {ev.pool_id!r}")
            return
        if not node.leaving:
            pool = self.pools[ev.pool_id]
            if pool.target is not None:  # the pool is one node smaller
                pool.target = max(0, pool.target - 1)
            self._leave(node, ev.running)
        self._reply(ev.reply)

    def _leave(self, node: Node, running: str, drop_data: bool = False) -> None:
        node.leaving = True
        node.drop_data = drop_data
        self._unplace(node)
        if node.runs and NodeState.LEAVING in _moves(node.state):
            self._set_node(node, NodeState.LEAVING,
                           f"leaving the pool once its tasks {_WHEN_LEFT[running]}")
        self._handle_running(node, running)
        self._maybe_gone(node)

    def _maybe_gone(self, node: Node) -> None:
        """A leaving node with nothing left on it is stopped and forgotten."""
        if not node.leaving or node.runs or node.fenced_runs:
            return
        pool = self.pools.get(node.pool_id)
        if pool is None or pool.nodes.get(node.node_id) is not node:
            return
        self._emit(StopAgent(node.pool_id, node.node_id, node.gen))
        pool.placer.remove_node(node.node_id)
        del pool.nodes[node.node_id]
        pool.total_slots -= node.slots
        pool.suspects.discard(node.node_id)
        self._dirty_nodes.pop(node.key, None)
        self._emit(DropNode(node.pool_id, node.node_id))
        pool.gens[node.node_id] = node.gen
        if pool.target is not None:  # the pool grew again meanwhile: maybe it comes back
            self._fill(pool)
        if node.drop_data and node.node_id not in pool.nodes:
            self._emit(RemoveNodeData(node.pool_id, node.node_id))

    def _on_PoolResized(self, ev: PoolResized) -> None:
        pool = self.pools.get(ev.pool_id)
        if pool is None:
            self._reply(ev.reply)
            return
        pool.target = ev.target
        pool.offered = ev.nodes
        staying = [n for n in pool.nodes.values() if not n.leaving]
        if len(staying) < ev.target:
            more = self._fill(pool)
            if more > 0 and ev.nodes and not any(n.leaving for n in pool.nodes.values()):
                self._emit(Log(logging.WARNING, f"pool {ev.pool_id}: {more} node(s) short of "
                                                f"its target of {ev.target}"))
        elif len(staying) > ev.target:
            order = {nid: i for i, nid in enumerate(pool.nodes)}
            gentle = ev.running in (TASK_COMPLETION, RETAINED_DATA)
            # (keep: the provider names the nodes that stay.) Else idle first (those
            # that cannot take work before those that can), then the least busy; among
            # equals the newest goes. Letting tasks finish, a node of a running
            # multi-instance task goes last.
            staying.sort(key=lambda n: (n.node_id in ev.keep if ev.keep is not None
                                        else False, gentle and n.held > 0,
                                        bool(n.runs or n.fenced_runs),
                                        n.state in usable and not n.disabled,
                                        len(n.runs), -order[n.node_id]))
            running = ev.running if ev.running in DEALLOCATION_OPTIONS else REQUEUE
            for node in staying[:len(staying) - ev.target]:
                self._leave(node, running, drop_data=running != RETAINED_DATA)
        self._reply(ev.reply)

    def _fill(self, pool: PoolState) -> int:
        """Add the offered nodes the pool lacks for its target (a node still leaving is
        taken in once it has gone); how many it is still short of."""
        more = (pool.target or 0) - sum(1 for n in pool.nodes.values() if not n.leaving)
        for info in pool.offered:
            if more <= 0:
                break
            if info.node_id not in pool.nodes:
                self._add_node(pool, info)
                more -= 1
        return max(0, more)

    def _on_NodeSchedulingSet(self, ev: NodeSchedulingSet) -> None:
        node = self.node(ev.pool_id, ev.node_id)
        if node is None or node.leaving:
            why = "is leaving" if node is not None else "is not in"
            self._reply(ev.reply, f"node {ev.node_id!r} {why} pool {ev.pool_id!r}")
            return
        if node.disabled != (not ev.enabled):
            node.disabled = not ev.enabled
            self._persist_node(node)
            self._place_node(self.pools[node.pool_id], node)
        if not ev.enabled:
            self._handle_running(node, ev.running)
        self._reply(ev.reply)

    def _handle_running(self, node: Node, running: str) -> None:
        """What runs on a node that takes no new work: requeued, terminated, or left to
        finish (then only what has not started yet, queued on its agent, is requeued)."""
        seqs = sorted({run.seq for run in node.runs if run.kind is not RunKind.START_TASK})
        for seq in seqs:
            att = self.attempts.get(seq)
            if att is None:
                continue
            unstarted = att.alloc is None and att.task_state is TaskState.PREPARING
            if running == TERMINATE:
                self._terminate_attempt(att)
            elif running == REQUEUE or unstarted:
                self._requeue_attempt(att)

    def _requeue_attempt(self, att: Attempt) -> None:
        """Stop the attempt; however it then ends (unless it succeeded first, or was
        terminated), the task is requeued: not counted as a retry."""
        alloc = att.alloc
        if att.terminated or att.requeue or (alloc is not None and alloc.failed is not None):
            return  # (a failed multi-instance attempt is ending on its own)
        att.requeue = True
        self._kill_attempt(att, REQUEUE, "requeued")

    def _kill_attempt(self, att: Attempt, reason: str, never_started: str) -> None:
        """Kill what runs of the attempt (``reason``: the kill's, requeue or terminate).
        One that never started (a multi-instance attempt still staging, a task still
        copying its files) ends at once, as start_failed ``never_started``."""
        seq = att.row.seq
        alloc = att.alloc
        if alloc is not None:
            if alloc.phase is MIPhase.STAGING:
                self._fail_alloc(att, Exit(None, start_failed=never_started), reason)
                return
            for run in sorted(alloc.pending, key=lambda r: (r.kind.value, r.index)):
                key = alloc.nodes[run.index]
                self._emit(KillRun(key[0], key[1], run, reason))
            return
        node = self.node(*att.node_key) if att.node_key else None
        if att.pending_run is not None:  # still copying its files: never started
            att.pending_run = None
            att.staging.clear()
            if node is not None:
                self._vacate(node, RunId(seq))
            self._finish(att, Exit(None, start_failed=never_started), killed=reason)
            return
        if node is not None and node.fence_until is None:
            self._emit(KillRun(node.pool_id, node.node_id, RunId(seq), reason))

    def _on_PoolRemoved(self, ev: PoolRemoved) -> None:
        pool = self.pools.pop(ev.pool_id, None)
        if pool is None:
            return
        for node in pool.nodes.values():
            if node.gen:
                self._emit(StopAgent(node.pool_id, node.node_id, node.gen))
        for seq in [s for s, r in self.rows.items() if r.pool_id == ev.pool_id]:
            del self.rows[seq]

    def _on_WorkNoticed(self, ev: WorkNoticed) -> None:
        self.want_new = True
        for pool in self.pools.values():
            if pool.exhausted and not pool.loading:
                pool.dirty = True

    def _on_WorkAdded(self, ev: WorkAdded) -> None:
        self.loading_new = False
        self.want_new = ev.more
        for row in ev.rows:
            if row.seq <= self.last_seq:
                continue
            self.last_seq = row.seq
            self.open[row.job_id] = self.open.get(row.job_id, 0) + 1
            pool = self.pools.get(row.pool_id)
            if pool is None or row.seq in self.rows or row.seq in self.attempts:
                continue
            if pool.exhausted or (pool.cursor is not None and row.key <= pool.cursor):
                self._enqueue(pool, row)
                if pool.exhausted:
                    pool.cursor = max(pool.cursor or row.key, row.key)

    def _on_WindowLoaded(self, ev: WindowLoaded) -> None:
        pool = self.pools.get(ev.pool_id)
        if pool is None:
            return
        pool.loading = False
        pool.dirty = True
        if not ev.rows:
            pool.exhausted = ev.exhausted
            return
        # the whole window at once: one heap extend and one size check, not one per row
        rows, attempts = self.rows, self.attempts
        fresh = {row.seq: row for row in ev.rows if row.seq not in rows
                 and row.seq not in attempts}
        if self.dead:
            for seq in [s for s, r in fresh.items() if r.job_id in self.dead]:
                self._doom(fresh.pop(seq))
        rows.update(fresh)
        pool.queue.extend(Runnable(r.neg_priority, r.seq, r.required_slots, r.instances,
                                   r.slots_per_instance) for r in fresh.values())
        top = max(row.key for row in ev.rows)
        pool.cursor = top if pool.cursor is None else max(pool.cursor, top)
        pool.exhausted = ev.exhausted
        if len(pool.queue) > 2 * self._window_size(pool):
            self._evict(pool)  # (sets the cursor back to the last task it keeps)

    def _window_size(self, pool: PoolState) -> int:
        return max(WINDOW_MIN, min(WINDOW_MAX, 4 * pool.total_slots))

    def _want_window(self, pool: PoolState) -> None:
        """Ask for more runnable work of the pool when its queue runs low."""
        if pool.loading or pool.exhausted:
            return
        size = self._window_size(pool)
        if len(pool.queue) >= size // 2:
            return
        pool.loading = True
        self._emit(LoadWindow(pool.info.pool_id, pool.cursor, size))

    def _enqueue(self, pool: PoolState, row: TaskRow) -> None:
        if self.dead and row.job_id in self.dead:
            self._doom(row)
            return
        self.rows[row.seq] = row
        pool.queue.push(Runnable(row.neg_priority, row.seq, row.required_slots, row.instances,
                                 row.slots_per_instance))
        pool.dirty = True
        if len(pool.queue) > 2 * self._window_size(pool):
            self._evict(pool)

    def _evict(self, pool: PoolState) -> None:
        """Keep the window bounded: forget the queued tasks beyond its size (they stay
        stored, active, and come back through a later window)."""
        keep = self._window_size(pool)
        ordered = pool.queue.take(len(pool.queue))
        for r in ordered[keep:]:
            self.rows.pop(r.seq, None)
        pool.queue.extend(ordered[:keep])
        last = ordered[keep - 1]
        pool.cursor = (last.neg_priority, last.seq)
        pool.exhausted = False

    def _requeue_row(self, row: TaskRow) -> None:
        """A task whose attempt ended goes back to its pool's queue (or, when it lies beyond
        the window, is left to a later window: it is active in the store)."""
        pool = self.pools.get(row.pool_id)
        if pool is None:
            return
        if pool.exhausted or (pool.cursor is not None and row.key <= pool.cursor):
            self._enqueue(pool, row)

    # ---- nodes ---------------------------------------------------------------------

    def _persist_node(self, node: Node) -> None:
        """Record the node at the end of this handle() (once, however often it changed)."""
        self._dirty_nodes[node.key] = node

    def _flush_nodes(self) -> None:
        dirty, self._dirty_nodes = self._dirty_nodes, {}
        for node in dirty.values():
            info = dict(node.info)
            info["reconnecting"] = node.reconnecting
            if node.disabled:
                info["scheduling"] = "disabled"
            rec = PersistNode(node.pool_id, node.node_id, node.state, node.slots, node.reason,
                              tuple(sorted(info.items())))
            if rec != node.persisted:
                node.persisted = rec
                self._emit(rec)

    def _set_node(self, node: Node, state: NodeState, reason: str | None = None) -> None:
        if state is not node.state:
            node.state = node.state.check_move(state)
        node.reason = reason
        self._persist_node(node)
        pool = self.pools.get(node.pool_id)
        if pool is not None:
            self._place_node(pool, node)

    def _start_agent(self, node: Node) -> None:
        node.gen += 1
        node.connected = False
        node.root = None
        node.last_heard = self.now
        self._emit(StartAgent(node.pool_id, node.node_id, node.gen))

    def _on_AgentUp(self, ev: AgentUp) -> None:
        node = self._live(ev)
        if node is not None:
            node.connected = True
            node.last_heard = ev.t

    def _on_AgentStartFailed(self, ev: AgentStartFailed) -> None:
        node = self._live(ev)
        if node is None:
            return
        node.connected = False
        if node.leaving:
            self._maybe_gone(node)
            return
        self._unusable(node, f"bootstrap failed: {ev.reason}")

    def _unusable(self, node: Node, reason: str) -> None:
        """Unusable, and tried again after 1, 2, 4 .. at most reconnect_max_s."""
        delay = node.retry_s
        node.retry_at = self.now + delay
        node.retry_s = min(delay * 2, self.timings.reconnect_max_s)
        node.reconnecting = False
        self._set_node(node, NodeState.UNUSABLE, f"{reason}; trying again in {delay:g} s")

    def _on_AgentHello(self, ev: AgentHello) -> None:
        node = self._live(ev)
        if node is None:
            return
        node.last_heard = ev.t
        node.connected = True
        pool = self.pools.get(node.pool_id)
        if pool is not None:  # an agent reaps what earlier ones left before its hello
            pool.suspects.discard(node.node_id)
        if ev.protocol != self.protocol:
            self._emit(StopAgent(node.pool_id, node.node_id, node.gen))
            node.connected = False
            node.retry_s = self.timings.reconnect_max_s
            self._unusable(node, f"its agent speaks protocol {ev.protocol}, this coordinator "
                                 f"{self.protocol}: install the same hpcbatch version on both")
            return
        node.root = ev.root
        node.info = dict(ev.info)
        node.info["root"] = ev.root
        pool = self.pools[node.pool_id]
        if pool.info.apps:  # the pool's packages first: its start task may use them
            self._emit(StageNodeApps(node.pool_id, node.node_id, node.gen))
            node.reconnecting = False
            self._set_node(node, NodeState.STARTING, "copying its application packages")
            return
        self._after_apps(node)

    def _on_NodeAppsStaged(self, ev: NodeAppsStaged) -> None:
        node = self._live(ev)
        if node is None or node.state is not NodeState.STARTING or not node.connected:
            return
        if ev.error:
            self._unusable(node, f"application packages: {ev.error}")
            return
        self._after_apps(node)

    def _after_apps(self, node: Node) -> None:
        """The node has its pool's packages (if any): its start task, or ready."""
        pool = self.pools[node.pool_id]
        start_task = pool.info.start_task
        if start_task:
            root = node.root or ""
            tdir = posixpath.join(root, "starttask")
            env = {E.POOL_ID: node.pool_id, E.NODE_ID: node.node_id, E.TASK_DIR: tdir,
                   E.TASK_WORKING_DIR: posixpath.join(tdir, "wd"),
                   E.NODE_SHARED_DIR: posixpath.join(root, "shared")}
            self._emit(RunStartTask(node.pool_id, node.node_id, start_task, tdir,
                                    tuple(sorted(env.items()))))
            node.reconnecting = False
            self._set_node(node, NodeState.STARTING, "running its start task")
        else:
            self._node_ready(node)

    def _node_ready(self, node: Node) -> None:
        node.used = node.held = 0
        node.retry_s = self.timings.reconnect_min_s
        node.reconnecting = False
        self._set_node(node, NodeState.IDLE)

    def _on_Heartbeat(self, ev: Heartbeat) -> None:
        node = self._live(ev)
        if node is not None:
            node.last_heard = max(node.last_heard, ev.t)

    def _on_AgentError(self, ev: AgentError) -> None:
        node = self._live(ev)
        if node is None:
            return
        node.last_heard = max(node.last_heard, ev.t)
        about = f" (run {ev.run.wire})" if ev.run is not None else ""
        self._emit(Log(logging.WARNING, f"node {node.pool_id}/{node.node_id}: agent error"
                                        f"{about}: {ev.message}"))
        node.info["last_error"] = ev.message[:500]
        self._persist_node(node)

    def _on_AgentClosed(self, ev: AgentClosed) -> None:
        node = self._live(ev)
        if node is None or not node.connected:  # (its Bye came first, or it was stopped)
            return
        node.connected = False
        words = f" ({ev.words})" if ev.words else ""
        self._lose(node, f"agent connection closed{words}")

    def _lose(self, node: Node, reason: str) -> None:
        """The node's agent is gone or silent: stop talking to it, fence it, and hold what
        ran there until that is sure (or its lease has run out): only then is it requeued
        or counted failed, so nothing runs twice at the same time."""
        if node.fence_until is not None:
            return
        self._emit(Log(logging.WARNING, f"node {node.pool_id}/{node.node_id} lost: {reason}"))
        self._emit(StopAgent(node.pool_id, node.node_id, node.gen, lost=True))
        self._emit(FenceNode(node.pool_id, node.node_id, node.gen,
                             tuple(sorted(set(node.pids.values())))))
        node.fence_until = self.now + self.timings.fence_wait_s
        self._job_tasks_lost(node, reason)
        node.fenced_runs = dict(node.runs)
        node.lost_reason = reason
        node.connected = False
        node.pids.clear()
        self._unplace(node)
        # the attempts see their instance gone now (no new work is sent anywhere for them);
        # their requeue or retry waits for the fence
        for run in list(node.fenced_runs):
            att = self.attempts.get(run.seq)
            if att is not None and att.alloc is not None:
                self._instance_lost(att, node, run)
        node.retry_at = None
        node.reconnecting = False
        if node.state is not NodeState.UNUSABLE:
            self._set_node(node, NodeState.UNUSABLE, f"{reason}; fencing it")

    def _on_NodeFenced(self, ev: NodeFenced) -> None:
        node = self.node(ev.pool_id, ev.node_id)
        if node is None or node.fence_until is None or ev.gen != node.gen:
            return
        if ev.sure:
            self._fenced(node)

    def _fenced(self, node: Node) -> None:
        """Nothing of the lost agent runs any more: its runs end here."""
        node.fence_until = None
        runs, node.fenced_runs = node.fenced_runs, {}
        for run in sorted(runs, key=lambda r: (r.seq, r.kind.value, r.index)):
            att = self.attempts.get(run.seq)
            if att is None:
                continue
            if att.alloc is not None:
                self._instance_gone(att, run)
                continue
            self._vacate(node, run)
            self._end_lost(att, node)
        node.runs.clear()
        node.used = node.held = 0
        if node.leaving:
            self._maybe_gone(node)
            return
        self._unusable(node, node.lost_reason)

    def _end_lost(self, att: Attempt, node: Node) -> None:
        """An ordinary task of a lost node: requeued (not a retry), or, when a terminate
        was asked, completed as killed."""
        if att.terminated:
            self._finish(att, Exit(None, node_lost=True), killed="terminate")
            return
        del self.attempts[att.row.seq]
        self.started.pop(att.row.seq, None)
        att.task_state.check_move(TaskState.ACTIVE)
        self._emit(FinishAttempt(att.row.seq, "requeue", node.node_id, att.started_at, self.now,
                                 None, None, FailureKind.NODE_LOST, node.lost_reason, (),
                                 att.row.retry_count))
        self._requeue_row(dataclasses.replace(att.row, attempt=att.row.attempt + 1))

    def _on_Tick(self, ev: Tick) -> None:
        now = ev.t
        tm = self.timings
        for pool in self.pools.values():
            for node in list(pool.nodes.values()):
                if node.fence_until is not None:
                    if now >= node.fence_until:
                        self._fenced(node)
                    continue
                if node.state is NodeState.UNUSABLE:
                    if node.leaving:
                        self._maybe_gone(node)
                        continue
                    if node.retry_at is not None and now >= node.retry_at:
                        node.retry_at = None
                        node.reconnecting = True
                        self._set_node(node, NodeState.STARTING,
                                       f"reconnecting ({node.reason})")
                        self._start_agent(node)
                    continue
                if node.state is NodeState.OFFLINE:
                    continue
                if not node.connected:
                    continue  # still being started (an SSH bootstrap reports its own end)
                if now - node.last_heard > tm.node_timeout_s:
                    self._lose(node, f"no word from its agent for {now - node.last_heard:.1f} s")
                elif now - node.last_ping >= tm.heartbeat_s:
                    node.last_ping = now
                    self._emit(Ping(node.pool_id, node.node_id, now))

    # ---- placement -----------------------------------------------------------------

    def _per_slot(self, pool: PoolState) -> int:
        if pool.avg_run_s is None:
            # before any task was timed, one queued per slot, but none while a node of the
            # pool is still coming up (a cold start): a task queued behind a busy node
            # would wait there while that node's slot stands free
            if any(n.state is NodeState.STARTING and not n.reconnecting and not n.disabled
                   and not n.leaving for n in pool.nodes.values()):
                return 0
            return min(1, self.prefetch)
        return min(self.prefetch, int(PREFETCH_HORIZON_S / max(pool.avg_run_s, 1e-4)))

    def _place_node(self, pool: PoolState, node: Node) -> None:
        """Tell the placer what the node can take now."""
        if node.state in usable and not node.leaving and not node.disabled and \
                node.fence_until is None:
            queue = 0 if node.held else node.slots * max(pool.per_slot, 0)
            pool.placer.set_node(node.node_id, node.slots, node.used, queue)
        else:
            pool.placer.remove_node(node.node_id)
        pool.dirty = True

    def _unplace(self, node: Node) -> None:
        pool = self.pools.get(node.pool_id)
        if pool is not None:
            pool.placer.remove_node(node.node_id)

    def _dispatch(self) -> None:
        if self.want_new and not self.loading_new:
            self.loading_new = True
            self._emit(LoadNewWork(self.last_seq, NEW_WORK_SLICE))
        budget = PLACE_BUDGET
        for pool in self.pools.values():
            per_slot = self._per_slot(pool)
            if per_slot != pool.per_slot:  # the prefetch depth changed: every node's queue
                pool.per_slot = per_slot
                for node in pool.nodes.values():
                    self._place_node(pool, node)
            if not pool.dirty or self._held(pool):
                continue
            pool.dirty = False
            if len(pool.queue) and budget > 0:
                pool.placer.begin_round()
                decisions = schedule_from_queue(
                    pool.queue, pool.placer, budget=budget,
                    excluded=self._skipped_nodes if self.excluded else None)
                budget -= len(decisions)
                for d in decisions:
                    row = self.rows.pop(d.seq)
                    if isinstance(d, Allocation):
                        self._allocate(pool, row, d)
                    else:
                        self._assign(pool, row, pool.nodes[d.node_id], d.slots)
                if budget <= 0:
                    pool.dirty = True
                self._note_waiting(pool)
            self._want_window(pool)
        if self.waiting and any(seq not in self.rows for seq in self.waiting):
            # placed, terminated or deleted since: no longer waiting
            self.waiting = {k: v for k, v in self.waiting.items() if k in self.rows}

    def _note_waiting(self, pool: PoolState) -> None:
        """After a round: the wide task holding the pool's reservation says what it
        waits for (which nodes, and which tasks hold them); the pool's others are not."""
        seq = pool.placer.reservation
        row = self.rows.get(seq) if seq is not None else None
        waiting = {k: v for k, v in self.waiting.items()
                   if self.rows.get(k) is None or self.rows[k].pool_id != pool.info.pool_id}
        if row is not None:
            busy = []
            for nid in pool.placer.reserved:
                node = pool.nodes.get(nid)
                owners = sorted({f"{a.row.job_id}/{a.row.task_id}"
                                 for a in (self.attempts.get(r.seq) for r in node.runs)
                                 if a is not None}) if node is not None else []
                if owners:
                    busy.append(f"{nid} runs {', '.join(owners[:3])}"
                                + (f" (+{len(owners) - 3})" if len(owners) > 3 else ""))
            why = f"waiting for {row.instances} nodes of pool {pool.info.pool_id}"
            if busy:
                why += "; " + "; ".join(busy)
            waiting[seq] = (row.job_id, row.task_id, why)
        if waiting != self.waiting:
            self.waiting = waiting

    def _occupy(self, node: Node, run: RunId, slots: int) -> None:
        node.used += slots
        node.runs[run] = slots
        if run.kind is not RunKind.TASK:
            node.held += 1
        if node.state is NodeState.IDLE:
            node.state = node.state.check_move(NodeState.RUNNING)
            node.reason = None
            self._persist_node(node)
        if node.held:
            self._place_node(self.pools[node.pool_id], node)

    def _vacate(self, node: Node, run: RunId) -> None:
        slots = node.runs.pop(run, None)
        node.pids.pop(run, None)
        if slots is None:
            return
        node.used -= slots
        if run.kind is not RunKind.TASK:
            node.held -= 1
        if not node.runs and node.state is NodeState.RUNNING:
            node.state = node.state.check_move(NodeState.IDLE)
            self._persist_node(node)
        pool = self.pools.get(node.pool_id)
        if pool is not None:
            self._place_node(pool, node)
        self._maybe_gone(node)

    def _task_env(self, row: TaskRow, node: Node, tdir: str, attempt: int) -> dict[str, str]:
        root = node.root or ""
        return {
            E.POOL_ID: row.pool_id, E.NODE_ID: node.node_id, E.JOB_ID: row.job_id,
            E.TASK_ID: row.task_id, E.TASK_DIR: tdir,
            E.TASK_WORKING_DIR: f"{tdir}/wd",
            E.NODE_SHARED_DIR: f"{root}/shared",
            **({E.JOB_PREP_DIR: f"{root}/jobs/{row.job_id}/{JOB_PREPARATION_ID}"}
               if row.job_id in self.jobs and self.jobs[row.job_id].prep else {}),
            E.TASK_ATTEMPT: str(attempt),
        }

    def _next_token(self) -> int:
        self._token += 1
        return self._token

    def _assign(self, pool: PoolState, row: TaskRow, node: Node, slots: int) -> None:
        run = RunId(row.seq)
        tdir = f"{node.root or ''}/jobs/{row.job_id}/{row.task_id}"
        att = Attempt(row, node.key, tdir)
        self.attempts[row.seq] = att
        self._occupy(node, run, slots)
        self._emit(MarkPreparing(row.seq, node.node_id, tdir, self.now))
        msg = RunTask(node.pool_id, node.node_id, row.seq, run, tdir,
                      self._task_env(row, node, tdir, row.attempt), slots)
        att.prep_wait = self._prep_first(row, node)
        if att.prep_wait and not row.flags & (FLAG_RESOURCE_FILES | FLAG_APPS):
            att.pending_run = msg  # sent once the job's preparation task succeeded here
        elif row.flags & (FLAG_RESOURCE_FILES | FLAG_APPS):
            att.pending_run = msg
            token = self._next_token()
            att.staging[run] = token
            groups = []
            if row.flags & FLAG_RESOURCE_FILES:
                groups.append(("resource", posixpath.join(tdir, "wd")))
            if row.flags & FLAG_APPS:
                groups.append(("apps", node.root or ""))
            self._emit(StageFiles(node.pool_id, node.node_id, row.seq, run, token,
                                  tuple(groups)))
        else:
            self._emit(msg)

    # ---- task ends -------------------------------------------------------------------

    def _on_RunStarted(self, ev: RunStarted) -> None:
        node = self._live(ev)
        if node is None:
            return
        node.last_heard = max(node.last_heard, ev.t)
        if ev.run in node.runs:
            node.pids[ev.run] = ev.pid
        att = self.attempts.get(ev.run.seq)
        if att is None or ev.run.kind not in (RunKind.TASK, RunKind.APPLICATION):
            return
        if ev.run.kind is RunKind.TASK and att.node_key != node.key:
            return
        if att.task_state is TaskState.RUNNING:
            return
        att.task_state = att.task_state.check_move(TaskState.RUNNING)
        att.started_at = ev.t
        self.started.pop(ev.run.seq, None)  # (a later attempt: to the end of the order)
        self.started[ev.run.seq] = ev.t  # written by _flush_running, or with its end

    def _on_RunExited(self, ev: RunExited) -> None:
        node = self._live(ev)
        if node is None:
            return
        node.last_heard = max(node.last_heard, ev.t)
        run = ev.run
        if run.kind is RunKind.START_TASK:
            if node.state is not NodeState.STARTING:
                return
            if ev.exit_code == 0:
                self._node_ready(node)
            else:
                why = ev.start_failed or f"exited with {ev.exit_code}"
                self._set_node(node, NodeState.START_TASK_FAILED,
                               f"start task {why}; see "
                               f"{posixpath.join(node.root or '', 'starttask', 'stderr.txt')}")
            return
        if run.kind in (RunKind.JOB_PREP, RunKind.JOB_RELEASE):
            self._job_task_exited(node, ev)
            return
        att = self.attempts.get(run.seq)
        if run.kind in (RunKind.COORDINATION, RunKind.APPLICATION):
            if att is not None and att.alloc is not None:
                self._instance_exited(att, node, ev)
            return
        if run not in node.runs:
            return
        if att is None:
            self._vacate(node, run)
            return
        self._vacate(node, run)
        if ev.killed in AGENT_STOPPED and not att.terminated:
            # the agent stopped it on its own (its lease ran out, or it was shut down):
            # not the task's failure, so a requeue
            node.lost_reason = f"its agent stopped the task ({ev.killed})"
            self._end_lost(att, node)
            return
        if ev.start is not None and ev.end is not None:
            pool = self.pools[node.pool_id]
            took = ev.end - ev.start
            pool.avg_run_s = took if pool.avg_run_s is None else 0.9 * pool.avg_run_s + 0.1 * took
        self._finish(att, _exit_of(ev), killed=ev.killed, start=ev.start, end=ev.end,
                     usage=ev.usage)

    def _finish(self, att: Attempt, ex: Exit, *, killed: str | None = None,
                start: float | None = None, end: float | None = None,
                usage: tuple = ()) -> None:
        """Success, retry (back to the queue) or failure, from how the attempt ended."""
        row = att.row
        del self.attempts[row.seq]
        self.started.pop(row.seq, None)
        if att.terminated:
            killed = "terminate"
        outcome = decide_exit(ex, row.retry_count, row.max_retries)
        node_id = att.node_key[1] if att.node_key else None
        started = start if start is not None else att.started_at
        if att.requeue and not att.terminated and outcome.result is not TaskResult.SUCCESS:
            # its node was disabled or left: back to the queue, not a retry
            att.task_state.check_move(TaskState.ACTIVE)
            self._emit(FinishAttempt(row.seq, "requeue", node_id, started, end or self.now,
                                     ex.exit_code, ex.signal, FailureKind.KILLED, REQUEUE,
                                     usage, row.retry_count))
            self._requeue_row(dataclasses.replace(row, attempt=row.attempt + 1))
            return
        again = outcome.retry and not att.terminated
        att.task_state.check_move(TaskState.ACTIVE if again else TaskState.COMPLETED)
        failed = outcome.failure is not None
        kind, detail = _failure(ex, killed, att.terminated, failed)
        if again:
            retried = dataclasses.replace(row, retry_count=row.retry_count + 1,
                                          attempt=row.attempt + 1)
            self._emit(FinishAttempt(row.seq, "retry", node_id, started, end or self.now,
                                     ex.exit_code, ex.signal, kind, detail, usage,
                                     retried.retry_count))
            self._requeue_row(retried)
            return
        result = outcome.result or TaskResult.FAILURE
        self._emit(FinishAttempt(row.seq, result.value, node_id, started, end or self.now,
                                 ex.exit_code, ex.signal, kind, detail, usage, row.retry_count))
        self._completed(row)

    def _completed(self, row: TaskRow) -> None:
        self._completed_job(row.job_id)

    def _completed_job(self, job_id: str) -> None:
        left = self.open[job_id] = self.open.get(job_id, 1) - 1
        if left <= 0:
            self._emit(JobDrained(job_id))
            job = self.jobs.get(job_id)
            if job_id in self.terminating or (job is not None and job.terminate_when_done):
                if self._start_release(job_id):
                    return  # completed once its release tasks have ended
                self.terminating.discard(job_id)
                self._emit(CompleteJobIfDone(job_id))

    def _reply(self, reply: int, error: str | None = None) -> None:
        if reply:
            self._emit(Reply(reply, error))

    def _on_TerminateAsked(self, ev: TerminateAsked) -> None:
        seq = ev.seq
        att = self.attempts.get(seq)
        row = self.rows.get(seq)
        if att is None:
            if row is not None:  # queued: never started
                del self.rows[seq]
                pool = self.pools.get(row.pool_id)
                if pool is not None:
                    pool.queue.discard({seq})
            # queued, or stored active beyond the window: completed without a run
            self._emit(CompleteUnstarted(seq, FailureKind.KILLED, "terminate", ev.t))
            if row is not None or seq <= self.last_seq:  # counted open: count it done
                self._completed_job(ev.job_id)
            if ev.reply:
                self._emit(Reply(ev.reply))
            return
        if ev.reply:
            self._emit(Reply(ev.reply))
        self._terminate_attempt(att)

    def _terminate_attempt(self, att: Attempt) -> None:
        """Its current attempt is its last: killed, and completed as killed:terminate
        however it ends (never retried or requeued)."""
        if att.terminated:
            return
        att.terminated = True
        self._kill_attempt(att, "terminate", "terminated")

    def _on_JobTerminateAsked(self, ev: JobTerminateAsked) -> None:
        job_id = ev.job_id
        queued = {s for s, r in self.rows.items() if r.job_id == job_id}
        for seq in queued:
            pool = self.pools.get(self.rows.pop(seq).pool_id)
            if pool is not None:
                pool.queue.discard({seq})
        # every task of the job that is not in flight is completed in the store (those
        # beyond the windows and those not read yet too): only the ones in flight stay open
        self._emit(TerminateJobTasks(job_id, ev.t))
        in_flight = sorted(s for s, a in self.attempts.items() if a.row.job_id == job_id)
        self.open[job_id] = len(in_flight)
        self.terminating.add(job_id)
        self._reply(ev.reply)
        for seq in in_flight:
            att = self.attempts.get(seq)
            if att is not None:
                self._terminate_attempt(att)
        if not in_flight:
            self.open[job_id] = 1
            self._completed_job(job_id)

    def _on_ReactivateAsked(self, ev: ReactivateAsked) -> None:
        row = ev.row
        seq = row.seq
        if seq in self.rows or seq in self.attempts:  # not completed after all
            self._reply(ev.reply, f"task {row.job_id}/{row.task_id} is not completed; only "
                                  "a failed completed task can be reactivated")
            return
        if row.job_id in self.terminating:
            self._reply(ev.reply, f"job {row.job_id!r} is terminating; reactivate its tasks "
                                  "once it has completed")
            return
        self._emit(ReactivateTask(seq, row.job_id, ev.t))
        if seq > self.last_seq:  # not read yet: the next slice of new work reads it
            self.want_new = True
        else:
            self.open[row.job_id] = max(self.open.get(row.job_id, 0), 0) + 1
            self._requeue_row(dataclasses.replace(row, retry_count=0))
        self._reply(ev.reply)

    def terminate_unknown(self, seq: int) -> bool:
        """Whether the state holds nothing of this task (queued or in flight)."""
        return seq not in self.rows and seq not in self.attempts

    # ---- resource files --------------------------------------------------------------

    def _on_FilesStaged(self, ev: FilesStaged) -> None:
        att = self.attempts.get(ev.seq)
        if att is None or att.staging.get(ev.run) != ev.token:
            return  # the attempt it was for is over
        del att.staging[ev.run]
        alloc = att.alloc
        if alloc is not None:
            if ev.run not in alloc.pending:
                return
            alloc.pending.discard(ev.run)
            if ev.error:
                self._fail_alloc(att, Exit(None, start_failed=ev.error,
                                           kind=FailureKind.PRE_PROCESSING_ERROR.value))
            elif not alloc.pending:
                self._start_coordination(att)
            return
        run, att.pending_run = att.pending_run, None
        node = self.node(*att.node_key)
        if ev.error:
            if node is not None:
                self._vacate(node, ev.run)
            self._finish(att, Exit(None, start_failed=ev.error,
                                   kind=FailureKind.PRE_PROCESSING_ERROR.value))
        elif run is not None:
            if att.prep_wait:  # its job's preparation task has not succeeded here yet
                att.pending_run = run
                return
            self._emit(run)

    # ---- multi-instance tasks --------------------------------------------------------

    def _allocate(self, pool: PoolState, row: TaskRow, d: Allocation) -> None:
        nodes = [pool.nodes[nid] for nid in d.node_ids]
        slots = [d.slots or n.slots for n in nodes]
        primary = nodes[0]
        tdir = posixpath.join(primary.root or "", "jobs", row.job_id, row.task_id)
        alloc = Alloc([n.key for n in nodes], [n.host for n in nodes], slots,
                      MIPhase.COORDINATION, set(), tdir)
        att = Attempt(row, primary.key, tdir, alloc=alloc)
        self.attempts[row.seq] = att
        job = self.jobs.get(row.job_id)
        for i, node in enumerate(nodes):
            self._occupy(node, RunId(row.seq, RunKind.INSTANCE, i), slots[i])
            if job is not None and job.release:  # (its preparation task: not for these)
                self.job_nodes.setdefault((row.job_id, node.pool_id, node.node_id),
                                          JobNode()).ran = True
        self._emit(MarkPreparing(row.seq, primary.node_id, tdir, self.now))
        if row.flags & (FLAG_COMMON_FILES | FLAG_RESOURCE_FILES | FLAG_APPS):
            alloc.phase = MIPhase.STAGING
            for i, node in enumerate(nodes):
                ntdir = posixpath.join(node.root or "", "jobs", row.job_id, row.task_id)
                groups = [("apps", node.root or "")] if row.flags & FLAG_APPS else []
                if row.flags & FLAG_COMMON_FILES:
                    groups.append(("common", posixpath.join(ntdir, "shared")))
                if i == 0 and row.flags & FLAG_RESOURCE_FILES:
                    groups.append(("resource", posixpath.join(ntdir, "wd")))
                if groups:
                    run = RunId(row.seq, RunKind.STAGING, i)
                    token = self._next_token()
                    att.staging[run] = token
                    alloc.pending.add(run)
                    self._emit(StageFiles(node.pool_id, node.node_id, row.seq, run, token,
                                          tuple(groups)))
        else:
            self._start_coordination(att)

    def _instance_run(self, att: Attempt, index: int, run: RunId, prefix: str = "") -> RunTask:
        row, alloc = att.row, att.alloc
        node = self.node(*alloc.nodes[index])
        tdir = posixpath.join(node.root or "", "jobs", row.job_id, row.task_id)
        env = self._task_env(row, node, tdir, row.attempt)
        env.update({
            E.HOST_LIST: ",".join(alloc.hosts),
            E.NODE_LIST: ",".join(k[1] for k in alloc.nodes),
            E.MASTER_NODE: alloc.hosts[0],
            E.HOSTFILE: posixpath.join(tdir, "hostfile"),
            E.TASK_SHARED_DIR: posixpath.join(tdir, "shared"),
            E.INSTANCE_INDEX: str(index),
            E.NUM_INSTANCES: str(len(alloc.nodes)),
        })
        # one line per host: a local pool's nodes are all 'localhost', and a host named
        # twice is refused (Open MPI) or misread (MPICH)
        merged: dict[str, int] = {}
        for h, s in zip(alloc.hosts, alloc.slots):
            merged[h] = merged.get(h, 0) + s
        files = [("hostfile", "".join(f"{h} slots={s}\n" for h, s in merged.items()))]
        if run.kind is RunKind.APPLICATION:
            # the allocation per instance, for hpcbatch-mpiexec's rank wrapper: each rank
            # gets its own node's ids and directories
            table = []
            for key, host, slots in zip(alloc.nodes, alloc.hosts, alloc.slots):
                n = self.node(*key)
                nroot = (n.root if n is not None else None) or ""
                table.append({"node": key[1], "host": host, "slots": slots, "root": nroot,
                              "dir": posixpath.join(nroot, "jobs", row.job_id, row.task_id)})
            files.append(("instances.json", json.dumps(table)))
        return RunTask(node.pool_id, node.node_id, row.seq, run, tdir, env, alloc.slots[index],
                       files=tuple(files), dirs=("shared",), log_prefix=prefix,
                       instance=True)

    def _start_coordination(self, att: Attempt) -> None:
        alloc = att.alloc
        if att.terminated:
            self._fail_alloc(att, Exit(None, start_failed="terminated"), "terminate")
            return
        alloc.phase = MIPhase.COORDINATION
        if att.row.flags & FLAG_COORDINATION:
            for i in range(len(alloc.nodes)):
                run = RunId(att.row.seq, RunKind.COORDINATION, i)
                alloc.pending.add(run)
                self._emit(self._instance_run(att, i, run, "coordination-"))
        else:
            self._start_application(att)

    def _start_application(self, att: Attempt) -> None:
        alloc = att.alloc
        alloc.phase = MIPhase.APPLICATION
        run = RunId(att.row.seq, RunKind.APPLICATION)
        alloc.pending.add(run)
        self._emit(self._instance_run(att, 0, run))

    def _instance_exited(self, att: Attempt, node: Node, ev: RunExited) -> None:
        alloc = att.alloc
        if ev.run not in alloc.pending:
            return
        alloc.pending.discard(ev.run)
        ex = _exit_of(ev)
        if ev.killed in AGENT_STOPPED:
            ex = Exit(None, node_lost=True)
        elif ev.run.kind is RunKind.COORDINATION and failure_of(ex) is not None \
                and not ev.killed:
            ex = dataclasses.replace(ex, detail=_coordination_failed(node.node_id, ev))
        if alloc.failed is not None or failure_of(ex) is not None:
            self._fail_alloc(att, alloc.failed or ex, ev.killed)
        elif alloc.phase is MIPhase.COORDINATION:
            if not alloc.pending:
                if att.terminated:
                    self._fail_alloc(att, Exit(None, start_failed="terminated"), "terminate")
                else:
                    self._start_application(att)
        else:  # the application ended: the task is done
            self._end_alloc(att, ex, killed=ev.killed, start=ev.start, end=ev.end,
                            usage=ev.usage)

    def _instance_lost(self, att: Attempt, node: Node, run: RunId) -> None:
        """The node of instance I was lost: the attempt fails, and it ends only once that
        node is fenced too (see _instance_gone), so no rank of it outlives the attempt."""
        alloc = att.alloc
        index = run.index
        gone = {r for r in alloc.pending if r.index == index}
        for r in gone:
            att.staging.pop(r, None)
        alloc.pending -= gone
        alloc.fencing.add(index)
        self._fail_alloc(att, Exit(None, node_lost=True))

    def _instance_gone(self, att: Attempt, run: RunId) -> None:
        """A lost node of the attempt is fenced: its instance is over."""
        alloc = att.alloc
        alloc.fencing.discard(run.index)
        if alloc.over():
            self._end_alloc(att, alloc.failed, killed=alloc.killed)

    def _fail_alloc(self, att: Attempt, ex: Exit, killed: str | None = None) -> None:
        """One instance failed or its node was lost: stop the others."""
        alloc = att.alloc
        staging = {r for r in alloc.pending if r.kind is RunKind.STAGING}
        alloc.pending -= staging  # a copy in flight is not waited for; its result is dropped
        for r in staging:
            att.staging.pop(r, None)
        if alloc.failed is None:
            alloc.failed = ex
            alloc.killed = killed
            alloc.phase = MIPhase.ENDING
            for r in sorted(alloc.pending, key=lambda r: (r.kind.value, r.index)):
                key = alloc.nodes[r.index]
                node = self.node(*key)
                if node is not None and node.connected and node.fence_until is None:
                    self._emit(KillRun(key[0], key[1], r, "instance_failed"))
        if alloc.over():
            self._end_alloc(att, alloc.failed, killed=alloc.killed)

    def _end_alloc(self, att: Attempt, ex: Exit, *, killed: str | None = None,
                   start: float | None = None, end: float | None = None,
                   usage: tuple = ()) -> None:
        alloc = att.alloc
        row = att.row
        # ranks started over ssh are not the agents' children: every agent of the
        # allocation reaps what carries this attempt's ids
        match = ((E.JOB_ID, row.job_id), (E.TASK_ID, row.task_id),
                 (E.TASK_ATTEMPT, str(row.attempt)))
        for key in alloc.nodes:
            node = self.node(*key)
            if node is None:
                continue
            for r in [r for r in node.runs if r.seq == row.seq]:
                self._vacate(node, r)
            if node.connected and node.fence_until is None:
                self._emit(Reap(key[0], key[1], match))
        att.alloc = None
        self._finish(att, ex, killed=killed, start=start, end=end, usage=usage)

    # ---- job preparation and release tasks ------------------------------------------

    def _job_num(self, job_id: str) -> int:
        num = self.job_nums.get(job_id)
        if num is None:
            num = self.job_nums[job_id] = len(self.job_nums) + 1
            while num in self.num_jobs:
                num += 1
                self.job_nums[job_id] = num
            self.num_jobs[num] = job_id
        return num

    def _job_task_env(self, job_id: str, node: Node, which: str, tdir: str,
                      attempt: int = 0) -> tuple[tuple[str, str], ...]:
        root = node.root or ""
        return tuple(sorted({
            E.POOL_ID: node.pool_id, E.NODE_ID: node.node_id, E.JOB_ID: job_id,
            E.TASK_ID: which, E.TASK_DIR: tdir, E.TASK_WORKING_DIR: tdir,
            E.NODE_SHARED_DIR: f"{root}/shared", E.TASK_ATTEMPT: str(attempt),
            E.JOB_PREP_DIR: f"{root}/jobs/{job_id}/{JOB_PREPARATION_ID}"}.items()))

    def _prep_first(self, row: TaskRow, node: Node) -> bool:
        """The job's task is placed on the node: its preparation task runs there first
        (if it has one, and has not run under this agent); True when the task waits."""
        job = self.jobs.get(row.job_id)
        if job is None or not (job.prep or job.release):
            return False
        key = (row.job_id, node.pool_id, node.node_id)
        jn = self.job_nodes.get(key)
        if jn is None:
            jn = self.job_nodes[key] = JobNode()
        jn.ran = True
        if not job.prep:
            return False
        stale = jn.gen != node.gen
        if jn.prep is None or (stale and (jn.prep == RUNNING or
                                          (jn.prep == SUCCEEDED and job.prep_rerun))):
            jn.prep_tries = 0
            self._start_prep(row.job_id, node, jn)
        if job.prep_wait and jn.prep != SUCCEEDED:
            jn.waiting.append(row.seq)
            return True
        return False

    def _start_prep(self, job_id: str, node: Node, jn: JobNode) -> None:
        jn.prep = RUNNING
        jn.gen = node.gen
        tdir = f"{node.root or ''}/jobs/{job_id}/{JOB_PREPARATION_ID}"
        self._emit(RunJobTask(node.pool_id, node.node_id, job_id,
                              RunId(self._job_num(job_id), RunKind.JOB_PREP), tdir,
                              self._job_task_env(job_id, node, JOB_PREPARATION_ID, tdir,
                                                 jn.prep_tries)))
        self._emit(PersistJobTask(job_id, node.pool_id, node.node_id, PREP, RUNNING, self.now,
                                  tdir, retry_count=jn.prep_tries))

    def _job_task_exited(self, node: Node, ev: RunExited) -> None:
        job_id = self.num_jobs.get(ev.run.seq)
        jn = self.job_nodes.get((job_id, node.pool_id, node.node_id)) if job_id else None
        if jn is None:
            return
        ok = ev.exit_code == 0 and not ev.timed_out and not ev.start_failed
        how = _job_task_failure(ev)
        root = node.root or ""
        if ev.run.kind is RunKind.JOB_RELEASE:
            if jn.release != RUNNING:
                return
            jn.release = SUCCEEDED if ok else FAILED
            self._emit(PersistJobTask(job_id, node.pool_id, node.node_id, RELEASE,
                                      jn.release, self.now,
                                      f"{root}/jobs/{job_id}/{JOB_RELEASE_ID}",
                                      ev.exit_code, None if ok else how))
            self._release_done(job_id, node.key)
            return
        if jn.prep != RUNNING or jn.gen != node.gen:
            return
        tdir = f"{root}/jobs/{job_id}/{JOB_PREPARATION_ID}"
        job = self.jobs.get(job_id)
        if ok:
            jn.prep = SUCCEEDED
            self._emit(PersistJobTask(job_id, node.pool_id, node.node_id, PREP, SUCCEEDED,
                                      self.now, tdir, ev.exit_code, None, jn.prep_tries))
            waiting, jn.waiting = jn.waiting, []
            for seq in waiting:
                att = self.attempts.get(seq)
                if att is not None and att.prep_wait and att.node_key == node.key:
                    att.prep_wait = False
                    if not att.staging and att.pending_run is not None:
                        run, att.pending_run = att.pending_run, None
                        self._emit(run)
            return
        if job is not None and jn.prep_tries < job.prep_retries and not ev.killed:
            jn.prep_tries += 1
            self._start_prep(job_id, node, jn)
            return
        jn.prep = FAILED
        self._emit(PersistJobTask(job_id, node.pool_id, node.node_id, PREP, FAILED, self.now,
                                  tdir, ev.exit_code, how, jn.prep_tries))
        if job is None or not job.prep_wait:
            return  # recorded; the job's tasks there run anyway
        why = f"job preparation task failed on node {node.node_id}: {how}"
        self._emit(Log(logging.WARNING, f"job {job_id}: {why}; the node skips the job"))
        self.excluded.setdefault(job_id, {})[node.node_id] = how
        waiting, jn.waiting = jn.waiting, []
        for seq in waiting:
            att = self.attempts.get(seq)
            if att is not None and att.prep_wait and att.node_key == node.key:
                self._requeue_unstarted(att, node, why)
        pool = self.pools.get(node.pool_id)
        if pool is not None:
            pool.dirty = True
            self._check_runnable(pool, job_id)

    def _requeue_unstarted(self, att: Attempt, node: Node, why: str) -> None:
        """An attempt that never started goes back to the queue (not a retry)."""
        row = att.row
        att.pending_run = None
        att.staging.clear()
        self._vacate(node, RunId(row.seq))
        del self.attempts[row.seq]
        self.started.pop(row.seq, None)
        att.task_state.check_move(TaskState.ACTIVE)
        self._emit(FinishAttempt(row.seq, "requeue", node.node_id, None, self.now, None, None,
                                 FailureKind.START_FAILED, why, (), row.retry_count))
        self._requeue_row(dataclasses.replace(row, attempt=row.attempt + 1))

    def _skipped_nodes(self, task: Runnable) -> Iterable[str] | None:
        """The nodes a queued task may not go to (its job's preparation failed there)."""
        row = self.rows.get(task.seq)
        return self.excluded.get(row.job_id) if row is not None else None

    def _check_runnable(self, pool: PoolState, job_id: str) -> None:
        """When the job's preparation task failed on every node of its pool, nothing can
        run it: its tasks fail to start, saying so (queued now, and as they are read)."""
        skipped = self.excluded.get(job_id, {})
        nodes = [n for n in pool.nodes if not pool.nodes[n].leaving]
        if not nodes or any(n not in skipped for n in nodes):
            return
        self.dead[job_id] = (f"the job preparation task failed on every node of pool "
                             f"{pool.info.pool_id}: " + "; ".join(
                                 f"{n}: {skipped[n]}" for n in sorted(nodes)))[:1000]
        for seq in [s for s, r in self.rows.items() if r.job_id == job_id]:
            pool.queue.discard({seq})
            self._doom(self.rows.pop(seq))

    def _doom(self, row: TaskRow) -> None:
        self._emit(CompleteUnstarted(row.seq, FailureKind.START_FAILED, self.dead[row.job_id],
                                     self.now))
        self._completed_job(row.job_id)

    def _start_release(self, job_id: str) -> bool:
        """The job is done (completed or terminated): its release task on every node that
        ran its tasks. True while release tasks run (the job completes after them)."""
        if job_id in self.releasing:
            return True
        job = self.jobs.get(job_id)
        mine = [(k[1], k[2], jn) for k, jn in self.job_nodes.items() if k[0] == job_id]
        for pool_id, node_id, jn in mine:  # a preparation task still running is stopped
            node = self.node(pool_id, node_id)
            if jn.prep == RUNNING and node is not None and node.connected and \
                    jn.gen == node.gen and node.fence_until is None:
                self._emit(KillRun(pool_id, node_id,
                                   RunId(self._job_num(job_id), RunKind.JOB_PREP), "terminate"))
        if job is None or not job.release:
            return False
        running: set[tuple[str, str]] = set()
        for pool_id, node_id, jn in mine:
            if not jn.ran or jn.release is not None:
                continue
            node = self.node(pool_id, node_id)
            tdir = f"{(node.root if node else None) or ''}/jobs/{job_id}/{JOB_RELEASE_ID}"
            if node is None or not node.connected or node.fence_until is not None or \
                    node.root is None or node.state not in usable:
                jn.release = SKIPPED
                self._emit(PersistJobTask(job_id, pool_id, node_id, RELEASE, SKIPPED, self.now,
                                          tdir, detail="the node was not reachable"))
                continue
            jn.release = RUNNING
            running.add(node.key)
            self._emit(RunJobTask(pool_id, node_id, job_id,
                                  RunId(self._job_num(job_id), RunKind.JOB_RELEASE), tdir,
                                  self._job_task_env(job_id, node, JOB_RELEASE_ID, tdir)))
            self._emit(PersistJobTask(job_id, pool_id, node_id, RELEASE, RUNNING, self.now,
                                      tdir))
        if running:
            self.releasing[job_id] = running
        return bool(running)

    def _release_done(self, job_id: str, key: tuple[str, str]) -> None:
        left = self.releasing.get(job_id)
        if left is None:
            return
        left.discard(key)
        if not left:
            del self.releasing[job_id]
            self.terminating.discard(job_id)
            self._emit(CompleteJobIfDone(job_id))

    def _job_tasks_lost(self, node: Node, reason: str) -> None:
        """The node was lost: a release task running there has failed."""
        for (job_id, pool_id, node_id), jn in list(self.job_nodes.items()):
            if (pool_id, node_id) == node.key and jn.release == RUNNING:
                jn.release = FAILED
                self._emit(PersistJobTask(job_id, pool_id, node_id, RELEASE, FAILED, self.now,
                                          detail=f"node lost: {reason}"))
                self._release_done(job_id, node.key)

    # ---- views for the shell and tests -----------------------------------------------

    def in_flight_on(self, pool_id: str, node_id: str) -> Iterable[RunId]:
        node = self.node(pool_id, node_id)
        return list(node.runs) if node else []


_WHEN_LEFT = {REQUEUE: "are requeued", TERMINATE: "are terminated",
              TASK_COMPLETION: "complete", RETAINED_DATA: "complete"}


def _moves(state: NodeState) -> frozenset:
    from hpcbatch.models import TRANSITIONS
    return TRANSITIONS[NodeState][state]
