"""Scheduling decisions, pure: no I/O, no clock, deterministic.

A :class:`Placer` holds one pool's nodes and is updated incrementally (a slot frees,
a node joins or leaves); :func:`schedule_from_queue` places tasks from a
:class:`RunQueue` onto it, at most ``budget`` per call. ``schedule`` is the one-shot
form over a snapshot of the nodes. ``decide_exit`` maps an attempt's end to success,
retry or failure. The coordinator performs what these return and persists it.

Placement rules: ``pack`` fills the busiest node that still fits, ``spread`` the
emptiest; ties go to the node added first. Real free slots come first; the agent's
prefetch queue slots are used only when no node has a real free slot. A
multi-instance task gets all its nodes or none; the first one in a round that cannot
start reserves the nodes closest to free and nothing else is placed on them in that
round. Tasks that do not fit are skipped so smaller ones backfill (bounded lookahead).

Cost: nodes sit in buckets by free slots (per bucket a heap of node order indices,
lazy deletion), so a placement costs O(free-slot levels + log nodes), never a scan of
the nodes; a multi-instance placement costs O(instances log nodes).
"""

from __future__ import annotations

import dataclasses
import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from hpcbatch.models import POLICIES, TaskResult

_heappush = heapq.heappush
_heappop = heapq.heappop


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
    slots: int  # per node; 0: each node whole


class _Levels:
    """Node indices bucketed by one integer each (a free-slot or used-slot count).

    ``level[i]`` is node i's level here, None when it is not in this view. The number
    of nodes per level is exact and ``keys`` lists the occupied levels in order; each
    level's indices sit in a heap with lazy deletion (an entry is live while the node
    is still at that level), compacted when stale entries outnumber live ones.
    """

    __slots__ = ("level", "counts", "keys", "heaps")

    def __init__(self) -> None:
        self.level: list[int | None] = []
        self.counts: dict[int, int] = {}
        self.keys: list[int] = []
        self.heaps: dict[int, list[int]] = {}

    def set(self, i: int, lv: int | None) -> None:
        cur = self.level[i]
        if cur == lv:
            return
        self.level[i] = lv
        counts = self.counts
        if cur is not None:
            c = counts[cur] - 1
            if c:
                counts[cur] = c
            else:  # the level empties: every entry left in its heap is stale
                del counts[cur], self.heaps[cur]
                keys = self.keys
                del keys[bisect_left(keys, cur)]
        if lv is not None:
            c = counts.get(lv)
            if c is None:
                counts[lv] = 1
                self.heaps[lv] = [i]
                insort(self.keys, lv)
            else:
                counts[lv] = c + 1
                h = self.heaps[lv]
                _heappush(h, i)
                if len(h) > 2 * c + 16:
                    level = self.level
                    h[:] = sorted({j for j in h if level[j] == lv})

    def _first(self, lv: int) -> int:
        h = self.heaps[lv]
        level = self.level
        while level[h[0]] != lv:
            _heappop(h)
        return h[0]

    def lowest(self, need: int) -> int | None:
        """The first-added node on the lowest level >= need."""
        keys = self.keys
        j = bisect_left(keys, need)
        return self._first(keys[j]) if j < len(keys) else None

    def highest(self, need: int) -> int | None:
        """The first-added node on the highest level, if that is >= need."""
        keys = self.keys
        return self._first(keys[-1]) if keys and keys[-1] >= need else None

    def count_from(self, need: int) -> int:
        keys = self.keys
        counts = self.counts
        return sum(counts[lv] for lv in keys[bisect_left(keys, need):])

    def take(self, k: int, need: int | None, ascending: bool,
             accept: Callable[[int], bool] | None = None) -> list[int]:
        """Remove up to k nodes from the heaps in (level, index) order, levels >= need.

        The caller must move or drop each returned node at once (their heap entries
        are gone). Nodes ``accept`` refuses are put back.
        """
        keys = self.keys
        lvls = keys[bisect_left(keys, need):] if need is not None else list(keys)
        if not ascending:
            lvls.reverse()
        level = self.level
        out: list[int] = []
        seen: set[int] = set()
        refused: list[tuple[int, int]] = []
        for lv in lvls:
            h = self.heaps[lv]
            while h and len(out) < k:
                i = _heappop(h)
                if level[i] != lv or i in seen:
                    continue
                seen.add(i)
                if accept is None or accept(i):
                    out.append(i)
                else:
                    refused.append((lv, i))
            if len(out) >= k:
                break
        for lv, i in refused:
            _heappush(self.heaps[lv], i)
        return out


