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
import dataclasses
import json
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcbatch import env as E
from hpcbatch.errors import Conflict, CoordinatorBusy, HpcBatchError, NotFound, ValidationError
from hpcbatch.home import default_home
from hpcbatch.models import (
    JOB_PREPARATION_ID,
    JOB_TASK_IDS,
    JobSpec,
    PoolSpec,
    TaskSpec,
    check_id,
)
from hpcbatch.storage_api import LocalStorageMethods
from hpcbatch.timings import Timings
from hpcbatch.views import (
    AddResult,
    AttemptView,
    FileView,
    JobView,
    NodeView,
    Page,
    PoolView,
    RunView,
    TaskError,
    TaskView,
)

LOCAL_POOL = "local"
COMMAND_TIMEOUT_S = 30.0  # a coordinator command not confirmed within this raises
POOL_CHECK_S = 2.0  # how often wait_job looks at the pool's nodes
PROGRESS_EVERY_S = 0.2  # wait_job reports progress at most this often
MIN_GAP_S, MAX_GAP_S = 0.002, 0.05  # wait_job looks at a job at most this often
TASK_FILES = ("stdout.txt", "stderr.txt")
FOLLOW_POLL_S = 0.25  # follow_task_file looks for new bytes this often
FOLLOW_CHUNK = 1 << 20  # and reads at most this much at a time
RUN_ID = re.compile(r"run-[A-Za-z0-9_-]{1,80}")
SHA256 = re.compile(r"[0-9a-f]{64}")


