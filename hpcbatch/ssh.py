"""The SSH layer (paramiko): strict host keys, one-line errors naming the host.

* ``SSHTarget`` says where a node is and how to log in; ``targets_from_spec`` reads
  a pool spec (the pool.json ``hpcbatch cluster up`` writes), ``targets_from_ssh_config``
  an OpenSSH client config.
* ``connect`` checks the host key against the target's known_hosts file only
  (never ``~/.ssh``), with paramiko's RejectPolicy semantics: an unknown key is
  refused with its type and SHA256 fingerprint unless the caller asked for
  ``trust_on_first_use``, which records it in that file. Failures are ``SSHError``
  subclasses whose message is one line starting with the host.
* ``exec_channel`` runs an argv (shell-quoted with shlex.join) on a fresh exec
  channel and hands back the channel for a line-framed protocol; ``run`` runs
  one command to completion under a deadline; ``upload`` copies a file over SFTP.
* ``parallel`` calls a function for many targets at once; a hung host becomes a
  ``HostTimeout`` in the result, it never holds up the call.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import posixpath
import pwd
import secrets
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import paramiko

from hpcbatch.errors import HpcBatchError, ValidationError


class SSHError(HpcBatchError):
    """An SSH failure; the message is one line: '<host>: <what happened and what to do>'."""

    def __init__(self, host: str, message: str):
        self.host = host
        self.detail = message
        super().__init__(f"{host}: {message}")


class UnknownHostKey(SSHError):
    """The host's key is not in the known_hosts file (and trust_on_first_use was not given)."""


class HostKeyMismatch(SSHError):
    """The host offered a key other than the one recorded for it."""


class AuthFailed(SSHError):
    """The server refused the key (or the key file cannot be used)."""


class Unreachable(SSHError):
    """No SSH server answered: refused, timed out, name not resolved, dropped."""


class HostTimeout(Unreachable):
    """parallel(): the host gave no answer within the call's timeout."""


class CommandTimeout(SSHError):
    """run(): the command did not finish within its timeout (its channel is closed)."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's fingerprint spelling: ``SHA256:<base64 without padding>``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(hostname: str, port: int) -> str:
    """How known_hosts names a host: the bare name on port 22, else ``[name]:port``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def _whoami() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


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
    def login(self) -> str:
        return self.user or _whoami()

    @property
    def known_hosts_name(self) -> str:
        return known_hosts_name(self.hostname, self.port)

    @property
    def label(self) -> str:
        """How errors name the host: ``node1 (root@127.0.0.1:2201)``."""
        return f"{self.name} ({self.login}@{self.hostname}:{self.port})"


# ---------------------------------------------------------------- targets from files

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _check_host_field(field: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, f"{what} must be a non-empty string, not {value!r}")
    bad = next((c for c in value if c not in _NAME_OK and not (what == "hostname" and c == ":")),
               None)
    if bad is not None:
        raise ValidationError(field, f"{what} {value!r} has {bad!r}; use letters, digits, "
                              "'.', '-' and '_'")
    if value[0] in "-.":
        raise ValidationError(field, f"{what} {value!r} may not start with {value[0]!r}")
    return value


