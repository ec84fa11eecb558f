"""`hpcbatch storage create|list|upload|download|delete|ls`: containers of blobs.

Through the home's service (a running ``hpcbatch serve``, else the home itself), like
every other command. Large transfers show a progress bar on a terminal.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.table import Table

PROGRESS_MIN_BYTES = 8 << 20  # a bar only for transfers at least this big

out = Console(highlight=False, soft_wrap=True)


def _service() -> Any:
    from hpcbatch.cli import _service as service_of
    return service_of(create=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Any]:
    """A rich progress bar (on a terminal, for a big transfer), as a callable taking the
    bytes just moved."""
    if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@click.group("storage")
def storage() -> None:
    """Containers of blobs (input and output data), kept by the coordinator."""


@storage.command("create")
@click.argument("container")
@click.option("--url", default=None, help="Keep its blobs at this fsspec URL (file:///data, "
              "s3://bucket/prefix ...) instead of under the home.")
@click.option("--exist-ok", is_flag=True, help="No error when it exists already.")
def create(container: str, url: str | None, exist_ok: bool) -> None:
    """Create a container."""
    view = _service().create_container(container, url, exist_ok=exist_ok)
    out.print(f"container {view.name}: {view.location}", markup=False)


@storage.command("list")
def list_() -> None:
    """The containers."""
    items = _service().list_containers()
    table = Table("container", "location", "created")
    for c in items:
        table.add_row(c.name, c.location, _when(c.created_at))
    out.print(table)


@storage.command("ls")
@click.argument("container")
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per blob.")
def ls(container: str, prefix: str, as_json: bool) -> None:
    """The blobs of CONTAINER (whose names start with PREFIX): size, SHA-256, time."""
    import json
    items = _service().list_blobs(container, prefix)
    if as_json:
        for b in items:
            click.echo(json.dumps(b.to_dict()))
        return
    table = Table("blob", "size", "modified")
    table.add_column("sha256", overflow="fold")
    for b in items:
        table.add_row(b.name, _size(b.size), _when(b.modified_at), b.sha256 or "-")
    out.print(table)
    out.print(f"{len(items)} blob(s), {_size(sum(b.size for b in items))}", markup=False)


@storage.command("upload")
@click.argument("container")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", default=None, help="The blob's name (a directory: the prefix of its "
              "files' names; default the file's name / the paths below the directory).")
def upload(container: str, path: str, name: str | None) -> None:
    """Upload a file, or a directory recursively, into CONTAINER."""
    from hpcbatch.storage_api import upload_path, upload_size
    service = _service()
    service.get_container(container)  # a missing one said before anything is sent
    total = upload_size(path)
    with _progress(total, f"upload {path}") as bar:
        blobs = upload_path(service, container, path, name, progress=bar)
    for b in blobs[:20]:
        out.print(f"{b.name}  {_size(b.size)}  sha256 {b.sha256}", markup=False)
    if len(blobs) > 20:
        out.print(f"... and {len(blobs) - 20} more", markup=False)
    out.print(f"uploaded {len(blobs)} blob(s), {_size(sum(b.size for b in blobs))} to "
              f"{container}", markup=False)


@storage.command("download")
@click.argument("container")
@click.argument("name")
@click.argument("dest", type=click.Path(), default=".")
def download(container: str, name: str, dest: str) -> None:
    """Download blob NAME (or every blob under NAME when it ends in '/', '' for all) to
    DEST, each checked against its SHA-256."""
    from hpcbatch.storage_api import download as fetch
    service = _service()
    blobs = None
    if name == "" or name.endswith("/"):
        blobs = service.list_blobs(container, name)
        total = sum(b.size for b in blobs)
    else:
        total = service.blob_info(container, name).size
    with _progress(total, f"download {container}/{name}") as bar:
        files = fetch(service, container, name, dest, progress=bar, blobs=blobs)
    out.print(f"downloaded {len(files)} file(s), {_size(total)} to {dest}", markup=False)


@storage.command("delete")
@click.argument("container")
@click.argument("blob", required=False)
@click.option("--prefix", is_flag=True, help="BLOB is a prefix: delete every blob under it.")
def delete(container: str, blob: str | None, prefix: bool) -> None:
    """Delete CONTAINER (a default one with its blobs), or only its BLOB."""
    service = _service()
    if blob is None:
        service.delete_container(container)
        out.print(f"container {container} deleted", markup=False)
        return
    names = [b.name for b in service.list_blobs(container, blob)] if prefix else [blob]
    for n in names:
        service.delete_blob(container, n)
    out.print(f"{len(names)} blob(s) deleted from {container}", markup=False)


# ---- --resource / --output of 'submit' and 'task add' -----------------------------------

RESOURCE_HELP = ("A resource file from storage or a URL (repeatable): CONTAINER[/PREFIX/] "
                 "(its blobs, by name), CONTAINER/BLOB (one), or URL (http(s)://, s3:// "
                 "...), each [=DEST][@MODE] (DEST relative to the task's wd/; one ending in "
                 "'/' is a directory the file goes into; MODE like 0755); or a JSON "
                 "object of a resource file's fields.")
OUTPUT_HELP = ("An output file (repeatable): PATTERN=CONTAINER[/PATH][@success|failure|"
               "completion]: files matching the glob PATTERN (relative to wd/, may begin "
               "'../') uploaded to CONTAINER at PATH ({job}, {task}, {attempt} replaced) "
               "after the task ends; or a JSON object.")


def _json_item(option: str, item: str) -> Any:
    """An option's value given as a JSON object (it starts with '{'), else None."""
    import json

    from hpcbatch.errors import ValidationError
    if not item.lstrip().startswith("{"):
        return None
    try:
        return json.loads(item)
    except ValueError as exc:
        raise ValidationError(option, f"{item!r} is not JSON: {exc}") from None


def parse_resource(option: str, item: str) -> dict[str, Any]:
    import re

    from hpcbatch.errors import ValidationError
    from hpcbatch.models import ResourceFile
    d = _json_item(option, item)
    if d is None:
        text, mode = item, None
        m = re.search(r"@([0-7]{3,4})$", text)
        if m:
            text, mode = text[:m.start()], m.group(1)
        text, eq, dest = text.rpartition("=") if "=" in text else (text, "", "")
        if not text:
            raise ValidationError(option, f"{item!r}: give CONTAINER[/PREFIX/], "
                                  "CONTAINER/BLOB or URL before '='")
        if "://" in text:
            d = {"url": text}
        else:
            container, slash, rest = text.partition("/")
            if not rest or rest.endswith("/"):
                d = {"container": container, "blob_prefix": rest or None}
            else:
                d = {"storage_path": text}
        if dest:
            d["file_path"] = dest
        if mode:
            d["file_mode"] = mode
    try:
        return ResourceFile.check_list(option, [d])[0].to_dict()
    except ValidationError as exc:
        raise ValidationError(option, f"{item!r}: {exc.rule}") from None


def parse_output(option: str, item: str) -> dict[str, Any]:
    from hpcbatch.errors import ValidationError
    from hpcbatch.models import OutputFile
    d = _json_item(option, item)
    if d is None:
        pattern, eq, where = item.partition("=")
        if not eq or not pattern or not where:
            raise ValidationError(option, f"{item!r} is not PATTERN=CONTAINER[/PATH]"
                                  "[@CONDITION]")
        where, at, cond = where.rpartition("@") if "@" in where else (where, "", "")
        container, _, path = where.partition("/")
        d = {"pattern": pattern, "container": container, "path": path}
        if cond:
            d["upload_condition"] = cond if cond.startswith("task_") else f"task_{cond}"
    try:
        return OutputFile.check_list(option, [d])[0].to_dict()
    except ValidationError as exc:
        raise ValidationError(option, f"{item!r}: {exc.rule}") from None


def _keep(key: str, parse: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> None:
        ctx.meta[key] = [parse(f"--{param.name}", v) for v in values]
    return callback


def task_file_options() -> list[Any]:
    """--resource and --output for 'submit' and 'task add' (what they give is read back
    by task_file_fields, inside the command)."""
    return [click.option("--resource", multiple=True, metavar="SPEC", help=RESOURCE_HELP,
                         expose_value=False, callback=_keep("hpcbatch.resource",
                                                             parse_resource)),
            click.option("--output", multiple=True, metavar="SPEC", help=OUTPUT_HELP,
                         expose_value=False, callback=_keep("hpcbatch.output", parse_output))]


def task_file_fields() -> dict[str, Any]:
    """The TaskSpec fields --resource and --output gave (in the running command)."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    out: dict[str, Any] = {}
    if meta.get("hpcbatch.resource"):
        out["resource_files"] = list(meta["hpcbatch.resource"])
    if meta.get("hpcbatch.output"):
        out["output_files"] = list(meta["hpcbatch.output"])
    return out


__all__ = ["parse_output", "parse_resource", "storage", "task_file_fields",
           "task_file_options"]