def task_file_name(name: Any) -> str:
    """A path relative to a task directory, normalised; ``..``, absolute paths, empty
    names and NUL are refused (ValidationError naming the path)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValidationError("path", f"{name!r} is not a file of a task directory (such "
                              f"as {' or '.join(TASK_FILES)})")
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm in (".", "..") or norm.startswith("../"):
        raise ValidationError("path", f"{name!r} is not inside the task directory; give a "
                              f"path relative to it (such as {TASK_FILES[0]})")
    return norm


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
                   max_task_retry_count: int = 0, preparation_task: Any = None,
                   release_task: Any = None) -> JobView: ...

    def job_task_status(self, job_id: str) -> dict[str, Any]:
        """The job's preparation and release tasks: their specs and, per node, how each
        ran there (Azure Batch's preparation and release task status)."""
        raise NotImplementedError

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
                 on_progress: Callable[[dict[str, int]], None] | None = None,
                 on_waiting: Callable[[str], None] | None = None) -> dict[str, int]:
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

    # ---- list queries (hpcbatch.query: the filter language, select, tokens) ----

    @abc.abstractmethod
    def query_tasks(self, job_id: str, *, filter: str | None = None,
                    select: Sequence[str] | None = None, max_results: int = 1000,
                    continuation: str | None = None) -> Page:
        """One page (at most ``max_results``, 1 to 1000) of the job's tasks that match
        ``filter`` (``state eq 'completed' and exit_code ne 0``, ``startswith(id,'sim-')``:
        see hpcbatch.query), in submission order, each item a dict of the ``select``ed
        TaskView fields (all when None). ``continuation``: the previous page's token.
        A bad filter, field, size or token is a ValidationError naming it."""

    @abc.abstractmethod
    def query_jobs(self, *, filter: str | None = None, select: Sequence[str] | None = None,
                   max_results: int = 1000, continuation: str | None = None) -> Page:
        """One page of the jobs (oldest first), each item a dict of JobView fields with
        its task counts; like query_tasks."""

    def iter_tasks(self, job_id: str, *, filter: str | None = None,
                   select: Sequence[str] | None = None, page_size: int = 1000
                   ) -> Iterator[dict[str, Any]]:
        """Every task of the job that matches, page by page (one page held at a time;
        ``page_size`` above 1000 reads 1000 at a time)."""
        token = None
        size = min(page_size, 1000) if isinstance(page_size, int) else page_size
        while True:
            page = self.query_tasks(job_id, filter=filter, select=select,
                                    max_results=size, continuation=token)
            yield from page.items
            token = page.continuation
            if token is None:
                return

    @abc.abstractmethod
    def add_task_collection(self, job_id: str, tasks: Iterable[TaskSpec | Mapping[str, Any]],
                            *, atomic: bool = True) -> AddResult:
        """Add many tasks in one transaction, read and inserted in chunks (bounded
        memory). ``atomic``: all or nothing, the first bad task's error raised; else the
        valid ones are stored and each bad one is reported (a TaskError: its index, id,
        error kind, message and field), as Batch's addCollection does."""

    @abc.abstractmethod
    def task_attempts(self, job_id: str, task_id: str) -> list[AttemptView]: ...

    @abc.abstractmethod
    def terminate_task(self, job_id: str, task_id: str) -> None:
        """Stop the task (its current attempt is its last); returns once the
        coordinator has taken the request."""

    @abc.abstractmethod
    def read_task_file(self, job_id: str, task_id: str, name: str, *, offset: int = 0,
                       length: int | None = None, node: str | None = None) -> bytes:
        """A file of the task's latest attempt (``name`` relative to its directory, such
        as stdout.txt), from its node, from byte ``offset``, at most ``length`` bytes.
        ``..``, absolute paths and symbolic links out of the directory are refused.
        ``node``: the task's directory on that node of its pool instead (a
        multi-instance task's other instances: coordination-stderr.txt)."""

    @abc.abstractmethod
    def list_task_files(self, job_id: str, task_id: str, *,
                        node: str | None = None) -> list[FileView]:
        """The files of the task's latest attempt's directory (on ``node``: that node's
        copy of it), recursively."""

    def follow_task_file(self, job_id: str, task_id: str, name: str, *, offset: int = 0,
                         poll_s: float = FOLLOW_POLL_S,
                         node: str | None = None) -> Iterator[bytes]:
        """The file's bytes from ``offset`` as they are written, until the task has
        completed and everything it wrote was read (``tail -f`` that ends). Waits for a
        task that has not started yet."""
        while True:
            task = self.get_task(job_id, task_id)
            if task.state == "completed" or (task.task_dir and task.node_id):
                break
            self.wait_for_change(self.change_counter(), poll_s * 4)
        while True:
            done = self.get_task(job_id, task_id).state == "completed"
            try:
                data = self.read_task_file(job_id, task_id, name, offset=offset,
                                           length=FOLLOW_CHUNK, node=node)
            except NotFound:
                if done:
                    return
                data = b""
            if data:
                offset += len(data)
                yield data
                continue
            if done:
                return
            time.sleep(poll_s)

    # ---- changes -----------------------------------------------------------

    @abc.abstractmethod
    def change_counter(self) -> int:
        """A number that grows whenever the store changes (any job, task or node)."""

    @abc.abstractmethod
    def wait_for_change(self, after: int, timeout_s: float) -> int:
        """Block until change_counter() > ``after`` or ``timeout_s`` passed; returns it."""

    # ---- kernel runs -------------------------------------------------------

    @abc.abstractmethod
    def start_run(self, kernel: str | None, *, ranks: int | None = None,
                  params: Mapping[str, Any] | list[str] | None = None,
                  pool: str = LOCAL_POOL, nodes: int | None = None,
                  ranks_per_node: int = 1, oversubscribe: bool = False,
                  timeout_s: float | None = None, retries: int = 0,
                  compress: bool = False, function: str | None = None) -> RunView:
        """Submit a kernel run (its own job of one task) and return at once; its result
        file is written in the service's home (``read_run_result``); ``compress``: its
        datasets gzipped. ``function``: instead of a kernel, the SHA-256 of an uploaded
        packed function (``upload("function.pkl", ...)``; its params travel in it)."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunView:
        """A kernel run: its state, and once it succeeded its reduced values and
        provenance; its error when it failed."""

    @abc.abstractmethod
    def read_run_result(self, run_id: str) -> bytes:
        """The run's HDF5 result file."""

    @abc.abstractmethod
    def list_runs(self) -> list[RunView]:
        """Every kernel run whose job is still there, oldest first."""

    # ---- files a client sends ---------------------------------------------

    @abc.abstractmethod
    def upload(self, name: str, chunks: Iterable[bytes], sha256: str) -> str:
        """Store a client's file (its bytes in ``chunks``, their SHA-256 ``sha256``) where
        the service can read it; returns the path a ResourceFile.source names."""

    # ---- application packages (hpcbatch.apps) ------------------------------

    def upload_app(self, name: str, version: str, archive: str | os.PathLike, *,
                   default: bool = False) -> Any:
        """Check and keep a .zip/.tar.gz (a path on the caller's machine) as NAME VERSION."""
        raise NotImplementedError

    def list_apps(self, name: str | None = None) -> list[Any]:
        raise NotImplementedError

    def delete_app(self, name: str, version: str | None = None) -> list[str]:
        raise NotImplementedError

    def set_default_app(self, name: str, version: str) -> Any:
        raise NotImplementedError

    # ---- service operations: pool size, node scheduling, job terminate, task
    # ---- reactivate and delete

    @abc.abstractmethod
    def resize_pool(self, pool_id: str, target_nodes: int, *,
                    deallocation: str = "requeue") -> PoolView:
        """Change the pool's target size (0 and up): nodes are added, or (shrinking) nodes
        leave: they stop taking work, then what runs there goes as ``deallocation``
        says: 'requeue' (killed, requeued: not a retry), 'terminate' (killed, completed
        as killed:terminate), 'taskcompletion' (left to finish) or 'retaineddata' (left
        to finish, and the node's task directories kept; the other options remove them
        once it is gone). With the last two a node of a running multi-instance task goes
        last and only once that task has ended. An SSH pool's host list is its
        capacity: a smaller target takes the first hosts in and leaves the others idle;
        a larger one is refused. A pool that autoscales is refused (disable it first)."""

    @abc.abstractmethod
    def enable_autoscale(self, pool_id: str, formula: str, *,
                         interval_s: float = 30.0) -> PoolView:
        """Size the pool by an autoscale formula (hpcbatch.autoscale), evaluated at once
        and then every ``interval_s`` (1 s .. 7 days) by the coordinator. The formula is
        checked first (a FormulaError naming line:col, nothing changed)."""

    @abc.abstractmethod
    def disable_autoscale(self, pool_id: str) -> PoolView:
        """Stop autoscaling the pool; it keeps the size it has."""

    @abc.abstractmethod
    def evaluate_autoscale(self, pool_id: str, formula: str) -> dict[str, Any]:
        """A dry run over the pool's samples (with no coordinator: its counts now):
        {'target_nodes', 'deallocation', 'variables'}; the pool is unchanged. A
        FormulaError (line:col) when the formula does not parse or evaluate."""

    @abc.abstractmethod
    def disable_node_scheduling(self, pool_id: str, node_id: str, *,
                                running: str = "taskcompletion") -> NodeView:
        """Nothing new is placed on the node (its info says 'scheduling': 'disabled');
        its running tasks are killed and requeued (not counted as retries: 'requeue'),
        killed and completed as failed ('terminate', killed:terminate), or left to finish
        ('taskcompletion'). Kept across coordinator restarts."""

    @abc.abstractmethod
    def enable_node_scheduling(self, pool_id: str, node_id: str) -> NodeView:
        """The node takes work again."""

    @abc.abstractmethod
    def remove_node(self, pool_id: str, node_id: str, *, running: str = "requeue") -> None:
        """The node leaves the pool: its tasks are handled as ``running`` says (as for
        disable_node_scheduling), then its agent stops and its record goes. A local pool
        is one node smaller; an SSH pool's host list loses the host. Returns once the
        coordinator has taken it (the node shows 'leaving' until its tasks are done)."""

    @abc.abstractmethod
    def terminate_job(self, job_id: str) -> JobView:
        """Its tasks that have not started complete as failed (killed:terminate), the
        running ones are killed (and complete so); the job completes, and no tasks can
        be added to it. A completed job is a Conflict."""

    @abc.abstractmethod
    def reactivate_task(self, job_id: str, task_id: str) -> TaskView:
        """A failed completed task runs again: active, its retry count 0, its attempts
        kept; a completed job is reopened. Anything else is a Conflict naming its state."""

    @abc.abstractmethod
    def delete_task(self, job_id: str, task_id: str) -> None:
        """Terminate the task if it has not completed, then remove its record, its
        attempts and its task directories on the nodes."""

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


