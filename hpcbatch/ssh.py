"""The SSH layer (paramiko): strict host keys, one-line errors naming the host.

Host keys are checked against a known_hosts file the pool records; an unknown key
is refused with its fingerprint (never silently added) unless the caller asked
for ``trust_on_first_use``, which records it in that file.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from hpcbatch.errors import HpcBatchError


class SSHError(HpcBatchError):
    def __init__(self, host: str, message: str):
        self.host = host
        super().__init__(f"{host}: {message}")


class UnknownHostKey(SSHError):
    pass


class HostKeyMismatch(SSHError):
    pass


class AuthFailed(SSHError):
    pass


class Unreachable(SSHError):
    pass


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclasses.dataclass
class SSHTarget:
    name: str
    hostname: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    connect_timeout_s: float = 10.0

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.user}@{self.hostname}:{self.port})"


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, target: SSHTarget, trust_on_first_use: bool):
        self.target = target
        self.tofu = trust_on_first_use

    def missing_host_key(self, client, hostname, key) -> None:
        fp = fingerprint(key)
        if not self.tofu:
            raise UnknownHostKey(
                self.target.label, f"host key {key.get_name()} {fp} is not in "
                f"{self.target.known_hosts}; check it and add it there, or pass "
                "--trust-on-first-use to record it")
        client.get_host_keys().add(hostname, key.get_name(), key)
        if self.target.known_hosts:
            path = Path(self.target.known_hosts)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def connect(target: SSHTarget, *, trust_on_first_use: bool = False) -> paramiko.SSHClient:
    """A connected, authenticated client; errors are SSHError subclasses naming the host."""
    label = target.label
    if not target.known_hosts:
        raise UnknownHostKey(label, "no known_hosts file given; hpcbatch checks host keys "
                             "strictly (give --known-hosts FILE)")
    kh = Path(target.known_hosts).expanduser()
    if not kh.exists() and not trust_on_first_use:
        raise UnknownHostKey(label, f"known_hosts file {kh} does not exist")
    if target.key_file and not Path(target.key_file).expanduser().exists():
        raise AuthFailed(label, f"key file {target.key_file} does not exist")
    client = paramiko.SSHClient()
    if kh.exists():
        client.load_host_keys(str(kh))
    client.set_missing_host_key_policy(_Policy(target, trust_on_first_use))
    try:
        sock = socket.create_connection((target.hostname, target.port),
                                        timeout=target.connect_timeout_s)
    except OSError as exc:
        raise Unreachable(label, f"cannot connect: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.connect(target.hostname, port=target.port, username=target.user,
                       key_filename=str(Path(target.key_file).expanduser())
                       if target.key_file else None, sock=sock,
                       timeout=target.connect_timeout_s, banner_timeout=target.connect_timeout_s,
                       auth_timeout=target.connect_timeout_s, look_for_keys=False,
                       allow_agent=False)
    except SSHError:
        _close(client, sock)
        raise
    except paramiko.BadHostKeyException as exc:
        _close(client, sock)
        raise HostKeyMismatch(label, f"host key {fingerprint(exc.key)} does not match "
                              f"{fingerprint(exc.expected_key)} recorded in {kh}: the host "
                              "was reinstalled or someone is in the middle") from None
    except paramiko.AuthenticationException:
        _close(client, sock)
        raise AuthFailed(label, f"authentication as {target.user} with key "
                         f"{target.key_file} was refused") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        _close(client, sock)
        raise Unreachable(label, f"SSH handshake failed: {exc}") from None
    return client


def _close(client: paramiko.SSHClient, sock: socket.socket) -> None:
    """Stop the transport thread before the socket goes (else it prints to stderr)."""
    client.close()
    sock.close()


def run(client: paramiko.SSHClient, argv: list[str], timeout_s: float = 60) -> tuple:
    """Run argv (shell-quoted) and return (rc, stdout, stderr)."""
    chan = client.get_transport().open_session(timeout=timeout_s)
    chan.settimeout(timeout_s)
    chan.exec_command(shlex.join(argv))
    out = chan.makefile("rb").read().decode(errors="replace")
    err = chan.makefile_stderr("rb").read().decode(errors="replace")
    return chan.recv_exit_status(), out, err


def upload(client: paramiko.SSHClient, local: str | Path, remote: str, mode: int = 0o755) -> str:
    """Copy a file over SFTP (parents created); returns the absolute remote path.

    The file goes to a temporary name and is renamed into place, so parallel
    uploads to a shared home directory never see (or leave) a half-written file;
    a file already there with the same size is kept.
    """
    import secrets
    local = Path(local)
    sftp = client.open_sftp()
    try:
        if not remote.startswith("/"):
            remote = sftp.normalize(".") + "/" + remote
        parts = remote.strip("/").split("/")[:-1]
        path = ""
        for part in parts:
            path += "/" + part
            try:
                sftp.stat(path)
            except FileNotFoundError:
                try:
                    sftp.mkdir(path, 0o700)
                except OSError:  # made meanwhile by a parallel upload
                    sftp.stat(path)
        try:
            if sftp.stat(remote).st_size == local.stat().st_size:
                return remote
        except FileNotFoundError:
            pass
        tmp = f"{remote}.tmp-{secrets.token_hex(4)}"
        sftp.put(str(local), tmp)
        sftp.chmod(tmp, mode)
        sftp.posix_rename(tmp, remote)
        return remote
    finally:
        sftp.close()


def exec_channel(client: paramiko.SSHClient, argv: list[str]) -> paramiko.Channel:
    """One long-lived exec channel (a line-framed protocol runs over it)."""
    chan = client.get_transport().open_session()
    chan.exec_command(shlex.join(argv))
    return chan


@dataclasses.dataclass
class HostResult:
    name: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class GroupResult:
    results: list[HostResult]

    @property
    def succeeded(self) -> list[HostResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.results if not r.ok]


def parallel(targets: list[SSHTarget], fn: Callable[[SSHTarget], Any],
             timeout_s: float = 60) -> GroupResult:
    """fn on every target at once; a hung host is reported failed, never waited for."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(targets) or 1))
    futures = {t.name: pool.submit(fn, t) for t in targets}
    deadline = time.monotonic() + timeout_s
    out = []
    for t in targets:
        fut = futures[t.name]
        try:
            out.append(HostResult(t.name, fut.result(max(deadline - time.monotonic(), 0))))
        except concurrent.futures.TimeoutError:
            out.append(HostResult(t.name, error=Unreachable(t.label, f"no answer within "
                                                                      f"{timeout_s} s")))
        except BaseException as exc:  # noqa: BLE001 - reported per host
            out.append(HostResult(t.name, error=exc))
    pool.shutdown(wait=False, cancel_futures=True)
    return GroupResult(out)
