"""The Python API: ``hpcbatch.Batch`` with ``pools``, ``jobs`` and task handles.

``Batch()`` runs an embedded coordinator in this process on ``$HPCBATCH_HOME``
(default ``~/.hpcbatch``) with an automatic ``local`` pool of one task slot per
core::

    with hpcbatch.Batch() as batch:
        job = batch.jobs.create("render", pool="local")
        job.add_tasks([{"id": f"t{i}", "command_line": f"echo {i}"} for i in range(100)])
        job.wait(progress=True)
        print(job.task("t7").stdout())
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpcbatch.coordinator import DEFAULT_PREFETCH, Coordinator, default_home
from hpcbatch.errors import HpcBatchError, NotFound, ValidationError
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec, check_id, check_unique_ids
from hpcbatch.store import Store

LOCAL_POOL = "local"
POOL_DEAD_GRACE_S = 30.0  # Job.wait gives up on a pool with no usable node this long


class Task:
    """A snapshot of one task; ``refresh()`` reads it again."""

    def __init__(self, batch: Batch, row: dict[str, Any]):
        self._batch = batch
        self._row = row

    def __repr__(self) -> str:
        return f"<Task {self.job_id}/{self.id} {self.state} exit={self.exit_code}>"

    def __getattr__(self, name: str) -> Any:
        row = self.__dict__.get("_row", {})
        if name in row:
            return row[name]
        raise AttributeError(name)

    def refresh(self) -> Task:
        self._row = self._batch.store.get_task(self.job_id, self.id)
        return self

    @property
    def succeeded(self) -> bool:
        return self.result == "success"

    def stdout(self) -> str:
        return read_task_file(self._batch.store, self._row, "stdout.txt").decode(
            errors="replace")

    def stderr(self) -> str:
        return read_task_file(self._batch.store, self._row, "stderr.txt").decode(
            errors="replace")

    @property
    def stdout_path(self) -> Path | None:
        return Path(self.task_dir) / "stdout.txt" if self.task_dir else None

    @property
    def stderr_path(self) -> Path | None:
        return Path(self.task_dir) / "stderr.txt" if self.task_dir else None


def read_task_file(store: Store, row: dict[str, Any], name: str) -> bytes:
    """A file of a task's directory: from this machine's filesystem for local pools,
    over SFTP from the node (host key checked strictly) for SSH pools."""
    where = f"task {row['job_id']}/{row['id']}"
    if not row.get("task_dir"):
        raise NotFound(f"{where} is {row['state']} and has not started; it has no {name} yet")
    if not row.get("node_id"):
        raise NotFound(f"{where} is waiting to run again (retry or requeue); its {name} "
                       "comes back once the new attempt starts")
    path = f"{row['task_dir']}/{name}"
    pool = store.get_pool(store.get_job(row["job_id"])["pool_id"])
    try:
        if pool.provider == "ssh":
            from hpcbatch.providers import read_node_file
            return read_node_file(pool.provider_config, row["node_id"], path)
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path} of {where} does not exist on node {row['node_id']} (were the "
                       "node's files removed?)") from None
    except OSError as exc:
        raise HpcBatchError(f"cannot read {path} of {where} on node {row['node_id']}: "
                            f"{exc.strerror or exc}") from None


class Job:
    def __init__(self, batch: Batch, job_id: str):
        self._batch = batch
        self.id = job_id

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    @property
    def spec(self) -> JobSpec:
        return self._batch.store.get_job(self.id)["spec"]

    @property
    def state(self) -> str:
        return self._batch.store.get_job(self.id)["state"]

    def add_task(self, task_id: str, command_line: str, **fields: Any) -> None:
        self.add_tasks([TaskSpec(task_id, command_line, **fields)])

    def add_tasks(self, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> int:
        """Validate and store tasks in one transaction (all or nothing)."""
        specs = [TaskSpec.coerce(t) for t in tasks]
        check_unique_ids(specs)
        n = self._batch.store.add_tasks(self.id, specs)
        self._batch._notify()
        return n

    def counts(self) -> dict[str, int]:
        return self._batch.store.task_counts(self.id)

    def tasks(self, state: str | None = None) -> list[Task]:
        return [Task(self._batch, r) for r in self._batch.store.list_tasks(self.id, state)]

    def task(self, task_id: str) -> Task:
        return Task(self._batch, self._batch.store.get_task(self.id, task_id))

    def terminate_task(self, task_id: str) -> None:
        self._batch.store.get_task(self.id, task_id)
        self._batch.coordinator.kill_task(self.id, task_id)

    def _pool_dead_reason(self) -> str | None:
        """Why none of the pool's nodes can take work now (None: some can, or may soon).
        A node being reconnected counts as dead: it has failed at least once."""
        pool_id = self._batch.store.get_job(self.id)["pool_id"]
        nodes = self._batch.store.list_nodes(pool_id)

        def dead(n: dict) -> bool:
            return n["state"] in ("unusable", "start_task_failed", "offline") or (
                n["state"] == "starting" and (n["reason"] or "").startswith("reconnecting"))
        if not nodes or not all(dead(n) for n in nodes):
            return None
        return "; ".join(f"{n['id']}: {n['reason'] or n['state']}" for n in nodes[:3])

    def done(self) -> bool:
        c = self.counts()
        return c["completed"] == c["total"]

    def wait(self, timeout_s: float | None = None, progress: bool = False,
             poll_s: float = 0.2) -> dict[str, int]:
        """Block until every task is completed; return the counts.

        Raises TimeoutError after ``timeout_s``. With ``progress=True`` a rich
        progress bar shows completed/total, failures and retries.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _ProgressBar(self.id) if progress else None
        store = self._batch.store
        interval = 0.005
        next_pool_check = time.monotonic() + 2.0
        dead_since = None  # when the pool was first seen with no usable node
        try:
            while True:
                if bar:
                    bar.update(self.counts())
                if store.unfinished(self.id) == 0:
                    counts = self.counts()
                    if bar:
                        bar.update(counts)
                    return counts
                self._batch._check_coordinator()
                if time.monotonic() >= next_pool_check:
                    # nodes are retried for ever; a pool with none usable for a while is
                    # most likely misconfigured: say so rather than wait in silence
                    why = self._pool_dead_reason()
                    dead_since = (dead_since or time.monotonic()) if why else None
                    if why and time.monotonic() - dead_since >= POOL_DEAD_GRACE_S:
                        pool_id = self._batch.store.get_job(self.id)["pool_id"]
                        raise HpcBatchError(
                            f"pool {pool_id!r} has had no usable node for "
                            f"{POOL_DEAD_GRACE_S:g} s ({why}); the job's tasks stay stored "
                            f"and its nodes are still being retried: fix the pool, then "
                            f"'hpcbatch job wait {self.id}'")
                    next_pool_check = time.monotonic() + 2.0
                if deadline is not None and time.monotonic() > deadline:
                    counts = self.counts()
                    raise TimeoutError(f"job {self.id}: {counts['completed']}/{counts['total']} "
                                       f"tasks completed after {timeout_s} s")
                progress_cv = self._batch.coordinator.progress
                with progress_cv:  # woken when the coordinator commits completions
                    progress_cv.wait(interval)
                interval = min(interval * 1.5, poll_s)
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

    def update(self, c: dict[str, int]) -> None:
        detail = (f"running {c['running']}  preparing {c['preparing']}  failed {c['failed']}"
                  f"  retries {c['retries']}")
        self.progress.update(self.task, total=c["total"], completed=c["completed"],
                             detail=detail)

    def close(self) -> None:
        self.progress.stop()


