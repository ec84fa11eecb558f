"""``batch.executor()``: a ``concurrent.futures.Executor`` over a pool's nodes.

::

    with hpcbatch.Batch() as batch, batch.executor() as ex:
        print(sum(ex.map(lambda x: x * x, range(10_000), chunksize=100)))

The executor starts persistent Python workers (``launch/pyworker.py``) as ordinary
tasks of a job on the pool, one per task slot (or ``workers_per_node`` per node, each
taking ``slots // workers_per_node`` slots), so they show in ``hpcbatch task list``,
have their stdout/stderr, count against the pool's slots and are killed with the job.
Each worker dials back to this process over TCP (the address the nodes reach it at)
and both sides prove they hold the executor's random token (HMAC) before any pickle
is read. Calls are cloudpickled here (a function once per worker), sent in batches,
at most ``max_inflight`` per worker; an idle worker takes back calls queued behind a
slow one on another worker (the busy one gives back what it has not started). A
worker that dies fails exactly the calls it held, with the node and signal, and is
replaced up to ``max_restarts`` times.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import os
import pickle
import platform
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

from hpcbatch.errors import HpcBatchError, NotFound, ValidationError
from hpcbatch.launch import pyworker as W

DEFAULT_MAX_INFLIGHT = 128  # calls a worker may hold (running + queued) at once
STEAL_AFTER_S = 0.05  # an idle worker takes queued calls from one silent this long
LOST_EXIT_WAIT_S = 5.0  # how long a lost worker's task is watched for its exit signal
MONITOR_S = 0.5  # how often workers that have not connected are looked at
BATCH_MAX = 2000  # calls per frame
FN_CACHE = 1024  # functions kept pickled here, and per worker (oldest dropped first)
_SAFE_ARG_TYPES = {int, float, str, bytes, bool, type(None), complex}


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised on a worker (its ``__cause__``)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(HpcBatchError):
    """A remote exception that could not be pickled back (its type name and text)."""


class WorkerLostError(HpcBatchError):
    """The worker running this call died (named: node, pid, signal)."""


class BrokenExecutor(cf.BrokenExecutor, HpcBatchError):
    """The executor gave up (why is the message)."""


class _Call:
    __slots__ = ("id", "future", "fn_id", "fn_data", "payload", "bufs", "kind", "started",
                 "n")

    def __init__(self, call_id: int, future: cf.Future, fn_id: int, fn_data: bytes,
                 payload: bytes, bufs: list, kind: int, n: int = 1):
        self.id = call_id
        self.future = future
        self.fn_id = fn_id
        self.fn_data = fn_data  # its function's pickle (sent once per worker)
        self.payload = payload
        self.bufs = bufs
        self.kind = kind  # 0: fn(*args, **kwargs); 1: [fn(*a) for a in chunk]
        self.started = False
        self.n = n


class _Worker:
    def __init__(self, worker_id: str, task_id: str):
        self.id = worker_id
        self.task_id = task_id
        self.sock: socket.socket | None = None
        self.info: dict[str, Any] = {}
        self.inflight: dict[int, _Call] = {}
        self.fns_sent: dict[int, None] = {}  # in the order sent (a bounded cache there)
        self.state = "starting"  # starting -> up -> gone
        self.steal_pending = False
        self.last_heard = time.monotonic()
        self.send_lock = threading.Lock()
        self.started_at = time.monotonic()

    def where(self) -> str:
        node = self.info.get("node") or "?"
        pid = self.info.get("pid")
        return f"worker {self.id} on node {node}" + (f" (pid {pid})" if pid else "")

    def send(self, msg: Any, buffers: list = ()) -> None:
        meta = pickle.dumps(msg, protocol=5)
        with self.send_lock:
            W.send_frame(self.sock, meta, buffers)


def _source_address(host: str, port: int = 22) -> str:
    """The address of this machine that traffic to ``host`` leaves from."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _client_paths() -> str:
    """The client's sys.path as a PYTHONPATH (local pools: workers import what we do)."""
    out = []
    for p in sys.path:
        p = os.path.abspath(p or os.getcwd())
        if os.path.isdir(p) and p not in out:
            out.append(p)
    return os.pathsep.join(out)


_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for ex in list(_live):
        ex._teardown(wait_tasks=False)


