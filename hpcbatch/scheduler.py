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
    """A task waiting for slots; tuples order by job priority (high first), then submission."""

    neg_priority: int
    seq: int
    required_slots: int

    @classmethod
    def of(cls, seq: int, priority: int = 0, required_slots: int = 1) -> Runnable:
        return cls(-priority, seq, required_slots)

    @property
    def priority(self) -> int:
        return -self.neg_priority


@dataclasses.dataclass
class NodeSlots:
    node_id: str
    free_slots: int
    total_slots: int


@dataclasses.dataclass(frozen=True)
class Assignment:
    seq: int
    node_id: str
    slots: int


def _place(task: Runnable, free: dict[str, int], order: list[str], policy: str) -> str | None:
    """The node a task goes to under ``policy``, or None when none has room."""
    best = None
    for nid in order:
        f = free[nid]
        if f < task.required_slots:
            continue
        if best is None or (f > free[best] if policy == "spread" else f < free[best]):
            best = nid
    return best


def schedule(tasks: Iterable[Runnable], nodes: Sequence[NodeSlots],
             policy: str = "pack") -> list[Assignment]:
    """Assign tasks to nodes with enough free slots.

    Tasks are considered in priority-then-submission order. A task that does not
    fit now is skipped (later, smaller tasks may backfill). ``pack`` fills the
    busiest node that still fits (fewest free slots), ``spread`` the emptiest;
    ties go to the node listed first.
    """
    free = {n.node_id: n.free_slots for n in nodes}
    order = [n.node_id for n in nodes]
    out: list[Assignment] = []
    for task in sorted(tasks):
        if not any(free.values()):
            break
        node = _place(task, free, order, policy)
        if node is not None:
            free[node] -= task.required_slots
            out.append(Assignment(task.seq, node, task.required_slots))
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
                        lookahead: int = 64) -> list[Assignment]:
    """``schedule`` over a queue: pops tasks in order while any slot is free.

    A task that does not fit yet is set aside and put back afterwards; at most
    ``lookahead`` are set aside, so smaller tasks behind it can backfill without
    scanning the whole queue.
    """
    free = {n.node_id: n.free_slots for n in nodes}
    order = [n.node_id for n in nodes]
    out: list[Assignment] = []
    skipped: list[Runnable] = []
    left = sum(free.values())
    while left > 0 and len(queue) and len(skipped) < lookahead:
        task = queue.pop()
        node = _place(task, free, order, policy)
        if node is None:
            skipped.append(task)
            continue
        free[node] -= task.required_slots
        left -= task.required_slots
        out.append(Assignment(task.seq, node, task.required_slots))
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
