"""`hpcbatch serve` (the service daemon) and `hpcbatch keys create|list|revoke`."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import click

from hpcbatch import env as E


def _home(home: str | None) -> Path:
    from hpcbatch.home import default_home
    return Path(home).expanduser().resolve() if home else default_home()


def _timing(ctx, param, values: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        name, sep, secs = v.partition("=")
        try:
            out[name.strip()] = float(secs)
        except ValueError:
            raise click.BadParameter(f"{v!r} is not NAME=SECONDS") from None
        if not sep:
            raise click.BadParameter(f"{v!r} is not NAME=SECONDS")
    return out


@click.command("serve")
@click.option("--home", type=click.Path(file_okay=False),
              help=f"State directory (default: the global --home, ${E.HOME}, ~/.hpcbatch).")
@click.option("--bind", default="127.0.0.1:8470", show_default=True, metavar="HOST:PORT",
              help="Address to listen on (port 0: any free port; see service.json).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option("--store-only", is_flag=True, hidden=True,
              help="Serve the store without a coordinator: nothing runs (API tests).")
@click.option("--timing", "timings", multiple=True, hidden=True, callback=_timing,
              metavar="NAME=SECONDS", help="A coordinator clock (tests).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), hidden=True,
              help="The largest JSON body taken (tests).")
def serve(home, bind, tls_cert, tls_key, store_only, timings, max_body_bytes) -> None:
    """Run the coordinator as a service with an HTTP API (stop it with SIGTERM).

    \b
      hpcbatch serve                       # http://127.0.0.1:8470, loopback only
      hpcbatch serve --bind 0.0.0.0:8470 --tls-cert cert.pem --tls-key key.pem

    On its first start it makes an API key and prints it once ('hpcbatch keys' makes
    more). Clients of the same user find it through <home>/service.json. docs/SERVICE.md
    tells the rest (routes, keys, TLS, what SIGTERM does to running tasks, systemd).
    """
    from hpcbatch.server.daemon import serve as run
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not os.path.isfile(path):
            raise click.BadParameter(f"{path} is not a file", param_hint=flag)
    status = run(_home(home), bind, tls_cert=tls_cert, tls_key=tls_key, store_only=store_only,
                 timings=timings or None, max_body_bytes=max_body_bytes)
    if status:
        raise click.exceptions.Exit(status)


@click.group("keys")
def keys() -> None:
    """API keys of the service on this home (only their hashes are stored)."""


@keys.command("create")
@click.option("--name", default="", help="What the key is for (shown by 'keys list').")
@click.option("--read-only", is_flag=True, help="May read (list, show, logs), not change.")
def keys_create(name: str, read_only: bool) -> None:
    """Make a key and print it once (a running service takes it at once)."""
    from hpcbatch.server.auth import KeyFile
    key, text = KeyFile(_home(None)).create(name, read_only=read_only)
    click.echo(text)
    click.echo(f"key {key.id}{' (read-only)' if read_only else ''} created; it is shown only "
               "this once", err=True)


@keys.command("list")
def keys_list() -> None:
    """Every stored key: id, name, when made, read-only (never the key itself)."""
    from hpcbatch.cli import out, table
    from hpcbatch.server.auth import KeyFile
    rows = [[k.id, k.name, dt.datetime.fromtimestamp(k.created_at).isoformat(" ", "seconds"),
             "yes" if k.read_only else "no"] for k in KeyFile(_home(None)).read()]
    out.print(table(["id", "name", "created", "read-only"], rows, keep=("id",)))


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Delete a key: a running service refuses it from its next request on."""
    from hpcbatch.server.auth import KeyFile
    key = KeyFile(_home(None)).revoke(key_id)
    click.echo(f"key {key.id}{f' ({key.name})' if key.name else ''} revoked")