class PoolExecutor(cf.Executor):
    """See :meth:`hpcbatch.Batch.executor`."""

    def __init__(self, batch: Any, pool: str = "local", workers_per_node: int | None = None,
                 job: str | None = None, *, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 max_restarts: int | None = None, connect_timeout_s: float = 60.0,
                 env: dict[str, str] | None = None):
        if max_inflight is None or isinstance(max_inflight, bool) or \
                not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValidationError("max_inflight", f"{max_inflight!r} must be a whole number >= 1")
        if workers_per_node is not None and (isinstance(workers_per_node, bool) or not
                                             isinstance(workers_per_node, int)
                                             or workers_per_node < 1):
            raise ValidationError("workers_per_node",
                                  f"{workers_per_node!r} must be a whole number >= 1")
        self._batch = batch
        self._service = batch.service
        view = self._service.get_pool(pool)
        self.pool = pool
        nodes = max(view.nodes, view.target_nodes, 1)
        slots = view.task_slots_per_node
        per = workers_per_node or slots
        if per > slots:
            raise ValidationError("workers_per_node", f"{per} is more than the {slots} task "
                                  f"slot(s) per node of pool {pool!r}; give at most {slots}")
        self._worker_slots = max(1, slots // per)
        self.n_workers = nodes * per
        self.max_inflight = max_inflight
        self.max_restarts = (2 * self.n_workers + 2) if max_restarts is None else max_restarts
        self.connect_timeout_s = connect_timeout_s
        self._xid = secrets.token_hex(3)
        self._token = secrets.token_hex(32)
        self._own_job = job is None
        self.job_id = job or f"exec-{time.strftime('%Y%m%d-%H%M%S')}-{self._xid}"
        self._python = view.node_python or sys.executable
        self._env = {**self._worker_env(view), **(env or {})}
        addresses = self._addresses(view)
        bind = "127.0.0.1" if all(a.startswith("127.") for a in addresses) else "0.0.0.0"
        self._listener = socket.create_server((bind, 0), backlog=128)
        self._port = self._listener.getsockname()[1]
        self._connect = ",".join(dict.fromkeys(addresses))

        self._cv = threading.Condition()
        self._pending: deque[_Call] = deque()
        self._workers: dict[str, _Worker] = {}
        self._hungry = 0
        self._ids = itertools.count()
        self._fn_ids: dict[int, tuple[int, Any, bytes]] = {}  # id(fn) -> (fn_id, fn, bytes)
        self._fn_counter = itertools.count()
        self._restarts = 0
        self._last_loss = ""
        self._broken: str | None = None
        self._shutdown = False
        self._closed = False
        self._threads: list[threading.Thread] = []

        try:
            self._ensure_job()
            for _ in range(self.n_workers):
                self._add_worker()
        except BaseException:
            self._listener.close()
            raise
        _live.add(self)
        self._spawn(self._accept_loop, "accept")
        self._spawn(self._monitor_loop, "monitor")

    # ---- set-up ----------------------------------------------------------

    def _spawn(self, target: Callable, name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True,
                             name=f"hpcbatch-exec-{self._xid}-{name}")
        t.start()
        self._threads.append(t)
        return t

    def _addresses(self, view: Any) -> list[str]:
        hosts = [h.get("hostname") for h in (view.provider_config or {}).get("hosts", [])]
        url = getattr(self._batch, "url", None)
        if not hosts and url:
            hosts = [urlparse(url).hostname or "127.0.0.1"]
        if not hosts:
            return ["127.0.0.1"]
        return [_source_address(h) for h in hosts if h]

    def _worker_env(self, view: Any) -> dict[str, str]:
        env = {W.TOKEN_ENV: self._token}
        from hpcbatch.providers import files_here
        if files_here(view.provider) and getattr(self._batch, "url", None) is None:
            env["PYTHONPATH"] = _client_paths()
        return env

    def _ensure_job(self) -> None:
        try:
            v = self._service.get_job(self.job_id)
        except NotFound:
            self._batch.jobs.create(self.job_id, self.pool)
            return
        if v.pool_id != self.pool:
            raise ValidationError("job", f"job {self.job_id!r} runs on pool {v.pool_id!r}, "
                                  f"not {self.pool!r}; give another job id or pool")
        if v.state == "completed":
            raise ValidationError("job", f"job {self.job_id!r} is completed; give a new job id")

    def _add_worker(self) -> _Worker:
        n = len(self._workers)
        wid = f"w{n}"
        task_id = f"pyw-{self._xid}-{n}"
        w = _Worker(wid, task_id)
        with self._cv:
            self._workers[wid] = w
        cmd = (f"{self._python} -m hpcbatch.launch.pyworker --connect {self._connect} "
               f"--port {self._port} --worker {wid} "
               f"--connect-timeout-s {self.connect_timeout_s:g}")
        import shlex
        cmd = " ".join(shlex.quote(p) for p in shlex.split(cmd))
        self._batch.jobs.get(self.job_id).add_tasks([{
            "id": task_id, "command_line": cmd, "environment": self._env,
            "required_slots": self._worker_slots, "max_task_retry_count": 0}])
        return w

    # ---- connections -----------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._handshake, "handshake", sock)

    def _handshake(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            W.authenticate(sock, self._token.encode(), b"client")
            meta, _ = W.recv_frame(sock)
            msg = pickle.loads(meta)  # the peer holds the token: trusted
            sock.settimeout(None)
        except (OSError, EOFError, W.PeerError, pickle.UnpicklingError, ValueError):
            sock.close()
            return
        info = msg[1] if isinstance(msg, tuple) and msg and msg[0] == "hello" else {}
        with self._cv:
            w = self._workers.get(info.get("worker"))
            if w is None or w.state != "starting" or self._closed:
                sock.close()
                return
            w.sock, w.info, w.state = sock, info, "up"
            w.last_heard = time.monotonic()
        mine = platform.python_version()
        theirs = str(info.get("python", "?"))
        if theirs.split(".")[:2] != mine.split(".")[:2]:
            self._break(f"node {info.get('node')} runs Python {theirs} "
                        f"({info.get('executable')}) but this client runs Python {mine} "
                        f"({sys.executable}); functions pickled here cannot be read there: "
                        "give the pool a python of the same version (pool option 'python')")
            self._send_exit(w)
            return
        self._spawn(self._reader, f"reader-{w.id}", w)
        self._spawn(self._sender, f"sender-{w.id}", w)
        with self._cv:
            self._cv.notify_all()

    def _send_exit(self, w: _Worker) -> None:
        try:
            w.send(("exit",))
        except (OSError, AttributeError):
            pass

    # ---- the send side ---------------------------------------------------

    def _sender(self, w: _Worker) -> None:
        while True:
            victim = None
            with self._cv:
                while True:
                    if w.state != "up":
                        return
                    if self._pending and len(w.inflight) < self.max_inflight:
                        break
                    if not self._pending and not w.inflight:
                        victim = self._steal_victim(w)
                        if victim is not None:
                            break
                    hungry = not self._pending
                    self._hungry += hungry
                    try:
                        self._cv.wait(STEAL_AFTER_S if hungry and not w.inflight
                                      and self._anyone_busy() else None)
                    finally:
                        self._hungry -= hungry
                if victim is not None:
                    batch = []
                else:
                    batch = []
                    room = self.max_inflight - len(w.inflight)
                    pending = self._pending
                    while pending and room > 0 and len(batch) < BATCH_MAX:
                        c = pending.popleft()
                        if not c.started:
                            if not c.future.set_running_or_notify_cancel():
                                continue
                            c.started = True
                        w.inflight[c.id] = c
                        batch.append(c)
                        room -= 1
            if victim is not None:
                try:
                    victim.send(("steal", max(1, len(victim.inflight) // 2)))
                except OSError:
                    pass
                continue
            if not batch:
                continue
            fns, drop = {}, []
            for c in batch:
                if c.fn_id not in w.fns_sent:
                    fns[c.fn_id] = c.fn_data
                    w.fns_sent[c.fn_id] = None
            in_batch = {c.fn_id for c in batch}
            while len(w.fns_sent) > FN_CACHE:
                old = next((f for f in w.fns_sent if f not in in_batch), None)
                if old is None:
                    break
                del w.fns_sent[old]
                drop.append(old)
            bufs: list = []
            calls = []
            for c in batch:
                calls.append((c.id, c.fn_id if c.kind == 0 else -1 - c.fn_id, c.payload,
                              len(c.bufs)))
                bufs += c.bufs
            try:
                w.send(("calls", fns, calls, drop), bufs)
            except OSError:
                return  # the reader sees the connection go and fails what it held

    def _anyone_busy(self) -> bool:
        return any(len(v.inflight) > 1 for v in self._workers.values() if v.state == "up")

    def _steal_victim(self, w: _Worker) -> _Worker | None:
        now = time.monotonic()
        best = None
        for v in self._workers.values():
            if v is w or v.state != "up" or v.steal_pending or len(v.inflight) < 2:
                continue
            if now - v.last_heard < STEAL_AFTER_S:
                continue
            if best is None or len(v.inflight) > len(best.inflight):
                best = v
        if best is not None:
            best.steal_pending = True
        return best

    # ---- the receive side ------------------------------------------------

    def _reader(self, w: _Worker) -> None:
        try:
            while True:
                meta, bufs = W.recv_frame(w.sock)
                msg = pickle.loads(meta)
                w.last_heard = time.monotonic()
                if msg[0] == "results":
                    self._take_results(w, msg[1], bufs)
                elif msg[0] == "stolen":
                    with self._cv:
                        back = [w.inflight.pop(cid) for cid in msg[1] if cid in w.inflight]
                        self._pending.extendleft(reversed(back))
                        w.steal_pending = False
                        self._cv.notify_all()
        except (EOFError, OSError, W.PeerError, pickle.UnpicklingError):
            pass
        self._lost(w)

    def _take_results(self, w: _Worker, results: list, bufs: list) -> None:
        at = 0
        done = []
        with self._cv:
            for call_id, ok, payload, nb, _dt in results:
                c = w.inflight.pop(call_id, None)
                done.append((c, ok, payload, bufs[at:at + nb]))
                at += nb
            self._cv.notify_all()
        for c, ok, payload, cbufs in done:
            if c is None:
                continue
            try:
                value = pickle.loads(payload, buffers=cbufs)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it
                c.future.set_exception(HpcBatchError(
                    f"the result of this call from {w.where()} cannot be read here: "
                    f"{type(exc).__name__}: {exc}"))
                continue
            if ok:
                c.future.set_result(value[0])
            else:
                c.future.set_exception(remote_exception(value, f"on {w.where()}"))

    def _lost(self, w: _Worker) -> None:
        with self._cv:
            expected = self._closed or w.state == "gone"
            w.state = "gone"
            held = list(w.inflight.values())
            w.inflight.clear()
            self._cv.notify_all()
        try:
            w.sock.close()
        except OSError:
            pass
        if expected and not held:
            return
        why = self._exit_of(w)
        text = f"{w.where()} {why} (task {self.job_id}/{w.task_id})"
        for c in held:
            c.future.set_exception(WorkerLostError(f"{text} while this call was in flight"))
        self._replace(w, text)

    def _exit_of(self, w: _Worker) -> str:
        deadline = time.monotonic() + LOST_EXIT_WAIT_S
        while time.monotonic() < deadline and not self._closed:
            try:
                t = self._service.get_task(self.job_id, w.task_id)
            except HpcBatchError:
                break
            if t.state == "completed":
                if t.signal:
                    try:
                        name = signal.Signals(t.signal).name
                    except ValueError:
                        name = f"signal {t.signal}"
                    return f"was killed by {name}"
                if t.exit_code is not None:
                    return f"exited with code {t.exit_code}"
                return f"ended ({t.failure})"
            time.sleep(0.05)
        return "closed its connection (it exited or its node was lost)"

    def _replace(self, w: _Worker, why: str) -> None:
        with self._cv:
            self._last_loss = why
            if self._shutdown or self._closed or self._broken:
                return
            if self._restarts >= self.max_restarts:
                alive = [v for v in self._workers.values() if v.state != "gone"]
                if not alive:
                    reason = (f"gave up after {self._restarts} worker restart(s) "
                              f"(max_restarts={self.max_restarts}); the last: {why}")
                else:
                    return
            else:
                self._restarts += 1
                reason = None
        if reason:
            self._break(reason)
            return
        try:
            self._add_worker()
        except HpcBatchError as exc:
            self._break(f"cannot start a worker in place of {w.id}: {exc}")

    def _break(self, reason: str) -> None:
        with self._cv:
            if self._broken:
                return
            self._broken = reason
            left = list(self._pending)
            self._pending.clear()
            for v in self._workers.values():
                left += v.inflight.values()
                v.inflight.clear()
            self._cv.notify_all()
        for c in left:
            if not c.future.done():
                if not c.started:
                    c.future.set_running_or_notify_cancel()
                if not c.future.done():
                    c.future.set_exception(BrokenExecutor(reason))

    def _monitor_loop(self) -> None:
        """Workers whose task ended before they connected, or never connect."""
        while not self._closed and not self._shutdown:
            time.sleep(MONITOR_S)
            with self._cv:
                starting = [w for w in self._workers.values() if w.state == "starting"]
            for w in starting:
                try:
                    t = self._service.get_task(self.job_id, w.task_id)
                except HpcBatchError:
                    continue
                except sqlite3.ProgrammingError:  # the Batch was closed meanwhile
                    if self._closed or self._shutdown:
                        return
                    raise
                if t.state != "completed":
                    continue
                with self._cv:
                    if w.state != "starting":
                        continue
                    w.state = "gone"
                tail = ""
                try:
                    err = self._service.read_task_file(self.job_id, w.task_id, "stderr.txt")
                    lines = err.decode(errors="replace").strip().splitlines()
                    tail = f": {lines[-1]}" if lines else ""
                except HpcBatchError:
                    pass
                why = (f"worker {w.id} (task {self.job_id}/{w.task_id}) ended before it "
                       f"connected ({t.failure or 'exit ' + str(t.exit_code)}){tail}")
                self._replace(w, why)

    # ---- the Executor API ------------------------------------------------

    def _fn_id(self, fn: Callable) -> tuple[int, Any, bytes]:
        """The id of ``fn``, pickled once (a lambda made anew for every call gets a new
        id each time: at most FN_CACHE are kept, oldest dropped first)."""
        entry = self._fn_ids.get(id(fn))
        if entry is None or entry[1] is not fn:
            import cloudpickle
            data = cloudpickle.dumps(fn, protocol=5)
            with self._cv:
                entry = (next(self._fn_counter), fn, data)
                self._fn_ids[id(fn)] = entry
                while len(self._fn_ids) > FN_CACHE:
                    del self._fn_ids[next(iter(self._fn_ids))]
        return entry

    def _check_open(self) -> None:
        if self._broken:
            raise BrokenExecutor(self._broken)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _enqueue(self, fn: Callable, payload_obj: Any, kind: int, n: int = 1) -> cf.Future:
        self._check_open()
        fut: cf.Future = cf.Future()
        try:
            fn_id, _, fn_data = self._fn_id(fn)
            payload, bufs = _dumps_args(payload_obj)
        except Exception as exc:  # noqa: BLE001 - an unpicklable call fails its future
            fut.set_running_or_notify_cancel()
            fut.set_exception(exc)
            return fut
        c = _Call(next(self._ids), fut, fn_id, fn_data, payload, bufs, kind, n)
        with self._cv:
            if self._broken:
                raise BrokenExecutor(self._broken)
            self._pending.append(c)
            if self._hungry:
                self._cv.notify_all()
        return fut

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        return self._enqueue(fn, (args, kwargs), 0)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: results in order; ``chunksize``
        calls travel and run as one; ``progress=True`` shows a rich progress bar."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValidationError("chunksize", f"{chunksize!r} must be a whole number >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        args = zip(*iterables)
        if chunksize == 1:
            fs = [self._enqueue(fn, (a, {}), 0) for a in args]
            sizes = None
        else:
            fs, sizes = [], []
            while True:
                chunk = list(itertools.islice(args, chunksize))
                if not chunk:
                    break
                fs.append(self._enqueue(fn, chunk, 1, len(chunk)))
                sizes.append(len(chunk))
        bar = _Bar("map", sum(sizes) if sizes else len(fs)) if progress else None
        if bar is not None:
            for i, f in enumerate(fs):
                f.add_done_callback(bar.callback(sizes[i] if sizes else 1))
        return self._results(fs, sizes is not None, end, bar)

    @staticmethod
    def _results(fs: list, chunked: bool, end: float | None, bar: Any) -> Iterator[Any]:
        try:
            fs.reverse()
            while fs:
                f = fs.pop()
                left = None if end is None else max(0.0, end - time.monotonic())
                if chunked:
                    yield from f.result(left)
                else:
                    yield f.result(left)
        finally:
            for f in fs:
                f.cancel()
            if bar is not None:
                bar.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cv:
            self._shutdown = True
            if cancel_futures:
                for c in self._pending:
                    c.future.cancel()
                self._pending = deque(c for c in self._pending if not c.future.cancelled())
            self._cv.notify_all()
        if wait:
            self._drain()
            self._teardown(wait_tasks=True)
        else:
            threading.Thread(target=lambda: (self._drain(), self._teardown(wait_tasks=True)),
                             daemon=True).start()

    def _drain(self) -> None:
        with self._cv:
            while not self._broken and (self._pending or any(
                    w.inflight for w in self._workers.values())):
                if not any(w.state != "gone" for w in self._workers.values()):
                    break
                self._cv.wait(0.5)

    def _teardown(self, wait_tasks: bool) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers.values())
            for w in workers:
                if w.state == "up":
                    w.state = "gone"
            self._cv.notify_all()
        try:
            self._listener.close()
        except OSError:
            pass
        for w in workers:
            if w.sock is not None:
                self._send_exit(w)
                try:
                    w.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        _live.discard(self)
        if not wait_tasks:
            return
        try:
            self._service.wait_job(self.job_id, timeout_s=10.0)
        except (TimeoutError, HpcBatchError):
            pass
        if self._own_job:
            try:
                self._service.terminate_job(self.job_id)
            except HpcBatchError:
                pass

    # ---- looking at it ---------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Each worker: id, task, state (starting/up/gone), node, pid, calls held."""
        with self._cv:
            return [{"id": w.id, "task": w.task_id, "state": w.state,
                     "node": w.info.get("node"), "pid": w.info.get("pid"),
                     "inflight": len(w.inflight)} for w in self._workers.values()]

    def held_by(self, worker_id: str) -> list[cf.Future]:
        """The futures whose calls worker ``worker_id`` holds now (running or queued
        there)."""
        with self._cv:
            w = self._workers.get(worker_id)
            return [c.future for c in w.inflight.values()] if w else []

    def wait_for_workers(self, n: int | None = None, timeout_s: float = 60.0) -> None:
        """Block until ``n`` (default: all) workers are connected."""
        n = self.n_workers if n is None else n
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while sum(w.state == "up" for w in self._workers.values()) < n:
                if self._broken:
                    raise BrokenExecutor(self._broken)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{n} workers of job {self.job_id} did not all "
                                       f"connect within {timeout_s:g} s")
                self._cv.wait(min(left, 0.2))

    def __repr__(self) -> str:
        return f"<PoolExecutor pool={self.pool} job={self.job_id} workers={self.n_workers}>"


def _dumps_args(obj: Any) -> tuple[bytes, list]:
    """Pickle a call's arguments: plain pickle for plain values (fast), else cloudpickle
    (lambdas, closures, __main__ objects travel by value); protocol 5 buffers out of band."""
    if type(obj) is tuple and not obj[1] and all(type(a) in _SAFE_ARG_TYPES for a in obj[0]):
        return pickle.dumps(obj, protocol=5), []
    return W.dumps(obj)


def remote_exception(value: tuple, where: str) -> BaseException:
    """A call's failure as the worker sent it ((exception, traceback text), or when the
    exception did not pickle (None, traceback, type name, message)), re-raisable here:
    its remote traceback as ``__cause__`` and a note saying ``where`` ("on worker w1
    on node n1") it was raised."""
    if value[0] is None:
        _, tb, typename, text = value
        exc: BaseException = RemoteError(f"{typename} {where}: {text}")
    else:
        exc, tb = value
    exc.__cause__ = RemoteTraceback(tb)
    try:
        exc.add_note(f"raised {where}; remote traceback:\n{tb.rstrip()}")
    except (AttributeError, TypeError):
        pass
    return exc


class _Bar:
    """A rich progress bar advanced from futures' done callbacks (any thread)."""

    def __init__(self, what: str, total: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn())
        self.task = self.progress.add_task(what, total=total, failed=0)
        self.failed = 0
        self.lock = threading.Lock()
        self.progress.start()

    def callback(self, n: int) -> Callable[[cf.Future], None]:
        def done(f: cf.Future) -> None:
            with self.lock:
                if f.cancelled() or f.exception() is not None:
                    self.failed += 1
                self.progress.update(self.task, advance=n, failed=self.failed)
        return done

    def close(self) -> None:
        self.progress.stop()


def as_completed(fs: Iterable[cf.Future], timeout: float | None = None, *,
                 progress: bool = False) -> Iterator[cf.Future]:
    """``concurrent.futures.as_completed`` with an optional rich progress bar."""
    fs = list(fs)
    if not progress:
        yield from cf.as_completed(fs, timeout)
        return
    bar = _Bar("done", len(fs))
    try:
        for f in cf.as_completed(fs, timeout):
            bar.callback(1)(f)
            yield f
    finally:
        bar.close()
