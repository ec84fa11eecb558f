"""How bytes reach a node's agent: the transport seam.

Every transport yields an :class:`AgentChannel`: a line-framed duplex stream to
one agent. ``LocalTransport`` starts the agent as a subprocess with pipes; the
SSH transport (hpcbatch.ssh) runs it over one paramiko exec channel. The
coordinator does not know which one it talks to. Files move the same way:
``AgentChannel.put_files`` copies on this machine's filesystem for a local agent
and over SFTP (on the agent's own SSH connection) for a remote one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hpcbatch.launch import agent as agent_module

AGENT_PATH = Path(agent_module.__file__)
encode = agent_module.encode
decode = agent_module.decode


class AgentChannel:
    """A started agent: send messages, receive them on a reader thread."""

    def __init__(self, name: str, write: Callable[[bytes], Any], readline: Callable[[], bytes],
                 close: Callable[[], None],
                 put_files: Callable[[Iterable[tuple[str, str]], str], None] | None = None,
                 last_words: Callable[[], str] | None = None):
        self.name = name
        self._write = write
        self._readline = readline
        self._close = close
        self._put_files = put_files or copy_local_files
        self._last_words = last_words
        self._lock = threading.Lock()
        self.closed = False

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

    def send_many(self, msgs: list[dict]) -> bool:
        """Write messages as one chunk; False when the channel is gone."""
        if self.closed:
            return False
        data = b"".join(encode(m) for m in msgs)
        try:
            with self._lock:
                self._write(data)
        except (OSError, ValueError, EOFError):
            self.closed = True
            return False
        return True

    def send(self, msg: dict) -> bool:
        return self.send_many([msg])

    def listen(self, on_message: Callable[[dict | None], None]) -> threading.Thread:
        """Call ``on_message`` for each message; ``None`` once the channel ends."""

        def pump() -> None:
            try:
                while True:
                    line = self._readline()
                    if not line:
                        break
                    if line.strip():
                        try:
                            on_message(decode(line))
                        except ValueError:
                            on_message({"ev": "garbage", "line": line[:200].decode("replace")})
            except (OSError, ValueError, EOFError):
                pass
            finally:
                self.closed = True
                on_message(None)

        t = threading.Thread(target=pump, name=f"agent-reader-{self.name}", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.closed = True
        try:
            self._close()
        except OSError:
            pass


def copy_local_files(files: Iterable[tuple[str, str]], dest_dir: str) -> None:
    for source, rel in files:
        dest = os.path.join(dest_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.copyfile(source, tmp)
        os.chmod(tmp, os.stat(source).st_mode & 0o777)  # no setuid/setgid bits
        os.replace(tmp, dest)


class LocalTransport:
    """Starts the agent as a child process of the coordinator."""

    def start_agent(self, node_id: str, root: Path, heartbeat_s: float = 1.0,
                    slots: int = 1) -> AgentChannel:
        proc = subprocess.Popen(
            [sys.executable, str(AGENT_PATH), "--node-id", node_id, "--root", str(root),
             "--heartbeat-s", str(heartbeat_s), "--slots", str(slots)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)

        def write(data: bytes) -> None:
            proc.stdin.write(data)
            proc.stdin.flush()

        def close() -> None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        chan = AgentChannel(node_id, write, proc.stdout.readline, close)
        chan.pid = proc.pid
        return chan


class SSHTransport:
    """Starts the agent on a remote node over one SSH exec channel.

    The agent (one stdlib-only file) is uploaded over SFTP to
    ``~/.hpcbatch/agent-<version>-<hash>.py`` and runs with the node's python3.
    ``setup(client, root)`` (if given) runs on the same connection first, with the
    node root resolved to an absolute path (bootstrap's inter-node trust uses it).
    """

    def __init__(self, python: str = "python3"):
        self.python = python

    def start_agent(self, target, node_id: str, root: str, heartbeat_s: float = 1.0,
                    slots: int = 1,
                    setup: Callable[[Any, str], None] | None = None) -> AgentChannel:
        from hpcbatch._version import __version__
        from hpcbatch.bootstrap import resolve_root
        from hpcbatch.ssh import connect, exec_channel, upload

        client = connect(target)
        try:
            sftp = client.open_sftp()
            try:
                root = resolve_root(sftp, root)
            finally:
                sftp.close()
            if setup is not None:
                setup(client, root)
            digest = hashlib.sha256(AGENT_PATH.read_bytes()).hexdigest()[:12]
            remote = upload(client, AGENT_PATH, f".hpcbatch/agent-{__version__}-{digest}.py")
            chan = exec_channel(client, [self.python, remote, "--node-id", node_id, "--root",
                                         root, "--heartbeat-s", str(heartbeat_s), "--slots",
                                         str(slots)])
        except BaseException:
            client.close()
            raise
        reader = chan.makefile("rb")

        def close() -> None:
            try:
                chan.shutdown_write()
                chan.close()
            finally:
                client.close()

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

        def last_words() -> str:
            chan.status_event.wait(0.5)  # the exit status follows EOF closely
            err = b""
            while chan.recv_stderr_ready() and len(err) < 1 << 16:
                err += chan.recv_stderr(4096)
            tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
            status = chan.exit_status if chan.exit_status_ready() else None
            said = [f"exit status {status}"] if status not in (None, -1) else []
            return "; ".join(said + ([f"stderr: {tail[-300:]}"] if tail else []))

        return AgentChannel(node_id, chan.sendall, reader.readline, close, put_files,
                            last_words)
