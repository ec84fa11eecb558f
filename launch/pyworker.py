"""A persistent Python worker of a ``batch.executor()``: standard library + cloudpickle.

Started by the node agent as a task of the executor's job::

    python -m hpcbatch.launch.pyworker --connect 10.0.0.1,127.0.0.1 --port 40123 --worker w0

with ``HPCBATCH_EXECUTOR_TOKEN`` (a secret per executor) in its environment. It dials
the executor's client over TCP, and both sides prove they hold the token (HMAC-SHA256
over the other side's random challenge) before anything is unpickled: an
unauthenticated peer is dropped. Then it runs the calls it is sent, one at a time, in
order, and sends their results back in batches (the queue ran empty, 1,000 results,
or 5 ms since the first one waiting).

Frames (both ways): ``!IIQ`` header (meta length, buffer count, total buffer bytes),
``!Q`` per buffer, the meta pickle, then the buffers raw. Buffers are pickle protocol 5
out-of-band buffers (numpy arrays): sent with ``sendmsg`` straight from the array's
memory and received with ``recv_into`` into the bytearray the array is rebuilt on, so
a 100 MB array is never copied in user space on either side.

Messages client -> worker: ``("calls", {fn_id: fn_bytes}, [(call_id, fn_id, payload,
nbufs)], [fn_id to forget])`` (a function is sent once per worker; at most
``FN_CACHE`` are kept: the client says which to drop; a negative fn_id ``-1 - id``
runs a map chunk, its payload a list of argument tuples), ``("steal", n)`` (give back up to n
calls that have not started: another worker is idle), ``("exit",)``. Worker -> client:
``("hello", info)``, ``("results", [(call_id, ok, payload, nbufs, seconds)])``,
``("stolen", [call_id])``. A result payload is ``pickle((value,))``; an error's is
``pickle((exception, traceback text))`` or, when the exception does not pickle,
``pickle((None, traceback text, type name, message))``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import os
import pickle
import platform
import socket
import struct
import sys
import threading
import time
import traceback

TOKEN_ENV = "HPCBATCH_EXECUTOR_TOKEN"
HELLO_MAGIC = b"hpcbatch-exec-1\n"
CHALLENGE_BYTES = 32
HEADER = struct.Struct("!IIQ")
BUFLEN = struct.Struct("!Q")
MAX_META = 1 << 31  # a frame's pickle (not its buffers) above this is a broken peer
FLUSH_S = 0.005
FLUSH_N = 1000


class PeerError(Exception):
    """The other side broke the protocol or failed to authenticate."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        if k == 0:
            raise EOFError("connection closed")
        got += k


def send_frame(sock: socket.socket, meta: bytes, buffers: list = ()) -> None:
    """One frame; the buffers (PickleBuffer/memoryview) go out without being copied."""
    views = [memoryview(b).cast("B") for b in buffers]
    head = HEADER.pack(len(meta), len(views), sum(len(v) for v in views))
    parts = [head + b"".join(BUFLEN.pack(len(v)) for v in views), meta, *views]
    parts = [memoryview(p) for p in parts if len(p)]
    while parts:
        sent = sock.sendmsg(parts[:64])
        while sent:
            if sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            else:
                parts[0] = parts[0][sent:]
                sent = 0


def recv_frame(sock: socket.socket) -> tuple[bytes, list[bytearray]]:
    meta_len, nbuf, _total = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if meta_len > MAX_META:
        raise PeerError(f"frame of {meta_len} bytes")
    lens = [BUFLEN.unpack_from(_recv_exact(sock, BUFLEN.size))[0] for _ in range(nbuf)]
    meta = bytes(_recv_exact(sock, meta_len))
    bufs = []
    for n in lens:
        b = bytearray(n)
        _recv_into(sock, memoryview(b))
        bufs.append(b)
    return meta, bufs


def _mac(token: bytes, challenge: bytes, role: bytes) -> bytes:
    return hmac.new(token, role + challenge, hashlib.sha256).digest()


def authenticate(sock: socket.socket, token: bytes, role: bytes) -> None:
    """Mutual HMAC challenge: each side sends a random challenge and checks the other's
    answer, so neither a stray peer nor a fake client gets a pickle through.
    ``role`` is b"worker" or b"client" (what this side is)."""
    other = b"client" if role == b"worker" else b"worker"
    mine = os.urandom(CHALLENGE_BYTES)
    sock.sendall(HELLO_MAGIC + mine)
    got = _recv_exact(sock, len(HELLO_MAGIC) + CHALLENGE_BYTES)
    if bytes(got[:len(HELLO_MAGIC)]) != HELLO_MAGIC:
        raise PeerError("not an hpcbatch executor peer")
    theirs = bytes(got[len(HELLO_MAGIC):])
    sock.sendall(_mac(token, theirs, role))
    answer = bytes(_recv_exact(sock, 32))
    if not hmac.compare_digest(answer, _mac(token, mine, other)):
        raise PeerError("wrong executor token")