def delete_job(store: Store, job_id: str) -> list[str]:
    """Delete a finished job, its tasks and its directory on every node of its pool
    (``<node root>/jobs/<job>``: local ones from this filesystem, SSH ones over SSH).
    Returns one line per node whose files could not be removed."""
    import shutil

    from hpcbatch.coordinator import ssh_node_root
    pool = store.get_pool(store.get_job(job_id)["pool_id"])
    nodes = [n["id"] for n in store.list_nodes(pool.id)]
    store.delete_job(job_id)
    if pool.provider != "ssh":
        for node in nodes:
            shutil.rmtree(store.path.parent / "nodes" / pool.id / node / "jobs" / job_id,
                          ignore_errors=True)
        return []
    from hpcbatch.providers import targets
    from hpcbatch.ssh import connect, parallel, run

    def remove(target) -> None:
        path = f"{ssh_node_root(pool.provider_config, pool.id, target.name)}/jobs/{job_id}"
        client = connect(target)
        try:  # "~/x" as "x": the command runs in the login's home, and is never expanded
            code, _, err = run(client, ["rm", "-rf", "--", path.removeprefix("~/")])
            if code != 0:
                raise OSError(err.strip() or f"rm exited with {code}")
        finally:
            client.close()
    result = parallel(targets(pool.provider_config), remove, 60)
    return [f"{r.name}: task directories not removed ({r.error})" for r in result.failed]


def check_pool_deletable(store: Store, pool_id: str) -> None:
    from hpcbatch.errors import Conflict
    if pool_id == LOCAL_POOL:
        raise Conflict("the local pool is built in and cannot be deleted")
    store.check_pool_deletable(pool_id)


