"""Scheduling decisions as pure functions: no I/O, no clocks, deterministic.

``schedule`` maps (runnable tasks, free slots per node, pool policy) to
assignments; ``decide_exit`` maps an attempt's end to success, retry or failure.
The coordinator performs what these return and persists it.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from hpcbatch.models import TaskResult


class Runnable(NamedTuple):
    """A task waiting for slots; tuples order by job priority (high first), then submission.

    ``instances >= 1`` makes it a multi-instance task (0: an ordinary one): it
    needs ``instances`` distinct nodes at once, each with ``slots_per_instance``
    free slots (0 means the whole node).
    """

    neg_priority: int
    seq: int
    required_slots: int
    instances: int = 0
    slots_per_instance: int = 0

    @classmethod
    def of(cls, seq: int, priority: int = 0, required_slots: int = 1, instances: int = 0,
           slots_per_instance: int = 0) -> Runnable:
        return cls(-priority, seq, required_slots, instances, slots_per_instance)

    @property
    def priority(self) -> int:
        return -self.neg_priority

    @property
    def wide(self) -> bool:
        return self.instances > 0


@dataclasses.dataclass
class NodeSlots:
    """A node as the scheduler sees it.

    ``used_slots`` counts the slots of tasks running or queued on the node.
    Ordinary tasks may use up to ``total_slots + queue_slots`` (the agent queues
    the excess, see the coordinator's prefetch); an allocation needs real free
    slots, ``total_slots - used_slots``.
    """

    node_id: str
    total_slots: int
    used_slots: int = 0
    queue_slots: int = 0


@dataclasses.dataclass(frozen=True)
class Assignment:
    seq: int
    node_id: str
    slots: int


@dataclasses.dataclass(frozen=True)
class Allocation:
    """All-or-nothing: a multi-instance task gets these nodes; the first is the primary."""

    seq: int
    node_ids: tuple[str, ...]
    slots: int  # per node


class _Round:
    """One scheduling round over a snapshot of the nodes. Pure; no I/O."""

    def __init__(self, nodes: Sequence[NodeSlots], policy: str):
        self.policy = policy
        self.order = [n.node_id for n in nodes]
        self.total = {n.node_id: n.total_slots for n in nodes}
        self.narrow = {n.node_id: n.total_slots + n.queue_slots - n.used_slots for n in nodes}
        self.wide = {n.node_id: n.total_slots - n.used_slots for n in nodes}
        self.reserved: set[str] = set()
        self.reservation: int | None = None  # seq of the task holding it

    def capacity_left(self) -> int:
        return sum(max(v, 0) for v in self.narrow.values())

    def _better(self, f: int, g: int) -> bool:
        return f > g if self.policy == "spread" else f < g

    def place(self, task: Runnable) -> Assignment | Allocation | None:
        if task.wide:
            return self._allocate(task)
        # real free slots first; the agent queues (prefetch) only when no node has one
        best = self._best(self.wide, task.required_slots)
        if best is None:
            best = self._best(self.narrow, task.required_slots)
        if best is None:
            return None
        self._take(best, task.required_slots)
        return Assignment(task.seq, best, task.required_slots)

    def _best(self, free: dict[str, int], need: int) -> str | None:
        best = None
        for nid in self.order:
            f = free[nid]
            if nid in self.reserved or f < need:
                continue
            if best is None or self._better(f, free[best]):
                best = nid
        return best

    def _take(self, nid: str, slots: int) -> None:
        self.narrow[nid] -= slots
        self.wide[nid] -= slots

    def _allocate(self, task: Runnable) -> Allocation | None:
        def need(nid: str) -> int:
            return task.slots_per_instance or self.total[nid]

        fits = [nid for nid in self.order
                if nid not in self.reserved and self.wide[nid] >= need(nid) > 0]
        if len(fits) >= task.instances:
            chosen = sorted(fits, key=lambda nid: (
                -self.wide[nid] if self.policy == "spread" else self.wide[nid],
                self.order.index(nid)))[:task.instances]
            chosen.sort(key=self.order.index)
            for nid in chosen:
                self._take(nid, need(nid))
                self.narrow[nid] = min(self.narrow[nid], self.wide[nid])  # no queue when held
            return Allocation(task.seq, tuple(chosen), task.slots_per_instance or 0)
        if self.reservation is None:
            # hold the nodes that will be free soonest (fewest slots in use), so a stream
            # of narrow tasks cannot starve this task: nothing new starts on them
            able = [nid for nid in self.order if nid not in self.reserved
                    and self.total[nid] >= need(nid)]
            if len(able) >= task.instances:
                able.sort(key=lambda nid: (need(nid) - self.wide[nid], self.order.index(nid)))
                self.reserved.update(able[:task.instances])
                self.reservation = task.seq
        return None


def schedule(tasks: Iterable[Runnable], nodes: Sequence[NodeSlots],
             policy: str = "pack") -> list[Assignment | Allocation]:
    """Assign tasks to nodes.

    Tasks are considered in priority-then-submission order. An ordinary task
    that does not fit now is skipped (later, smaller tasks may backfill).
    ``pack`` fills the busiest node that still fits, ``spread`` the emptiest;
    ties go to the node listed first. A multi-instance task gets all of its
    nodes or none; the first one that cannot start reserves the nodes closest to
    free, and nothing else is placed on them until it starts.
    """
    rnd = _Round(nodes, policy)
    out: list[Assignment | Allocation] = []
    for task in sorted(tasks):
        if rnd.capacity_left() <= 0:
            break
        placed = rnd.place(task)
        if placed is not None:
            out.append(placed)
    return out


class RunQueue:
    """Runnable tasks of one pool, kept in scheduling order (a heap)."""

    def __init__(self) -> None:
        self._heap: list[Runnable] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, task: Runnable) -> None:
        heapq.heappush(self._heap, task)

    def extend(self, tasks: Iterable[Runnable]) -> None:
        self._heap.extend(tasks)
        heapq.heapify(self._heap)

    def pop(self) -> Runnable:
        return heapq.heappop(self._heap)

    def take(self, n: int) -> list[Runnable]:
        """Remove and return the first ``n`` tasks in order."""
        return [heapq.heappop(self._heap) for _ in range(min(n, len(self._heap)))]

    def discard(self, seqs: set[int]) -> None:
        self._heap = [t for t in self._heap if t.seq not in seqs]
        heapq.heapify(self._heap)


def schedule_from_queue(queue: RunQueue, nodes: Sequence[NodeSlots], policy: str,
                        lookahead: int = 64) -> list[Assignment | Allocation]:
    """``schedule`` over a queue: pops tasks in order while any slot is free.

    A task that cannot start yet is set aside and put back afterwards; at most
    ``lookahead`` are set aside, so smaller tasks behind it can backfill without
    scanning the whole queue.
    """
    rnd = _Round(nodes, policy)
    out: list[Assignment | Allocation] = []
    skipped: list[Runnable] = []
    while len(queue) and len(skipped) < lookahead and rnd.capacity_left() > 0:
        task = queue.pop()
        placed = rnd.place(task)
        if placed is None:
            skipped.append(task)
        else:
            out.append(placed)
    for task in skipped:
        queue.push(task)
    return out


@dataclasses.dataclass(frozen=True)
class Exit:
    """How an attempt ended, as the agent reported it."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    start_failed: str | None = None
    node_lost: bool = False


@dataclasses.dataclass(frozen=True)
class Outcome:
    retry: bool
    result: TaskResult | None  # set when the task is completed
    failure: str | None  # 'exit_code', 'signal', 'timeout', 'start_failed', 'node_lost'


def failure_of(ex: Exit) -> str | None:
    if ex.start_failed:
        return "start_failed"
    if ex.node_lost:
        return "node_lost"
    if ex.timed_out:
        return "timeout"
    if ex.signal is not None:
        return "signal"
    if ex.exit_code != 0:
        return "exit_code"
    return None


def decide_exit(ex: Exit, retry_count: int, max_task_retry_count: int) -> Outcome:
    """Success, or retry while retries are left (-1 = unlimited), else failure."""
    failure = failure_of(ex)
    if failure is None:
        return Outcome(retry=False, result=TaskResult.SUCCESS, failure=None)
    if max_task_retry_count == -1 or retry_count < max_task_retry_count:
        return Outcome(retry=True, result=None, failure=failure)
    return Outcome(retry=False, result=TaskResult.FAILURE, failure=failure)