def dumps(obj, oob: bool = True) -> tuple[bytes, list]:
    """Pickle protocol 5 with out-of-band buffers (``oob=False``: in-band), with
    cloudpickle when it is there."""
    bufs: list = []
    cb = bufs.append if oob else None
    try:
        import cloudpickle
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=cb)
    except ImportError:
        data = pickle.dumps(obj, protocol=5, buffer_callback=cb)
    return data, bufs


def dumps_back(obj, oob: bool = True) -> tuple[bytes, list]:
    """A result on its way back: the C pickler first (most results are plain data, and
    the worker need not import cloudpickle for them), cloudpickle when that refuses
    (a lambda, an instance of a class that came here by value). Safe here, not in the
    client: a function of the client's __main__ pickles by reference there without
    complaint, but a by-value object here is not found under its name and is refused."""
    bufs: list = []
    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=bufs.append if oob else None), bufs
    except Exception:  # noqa: BLE001 - PicklingError, TypeError, AttributeError ...
        return dumps(obj, oob)


class Worker:
    def __init__(self, sock: socket.socket, worker_id: str):
        self.sock = sock
        self.worker_id = worker_id
        self.node = os.environ.get("HPCBATCH_NODE_ID") or socket.gethostname()
        self.queue: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.send_lock = threading.Lock()
        self.fns: dict[int, object] = {}
        self.fn_bytes: dict[int, bytes] = {}
        self.closed = False

    def send(self, msg, buffers: list = ()) -> None:
        meta = pickle.dumps(msg, protocol=5)
        with self.send_lock:
            send_frame(self.sock, meta, buffers)

    def reader(self) -> None:
        try:
            while True:
                meta, bufs = recv_frame(self.sock)
                msg = pickle.loads(meta)
                if msg[0] == "calls":
                    _, fns, calls, drop = msg if len(msg) == 4 else (*msg, ())
                    at = 0
                    items = []
                    for call_id, fn_id, payload, nbufs in calls:
                        items.append((call_id, fn_id, payload, bufs[at:at + nbufs]))
                        at += nbufs
                    with self.cv:
                        for fid in drop:  # the client's bounded cache let them go
                            self.fns.pop(fid, None)
                            self.fn_bytes.pop(fid, None)
                        self.fn_bytes.update(fns)
                        self.queue.extend(items)
                        self.cv.notify()
                elif msg[0] == "steal":
                    given = []
                    with self.cv:
                        while self.queue and len(given) < msg[1]:
                            given.append(self.queue.pop()[0])
                    self.send(("stolen", given))
                elif msg[0] == "exit":
                    break
        except (EOFError, OSError, PeerError):
            pass
        with self.cv:
            self.closed = True
            self.cv.notify()

    def _missing(self, exc: ModuleNotFoundError) -> ModuleNotFoundError:
        return ModuleNotFoundError(
            f"module {exc.name!r} is not installed on node {self.node} (python "
            f"{platform.python_version()} at {sys.executable}); install it there, or define "
            "the code in __main__ so it travels by value", name=exc.name)

    def run_one(self, fn_id: int, payload: bytes, bufs: list):
        chunk = fn_id < 0  # a map chunk: payload is a list of argument tuples
        if chunk:
            fn_id = -1 - fn_id
        fn = self.fns.get(fn_id)
        try:
            if fn is None:
                fn = self.fns[fn_id] = pickle.loads(self.fn_bytes.pop(fn_id))
            data = pickle.loads(payload, buffers=bufs)
        except ModuleNotFoundError as exc:
            raise self._missing(exc) from None
        if chunk:
            return [fn(*args) for args in data]
        args, kwargs = data
        return fn(*args, **kwargs)

    def main(self) -> None:
        threading.Thread(target=self.reader, daemon=True, name="reader").start()
        out: list = []
        out_bufs: list = []
        first = 0.0
        while True:
            with self.cv:
                while not self.queue and not self.closed and not out:
                    self.cv.wait()
                if self.closed and not self.queue:
                    break
                item = self.queue.popleft() if self.queue else None
                more = bool(self.queue)
            if item is not None:
                call_id, fn_id, payload, bufs = item
                t0 = time.perf_counter()
                try:
                    result = (self.run_one(fn_id, payload, bufs),)
                    ok = True
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - every error goes back to the caller
                    ok = False
                    tb = "".join(traceback.format_exception(exc))
                    result = (exc, tb)
                dt = time.perf_counter() - t0
                try:
                    data, rbufs = dumps_back(result)
                except BaseException as exc:  # noqa: BLE001 - an unpicklable result or error
                    what = "result" if ok else "exception"
                    tb = result[1] if not ok else "".join(traceback.format_exception(exc))
                    err = exc if ok else result[0]
                    ok = False
                    data, rbufs = pickle.dumps(
                        (None, tb, type(err).__name__,
                         f"the {what} of this call cannot be pickled back: {exc}")), []
                if not out:
                    first = time.monotonic()
                out.append((call_id, ok, data, len(rbufs), dt))
                out_bufs += rbufs
                more = bool(self.queue)
            if out and (not more or len(out) >= FLUSH_N or out_bufs
                        or time.monotonic() - first > FLUSH_S):
                try:
                    self.send(("results", out), out_bufs)
                except OSError:
                    break
                out, out_bufs = [], []
        try:
            self.sock.close()
        except OSError:
            pass