def _check_port(field: str, value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 1 <= port <= 65535 or str(port) != str(value).strip():
        raise ValidationError(field, f"port must be a whole number from 1 to 65535, not "
                              f"{value!r}")
    return port


def _path(value: Any, field: str, base_dir: Path | None) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValidationError(field, f"must be a file path, not {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    return str(p)


def targets_from_spec(spec: Mapping[str, Any], *,
                      base_dir: str | os.PathLike | None = None) -> list[SSHTarget]:
    """Targets from a pool spec (a parsed pool.json)::

        {"hosts": [{"name": "node1", "hostname": "127.0.0.1", "port": 2201, "user": "u"}, ...]
                  or "node[01-04]",
         "user": "u", "port": 22, "key": "/path/id_ed25519", "known_hosts": "/path/known_hosts",
         "ssh_config": "/path/ssh_config", "connect_timeout_s": 10}

    A host's own fields win, then the spec's, then its ``Host`` block in ssh_config.
    Relative paths are taken from base_dir (the spec file's folder) or the current one.
    Errors are ValidationError naming the field (``hosts[2].port``)."""
    from hpcbatch.hostlist import expand_hostlist

    if not isinstance(spec, Mapping):
        raise ValidationError("spec", f"a pool spec is a JSON object, not {type(spec).__name__}")
    base = Path(base_dir).expanduser().resolve() if base_dir else None
    hosts = spec.get("hosts")
    if isinstance(hosts, str):
        hosts = [{"name": h} for h in expand_hostlist(hosts)]
    if not isinstance(hosts, list) or not hosts:
        raise ValidationError("hosts", "the spec needs a non-empty 'hosts' list (or a host "
                              "list such as node[01-04])")
    key = _path(spec.get("key"), "key", base)
    known = _path(spec.get("known_hosts"), "known_hosts", base)
    cfg_path = _path(spec.get("ssh_config"), "ssh_config", base)
    sshcfg = _read_ssh_config(cfg_path, "ssh_config") if cfg_path else None
    timeout = spec.get("connect_timeout_s", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValidationError("connect_timeout_s", f"must be a number of seconds > 0, not "
                              f"{timeout!r}")
    out: list[SSHTarget] = []
    seen: set[str] = set()
    for i, h in enumerate(hosts):
        field = f"hosts[{i}]"
        if isinstance(h, str):
            h = {"name": h}
        if not isinstance(h, Mapping):
            raise ValidationError(field, f"must be an object with a 'name', not {h!r}")
        name = _check_host_field(f"{field}.name", h.get("name"), "name")
        if name in seen:
            raise ValidationError(f"{field}.name", f"host {name!r} is listed twice")
        seen.add(name)
        look = sshcfg.lookup(name) if sshcfg else {}
        hostname = _check_host_field(f"{field}.hostname",
                                     h.get("hostname") or look.get("hostname") or name,
                                     "hostname")
        port_value = next((v for v in (h.get("port"), spec.get("port"), look.get("port"))
                           if v not in (None, "")), 22)
        port = _check_port(f"{field}.port", port_value)
        user = h.get("user") or spec.get("user") or look.get("user") or _whoami()
        if not isinstance(user, str) or not user or user[0] == "-" or any(c.isspace()
                                                                         for c in user):
            raise ValidationError(f"{field}.user", f"user {user!r} is not a login name")
        host_key = key or _path((look.get("identityfile") or [None])[0], f"{field}.key", base)
        host_known = known or _path(_first_path(look.get("userknownhostsfile")),
                                    f"{field}.known_hosts", base)
        out.append(SSHTarget(name, hostname, port, user, host_key, host_known, float(timeout)))
    return out


def _first_path(value: str | None) -> str | None:
    if not value:
        return None
    return value if Path(value).expanduser().exists() else value.split()[0]


def _read_ssh_config(path: str, field: str) -> paramiko.SSHConfig:
    try:
        return paramiko.SSHConfig.from_path(path)
    except FileNotFoundError:
        raise ValidationError(field, f"ssh_config file {path} does not exist") from None
    except (OSError, ValueError, paramiko.ConfigParseError) as exc:
        raise ValidationError(field, f"cannot read ssh_config file {path}: {exc}") from None


def targets_from_ssh_config(path: str | os.PathLike, names: Iterable[str] | str, *,
                            known_hosts: str | None = None,
                            key_file: str | None = None) -> list[SSHTarget]:
    """Targets for ``names`` (a list, or a host list such as ``node[1-3]``) as an OpenSSH
    config resolves them: HostName, Port, User, IdentityFile, UserKnownHostsFile,
    ConnectTimeout. known_hosts / key_file given here win over the file's."""
    from hpcbatch.hostlist import expand_hostlist

    cfg = _read_ssh_config(str(Path(path).expanduser()), "ssh_config")
    if isinstance(names, str):
        names = expand_hostlist(names)
    out = []
    for i, name in enumerate(names):
        field = f"names[{i}]"
        name = _check_host_field(field, name, "name")
        look = cfg.lookup(name)
        hostname = _check_host_field(f"{field}.hostname", look.get("hostname") or name,
                                     "hostname")
        port = _check_port(f"{name}.port", look.get("port") or 22)
        timeout = look.get("connecttimeout")
        try:
            timeout_s = float(timeout) if timeout else 10.0
        except ValueError:
            raise ValidationError(f"{name}.ConnectTimeout", f"{timeout!r} in {path} is not a "
                                  "number of seconds") from None
        key = key_file or (look.get("identityfile") or [None])[0]
        known = known_hosts or _first_path(look.get("userknownhostsfile"))
        out.append(SSHTarget(name, hostname, port, look.get("user") or _whoami(),
                             str(Path(key).expanduser()) if key else None,
                             str(Path(known).expanduser()) if known else None, timeout_s))
    return out


# ---------------------------------------------------------------- connect

_KNOWN_HOSTS_LOCK = threading.Lock()


class _StrictPolicy(paramiko.MissingHostKeyPolicy):
    """RejectPolicy with a fingerprint in the error; or, when asked, trust on first use."""

    def __init__(self, target: SSHTarget, known_hosts: Path, trust_on_first_use: bool):
        self.target = target
        self.known_hosts = known_hosts
        self.tofu = trust_on_first_use

    def missing_host_key(self, client, hostname, key) -> None:
        kind, fp = key.get_name(), fingerprint(key)
        if not self.tofu:
            raise UnknownHostKey(
                self.target.label, f"host key {kind} {fp} is not in known_hosts file "
                f"{self.known_hosts}; verify the fingerprint, then add the key to that file, "
                "or use --trust-on-first-use to record it")
        with _KNOWN_HOSTS_LOCK:
            if self.known_hosts.exists():  # another connection may have recorded it meanwhile
                recorded = paramiko.HostKeys(str(self.known_hosts)).lookup(hostname) or {}
                if recorded and recorded.get(kind) != key:
                    raise _mismatch(self.target, key, next(iter(recorded.values())),
                                    self.known_hosts)
            else:
                self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                needs_newline = os.fstat(fd).st_size > 0 and not self.known_hosts.read_bytes(
                ).endswith(b"\n")
                os.write(fd, (("\n" if needs_newline else "")
                              + f"{hostname} {kind} {key.get_base64()}\n").encode())
            finally:
                os.close(fd)
        client.get_host_keys().add(hostname, kind, key)


def _mismatch(target: SSHTarget, offered: paramiko.PKey, expected: paramiko.PKey,
              known_hosts: Path | str) -> HostKeyMismatch:
    name = target.known_hosts_name
    return HostKeyMismatch(
        target.label, f"HOST KEY MISMATCH: the host offered {offered.get_name()} "
        f"{fingerprint(offered)} but known_hosts file {known_hosts} records "
        f"{expected.get_name()} {fingerprint(expected)} for {name}; if the host was "
        f"reinstalled remove the old entry (ssh-keygen -R '{name}' -f {known_hosts}), "
        "otherwise someone may be intercepting the connection")


def _load_key(target: SSHTarget) -> paramiko.PKey:
    label = target.label
    if not target.key_file:
        raise AuthFailed(label, "no private key given; set 'key' in the pool spec (or --key)")
    path = Path(target.key_file).expanduser()
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise AuthFailed(label, f"key file {path} does not exist; give the private key "
                         "whose .pub is in the host's authorized_keys") from None
    except PermissionError:
        raise AuthFailed(label, f"key file {path} is not readable by this user") from None
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        if not isinstance(exc, paramiko.PasswordRequiredException) and "password" not in str(
                exc).lower():
            raise AuthFailed(label, f"key file {path} is not a private key hpcbatch can read "
                             f"({exc})") from None
        raise AuthFailed(label, f"key file {path} is protected by a passphrase; hpcbatch "
                         "needs an unencrypted key (ssh-keygen -p -N '' -f KEY)") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise AuthFailed(label, f"key file {path} is not a private key hpcbatch can read "
                         f"({exc})") from None


def _tcp(target: SSHTarget) -> socket.socket:
    where = f"{target.hostname}:{target.port}"
    label = target.label
    try:
        sock = socket.create_connection((target.hostname, target.port),
                                        timeout=target.connect_timeout_s)
    except socket.gaierror as exc:
        raise Unreachable(label, f"cannot connect: host name {target.hostname!r} does not "
                          f"resolve ({exc.strerror}); check the hostname") from None
    except TimeoutError:
        raise Unreachable(label, f"cannot connect to {where}: no answer within "
                          f"{target.connect_timeout_s:g} s; check that the host is up and "
                          f"port {target.port} is open") from None
    except ConnectionRefusedError:
        raise Unreachable(label, f"cannot connect to {where}: connection refused; check that "
                          f"sshd runs there and listens on port {target.port}") from None
    except OSError as exc:
        raise Unreachable(label, f"cannot connect to {where}: "
                          f"{exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ~85 ms less per command
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def connect(target: SSHTarget, *, trust_on_first_use: bool = False) -> paramiko.SSHClient:
    """A connected, authenticated client; errors are SSHError subclasses naming the host.

    Host keys come only from ``target.known_hosts``. An unknown host key raises
    UnknownHostKey (type and fingerprint in the message) unless trust_on_first_use is
    true, in which case the key is appended to that file and the connection goes on."""
    label = target.label
    if not target.known_hosts:
        raise UnknownHostKey(label, "no known_hosts file given; hpcbatch checks host keys "
                             "strictly (set 'known_hosts' in the pool spec or --known-hosts)")
    kh = Path(target.known_hosts).expanduser()
    pkey = _load_key(target)
    client = paramiko.SSHClient()
    if kh.exists():
        try:
            client.load_host_keys(str(kh))
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise SSHError(label, f"cannot read known_hosts file {kh}: {exc}") from None
    elif not trust_on_first_use:
        raise UnknownHostKey(label, f"known_hosts file {kh} does not exist; create it with "
                             "the hosts' keys, or use --trust-on-first-use to record them")
    client.set_missing_host_key_policy(_StrictPolicy(target, kh, trust_on_first_use))
    sock = _tcp(target)
    t = target.connect_timeout_s
    try:
        client.connect(target.hostname, port=target.port, username=target.login, pkey=pkey,
                       sock=sock, timeout=t, banner_timeout=t, auth_timeout=t,
                       channel_timeout=t, look_for_keys=False, allow_agent=False)
    except SSHError:
        _close(client, sock)
        raise
    except paramiko.BadHostKeyException as exc:
        _close(client, sock)
        raise _mismatch(target, exc.key, exc.expected_key, kh) from None
    except paramiko.AuthenticationException:
        _close(client, sock)
        raise AuthFailed(label, f"authentication as {target.login} with key "
                         f"{Path(target.key_file).expanduser()} was refused; put its .pub "
                         f"in {target.login}'s authorized_keys on that host, or give the "
                         "right key") from None
    except (TimeoutError, EOFError, ConnectionError) as exc:
        _close(client, sock)
        raise Unreachable(label, f"the SSH handshake with {target.hostname}:{target.port} "
                          f"did not complete ({type(exc).__name__}: {exc or 'closed'}); is it "
                          "an SSH server, and not overloaded?") from None
    except (paramiko.SSHException, OSError) as exc:
        _close(client, sock)
        if "banner" in str(exc).lower() or "no existing session" in str(exc).lower():
            raise Unreachable(label, f"no SSH server answered on {target.hostname}:"
                              f"{target.port} within {t:g} s ({exc})") from None
        raise SSHError(label, f"the SSH handshake with {target.hostname}:{target.port} "
                       f"failed: {exc}") from None
    client.hpcbatch_target = target  # for error messages of run/upload/exec_channel
    return client


def _close(client: paramiko.SSHClient, sock: socket.socket | None = None) -> None:
    """Stop the transport thread before the socket goes (else it prints to stderr)."""
    try:
        client.close()
    finally:
        if sock is not None:
            sock.close()


def _label(client: paramiko.SSHClient) -> str:
    target = getattr(client, "hpcbatch_target", None)
    if target is not None:
        return target.label
    transport = client.get_transport()
    try:
        host, port = transport.getpeername()[:2]
        return f"{host}:{port}"
    except Exception:  # noqa: BLE001 - only for naming the host in an error
        return "ssh host"


# ---------------------------------------------------------------- commands and files

def _argv(argv: Sequence[str | os.PathLike]) -> str:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise TypeError(f"argv must be a list of strings (it is shell-quoted), not "
                        f"{type(argv).__name__}: {argv!r:.80}")
    if not argv:
        raise ValueError("argv is empty: give the program and its arguments")
    parts = []
    for a in argv:
        if not isinstance(a, (str, os.PathLike)):
            raise TypeError(f"argv items must be strings, not {type(a).__name__}: {a!r:.80}")
        parts.append(os.fspath(a))
    return shlex.join(parts)


def _session(client: paramiko.SSHClient, timeout_s: float) -> paramiko.Channel:
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise SSHError(_label(client), "the SSH connection is closed; connect again")
    try:
        return transport.open_session(timeout=timeout_s)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise SSHError(_label(client), f"cannot open a session channel: {exc or 'refused'} "
                       "(too many sessions? sshd's MaxSessions)") from None


def exec_channel(client: paramiko.SSHClient, argv: Sequence[str | os.PathLike], *,
                 timeout_s: float = 30.0) -> paramiko.Channel:
    """Start argv (shell-quoted with shlex.join) on a fresh exec channel and return it.

    The channel is a duplex byte stream for a line-framed protocol:
    ``chan.makefile('rb').readline()`` reads the command's stdout, ``chan.sendall(b)``
    writes to its stdin, ``chan.shutdown_write()`` closes its stdin,
    ``chan.makefile_stderr('rb')`` is its stderr, ``chan.recv_exit_status()`` waits."""
    command = _argv(argv)
    chan = _session(client, timeout_s)
    try:
        chan.exec_command(command)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        chan.close()
        raise SSHError(_label(client), f"the host refused to run {command!r:.120}: "
                       f"{exc}") from None
    return chan


def run(client: paramiko.SSHClient, argv: Sequence[str | os.PathLike],
        timeout_s: float = 60.0, *, stdin: bytes | str | None = None) -> tuple[int, str, str]:
    """Run argv (shell-quoted) to completion: ``(exit status, stdout, stderr)``.

    stdin (if given) is sent and then closed; without it the command sees EOF at once.
    Past timeout_s the channel is closed and CommandTimeout raised. The exit status is
    -1 when the command died without one (killed by a signal)."""
    deadline = time.monotonic() + timeout_s
    chan = exec_channel(client, argv, timeout_s=timeout_s)
    out, err = bytearray(), bytearray()
    try:
        if stdin:
            chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
        chan.shutdown_write()
        while True:
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            if (chan.eof_received or chan.closed) and not (chan.recv_ready()
                                                            or chan.recv_stderr_ready()):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(client, argv, timeout_s)
            select.select([chan], [], [], remaining)  # readable: data, EOF or close
        if not chan.status_event.wait(max(deadline - time.monotonic(), 0.0)):
            raise _timeout(client, argv, timeout_s)
        return chan.exit_status, out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        chan.close()


def _timeout(client, argv, timeout_s: float) -> CommandTimeout:
    return CommandTimeout(_label(client), f"{shlex.join(map(os.fspath, argv))!r:.120} did not "
                          f"finish within {timeout_s:g} s (its channel was closed)")


def sftp_makedirs(sftp: paramiko.SFTPClient, path: str, label: str) -> None:
    """mkdir -p over SFTP (new folders get mode 0700); label names the host in errors."""
    done = "/"
    for part in [p for p in path.split("/") if p]:
        done = posixpath.join(done, part)
        try:
            st = sftp.stat(done)
        except FileNotFoundError:
            try:
                sftp.mkdir(done, 0o700)
                continue
            except OSError:  # made meanwhile by a parallel upload?
                st = sftp.stat(done)
        if not stat.S_ISDIR(st.st_mode or 0):
            raise SSHError(label, f"cannot upload under {path}: {done} exists and is not a "
                           "directory")


def upload(client: paramiko.SSHClient, local_path: str | os.PathLike, remote_path: str,
           mode: int = 0o755) -> str:
    """Copy a local file to remote_path over SFTP; returns the absolute remote path.

    Missing parent folders are made (mode 0700). A relative remote_path is taken from
    the login's home folder. The file is written under a temporary name, given
    ``mode``, and renamed into place, so a reader (or a parallel upload of the same
    file) never sees half of it."""
    label = _label(client)
    try:
        sftp = client.open_sftp()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise SSHError(label, f"cannot start SFTP ({exc}); the host's sshd_config needs a "
                       "'Subsystem sftp' line") from None
    try:
        return sftp_put(sftp, local_path, remote_path, mode, label)
    finally:
        sftp.close()


def sftp_put(sftp: paramiko.SFTPClient, local_path: str | os.PathLike, remote_path: str,
             mode: int, label: str) -> str:
    """upload() over an open SFTP session."""
    local = Path(local_path)
    if not local.is_file():
        raise SSHError(label, f"cannot upload {local}: it is not a file on this machine")
    remote = remote_path
    tmp = None
    try:
        if not remote.startswith("/"):
            remote = posixpath.join(sftp.normalize("."), remote)
        remote = posixpath.normpath(remote)
        sftp_makedirs(sftp, posixpath.dirname(remote), label)
        tmp = f"{remote}.tmp-{secrets.token_hex(4)}"
        sftp.put(str(local), tmp, confirm=True)
        sftp.chmod(tmp, mode)
        sftp.posix_rename(tmp, remote)
        tmp = None
        return remote
    except OSError as exc:
        raise SSHError(label, f"upload of {local} to {remote} failed: "
                       f"{exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                sftp.remove(tmp)
            except OSError:
                pass


# ---------------------------------------------------------------- many hosts at once

@dataclasses.dataclass
class HostResult:
    """One host's outcome in a parallel() call: a value or an error."""

    name: str
    target: SSHTarget | None = None
    value: Any = None
    error: BaseException | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclasses.dataclass
class GroupResult:
    """All hosts' outcomes, in the order of the targets (fabric's GroupResult, as lists)."""

    results: list[HostResult]

    @property
    def succeeded(self) -> list[HostResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def values(self) -> dict[str, Any]:
        return {r.name: r.value for r in self.results if r.ok}

    def __iter__(self) -> Iterator[HostResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, name: str) -> HostResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def check(self) -> GroupResult:
        """Raise the first host's error (saying how many more failed) unless all succeeded."""
        failed = self.failed
        if not failed:
            return self
        first = failed[0].error
        if len(failed) == 1:
            raise first
        more = f" (and {len(failed) - 1} more hosts failed: " + ", ".join(
            r.name for r in failed[1:]) + ")"
        if isinstance(first, SSHError):
            raise type(first)(first.host, first.detail + more) from first
        raise first


def _discard_late(value: Any) -> None:
    if isinstance(value, (paramiko.SSHClient, paramiko.Channel)):
        value.close()


def parallel(targets: Iterable[SSHTarget], fn: Callable[[SSHTarget], Any],
             timeout_s: float = 60.0, *, max_workers: int = 64) -> GroupResult:
    """Call fn(target) for every target at once, each in its own thread.

    Returns when all have answered or timeout_s has passed, whichever is first: a host
    still busy then is reported failed with HostTimeout (its thread is left to finish
    on its own; an SSHClient or Channel it returns late is closed). Errors fn raises
    are reported per host, never raised."""
    targets = list(targets)
    results: list[HostResult | None] = [None] * len(targets)
    cond = threading.Condition()
    slots = threading.BoundedSemaphore(max(1, max_workers))
    deadline = time.monotonic() + timeout_s

    def work(i: int, target: SSHTarget) -> None:
        with slots:
            t0 = time.monotonic()
            if t0 > deadline:
                return
            try:
                res = HostResult(target.name, target, value=fn(target))
            except BaseException as exc:  # noqa: BLE001 - reported per host
                res = HostResult(target.name, target, error=exc)
            res.elapsed_s = time.monotonic() - t0
        with cond:
            late = results[i] is not None
            if not late:
                results[i] = res
                cond.notify_all()
        if late and res.ok:
            _discard_late(res.value)

    for i, target in enumerate(targets):
        threading.Thread(target=work, args=(i, target), daemon=True,
                         name=f"hpcbatch-ssh-{target.name}").start()
    with cond:
        while any(r is None for r in results):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            cond.wait(remaining)
        for i, target in enumerate(targets):
            if results[i] is None:
                results[i] = HostResult(target.name, target, error=HostTimeout(
                    target.label, f"no answer within {timeout_s:g} s; is the host hung or "
                    "the network dropping packets?"), elapsed_s=timeout_s)
    return GroupResult(results)  # type: ignore[arg-type]
