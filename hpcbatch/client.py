"""The Python API: ``hpcbatch.Batch`` with ``pools``, ``jobs`` and task handles.

``Batch()`` runs an embedded coordinator in this process on ``$HPCBATCH_HOME``
(default ``~/.hpcbatch``) with an automatic ``local`` pool of one task slot per
core::

    with hpcbatch.Batch() as batch:
        job = batch.jobs.create("render", pool="local")
        job.add_tasks([{"id": f"t{i}", "command_line": f"echo {i}"} for i in range(100)])
        job.wait(progress=True)
        print(job.task("t7").stdout())

Everything goes through a :class:`hpcbatch.service.Service` (``batch.service``): the
local one on a home directory, or :class:`hpcbatch.remote.RemoteService` over HTTP with
the same methods, when ``Batch(url=..., key=...)`` names a running ``hpcbatch serve``
(or ``HPCBATCH_URL``/``HPCBATCH_KEY`` do, or the home holds the ``service.json`` of a live
one): a script moves from laptop to service by changing that one line.

The embedded coordinator starts at the first operation that needs one (adding tasks,
submitting, waiting, terminating, creating or deleting a pool ...), so a ``Batch()``
that only reads (lists, counts, logs) opens at once, even beside a running
``hpcbatch job wait``. When another coordinator owns the home, tasks and jobs are
stored for it to run (it looks for new work every ``work_poll_s``) and waits follow
the store; what needs this process's own coordinator (pools, deletes, terminate)
raises ``CoordinatorBusy``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcbatch.errors import CoordinatorBusy, HpcBatchError, NotFound, ValidationError
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec, check_id
from hpcbatch.service import LOCAL_POOL, LocalService, Service
from hpcbatch.timings import Timings
from hpcbatch.views import AttemptView, JobView, NodeView, Page, PoolView, TaskView

POOL_DEAD_GRACE_S = Timings.pool_grace_s  # Job.wait gives up on a pool with no usable node
# this long (the default of Batch(pool_grace_s=...))


class Task:
    """A snapshot of one task (a :class:`TaskView`'s fields as attributes: ``state``,
    ``result``, ``failure``, ``exit_code``, ``retry_count``, ``node_id``, ``task_dir``
    ...); ``refresh()`` reads it again."""

    def __init__(self, batch: Batch, view: TaskView):
        self._batch = batch
        self._view = view

    def __repr__(self) -> str:
        return f"<Task {self.job_id}/{self.id} {self.state} exit={self.exit_code}>"

    def __getattr__(self, name: str) -> Any:
        view = self.__dict__.get("_view")
        if view is not None and name in view:
            return getattr(view, name)
        raise AttributeError(name)

    @property
    def view(self) -> TaskView:
        return self._view

    def refresh(self) -> Task:
        self._view = self._batch.service.get_task(self.job_id, self.id)
        return self

    @property
    def succeeded(self) -> bool:
        return self._view.succeeded

    def stdout(self) -> str:
        return self._batch.service.read_task_file(self.job_id, self.id, "stdout.txt").decode(
            errors="replace")

    def stderr(self) -> str:
        return self._batch.service.read_task_file(self.job_id, self.id, "stderr.txt").decode(
            errors="replace")

    def attempts(self) -> list[AttemptView]:
        """Every attempt so far, oldest first (node, times, exit, failure, outcome)."""
        return self._batch.service.task_attempts(self.job_id, self.id)

    @property
    def stdout_path(self) -> Path | None:
        return Path(self.task_dir) / "stdout.txt" if self.task_dir else None

    @property
    def stderr_path(self) -> Path | None:
        return Path(self.task_dir) / "stderr.txt" if self.task_dir else None


class TaskList:
    """A job's tasks (of one state, or that match a filter) in submission order, read a
    page at a time each time it is iterated: a million tasks are never held at once.
    ``len()`` reads the kept counts (a filter: counts a page at a time); ``list(...)``
    makes the list when one is wanted, and ``a + b`` is ``list(a) + list(b)``."""

    def __init__(self, batch: Batch, job_id: str, state: str | None = None,
                 filter: str | None = None, page_size: int = 1000):
        from hpcbatch.models import TaskState
        if state is not None and state not in {s.value for s in TaskState}:
            raise ValidationError("state", f"{state!r} is not one of "
                                  f"{', '.join(s.value for s in TaskState)}")
        self._batch = batch
        self.job_id = job_id
        self.state = state
        self.filter = filter
        self.page_size = page_size
        terms = [f"state eq '{state}'"] if state else []
        terms += [f"({filter})"] if filter and filter.strip() else []
        self._query = " and ".join(terms) or None

    def __iter__(self) -> Iterator[Task]:
        for item in self._batch.service.iter_tasks(self.job_id, filter=self._query,
                                                   page_size=self.page_size):
            yield Task(self._batch, TaskView.from_dict(item))

    def __len__(self) -> int:
        if not (self.filter and self.filter.strip()):
            counts = self._batch.service.job_counts(self.job_id)
            return counts[self.state] if self.state else counts["total"]
        return sum(1 for _ in self._batch.service.iter_tasks(
            self.job_id, filter=self._query, select=["seq"], page_size=1000))

    def __add__(self, other: Iterable[Task]) -> list[Task]:
        return [*self, *other]

    def __radd__(self, other: Iterable[Task]) -> list[Task]:
        return [*other, *self]

    def __repr__(self) -> str:
        what = f" {self._query}" if self._query else ""
        return f"<TaskList {self.job_id}{what}>"


class Job:
    def __init__(self, batch: Batch, job_id: str):
        self._batch = batch
        self.id = job_id

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    def view(self) -> JobView:
        return self._batch.service.get_job(self.id)

    @property
    def spec(self) -> JobSpec:
        v = self.view()
        return JobSpec(v.id, v.pool_id, priority=v.priority,
                       on_all_tasks_complete=v.on_all_tasks_complete,
                       max_task_retry_count=v.max_task_retry_count)

    @property
    def pool_id(self) -> str:
        return self.view().pool_id

    @property
    def state(self) -> str:
        return self.view().state

    def add_task(self, task_id: str, command_line: str, **fields: Any) -> None:
        self.add_tasks([TaskSpec(task_id, command_line, **fields)])

    def add_tasks(self, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> int:
        """Validate and store tasks in one transaction (all or nothing)."""
        return self._batch.service.add_tasks(self.id, tasks)

    def preparation_and_release(self) -> dict[str, Any]:
        """Its preparation and release tasks and, per node, how each ran there."""
        return self._batch.service.job_task_status(self.id)

    def counts(self) -> dict[str, int]:
        return self._batch.service.job_counts(self.id)

    def tasks(self, state: str | None = None, *, filter: str | None = None,
              page_size: int = 1000) -> TaskList:
        """The job's tasks (of ``state``, matching ``filter``: see :meth:`query`), read
        page by page as they are iterated; ``list(job.tasks())`` for a list."""
        return TaskList(self._batch, self.id, state, filter, page_size)

    def query(self, filter: str | None = None, *, select: Sequence[str] | None = None,
              max_results: int = 1000, continuation: str | None = None) -> Page:
        """One page of the job's tasks: ``filter`` in Batch's $filter style
        (``state eq 'completed' and exit_code ne 0``, ``startswith(id,'sim-')``,
        ``node_id eq 'n3'``, ``started_at gt '2024-05-01T00:00:00Z'``, with and/or/not
        and parentheses), ``select`` the fields each item holds, at most
        ``max_results`` (up to 1000) items; pass ``page.continuation`` back for the
        next page (None after the last)."""
        return self._batch.service.query_tasks(self.id, filter=filter, select=select,
                                               max_results=max_results,
                                               continuation=continuation)

    def task(self, task_id: str) -> Task:
        return Task(self._batch, self._batch.service.get_task(self.id, task_id))

    def results(self, timeout_s: float | None = None) -> list[Any]:
        """The results of the durable executor calls recorded in this job, in call
        order, waiting for those still running (a call's exception is raised)."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        return [f.result(None if end is None else max(0.0, end - time.monotonic()))
                for f in self._batch.futures(self.id)]

    def terminate_task(self, task_id: str) -> None:
        self._batch.service.terminate_task(self.id, task_id)

    def done(self) -> bool:
        c = self.counts()
        return c["completed"] == c["total"]

    def wait(self, timeout_s: float | None = None, progress: bool = False,
             poll_s: float | None = None,
             on_waiting: Callable[[str], None] | None = None) -> dict[str, int]:
        """Block until every task is completed; return the counts.

        Raises TimeoutError after ``timeout_s``, HpcBatchError when the pool has had no
        usable node for ``pool_grace_s``. With ``progress=True`` a rich progress bar
        shows completed/total, failures and retries. (``poll_s`` is ignored: waits wake
        on the store's changes.) ``on_waiting(text)`` is told what a multi-instance task
        of the job waits for ('task t: waiting for 3 nodes of pool P; node2 runs job/task')
        each time that changes ('' once nothing waits); the progress bar shows it too."""
        bar = _ProgressBar(self.id) if progress else None
        tell = on_waiting
        if bar is not None:
            def tell(text: str) -> None:
                bar.waiting(text)
                if on_waiting is not None:
                    on_waiting(text)
        try:
            return self._batch.service.wait_job(self.id, timeout_s=timeout_s,
                                                on_progress=bar.update if bar else None,
                                                on_waiting=tell)
        finally:
            if bar:
                bar.close()