def _pos(v: int | None) -> int:
    return v if v is not None and v > 0 else 0


class Placer:
    """One pool's nodes as the scheduler sees them, updated incrementally.

    Nodes are identified by id; their order (for ties) is the order they were first
    added, kept if a node is removed and added again. ``place`` books the slots it
    hands out; the caller reports every other change with ``set_node`` (or
    ``release``). A node given an allocation gets ``queue_slots`` 0 (its agent does
    not count the allocation's slots as busy and would start queued work at once);
    ``set_node`` sets it again once the allocation ends.

    Reservations last one round: ``begin_round`` clears the last one
    (``schedule_from_queue`` calls it).
    """

    def __init__(self, policy: str = "pack") -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy {policy!r} is unknown; use one of "
                             f"{', '.join(POLICIES)}")
        self.policy = policy
        self._spread = policy == "spread"
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._total: list[int] = []
        self._used: list[int] = []
        self._queue: list[int] = []
        self._alive: list[bool] = []
        self._nodes = 0  # alive ones
        self._counted: list[int | None] = []  # the total counted in _by_total, if any
        self._by_total: dict[int, int] = {}  # nodes in the views, by total slots
        self._members = 0  # nodes in the views (alive, not reserved)
        self._capacity = 0  # sum of max(free incl. queue, 0) over the views' nodes
        self._reserved: set[int] = set()
        self.reservation: int | None = None  # seq of the task holding this round's one
        self._free = _Levels()  # real free slots: total - used
        self._qfree = _Levels()  # with the prefetch queue: total + queue - used
        self._whole: _Levels | None = None  # idle nodes by real free; built at first wide
        self._busy: _Levels | None = None  # nodes by used slots; built at first wide task
        self._last: tuple[int, int, bool] | None = None  # (node, need, queued): see more()

    @classmethod
    def from_nodes(cls, nodes: Iterable[NodeSlots], policy: str = "pack") -> Placer:
        p = cls(policy)
        for n in nodes:
            p.set_node(n.node_id, n.total_slots, n.used_slots, n.queue_slots)
        return p

    # ---- the nodes --------------------------------------------------------

    def set_node(self, node_id: str, total_slots: int, used_slots: int,
                 queue_slots: int = 0) -> None:
        """Add a node or update what it has (O(log nodes))."""
        if total_slots < 0 or used_slots < 0 or queue_slots < 0:
            raise ValueError(f"node {node_id}: total_slots={total_slots}, used_slots="
                             f"{used_slots}, queue_slots={queue_slots}; each must be >= 0")
        i = self._index.get(node_id)
        if i is None:
            i = self._index[node_id] = len(self._ids)
            self._ids.append(node_id)
            self._total.append(total_slots)
            self._used.append(used_slots)
            self._queue.append(queue_slots)
            self._alive.append(True)
            self._nodes += 1
            self._counted.append(None)
            for view in self._views():
                view.level.append(None)
        else:
            self._total[i] = total_slots
            self._used[i] = used_slots
            self._queue[i] = queue_slots
            self._nodes += not self._alive[i]
            self._alive[i] = True
        self._refresh(i)

    def remove_node(self, node_id: str) -> None:
        """Forget a node (a no-op for one not here); its order is kept for a re-add."""
        i = self._index.get(node_id)
        if i is not None and self._alive[i]:
            self._alive[i] = False
            self._nodes -= 1
            self._reserved.discard(i)
            self._refresh(i)

    def release(self, node_id: str, slots: int) -> None:
        """``slots`` of the node freed (a task ended): set_node with used - slots."""
        i = self._known(node_id)
        if slots > self._used[i]:
            raise ValueError(f"node {node_id}: release of {slots} slots but only "
                             f"{self._used[i]} are in use; set_node it with the true count")
        self._used[i] -= slots
        self._refresh(i)

    def node(self, node_id: str) -> NodeSlots:
        i = self._known(node_id)
        return NodeSlots(node_id, self._total[i], self._used[i], self._queue[i])

    def __contains__(self, node_id: object) -> bool:
        i = self._index.get(node_id)  # type: ignore[arg-type]
        return i is not None and self._alive[i]

    def __len__(self) -> int:
        return self._nodes

    @property
    def has_capacity(self) -> bool:
        """Any unreserved node can take an ordinary task (its queue included)."""
        return self._capacity > 0

    @property
    def capacity(self) -> int:
        """Slots ordinary tasks could still take on unreserved nodes, queues included."""
        return self._capacity

    @property
    def reserved(self) -> tuple[str, ...]:
        """This round's reserved nodes, in node order."""
        return tuple(self._ids[i] for i in sorted(self._reserved))

    def begin_round(self) -> None:
        """Clear the last round's reservation."""
        self.reservation = None
        if self._reserved:
            held, self._reserved = self._reserved, set()
            for i in held:
                self._refresh(i)

    # ---- placing ----------------------------------------------------------

    def place(self, task: Runnable) -> Assignment | Allocation | None:
        """Place one task and book its slots, or return None (it does not fit now)."""
        self._last = None
        if task.instances > 0:
            return self._allocate(task)
        need = task.required_slots
        if self._spread:
            i = self._free.highest(need)
            if i is None:
                i = self._qfree.highest(need)
        else:
            i = self._free.lowest(need)
            queued = i is None
            if queued:
                i = self._qfree.lowest(need)
        if i is None:
            return None
        self._used[i] += need
        self._refresh(i)
        if not self._spread:
            self._last = (i, need, queued)
        return Assignment(task.seq, self._ids[i], need)

    def more(self) -> int:
        """After ``place`` gave an ordinary task a node under the pack policy: how many
        more tasks of the same size, one after another, ``place`` would give that same
        node (it stays the fullest that fits until it has no room: 0 under spread, or
        after anything else). Book them with ``book_more``."""
        if self._last is None:
            return 0
        i, need, queued = self._last
        if need <= 0:
            return 0
        free = self._total[i] - self._used[i]
        if queued:  # no node had real room: it takes queue slots while it has them
            return max(free + self._queue[i], 0) // need
        return max(free, 0) // need

    def book_more(self, k: int) -> None:
        """Book ``k`` more tasks on the last placement's node (k <= more())."""
        if self._last is None or k <= 0:
            return
        i, need, _ = self._last
        self._last = None
        self._used[i] += need * k
        self._refresh(i)

    def _allocate(self, task: Runnable) -> Allocation | None:
        if self._whole is None:
            self._build_wide_views()
        k, per = task.instances, task.slots_per_instance
        # nodes with `per` real free slots, or (per 0) idle ones, by the policy's order
        view = self._free if per > 0 else self._whole
        assert view is not None
        if view.count_from(per) >= k:
            chosen = sorted(view.take(k, per, ascending=not self._spread))
            total, used, queue = self._total, self._used, self._queue
            for i in chosen:
                used[i] += per or total[i]
                queue[i] = 0
                self._refresh(i)
            return Allocation(task.seq, tuple(self._ids[i] for i in chosen), per)
        if self.reservation is None:
            self._reserve(task)
        return None

    def _reserve(self, task: Runnable) -> None:
        """Hold the nodes that will be free soonest, so a stream of narrow tasks cannot
        starve this one: nothing new starts on them this round."""
        k, per = task.instances, task.slots_per_instance
        if per > 0:  # nodes big enough, most real free slots first
            if sum(c for t, c in self._by_total.items() if t >= per) < k:
                return
            total = self._total
            held = self._free.take(k, None, ascending=False, accept=lambda i: total[i] >= per)
        else:  # whole nodes: fewest slots in use first
            if self._members < k:
                return
            assert self._busy is not None
            held = self._busy.take(k, None, ascending=True)
        for i in held:
            self._reserved.add(i)
            self._refresh(i)
        self.reservation = task.seq

    # ---- bookkeeping ------------------------------------------------------

    def _known(self, node_id: str) -> int:
        i = self._index.get(node_id)
        if i is None or not self._alive[i]:
            raise KeyError(f"node {node_id!r} is not in this pool's placer; set_node it first")
        return i

    def _views(self) -> list[_Levels]:
        return [v for v in (self._free, self._qfree, self._whole, self._busy) if v is not None]

    def _build_wide_views(self) -> None:
        self._whole, self._busy = _Levels(), _Levels()
        n = len(self._ids)
        self._whole.level = [None] * n
        self._busy.level = [None] * n
        for i in range(n):
            self._refresh(i)

    def _refresh(self, i: int) -> None:
        """Put node i where its counts say in every view (out of them if gone/reserved)."""
        if self._alive[i] and i not in self._reserved:
            t = self._total[i]
            u = self._used[i]
            f: int | None = t - u
            q: int | None = f + self._queue[i]
            member: int | None = t
        else:
            t = u = 0
            f = q = member = None
        qv = self._qfree
        old = qv.level[i]
        if old != q:
            self._capacity += _pos(q) - _pos(old)
            qv.set(i, q)
        self._free.set(i, f)
        counted = self._counted[i]
        if counted != member:
            by_total = self._by_total
            if counted is not None:
                c = by_total[counted] - 1
                if c:
                    by_total[counted] = c
                else:
                    del by_total[counted]
                self._members -= 1
            if member is not None:
                by_total[member] = by_total.get(member, 0) + 1
                self._members += 1
            self._counted[i] = member
        if self._whole is not None:
            self._whole.set(i, f if f is not None and u <= 0 < t else None)
            self._busy.set(i, u if f is not None else None)  # type: ignore[union-attr]