def pool_view(spec: PoolSpec, nodes: Iterable[Mapping[str, Any]], home: Path,
              autoscale: Mapping[str, Any] | None = None,
              events: Sequence[Mapping[str, Any]] = ()) -> PoolView:
    from hpcbatch.providers import provider_for
    states: dict[str, int] = {}
    for n in nodes:
        states[n["state"]] = states.get(n["state"], 0) + 1
    try:
        provider = provider_for(spec, home)
        where, notes, python = provider.where(), tuple(provider.notes()), provider.node_python
    except HpcBatchError as exc:  # a stored config this version cannot read: say so
        where, notes, python = "?", (f"provider config: {exc}",), ""
    if spec.application_package_references:  # (pool show prints the notes)
        notes += ("application packages: " + ", ".join(
            r.label for r in spec.application_package_references),)
    return PoolView(spec.id, spec.provider, spec.task_slots_per_node, spec.scheduling_policy,
                    spec.target_nodes, spec.start_task, spec.inter_node_communication,
                    dict(spec.provider_config), states, where, notes, python,
                    autoscale, tuple(events))


class LocalService(LocalStorageMethods, Service):
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
                    target_nodes: int | None = None, start_task: str | None = None,
                    inter_node_communication: bool | None = None,
                    trust_on_first_use: bool = False, **provider_options: Any) -> PoolView:
        from hpcbatch.providers import provider_class, provider_for
        check_id("pool", pool_id)
        with contextlib.suppress(NotFound):
            self.store.get_pool(pool_id)
            raise Conflict(f"pool {pool_id!r} already exists; pick another id")
        app_refs = provider_options.pop("application_package_references", None)
        if target_nodes is not None:  # (else the provider's default: 1, a Slurm pool 0)
            provider_options["target_nodes"] = target_nodes
        spec = provider_class(provider).make_spec(
            pool_id, task_slots_per_node=task_slots_per_node,
            scheduling_policy=scheduling_policy,
            start_task=start_task, inter_node_communication=inter_node_communication,
            **provider_options)
        if app_refs:
            spec = dataclasses.replace(spec, application_package_references=app_refs)
            self._apps().check_refs("pool.application_package_references",
                                    spec.application_package_references)
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
        return pool_view(spec, self.store.list_nodes(pool_id), self.home,
                         self._autoscale_of(pool_id), self.store.pool_events(pool_id))

    def _autoscale_of(self, pool_id: str) -> dict[str, Any] | None:
        row = self.store.get_autoscale(pool_id)
        return None if row is None else {k: row[k] for k in ("formula", "interval_s",
                                                            "enabled_at")}

    def list_pools(self) -> list[PoolView]:
        nodes: dict[str, list] = {}
        for n in self.store.list_nodes():
            nodes.setdefault(n["pool_id"], []).append(n)
        scaled = {r["pool_id"]: r for r in self.store.list_autoscale()}
        return [pool_view(p, nodes.get(p.id, []), self.home,
                          {k: scaled[p.id][k] for k in ("formula", "interval_s", "enabled_at")}
                          if p.id in scaled else None)
                for p in self.store.list_pools()]

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
                   max_task_retry_count: int = 0, preparation_task: Any = None,
                   release_task: Any = None) -> JobView:
        spec = JobSpec(job_id, pool_id, priority=priority,
                       on_all_tasks_complete=on_all_tasks_complete,
                       max_task_retry_count=max_task_retry_count,
                       preparation_task=preparation_task, release_task=release_task)
        check_job_task_files(spec)
        self.store.create_job(spec)
        return self.get_job(job_id)

    def job_task_status(self, job_id: str) -> dict[str, Any]:
        spec = self.store.get_job(job_id)["spec"]
        return {"job_id": job_id,
                "preparation_task": None if spec.preparation_task is None else
                dataclasses.asdict(spec.preparation_task),
                "release_task": None if spec.release_task is None else
                dataclasses.asdict(spec.release_task),
                "nodes": self.store.job_tasks(job_id)}

    def get_job(self, job_id: str) -> JobView:
        return JobView.from_row(self.store.get_job(job_id))

    def list_jobs(self, *, counts: bool = False) -> list[JobView]:
        kept = self.store.all_task_counts() if counts else {}  # one read, not one per job
        return [JobView.from_row(r, (kept.get(r["id"]) or self.store.task_counts(r["id"]))
                                 if counts else None)
                for r in self.store.list_jobs()]

    def delete_job(self, job_id: str) -> list[str]:
        with self._exclusive():
            spec = self.store.get_pool(self.store.get_job(job_id)["pool_id"])
            provider = self._provider(spec)
            nodes = [n.node_id for n in provider.fixed_nodes()]
            nodes += [n["id"] for n in self.store.list_nodes(spec.id)]
            self.store.delete_job(job_id)
            from hpcbatch.collect import forget
            forget(self.home, job_id)  # its kept logs
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

    def waiting(self, job_id: str | None = None) -> list[tuple[str, str, str]]:
        """The multi-instance tasks (of job_id, or all) that wait for busy nodes:
        (job, task, 'waiting for 3 nodes of pool P; node2 runs job/task'). Known to the
        coordinator of this process only (empty without one)."""
        state = getattr(self.coordinator, "state", None)
        if state is None:
            return []
        return sorted(w for w in state.waiting.values() if job_id is None or w[0] == job_id)

    def wait_job(self, job_id: str, *, timeout_s: float | None = None,
                 on_progress: Callable[[dict[str, int]], None] | None = None,
                 on_waiting: Callable[[str], None] | None = None) -> dict[str, int]:
        """Block until the job's tasks are all completed. ``on_waiting`` is told, once
        each time it changes, what a task of the job waits for ('task t: waiting for 3
        nodes of pool P; node2 runs job/task'; '' once it waits no more)."""
        pool_id = self.store.get_job(job_id)["pool_id"]
        said = ""
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
            if on_waiting is not None:
                why = "; ".join(f"task {t}: {w}" for _, t, w in self.waiting(job_id)[:3])
                if why != said:
                    said = why
                    on_waiting(why)
            if on_progress is not None and now >= next_progress:
                on_progress(self.store.task_counts(job_id))
                next_progress = now + PROGRESS_EVERY_S
            if self.store.unfinished(job_id) == 0 and not self.store.job_releasing(job_id):
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
        from hpcbatch.storage_api import containers_checked
        n = self.store.add_tasks(job_id, containers_checked(self.storage,
                                                            self._apps_checked(tasks)))
        self._notify()
        return n

    def add_task_collection(self, job_id: str, tasks: Iterable[TaskSpec | Mapping[str, Any]],
                            *, atomic: bool = True) -> AddResult:
        added, errors = self.store.add_task_collection(job_id, self._apps_checked(tasks),
                                                       atomic=atomic)
        if added:
            self._notify()
        return AddResult(added, tuple(TaskError.from_error(i, task_id, exc)
                                      for i, task_id, exc in errors))

    def submit(self, job: JobSpec, tasks: Iterable[TaskSpec | Mapping[str, Any]], *,
               existing_ok: bool = True) -> int:
        with self.store.transaction():
            pool_id = self.store.job_pool_id(job.id)
            if pool_id is None:
                check_job_task_files(job)
                self.store.create_job(job)
            elif not existing_ok:
                raise Conflict(f"job {job.id!r} already exists; pick another job id")
            elif pool_id != job.pool_id:
                raise ValidationError("pool", f"job {job.id!r} exists on pool {pool_id!r}, "
                                      f"not {job.pool_id!r}")
            from hpcbatch.storage_api import containers_checked
            n = self.store.add_tasks(job.id, containers_checked(self.storage,
                                                                self._apps_checked(tasks)))
        self._notify()
        return n

    # ---- application packages --------------------------------------------

    def _apps(self) -> Any:
        from hpcbatch.apps import AppStore
        return AppStore(self.home)

    def _apps_checked(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """The tasks, each that names application packages checked against the stored
        ones (a missing one is a ValidationError naming the task, before anything is
        stored)."""
        from hpcbatch.apps import AppRef
        store, seen = None, set()
        for t in tasks:
            refs = (t.application_package_references if isinstance(t, TaskSpec) else
                    t.get("application_package_references") if isinstance(t, Mapping)
                    else None)
            if refs:
                tid = t.id if isinstance(t, TaskSpec) else t.get("id")
                field = f"task {tid}: application_package_references"
                todo = [r for r in AppRef.check_list(field, refs) if r not in seen]
                if todo:
                    store = store or self._apps()
                    store.check_refs(field, todo)
                    seen.update(todo)
            yield t

    def upload_app(self, name: str, version: str, archive: str | os.PathLike, *,
                   default: bool = False) -> Any:
        return self._apps().upload(name, version, archive, default=default)

    def list_apps(self, name: str | None = None) -> list[Any]:
        return self._apps().list(name)

    def delete_app(self, name: str, version: str | None = None) -> list[str]:
        from hpcbatch.apps import refuse_if_used
        refuse_if_used(self._apps(), self.store.list_pools(), name, version)
        return self._apps().delete(name, version)

    def set_default_app(self, name: str, version: str) -> Any:
        return self._apps().set_default(name, version)

    def get_task(self, job_id: str, task_id: str) -> TaskView:
        return TaskView.from_row(self.store.get_task(job_id, task_id))

    def list_tasks(self, job_id: str, state: str | None = None, *, failed: bool = False,
                   limit: int | None = None) -> list[TaskView]:
        self.store.get_job(job_id)
        if failed:
            rows = self.store.list_tasks(job_id, "completed", limit, result="failure")
        else:
            rows = self.store.list_tasks(job_id, state, limit)
        return [TaskView.from_row(r) for r in rows]

    def query_tasks(self, job_id: str, *, filter: str | None = None,
                    select: Sequence[str] | None = None, max_results: int = 1000,
                    continuation: str | None = None) -> Page:
        from hpcbatch.query import task_page
        return task_page(self.store, job_id, filter=filter, select=select,
                         max_results=max_results, continuation=continuation)

    def query_jobs(self, *, filter: str | None = None, select: Sequence[str] | None = None,
                   max_results: int = 1000, continuation: str | None = None) -> Page:
        from hpcbatch.query import job_page
        return job_page(self.store, filter=filter, select=select, max_results=max_results,
                        continuation=continuation)

    def task_attempts(self, job_id: str, task_id: str) -> list[AttemptView]:
        return [AttemptView.from_row(job_id, task_id, r)
                for r in self.store.attempts(job_id, task_id)]

    def terminate_task(self, job_id: str, task_id: str) -> None:
        self.store.get_task(job_id, task_id)
        if self.coordinator is None:
            raise HpcBatchError(f"no coordinator runs here to terminate {job_id}/{task_id}")
        self._command(f"terminate of task {job_id}/{task_id}", "terminate_task", job_id,
                      task_id)

    # ---- service operations: pool size, node scheduling, job terminate, task
    # ---- reactivate and delete. Through the coordinator when one runs here; with none,
    # ---- in the store, holding the home's lock (the next coordinator goes by it).

    def resize_pool(self, pool_id: str, target_nodes: int, *,
                    deallocation: str = "requeue") -> PoolView:
        from hpcbatch.autoscale import normalize_option
        from hpcbatch.poolops import resized_spec
        deallocation = normalize_option(deallocation)
        if isinstance(target_nodes, bool) or not isinstance(target_nodes, int) or \
                target_nodes < 0:
            raise ValidationError("target_nodes", f"{target_nodes!r} is not a number of "
                                  "nodes >= 0")
        new = resized_spec(self.store.get_pool(pool_id), self.home, target_nodes)
        if self.store.get_autoscale(pool_id) is not None:
            raise Conflict(f"pool {pool_id!r} is sized by its autoscale formula; "
                           f"'hpcbatch pool autoscale disable {pool_id}' first")
        old = self.store.get_pool(pool_id).target_nodes
        if self.coordinator is not None:
            self._command(f"the resize of pool {pool_id!r}", "resize_pool", pool_id,
                          target_nodes, deallocation)
        else:
            with self._exclusive():
                self.store.set_pool_spec(new)
                provider = self._provider(new)
                listed = {d.node_id for d in provider.fixed_nodes()}
                for n in self.store.list_nodes(pool_id):
                    if not provider.elastic and n["id"] not in listed:
                        self.store.delete_node(pool_id, n["id"])
        self.store.record_pool_event(pool_id, "resize", {
            "from": old, "to": target_nodes, "deallocation": deallocation, "by": "resize"},
            None)
        return self.get_pool(pool_id)

    def enable_autoscale(self, pool_id: str, formula: str, *,
                         interval_s: float = 30.0) -> PoolView:
        from hpcbatch.autoscale import check
        from hpcbatch.autoscaling import parse_interval
        self.store.get_pool(pool_id)
        interval_s = parse_interval(interval_s)
        check(formula)
        self.store.set_autoscale(pool_id, formula, interval_s)
        if self.coordinator is None:
            pass  # stored: the next coordinator of this home evaluates it (an embedded
            # Batch has started its own just now, in looking)
        return self.get_pool(pool_id)

    def disable_autoscale(self, pool_id: str) -> PoolView:
        self.store.get_pool(pool_id)
        self.store.clear_autoscale(pool_id)
        return self.get_pool(pool_id)

    def evaluate_autoscale(self, pool_id: str, formula: str) -> dict[str, Any]:
        from hpcbatch.autoscale import parse
        from hpcbatch.autoscaling import Metrics, evaluate_dry
        spec = self.store.get_pool(pool_id)
        parse(formula)
        if self.coordinator is not None:
            fut = self.coordinator.evaluate_autoscale(pool_id, formula)
            try:
                result = fut.result(timeout=self.command_timeout_s)
            except CoordinatorBusy:  # another process's: its counts, from the store
                result = None
            except concurrent.futures.TimeoutError:
                raise HpcBatchError(f"the coordinator did not evaluate the formula within "
                                    f"{self.command_timeout_s:g} s; ask again") from None
            if result is not None:
                return result
        active, active_slots, running, running_slots = self.store.pool_task_slots(pool_id)
        nodes = [n for n in self.store.list_nodes(pool_id)]
        up = [n for n in nodes if n["state"] not in ("offline", "leaving")]
        now = time.time()
        ended = self.store.pool_last_ended(pool_id)
        since = 0.0 if running or ended is None else max(0.0, now - ended)
        m = Metrics(active, running, active_slots, running_slots, len(up),
                    sum(1 for n in up if n["state"] == "idle"), since)
        return evaluate_dry(formula, [(now, m)], 5.0, now, spec.target_nodes)

    def _node_ids(self, spec: PoolSpec) -> list[str]:
        """The pool's nodes: as its provider lists them, and any other recorded (a local
        pool's ids need not be 1..N once a node was removed while it ran)."""
        ids = [d.node_id for d in self._provider(spec).fixed_nodes()]
        return ids + [n["id"] for n in self.store.list_nodes(spec.id) if n["id"] not in ids]

    def _check_node(self, spec: PoolSpec, node_id: str, running: str | None) -> None:
        from hpcbatch.state import RUNNING_OPTIONS
        if running is not None and running not in RUNNING_OPTIONS:
            raise ValidationError("running", f"{running!r} is not one of "
                                  f"{', '.join(RUNNING_OPTIONS)}")
        ids = self._node_ids(spec)
        if node_id not in ids:
            raise NotFound(f"node {node_id!r} is not in pool {spec.id!r} (its nodes: "
                           f"{', '.join(ids) or 'none'})")

    def _scheduling(self, pool_id: str, node_id: str, enabled: bool,
                    running: str) -> NodeView:
        spec = self.store.get_pool(pool_id)
        self._check_node(spec, node_id, running)
        if self.coordinator is not None:
            what = "enabling" if enabled else "disabling"
            self._command(f"{what} scheduling on node {pool_id}/{node_id}",
                          "set_node_scheduling", pool_id, node_id, enabled, running)
            for n in self.store.list_nodes(pool_id):
                if n["id"] == node_id:
                    return NodeView.from_row(n)
            raise NotFound(f"node {node_id!r} is not in pool {pool_id!r}")
        with self._exclusive():
            return NodeView.from_row(self.store.set_node_scheduling(
                pool_id, node_id, not enabled, spec.task_slots_per_node))

    def disable_node_scheduling(self, pool_id: str, node_id: str, *,
                                running: str = "taskcompletion") -> NodeView:
        return self._scheduling(pool_id, node_id, False, running)

    def enable_node_scheduling(self, pool_id: str, node_id: str) -> NodeView:
        return self._scheduling(pool_id, node_id, True, "taskcompletion")

    def remove_node(self, pool_id: str, node_id: str, *, running: str = "requeue") -> None:
        from hpcbatch.poolops import spec_without_node
        spec = self.store.get_pool(pool_id)
        self._check_node(spec, node_id, running)
        if self.coordinator is not None:
            self._command(f"the removal of node {pool_id}/{node_id}", "remove_node", pool_id,
                          node_id, running)
            return
        with self._exclusive():
            spec = self.store.get_pool(pool_id)
            self.store.set_pool_spec(spec_without_node(spec, self.home, node_id,
                                                       self._node_ids(spec)))
            self.store.delete_node(pool_id, node_id)

    def _wait_for(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (on the change feed) until done() or the timeout; whether it was done."""
        deadline = time.monotonic() + timeout_s
        change = self.store.change_counter()
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._check_coordinator()
            change = self.store.wait_for_change(change, min(left, 1.0))
        return True

    def terminate_job(self, job_id: str) -> JobView:
        from hpcbatch.models import JobState
        if self.store.get_job(job_id)["state"] == JobState.COMPLETED.value:
            raise Conflict(f"job {job_id!r} is already completed")
        if self.coordinator is not None:
            self._command(f"the termination of job {job_id!r}", "terminate_job", job_id)
            # its running tasks are killed (SIGTERM, then SIGKILL after the kill grace)
            self._wait_for(lambda: self.store.get_job(job_id)["state"] ==
                           JobState.COMPLETED.value,
                           self.command_timeout_s + self.timings.kill_grace_s)
        else:
            with self._exclusive():
                if self.store.get_job(job_id)["state"] != JobState.COMPLETED.value:
                    # what the store says runs was left by a coordinator that is gone
                    self.store.terminate_job_tasks(job_id, time.time(), in_flight=True)
                    self.store.set_job_state(job_id, JobState.COMPLETED)
        return self.get_job(job_id)

    def reactivate_task(self, job_id: str, task_id: str) -> TaskView:
        from hpcbatch.jobops import check_reactivatable
        check_reactivatable(self.store.get_task(job_id, task_id), self.store.get_job(job_id))
        if self.coordinator is not None:
            self._command(f"the reactivation of task {job_id}/{task_id}", "reactivate_task",
                          job_id, task_id)
        else:
            with self._exclusive():
                row = self.store.get_task(job_id, task_id)
                check_reactivatable(row, self.store.get_job(job_id))
                self.store.reactivate_task(row["seq"])
        return self.get_task(job_id, task_id)

    def delete_task(self, job_id: str, task_id: str) -> None:
        import logging
        row = self.store.get_task(job_id, task_id)
        if row["state"] != "completed" and self.coordinator is not None:
            self.terminate_task(job_id, task_id)
            if not self._wait_for(
                    lambda: self.store.get_task(job_id, task_id)["state"] == "completed",
                    self.command_timeout_s + self.timings.kill_grace_s):
                raise HpcBatchError(f"task {job_id}/{task_id} was terminated but has not "
                                    "ended yet; delete it again in a moment")
        spec = self.store.get_pool(self.store.get_job(job_id)["pool_id"])
        with self._exclusive():
            row = self.store.get_task(job_id, task_id)
            nodes = {a["node_id"] for a in self.store.attempts(job_id, task_id)}
            nodes.add(row["node_id"])
            if json.loads(row["spec"] or "{}").get("multi_instance"):
                nodes.update(self._node_ids(spec))  # its directories are on every instance
            self.store.delete_task(row["seq"])
            from hpcbatch.collect import forget
            forget(self.home, job_id, task_id)
        failed = self._provider(spec).remove_trees(sorted(n for n in nodes if n),
                                                   f"jobs/{job_id}/{task_id}")
        for node, why in sorted(failed.items()):
            logging.getLogger("hpcbatch.service").warning(
                "task %s/%s: its directory on node %s was not removed (%s)", job_id, task_id,
                node, why)

    def _task_dir(self, job_id: str, task_id: str, what: str, node: str | None = None
                  ) -> tuple[Any, str, str]:
        """The provider, node and directory of the task's latest attempt (``node``: that
        node's copy of the directory, as a multi-instance task has on each instance)."""
        if task_id in JOB_TASK_IDS:
            return self._job_task_dir(job_id, task_id, what, node)
        row = self.store.get_task(job_id, task_id)
        where = f"task {job_id}/{task_id}"
        if not row.get("task_dir"):
            raise NotFound(f"{where} is {row['state']} and has not started; it has no {what} "
                           "yet")
        if not row.get("node_id"):
            raise NotFound(f"{where} is waiting to run again (retry or requeue); its {what} "
                           "comes back once the new attempt starts")
        spec = self.store.get_pool(self.store.get_job(job_id)["pool_id"])
        provider = self._provider(spec)
        if node is None or node == row["node_id"]:
            return provider, row["node_id"], row["task_dir"]
        check_id("node", node)
        nodes = self.store.list_nodes(spec.id)
        rec = next((n for n in nodes if n["id"] == node), None)
        if rec is None:
            known = ", ".join(n["id"] for n in nodes) or "none"
            raise NotFound(f"node {node!r} is not in pool {spec.id} (its nodes: {known})")
        info = rec.get("info") or {}
        if isinstance(info, str):
            info = json.loads(info or "{}")
        root = info.get("root") or provider.node_root(node)
        return provider, node, posixpath.join(root, "jobs", job_id, task_id)

    def _kept(self, job_id: str, task_id: str, node: str | None) -> Path | None:
        """The kept stdout/stderr of the task's latest attempt (see hpcbatch.collect),
        when it has ended and they were kept."""
        from hpcbatch.collect import latest_kept
        if node is not None:
            return None
        kept = latest_kept(self.home, job_id, task_id)
        if kept is None:
            return None
        row = self.store.get_task(job_id, task_id)
        attempts = [a["attempt"] for a in self.store.attempts(job_id, task_id)]
        if row["state"] != "completed" or not attempts or max(attempts) != int(kept.name):
            return None
        return kept
    def _job_task_dir(self, job_id: str, which: str, what: str, node: str | None
                      ) -> tuple[Any, str, str]:
        """The directory of the job's preparation or release task on ``node`` (default:
        the first node it ran on)."""
        kind = "preparation" if which == JOB_PREPARATION_ID else "release"
        rows = [r for r in self.store.job_tasks(job_id) if r["kind"] == kind and r["task_dir"]]
        if node is not None:
            check_id("node", node)
            rows = [r for r in rows if r["node_id"] == node]
        if not rows:
            on = f" on node {node}" if node else ""
            raise NotFound(f"job {job_id}'s {kind} task has not run{on}; it has no {what}")
        spec = self.store.get_pool(self.store.get_job(job_id)["pool_id"])
        return self._provider(spec), rows[0]["node_id"], rows[0]["task_dir"]

    def list_task_files(self, job_id: str, task_id: str, *,
                        node: str | None = None) -> list[FileView]:
        """The files of the task's directory on its node; when the node cannot be read
        (gone, down, its pool deleted), the stdout/stderr the coordinator kept."""
        try:
            return self._list_node_files(job_id, task_id, node=node)
        except HpcBatchError:
            kept = self._kept(job_id, task_id, node)
            if kept is None:
                raise
        return [FileView(p.name, p.stat().st_size, p.stat().st_mtime, "file")
                for p in sorted(kept.glob("std*.txt"))]

    def _list_node_files(self, job_id: str, task_id: str, *,
                         node: str | None = None) -> list[FileView]:
        provider, node, tdir = self._task_dir(job_id, task_id, "files", node)
        try:
            return [FileView(f.name, f.size, f.modified_at, f.kind)
                    for f in provider.list_node_dir(node, tdir)]
        except FileNotFoundError:
            raise NotFound(f"{tdir} of task {job_id}/{task_id} does not exist on node {node} "
                           "(were the node's files removed?)") from None
        except HpcBatchError:
            raise
        except OSError as exc:
            raise HpcBatchError(f"cannot list {tdir} of task {job_id}/{task_id} on node "
                                f"{node}: {exc.strerror or exc}") from None

    def read_task_file(self, job_id: str, task_id: str, name: str, *, offset: int = 0,
                       length: int | None = None, node: str | None = None) -> bytes:
        """A byte range of a file of the task's directory. stdout.txt and stderr.txt of
        an ended task come from what the coordinator kept (all of it, or the tail
        beyond the cap, see hpcbatch.collect) when the node's copy cannot be read, or
        at once when the kept copy is whole."""
        from hpcbatch.collect import LOG_FILES
        kept = self._kept(job_id, task_id, node) if name in LOG_FILES else None
        if kept is not None and _kept_whole(kept, name):
            return _read_kept(kept / name, offset, length)
        try:
            return self._read_node_file(job_id, task_id, name, offset=offset, length=length,
                                        node=node)
        except HpcBatchError:
            if kept is None or not (kept / name).is_file():
                raise
        return _read_kept(kept / name, offset, length)

    def _read_node_file(self, job_id: str, task_id: str, name: str, *, offset: int = 0,
                        length: int | None = None, node: str | None = None) -> bytes:
        name = task_file_name(name)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValidationError("offset", f"{offset!r} must be a whole number >= 0")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                                   or length < 0):
            raise ValidationError("length", f"{length!r} must be a whole number >= 0")
        provider, node, tdir = self._task_dir(job_id, task_id, name, node)
        path = f"{tdir}/{name}"
        try:
            return provider.read_node_file(node, path, offset=offset, length=length)
        except FileNotFoundError:
            raise NotFound(f"{path} of task {job_id}/{task_id} does not exist on node {node} "
                           "(were the node's files removed?)") from None
        except HpcBatchError:
            raise
        except OSError as exc:
            raise HpcBatchError(f"cannot read {path} of task {job_id}/{task_id} on node "
                                f"{node}: {exc.strerror or exc}") from None


    # ---- changes ---------------------------------------------------------

    def change_counter(self) -> int:
        return self.store.change_counter()

    def wait_for_change(self, after: int, timeout_s: float) -> int:
        return self.store.wait_for_change(after, timeout_s)

    # ---- kernel runs -----------------------------------------------------
    # a run is a job of one task ('kernel'); what it was asked for is kept beside its
    # result file in <home>/runs/<run id>.json

    def _runs_dir(self) -> Path:
        from hpcbatch.store import secure_dir
        path = self.home / "runs"
        secure_dir(path)
        return path

    def start_run(self, kernel: str | None, *, ranks: int | None = None,
                  params: Mapping[str, Any] | list[str] | None = None,
                  pool: str = LOCAL_POOL, nodes: int | None = None,
                  ranks_per_node: int = 1, oversubscribe: bool = False,
                  timeout_s: float | None = None, retries: int = 0,
                  compress: bool = False, function: str | None = None,
                  output: str | os.PathLike | None = None,
                  default_dir: Path | None = None) -> RunView:
        """``output`` (this machine's path) or ``default_dir`` for the result; by default
        <home>/runs/<run id>.h5."""
        from hpcbatch.kernelrun import plan_run
        if params is not None and not isinstance(params, Mapping | list):
            raise ValidationError("params", "must be an object of name: value")
        if kernel is None and function is None:
            raise ValidationError("kernel", "is required: a built-in kernel's name, a module, "
                                  "a .py file, or (function=) an uploaded function")
        packed = self._uploaded_function(kernel, params, function) if function is not None \
            else None
        plan = plan_run(self, kernel, ranks=ranks,
                        params=dict(params) if isinstance(params, Mapping) else params,
                        output=output, pool=pool, nodes=nodes, ranks_per_node=ranks_per_node,
                        oversubscribe=oversubscribe, timeout_s=timeout_s, compress=compress,
                        retries=retries, default_dir=default_dir or self._runs_dir(),
                        function=packed)
        record = {"kernel": plan.kernel, "params": plan.params, "ranks": plan.ranks,
                  "nodes": plan.nodes, "pool_id": pool, "output": str(plan.output),
                  "created_at": time.time()}
        if plan.function:
            record["function"] = plan.function
        path = self._runs_dir() / f"{plan.job.id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        try:
            self.submit(plan.job, [plan.task], existing_ok=False)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self.get_run(plan.job.id)

    def _uploaded_function(self, kernel: str | None, params: Any,
                           function: Any) -> tuple[Path, dict[str, Any]]:
        """The uploaded packed function ``function`` names (its SHA-256) and its header,
        read without unpickling anything."""
        from hpcbatch.kernels.function import FILE_NAME, read_header
        if kernel is not None or params:
            raise ValidationError("function", "give a kernel or a function, not both (a "
                                  "function's params travel in its upload)")
        if not isinstance(function, str) or not SHA256.fullmatch(function):
            raise ValidationError("function", f"{function!r} is not the SHA-256 of an "
                                  "upload (64 of 0-9a-f)")
        path = self.home / "uploads" / function / FILE_NAME
        if not path.is_file() or path.is_symlink():
            raise NotFound(f"no uploaded function {function}; upload it first as "
                           f"{FILE_NAME} (PUT /v1/uploads/{function}?name={FILE_NAME})")
        try:
            header, _ = read_header(path)
        except ValueError as exc:
            raise ValidationError("function", str(exc)) from None
        return path, header

    def _run_record(self, run_id: str) -> dict[str, Any]:
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise NotFound(f"no kernel run {run_id!r} (run ids look like run-pi-...)")
        try:
            return json.loads((self.home / "runs" / f"{run_id}.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no kernel run {run_id!r}; 'hpcbatch job list' shows the runs' "
                           "jobs") from None

    def run_output(self, run_id: str) -> Path:
        """Where the run's result file is (or will be) on this machine."""
        return Path(self._run_record(run_id)["output"])

    def get_run(self, run_id: str) -> RunView:
        from hpcbatch.kernelrun import failure_message, reduced_summary
        rec = self._run_record(run_id)
        try:
            task = self.get_task(run_id, "kernel")
        except NotFound:
            raise NotFound(f"kernel run {run_id!r}'s job was deleted") from None
        base = dict(id=run_id, kernel=rec["kernel"], job_id=run_id, task_id="kernel",
                    params=rec.get("params") or {}, ranks=rec.get("ranks") or 1,
                    nodes=rec.get("nodes"), pool_id=rec.get("pool_id") or LOCAL_POOL,
                    created_at=rec.get("created_at"),
                    function={k: rec["function"][k] for k in ("name", "sha256")}
                    if rec.get("function") else None)
        if task.state != "completed":
            return RunView(state="running", **base)
        if not task.succeeded:
            message, _ = failure_message(self, rec["kernel"], base["ranks"], run_id,
                                         base["pool_id"],
                                         "function" if rec.get("function") else "kernel")
            return RunView(state="failed", error=message, **base)
        from hpcbatch.kernelrun import _plain
        from hpcbatch.kernels.results import read_result
        out = Path(rec["output"])
        try:
            res = read_result(out)
        except (OSError, ValueError) as exc:
            return RunView(state="failed", error=f"the result file {out} cannot be read: "
                           f"{exc}", **base)
        return RunView(state="succeeded", reduced=reduced_summary(res),
                       attrs=_plain(dict(res.attrs)), timings=_plain(dict(res.timings)),
                       result_size=out.stat().st_size, **base)

    def list_runs(self) -> list[RunView]:
        found = []
        for path in (self.home / "runs").glob("run-*.json"):
            try:
                found.append(self.get_run(path.stem))
            except NotFound:  # its job was deleted, or the record is not a run's
                continue
        return sorted(found, key=lambda r: (r.created_at or 0, r.id))

    def read_run_result(self, run_id: str) -> bytes:
        run = self.get_run(run_id)
        if run.state != "succeeded":
            raise Conflict(f"kernel run {run_id!r} is {run.state}; its result file comes "
                           "once it succeeded" + (f" ({run.error})" if run.error else ""))
        return self.run_output(run_id).read_bytes()

    # ---- files a client sends ---------------------------------------------

    def upload(self, name: str, chunks: Iterable[bytes], sha256: str) -> str:
        """Into <home>/uploads/<sha256>/<name> (0600), checked against the hash; a file
        already there with that hash is kept (uploads are content-addressed)."""
        from hpcbatch.store import secure_dir, storage_full
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise ValidationError("sha256", f"{sha256!r} is not a SHA-256 in hex (64 of "
                                  "0-9a-f)")
        if (not isinstance(name, str) or not name or "/" in name or "\0" in name
                or name in (".", "..")):
            raise ValidationError("name", f"{name!r} is not a file name (no '/')")
        folder = self.home / "uploads" / sha256
        secure_dir(self.home / "uploads")
        secure_dir(folder)
        dest = folder / name
        if dest.is_file() and not dest.is_symlink():
            for _ in chunks:  # the body must still be read to its end
                pass
            return str(dest)
        from hpcbatch.storage import checked_sha256, write_hashed
        tmp = folder / f".{name}.{os.getpid()}.{time.monotonic_ns()}.part"
        try:
            checked_sha256(write_hashed(tmp, chunks)[0], sha256)
            os.replace(tmp, dest)
        except OSError as exc:
            full = storage_full(exc, folder)
            if full is not None:
                raise full from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return str(dest)


def _kept_whole(kept: Path, name: str) -> bool:
    try:
        info = json.loads((kept / "kept.json").read_text())["files"][name]
    except (OSError, ValueError, KeyError):
        return False
    return info.get("kept_from") == 0 and (kept / name).is_file()


def _read_kept(path: Path, offset: int, length: int | None) -> bytes:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValidationError("offset", f"{offset!r} must be a whole number >= 0")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)
def check_job_task_files(spec: JobSpec) -> None:
    """The resource files of the job's preparation and release tasks exist here."""
    for name in ("preparation_task", "release_task"):
        task = getattr(spec, name)
        for i, rf in enumerate(task.resource_files if task else ()):
            if not Path(rf.source).is_file():
                raise ValidationError(f"job.{name}.resource_files[{i}].source",
                                      f"{rf.source} is not a file on this machine; give an "
                                      "existing file")


def _start_coordinator(home: Path, timings: Timings, prefetch: int | None):
    """Start the embedded coordinator."""
    from hpcbatch.coordinator import Coordinator
    kw: dict[str, Any] = {} if prefetch is None else {"prefetch": prefetch}
    coordinator = Coordinator(home, timings=timings, **kw)
    coordinator.start()
    return coordinator


__all__ = ["LOCAL_POOL", "LocalService", "Service", "default_home", "pool_view"]