class _ProgressBar:
    def __init__(self, job_id: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            transient=False)
        self.task = self.progress.add_task(job_id, total=None, detail="")
        self.progress.start()

    def waiting(self, text: str) -> None:
        if text:  # printed above the bar, whole (the bar's line is too narrow for it)
            self.progress.console.print(text, markup=False, soft_wrap=True)

    def update(self, c: dict[str, int]) -> None:
        detail = (f"running {c['running']}  preparing {c['preparing']}  failed {c['failed']}"
                  f"  retries {c['retries']}")
        self.progress.update(self.task, total=c["total"], completed=c["completed"],
                             detail=detail)

    def close(self) -> None:
        self.progress.stop()


class Jobs:
    def __init__(self, batch: Batch):
        self._batch = batch

    def create(self, job_id: str, pool: str = LOCAL_POOL, *, priority: int = 0,
               on_all_tasks_complete: str = "no_action", max_task_retry_count: int = 0,
               preparation_task: Any = None, release_task: Any = None) -> Job:
        """``preparation_task`` / ``release_task``: a JobPreparationTask / JobReleaseTask
        or a mapping of their fields (``{"command_line": ...}``)."""
        self._batch.service.create_job(job_id, pool, priority=priority,
                                       on_all_tasks_complete=on_all_tasks_complete,
                                       max_task_retry_count=max_task_retry_count,
                                       preparation_task=preparation_task,
                                       release_task=release_task)
        return Job(self._batch, job_id)

    def get(self, job_id: str) -> Job:
        self._batch.service.get_job(job_id)
        return Job(self._batch, job_id)

    def list(self, *, counts: bool = False, filter: str | None = None) -> list[JobView]:
        """The jobs, oldest first (``filter``: those that match, e.g. ``state eq
        'active' and priority gt 0``)."""
        if filter is None:
            return self._batch.service.list_jobs(counts=counts)
        out, token = [], None
        while True:
            page = self.query(filter, continuation=token)
            out += [JobView.from_dict({**item, "counts": item.get("counts") if counts
                                       else None}) for item in page.items]
            token = page.continuation
            if token is None:
                return out

    def query(self, filter: str | None = None, *, select: Sequence[str] | None = None,
              max_results: int = 1000, continuation: str | None = None) -> Page:
        """One page of the jobs (fields: id, pool_id, state, priority, created_at,
        completed_at ...; items carry their task counts); like :meth:`Job.query`."""
        return self._batch.service.query_jobs(filter=filter, select=select,
                                              max_results=max_results,
                                              continuation=continuation)

    def delete(self, job_id: str) -> list[str]:
        """Delete a finished job, its tasks and their directories on every node of its
        pool. Returns one line per node whose files could not be removed."""
        return self._batch.service.delete_job(job_id)


