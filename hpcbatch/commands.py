"""What callers ask a coordinator, from any thread, and how the loop turns it into events.

Each command is an inbox item ``(kind, args..., future)``; the loop thread takes it in
its next turn (:meth:`Commands.command_events`) and the future resolves when the state
has taken it: a result, or the error (NotFound, Conflict, ValidationError) raised, never
a silent time-out. A command the state answers later carries a reply number
(:class:`Replies`), resolved by the state's ``Reply`` after the turn's commit.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from hpcbatch import state as S
from hpcbatch.errors import HpcBatchError
from hpcbatch.models import PoolSpec

Future = concurrent.futures.Future


class Replies:
    """The futures of commands waiting for the state's answer."""

    def __init__(self) -> None:
        self.pending: dict[int, Future] = {}
        self._n = 0
        self._after_commit: list[Future] = []

    def register(self, fut: Future) -> int:
        """A reply number for a state event; the state's Reply resolves it."""
        self._n += 1
        self.pending[self._n] = fut
        return self._n

    def after_commit(self, fut: Future) -> None:
        """Resolve the command once this turn is committed."""
        self._after_commit.append(fut)

    def answer(self, ins: S.Reply) -> None:
        fut = self.pending.pop(ins.reply, None)
        if fut is not None and not fut.done():
            if ins.error:
                fut.set_exception(HpcBatchError(ins.error))
            else:
                fut.set_result(None)

    def committed(self) -> None:
        done, self._after_commit = self._after_commit, []
        for fut in done:
            if not fut.done():
                fut.set_result(None)

    def fail_all(self, why: str) -> None:
        for fut in [*self.pending.values(), *self._after_commit]:
            if not fut.done():
                fut.set_exception(HpcBatchError(why))


class Commands:
    """The coordinator's command methods (mixed into :class:`Coordinator`, whose inbox,
    rooms and replies they use)."""

    def _command(self, *item: Any) -> Future:
        fut: Future = Future()
        if self._thread is None or not self._thread.is_alive():
            fut.set_exception(HpcBatchError("the coordinator is not running"))
            return fut
        self.inbox.put((*item, fut))
        return fut

    def terminate_task(self, job_id: str, task_id: str) -> Future:
        return self._command("terminate", job_id, task_id)

    def add_pool(self, spec: PoolSpec) -> Future:
        return self._command("pool", spec)

    def remove_pool(self, pool_id: str) -> Future:
        return self._command("droppool", pool_id)

    def forget_job(self, job_id: str) -> Future:
        return self._command("forgetjob", job_id)

    # the service operations (resolved once the state has taken them; errors raised)

    def resize_pool(self, pool_id: str, target_nodes: int,
                    deallocation: str = S.REQUEUE) -> Future:
        return self._command("resize", pool_id, target_nodes, deallocation)

    def remove_node(self, pool_id: str, node_id: str, running: str = S.REQUEUE) -> Future:
        return self._command("removenode", pool_id, node_id, running)

    def set_node_scheduling(self, pool_id: str, node_id: str, enabled: bool,
                            running: str = S.TASK_COMPLETION) -> Future:
        return self._command("scheduling", pool_id, node_id, enabled, running)

    def terminate_job(self, job_id: str) -> Future:
        return self._command("terminatejob", job_id)

    def reactivate_task(self, job_id: str, task_id: str) -> Future:
        return self._command("reactivate", job_id, task_id)

    def evaluate_autoscale(self, pool_id: str, formula: str) -> Future:
        """A dry run of a formula over the pool's samples and its metrics now: the
        evaluation as a dict (None: the pool is not running here)."""
        return self._command("asdry", pool_id, formula)

    # ---- on the loop thread ------------------------------------------------------

    def command_events(self, kind: str, item: tuple, now: float) -> list[Any] | None:
        """The state events of a command item (None: not a command). What can be checked
        against the store is checked first, so the caller hears a NotFound, Conflict or
        ValidationError as such."""
        if kind == "asdry":
            self.pools.evaluate_dry(now, *item[1:])
            return []
        if kind == "terminate":
            return self.jobs.terminate_task_events(now, *item[1:])
        if kind not in _COMMANDS:
            return None
        args, fut = item[1:-1], item[-1]
        try:
            if kind == "pool":
                ev = self._pool_added(*args)
                fut.set_result(None)
                return [ev]
            if kind == "droppool":
                self.pools.removed(*args)
                self.replies.after_commit(fut)
                return [S.PoolRemoved(now, *args)]
            if kind == "forgetjob":
                ev = self.jobs.forgotten(now, *args)
                fut.set_result(None)
                return [ev]
            if kind == "resize":
                return self.pools.resize_events(now, *args, fut)
            if kind == "removenode":
                return self.pools.remove_node_events(now, *args, fut)
            if kind == "scheduling":
                pool_id, node_id, enabled, running = args
                self.pools.node(pool_id, node_id)
                return [S.NodeSchedulingSet(now, pool_id, node_id, enabled, running,
                                            self.replies.register(fut))]
            if kind == "terminatejob":
                return self.jobs.terminate_job_events(now, *args, fut)
            trow = self.jobs.reactivated_row(*args)
            return [*self._unknown([trow]),
                    S.ReactivateAsked(now, trow, self.replies.register(fut))]
        except Exception as exc:  # noqa: BLE001 - the caller hears it
            if not fut.done():
                fut.set_exception(exc)
            return []


_COMMANDS = frozenset({"pool", "droppool", "forgetjob", "resize", "removenode", "scheduling",
                       "terminatejob", "reactivate"})
