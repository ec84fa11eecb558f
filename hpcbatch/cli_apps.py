"""``hpcbatch app``: application packages (upload, list, delete, set-default).

Through the home's service like every other command: a running ``hpcbatch serve``
(the archive is streamed to it) or the home itself.
"""

from __future__ import annotations

import datetime as dt

import click

from hpcbatch.cli import _service, out, table


@click.group("app")
def app() -> None:
    """Application packages: versioned .zip/.tar.gz archives unpacked once per node.

    \b
      hpcbatch app upload blast 2.14 blast-2.14.tar.gz --default
      hpcbatch pool create p --app blast            # every node, start task included
      hpcbatch submit --app blast:2.14 -- blastn -version   # its bin/ is on PATH
    """


@app.command("upload")
@click.argument("name")
@click.argument("version")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--default", "default", is_flag=True,
              help="Make it the default version (the first version uploaded always is).")
def app_upload(name: str, version: str, archive: str, default: bool) -> None:
    """Check ARCHIVE (.zip, .tar.gz) and keep it as NAME VERSION."""
    with _service(create=True) as service:
        v = service.upload_app(name, version, archive, default=default)
    out.print(f"application {v.name} {v.version} uploaded: {v.size:,} bytes, sha256 "
              f"{v.sha256[:16]}…{' (default)' if v.default else ''}", markup=False)


@app.command("list")
@click.argument("name", required=False)
def app_list(name: str | None) -> None:
    """Every package version (or NAME's): size, sha256, time, default."""
    with _service() as service:
        apps = service.list_apps(name)
    if not apps:
        out.print("no application packages (hpcbatch app upload NAME VERSION ARCHIVE)")
        return
    rows = [[a.name, a.version, "yes" if a.default else "", f"{a.size:,}", a.format,
             "yes" if a.has_bin else "", a.sha256[:16],
             dt.datetime.fromtimestamp(a.uploaded_at).strftime("%Y-%m-%d %H:%M:%S")]
            for a in apps]
    out.print(table(["application", "version", "default", "bytes", "format", "bin/",
                     "sha256", "uploaded"], rows, keep=("application", "version")))


@app.command("delete")
@click.argument("name")
@click.argument("version", required=False)
def app_delete(name: str, version: str | None) -> None:
    """Delete NAME VERSION (or, without VERSION, every version of NAME). Nodes keep
    what they unpacked; tasks that name it afterwards fail to start, saying so."""
    with _service() as service:
        gone = service.delete_app(name, version)
    out.print(f"deleted {', '.join(gone)}", markup=False)


@app.command("set-default")
@click.argument("name")
@click.argument("version")
def app_set_default(name: str, version: str) -> None:
    """Make VERSION the one a reference without a version gets."""
    with _service() as service:
        v = service.set_default_app(name, version)
    out.print(f"application {v.name}: default version {v.version}", markup=False)


def print_job_tasks(status: dict) -> None:
    """``job show``: the job's preparation and release tasks, and a row per node and kind
    (the logs: hpcbatch task logs JOB jobpreparation|jobrelease --node NODE)."""
    for name in ("preparation_task", "release_task"):
        spec = status.get(name)
        if spec:
            extra = ""
            if name == "preparation_task":
                extra = (f"  wait_for_success {str(spec['wait_for_success']).lower()}"
                         f"  retries {spec['max_task_retry_count']}")
            limit = spec.get("max_wall_clock_time_s")
            out.print(f"{name.replace('_', ' ')}: {spec['command_line']}{extra}"
                      + (f"  limit {limit:g} s" if limit else ""), markup=False)
    nodes = status.get("nodes") or []
    if nodes:
        rows = [[n["node_id"], n["kind"], n["state"],
                 "" if n["exit_code"] is None else str(n["exit_code"]), str(n["retry_count"]),
                 n["failure"] or ""] for n in nodes]
        out.print(table(["node", "task", "state", "exit", "retries", "reason"], rows,
                        keep=("node", "task", "state")))