class Pools:
    def __init__(self, batch: Batch):
        self._batch = batch

    def create(self, pool_id: str, provider: str = "local", **options: Any) -> PoolView:
        """Create a pool and start its nodes.

        Options: ``task_slots_per_node``, ``scheduling_policy`` ("pack"/"spread"),
        ``target_nodes`` (local pools), ``start_task``. ``provider="ssh"`` takes
        ``spec`` (a pool.json) or ``hostlist`` (``node[01-16]``) plus ``user``, ``key``,
        ``known_hosts``, ``ssh_config``, ``port``, ``python``, ``node_root``,
        ``authorized_keys``, ``inter_node_communication`` (default on) and
        ``trust_on_first_use``; every host is contacted once first (host key checked
        strictly) and nothing is stored unless all of them answer. ``provider="slurm"``
        (nodes held as Slurm allocations) takes ``partition``, ``account``,
        ``nodes_per_allocation``, ``walltime``, ``sbatch_args``, ``python``,
        ``node_root``; its ``target_nodes`` defaults to 0."""
        return self._batch.service.create_pool(pool_id, provider, **options)

    def get(self, pool_id: str) -> PoolView:
        return self._batch.service.get_pool(pool_id)

    def delete(self, pool_id: str) -> list[str]:
        """Stop the pool's agents and delete it (it must have no jobs). An SSH pool's
        inter-node key is taken out of every node's authorized_keys. Returns one line
        per node where clean-up failed."""
        return self._batch.service.delete_pool(pool_id)

    def list(self) -> list[PoolView]:
        return self._batch.service.list_pools()

    def resize(self, pool_id: str, target_nodes: int, *,
               deallocation: str = "requeue") -> PoolView:
        """Grow or shrink the pool to ``target_nodes`` (0 and up). A node that leaves
        first takes no new work; its running tasks are then killed and requeued
        ("requeue"), killed and completed as failed ("terminate"), or left to finish
        ("task_completion"; "retained_data" also keeps its task directories, which the
        other options remove once it is gone). An SSH pool's host list is its capacity:
        the first ``target_nodes`` hosts are in, the others drained and left idle."""
        return self._batch.service.resize_pool(pool_id, target_nodes,
                                               deallocation=deallocation)

    def enable_autoscale(self, pool_id: str, formula: str, *,
                         interval_s: float | str = 30.0) -> PoolView:
        """Size the pool by an autoscale formula (see :mod:`hpcbatch.autoscale`),
        evaluated at once and then every ``interval_s`` (or '30s', '5m')."""
        return self._batch.service.enable_autoscale(pool_id, formula, interval_s=interval_s)

    def disable_autoscale(self, pool_id: str) -> PoolView:
        return self._batch.service.disable_autoscale(pool_id)

    def evaluate_autoscale(self, pool_id: str, formula: str) -> dict[str, Any]:
        """A dry run: {'target_nodes', 'deallocation', 'variables'}; the pool is
        unchanged. FormulaError (a ValidationError naming line:col) when it fails."""
        return self._batch.service.evaluate_autoscale(pool_id, formula)

    def nodes(self, pool_id: str | None = None) -> list[NodeView]:
        """The nodes (of one pool, or all), as last recorded; ``n["state"]`` and
        ``n.state`` both read."""
        return self._batch.service.list_nodes(pool_id)


