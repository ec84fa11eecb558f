"""The coordinator: the thin I/O shell around :class:`hpcbatch.state.CoordinatorState`.

One loop thread turns what arrives (agent messages, finished file copies and agent
starts, API commands, the clock) into state events, and performs what the state
answers: persistence and queries inside ONE store transaction per turn, then, after
the commit, sends (each channel has its own writer, so a stopped agent stalls nobody),
file copies, agent starts/stops and fencing on worker threads. Nothing it acts on is
held only in memory: killed at any point and restarted, it finds the store consistent.

What is performed is done by the rooms the coordinator holds and calls, each on its
loop thread, handing slow work to the coordinator's worker threads:
:class:`hpcbatch.poolops.PoolOps` (pools' providers, resizes, growth, autoscaling),
:class:`hpcbatch.jobops.JobOps` (the jobs known; terminate, reactivate),
:class:`hpcbatch.agents.Agents` (agents started, connected, stopped, fenced; nodes
forgotten) and :class:`hpcbatch.filework.FileWork` (resource files, application
packages, job preparation/release runs, outputs and logs collected at exit); what
the store holds at start and is left at stop is :mod:`hpcbatch.restart`'s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from hpcbatch import agentlink as link
from hpcbatch import persist, restart
from hpcbatch import state as S
from hpcbatch.agents import Agents
from hpcbatch.commands import Commands, Replies
from hpcbatch.filework import FileWork
from hpcbatch.home import HomeLock, default_home
from hpcbatch.jobops import JobOps
from hpcbatch.launch import protocol as P
from hpcbatch.models import PoolSpec
from hpcbatch.poolops import PoolOps
from hpcbatch.store import Store
from hpcbatch.timings import Timings

log = logging.getLogger("hpcbatch.coordinator")
DEFAULT_PREFETCH = S.DEFAULT_PREFETCH
TICK_S = 0.25
MAX_ITEMS_PER_TURN = 5000
# what worker threads put in the inbox (kind, args...) that is a state event as it is
_ANSWERS = {"startfail": S.AgentStartFailed, "fenced": S.NodeFenced, "reaped": S.NodeReaped,
            "staged": S.FilesStaged, "appsstaged": S.NodeAppsStaged}


class Coordinator(Commands):
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
        self.replies = Replies()
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
        # the rooms (see the module's docstring)
        self.jobs = JobOps(self.store, self.replies.register)
        self.pools = PoolOps(self.home, self.store, self.state, self.inbox, self._io,
                             self.replies.register, self._stop)
        self.agents = Agents(self.home, self.store, self.state, self.pools, self.timings,
                             self.inbox, self._io, self._stop)
        self.channels = self.agents.channels  # node -> (gen, channel, token)
        self.files = FileWork(self.home, self.store, self.state, self.channels,
                               self.inbox, self._io)
        self.agents.before_removal = self.files.keep_left
        self.stager = self.files.stager  # resource files (its counts, for tests)

    # ---- life cycle and commands (any thread) ------------------------------------

    def start(self) -> None:
        try:
            with self.store.transaction():
                events, self.requeued_at_start = restart.found(
                    self.store, self.jobs, self.pools, self.timings, time.time(),
                    self._pool_added)
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

    # ---- the loop --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                due = self.state.running_due()
                items = self._drain(TICK_S if due is None else
                                    min(TICK_S, max(due - time.time(), 0.001)))
                now = time.time()
                events = [ev for item in items for ev in self._events(item, now)]
                if now - self._last_poll >= self.timings.work_poll_s:
                    self._last_poll = now
                    events.append(S.WorkNoticed(now))
                if now - self._last_tick >= TICK_S:
                    self._last_tick = now
                    events.append(S.Tick(now))
                    events += self.pools.autoscale(now)
                if not events and due is not None and now >= due:
                    events.append(S.Clock(now))
                if events or self._deferred:
                    self._turn(events)
        except BaseException as exc:  # surface to waiters instead of dying silently
            log.exception("coordinator loop failed")
            self.error = exc
        finally:
            self._release()

    def _drain(self, timeout_s: float) -> list[tuple]:
        try:
            items = [self.inbox.get(timeout=timeout_s)]
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
            work = collections.deque(self.state.handle(*events))
            work += self._deferred
            self._deferred = []
            while work:
                ins = work.popleft()
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
            return self.files.hold_exits(link.events_of(*item[1:]))
        if kind == "collected":
            return [item[1]]
        if kind in _ANSWERS:  # a worker thread's answer, as it came
            return [_ANSWERS[kind](now, *item[1:])]
        if kind == "up":
            evs = self.agents.up(now, *item[1:])
            if evs:
                self.files.agent_up(item[1:3])  # a new agent: look again
            return evs
        if kind == "work":
            return [S.WorkNoticed(now)]
        if kind == "grown":
            _, pool_id, granted, _error, asked = item
            return self.pools.granted_events(now, pool_id, granted, asked)
        evs = self.command_events(kind, item, now)
        return [] if evs is None else evs  # "wake"

    # ---- queries answered in the turn (pools, jobs not heard of yet added first) --------

    def _pool_added(self, spec: PoolSpec) -> S.PoolAdded:
        ev = self.pools.added(spec)
        self.files.pool_added(spec.id, spec.application_package_references)
        return ev

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
        jobs = {r.job_id for r in rows} - self.jobs.known
        if jobs:
            events.append(self.jobs.jobs_known([self.store.get_job(j) for j in sorted(jobs)]))
        for pool_id in sorted({r.pool_id for r in rows} - set(self.pools.providers)):
            events.append(self._pool_added(self.store.get_pool(pool_id)))
        return events

    # ---- performing instructions -----------------------------------------------------

    def _write(self, txn: contextlib.ExitStack, writes: list[Any]) -> None:
        if not self.store.db.in_transaction:
            txn.enter_context(self.store.transaction(
                while_waiting=self.agents.keep_leases,
                wait_slice_s=self.timings.heartbeat_s / 2))
        persist.write(self.store, writes)

    def _perform(self, after: list[Any]) -> None:
        """After the commit: messages to the agents (one send per node), the rest
        handed to the rooms (which put slow work on worker threads); replies, and
        JobDrained wakes the embedded waiters."""
        sends: dict[tuple[str, str], list[Any]] = {}
        runs = [i for i in after if isinstance(i, S.RunTask | S.StageFiles)]
        specs = self.store.dispatch_specs(sorted({i.seq for i in runs})) if runs else {}
        drained = False
        for ins in after:
            key = (ins.pool_id, ins.node_id) if hasattr(ins, "node_id") else None
            token = self.agents.token(key)
            if isinstance(ins, S.RunTask):
                spec = specs[ins.seq]
                self.files.expect_exit(ins, spec)
                inter = None
                if ins.instance:
                    inter = self.pools.providers[ins.pool_id].inter_node_env(
                        ins.node_id, self.state.node(*key).root or "")
                msg = link.run_message(ins, spec, token, inter)
                sends.setdefault(key, []).append(
                    self.files.with_apps(msg, key, spec.application_package_references))
            elif isinstance(ins, S.RunStartTask):
                msg = link.message_of(ins, token)
                sends.setdefault(key, []).append(self.files.with_apps(msg, key, ()))
            elif isinstance(ins, S.StageNodeApps):
                self.files.stage_node_apps(ins)
            elif isinstance(ins, S.RunJobTask):
                msg = self.files.job_task_run(ins, token)
                if msg is not None:
                    sends.setdefault(key, []).append(msg)
            elif isinstance(ins, S.KillRun | S.Reap | S.Ping):
                sends.setdefault(key, []).append(link.message_of(ins, token))
            elif isinstance(ins, S.StageFiles):
                self.files.stage(ins, specs[ins.seq])
            elif isinstance(ins, S.StartAgent):
                self._io(self.agents.start, ins)
            elif isinstance(ins, S.StopAgent):
                entry = self.agents.stop(key, ins.gen, sends.pop(key, []), abort=ins.lost)
                if self.state.node(*key) is None:  # it left the pool (an elastic
                    self.agents.forget(key, entry)  # one's node is given back there)
            elif isinstance(ins, S.RemoveNodeData):
                self.agents.remove_data(key)
            elif isinstance(ins, S.FenceNode):
                self.agents.fence(ins)
            elif isinstance(ins, S.Reply):
                self.replies.answer(ins)
            elif isinstance(ins, S.JobDrained):
                drained = True
            elif isinstance(ins, S.Log):
                log.log(ins.level, ins.message)
        for key, msgs in sends.items():
            entry = self.channels.get(key)
            if entry is not None:
                entry[1].send_many(msgs)
        self.replies.committed()
        if drained:
            with self.progress:
                self.progress.notify_all()

    def _io(self, fn: Any, *args: Any) -> None:
        """Run fn on a worker thread; stop() waits for what is still running."""
        fut = self.io.submit(fn, *args)
        self._io_running.add(fut)
        fut.add_done_callback(self._io_running.discard)

    def _release(self) -> None:
        """Shut every agent down, record the nodes offline, close the store, unlock."""
        self._stop.set()
        self.pools.stop_providers(final=False)  # elastic pools: starts waiting for nodes end
        # agents being started right now: wait for them, so none is left running
        concurrent.futures.wait(list(self._io_running), timeout=30)
        gone = self.agents.shut_down_all()
        self.pools.stop_providers(final=True)  # elastic pools give their nodes back
        try:
            with self.store.transaction():
                restart.left(self.store, gone, (n for pool in self.state.pools.values()
                                                for n in pool.nodes.values()))
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.exception("could not record the nodes offline")
        self.io.shutdown(wait=False, cancel_futures=True)
        self.files.shutdown()  # (the logs it is keeping now are kept)
        self.replies.fail_all("the coordinator stopped")
        self.store.close()
        self.lock.release()
