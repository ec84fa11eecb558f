"""The autoscale loop: pools' metrics sampled into bounded rings, formulas evaluated
every interval, the pool resized when the formula's target differs.

:class:`Autoscaler` runs on the coordinator's loop thread (``Coordinator._run`` calls
``tick`` each turn), so it reads the state machine without locks and stops with the
coordinator, embedded or under ``hpcbatch serve``. Sampling is cheap: the state's
open-task counts, its attempts in flight, its window of queued tasks and its nodes
(no SQL). Settings are re-read from the store (``autoscale`` table) once a sample
period, so a formula enabled by another process (a CLI with no service) is picked up.
Every evaluation and every resize is recorded (``pool_events``).

The language itself is :mod:`hpcbatch.autoscale`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

from hpcbatch import autoscale as A
from hpcbatch.errors import HpcBatchError, ValidationError

log = logging.getLogger("hpcbatch.autoscaling")

DEFAULT_INTERVAL_S = 30.0
MIN_INTERVAL_S = 1.0  # (tests; Azure Batch's least is 5 minutes)
MAX_INTERVAL_S = 7 * 86400.0
HISTORY_S = 3600.0  # samples kept per pool: this much time ..
MAX_SAMPLES = 3600  # .. at most this many


def sample_period(interval_s: float) -> float:
    """How often a pool with this evaluation interval is sampled: six samples an
    interval, between 0.25 s and 5 s."""
    return min(5.0, max(0.25, interval_s / 6))


def parse_interval(text: str | float | int | None) -> float:
    """'30s', '5m', '1h', 30 -> seconds; ValidationError naming --interval otherwise."""
    if text is None:
        return DEFAULT_INTERVAL_S
    if isinstance(text, bool):
        raise ValidationError("interval", f"{text!r} is not a time")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = str(text).strip()
        unit = 1.0
        for suffix, size in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0),
                             ("d", 86400.0)):
            if s.endswith(suffix) and s[:-len(suffix)].replace(".", "", 1).isdigit():
                s, unit = s[:-len(suffix)], size
                break
        try:
            seconds = float(s) * unit
        except ValueError:
            raise ValidationError("interval", f"{text!r} is not a time such as 30s, 5m or "
                                  "1h") from None
    if not math.isfinite(seconds) or not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        raise ValidationError("interval", f"{text!r} is not between {MIN_INTERVAL_S:g}s and "
                              f"{MAX_INTERVAL_S / 86400:g}d")
    return seconds


@dataclasses.dataclass(frozen=True, slots=True)
class Metrics:
    """One sample of a pool."""

    active: int = 0
    running: int = 0
    active_slots: int = 0
    running_slots: int = 0
    nodes: int = 0
    idle: int = 0
    since_last_task_s: float = 0.0

    def values(self) -> dict[str, float]:
        return {"PendingTasks": self.active + self.running, "ActiveTasks": self.active,
                "RunningTasks": self.running,
                "PendingTaskSlots": self.active_slots + self.running_slots,
                "ActiveTaskSlots": self.active_slots, "RunningTaskSlots": self.running_slots,
                "CurrentNodes": self.nodes, "IdleNodes": self.idle,
                "TimeSinceLastTask": self.since_last_task_s}


def task_slots(row: Any, per_node: int) -> int:
    """What a task needs, in slots: a multi-instance one instances x slots per instance
    (0: a whole node), an ordinary one its required slots."""
    if row.instances:
        return row.instances * (row.slots_per_instance or per_node)
    return row.required_slots


def samples_of(points: list[tuple[float, Metrics]], period_s: float) -> dict[str, A.Samples]:
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in A.METRICS}
    for t, m in points:
        for name, v in m.values().items():
            out[name].append((t, float(v)))
    return {name: A.Samples(name, tuple(pts), period_s) for name, pts in out.items()}


@dataclasses.dataclass(slots=True)
class _Pool:
    formula_text: str
    formula: A.Formula | None
    interval_s: float
    enabled_at: float
    period_s: float
    next_eval: float = 0.0


class Autoscaler:
    """Samples and evaluates, on the coordinator's loop thread; ``history`` may be read
    from any thread."""

    def __init__(self, store: Any, started_at: float):
        self.store = store
        self.started_at = started_at
        self.pools: dict[str, _Pool] = {}
        self.rings: dict[str, collections.deque] = {}
        self.last_task: dict[str, float] = {}
        self.last_sample: dict[str, float] = {}
        self._next_reload = 0.0
        self._lock = threading.Lock()

    # ---- sampling ---------------------------------------------------------------------

    def measure(self, state: Any, pool_id: str, now: float) -> Metrics | None:
        """The pool's metrics now, from the coordinator's state (None: not loaded)."""
        pool = state.pools.get(pool_id)
        if pool is None:
            return None
        per_node = pool.info.slots_per_node
        running = running_slots = 0
        for att in state.attempts.values():
            if att.row.pool_id == pool_id:
                running += 1
                running_slots += task_slots(att.row, per_node)
        open_ = sum(n for job, n in state.open.items()
                    if (info := state.jobs.get(job)) is not None and info.pool_id == pool_id)
        active = max(0, open_ - running)
        queued = [r for r in state.rows.values() if r.pool_id == pool_id]
        active_slots = sum(task_slots(r, per_node) for r in queued)
        if active > len(queued):  # beyond the window: as the window's average
            avg = active_slots / len(queued) if queued else 1.0
            active_slots += math.ceil((active - len(queued)) * avg)
        nodes = [n for n in pool.nodes.values() if not n.leaving]
        idle = sum(1 for n in nodes if n.state.value == "idle" and not n.runs)
        if running:
            self.last_task[pool_id] = now
        since = now - self.last_task.get(pool_id, self.started_at)
        return Metrics(active, running, active_slots, running_slots, len(nodes), idle,
                       max(0.0, since))

    def history(self, pool_id: str) -> tuple[list[tuple[float, Metrics]], float]:
        with self._lock:
            ring = self.rings.get(pool_id)
            points = list(ring) if ring else []
        entry = self.pools.get(pool_id)
        return points, entry.period_s if entry else 5.0

    # ---- the loop -------------------------------------------------------------------

    def _reload(self, now: float) -> None:
        rows = {r["pool_id"]: r for r in self.store.list_autoscale()}
        for pool_id in list(self.pools):
            if pool_id not in rows:
                del self.pools[pool_id]
        for pool_id, r in rows.items():
            have = self.pools.get(pool_id)
            if have is not None and have.enabled_at == r["enabled_at"]:
                continue
            try:
                formula = A.parse(r["formula"])
            except A.FormulaError:
                formula = None  # recorded at its evaluation
            self.pools[pool_id] = _Pool(r["formula"], formula, r["interval_s"],
                                        r["enabled_at"], sample_period(r["interval_s"]),
                                        next_eval=now)  # evaluated at once, as Batch does

    def tick(self, state: Any, now: float) -> list[tuple[str, int, str, dict[str, Any]]]:
        """Sample what is due, evaluate what is due; returns the resizes to make (pool,
        target, deallocation, the evaluation's record)."""
        if now >= self._next_reload:
            self._next_reload = now + 1.0
            try:
                self._reload(now)
            except Exception:  # noqa: BLE001 - the next reload tries again
                log.exception("reading the autoscale settings")
        out = []
        for pool_id, entry in list(self.pools.items()):
            if now - self.last_sample.get(pool_id, -1e18) >= entry.period_s * 0.999:
                m = self.measure(state, pool_id, now)
                if m is not None:
                    self.last_sample[pool_id] = now
                    with self._lock:
                        ring = self.rings.get(pool_id)
                        size = max(2, min(MAX_SAMPLES, int(HISTORY_S / entry.period_s)))
                        if ring is None or ring.maxlen != size:
                            ring = self.rings[pool_id] = collections.deque(ring or (),
                                                                           maxlen=size)
                        ring.append((now, m))
            if now >= entry.next_eval and pool_id in self.rings:
                entry.next_eval = now + entry.interval_s
                decision = self._evaluate(pool_id, entry, now)
                if decision is not None:
                    out.append(decision)
        for pool_id in [p for p in self.rings if p not in self.pools]:
            with self._lock:
                self.rings.pop(pool_id, None)
            self.last_sample.pop(pool_id, None)
        return out

    def _evaluate(self, pool_id: str, entry: _Pool, now: float
                  ) -> tuple[str, int, str, dict[str, Any]] | None:
        try:
            spec = self.store.get_pool(pool_id)
        except HpcBatchError:
            return None
        points, period = self.history(pool_id)
        try:
            formula = entry.formula or A.parse(entry.formula_text)
            ev = A.evaluate(formula, samples_of(points, period), now=now,
                            target_nodes=spec.target_nodes)
        except A.FormulaError as exc:
            self._record(pool_id, "evaluation", None, str(exc), now)
            return None
        result = ev.to_dict()
        target = ev.target_nodes
        from hpcbatch.providers import provider_for
        try:
            provider = provider_for(spec, self.store.path.parent)
            capacity = provider.capacity()
            most_nodes = getattr(type(provider), "MAX_NODES", None)
        except HpcBatchError:
            capacity = most_nodes = None
        if capacity is not None and target > capacity:
            result["capped"] = f"{target} is more than the pool's {capacity} host(s)"
            target = capacity
        elif most_nodes is not None and target > most_nodes:
            result["capped"] = f"{target} is more than the {most_nodes} nodes a " \
                               f"{spec.provider} pool can have"
            target = most_nodes
        result["target_nodes"] = target
        self._record(pool_id, "evaluation", result, None, now)
        if target == spec.target_nodes:
            return None
        return (pool_id, target, ev.deallocation,
                {"from": spec.target_nodes, "to": target, "deallocation": ev.deallocation,
                 "by": "autoscale"})

    def _record(self, pool_id: str, kind: str, result: Mapping[str, Any] | None,
                error: str | None, now: float) -> None:
        try:
            self.store.record_pool_event(pool_id, kind, result, error, at=now)
        except Exception:  # noqa: BLE001 - a record is not worth stopping the loop for
            log.exception("recording an autoscale %s of pool %s", kind, pool_id)

    def record(self, pool_id: str, kind: str, result: Mapping[str, Any] | None,
               error: str | None, now: float) -> None:
        self._record(pool_id, kind, result, error, now)


def evaluate_dry(formula_text: str, points: list[tuple[float, Metrics]], period_s: float,
                 now: float, target_nodes: int) -> dict[str, Any]:
    """A dry run: {'target_nodes', 'deallocation', 'variables'} or FormulaError."""
    return A.evaluate(A.parse(formula_text), samples_of(points, period_s), now=now,
                      target_nodes=target_nodes).to_dict()