RETRY_COORDINATOR_S = 1.0  # a lazy service beside another coordinator tries again this often


class _Elsewhere:
    """Stands in for the coordinator of a lazy embedded service while another process's
    coordinator owns the home: new work is left to that one (it looks for work stored by
    others), and commands that need this process's own coordinator raise."""

    error = None
    requeued_at_start = 0

    def __init__(self, why: str):
        self.why = why

    def notify(self) -> None:
        pass  # the other coordinator finds the new work on its own

    def stop(self, *_: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        import concurrent.futures

        def refused(*_: Any) -> concurrent.futures.Future:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(CoordinatorBusy(self.why))
            return fut
        return refused


class _EmbeddedService(LocalService):
    """The service of an embedded ``Batch``: a LocalService whose coordinator starts at
    the first use of ``coordinator`` (a write, a wait, a command: reads never ask for
    it). When another coordinator owns the home it is an :class:`_Elsewhere`, and
    starting our own is tried again at most every RETRY_COORDINATOR_S (that one may
    finish first, and then ours runs what is left)."""

    def __init__(self, home: str | os.PathLike | None, *, local_slots: int | None,
                 prefetch: int | None, timings: Timings):
        self._coordinator: Any = None
        self._elsewhere: _Elsewhere | None = None
        self._next_try = 0.0
        self._start_lock = threading.Lock()
        self._closing = False
        self._prefetch = prefetch
        super().__init__(home, timings=timings)
        try:
            if local_slots is not None:
                self._ensure_local_pool(local_slots)
        except BaseException:
            self.store.close()
            raise

    @property
    def coordinator(self) -> Any:
        c = self._coordinator
        if c is not None or self._closing:
            return c
        if self._elsewhere is not None and time.monotonic() < self._next_try:
            return self._elsewhere
        from hpcbatch.service import _start_coordinator
        with self._start_lock:
            if self._coordinator is None and not self._closing:
                try:
                    self._coordinator = _start_coordinator(self.home, self.timings,
                                                           self._prefetch)
                    self._elsewhere = None
                except CoordinatorBusy as exc:
                    self._elsewhere = _Elsewhere(str(exc))
                    self._next_try = time.monotonic() + RETRY_COORDINATOR_S
            return self._coordinator or self._elsewhere

    @coordinator.setter
    def coordinator(self, value: Any) -> None:
        self._coordinator = value

    @property
    def own_coordinator(self) -> Any:
        """This process's coordinator (started if it can be), or None."""
        c = self.coordinator
        return None if isinstance(c, _Elsewhere) else c

    def _need_own(self) -> None:
        c = self.coordinator
        if isinstance(c, _Elsewhere):
            raise CoordinatorBusy(c.why)

    @contextlib.contextmanager
    def _exclusive(self):
        self._need_own()
        with super()._exclusive():
            yield

    def create_pool(self, pool_id: str, provider: str = "local", **kw: Any) -> PoolView:
        self._need_own()  # before anything is stored: the other would not start it
        return super().create_pool(pool_id, provider, **kw)

    def close(self) -> None:
        self._closing = True
        super().close()


class _ClosedService:
    """Stands in for the service of a closed Batch: any use says so in one line."""

    coordinator = None
    requeued_at_start = 0

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise HpcBatchError("this hpcbatch.Batch is closed; open a new one (or use it in a "
                            "'with' block) to reach its jobs and tasks")


_TIMING_FIELDS = ("heartbeat_s", "node_timeout_s", "lease_s", "reconnect_min_s",
                  "reconnect_max_s", "pool_grace_s", "kill_grace_s", "work_poll_s")


class Batch:
    """The API to drive a coordinator: embedded in this process (started when first
    needed), or a running ``hpcbatch serve`` at ``url``."""

    def __init__(self, home: str | os.PathLike | None = None, *, url: str | None = None,
                 key: str | None = None,
                 local_slots: int | None = None, prefetch: int | None = None,
                 timings: Timings | None = None, heartbeat_s: float | None = None,
                 node_timeout_s: float | None = None, lease_s: float | None = None,
                 reconnect_min_s: float | None = None, reconnect_max_s: float | None = None,
                 pool_grace_s: float | None = None, kill_grace_s: float | None = None,
                 work_poll_s: float | None = None, service: Service | None = None):
        """``prefetch``: at most this many tasks per slot a node's agent may hold queued,
        so the next short task starts without a round trip (the queue holds about 20 ms
        of work, judged from the pool's recent task durations: long tasks get none;
        None: the coordinator's default, 16). A higher-priority task submitted later can
        wait behind these; 0 gives strict priority order at some throughput.

        ``timings`` (or the keywords ``heartbeat_s=`` ... ``work_poll_s=``, which
        replace single fields of it) sets the coordinator's and agents' clocks; see
        :class:`hpcbatch.timings.Timings`. ``service``: talk to that service instead of
        starting a coordinator here.

        ``url`` and ``key``: use the ``hpcbatch serve`` there (``https://`` with TLS; a
        self-signed certificate is trusted through ``HPCBATCH_CAFILE`` or the home's
        ``service.json``). Without a url, ``HPCBATCH_URL``/``HPCBATCH_KEY`` or the
        ``service.json`` of a live service in the home are used; only without any of
        them does the coordinator run here. With a service, ``local_slots``,
        ``prefetch`` and the timings are the service's own (only ``pool_grace_s`` is
        used here: how long ``Job.wait`` bears a pool with no usable node)."""
        given = {k: v for k, v in (
            ("heartbeat_s", heartbeat_s), ("node_timeout_s", node_timeout_s),
            ("lease_s", lease_s), ("reconnect_min_s", reconnect_min_s),
            ("reconnect_max_s", reconnect_max_s), ("pool_grace_s", pool_grace_s),
            ("kill_grace_s", kill_grace_s), ("work_poll_s", work_poll_s)) if v is not None}
        if timings is None:
            timings = Timings(pool_grace_s=POOL_DEAD_GRACE_S)
        elif not isinstance(timings, Timings):
            raise ValidationError("timings", f"must be a hpcbatch.timings.Timings, not "
                                  f"{type(timings).__name__}")
        self.timings = timings.replace(**given) if given else timings
        if service is None:
            from hpcbatch.remote import connect
            service = connect(url, key, home=home, pool_grace_s=self.timings.pool_grace_s)
            if service is None and key is not None:
                raise ValidationError("key", "was given without a url, and no running "
                                      "service was found (give url=..., or set "
                                      "HPCBATCH_URL)")
        if service is not None:
            self.home = None
            self._service = service
        else:
            self._service = _EmbeddedService(home, local_slots=local_slots,
                                             prefetch=prefetch, timings=self.timings)
            self.home = self._service.home
        self.pools = Pools(self)
        self.jobs = Jobs(self)
        from hpcbatch.storage_api import StorageClient
        self.storage = StorageClient(self)
        from hpcbatch.apps import Apps
        self.apps = Apps(self)  # application packages

    @property
    def service(self) -> Service:
        return self._service

    @property
    def coordinator(self) -> Any:
        """The embedded coordinator, started if it was not yet (None for a remote
        service, or while another process's coordinator owns the home)."""
        if isinstance(self._service, _EmbeddedService):
            return self._service.own_coordinator
        return getattr(self._service, "coordinator", None)

    @property
    def url(self) -> str | None:
        """The service's URL (None: embedded)."""
        return getattr(self._service, "url", None)

    @property
    def requeued_at_start(self) -> int:
        """Tasks found in flight when this coordinator started (they run again)."""
        return self._service.requeued_at_start

    def run_kernel(self, kernel: Any, *, ranks: int | None = None,
                   params: dict[str, Any] | None = None, output: str | os.PathLike | None = None,
                   **kw: Any):
        """Run an MPI kernel with its reduce and return its result file, read back.

        ``batch.run_kernel("pi", ranks=4, params={"samples": 10**7}, output="pi.h5")``
        returns a ``KernelResult`` with ``.reduced`` (dict of arrays; ``res["pi"]`` too),
        ``.path``, ``.timings`` and ``.attrs`` (provenance). ``kernel`` may be a built-in
        name, a dotted module or a path to a .py file, or a Python function
        ``fn(comm, **params)`` returning a dict on every rank, with
        ``outputs={name: reduce}`` (sum, prod, min, max, mean, concat, gather, or
        f(a, b) -> c): ``batch.run_kernel(lambda comm: {"n": comm.rank}, ranks=2,
        outputs={"n": "sum"})``. Other keywords: ``pool``,
        ``nodes`` + ``ranks_per_node`` (multi-node), ``oversubscribe``,
        ``progress``, ``timeout_s``, ``retries``. Raises ``KernelRunError`` (with the
        ranks' stderr, and for a rank that raised its ``traceback``) when it fails.
        """
        from hpcbatch.kernelrun import run_kernel
        return run_kernel(self, kernel, ranks=ranks, params=params, output=output, **kw)

    def executor(self, pool: str = LOCAL_POOL, workers_per_node: int | None = None,
                 job: str | None = None, *, durable: bool = False, **kw: Any):
        """A ``concurrent.futures.Executor`` whose workers are tasks of ``job`` on
        ``pool`` (see :mod:`hpcbatch.executor`; ``durable=True``: every call is a stored
        task whose result outlives this process, see :mod:`hpcbatch.durable`)."""
        if durable:
            from hpcbatch.durable import DurableExecutor
            return DurableExecutor(self, pool, job, **kw)
        from hpcbatch.executor import PoolExecutor
        return PoolExecutor(self, pool, workers_per_node, job, **kw)

    def futures(self, job: str) -> list:
        """The futures of a durable executor's calls in ``job``, in call order: each
        resolves when its call's task has completed (also in a new process)."""
        from hpcbatch.durable import futures
        return futures(self, job)

    def close(self) -> None:
        service, self._service = self._service, _ClosedService()
        service.close()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Batch", "Job", "Jobs", "Pools", "Task", "TaskList", "TaskSpec", "JobSpec", "PoolSpec",
           "ValidationError", "NotFound", "check_id"]