def delete_pool(store: Store, pool_id: str) -> list[str]:
    """Delete a pool with no jobs left: its nodes' records, and for an SSH pool with
    inter-node communication the pool key, taken out of every node's authorized_keys
    (over SSH) and removed here. Returns one line per node where that failed."""
    import shutil
    check_pool_deletable(store, pool_id)
    pool = store.get_pool(pool_id)
    key_dir = store.path.parent / "pools" / pool_id
    problems: list[str] = []
    store.delete_pool(pool_id)
    if pool.provider == "ssh" and (key_dir / "id_ed25519.pub").exists():
        from hpcbatch.bootstrap import PoolTrust
        from hpcbatch.providers import targets
        from hpcbatch.ssh import connect, parallel
        nodes = targets(pool.provider_config)
        trust = PoolTrust.load_or_create(key_dir, pool_id, nodes)

        def revoke(target) -> bool:
            client = connect(target)
            try:
                return trust.revoke(client, pool.provider_config.get("authorized_keys"))
            finally:
                client.close()
        result = parallel(nodes, revoke, 60)
        problems += [f"{r.name}: the pool key is still in its authorized_keys ({r.error})"
                     for r in result.failed]
    shutil.rmtree(key_dir, ignore_errors=True)
    return problems


class Jobs:
    def __init__(self, batch: Batch):
        self._batch = batch

    def create(self, job_id: str, pool: str = LOCAL_POOL, *, priority: int = 0,
               on_all_tasks_complete: str = "no_action", max_task_retry_count: int = 0) -> Job:
        spec = JobSpec(job_id, pool, priority=priority,
                       on_all_tasks_complete=on_all_tasks_complete,
                       max_task_retry_count=max_task_retry_count)
        self._batch.store.create_job(spec)
        return Job(self._batch, job_id)

    def get(self, job_id: str) -> Job:
        self._batch.store.get_job(job_id)
        return Job(self._batch, job_id)

    def list(self) -> list[dict[str, Any]]:
        return self._batch.store.list_jobs()

    def delete(self, job_id: str) -> list[str]:
        """Delete a finished job, its tasks and their directories; see ``delete_job``."""
        problems = delete_job(self._batch.store, job_id)
        self._batch.coordinator.forget_job(job_id)
        return problems


def ssh_pool(pool_id: str, trust_on_first_use: bool = False, **options: Any) -> dict:
    """Validated provider config for an SSH pool, after every host answered."""
    from hpcbatch.errors import Conflict
    from hpcbatch.providers import preflight, ssh_pool_config
    cfg = ssh_pool_config(**options)
    failed = preflight(cfg, trust_on_first_use).failed
    if failed:
        more = f" (and {len(failed) - 1} more host(s) failed)" if len(failed) > 1 else ""
        raise Conflict(f"pool {pool_id!r} not created: {failed[0].error}{more}")
    return cfg


def make_pool_spec(store: Store, pool_id: str, provider: str = "local", *,
                   task_slots_per_node: int = 1, scheduling_policy: str = "pack",
                   target_nodes: int = 1, start_task: str | None = None,
                   inter_node_communication: bool | None = None,
                   trust_on_first_use: bool = False, **provider_options: Any) -> PoolSpec:
    """A validated PoolSpec; an SSH pool's hosts have all answered (nothing stored yet).

    ``inter_node_communication`` defaults to on for SSH pools: bootstrap gives the
    nodes a pool key and ssh_config so multi-instance tasks can start MPI across them."""
    from hpcbatch.errors import Conflict
    check_id("pool", pool_id)
    try:
        store.get_pool(pool_id)
    except NotFound:
        pass
    else:
        raise Conflict(f"pool {pool_id!r} already exists; pick another id")
    config: dict[str, Any] = {}
    if provider == "ssh":
        config = ssh_pool(pool_id, trust_on_first_use, **provider_options)
        target_nodes = len(config["hosts"])
        if inter_node_communication is None:
            inter_node_communication = True
    elif provider_options:
        raise ValidationError("pool", f"{', '.join(sorted(provider_options))} only apply to "
                              "ssh pools (give spec= or hostlist=)")
    return PoolSpec(pool_id, provider, task_slots_per_node=task_slots_per_node,
                    scheduling_policy=scheduling_policy, target_nodes=target_nodes,
                    start_task=start_task, provider_config=config,
                    inter_node_communication=bool(inter_node_communication))