def connect(hosts: list[str], port: int, timeout_s: float) -> socket.socket:
    errors = []
    deadline = time.monotonic() + timeout_s
    while True:
        for host in hosts:
            try:
                sock = socket.create_connection((host, port), timeout=5)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc}")
        if time.monotonic() > deadline:
            raise SystemExit("pyworker: cannot reach the executor's client at "
                             + "; ".join(errors[-len(hosts):]))
        time.sleep(0.5)


def run_file(inp: str, out: str) -> int:
    """A durable executor's task: run the calls recorded in ``inp`` (``("calls", {fn_id:
    fn_bytes}, [(index, fn_id, payload)])``) in order and write ``[(index, ok, payload)]``
    to ``out`` atomically (a temporary file, fsync, rename): a task killed half-way
    leaves no result, and its calls run again in its next attempt."""
    with open(inp, "rb") as f:
        _, fns, calls = pickle.load(f)
    w = Worker(None, "file")
    w.fn_bytes.update(fns)
    results = []
    for index, fn_id, payload in calls:
        try:
            value = (w.run_one(fn_id, payload, []),)
            ok = True
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - every error goes back to the caller
            ok, value = False, (exc, "".join(traceback.format_exception(exc)))
        try:
            data, _ = dumps_back(value, oob=False)
        except BaseException as exc:  # noqa: BLE001 - an unpicklable result or error
            tb = value[1] if not ok else "".join(traceback.format_exception(exc))
            err = exc if ok else value[0]
            ok, data = False, pickle.dumps((None, tb, type(err).__name__,
                                            f"the result of this call cannot be pickled: "
                                            f"{exc}"))
        results.append((index, ok, data))
    tmp = f"{out}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(results, f, protocol=5)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcbatch.launch.pyworker")
    ap.add_argument("--connect", help="the client's addresses, comma-separated")
    ap.add_argument("--port", type=int)
    ap.add_argument("--worker")
    ap.add_argument("--connect-timeout-s", type=float, default=30.0)
    ap.add_argument("--run", help="durable mode: run the calls in this file ...")
    ap.add_argument("--out", help="... and write their results here")
    a = ap.parse_args(argv)
    if a.run:
        return run_file(a.run, a.out or "result.pkl")
    if not (a.connect and a.port and a.worker):
        ap.error("give --connect, --port and --worker (or --run)")
    token = os.environ.pop(TOKEN_ENV, "").encode()
    if not token:
        print(f"pyworker: {TOKEN_ENV} is not set", file=sys.stderr)
        return 2
    sock = connect([h for h in a.connect.split(",") if h], a.port, a.connect_timeout_s)
    try:
        authenticate(sock, token, b"worker")
    except (PeerError, EOFError, OSError) as exc:
        print(f"pyworker: the executor at port {a.port} did not authenticate: {exc}",
              file=sys.stderr)
        return 3
    w = Worker(sock, a.worker)
    w.send(("hello", {"worker": a.worker, "node": w.node, "host": socket.gethostname(),
                      "pid": os.getpid(), "python": platform.python_version(),
                      "executable": sys.executable,
                      "task": os.environ.get("HPCBATCH_TASK_ID", "")}))
    print(f"pyworker {a.worker}: connected to port {a.port} from node {w.node} "
          f"(pid {os.getpid()})", flush=True)
    w.main()
    print(f"pyworker {a.worker}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