def schedule(tasks: Iterable[Runnable], nodes: Sequence[NodeSlots],
             policy: str = "pack") -> list[Assignment | Allocation]:
    """Assign tasks to a snapshot of nodes, in priority-then-submission order.

    An ordinary task that does not fit now is skipped (later, smaller tasks may
    backfill); see the module docstring for the placement rules.
    """
    placer = Placer.from_nodes(nodes, policy)
    out: list[Assignment | Allocation] = []
    for task in sorted(tasks):
        if not placer.has_capacity:
            break
        placed = placer.place(task)
        if placed is not None:
            out.append(placed)
    return out


class RunQueue:
    """Runnable tasks of one pool in scheduling order: a heap with lazy deletion.

    A seq is queued at most once: pushing a queued seq again replaces it. ``discard``
    and ``in`` cost O(1); discarded entries leave the heap when they reach its top or
    when stale entries outnumber live ones (an O(n) rebuild, amortised).
    """

    def __init__(self, tasks: Iterable[Runnable] = ()) -> None:
        self._heap: list[Runnable] = []
        self._live: dict[int, Runnable] = {}
        self.extend(tasks)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, seq: object) -> bool:
        return seq in self._live

    def push(self, task: Runnable) -> None:
        replaced = self._live.get(task.seq)
        self._live[task.seq] = task
        _heappush(self._heap, task)
        if replaced is not None:
            self._compact()

    def extend(self, tasks: Iterable[Runnable]) -> None:
        tasks = list(tasks)
        live = self._live
        for t in tasks:
            live[t.seq] = t
        heap = self._heap
        if len(tasks) * 8 > len(heap):
            heap.extend(tasks)
            heapq.heapify(heap)
        else:
            for t in tasks:
                _heappush(heap, t)
        self._compact()

    def pop(self) -> Runnable:
        """Remove and return the first task (IndexError when empty)."""
        heap, live = self._heap, self._live
        while True:
            t = _heappop(heap)
            if live.get(t.seq) is t:
                del live[t.seq]
                return t

    def peek(self) -> Runnable | None:
        """The first task, left queued; None when empty."""
        heap, live = self._heap, self._live
        while heap and live.get(heap[0].seq) is not heap[0]:
            _heappop(heap)
        return heap[0] if heap else None

    def take(self, n: int) -> list[Runnable]:
        """Remove and return the first ``n`` tasks in order."""
        return [self.pop() for _ in range(min(n, len(self)))]

    def discard(self, seqs: Iterable[int] | int) -> None:
        """Drop these seqs if queued (others are ignored)."""
        live = self._live
        for s in (seqs,) if isinstance(seqs, int) else seqs:
            live.pop(s, None)
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 1024:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)