class Pools:
    def __init__(self, batch: Batch):
        self._batch = batch

    def create(self, pool_id: str, provider: str = "local", **options: Any) -> PoolSpec:
        """Create a pool and start its nodes.

        Options: ``task_slots_per_node``, ``scheduling_policy`` ("pack"/"spread"),
        ``target_nodes`` (local pools), ``start_task``. ``provider="ssh"`` takes
        ``spec`` (a pool.json) or ``hostlist`` (``node[01-16]``) plus ``user``, ``key``,
        ``known_hosts``, ``ssh_config``, ``port``, ``python``, ``node_root``,
        ``authorized_keys``, ``inter_node_communication`` (default on) and
        ``trust_on_first_use``; every host is contacted once first (host key checked
        strictly) and nothing is stored unless all of them answer."""
        spec = make_pool_spec(self._batch.store, pool_id, provider, **options)
        self._batch.store.create_pool(spec)
        self._batch.coordinator.add_pool(spec)
        return spec

    def get(self, pool_id: str) -> PoolSpec:
        return self._batch.store.get_pool(pool_id)

    def delete(self, pool_id: str) -> list[str]:
        """Stop the pool's agents and delete it (it must have no jobs); see
        ``delete_pool``. Returns one line per node where clean-up failed."""
        check_pool_deletable(self._batch.store, pool_id)
        self._batch.coordinator.remove_pool(pool_id)
        return delete_pool(self._batch.store, pool_id)

    def list(self) -> list[PoolSpec]:
        return self._batch.store.list_pools()

    def nodes(self, pool_id: str | None = None) -> list[dict[str, Any]]:
        if pool_id is not None:
            self.get(pool_id)
        return self._batch.store.list_nodes(pool_id)


def open_store(home: Path) -> Store:
    """The store of ``home``, with the automatic ``local`` pool (one slot per core)."""
    store = Store(home / "state.db")
    store.create_pool(PoolSpec(LOCAL_POOL, "local", task_slots_per_node=os.cpu_count() or 1),
                      exist_ok=True)
    return store


class _Closed:
    """Stands in for the store of a closed Batch: any use says so in one line."""

    def __getattr__(self, name: str) -> Any:
        raise HpcBatchError("this hpcbatch.Batch is closed; open a new one (or use it in a "
                            "'with' block) to reach its jobs and tasks")


class Batch:
    """An embedded coordinator plus the API to drive it."""

    def __init__(self, home: str | os.PathLike | None = None, *,
                 local_slots: int | None = None, prefetch: int = DEFAULT_PREFETCH):
        """``prefetch``: at most this many tasks per slot a node's agent may hold queued,
        so the next short task starts without a round trip (the queue holds about 20 ms
        of work, judged from the pool's recent task durations: long tasks get none). A
        higher-priority task submitted later can wait behind these; 0 gives strict
        priority order at some throughput."""
        self.home = Path(home).expanduser() if home else default_home()
        self.store = open_store(self.home)
        try:
            if local_slots is not None:
                local = PoolSpec(LOCAL_POOL, "local", task_slots_per_node=local_slots)
                if self.store.get_pool(LOCAL_POOL) != local:
                    self._resize_local(local)
            self.coordinator = Coordinator(self.home, prefetch=prefetch)
            self.coordinator.start()
        except BaseException:
            self.store.close()
            raise
        self.pools = Pools(self)
        self.jobs = Jobs(self)

    def _resize_local(self, local: PoolSpec) -> None:
        import json

        from hpcbatch.store import spec_to_dict
        with self.store.transaction() as db:
            db.execute("UPDATE pools SET spec=? WHERE id=?",
                       (json.dumps(spec_to_dict(local)), LOCAL_POOL))

    def run_kernel(self, kernel: str, *, ranks: int | None = None,
                   params: dict[str, Any] | None = None, output: str | os.PathLike | None = None,
                   **kw: Any):
        """Run an MPI kernel with its reduce and return its result file, read back.

        ``batch.run_kernel("pi", ranks=4, params={"samples": 10**7}, output="pi.h5")``
        returns a ``KernelResult`` with ``.reduced`` (dict of arrays), ``.path``,
        ``.timings`` and ``.attrs`` (provenance). ``kernel`` may be a built-in
        name, a dotted module or a path to a .py file. Other keywords: ``pool``,
        ``nodes`` + ``ranks_per_node`` (multi-node), ``oversubscribe``,
        ``progress``, ``timeout_s``. Raises ``KernelRunError`` (with the ranks'
        stderr) when the kernel fails.
        """
        from hpcbatch.kernelrun import run_kernel
        return run_kernel(self, kernel, ranks=ranks, params=params, output=output, **kw)

    def _notify(self) -> None:
        self.coordinator.notify()

    def _check_coordinator(self) -> None:
        if self.coordinator.error is not None:
            raise HpcBatchError(f"the coordinator stopped: {self.coordinator.error!r}")

    def close(self) -> None:
        if isinstance(self.store, _Closed):
            return
        self.coordinator.stop()
        self.store.close()
        self.store = _Closed()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Batch", "Job", "Task", "TaskSpec", "JobSpec", "PoolSpec", "ValidationError",
           "check_id"]
