"""How bytes reach a node's agent: the transport seam.

Every transport yields an :class:`AgentChannel`: a line-framed duplex stream to one
agent carrying the messages of ``hpcbatch.launch.protocol``. ``LocalTransport`` starts
the agent as a subprocess (in a session of its own) with pipes; ``SSHTransport`` runs
it over one paramiko exec channel. The coordinator does not know which one it talks
to. Files move the same way: ``AgentChannel.put_files`` copies on this machine's
filesystem for a local agent and over SFTP (on the agent's own SSH connection) for a
remote one.

No call of a channel blocks its caller on the agent: ``send_many`` queues for a writer
thread of the channel (a stopped agent that does not read its input marks the channel
broken instead of stalling the coordinator), and ``close`` ends the agent on a thread.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from hpcbatch import env as env_module
from hpcbatch.launch import agent as agent_module
from hpcbatch.launch import mpi as mpi_module
from hpcbatch.launch import nodecache
from hpcbatch.launch import protocol as P
from hpcbatch.timings import Timings

log = logging.getLogger("hpcbatch.transport")

AGENT_PATH = Path(agent_module.__file__)
PROTOCOL_PATH = Path(P.__file__)
# what travels to a node with the agent (stdlib only), in upload order: the agent last,
# so an agent.py that is there always has the rest beside it. mpi.py is hpcbatch-mpiexec
# (the agent puts a shim for it on every task's PATH), env.py its variable names.
UPLOADED = ((PROTOCOL_PATH, 0o644), (Path(env_module.__file__), 0o644),
            (Path(mpi_module.__file__), 0o644), (Path(nodecache.__file__), 0o644),
            (AGENT_PATH, 0o755),
            (AGENT_PATH.with_name("appunpack.py"), 0o644))  # application packages
WRITE_CHUNK = 1 << 20


def new_token() -> str:
    """A fresh agent token (names its record file and marks its tasks' environment)."""
    return secrets.token_hex(8)


def agent_args(node_id: str, root: str | os.PathLike, *, token: str, timings: Timings,
               slots: int, reap_stale: bool = True, mpi_prefix: str | None = None) -> list[str]:
    """The agent's command-line arguments (after the python and the script)."""
    args = ["--node-id", node_id, "--root", str(root), "--slots", str(slots),
            "--token", token, "--heartbeat-s", repr(float(timings.heartbeat_s)),
            "--lease-s", repr(float(timings.lease_s)),
            "--kill-grace-s", repr(float(timings.kill_grace_s))]
    if mpi_prefix:
        args += ["--mpi-prefix", mpi_prefix]
    return [*args, "--reap-stale"] if reap_stale else args


class AgentChannel:
    """A started agent: messages go out through a writer thread of the channel, come in
    (decoded) on a reader thread.

    ``write(data)`` may block (a full pipe, a closed SSH window): only the writer thread
    calls it. ``end_input()`` runs on the writer thread after its last write (the agent
    sees EOF). ``finish(abort)`` runs on a closer thread once writing stopped: it ends
    the stream and waits (bounded) for the agent's end. ``unblock()`` makes a write that
    does not return fail (kill the local agent, cut the SSH connection)."""

    def __init__(self, name: str, write: Callable[[bytes], Any], readline: Callable[[], bytes],
                 *, end_input: Callable[[], None], finish: Callable[[bool], None],
                 unblock: Callable[[], None] | None = None,
                 put_files: Callable[[Iterable[tuple[str, str]], str], None] | None = None,
                 last_words: Callable[[], str] | None = None, pid: int | None = None,
                 token: str = "", stall_s: float = 30.0, close_timeout_s: float = 15.0,
                 max_queued_bytes: int = 64 << 20,
                 stage_cached: Callable[[list[CachedFile], str, int], dict] | None = None,
                 node_files: Callable[[], Any] | None = None, files_here: bool = False):
        self.name = name
        self._stage_cached = stage_cached
        self._node_files = node_files
        self.files_here = files_here  # the node's files are on this machine (a local node)
        self.pid = pid  # the agent's pid on this machine (a local agent), else None
        self.token = token
        self.stall_s = stall_s
        self.close_timeout_s = close_timeout_s
        self.max_queued_bytes = max_queued_bytes
        self.broken: str | None = None  # why the channel cannot carry messages any more
        self.closed_event = threading.Event()  # set once close() has finished its work
        self._write = write
        self._readline = readline
        self._end_input = end_input
        self._finish = finish
        self._unblock = unblock
        self._put_files = put_files or copy_local_files
        self._last_words = last_words
        self._cv = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._busy_since: float | None = None
        self._closing = False
        self._abort = False
        self._writer_done = threading.Event()
        self._deliver = threading.Lock()
        self._on_message: Callable[[Any], None] | None = None
        self._ended = False
        self._writer = threading.Thread(target=self._write_loop, name=f"agent-writer-{name}",
                                        daemon=True)
        self._writer.start()

    @property
    def closed(self) -> bool:
        """True once the channel was closed or broke: nothing sent arrives any more."""
        return self._closing or self.broken is not None

    # ---- out -----------------------------------------------------------------

    def send_many(self, msgs: Iterable[Any]) -> bool:
        """Queue protocol messages for the agent and return at once; False when the
        channel is closed or broken (then nothing was queued). A channel whose agent has
        not taken its input for ``stall_s``, or with more than ``max_queued_bytes``
        waiting, is marked broken."""
        data = P.encode_many(msgs)
        with self._cv:
            if self.closed:
                return False
            now = time.monotonic()
            if self._busy_since is not None and now - self._busy_since > self.stall_s:
                why = (f"the agent has not read its input for {now - self._busy_since:.1f} s "
                       f"(stopped, or its host stalls)")
            elif self._queued + len(data) > self.max_queued_bytes:
                why = (f"{self._queued + len(data)} bytes are waiting for the agent (more "
                       f"than {self.max_queued_bytes})")
            else:
                if data:
                    self._queue.append(data)
                    self._queued += len(data)
                    self._cv.notify()
                return True
        self._mark_broken(why)
        return False

    def send(self, msg: Any) -> bool:
        return self.send_many([msg])

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._closing and self.broken is None:
                        self._cv.wait()
                    if self._abort or self.broken is not None or not self._queue:
                        return
                    parts, size = [], 0
                    while self._queue and size < WRITE_CHUNK:
                        parts.append(self._queue.popleft())
                        size += len(parts[-1])
                    self._queued -= size
                    self._busy_since = time.monotonic()
                self._write(b"".join(parts))
                with self._cv:
                    self._busy_since = None
        except Exception as exc:  # noqa: BLE001 - whatever the stream raises ends it
            if not self._closing:
                self._mark_broken(f"cannot write to the agent: {exc}")
        finally:
            with self._cv:
                self._busy_since = None
            try:
                self._end_input()
            except Exception:  # noqa: BLE001, S110 - the stream is over either way
                pass
            self._writer_done.set()

    def _mark_broken(self, why: str) -> None:
        with self._cv:
            if self.broken is not None:
                return
            self.broken = why
            self._cv.notify_all()
        log.warning("agent %s: channel broken: %s", self.name, why)
        self._end()

    # ---- in ------------------------------------------------------------------

    def listen(self, on_message: Callable[[Any], None]) -> threading.Thread:
        """Call ``on_message`` with each decoded agent message (protocol.Hello, Events,
        Heartbeat, Bye) on a reader thread, and with ``None`` once, when the channel
        ends or breaks. A line that is no valid message is logged and delivered as an
        ``Events`` holding one ``Error`` that says so."""
        with self._deliver:
            self._on_message = on_message
            ended = self._ended
        if ended:
            on_message(None)

        def pump() -> None:
            try:
                while not self._ended:
                    line = self._readline()
                    if not line:
                        break
                    if not line.strip():
                        continue
                    try:
                        msg = P.decode_ev(line)
                    except P.ProtocolError as exc:
                        log.warning("agent %s: %s", self.name, exc)
                        msg = P.Events((P.Error(message=f"unreadable line from the agent: "
                                                f"{exc}"),))
                    with self._deliver:
                        if self._ended:
                            break
                        on_message(msg)
            except (OSError, ValueError, EOFError):
                pass
            finally:
                self._end()

        t = threading.Thread(target=pump, name=f"agent-reader-{self.name}", daemon=True)
        if not ended:
            t.start()
        return t

    def _end(self) -> None:
        with self._deliver:
            if self._ended:
                return
            self._ended = True
            cb = self._on_message
        if cb is not None:
            cb(None)

    # ---- files, last words, close -------------------------------------------------

    def last_words(self) -> str:
        """Once the channel has ended: what the agent's end said (exit status, the tail
        of its stderr), for the node's reason; empty when nothing is known."""
        try:
            return self._last_words() if self._last_words else ""
        except Exception:  # noqa: BLE001 - only ever an addition to a message
            return ""

    def put_files(self, files: Iterable[tuple[str, str]], dest_dir: str) -> None:
        """Copy (local source, relative destination) pairs into dest_dir on the node,
        keeping permission bits. Blocking: call it off the coordinator's loop."""
        self._put_files(files, dest_dir)

    def stage_cached(self, files: list[CachedFile], dest_dir: str, cap_bytes: int) -> dict:
        """Place files in dest_dir on the node through its cache (``<root>/cache``):
        each not cached there yet is sent once (checked against its SHA-256 on the
        node), then copied into place with its mode. Returns {"fetched": [sha256 ...],
        "hits": n, "placed": n, "evicted": n}. Blocking: call it off the loop."""
        if self._stage_cached is None:
            raise OSError("this channel cannot stage files through a node cache")
        return self._stage_cached(files, dest_dir, cap_bytes)

    def node_files(self) -> Any:
        """A context manager giving a :class:`NodeFiles` of the node (one SFTP session
        over the agent's own connection for an SSH node). Blocking: off the loop."""
        if self._node_files is None:
            raise OSError("this channel cannot read the node's files")
        return self._node_files()

    def close(self, *, abort: bool = False) -> None:
        """End the channel without blocking the caller. Graceful: what is queued is
        written, then the agent's input ends (it stops its tasks: SIGTERM, SIGKILL after
        the grace, and exits); after ``close_timeout_s`` it is cut off as with
        ``abort``. ``abort=True`` (a lost node): nothing more is written and the agent
        is cut off at once (a local one SIGKILLed and what it ran reaped; an SSH
        connection reset). ``wait_closed`` tells when that is done."""
        with self._cv:
            if abort:
                self._abort = True
                self._queue.clear()
                self._queued = 0
            first = not self._closing
            self._closing = True
            self._cv.notify_all()
        if first:
            threading.Thread(target=self._close_run, name=f"agent-closer-{self.name}",
                             daemon=True).start()

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        """True once close() has done all it does (the local agent is gone)."""
        return self.closed_event.wait(timeout_s)

    def _close_run(self) -> None:
        try:
            end = time.monotonic() + self.close_timeout_s
            while not self._writer_done.wait(0.05):
                if self._abort or time.monotonic() > end:
                    break
            if not self._writer_done.is_set() and self._unblock is not None:
                self._unblock()  # a write that does not return: a stopped agent
            self._writer_done.wait(self.close_timeout_s)
            self._finish(self._abort)
        except Exception:  # noqa: BLE001 - a close must not raise on a thread
            log.exception("agent %s: closing the channel failed", self.name)
        finally:
            self.closed_event.set()


# ---- files ---------------------------------------------------------------------------

def copy_local_files(files: Iterable[tuple[str, str]], dest_dir: str,
                     base: str | None = None) -> None:
    """Copy (source, relative destination) pairs into dest_dir on this machine, keeping
    permission bits (not setuid/setgid). Below ``base`` (the node root; default
    dest_dir) no symbolic link is followed: missing folders are made 0700, a link where
    a folder should be is refused, and a link in the file's place is replaced."""
    base = base or dest_dir
    for source, rel in files:
        nodecache.copy_into(base, dest_dir, rel, source, os.stat(source).st_mode)


class CachedFile(NamedTuple):
    """A file to place through a node's cache."""

    source: str  # on this machine
    sha256: str
    rel: str  # relative to the destination directory
    mode: int


class NodeFiles:
    """A node's files as the coordinator reads them after a task: ``match`` (output
    file patterns -> files of the task directory, see nodecache.match), ``open`` (a
    regular file, never through a symbolic link), ``size``. ``here``: the files are on
    this machine (a file opened is a real one, a hard link to it can be made)."""

    def __init__(self, match: Callable[[dict], dict], open_: Callable[[str], Any],
                 close: Callable[[], None] = lambda: None, *, here: bool = False):
        self.match = match
        self.open = open_
        self._close = close
        self.here = here

    def __enter__(self) -> NodeFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()


def _open_local_nofollow(path: str) -> Any:
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def local_node_files() -> NodeFiles:
    """The files of a node on this machine, read directly."""
    return NodeFiles(nodecache.match, _open_local_nofollow, here=True)


SCP_MIN_BYTES = 32 << 20  # a file this big goes by OpenSSH's scp where there is one


def scp_put(target: Any, sftp: Any, source: str, dest: str) -> bool:
    """Send one big file with OpenSSH's ``scp`` (its C ciphers run several times
    paramiko's rate), with the same strict host key check as every hpcbatch connection,
    to a temporary name renamed into place over ``sftp``; False (nothing left behind)
    when scp is missing or fails, and the caller sends it over SFTP instead."""
    scp = shutil.which("scp")
    if scp is None or not target.known_hosts:
        return False
    host = f"[{target.hostname}]" if ":" in target.hostname else target.hostname
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    argv = [scp, "-q", "-B", "-s", "-P", str(target.port),
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={target.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, int(target.connect_timeout_s))}"]
    if target.key_file:
        argv += ["-i", os.path.expanduser(target.key_file), "-o", "IdentitiesOnly=yes"]
    argv += ["--", source, f"{target.login}@{host}:{tmp}"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=3600).returncode == 0
        if done:
            sftp.chmod(tmp, 0o600)
            sftp.posix_rename(tmp, dest)
            return True
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("scp of %s to %s failed (%s); sending it over SFTP", source, target.label,
                 exc)
    try:
        sftp.remove(tmp)
    except OSError:
        pass
    return False


def _unique_missing(files: list[CachedFile], there: set[str]) -> list[CachedFile]:
    seen, out = set(there), []
    for f in files:
        if f.sha256 not in seen:
            seen.add(f.sha256)
            out.append(f)
    return out


def _place_request(root: str, dest_dir: str, files: list[CachedFile],
                   fetched: list[CachedFile], cap_bytes: int) -> dict:
    return {"root": root, "dest_dir": dest_dir, "cap_bytes": cap_bytes,
            "fetched": [f.sha256 for f in fetched],
            "entries": [{"sha256": f.sha256, "rel": f.rel, "mode": f.mode} for f in files]}


# ---- local agents --------------------------------------------------------------------

class LocalTransport:
    """Starts the agent as a child process of the coordinator, in a session of its own
    (a signal to the coordinator's process group or terminal does not reach it; its
    lease and the coordinator decide when it stops)."""

    def start_agent(self, node_id: str, root: str | os.PathLike, *, token: str = "",
                    timings: Timings | None = None, slots: int = 1,
                    reap_stale: bool = True, mpi_prefix: str | None = None,
                    launcher: list[str] | None = None, python: str | None = None,
                    env: dict[str, str] | None = None) -> AgentChannel:
        """``launcher``: a command that runs the agent elsewhere and carries its stdin and
        stdout (a Slurm pool's ``srun --jobid J -w NODE ... --overlap``); then what the
        agent left is reaped there (the provider's fence), not on this machine, and
        ``python`` is the one on that node."""
        timings = timings or Timings()
        token = token or new_token()
        root = str(root)
        proc = subprocess.Popen(
            [*(launcher or ()), python or sys.executable, str(AGENT_PATH),
             *agent_args(node_id, root, token=token, timings=timings, slots=slots,
                         reap_stale=reap_stale, mpi_prefix=mpi_prefix)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, start_new_session=True, env=env)
        stdin_fd = proc.stdin.fileno()
        tail: collections.deque[str] = collections.deque(maxlen=20)

        def pump_stderr() -> None:
            for raw in iter(proc.stderr.readline, b""):
                text = raw.decode(errors="replace").rstrip()
                tail.append(text)
                log.warning("agent %s: %s", node_id, text)

        err_thread = threading.Thread(target=pump_stderr, name=f"agent-stderr-{node_id}",
                                      daemon=True)
        err_thread.start()

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(stdin_fd, view):]

        def end_input() -> None:
            proc.stdin.close()

        def unblock() -> None:
            proc.kill()

        def finish(abort: bool) -> None:
            if abort:
                proc.kill()
            try:
                proc.wait(timeout=timings.kill_grace_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # a clean exit removes the agent's record; one still there means it died
            # with tasks running (SIGKILLed): kill what they left
            record = Path(root, "agents", f"{token}.json")
            if record.exists() and not launcher:
                agent_module.reap_stale_agents(root, only=token, grace_s=timings.kill_grace_s)
            err_thread.join(2)
            proc.stdout.close()
            proc.stderr.close()

        def last_words() -> str:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            err_thread.join(0.5)
            said = [f"exit status {code}"] if code is not None else []
            text = " | ".join(list(tail)[-3:])
            return "; ".join(said + ([f"stderr: {text[-300:]}"] if text else []))

        def put_files(files: Iterable[tuple[str, str]], dest_dir: str) -> None:
            copy_local_files(files, dest_dir, base=root)

        send_lock = threading.Lock()

        def stage_cached(files: list[CachedFile], dest_dir: str, cap_bytes: int) -> dict:
            cdir = nodecache.cache_dir(root)
            os.makedirs(cdir, mode=0o700, exist_ok=True)
            with send_lock:  # two tasks wanting the same file: it is copied once
                missing = _unique_missing(files, set(nodecache.have(
                    root, [f.sha256 for f in files])))
                for f in missing:
                    tmp = os.path.join(cdir, f".{f.sha256}.tmp-{secrets.token_hex(4)}")
                    try:
                        with open(f.source, "rb") as src, open(tmp, "xb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        os.replace(tmp, os.path.join(cdir, f.sha256))
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
            out = nodecache.place(_place_request(root, dest_dir, files, missing, cap_bytes))
            return {**out, "fetched": [f.sha256 for f in missing],
                    "hits": len({f.sha256 for f in files}) - len(missing)}

        return AgentChannel(node_id, write, proc.stdout.readline, end_input=end_input,
                            finish=finish, unblock=unblock, put_files=put_files,
                            stage_cached=stage_cached, node_files=local_node_files,
                            files_here=True,
                            last_words=last_words, pid=proc.pid, token=token,
                            stall_s=timings.node_timeout_s,
                            close_timeout_s=timings.kill_grace_s + 10)


# ---- agents over SSH -----------------------------------------------------------------

def agent_digest() -> str:
    """Names the uploaded agent's directory: covers every file uploaded with it."""
    h = hashlib.sha256()
    for path, _ in UPLOADED:
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:12]


class SSHTransport:
    """Starts the agent on a remote node over one SSH exec channel.

    The agent (agent.py, protocol.py, and the launch layer mpi.py with env.py; stdlib
    only) is uploaded over SFTP to ``~/.hpcbatch/agent-<version>-<hash>/`` (the hash
    covers every file, so an agent never runs beside another version's protocol) and
    runs with the pool's python (python3 by default).
    ``setup(client, root)`` (if given) runs on the same connection first, with the node
    root resolved to an absolute path (bootstrap's inter-node trust uses it).
    """

    def __init__(self, python: str = "python3", mpi_prefix: str | None = None):
        self.python = python
        self.mpi_prefix = mpi_prefix

    def start_agent(self, target, node_id: str, root: str, *, token: str = "",
                    timings: Timings | None = None, slots: int = 1,
                    setup: Callable[[Any, str], None] | None = None,
                    reap_stale: bool = True) -> AgentChannel:
        from hpcbatch.bootstrap import resolve_root
        from hpcbatch.ssh import connect, exec_channel

        timings = timings or Timings()
        token = token or new_token()
        client = connect(target)
        try:
            sftp = client.open_sftp()
            try:
                root = resolve_root(sftp, root)
            finally:
                sftp.close()
            if setup is not None:
                setup(client, root)
            remote = upload_agent(client, target.label)
            chan = exec_channel(client, [self.python, f"{remote}/agent.py",
                                         *agent_args(node_id, root, token=token,
                                                     timings=timings, slots=slots,
                                                     reap_stale=reap_stale,
                                                     mpi_prefix=self.mpi_prefix)])
        except BaseException:
            client.close()
            raise
        reader = chan.makefile("rb")

        def cut() -> None:
            # The node is lost: reset the connection rather than close it. With
            # SO_LINGER 0 the kernel drops what is still unsent (pings queued while the
            # link was cut) instead of delivering it when the link comes back, which
            # would renew the agent's lease after the coordinator already counted it
            # expired and ran its tasks elsewhere.
            transport = client.get_transport()
            sock = getattr(transport, "sock", None)
            if isinstance(sock, socket.socket):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                except OSError:
                    pass
            client.close()

        def finish(abort: bool) -> None:
            if abort:
                cut()
                close_bulk()
                return
            # the agent stops its tasks on EOF and exits: wait (bounded) for its status
            if not chan.status_event.wait(timings.kill_grace_s + 10):
                cut()
                close_bulk()
                return
            try:
                chan.close()
            finally:
                client.close()
                close_bulk()

        def close_bulk() -> None:
            with bulk_lock:
                bulk_retry_at[0] = float("inf")  # closed: none is made after this
                while bulk_held:
                    bulk_held.pop().close()

        def put_files(files: Iterable[tuple[str, str]], dest_dir: str) -> None:
            from hpcbatch.ssh import sftp_put
            label = target.label
            sftp = client.open_sftp()
            try:
                for source, rel in files:
                    sftp_put(sftp, source, f"{dest_dir}/{rel}",
                             os.stat(source).st_mode & 0o777, label)
            finally:
                sftp.close()

        bulk_lock = threading.Lock()
        bulk_held: list[Any] = []
        bulk_retry_at = [0.0]  # when a second connection that failed is tried again

        def bulk_client() -> Any:
            """A second connection to the node for file transfers (resource files,
            output files, logs), made at first use and kept: a 1 GiB transfer never
            queues before the agent's heartbeats on its own connection."""
            with bulk_lock:
                if bulk_held:
                    t = bulk_held[0].get_transport()
                    if t is not None and t.is_active():
                        return bulk_held[0]
                    bulk_held.pop().close()
                if time.monotonic() < bulk_retry_at[0]:  # (failed lately, or closed)
                    return client
                try:
                    other = connect(target)
                except Exception as exc:  # noqa: BLE001 - the agent's own connection will do
                    # (an sshd that takes no new connection, e.g. at its MaxStartups, while
                    # the agent's session is up): transfers share it, tried again in 60 s
                    log.warning("%s: no second connection for file transfers (%s); they go "
                                "over the agent's", target.label, exc)
                    bulk_retry_at[0] = time.monotonic() + 60
                    return client
                bulk_held.append(other)
                return other

        def open_bulk_now() -> None:
            """Made while the node is known to answer, so the first transfer does not pay
            for it (nor wait out a connect timeout if the sshd stops taking new ones)."""
            try:
                bulk_client()
            except Exception:  # noqa: BLE001, S110 - the first transfer tries again
                pass
        threading.Thread(target=open_bulk_now, name=f"hpcbatch-bulk-{target.label}",
                         daemon=True).start()

        send_lock = threading.Lock()

        def stage_cached(files: list[CachedFile], dest_dir: str, cap_bytes: int) -> dict:
            import json

            from hpcbatch.ssh import run, sftp_put
            label = target.label
            cdir = nodecache.cache_dir(root)
            bulk = bulk_client()
            sftp = bulk.open_sftp()
            try:
                with send_lock:  # two tasks wanting the same file: it is sent once
                    there = set()
                    for digest in {f.sha256 for f in files}:
                        try:
                            sftp.stat(f"{cdir}/{digest}")
                            there.add(digest)
                        except OSError:
                            pass
                    missing = _unique_missing(files, there)
                    for f in missing:
                        dest = f"{cdir}/{f.sha256}"
                        if not (os.path.getsize(f.source) >= SCP_MIN_BYTES and
                                scp_put(target, sftp, f.source, dest)):
                            sftp_put(sftp, f.source, dest, 0o600, label)
            finally:
                sftp.close()
            request = _place_request(root, dest_dir, files, missing, cap_bytes)
            code, out, err = run(bulk, [self.python, f"{remote}/nodecache.py", "place"],
                                 timeout_s=600, stdin=json.dumps(request))
            try:
                answer = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise OSError(f"placing files on {label} failed (exit {code}): "
                              f"{(err or out).strip()[-300:]}") from None
            nodecache.check_answer(answer)
            return {**answer, "fetched": [f.sha256 for f in missing],
                    "hits": len({f.sha256 for f in files}) - len(missing)}

        def node_files() -> NodeFiles:
            import json
            import stat as stat_module

            from hpcbatch.ssh import run
            bulk = bulk_client()
            sftp = bulk.open_sftp()

            def match(request: dict) -> dict:
                code, out, err = run(bulk, [self.python, f"{remote}/nodecache.py", "match"],
                                     timeout_s=300, stdin=json.dumps(request))
                try:
                    answer = json.loads(out.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    raise OSError(f"matching output files on {target.label} failed (exit "
                                  f"{code}): {(err or out).strip()[-300:]}") from None
                return nodecache.check_answer(answer)

            def open_(path: str) -> Any:
                if stat_module.S_ISLNK(sftp.lstat(path).st_mode or 0):
                    raise OSError(f"{path} is a symbolic link; not followed")
                return sftp.open(path, "rb")
            return NodeFiles(match, open_, sftp.close)

        def last_words() -> str:
            chan.status_event.wait(0.5)  # the exit status follows EOF closely
            err = b""
            while chan.recv_stderr_ready() and len(err) < 1 << 16:
                err += chan.recv_stderr(4096)
            tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
            status = chan.exit_status if chan.exit_status_ready() else None
            said = [f"exit status {status}"] if status not in (None, -1) else []
            return "; ".join(said + ([f"stderr: {tail[-300:]}"] if tail else []))

        return AgentChannel(node_id, chan.sendall, reader.readline,
                            end_input=chan.shutdown_write, finish=finish, unblock=cut,
                            put_files=put_files, last_words=last_words, token=token,
                            stage_cached=stage_cached, node_files=node_files,
                            stall_s=timings.node_timeout_s,
                            close_timeout_s=timings.kill_grace_s + 10)


def upload_agent(client, label: str) -> str:
    """The agent's files (UPLOADED) into ``~/.hpcbatch/agent-<version>-<hash>/`` on the
    node (each skipped when that directory already holds it); returns its absolute path."""
    from hpcbatch._version import __version__
    from hpcbatch.ssh import SSHError, sftp_put

    rel = f".hpcbatch/agent-{__version__}-{agent_digest()}"
    try:
        sftp = client.open_sftp()
    except Exception as exc:  # noqa: BLE001 - paramiko raises several kinds
        raise SSHError(label, f"cannot start SFTP ({exc}); the host's sshd_config needs a "
                       "'Subsystem sftp' line") from None
    try:
        remote = f"{sftp.normalize('.').rstrip('/')}/{rel}"
        # agent.py last: an agent.py that is there always has the rest beside it
        for path, mode in UPLOADED:
            dest = f"{remote}/{path.name}"
            try:
                if sftp.stat(dest).st_size == path.stat().st_size:
                    continue
            except OSError:
                pass
            sftp_put(sftp, path, dest, mode, label)
        return remote
    finally:
        sftp.close()
