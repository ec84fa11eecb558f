"""The ``hpcbatch serve`` process: one coordinator on a home, behind the HTTP API.

Start: refuse a home whose service.json names a live server (CoordinatorBusy, exit 2);
bind the socket (a port in use is one line, exit 2); start the embedded coordinator
(which takes the home's lock); make the first API key if the home has none (printed
once); make this start's session key (``service.key``, 0600); serve with uvicorn; once
it listens, record ``service.json`` (0600) {url, pid, started_at, tls, cafile, ...}.

Stop (SIGTERM or SIGINT): uvicorn stops taking connections and waits (a few seconds)
for the requests in flight; long-polls, event and follow streams end at once. Then the
coordinator stops: nothing more is dispatched, its state is flushed and its agents are
stopped. Tasks that were running are recorded in flight, and the next start on the home
requeues them (``requeued_at_start``; not counted as retries); every job resumes.
service.json and service.key are removed; the exit status is 0 (130 after SIGINT).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hpcbatch._version import __version__
from hpcbatch.errors import CoordinatorBusy, HpcBatchError, ValidationError
from hpcbatch.remote import SERVICE_FILE as SERVICE_JSON
from hpcbatch.remote import SERVICE_KEY_FILE as SERVICE_KEY
from hpcbatch.remote import service_record

log = logging.getLogger("hpcbatch.server")

DEFAULT_BIND = "127.0.0.1:8470"
GRACEFUL_S = 5.0  # requests in flight at SIGTERM get this long to finish


def parse_bind(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT (port 0: any free port)."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValidationError("--bind", f"{text!r} is not HOST:PORT (such as {DEFAULT_BIND} "
                              "or [::1]:8470)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _remove_ours(home: Path) -> None:
    """service.json and service.key, if this process wrote them."""
    path = home / SERVICE_JSON
    try:
        ours = json.loads(path.read_text()).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        ours = False
    if ours:
        for name in (SERVICE_JSON, SERVICE_KEY):
            with contextlib.suppress(FileNotFoundError):
                (home / name).unlink()


def _check_tls(cert: str | None, key: str | None) -> None:
    if (cert is None) != (key is None):
        raise ValidationError("--tls-cert" if cert is None else "--tls-key",
                              "give both --tls-cert and --tls-key, or neither")
    if cert is None:
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValidationError("--tls-cert", f"cannot load the certificate {cert} with the "
                              f"key {key}: {getattr(exc, 'strerror', None) or exc}") from None


def _url(host: str, port: int, tls: bool) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn() if tls else ("127.0.0.1" if host != "::" else "::1")
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family == socket.AF_INET and not _is_ip(host):
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # created with IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on
        # connections of such a socket, and with Nagle on every small answer waited ~40 ms
        # for the client's delayed ACK between its headers and its body
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        why = exc.strerror or str(exc)
        hint = "; another program listens there: pick another port with --bind" \
            if exc.errno == 98 else ""
        raise HpcBatchError(f"cannot listen on {host}:{port}: {why}{hint}") from None
    sock.set_inheritable(False)
    return sock


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def serve(home: str | os.PathLike, bind: str = DEFAULT_BIND, *, tls_cert: str | None = None,
          tls_key: str | None = None, store_only: bool = False,
          timings: dict[str, float] | None = None, max_body_bytes: int | None = None,
          out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; returns the exit status. Errors before it
    listens are raised (HpcBatchError: one line, exit 2)."""
    out = out or sys.stdout
    err = err or sys.stderr
    home = Path(home).expanduser().resolve()
    host, port = parse_bind(bind)
    _check_tls(tls_cert, tls_key)
    tls = tls_cert is not None
    try:
        import uvicorn

        from hpcbatch.server.app import create_app, request_stop
    except ImportError as exc:
        raise HpcBatchError(f"hpcbatch serve needs the 'service' extra ({exc.name} is "
                            "missing): pip install 'hpcbatch[service]'") from None
    from hpcbatch.server.auth import KeyFile, KeyRing
    from hpcbatch.service import LocalService
    from hpcbatch.timings import Timings

    running = service_record(home)
    if running is not None and running.get("pid") != os.getpid():
        raise CoordinatorBusy(f"a service is already running on {home} (pid "
                              f"{running.get('pid')}, {running.get('url')}); stop it first "
                              f"(kill {running.get('pid')}) or give another --home")
    if not is_loopback(host) and not tls:
        print(f"warning: serving on {host}:{port} without TLS: API keys, commands and task "
              "output cross the network in clear text, and anyone who reads a key there can "
              "run commands as this user; give --tls-cert and --tls-key (or bind "
              "127.0.0.1 and reach it over an SSH tunnel)", file=err, flush=True)
    try:
        timing = Timings(**timings) if timings else Timings()
    except TypeError as exc:
        raise ValidationError("--timing", one_line(exc)) from None
    _log_to(err)

    signals: list[int] = []
    server_box: list[Any] = []

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)
        if server_box:
            server_box[0].should_exit = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    sock = None
    service = None
    try:
        sock = _listen(host, port)
        port = sock.getsockname()[1]
        service = LocalService(home, timings=timing) if store_only else \
            LocalService.embedded(home, timings=timing)
        keyfile = KeyFile(home)
        if not keyfile.read():
            key, text = keyfile.create("default")
            print(f"created the first API key, 'default' (id {key.id}); it is shown only "
                  f"this once, keep it:\n{text}", file=out, flush=True)
        ring = KeyRing(home)
        _write_private(home / SERVICE_KEY, ring.add_session_key("local") + "\n")
        url = _url(host, port, tls)
        record = {"url": url, "pid": os.getpid(), "started_at": time.time(), "tls": tls,
                  "home": str(home), "version": __version__,
                  "key_file": str(home / SERVICE_KEY), "store_only": store_only}
        if tls:
            record["cafile"] = str(Path(tls_cert).resolve())
        app = create_app(service, ring, **({} if max_body_bytes is None else
                                           {"max_body_bytes": max_body_bytes}))
        if signals:
            return _status(signals)

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                request_stop(app)
                signals.append(sig)
                super().handle_exit(sig, frame)

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    _write_private(home / SERVICE_JSON, json.dumps(record) + "\n")
                    print(f"hpcbatch serve: {url} (home {home}, pid {os.getpid()}"
                          f"{', store only: nothing runs' if store_only else ''}); "
                          "SIGTERM stops it", file=err, flush=True)

        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=GRACEFUL_S, server_header=False)
        server = Server(config)
        server_box.append(server)
        server.run(sockets=[sock])
        if not server.started:
            raise HpcBatchError("the HTTP server did not start (see the log above)")
        return _status(signals)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _remove_ours(home)
        if sock is not None:
            sock.close()
        if service is not None:
            stopping = time.monotonic()
            service.close()
            log.info("coordinator stopped in %.1f s; tasks in flight are requeued at the "
                     "next start", time.monotonic() - stopping)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def _log_to(err: TextIO) -> None:
    """The log (requests, coordinator) on stderr, unless logging is set up already."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _status(signals: list[int]) -> int:
    return 130 if signals and signals[0] == signal.SIGINT else 0


__all__ = ["DEFAULT_BIND", "SERVICE_JSON", "SERVICE_KEY", "is_loopback", "parse_bind",
           "serve"]
