"""Durable calls: ``batch.executor(job="sweep-7", durable=True)``.

Every call is recorded in the store before it runs, as part of a task of the job: a
task holds a batch of up to ``calls_per_task`` calls (those submitted within
``linger_s`` of each other, or a ``map``'s consecutive items), named
``calls-<first index>-<last index>``. The calls' functions and arguments are a file in
the home's blob area (``<home>/blobs/<job>/``, 0600; through ``Batch(url=...)`` the
file is uploaded into the service's home), copied to the node as the task's resource
file; the task runs ``python -m hpcbatch.launch.pyworker --run calls.pkl`` which writes
``wd/result.pkl`` atomically in the task's directory. So the calls run whether or not
the client lives (the coordinator runs them, requeues what a crash interrupted), a
completed task is never run again, and any later process collects the results::

    with hpcbatch.Batch() as batch:
        futures = batch.futures("sweep-7")       # one per call, in call order
        values = batch.jobs.get("sweep-7").results()

Only calls of a task in flight at a crash can run twice (the task's next attempt runs
its batch again). Calls still buffered here (at most ``linger_s`` old; ``flush()`` and
``map`` record at once) are lost with the process.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from hpcbatch.errors import HpcBatchError, NotFound, ValidationError
from hpcbatch.executor import _dumps_args, remote_exception
from hpcbatch.launch import pyworker as W

CALLS_PER_TASK = 64
LINGER_S = 0.05
TASK_ID = re.compile(r"calls-(\d{9})-(\d{9})")
COLLECT_WAIT_S = 1.0  # the collector waits on the store's change feed this long a round


class DurableCallError(HpcBatchError):
    """A durable call's task ended without a result (named: task, how it ended)."""


def _task_id(first: int, last: int) -> str:
    return f"calls-{first:09d}-{last:09d}"


def _call_tasks(service: Any, job_id: str, **kw: Any) -> Iterator[dict]:
    for item in service.iter_tasks(job_id, filter="startswith(id,'calls-')", **kw):
        if TASK_ID.fullmatch(item["id"]):
            yield item


