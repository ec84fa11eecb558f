"""The coordinator: the thin I/O shell around :class:`hpcbatch.state.CoordinatorState`.

One loop thread turns what arrives (agent messages, finished file copies and agent
starts, API commands, the clock) into state events, and performs what the state
answers: persistence and queries inside ONE store transaction per turn, then, after
the commit, sends (each channel has its own writer, so a stopped agent stalls nobody),
file copies, agent starts/stops and fencing on worker threads. Nothing it acts on is
held only in memory: killed at any point and restarted, it finds the store consistent.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from hpcbatch import agentlink as link
from hpcbatch import env as E
from hpcbatch import state as S
from hpcbatch.apps import AppRef, AppStore, node_env
from hpcbatch.autoscaling import Autoscaler, evaluate_dry
from hpcbatch.errors import Conflict, HpcBatchError, NotFound, ValidationError
from hpcbatch.home import HomeLock, default_home
from hpcbatch.launch import protocol as P
from hpcbatch.models import JobState, NodeState, PoolSpec, RunKind, TaskState
from hpcbatch.providers import NodeDesc, provider_for
from hpcbatch.store import Store
from hpcbatch.timings import Timings

log = logging.getLogger("hpcbatch.coordinator")
DEFAULT_PREFETCH = S.DEFAULT_PREFETCH
TICK_S = 0.25
MAX_ITEMS_PER_TURN = 5000
APP_CACHE_S = 1.0  # how long a resolved application package reference is reused
# the writes _write makes between a turn's finished attempts and its placements
_BETWEEN = frozenset({S.CompleteUnstarted, S.TerminateJobTasks, S.CompleteJobIfDone,
                      S.ReactivateTask})


KEEPER_BACKLOG = 10_000  # local tasks' logs waiting to be kept, at most


class Coordinator:
    """The process-wide owner of state for one home directory."""

    def __init__(self, home: Path | str | None = None, *, timings: Timings | None = None,
                 prefetch: int = DEFAULT_PREFETCH):
        self.home = Path(home) if home else default_home()
        self.timings = timings or Timings()
        self.lock = HomeLock(self.home)
        try:
            self.store = Store(self.home / "state.db")
        except BaseException:
            self.lock.release()
            raise
        self.state = S.CoordinatorState(self.timings, prefetch=prefetch,
                                        protocol=P.PROTOCOL_VERSION)
        self.inbox: queue.Queue = queue.Queue()
        self.providers: dict[str, Any] = {}
        self.descs: dict[tuple[str, str], NodeDesc] = {}
        self.channels: dict[tuple[str, str], tuple[int, Any, str]] = {}  # gen, chan, token
        # each node's latest agent (gen, token), kept once its channel is dropped: a lost
        # node's fence (in the same turn as the StopAgent that drops it) needs the token
        self.tokens: dict[tuple[str, str], tuple[int, str]] = {}
        # nodes the pool's current provider no longer lists (removed, or a local pool
        # renumbered by a resize) keep the provider they were started with until they go
        self.retired: dict[tuple[str, str], Any] = {}
        self.jobs: set[str] = set()
        self.replies: dict[int, concurrent.futures.Future] = {}
        self._reply_n = 0
        self._after_commit: list[concurrent.futures.Future] = []
        self._io_running: set[concurrent.futures.Future] = set()
        self.io = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="hpcbatch-io")
        self.progress = threading.Condition()  # notified when a job drains
        self.error: BaseException | None = None
        self.requeued_at_start = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_tick = 0.0
        self._last_poll = 0.0
        self._deferred: list[Any] = []  # a query left to the next turn (see _turn)
        self.autoscaler = Autoscaler(self.store, time.time())
        self._growing: dict[str, int] = {}  # pool -> nodes asked of its provider, not granted
        from hpcbatch.collect import Collector, log_cap_from_env
        from hpcbatch.staging import Stager, cache_bytes_from_env
        self.stager = Stager(self.home, cache_bytes_from_env())  # resource files
        # output files and kept logs: what each started task needs collected at its exit
        self.collector = Collector(self.home, log_cap_from_env())
        self._collect: dict[tuple[str, str, Any], tuple[Any, ...]] = {}
        self._keeper = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="hpcbatch-logs")  # local nodes' logs, off the exit path
        self._keeping = 0  # tasks queued on the keeper
        self._keeping_lock = threading.Lock()
        self.apps = AppStore(self.home)
        # application package archives already on each node (node -> node archive paths),
        # with a lock per node so two tasks' copies do not both send one archive
        self._node_apps: dict[tuple[str, str], set[str]] = {}
        self._node_apps_lock: dict[tuple[str, str], threading.Lock] = {}
        self._pool_apps: dict[str, tuple[AppRef, ...]] = {}  # each pool's own references
        self._app_cache: dict[tuple, tuple[float, list[Any]]] = {}  # see _resolve_apps

    # ---- life cycle and commands (any thread) ------------------------------------

    def start(self) -> None:
        try:
            with self.store.transaction():
                # nodes whose earlier agents may still run what is requeued now
                suspects: dict[str, set[str]] = {}
                for a in self.store.agents():
                    suspects.setdefault(a["pool_id"], set()).add(a["node_id"])
                self.requeued_at_start = self.store.requeue_in_flight()
                for n in self.store.list_nodes():
                    if n["state"] != NodeState.OFFLINE.value:
                        self.store.upsert_node(n["pool_id"], n["id"], NodeState.OFFLINE.value,
                                               n["slots"], None, "coordinator restarted")
                self._finish_terminating()
                started = S.Started(time.time(), tuple(self.store.open_counts().items()),
                                    self.store.last_task_seq())
                events: list[Any] = [started, self._jobs_known(self.store.list_jobs())]
                added = [self._pool_added(p) for p in self.store.list_pools()]
                self._drop_stale_nodes(added)
                events += added
                if self.requeued_at_start:  # a cut-off agent runs on until its lease ends
                    until = started.t + self.timings.fence_wait_s
                    events += [S.PoolHeld(started.t, pool_id, until, tuple(sorted(nodes)))
                               for pool_id, nodes in sorted(suspects.items())]
                self._turn(events)
        except BaseException:
            self._release()
            raise
        if self.requeued_at_start:
            log.info("requeued %d tasks that were in flight", self.requeued_at_start)
        self._thread = threading.Thread(target=self._run, name="hpcbatch-coordinator",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the agents (their running tasks stay recorded in flight: the next
        coordinator requeues them) and release the home."""
        if self._thread is None:
            self._release()
            return
        self._stop.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the coordinator loop did not stop within %g s", timeout_s)
        self._thread = None

    def notify(self) -> None:
        """New work was stored (by this or another process)."""
        self.inbox.put(("work",))

    def _command(self, *item: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None or not self._thread.is_alive():
            fut.set_exception(HpcBatchError("the coordinator is not running"))
            return fut
        self.inbox.put((*item, fut))
        return fut

    def terminate_task(self, job_id: str, task_id: str) -> concurrent.futures.Future:
        return self._command("terminate", job_id, task_id)

    def add_pool(self, spec: PoolSpec) -> concurrent.futures.Future:
        return self._command("pool", spec)

    def remove_pool(self, pool_id: str) -> concurrent.futures.Future:
        return self._command("droppool", pool_id)

    def forget_job(self, job_id: str) -> concurrent.futures.Future:
        return self._command("forgetjob", job_id)

    # the service operations (resolved once the state has taken them; errors raised)

    def resize_pool(self, pool_id: str, target_nodes: int,
                    deallocation: str = S.REQUEUE) -> concurrent.futures.Future:
        return self._command("resize", pool_id, target_nodes, deallocation)

    def remove_node(self, pool_id: str, node_id: str,
                    running: str = S.REQUEUE) -> concurrent.futures.Future:
        return self._command("removenode", pool_id, node_id, running)

    def set_node_scheduling(self, pool_id: str, node_id: str, enabled: bool,
                            running: str = S.TASK_COMPLETION) -> concurrent.futures.Future:
        return self._command("scheduling", pool_id, node_id, enabled, running)

    def terminate_job(self, job_id: str) -> concurrent.futures.Future:
        return self._command("terminatejob", job_id)

    def reactivate_task(self, job_id: str, task_id: str) -> concurrent.futures.Future:
        return self._command("reactivate", job_id, task_id)

    def evaluate_autoscale(self, pool_id: str, formula: str) -> concurrent.futures.Future:
        """A dry run of a formula over the pool's samples and its metrics now: the
        evaluation as a dict (None: the pool is not running here)."""
        return self._command("asdry", pool_id, formula)

    # ---- the loop --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                items = self._drain()
                now = time.time()
                events = [ev for item in items for ev in self._events(item, now)]
                if now - self._last_poll >= self.timings.work_poll_s:
                    self._last_poll = now
                    events.append(S.WorkNoticed(now))
                if now - self._last_tick >= TICK_S:
                    self._last_tick = now
                    events.append(S.Tick(now))
                    events += self._autoscale(now)
                if events or self._deferred:
                    self._turn(events)
        except BaseException as exc:  # surface to waiters instead of dying silently
            log.exception("coordinator loop failed")
            self.error = exc
        finally:
            self._release()

    def _drain(self) -> list[tuple]:
        try:
            items = [self.inbox.get(timeout=TICK_S)]
        except queue.Empty:
            return []
        while len(items) < MAX_ITEMS_PER_TURN:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return items

    def _turn(self, events: list[Any]) -> None:
        """One turn: the state decides; persistence and queries run in one transaction
        (opened only when something is written), everything else after the commit."""
        after: list[Any] = []
        writes: list[Any] = []
        new_work_read = False
        with contextlib.ExitStack() as txn:
            work = self.state.handle(*events) + self._deferred
            self._deferred = []
            while work:
                ins = work.pop(0)
                if isinstance(ins, S.PERSIST):
                    writes.append(ins)
                    continue
                if isinstance(ins, S.LoadNewWork) and new_work_read:
                    # one slice of new work a turn: a 1M-task submit is read over many
                    # short turns (pings and heartbeats in between), not in one that
                    # outlasts the agents' lease with the write lock held
                    self._deferred.append(ins)
                    continue
                if writes and isinstance(ins, S.LoadWindow | S.LoadNewWork):
                    self._write(txn, writes)  # a query sees what this turn wrote
                    writes = []
                if isinstance(ins, S.LoadWindow):
                    work += self._answer_window(ins)
                elif isinstance(ins, S.LoadNewWork):
                    new_work_read = True
                    work += self._answer_new_work(ins)
                else:
                    after.append(ins)
            if writes:
                self._write(txn, writes)
        self._perform(after)
        if self._deferred:
            self.inbox.put(("wake",))  # the next turn at once

    # ---- events from what arrived --------------------------------------------------

    def _events(self, item: tuple, now: float) -> list[Any]:
        kind = item[0]
        if kind == "msg":
            evs = link.events_of(*item[1:])
            return self._hold_exits(evs) if self._collect else evs
        if kind == "collected":
            return [item[1]]
        if kind == "up":
            _, pool_id, node_id, gen, chan, token = item
            node = self.state.node(pool_id, node_id)
            if node is None or node.gen != gen or self._stop.is_set():
                chan.close()
                return []
            self.channels[(pool_id, node_id)] = (gen, chan, token)
            self.tokens[(pool_id, node_id)] = (gen, token)
            self._node_apps.pop((pool_id, node_id), None)  # a new agent: look again
            with self.store.transaction():
                self.store.record_agent(pool_id, node_id, token, getattr(chan, "pid", None),
                                        self.descs[(pool_id, node_id)].host,
                                        self._provider_of(pool_id, node_id).node_root(node_id))
            chan.listen(lambda msg, k=(pool_id, node_id, gen), c=chan: self.inbox.put(
                ("msg", *k, msg, c.last_words() if msg is None else "", time.time())))
            return [S.AgentUp(now, pool_id, node_id, gen)]
        if kind == "startfail":
            return [S.AgentStartFailed(now, *item[1:])]
        if kind == "fenced":
            return [S.NodeFenced(now, *item[1:])]
        if kind == "reaped":
            return [S.NodeReaped(now, *item[1:])]
        if kind == "staged":
            return [S.FilesStaged(now, *item[1:])]
        if kind == "appsstaged":
            return [S.NodeAppsStaged(now, *item[1:])]
        if kind == "work":
            return [S.WorkNoticed(now)]
        if kind == "asdry":
            _, pool_id, formula, fut = item
            m = self.autoscaler.measure(self.state, pool_id, now)
            if m is None:
                fut.set_result(None)
                return []
            points, period = self.autoscaler.history(pool_id)
            try:
                fut.set_result(evaluate_dry(formula, [*points, (now, m)], period, now,
                                            self.store.get_pool(pool_id).target_nodes))
            except Exception as exc:  # noqa: BLE001 - the caller hears it
                fut.set_exception(exc)
            return []
        if kind == "grown":
            _, pool_id, granted, _error, asked = item
            self._growing[pool_id] = max(0, self._growing.get(pool_id, 0) - asked)
            if pool_id not in self.state.pools or self._stop.is_set():
                provider = self.providers.get(pool_id)
                if granted and provider is not None:  # nobody to run them: back at once
                    self._io(provider.shrink, [d.node_id for d in granted])
                return []
            for d in granted:
                self.descs[(pool_id, d.node_id)] = d
            return [S.NodeGranted(now, pool_id, S.NodeInfo(d.node_id, d.host, d.slots))
                    for d in granted]
        if kind == "pool":
            spec, fut = item[1:]
            try:
                ev = self._pool_added(spec)
            except Exception as exc:  # noqa: BLE001 - the caller hears it
                fut.set_exception(exc)
                return []
            fut.set_result(None)
            return [ev]
        if kind == "droppool":
            pool_id, fut = item[1:]
            self.providers.pop(pool_id, None)
            for key in [k for k in self.retired if k[0] == pool_id]:
                del self.retired[key]
            return [S.PoolRemoved(now, pool_id), *self._reply_later(fut)]
        if kind == "forgetjob":
            job_id, fut = item[1:]
            self.jobs.discard(job_id)
            fut.set_result(None)
            return [S.JobForgotten(now, job_id)]
        ops = self._ops_events(kind, item, now)
        if ops is not None:
            return ops
        if kind == "terminate":
            job_id, task_id, fut = item[1:]
            try:
                row = self.store.get_task(job_id, task_id)
            except HpcBatchError as exc:
                fut.set_exception(exc)
                return []
            if row["state"] == "completed":
                fut.set_result(None)
                return []
            reply = self._reply(fut)
            return [S.TerminateAsked(now, row["seq"], job_id, reply)]
        return []  # "wake"

    def _ops_events(self, kind: str, item: tuple, now: float) -> list[Any] | None:
        """State events for the service operations' commands (None: not one of them).
        What can be checked against the store is checked here, so the caller hears a
        NotFound, Conflict or ValidationError as such."""
        if kind not in ("resize", "removenode", "scheduling", "terminatejob", "reactivate"):
            return None
        args, fut = item[1:-1], item[-1]
        try:
            if kind == "resize":
                return self._resize_events(now, *args, fut)
            if kind == "removenode":
                pool_id, node_id, running = args
                node = self._state_node(pool_id, node_id)
                if node.leaving:
                    fut.set_result(None)
                    return []
                self._change_pool(spec_without_node(self.store.get_pool(pool_id), self.home,
                                                    node_id, self._state_ids(pool_id)))
                return [S.NodeLeaving(now, pool_id, node_id, running, self._reply(fut))]
            if kind == "scheduling":
                pool_id, node_id, enabled, running = args
                self._state_node(pool_id, node_id)
                return [S.NodeSchedulingSet(now, pool_id, node_id, enabled, running,
                                            self._reply(fut))]
            if kind == "terminatejob":
                (job_id,) = args
                job = self.store.get_job(job_id)
                if job["state"] == JobState.COMPLETED.value:
                    raise Conflict(f"job {job_id!r} is already completed")
                if job["state"] == JobState.TERMINATING.value:
                    fut.set_result(None)
                    return []
                return [S.JobTerminateAsked(now, job_id, self._reply(fut))]
            job_id, task_id = args
            row = self.store.get_task(job_id, task_id)
            check_reactivatable(row, self.store.get_job(job_id))
            attempts = self.store.attempts(job_id, task_id)
            trow = link.task_row_of(row, max((a["attempt"] + 1 for a in attempts), default=0))
            return [*self._unknown([trow]), S.ReactivateAsked(now, trow, self._reply(fut))]
        except Exception as exc:  # noqa: BLE001 - the caller hears it
            if not fut.done():
                fut.set_exception(exc)
            return []

    def _state_node(self, pool_id: str, node_id: str) -> Any:
        self.store.get_pool(pool_id)
        node = self.state.node(pool_id, node_id)
        if node is None:
            known = ", ".join(self._state_ids(pool_id)) or "none"
            raise NotFound(f"node {node_id!r} is not in pool {pool_id!r} (its nodes: {known})")
        return node

    def _state_ids(self, pool_id: str) -> list[str]:
        pool = self.state.pools.get(pool_id)
        return [] if pool is None else [n for n, nd in pool.nodes.items() if not nd.leaving]

    def _resize_events(self, now: float, pool_id: str, target: int, running: str,
                       fut: concurrent.futures.Future) -> list[Any]:
        new = resized_spec(self.store.get_pool(pool_id), self.home, target)
        provider = self._change_pool(new)
        pool = self.state.pools.get(pool_id)
        if pool is None:  # not started here (yet): the stored size is what it starts with
            fut.set_result(None)
            return []
        keep = None
        if provider.elastic:  # more nodes are asked of the provider, off the loop
            infos: tuple[S.NodeInfo, ...] = ()
            # nodes asked of the provider and not granted yet count (a second resize
            # before the first one's nodes come asks only for the rest)
            have = sum(1 for n in pool.nodes.values() if not n.leaving) + \
                self._growing.get(pool_id, 0)
            if target > have:
                self._growing[pool_id] = self._growing.get(pool_id, 0) + target - have
                self._io(self._grow, provider, pool_id, target - have)
        else:
            # the provider's nodes for a size with room for every id the pool holds now,
            # so an id still held by a leaving node is not needed
            wide = dataclasses.replace(new, target_nodes=min(100_000,
                                                             target + len(pool.nodes)))
            nodes = provider_for(wide, self.home).fixed_nodes()
            for d in nodes:
                self.descs.setdefault((pool_id, d.node_id), d)
            infos = tuple(S.NodeInfo(d.node_id, d.host, d.slots) for d in nodes)
            if provider.ordered:  # its nodes at a size are the first of its list
                keep = tuple(d.node_id for d in provider.fixed_nodes())
        return [S.PoolResized(now, pool_id, target, infos, self._reply(fut), running, keep)]

    def _grow(self, provider: Any, pool_id: str, n: int) -> None:
        """On a worker thread: ask an elastic provider for n more nodes; each granted
        one joins the pool (NodeGranted)."""
        try:
            granted = provider.grow(n)
        except Exception as exc:  # noqa: BLE001 - said in the log and the pool's record
            log.warning("pool %s: %d more node(s) were asked for and not granted: %s",
                        pool_id, n, exc)
            self.inbox.put(("grown", pool_id, (), str(exc), n))
            return
        self.inbox.put(("grown", pool_id, tuple(granted), None, n))

    def _autoscale(self, now: float) -> list[Any]:
        """Sample the pools, evaluate their formulas when due, resize as they say."""
        try:
            decisions = self.autoscaler.tick(self.state, now)
        except Exception:  # noqa: BLE001 - autoscaling never stops the loop
            log.exception("autoscale")
            return []
        events: list[Any] = []
        for pool_id, target, running, record in decisions:
            try:
                events += self._resize_events(now, pool_id, target, running,
                                              concurrent.futures.Future())
            except HpcBatchError as exc:
                self.autoscaler.record(pool_id, "resize", record, str(exc), now)
                continue
            self.autoscaler.record(pool_id, "resize", record, None, now)
        return events

    def _change_pool(self, spec: PoolSpec) -> Any:
        """Store the pool's new spec and use a provider made from it; nodes it no longer
        lists keep the one they were started with."""
        with self.store.transaction():
            self.store.set_pool_spec(spec)
        old = self.providers.get(spec.id)
        provider = provider_for(spec, self.home)
        listed = {d.node_id for d in provider.fixed_nodes()}
        pool = self.state.pools.get(spec.id)
        if old is not None and pool is not None:
            for node_id in pool.nodes:
                if node_id not in listed:
                    self.retired.setdefault((spec.id, node_id), old)
        self.providers[spec.id] = provider
        return provider

    def _provider_of(self, pool_id: str, node_id: str) -> Any:
        return self.retired.get((pool_id, node_id)) or self.providers.get(pool_id)

    def _finish_terminating(self) -> None:
        """At start: a job left terminating by an earlier coordinator completes (its tasks
        in flight then were requeued just now: they are completed as terminated)."""
        released = self.store.end_running_job_tasks(time.time())
        for job in self.store.list_jobs():
            if job["state"] == JobState.TERMINATING.value:
                self.store.terminate_job_tasks(job["id"], time.time(), in_flight=True)
                self.store.set_job_state(job["id"], JobState.COMPLETED)
            elif released and job["state"] == JobState.ACTIVE.value and \
                    job["spec"].release_task is not None and \
                    job["spec"].on_all_tasks_complete == "terminate_job" and \
                    self.store.unfinished(job["id"]) == 0 and \
                    self.store.task_counts(job["id"])["total"] > 0:
                # its tasks were done and its release tasks ran when the coordinator
                # stopped: it completes (they were stopped, as recorded)
                self.store.set_job_state(job["id"], JobState.COMPLETED)

    def _drop_stale_nodes(self, added: list[S.PoolAdded]) -> None:
        """At start: node records of a fixed pool that its provider no longer lists (it
        was resized, or a node removed) are forgotten."""
        for ev in added:
            listed = {n.node_id for n in ev.nodes}
            provider = self.providers.get(ev.pool.pool_id)
            if listed or provider is not None:  # (an elastic pool's slots: all listed)
                for n in self.store.list_nodes(ev.pool.pool_id):
                    if n["id"] not in listed:
                        self.store.delete_node(ev.pool.pool_id, n["id"])

    def _reply(self, fut: concurrent.futures.Future) -> int:
        self._reply_n += 1
        self.replies[self._reply_n] = fut
        return self._reply_n

    def _reply_later(self, fut: concurrent.futures.Future) -> list[Any]:
        """Resolve the command after this turn's commit."""
        self._after_commit.append(fut)
        return []

    # ---- pools, jobs -----------------------------------------------------------------

    def _pool_added(self, spec: PoolSpec) -> S.PoolAdded:
        provider = self.providers.get(spec.id) or provider_for(spec, self.home)
        self.providers[spec.id] = provider
        nodes = provider.grow(spec.target_nodes) if provider.elastic else \
            provider.fixed_nodes()
        for d in nodes:
            self.descs[(spec.id, d.node_id)] = d
        self._pool_apps[spec.id] = spec.application_package_references
        info = S.PoolInfo(spec.id, spec.task_slots_per_node, spec.scheduling_policy,
                          spec.start_task, bool(spec.application_package_references))
        disabled = {n["id"] for n in self.store.list_nodes(spec.id)
                    if json.loads(n["info"] or "{}").get("scheduling") == "disabled"}
        return S.PoolAdded(time.time(), info, tuple(
            S.NodeInfo(d.node_id, d.host, d.slots, d.node_id in disabled) for d in nodes))

    def _jobs_known(self, jobs: list[dict]) -> S.JobsKnown:
        self.jobs.update(j["id"] for j in jobs)
        return S.JobsKnown(time.time(), tuple(map(_job_info, jobs)))

    def _answer_window(self, ins: S.LoadWindow) -> list[Any]:
        rows = self.store.runnable_window(ins.pool_id, ins.after, ins.limit)
        ev = S.WindowLoaded(time.time(), ins.pool_id, tuple(map(link.task_row, rows)),
                            exhausted=len(rows) < ins.limit)
        return self.state.handle(*self._unknown(rows), ev)

    def _answer_new_work(self, ins: S.LoadNewWork) -> list[Any]:
        rows = self.store.new_tasks(ins.after_seq, ins.limit)
        ev = S.WorkAdded(time.time(), tuple(map(link.task_row, rows)), more=len(rows) >= ins.limit)
        return self.state.handle(*self._unknown(rows), ev)

    def _unknown(self, rows: list) -> list[Any]:
        """Jobs and pools of these rows that this coordinator has not heard of yet."""
        events: list[Any] = []
        jobs = {r.job_id for r in rows} - self.jobs
        if jobs:
            events.append(self._jobs_known([self.store.get_job(j) for j in sorted(jobs)]))
        for pool_id in sorted({r.pool_id for r in rows} - set(self.providers)):
            events.append(self._pool_added(self.store.get_pool(pool_id)))
        return events

    # ---- performing instructions -----------------------------------------------------

    def _write(self, txn: contextlib.ExitStack, writes: list[Any]) -> None:
        """The turn's persistence instructions, one statement per kind where it can:
        attempts that ended, terminated jobs' tasks and job completion, reactivations,
        then tasks placed (a retried or reactivated task is placed again in the same
        turn), then node records."""
        st = self.store
        if not st.db.in_transaction:
            txn.enter_context(st.transaction(while_waiting=self._keep_leases,
                                             wait_slice_s=self.timings.heartbeat_s / 2))
        by: dict[type, list[Any]] = {}
        for w in writes:
            by.setdefault(type(w), []).append(w)
        running = [(w.seq, w.t) for w in by.get(S.MarkRunning, ())]
        finished = [dict(seq=w.seq, outcome=w.outcome, node_id=w.node_id,
                         started_at=w.started_at, ended_at=w.ended_at, exit_code=w.exit_code,
                         signal=w.signal, failure_kind=w.failure_kind,
                         failure_detail=w.failure_detail, usage=dict(w.usage),
                         retry_count=w.retry_count) for w in by.get(S.FinishAttempt, ())]
        preparing = [(w.seq, w.node_id, w.task_dir, w.t) for w in by.get(S.MarkPreparing, ())]
        if not by.keys() & _BETWEEN:  # the usual turn: one write of the three
            st.write_turn(running, finished, preparing)
            preparing = []
        elif running or finished:
            st.write_turn(running, finished)
        for w in by.get(S.CompleteUnstarted, ()):
            st.complete_unstarted(w.seq, w.failure_kind, w.failure_detail, w.t)
        for w in by.get(S.TerminateJobTasks, ()):
            st.terminate_job_tasks(w.job_id, w.t)
        # before a reactivation of the same turn (which reopens a completed job), after
        # every write that ends a task
        for w in by.get(S.CompleteJobIfDone, ()):
            if st.get_job(w.job_id)["state"] != JobState.COMPLETED.value and \
                    st.unfinished(w.job_id) == 0:
                st.set_job_state(w.job_id, JobState.COMPLETED)
        for w in by.get(S.ReactivateTask, ()):
            st.reactivate_task(w.seq)
        if preparing:
            st.mark_preparing(preparing)
        for w in writes:  # in their order: a node dropped can come back in the same turn
            if isinstance(w, S.PersistNode):
                st.upsert_node(w.pool_id, w.node_id, w.state.value, w.slots,
                               dict(w.info) or None, w.reason)
            elif isinstance(w, S.DropNode):
                st.delete_node(w.pool_id, w.node_id)
        for w in by.get(S.PersistJobTask, ()):
            st.upsert_job_task(w.job_id, w.pool_id, w.node_id, w.kind, w.state, w.t,
                               w.task_dir, w.exit_code, w.detail, w.retry_count)

    def _keep_leases(self) -> None:
        """While the turn waits for the store's write lock (another process's long
        transaction): a Ping to each live agent, so their leases do not run out and stop
        every task. Not to a node being fenced: its lease must run out."""
        now = time.time()
        for key, (gen, chan, _) in list(self.channels.items()):
            node = self.state.node(*key)
            if node is not None and node.gen == gen and node.connected and \
                    node.fence_until is None:
                chan.send_many([P.Ping(now)])

    def _perform(self, after: list[Any]) -> None:
        sends: dict[tuple[str, str], list[Any]] = {}
        runs = [i for i in after if isinstance(i, S.RunTask | S.StageFiles)]
        specs = self.store.dispatch_specs(sorted({i.seq for i in runs})) if runs else {}
        drained = False
        for ins in after:
            key = (ins.pool_id, ins.node_id) if hasattr(ins, "node_id") else None
            token = self.channels[key][2] if key in self.channels else None
            if isinstance(ins, S.RunTask):
                if ins.run.kind in (RunKind.TASK, RunKind.APPLICATION):
                    spec = specs[ins.seq]
                    self._collect[(ins.pool_id, ins.node_id, ins.run)] = (
                        spec.output_files, ins.task_dir,
                        spec.environment.get(E.TASK_WORKING_DIR) or
                        ins.env.get(E.TASK_WORKING_DIR) or f"{ins.task_dir}/wd",
                        ins.env.get(E.JOB_ID), ins.env.get(E.TASK_ID),
                        int(ins.env.get(E.TASK_ATTEMPT) or 0))
                inter = None
                if ins.instance:
                    inter = self.providers[ins.pool_id].inter_node_env(
                        ins.node_id, self.state.node(*key).root or "")
                msg = link.run_message(ins, specs[ins.seq], token, inter)
                refs = specs[ins.seq].application_package_references
                if refs or self._pool_refs(ins.pool_id):
                    msg = self._with_apps(msg, key, refs)
                sends.setdefault(key, []).append(msg)
            elif isinstance(ins, S.RunStartTask):
                msg = link.message_of(ins, token)
                if self._pool_refs(ins.pool_id):
                    msg = self._with_apps(msg, key, ())
                sends.setdefault(key, []).append(msg)
            elif isinstance(ins, S.StageNodeApps):
                self._stage_node_apps(ins)
            elif isinstance(ins, S.RunJobTask):
                msg = self._job_task_run(ins, token)
                if msg is not None:
                    sends.setdefault(key, []).append(msg)
            elif isinstance(ins, S.KillRun | S.Reap | S.Ping):
                sends.setdefault(key, []).append(link.message_of(ins, token))
            elif isinstance(ins, S.StageFiles):
                self._stage(ins, specs[ins.seq])
            elif isinstance(ins, S.StartAgent):
                self._io(self._start_agent, ins)
            elif isinstance(ins, S.StopAgent):
                entry = self._stop_agent(key, ins.gen, sends.pop(key, []), abort=ins.lost)
                if self.state.node(*key) is None:  # it left the pool (an elastic
                    self._forget_node(key, entry)  # one's node is given back there)
            elif isinstance(ins, S.RemoveNodeData):
                provider = self._provider_of(*key)
                if provider is not None:
                    self._io(self._remove_node_data, provider, ins.node_id)
            elif isinstance(ins, S.FenceNode):
                gen, token = self.tokens.get(key, (None, ""))
                self._io(self._fence, ins, token if gen == ins.gen else "")
            elif isinstance(ins, S.Reply):
                fut = self.replies.pop(ins.reply, None)
                if fut is not None and not fut.done():
                    if ins.error:
                        fut.set_exception(HpcBatchError(ins.error))
                    else:
                        fut.set_result(None)
            elif isinstance(ins, S.JobDrained):
                drained = True
            elif isinstance(ins, S.Log):
                log.log(ins.level, ins.message)
        for key, msgs in sends.items():
            entry = self.channels.get(key)
            if entry is not None:
                entry[1].send_many(msgs)
        done, self._after_commit = self._after_commit, []
        for fut in done:
            if not fut.done():
                fut.set_result(None)
        if drained:
            with self.progress:
                self.progress.notify_all()

    def _hold_exits(self, evs: list[Any]) -> list[Any]:
        """A task's exit waits (off the loop) until its output files are uploaded and
        its logs kept, unless it has no outputs and runs on a local node (its logs are
        then kept beside, the exit goes on at once)."""
        out = []
        for ev in evs:
            entry = None
            if isinstance(ev, S.RunExited):
                entry = self._collect.pop((ev.pool_id, ev.node_id, ev.run), None)
            chan_entry = self.channels.get((ev.pool_id, ev.node_id)) if entry else None
            if entry is None or chan_entry is None or chan_entry[0] != ev.gen or \
                    not entry[3]:
                out.append(ev)
                continue
            outputs, tdir, wd, job_id, task_id, attempt = entry
            chan = chan_entry[1]
            ran = ev.start_failed is None
            success = ran and ev.exit_code == 0 and ev.signal is None and \
                not ev.timed_out and not ev.killed
            kw = dict(job_id=job_id, task_id=task_id, attempt=attempt, task_dir=tdir, wd=wd,
                      ran=ran, success=success, node_id=ev.node_id)
            if not outputs and getattr(chan, "files_here", False):
                # (its files stay on this machine: under a flood of short tasks the
                # keeper may fall behind, then what it has not reached is left there)
                with self._keeping_lock:
                    room = self._keeping < KEEPER_BACKLOG
                    self._keeping += room
                if room:
                    self._keeper.submit(self._keep_quietly, chan, kw)
                out.append(ev)
                continue

            def work(ev=ev, chan=chan, outputs=outputs, kw=kw) -> None:
                try:
                    error = self.collector.collect(chan, outputs=outputs, **kw)
                except Exception as exc:  # noqa: BLE001 - the node's files unreachable
                    error = f"output files of node {ev.node_id} unreachable: {exc}" \
                        if outputs and kw["ran"] else None
                    if not outputs:
                        log.warning("task %s/%s: its logs were not kept: %s",
                                    kw["job_id"], kw["task_id"], exc)
                self.inbox.put(("collected", dataclasses.replace(ev, upload_error=error)
                                if error else ev))
            self._io(work)
        return out

    def _keep_quietly(self, chan: Any, kw: dict[str, Any]) -> None:
        try:
            self.collector.collect(chan, outputs=(), **kw)
        except Exception as exc:  # noqa: BLE001 - the logs stay on the node
            log.warning("task %s/%s: its logs were not kept: %s", kw["job_id"],
                        kw["task_id"], exc)
        finally:
            with self._keeping_lock:
                self._keeping -= 1

    def _stage(self, ins: S.StageFiles, spec: Any) -> None:
        entry = self.channels.get((ins.pool_id, ins.node_id))
        chan = entry[1] if entry else None
        groups = [((spec.resource_files if which == "resource" else
                    spec.common_resource_files), dest) for which, dest in ins.groups
                  if which != "apps"]
        apps = [dest for which, dest in ins.groups if which == "apps"]
        refs = spec.application_package_references
        if apps and chan is not None and not any(files for files, _ in groups):
            # only packages, all on the node already (the usual case after the first
            # task there): answered at once, without a worker thread's round trip
            have = self._node_apps.get((ins.pool_id, ins.node_id), ())
            try:
                there = all(a.node_archive(root) in have for root in apps
                            for a in self._resolve_apps(ins.pool_id, refs))
            except HpcBatchError:
                there = False
            if there:
                self.inbox.put(("staged", ins.seq, ins.run, ins.token, None))
                return

        def work() -> None:
            from hpcbatch.staging import StagingError
            error = None
            try:
                if chan is None:
                    raise OSError("its agent is gone")
                for root in apps:
                    self._put_apps((ins.pool_id, ins.node_id), chan, root,
                                   self._resolve_apps(ins.pool_id, refs))
                for files, dest in groups:
                    if files:
                        self.stager.stage(chan, files, dest, f"node {ins.node_id}")
            except StagingError as exc:  # the pre_processing_error's detail
                error = f"resource files for node {ins.node_id}: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported as the task's failure
                error = f"copying resource files to node {ins.node_id} failed: {exc}"
            self.inbox.put(("staged", ins.seq, ins.run, ins.token, error))
        self._io(work)

    # ---- application packages (hpcbatch.apps) ---------------------------------------

    def _pool_refs(self, pool_id: str) -> tuple[AppRef, ...]:
        return self._pool_apps.get(pool_id, ())

    def _resolve_apps(self, pool_id: str, refs: Any) -> list[Any]:
        """The pool's packages and then the task's (which win for the same name),
        resolved to stored versions; NotFound when one is gone. Kept for a second (a
        pool's every task would otherwise read the package files again)."""
        key = (pool_id, tuple((r["application_id"], r.get("version")) if isinstance(r, dict)
                              else r for r in refs or ()))
        now = time.monotonic()
        hit = self._app_cache.get(key)
        if hit is not None and now - hit[0] < APP_CACHE_S:
            return hit[1]
        apps = self.apps.resolve_all([*self._pool_refs(pool_id),
                                      *AppRef.check_list("apps", refs)])
        if len(self._app_cache) > 1000:
            self._app_cache.clear()
        self._app_cache[key] = (now, apps)
        return apps

    def _with_apps(self, msg: P.Run, key: tuple[str, str], refs: Any) -> P.Run:
        """The Run with its packages to unpack, their variables and PATH (bin/)."""
        root = (self.state.node(*key).root if self.state.node(*key) else None) or ""
        try:
            apps = self._resolve_apps(key[0], refs)
        except HpcBatchError as exc:  # deleted since it was staged: the run says so
            log.warning("node %s: %s", key[1], exc)
            return msg
        return dataclasses.replace(msg, env={**node_env(apps, root), **msg.env},
                                   apps=tuple(a.wire(root) for a in apps))

    def _put_apps(self, key: tuple[str, str], chan: Any, root: str, apps: list[Any]) -> None:
        """Copy each package's archive to the node once (per agent); blocking."""
        lock = self._node_apps_lock.setdefault(key, threading.Lock())
        with lock:
            have = self._node_apps.setdefault(key, set())
            for app in apps:
                there = app.node_archive(root)
                if there not in have:
                    chan.put_files([(app.archive, there.rsplit("/", 1)[1])],
                                   there.rsplit("/", 1)[0])
                    have.add(there)

    # ---- job preparation and release tasks --------------------------------------------

    def _job_task_run(self, ins: S.RunJobTask, token: str | None) -> P.Run | None:
        """The Run of a job's preparation or release task (None: sent later, after its
        resource files reach the node, by a worker thread)."""
        key = (ins.pool_id, ins.node_id)
        spec = self.store.get_job(ins.job_id)["spec"]
        task = spec.preparation_task if ins.run.kind is RunKind.JOB_PREP else \
            spec.release_task
        env = {**task.environment, **dict(ins.env)}
        if token:
            env[P.AGENT_TOKEN_ENV] = token
        msg = P.Run(ins.run.wire, task.command_line, ins.task_dir, env,
                    task.max_wall_clock_time_s, 0, cwd=ins.task_dir)  # (takes no slot)
        if self._pool_refs(ins.pool_id):
            msg = self._with_apps(msg, key, ())
        if not task.resource_files:
            return msg
        entry = self.channels.get(key)
        gen = self.state.node(*key).gen if self.state.node(*key) else 0

        def work() -> None:
            error = None
            try:
                if entry is None:
                    raise OSError("its agent is gone")
                entry[1].put_files([(f.source, f.file_path) for f in task.resource_files],
                                   ins.task_dir)
            except Exception as exc:  # noqa: BLE001 - reported as its failure to start
                error = f"copying its resource files to node {ins.node_id} failed: {exc}"
            if error is None:
                entry[1].send_many([msg])
                return
            now = time.time()
            self.inbox.put(("msg", ins.pool_id, ins.node_id, gen, P.Events((P.Exited(
                id=msg.id, exit_code=None, start_failed=error, start=now, end=now),)), "",
                now))
        self._io(work)
        return None

    def _stage_node_apps(self, ins: S.StageNodeApps) -> None:
        key = (ins.pool_id, ins.node_id)
        entry = self.channels.get(key)
        node = self.state.node(*key)
        root = (node.root if node else None) or ""

        def work() -> None:
            error = None
            try:
                if entry is None:
                    raise OSError("its agent is gone")
                self._put_apps(key, entry[1], root, self._resolve_apps(ins.pool_id, ()))
            except Exception as exc:  # noqa: BLE001 - reported on the node
                error = f"copying them to node {ins.node_id} failed: {exc}"
            self.inbox.put(("appsstaged", ins.pool_id, ins.node_id, ins.gen, error))
        self._io(work)

    def _io(self, fn: Any, *args: Any) -> None:
        """Run fn on a worker thread; stop() waits for what is still running."""
        fut = self.io.submit(fn, *args)
        self._io_running.add(fut)
        fut.add_done_callback(self._io_running.discard)

    def _start_agent(self, ins: S.StartAgent) -> None:
        """On a worker thread: reap what earlier agents of this home left on the node,
        then start a new agent."""
        key = (ins.pool_id, ins.node_id)
        provider = self._provider_of(*key)
        if provider is None or self._stop.is_set():
            return
        token = secrets.token_hex(8)
        try:
            store = Store(self.home / "state.db")
            try:
                records = [a for a in store.agents()
                           if (a["pool_id"], a["node_id"]) == key]
                problems = provider.reap_orphans(records)
                for problem in problems:
                    log.warning("%s", problem)
                if not problems:  # (else kept: the next start of the node tries again)
                    with store.transaction():
                        for a in records:
                            store.forget_agent(a["pool_id"], a["node_id"], a["token"])
            finally:
                store.close()
            self.inbox.put(("reaped", ins.pool_id, ins.node_id, not problems))
            chan = provider.start_agent(self.descs[key], token=token, timings=self.timings)
        except Exception as exc:  # noqa: BLE001 - reported on the node
            self.inbox.put(("startfail", ins.pool_id, ins.node_id, ins.gen, str(exc)))
        else:
            self.inbox.put(("up", ins.pool_id, ins.node_id, ins.gen, chan, token))

    def _stop_agent(self, key: tuple[str, str], gen: int, last: list[Any],
                    abort: bool = False) -> tuple[int, Any, str] | None:
        """Shut the agent down (a lost one: cut it off, nothing buffered reaches it);
        returns its (gen, channel, token), or None when it had none."""
        entry = self.channels.get(key)
        if entry is None or entry[0] != gen:
            return None
        del self.channels[key]
        chan = entry[1]
        if abort:
            chan.close(abort=True)
        else:
            chan.send_many([*last, P.Shutdown()])
            chan.close()
        return entry

    def _forget_node(self, key: tuple[str, str], entry: tuple[int, Any, str] | None) -> None:
        """A node that left its pool: once its agent has shut down cleanly, its record is
        forgotten (one that did not stays recorded, for the next start to reap)."""
        self.descs.pop(key, None)
        self.tokens.pop(key, None)
        provider = self.retired.pop(key, None) or self.providers.get(key[0])
        if provider is not None and provider.elastic:  # give the node back
            chan = entry[1] if entry else None
            self._io(self._give_back, provider, key[1], chan)
        if entry is None:
            return
        _, chan, token = entry
        grace = self.timings.kill_grace_s + 5

        def forget() -> None:
            if not chan.wait_closed(grace):
                return
            store = Store(self.home / "state.db")
            try:
                with store.transaction():
                    store.forget_agent(key[0], key[1], token)
            finally:
                store.close()
        self._io(forget)

    def _remove_node_data(self, provider: Any, node_id: str) -> None:
        try:
            provider.remove_tree(node_id, "jobs")
        except Exception as exc:  # noqa: BLE001 - a warning: the node has left anyway
            log.warning("pool %s: the task directories of node %s, which left it, could "
                        "not be removed: %s", provider.pool_id, node_id, exc)

    def _give_back(self, provider: Any, node_id: str, chan: Any) -> None:
        """An elastic pool's node left: once its agent has shut down, the provider gives
        the node back (a Slurm allocation cancelled)."""
        if chan is not None:
            chan.wait_closed(self.timings.kill_grace_s + 5)
        try:
            provider.shrink([node_id])
        except Exception:  # noqa: BLE001 - logged; the pool's stop or delete tries again
            log.exception("giving node %s back", node_id)

    def _fence(self, ins: S.FenceNode, token: str) -> None:
        provider = self._provider_of(ins.pool_id, ins.node_id)
        sure = False
        if provider is not None and token:
            try:
                sure = bool(provider.fence(self.descs[(ins.pool_id, ins.node_id)], token,
                                           ins.pids))
            except Exception:  # noqa: BLE001 - not sure, then: the lease decides
                log.exception("fencing node %s", ins.node_id)
        self.inbox.put(("fenced", ins.pool_id, ins.node_id, ins.gen, sure))

    def _release(self) -> None:
        """Shut every agent down, record the nodes offline, close the store, unlock."""
        self._stop.set()
        self._stop_providers(final=False)  # elastic pools: starts waiting for nodes end
        # agents being started right now: wait for them, so none is left running
        concurrent.futures.wait(list(self._io_running), timeout=30)
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "up":
                self.channels[(item[1], item[2])] = (item[3], item[4], item[5])
        chans = list(self.channels.items())
        self.channels.clear()
        for _, (_, chan, _) in chans:
            chan.send_many([P.Shutdown()])
        for _, (_, chan, _) in chans:
            chan.close()
        deadline = time.monotonic() + self.timings.kill_grace_s + 5
        # an agent that shut down cleanly left nothing to reap: forget its record (one
        # that did not stays recorded, and the next coordinator reaps what it left)
        gone = [(key, token) for key, (_, chan, token) in chans
                if chan.wait_closed(max(0.0, deadline - time.monotonic()))]
        self._stop_providers(final=True)  # elastic pools give their nodes back
        try:
            with self.store.transaction():
                for (pool_id, node_id), token in gone:
                    self.store.forget_agent(pool_id, node_id, token)
                for pool in self.state.pools.values():
                    for node in pool.nodes.values():
                        self.store.upsert_node(node.pool_id, node.node_id,
                                               NodeState.OFFLINE.value, node.slots, None,
                                               "coordinator stopped")
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.exception("could not record the nodes offline")
        self.io.shutdown(wait=False, cancel_futures=True)
        self._keeper.shutdown(wait=True, cancel_futures=True)  # (the one it is keeping)
        for fut in list(self.replies.values()):
            if not fut.done():
                fut.set_exception(HpcBatchError("the coordinator stopped"))
        self.store.close()
        self.lock.release()

    def _stop_providers(self, final: bool) -> None:
        for provider in list(self.providers.values()):
            try:
                provider.stop(final)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("stopping pool %s", provider.pool_id)


def _job_info(j: dict[str, Any]) -> S.JobInfo:
    spec = j["spec"]
    prep = spec.preparation_task
    return S.JobInfo(j["id"], j["pool_id"], spec.priority,
                     spec.on_all_tasks_complete == "terminate_job", prep is not None,
                     prep.wait_for_success if prep else True,
                     prep.max_task_retry_count if prep else 0,
                     prep.rerun_on_node_reboot_after_success if prep else True,
                     spec.release_task is not None)


# ---- the service operations' rules (the service applies them too, with no coordinator) --

def resized_spec(spec: PoolSpec, home: Path, target: int) -> PoolSpec:
    """The pool's spec at ``target`` nodes; ValidationError when its provider's nodes are
    not set by its size (a fixed host list) or the size is out of its range."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValidationError("target_nodes", f"{target!r} is not a number of nodes >= 0")
    new = dataclasses.replace(spec, target_nodes=target)  # validates the number
    provider = provider_for(new, home)
    capacity = provider.capacity()
    if capacity is not None and target > capacity:
        raise ValidationError("target_nodes", f"pool {spec.id!r} has {capacity} host(s) in "
                              f"its host list, fewer than the target of {target}; resize it "
                              f"to at most {capacity}, or create a pool with more hosts")
    most = getattr(type(provider), "MAX_NODES", None)
    if most is not None and target > most:
        raise ValidationError("target_nodes", f"{target} is more than the {most} nodes a "
                              f"{spec.provider} pool can have")
    return new


def spec_without_node(spec: PoolSpec, home: Path, node_id: str,
                      present: list[str] | None = None) -> PoolSpec:
    """The pool's spec once ``node_id`` has left: one node fewer, or (a pool defined by
    its host list) that list without it. ``present``: the nodes the pool has now, when a
    coordinator runs it (a local pool's ids need not be 1..N after a removal)."""
    provider = provider_for(spec, home)
    listed = [d.node_id for d in provider.fixed_nodes()]
    have = listed if present is None else present
    if node_id not in have:
        raise NotFound(f"node {node_id!r} is not in pool {spec.id!r} (its nodes: "
                       f"{', '.join(have) or 'none'})")
    if spec.target_nodes <= 1 or len(have) <= 1:
        raise ValidationError("node", f"{node_id!r} is the last node of pool {spec.id!r}; a "
                              "pool keeps at least one (delete the pool instead)")
    smaller = dataclasses.replace(spec, target_nodes=spec.target_nodes - 1)
    # (an SSH pool loses the host from its list: a resize would leave it listed, idle)
    if not provider.ordered and \
            len(provider_for(smaller, home).fixed_nodes()) == smaller.target_nodes:
        return smaller
    hosts = spec.provider_config.get("hosts")
    if isinstance(hosts, list) and node_id in listed:
        config = {**spec.provider_config,
                  "hosts": [h for h in hosts if not (isinstance(h, dict) and
                                                     h.get("name") == node_id)]}
        new = dataclasses.replace(spec, provider_config=config,
                                  target_nodes=spec.target_nodes - 1)
        if [d.node_id for d in provider_for(new, home).fixed_nodes()] == \
                [n for n in listed if n != node_id]:
            return new
    raise ValidationError("node", f"the nodes of pool {spec.id!r} cannot be removed one by "
                          "one; resize it instead")


def check_reactivatable(task: dict[str, Any], job: dict[str, Any]) -> None:
    """Conflict unless the task is completed and failed and its job is not terminating."""
    where = f"task {task['job_id']}/{task['id']}"
    if task["state"] != TaskState.COMPLETED.value:
        raise Conflict(f"{where} is {task['state']}; only a failed completed task can be "
                       "reactivated")
    if task["result"] != "failure":
        raise Conflict(f"{where} succeeded; only a failed completed task can be reactivated")
    if job["state"] == JobState.TERMINATING.value:
        raise Conflict(f"job {job['id']!r} is terminating; reactivate its tasks once it has "
                       "completed")