def schedule_from_queue(queue: RunQueue, placer: Placer | Sequence[NodeSlots],
                        policy: str | None = None, *, lookahead: int = 64,
                        budget: int | None = None,
                        excluded: Callable[[Runnable], Iterable[str] | None] | None = None
                        ) -> list[Assignment | Allocation]:
    """One round: place tasks from the queue in order while any unreserved slot is free.

    A task that cannot start yet is set aside and put back afterwards; at most
    ``lookahead`` are set aside, so smaller tasks behind it can backfill without
    scanning the whole queue. At most ``budget`` tasks are placed (None: no limit),
    so a round's work is bounded by ``budget + lookahead`` placements tried.
    ``placer`` may also be a snapshot of NodeSlots (with ``policy``), the older form.
    ``excluded(task)``: nodes that task may not go to (None: any), taken out of the
    placer for its placement only.
    """
    if isinstance(placer, Placer):
        if policy is not None:
            raise TypeError("schedule_from_queue: the policy is the Placer's; pass "
                            "Placer(policy) and no policy argument")
    else:
        placer = Placer.from_nodes(placer, policy or "pack")
    placer.begin_round()
    limit = float("inf") if budget is None else budget
    out: list[Assignment | Allocation] = []
    skipped: list[Runnable] = []
    place, pop, peek, more = placer.place, queue.pop, queue.peek, placer.more
    while queue and len(skipped) < lookahead and len(out) < limit and placer.has_capacity:
        task = pop()
        skip = excluded(task) if excluded is not None else None
        placed = place(task) if not skip else _place_without(placer, task, skip)
        if placed is None:
            skipped.append(task)
            continue
        out.append(placed)
        k = more() if not skip else 0
        if not k:
            continue
        # pack: the tasks of the same size behind it go where `place` would put each
        # of them, the same node, booked at once (what a drain onto empty nodes does)
        taken = 0
        need, node_id = placed.slots, placed.node_id
        while taken < k and len(out) < limit:
            nxt = peek()
            if nxt is None or nxt.instances or nxt.required_slots != need or (
                    excluded is not None and excluded(nxt)):
                break
            pop()
            out.append(Assignment(nxt.seq, node_id, need))
            taken += 1
        placer.book_more(taken)
    for task in skipped:
        queue.push(task)
    return out


def _place_without(placer: Placer, task: Runnable, skip: Iterable[str]
                   ) -> Assignment | Allocation | None:
    """Place the task on any node but those in ``skip`` (put back afterwards)."""
    saved = [placer.node(n) for n in skip if n in placer]
    for ns in saved:
        placer.remove_node(ns.node_id)
    try:
        return placer.place(task)
    finally:
        for ns in saved:
            placer.set_node(ns.node_id, ns.total_slots, ns.used_slots, ns.queue_slots)


@dataclasses.dataclass(frozen=True)
class Exit:
    """How an attempt ended, as the agent reported it."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    start_failed: str | None = None
    node_lost: bool = False
    detail: str | None = None  # what failed where (a coordination command: node, stderr)
    kind: str | None = None  # a FailureKind decided outside the process (files: pre/post)


@dataclasses.dataclass(frozen=True)
class Outcome:
    retry: bool
    result: TaskResult | None  # set when the task is completed
    failure: str | None  # 'exit_code', 'signal', 'timeout', 'start_failed', 'node_lost'


def failure_of(ex: Exit) -> str | None:
    if ex.kind:
        return ex.kind
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