class _Collector:
    """Resolves the futures of a job's durable calls as their tasks complete (a thread
    on the store's change feed: embedded or over HTTP)."""

    def __init__(self, batch: Any, job_id: str):
        self._service = batch.service
        self.job_id = job_id
        self._lock = threading.Lock()
        self._waiting: dict[str, list[tuple[int, cf.Future]]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"hpcbatch-durable-{job_id}")
        self._thread.start()

    def watch(self, task_id: str, calls: list[tuple[int, cf.Future]]) -> None:
        with self._lock:
            self._waiting[task_id] = calls
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception:  # noqa: BLE001 - a closed Batch, a service gone: try later
                if self._stop.wait(COLLECT_WAIT_S):
                    return

    def _round(self) -> None:
        change = 0
        while not self._stop.is_set():
            with self._lock:
                want = set(self._waiting)
            if want:
                try:
                    change = self._service.change_counter()
                    self._collect(want)
                except HpcBatchError:
                    pass
            with self._lock:
                idle = not self._waiting
            if idle:
                self._wake.wait(COLLECT_WAIT_S)
                self._wake.clear()
                continue
            try:
                self._service.wait_for_change(change, COLLECT_WAIT_S)
            except HpcBatchError:
                time.sleep(COLLECT_WAIT_S)

    def _collect(self, want: set[str]) -> None:
        for item in _call_tasks(self._service, self.job_id,
                                select=["id", "state", "result", "failure", "exit_code",
                                        "signal"]):
            tid = item["id"]
            if tid not in want or item["state"] != "completed":
                continue
            with self._lock:
                calls = self._waiting.pop(tid, None)
            if calls:
                self._resolve(item, calls)

    def _resolve(self, item: dict, calls: list[tuple[int, cf.Future]]) -> None:
        tid = item["id"]
        try:
            data = self._service.read_task_file(self.job_id, tid, "wd/result.pkl")
            results = {index: (ok, payload) for index, ok, payload in pickle.loads(data)}
            why = None
        except (HpcBatchError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            results = {}
            how = item.get("failure") or "no failure recorded"
            if item.get("signal"):
                try:
                    how = f"killed by {signal.Signals(item['signal']).name}"
                except ValueError:
                    how = f"killed by signal {item['signal']}"
            elif item.get("exit_code"):
                how = f"exit code {item['exit_code']}"
            why = (f"task {self.job_id}/{tid} ended without results ({how}; "
                   f"{type(exc).__name__}: {exc}); see its stderr.txt")
        where = f"durable task {self.job_id}/{tid}"
        for index, fut in calls:
            if fut.done():
                continue
            got = results.get(index)
            if got is None:
                fut.set_exception(DurableCallError(why or f"{where} has no result for call "
                                                   f"{index}"))
                continue
            ok, payload = got
            try:
                value = pickle.loads(payload)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it
                fut.set_exception(HpcBatchError(f"the result of call {index} ({where}) cannot "
                                                f"be read here: {type(exc).__name__}: {exc}"))
                continue
            if ok:
                fut.set_result(value[0])
            else:
                fut.set_exception(remote_exception(value, f"in {where}"))


def _last_index(service: Any, job_id: str) -> int:
    last = -1
    for item in _call_tasks(service, job_id, select=["id"]):
        last = max(last, int(TASK_ID.fullmatch(item["id"]).group(2)))
    return last


class DurableExecutor(cf.Executor):
    """See the module's text and :meth:`hpcbatch.Batch.executor`."""

    def __init__(self, batch: Any, pool: str = "local", job: str | None = None, *,
                 calls_per_task: int = CALLS_PER_TASK, linger_s: float = LINGER_S):
        if not job:
            raise ValidationError("job", "a durable executor needs a job id (job='sweep-7'): "
                                  "a later process names it to collect the results")
        if isinstance(calls_per_task, bool) or not isinstance(calls_per_task, int) or \
                calls_per_task < 1:
            raise ValidationError("calls_per_task",
                                  f"{calls_per_task!r} must be a whole number >= 1")
        self._batch = batch
        self._service = batch.service
        self.pool = pool
        self.job_id = job
        self.calls_per_task = calls_per_task
        self.linger_s = linger_s
        view = self._service.get_pool(pool)
        try:
            jv = self._service.get_job(job)
            if jv.pool_id != pool:
                raise ValidationError("job", f"job {job!r} runs on pool {jv.pool_id!r}, not "
                                      f"{pool!r}; give another job id or pool")
            if jv.state == "completed":
                raise ValidationError("job", f"job {job!r} is completed; give a new job id")
        except NotFound:
            batch.jobs.create(job, pool)
        self._python = view.node_python or sys.executable
        self._env = {}
        from hpcbatch.providers import files_here
        if files_here(view.provider) and batch.url is None:
            from hpcbatch.executor import _client_paths
            self._env["PYTHONPATH"] = _client_paths()
        if batch.home is not None:
            self._blobs = Path(batch.home) / "blobs" / job
            self._temp = False
        else:  # the client's copy, uploaded into the service's home by add_tasks
            self._blobs = Path(tempfile.mkdtemp(prefix="hpcbatch-durable-"))
            self._temp = True
        self._blobs.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._blobs, 0o700)
        self._lock = threading.Lock()
        self._next = _last_index(self._service, job) + 1
        self._buffer: list[tuple[int, int, bytes, cf.Future]] = []
        self._fns: dict[int, tuple[int, Any, bytes]] = {}
        self._futures: list[cf.Future] = []
        self._shutdown = False
        self._timer: threading.Timer | None = None
        self._collector = _Collector(batch, job)

    def _fn_id(self, fn: Callable) -> int:
        entry = self._fns.get(id(fn))
        if entry is None or entry[1] is not fn:
            import cloudpickle
            entry = (len(self._fns), fn, cloudpickle.dumps(fn, protocol=5))
            self._fns[id(fn)] = entry
        return entry[0]

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        fut = self._add(fn, args, kwargs)
        with self._lock:
            full = len(self._buffer) >= self.calls_per_task
            if not full and self._timer is None:
                self._timer = threading.Timer(self.linger_s, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()
        return fut

    def _add(self, fn: Callable, args: tuple, kwargs: dict) -> cf.Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut: cf.Future = cf.Future()
        fn_id = self._fn_id(fn)
        payload, bufs = _dumps_args((args, kwargs))
        if bufs:  # a file holds them in-band
            payload = W.dumps((args, kwargs), oob=False)[0]
        with self._lock:
            self._buffer.append((self._next, fn_id, payload, fut))
            self._next += 1
            self._futures.append(fut)
        return fut

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator[Any]:
        """Records every call (at once, before it returns), then yields the results in
        order. ``chunksize`` larger than ``calls_per_task`` puts that many in a task."""
        fs = [self._add(fn, a, {}) for a in zip(*iterables)]
        self.flush(max(chunksize, self.calls_per_task))
        end = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            from hpcbatch.executor import _Bar
            bar = _Bar(f"map {self.job_id}", len(fs))
            for f in fs:
                f.add_done_callback(bar.callback(1))

        def results() -> Iterator[Any]:
            try:
                for f in fs:
                    yield f.result(None if end is None else max(0.0, end - time.monotonic()))
            finally:
                if bar is not None:
                    bar.close()
        return results()

    def flush(self, per_task: int | None = None) -> int:
        """Record every buffered call now (in tasks of up to ``per_task``). Returns how
        many were recorded."""
        per_task = per_task or self.calls_per_task
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            calls, self._buffer = self._buffer, []
        # a call cancelled while buffered is not recorded; the others can no longer be
        calls = [c for c in calls if c[3].set_running_or_notify_cancel()]
        if not calls:
            return 0
        tasks, groups = [], []
        for at in range(0, len(calls), per_task):
            group = calls[at:at + per_task]
            first, last = group[0][0], group[-1][0]
            tid = _task_id(first, last)
            fn_ids = {fn_id for _, fn_id, _, _ in group}
            fns = {fid: data for fid, _fn, data in self._fns.values() if fid in fn_ids}
            path = self._blobs / f"{tid}.in"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                pickle.dump(("calls", fns, [(i, fid, p) for i, fid, p, _ in group]), f,
                            protocol=5)
                f.flush()
                os.fsync(f.fileno())
            cmd = " ".join(shlex.quote(p) for p in (
                self._python, "-m", "hpcbatch.launch.pyworker", "--run", "calls.pkl",
                "--out", "result.pkl"))
            tasks.append({"id": tid, "command_line": cmd, "environment": self._env,
                          "max_task_retry_count": 0,
                          "resource_files": [{"source": str(path), "file_path": "calls.pkl"}]})
            groups.append((tid, [(i, fut) for i, _, _, fut in group]))
        try:
            self._batch.jobs.get(self.job_id).add_tasks(tasks)
        except BaseException as exc:
            for _, group in groups:
                for _, fut in group:
                    fut.set_exception(exc)
            raise
        finally:
            if self._temp:
                for t in tasks:
                    Path(t["resource_files"][0]["source"]).unlink(missing_ok=True)
        for tid, group in groups:
            self._collector.watch(tid, group)
        return len(calls)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Record what is buffered (``cancel_futures``: cancel it instead) and, with
        ``wait``, wait for every call of this executor. Recorded calls run on either way:
        a later ``batch.futures(job)`` collects them."""
        self._shutdown = True
        if cancel_futures:
            with self._lock:
                calls, self._buffer = self._buffer, []
            for *_, fut in calls:
                fut.cancel()
        self.flush()
        if wait:
            cf.wait(self._futures)
        self._collector.stop()
        if self._temp:
            try:
                self._blobs.rmdir()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<DurableExecutor pool={self.pool} job={self.job_id}>"


def futures(batch: Any, job_id: str) -> list[cf.Future]:
    """One future per recorded call of ``job_id``, in call order, resolved as their
    tasks complete (the results of those completed already at once)."""
    batch.service.get_job(job_id)
    batch.coordinator  # noqa: B018 - an embedded Batch starts its coordinator: calls run
    collector = _Collector(batch, job_id)
    out: list[tuple[int, cf.Future]] = []
    for item in _call_tasks(batch.service, job_id, select=["id"]):
        first, last = (int(x) for x in TASK_ID.fullmatch(item["id"]).groups())
        calls = [(i, cf.Future()) for i in range(first, last + 1)]
        for _, f in calls:
            f.set_running_or_notify_cancel()  # recorded: it runs, whatever happens here
        collector.watch(item["id"], calls)
        out += calls
    out.sort(key=lambda c: c[0])
    fs = [f for _, f in out]
    if fs:
        threading.Thread(target=lambda: (cf.wait(fs), collector.stop()), daemon=True).start()
    else:
        collector.stop()
    return fs
