"""The service layer: every operation the CLI and ``hpcbatch.Batch`` offer, one method each.

:class:`Service` is the interface; :class:`LocalService` implements it on a home
directory (its store, its providers, and the embedded coordinator when there is one).
The next issue's HTTP backend implements the same methods over the wire, so
``Batch(url=...)`` only swaps the service. Methods take and return plain values and
frozen views (:mod:`hpcbatch.views`); errors are the kinds of :mod:`hpcbatch.errors`
(NotFound, Conflict, ValidationError, HpcBatchError), each one readable line.

Nothing here issues SQL (that is :mod:`hpcbatch.store`'s) or branches on a provider's
name (that is :mod:`hpcbatch.providers`'). Coordinator commands (terminate, add and
remove a pool, forget a job) are waited for, with a deadline: one that is not
confirmed in time raises, it is never dropped silently.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hpcbatch import env as E
from hpcbatch.errors import Conflict, HpcBatchError, NotFound, ValidationError
from hpcbatch.home import default_home
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec, check_id, check_unique_ids
from hpcbatch.timings import Timings
from hpcbatch.views import AttemptView, JobView, NodeView, PoolView, TaskView

LOCAL_POOL = "local"
COMMAND_TIMEOUT_S = 30.0  # a coordinator command not confirmed within this raises
POOL_CHECK_S = 2.0  # how often wait_job looks at the pool's nodes
PROGRESS_EVERY_S = 0.2  # wait_job reports progress at most this often
MIN_GAP_S, MAX_GAP_S = 0.002, 0.05  # wait_job looks at a job at most this often
TASK_FILES = ("stdout.txt", "stderr.txt")


class Service(abc.ABC):
    """What a client of hpcbatch can ask for. Every method is one request."""

    # ---- pools -----------------------------------------------------------

    @abc.abstractmethod
    def create_pool(self, pool_id: str, provider: str = "local", *,
                    task_slots_per_node: int = 1, scheduling_policy: str = "pack",
                    target_nodes: int = 1, start_task: str | None = None,
                    inter_node_communication: bool | None = None,
                    trust_on_first_use: bool = False, **provider_options: Any) -> PoolView:
        """Validate, check every node can be reached, store, and start the pool's nodes
        (when a coordinator runs). Nothing is stored unless every node answered."""

    @abc.abstractmethod
    def get_pool(self, pool_id: str) -> PoolView: ...

    @abc.abstractmethod
    def list_pools(self) -> list[PoolView]: ...

    @abc.abstractmethod
    def delete_pool(self, pool_id: str) -> list[str]:
        """Stop the pool's agents and delete it (it must have no jobs); returns one
        line per node where clean-up failed."""

    @abc.abstractmethod
    def list_nodes(self, pool_id: str | None = None) -> list[NodeView]: ...

    # ---- jobs ------------------------------------------------------------

    @abc.abstractmethod
    def create_job(self, job_id: str, pool_id: str = LOCAL_POOL, *, priority: int = 0,
                   on_all_tasks_complete: str = "no_action",
                   max_task_retry_count: int = 0) -> JobView: ...

    @abc.abstractmethod
    def get_job(self, job_id: str) -> JobView: ...

    @abc.abstractmethod
    def list_jobs(self, *, counts: bool = False) -> list[JobView]: ...

    @abc.abstractmethod
    def delete_job(self, job_id: str) -> list[str]:
        """Delete a finished job, its tasks and their directories on every node;
        returns one line per node whose files could not be removed."""

    @abc.abstractmethod
    def job_counts(self, job_id: str) -> dict[str, int]:
        """Tasks by state (active, preparing, running, completed), succeeded, failed,
        retries, requeues and total."""

    @abc.abstractmethod
    def wait_job(self, job_id: str, *, timeout_s: float | None = None,
                 on_progress: Callable[[dict[str, int]], None] | None = None
                 ) -> dict[str, int]:
        """Block until every task of the job is completed; return the counts.
        TimeoutError after ``timeout_s``; HpcBatchError when the pool has had no usable
        node for the pool grace period or the coordinator stopped."""

    # ---- tasks -----------------------------------------------------------

    @abc.abstractmethod
    def add_tasks(self, job_id: str, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> int:
        """Validate and store tasks in one transaction (all or nothing)."""

    @abc.abstractmethod
    def submit(self, job: JobSpec, tasks: Iterable[TaskSpec | Mapping[str, Any]], *,
               existing_ok: bool = True) -> int:
        """Create the job unless it exists (then it must be on the same pool; with
        ``existing_ok=False`` it must not exist) and add the tasks, in one transaction:
        a refused task leaves no job behind."""

    @abc.abstractmethod
    def get_task(self, job_id: str, task_id: str) -> TaskView: ...

    @abc.abstractmethod
    def list_tasks(self, job_id: str, state: str | None = None, *, failed: bool = False,
                   limit: int | None = None) -> list[TaskView]:
        """A job's tasks in submission order; ``failed``: completed ones that failed."""

    @abc.abstractmethod
    def task_attempts(self, job_id: str, task_id: str) -> list[AttemptView]: ...

    @abc.abstractmethod
    def terminate_task(self, job_id: str, task_id: str) -> None:
        """Stop the task (its current attempt is its last); returns once the
        coordinator has taken the request."""

    @abc.abstractmethod
    def read_task_file(self, job_id: str, task_id: str, name: str) -> bytes:
        """stdout.txt or stderr.txt of the task's latest attempt, from its node."""

    # ---- the service itself ---------------------------------------------

    @property
    def requeued_at_start(self) -> int:
        """Tasks the coordinator found in flight at start (a previous one stopped)."""
        return 0

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the service holds (an embedded coordinator stops)."""

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pool_view(spec: PoolSpec, nodes: Iterable[Mapping[str, Any]], home: Path) -> PoolView:
    from hpcbatch.providers import provider_for
    states: dict[str, int] = {}
    for n in nodes:
        states[n["state"]] = states.get(n["state"], 0) + 1
    try:
        provider = provider_for(spec, home)
        where, notes, python = provider.where(), tuple(provider.notes()), provider.node_python
    except HpcBatchError as exc:  # a stored config this version cannot read: say so
        where, notes, python = "?", (f"provider config: {exc}",), ""
    return PoolView(spec.id, spec.provider, spec.task_slots_per_node, spec.scheduling_policy,
                    spec.target_nodes, spec.start_task, spec.inter_node_communication,
                    dict(spec.provider_config), states, where, notes, python)


class LocalService(Service):
    """The service on a home directory, in this process.

    ``coordinator``: the embedded coordinator (``LocalService.embedded`` starts one);
    without it the service stores and reads (the CLI's commands that need no
    coordinator), and deleting a job or pool takes the home's lock, so no coordinator
    may run on the home meanwhile."""

    def __init__(self, home: str | os.PathLike | None = None, coordinator: Any = None, *,
                 timings: Timings | None = None, create: bool = True,
                 command_timeout_s: float = COMMAND_TIMEOUT_S):
        from hpcbatch.store import Store
        self.home = Path(home).expanduser() if home else default_home()
        path = self.home / "state.db"
        if not create and not path.exists():
            raise NotFound(f"no hpcbatch state in {self.home}; nothing has been submitted "
                           f"there yet (set {E.HOME} or --home to the right directory)")
        self.store = Store(path)
        self.coordinator = coordinator
        self.timings = timings or Timings()
        self.command_timeout_s = command_timeout_s
        if create:
            try:
                self._ensure_local_pool(None)
            except BaseException:
                self.store.close()
                raise

    @classmethod
    def embedded(cls, home: str | os.PathLike | None = None, *,
                 local_slots: int | None = None, prefetch: int | None = None,
                 timings: Timings | None = None) -> LocalService:
        """A service with a coordinator running in this process (what ``Batch()`` is)."""
        service = cls(home, timings=timings)
        try:
            if local_slots is not None:
                service._ensure_local_pool(local_slots)
            service.coordinator = _start_coordinator(service.home, service.timings, prefetch)
        except BaseException:
            service.store.close()
            raise
        return service

    def _ensure_local_pool(self, slots: int | None) -> None:
        """The automatic ``local`` pool (one slot per core, or ``slots``)."""
        local = PoolSpec(LOCAL_POOL, "local", task_slots_per_node=slots or os.cpu_count() or 1)
        self.store.create_pool(local, exist_ok=True)
        if slots is not None and self.store.get_pool(LOCAL_POOL) != local:
            self.store.set_pool_spec(local)

    @property
    def requeued_at_start(self) -> int:
        return int(getattr(self.coordinator, "requeued_at_start", 0) or 0)

    def close(self) -> None:
        coordinator, self.coordinator = self.coordinator, None
        try:
            if coordinator is not None:
                coordinator.stop()
        finally:
            self.store.close()

    # ---- helpers ---------------------------------------------------------

    def _provider(self, spec: PoolSpec):
        from hpcbatch.providers import provider_for
        return provider_for(spec, self.home)

    def _check_coordinator(self) -> None:
        error = getattr(self.coordinator, "error", None)
        if error is not None:
            raise HpcBatchError(f"the coordinator stopped: {error!r}")

    def _command(self, what: str, name: str, *args: Any) -> None:
        """Run a coordinator command and wait for its result (a Future), at most
        command_timeout_s; its error is raised here."""
        if self.coordinator is None:
            return
        result = getattr(self.coordinator, name)(*args)
        try:
            result.result(timeout=self.command_timeout_s)
        except concurrent.futures.TimeoutError:
            self._check_coordinator()
            raise HpcBatchError(f"the coordinator did not confirm {what} within "
                                f"{self.command_timeout_s:g} s; it may be overloaded or "
                                "stuck (see its log); ask again") from None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """No other coordinator on the home while this runs (ours is, if embedded)."""
        if self.coordinator is not None:
            yield
            return
        from hpcbatch.home import HomeLock
        lock = HomeLock(self.home)
        try:
            yield
        finally:
            lock.release()

    def _notify(self) -> None:
        if self.coordinator is not None:
            self.coordinator.notify()

    # ---- pools -----------------------------------------------------------

    def create_pool(self, pool_id: str, provider: str = "local", *,
                    task_slots_per_node: int = 1, scheduling_policy: str = "pack",
                    target_nodes: int = 1, start_task: str | None = None,
                    inter_node_communication: bool | None = None,
                    trust_on_first_use: bool = False, **provider_options: Any) -> PoolView:
        from hpcbatch.providers import provider_class, provider_for
        check_id("pool", pool_id)
        with contextlib.suppress(NotFound):
            self.store.get_pool(pool_id)
            raise Conflict(f"pool {pool_id!r} already exists; pick another id")
        spec = provider_class(provider).make_spec(
            pool_id, task_slots_per_node=task_slots_per_node,
            scheduling_policy=scheduling_policy, target_nodes=target_nodes,
            start_task=start_task, inter_node_communication=inter_node_communication,
            **provider_options)
        failed = provider_for(spec, self.home).preflight(
            trust_on_first_use=trust_on_first_use).failed
        if failed:
            more = f" (and {len(failed) - 1} more host(s) failed)" if len(failed) > 1 else ""
            raise Conflict(f"pool {pool_id!r} not created: {failed[0].error}{more}")
        self.store.create_pool(spec)
        self._command(f"the start of pool {pool_id!r}", "add_pool", spec)
        return self.get_pool(pool_id)

    def get_pool(self, pool_id: str) -> PoolView:
        spec = self.store.get_pool(pool_id)
        return pool_view(spec, self.store.list_nodes(pool_id), self.home)

    def list_pools(self) -> list[PoolView]:
        nodes: dict[str, list] = {}
        for n in self.store.list_nodes():
            nodes.setdefault(n["pool_id"], []).append(n)
        return [pool_view(p, nodes.get(p.id, []), self.home) for p in self.store.list_pools()]

    def delete_pool(self, pool_id: str) -> list[str]:
        if pool_id == LOCAL_POOL:
            raise Conflict("the local pool is built in and cannot be deleted")
        self.store.check_pool_deletable(pool_id)
        with self._exclusive():
            spec = self.store.get_pool(pool_id)
            self._command(f"the stop of pool {pool_id!r}", "remove_pool", pool_id)
            self.store.delete_pool(pool_id)
            return self._provider(spec).cleanup_pool()

    def list_nodes(self, pool_id: str | None = None) -> list[NodeView]:
        if pool_id is not None:
            self.store.get_pool(pool_id)
        return [NodeView.from_row(r) for r in self.store.list_nodes(pool_id)]

    # ---- jobs ------------------------------------------------------------

    def create_job(self, job_id: str, pool_id: str = LOCAL_POOL, *, priority: int = 0,
                   on_all_tasks_complete: str = "no_action",
                   max_task_retry_count: int = 0) -> JobView:
        self.store.create_job(JobSpec(job_id, pool_id, priority=priority,
                                      on_all_tasks_complete=on_all_tasks_complete,
                                      max_task_retry_count=max_task_retry_count))
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobView:
        return JobView.from_row(self.store.get_job(job_id))

    def list_jobs(self, *, counts: bool = False) -> list[JobView]:
        return [JobView.from_row(r, self.store.task_counts(r["id"]) if counts else None)
                for r in self.store.list_jobs()]

    def delete_job(self, job_id: str) -> list[str]:
        with self._exclusive():
            spec = self.store.get_pool(self.store.get_job(job_id)["pool_id"])
            provider = self._provider(spec)
            nodes = [n.node_id for n in provider.fixed_nodes()]
            nodes += [n["id"] for n in self.store.list_nodes(spec.id)]
            self.store.delete_job(job_id)
            failed = provider.remove_trees(nodes, f"jobs/{job_id}")
            self._command(f"forgetting job {job_id!r}", "forget_job", job_id)
        return [f"{node}: task directories not removed ({why})" for node, why in failed.items()]

    def job_counts(self, job_id: str) -> dict[str, int]:
        self.store.get_job(job_id)
        return self.store.task_counts(job_id)

    def _pool_dead_reason(self, pool_id: str) -> str | None:
        """Why none of the pool's nodes can take work now (None: some can, or may soon).
        A node being reconnected counts as dead: it has failed at least once."""
        nodes = self.list_nodes(pool_id)
        if not nodes or any(n.usable for n in nodes):
            return None
        return "; ".join(f"{n.id}: {n.reason or n.state}" for n in nodes[:3])

    def wait_job(self, job_id: str, *, timeout_s: float | None = None,
                 on_progress: Callable[[dict[str, int]], None] | None = None
                 ) -> dict[str, int]:
        pool_id = self.store.get_job(job_id)["pool_id"]
        if self.coordinator is None:
            raise HpcBatchError(f"no coordinator runs here to drive job {job_id!r}; "
                                f"use 'hpcbatch job wait {job_id}' or hpcbatch.Batch()")
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        grace = self.timings.pool_grace_s
        next_pool_check = start + min(POOL_CHECK_S, grace)
        next_progress = start
        dead_since = None  # when the pool was first seen with no usable node
        change = self.store.change_counter()
        gap, last = MIN_GAP_S, 0.0  # between two looks at the job: busy stores wake us often
        while True:
            now = time.monotonic()
            if now - last < gap:
                time.sleep(gap - (now - last))
                now = time.monotonic()
            last, gap = now, min(gap * 1.5, MAX_GAP_S)
            if on_progress is not None and now >= next_progress:
                on_progress(self.store.task_counts(job_id))
                next_progress = now + PROGRESS_EVERY_S
            if self.store.unfinished(job_id) == 0:
                counts = self.store.task_counts(job_id)
                if on_progress is not None:
                    on_progress(counts)
                return counts
            self._check_coordinator()
            if now >= next_pool_check:
                # nodes are retried for ever; a pool with none usable for a while is
                # most likely misconfigured: say so rather than wait in silence
                why = self._pool_dead_reason(pool_id)
                dead_since = (dead_since or now) if why else None
                if why and now - dead_since >= grace:
                    raise HpcBatchError(
                        f"pool {pool_id!r} has had no usable node for {grace:g} s ({why}); "
                        "the job's tasks stay stored and its nodes are still being retried: "
                        f"fix the pool, then 'hpcbatch job wait {job_id}'")
                next_pool_check = now + min(POOL_CHECK_S, max(grace / 4, 0.05))
            if deadline is not None and now > deadline:
                counts = self.store.task_counts(job_id)
                raise TimeoutError(f"job {job_id}: {counts['completed']}/{counts['total']} "
                                   f"tasks completed after {timeout_s} s")
            wake = [next_pool_check - now, 1.0]
            if deadline is not None:
                wake.append(deadline - now)
            if on_progress is not None:
                wake.append(next_progress - now)
            change = self.store.wait_for_change(change, max(0.0, min(wake)))

    # ---- tasks -----------------------------------------------------------

    def add_tasks(self, job_id: str, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> int:
        specs = [TaskSpec.coerce(t) for t in tasks]
        check_unique_ids(specs)
        n = self.store.add_tasks(job_id, specs)
        self._notify()
        return n

    def submit(self, job: JobSpec, tasks: Iterable[TaskSpec | Mapping[str, Any]], *,
               existing_ok: bool = True) -> int:
        specs = [TaskSpec.coerce(t) for t in tasks]
        check_unique_ids(specs)
        with self.store.transaction():
            pool_id = self.store.job_pool_id(job.id)
            if pool_id is None:
                self.store.create_job(job)
            elif not existing_ok:
                raise Conflict(f"job {job.id!r} already exists; pick another job id")
            elif pool_id != job.pool_id:
                raise ValidationError("pool", f"job {job.id!r} exists on pool {pool_id!r}, "
                                      f"not {job.pool_id!r}")
            n = self.store.add_tasks(job.id, specs)
        self._notify()
        return n

    def get_task(self, job_id: str, task_id: str) -> TaskView:
        return TaskView.from_row(self.store.get_task(job_id, task_id))

    def list_tasks(self, job_id: str, state: str | None = None, *, failed: bool = False,
                   limit: int | None = None) -> list[TaskView]:
        self.store.get_job(job_id)
        if failed:
            rows = [r for r in self.store.list_tasks(job_id, "completed")
                    if r["result"] == "failure"]
            rows = rows[:limit] if limit else rows
        else:
            rows = self.store.list_tasks(job_id, state, limit)
        return [TaskView.from_row(r) for r in rows]

    def task_attempts(self, job_id: str, task_id: str) -> list[AttemptView]:
        return [AttemptView.from_row(job_id, task_id, r)
                for r in self.store.attempts(job_id, task_id)]

    def terminate_task(self, job_id: str, task_id: str) -> None:
        self.store.get_task(job_id, task_id)
        if self.coordinator is None:
            raise HpcBatchError(f"no coordinator runs here to terminate {job_id}/{task_id}")
        self._command(f"terminate of task {job_id}/{task_id}", "terminate_task", job_id,
                      task_id)

    def read_task_file(self, job_id: str, task_id: str, name: str) -> bytes:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValidationError("file", f"{name!r} is not a file name of a task directory "
                                  f"(such as {' or '.join(TASK_FILES)})")
        row = self.store.get_task(job_id, task_id)
        where = f"task {job_id}/{task_id}"
        if not row.get("task_dir"):
            raise NotFound(f"{where} is {row['state']} and has not started; it has no {name} "
                           "yet")
        if not row.get("node_id"):
            raise NotFound(f"{where} is waiting to run again (retry or requeue); its {name} "
                           "comes back once the new attempt starts")
        path = f"{row['task_dir']}/{name}"
        node = row["node_id"]
        spec = self.store.get_pool(self.store.get_job(job_id)["pool_id"])
        try:
            return self._provider(spec).read_node_file(node, path)
        except FileNotFoundError:
            raise NotFound(f"{path} of {where} does not exist on node {node} (were the "
                           "node's files removed?)") from None
        except HpcBatchError:
            raise
        except OSError as exc:
            raise HpcBatchError(f"cannot read {path} of {where} on node {node}: "
                                f"{exc.strerror or exc}") from None


def _start_coordinator(home: Path, timings: Timings, prefetch: int | None):
    """Start the embedded coordinator."""
    from hpcbatch.coordinator import Coordinator
    kw: dict[str, Any] = {} if prefetch is None else {"prefetch": prefetch}
    coordinator = Coordinator(home, timings=timings, **kw)
    coordinator.start()
    return coordinator


__all__ = ["LOCAL_POOL", "LocalService", "Service", "default_home", "pool_view"]
