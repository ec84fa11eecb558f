"""The ``hpcbatch`` command line (click + rich).

Bad input exits 2 with one line ``error: ...`` on stderr (a traceback only with
``--debug``); a run whose tasks failed exits 1; Ctrl-C exits 130 and leaves the
job resumable with ``hpcbatch job wait``.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import math
import os
import re
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hpcbatch import env as E
from hpcbatch._version import __version__
from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.models import JobSpec, TaskSpec, check_id
from hpcbatch.query import (
    JOB_ITEM_FIELDS,
    TASK_FIELDS,
    TASK_ITEM_FIELDS,
    parse_filter,
    parse_select,
)

# piped output is not folded at 80 columns: ids and paths stay whole for grep and copy
out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False)


def table(columns: list[str], rows: list[list[Any]], *, keep: tuple[str, ...] = (),
          title: str | None = None, right: tuple[str, ...] = ()) -> Table:
    """A rich table whose ``keep`` columns (ids, names) never wrap, so they can be copied;
    the other columns fold when the terminal is narrow."""
    t = Table(title=title)
    for i, col in enumerate(columns):
        justify = "right" if col in right else "left"
        if col in keep:
            width = max([len(col)] + [len(str(r[i])) for r in rows])
            t.add_column(col, no_wrap=True, min_width=width, justify=justify)
        else:
            t.add_column(col, overflow="fold", justify=justify)
    for r in rows:
        t.add_row(*[str(c) for c in r])
    return t


def exit_text(t) -> str:
    """How a task's process ended: its exit code, or the signal that killed it."""
    if t["exit_code"] is not None:
        return str(t["exit_code"])
    return f"signal {t['signal']}" if t["signal"] else ""


# the names a task's command may use in argv form, replaced when the task is created
# (their values are ids and numbers: safe in any word, even one an inner shell runs)
SUBSTITUTED = (E.TASK_INDEX, E.TASK_ID, E.JOB_ID, E.POOL_ID)
_REF = re.compile(r"\$(?:\{(" + "|".join(SUBSTITUTED) + r")\}|(" + "|".join(SUBSTITUTED)
                  + r")(?![A-Za-z0-9_]))")


def command_line(argv: tuple[str, ...] | list[str], values: dict[str, str] | None = None
                 ) -> str:
    """The one quoting rule of 'submit' and 'task add'.

    One argument is a shell command line, stored as given. Several are an argv: every
    argument is quoted (shlex), so nothing in it is evaluated by the task's shell (a
    '$V', '$(...)' or quote reaches the program as written, and an inner 'sh -c' sees
    its script unchanged); only $HPCBATCH_TASK_INDEX, $HPCBATCH_TASK_ID,
    $HPCBATCH_JOB_ID and $HPCBATCH_POOL_ID (or ${...}) are replaced by the task's
    value when the task is created."""
    if len(argv) == 1:
        return argv[0]
    if values:
        def sub(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            return values.get(name, m.group(0))
        argv = [_REF.sub(sub, a) for a in argv]
    return shlex.join(argv)


def check_seconds(field: str, value: float | None) -> float | None:
    """A wall-clock limit: a finite number of seconds > 0 (click lets 'nan' through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValidationError(field, f"{value!r} is not a number of seconds > 0")
    return value


def _home() -> Path:
    from hpcbatch.service import default_home
    return default_home()


def _service(create: bool = False):
    """The running service the home's clients use (HPCBATCH_URL, or the home's live
    service.json: see hpcbatch.remote.discover); else the service on the home, without
    a coordinator (store and read)."""
    from hpcbatch.remote import connect
    remote = connect(home=_home())
    if remote is not None:
        return remote
    from hpcbatch.service import LocalService
    return LocalService(_home(), create=create)


def _warn(problems: list[str]) -> None:
    for line in problems:
        err.print(f"warning: {line}", markup=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), envvar=E.HOME,
              help=f"State directory (default ~/.hpcbatch, or ${E.HOME}).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="hpcbatch")
def cli(home: str | None, debug: bool) -> None:
    """hpcbatch: pools of machines, jobs of tasks, MPI kernels with results in HDF5."""
    if home:
        os.environ[E.HOME] = str(Path(home).expanduser().resolve())


# ---------------------------------------------------------------- submit

MAX_ARRAY = 1_000_000


def parse_array(text: str) -> list[int]:
    """'1-100', '1-100:5', '1,3,7-9' -> indices (Slurm --array syntax); more than
    MAX_ARRAY is refused before anything is expanded."""
    parts: list[range] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+)(?::(\d+))?)?\s*", part)
        if not m:
            raise ValidationError("--array", f"{part!r} is not N, N-M or N-M:STEP "
                                  "(for example 1-100 or 1,3,5-9)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step < 1:
            raise ValidationError("--array", f"{part!r}: the range must be ascending with "
                                  "a step >= 1")
        r = range(lo, hi + 1, step)
        if len(r) > MAX_ARRAY:  # counted, not expanded
            raise ValidationError("--array", f"{part!r} is {len(r):,} tasks, more than "
                                  f"{MAX_ARRAY:,}; split it into several jobs")
        parts.append(r)
    out_idx: set[int] = set()
    for r in parts:
        out_idx.update(r)
        if len(out_idx) > MAX_ARRAY:
            raise ValidationError("--array", f"more than {MAX_ARRAY:,} tasks; split it into "
                                  "several jobs")
    return sorted(out_idx)


def _tasks_from_lines(path: str, common: dict[str, Any]) -> list[TaskSpec]:
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValidationError("--each-line", f"{path} is not a text file") from None
    lines = text.splitlines()
    width = max(5, len(str(len(lines))))
    specs = [TaskSpec(f"line-{i:0{width}d}", line, **common)
             for i, line in enumerate(lines, 1) if line.strip() and not line.lstrip()
             .startswith("#")]
    if not specs:
        raise ValidationError("--each-line", f"{path} has no command lines (blank lines and "
                              "lines starting with # are skipped)")
    return specs


# ---- the task options 'submit' and 'task add' share (the API's TaskSpec fields)

WORKDIR_HELP = ("Where the command runs: 'submit' (the directory you run hpcbatch in: a "
                "relative 'sim.py' is found; the default on local pools), 'task' (the task's "
                "own wd/ on its node; the default on other pools) or an absolute PATH on the "
                "node.")


def _task_options(fn):
    """--nodes, --coordination-command, --common-file, --env, --file, --workdir."""
    for opt in reversed((
        click.option("--nodes", type=click.IntRange(1, 100_000), help="A multi-instance "
                     "task on N nodes at once (the primary runs the command, e.g. "
                     "hpcbatch-mpiexec -- python sim.py, with $HPCBATCH_HOSTFILE); --slots "
                     "is then the slots per node (default: whole nodes)."),
        click.option("--coordination-command", "coordination", metavar="CMD",
                     help="With --nodes: a command every node runs first (in the task's "
                     "directory; the common files are in $HPCBATCH_TASK_SHARED_DIR)."),
        click.option("--common-file", "common_files", multiple=True, metavar="SRC[:DEST]",
                     help="With --nodes: a file copied to every node's "
                     "$HPCBATCH_TASK_SHARED_DIR (as DEST; repeatable)."),
        click.option("--env", "env", multiple=True, metavar="K=V",
                     help="An environment variable of the task (repeatable)."),
        click.option("--file", "files", multiple=True, metavar="SRC[:DEST]",
                     help="A file of this machine copied into the task's wd/ before it "
                     "starts (as DEST; repeatable)."),
        click.option("--workdir", metavar="submit|task|PATH", help=WORKDIR_HELP),
        *_storage_options(),
        click.option("--app", "apps", multiple=True, metavar="NAME[:VERSION]",
                     help="An application package (hpcbatch app) unpacked on its node "
                     "first: $HPCBATCH_APP_<NAME>, its bin/ on PATH (repeatable)."),
    )):
        fn = opt(fn)
    return fn


def _storage_options() -> list:
    from hpcbatch.cli_storage import task_file_options
    return task_file_options()


def parse_env(items: tuple[str, ...]) -> dict[str, str]:
    """--env K=V, repeatable: {K: V} (a bad one names the option)."""
    from hpcbatch.models import ENV_NAME_RE
    env: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not ENV_NAME_RE.fullmatch(name):
            raise ValidationError("--env", f"{item!r} is not NAME=VALUE (a name of letters, "
                                  "digits and '_', not starting with a digit)")
        env[name] = value
    return env


def parse_files(option: str, items: tuple[str, ...]) -> list[dict[str, str]]:
    """--file / --common-file SRC[:DEST]: resource files (a source that holds a ':' is
    taken whole when it is a file)."""
    from hpcbatch.models import ResourceFile
    out = []
    for item in items:
        src, dest = item, ""
        if ":" in item and not Path(item).expanduser().is_file():
            src, _, dest = item.rpartition(":")
        if not Path(src).expanduser().is_file():
            raise ValidationError(option, f"{src!r} is not a file on this machine (give "
                                  "SRC or SRC:DEST, SRC an existing file)")
        try:
            rf = ResourceFile(src, dest)
        except ValidationError as exc:
            raise ValidationError(option, f"{item!r}: {exc.rule}") from None
        out.append({"source": rf.source, "file_path": rf.file_path})
    dests = [f["file_path"] for f in out]
    dup = next((d for d in dests if dests.count(d) > 1), None)
    if dup is not None:
        raise ValidationError(option, f"two files go to {dup!r}; give one SRC:DEST")
    return out


def resolve_workdir(workdir: str | None, provider: str | None) -> str | None:
    """--workdir as TaskSpec.working_dir: 'submit' the current directory, 'task' None (the
    task's own wd/), else an absolute path; unset: 'submit' on local pools, else 'task'."""
    from hpcbatch.providers import files_here
    if workdir is None:
        workdir = "submit" if files_here(provider) else "task"
    if workdir == "task":
        return None
    if workdir == "submit":
        return os.getcwd()
    if not workdir.strip() or "\0" in workdir:
        raise ValidationError("--workdir", f"{workdir!r} is not submit, task or a path")
    path = os.path.expanduser(workdir)
    if not os.path.isabs(path):
        if not files_here(provider):
            raise ValidationError("--workdir", f"{workdir!r}: give an absolute path on the "
                                  "nodes (or submit, task)")
        path = os.path.abspath(path)
    return os.path.normpath(path)


def task_fields(*, nodes, coordination, common_files, env, files, slots,
                apps=()) -> dict[str, Any]:
    """TaskSpec fields from the shared options (--slots: per node with --nodes)."""
    if nodes is None:
        for option, given in (("--coordination-command", coordination),
                              ("--common-file", common_files)):
            if given:
                raise ValidationError(option, "is for a multi-instance task; add --nodes N")
    from hpcbatch.cli_storage import task_file_fields
    fields: dict[str, Any] = {"environment": parse_env(env),
                              "resource_files": parse_files("--file", files)}
    more = task_file_fields()  # --resource, --output
    fields["resource_files"] += more.get("resource_files", [])
    if more.get("output_files"):
        fields["output_files"] = more["output_files"]
    if apps:
        fields["application_package_references"] = list(apps)
    if nodes is not None:
        if coordination is not None and not coordination.strip():
            raise ValidationError("--coordination-command", "is empty; give a command line")
        fields["multi_instance"] = {
            "instances": nodes, "coordination_command": coordination,
            "slots_per_instance": slots or 0,
            "common_resource_files": parse_files("--common-file", common_files)}
    else:
        fields["required_slots"] = slots or 1
    return fields


def _pool_provider(service, pool_id: str) -> str | None:
    """The pool's provider (None: the pool does not exist yet; 'local' is made on use)."""
    from hpcbatch.errors import NotFound
    try:
        return service.get_pool(pool_id).provider
    except NotFound:
        return None


class _StrictCommand(click.Command):
    """An option it does not know, before '--', is an error naming it (never a word of the
    command: a typo such as --retires must not run something else)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            raise click.UsageError(f"{_one_line(exc.format_message())} (the command to run, "
                                   "with its own options, goes after --)", ctx) from None


@cli.command(cls=_StrictCommand)
@click.option("--each-line", "each_line", type=click.Path(exists=True, dir_okay=False),
              help="Run one task per non-blank line of FILE (a shell command line).")
@click.option("--array", "array", help="Run CMD once per index (1-100, 1-100:2, 1,3,5-9); "
              f"the index is in ${E.TASK_INDEX}.")
@click.option("--job", "job_id", help="Job id (default: submit-<time>-<random>). An existing "
              "active job gets the tasks added.")
@click.option("--pool", "pool_id", default="local", show_default=True, help="Pool to run on.")
@click.option("--slots", type=click.IntRange(min=1), help="Task slots each task takes "
              "(default 1; with --nodes, per node: default the whole node).")
@click.option("--retries", type=click.IntRange(min=-1), default=0, show_default=True,
              help="Retries after a failure (-1: unlimited).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              help="Wall-clock limit per task, in seconds; the task's process group is killed.")
@click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True)
@click.option("--no-wait", is_flag=True, help="Store the tasks and return (a coordinator "
              "must run them: 'hpcbatch job wait JOB').")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: on when stderr is a terminal).")
@_task_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def submit(each_line, array, job_id, pool_id, slots, retries, timeout_s, priority, no_wait,
           progress, nodes, coordination, common_files, env, files, workdir, apps,
           command) -> None:
    """Run command-line tasks and summarise them. The command goes after --, verbatim;
    by default it runs in this directory on the local pool (--workdir).

    \b
      hpcbatch submit --each-line tasks.txt --retries 2 --timeout 60
      hpcbatch submit --array 1-100 -- python sim.py --seed '$HPCBATCH_TASK_INDEX'
      hpcbatch submit --pool mpi3 --nodes 3 -- hpcbatch-mpiexec -- python sim.py
    """
    if bool(each_line) == bool(command):
        raise ValidationError("submit", "give either --each-line FILE or a command after --")
    if array and not command:
        raise ValidationError("--array", "needs a command after --")
    check_seconds("--timeout", timeout_s)
    if job_id is None:
        job_id = f"submit-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    check_id("--job", job_id)
    check_id("--pool", pool_id)
    common: dict[str, Any] = {"max_task_retry_count": retries,
                              "max_wall_clock_time_s": timeout_s,
                              **task_fields(nodes=nodes, coordination=coordination,
                                            common_files=common_files, env=env, files=files,
                                            slots=slots, apps=apps)}
    values = {E.JOB_ID: job_id, E.POOL_ID: pool_id}

    def specs_in(wdir: str | None) -> list[TaskSpec]:
        one = {**common, "working_dir": wdir}
        if each_line:
            return _tasks_from_lines(each_line, one)
        if array:
            indices = parse_array(array)
            fixed = None if any(_REF.search(a) for a in command) else command_line(command)
            env_of = one.pop("environment")
            return [TaskSpec(f"task-{i}", fixed or command_line(
                command, {**values, E.TASK_INDEX: str(i), E.TASK_ID: f"task-{i}"}),
                environment={**env_of, E.TASK_INDEX: str(i)}, **one) for i in indices]
        return [TaskSpec("task-1", command_line(command, {**values, E.TASK_ID: "task-1"}),
                         **one)]
    job = JobSpec(job_id, pool_id, priority=priority, on_all_tasks_complete="terminate_job",
                  max_task_retry_count=retries)
    resolve_workdir(workdir, "local")  # a bad --workdir: said before anything starts

    if no_wait:  # store only: no coordinator needed
        with _service(create=True) as service:
            specs = specs_in(resolve_workdir(workdir, _pool_provider(service, pool_id)))
            service.submit(job, specs)
        out.print(f"job {job_id}: {len(specs)} tasks stored; run them with "
                  f"'hpcbatch job wait {job_id}'")
        return
    from hpcbatch.client import Batch
    with Batch() as batch:
        specs = specs_in(resolve_workdir(workdir, _pool_provider(batch.service, pool_id)))
        batch.service.submit(job, specs)
        err.print(f"job [bold]{job_id}[/]: {len(specs)} tasks on pool {pool_id}")
        _wait_and_report(batch, job_id, progress)


def _wait_and_report(batch, job_id: str, progress: bool | None) -> None:
    if progress is None:
        progress = sys.stderr.isatty()
    job = batch.jobs.get(job_id)

    def say(text: str) -> None:  # no silent wait: what a wide task waits for, when it changes
        if text:
            err.print(text, markup=False, soft_wrap=True)

    try:
        counts = job.wait(progress=progress, on_waiting=None if progress else say)
    except KeyboardInterrupt:
        c = job.counts()
        err.print(f"interrupted: {c['completed']}/{c['total']} tasks completed; resume with "
                  f"'hpcbatch job wait {job.id}'")
        raise SystemExit(130) from None
    _summary(batch.service, job_id, counts)
    if counts["failed"]:
        raise SystemExit(1)


def _duration(t) -> float | None:
    if t["started_at"] and t["ended_at"]:
        return t["ended_at"] - t["started_at"]
    return None


SUMMARY_SLOWEST_UP_TO = 10_000  # the slowest tasks are looked for in jobs up to this size
SUMMARY_FAILED = 20  # failed tasks the summary names


def _summary(service, job_id: str, counts: dict[str, int]) -> None:
    """The end of a run: the kept counts, the slowest tasks (jobs of up to
    SUMMARY_SLOWEST_UP_TO tasks, read a page at a time) and the first SUMMARY_FAILED
    failed ones: never every row of a big job."""
    cols = ["tasks", "succeeded", "failed", "timed out", "retried", "requeued"]
    out.print(table(cols, [[counts["total"], f"[green]{counts['succeeded']}",
                            f"[red]{counts['failed']}" if counts["failed"] else "0",
                            counts.get("timed_out", 0), counts.get("retried", 0),
                            counts.get("requeued", 0)]],
                    title=f"job {job_id}", right=tuple(cols)))
    if 1 < counts["total"] <= SUMMARY_SLOWEST_UP_TO:
        done = service.iter_tasks(job_id, filter="state eq 'completed'",
                                  select=["id", "started_at", "ended_at", "exit_code",
                                          "signal", "node_id"])
        slow = heapq.nlargest(5, (r for r in done if _duration(r) is not None),
                              key=_duration)
        if slow:
            out.print(table(["task", "seconds", "exit", "node"],
                            [[r["id"], f"{_duration(r):.3f}", exit_text(r), r["node_id"] or ""]
                             for r in slow], keep=("task", "node"), title="slowest tasks"))
    if counts["failed"]:
        failed = service.query_tasks(
            job_id, filter="state eq 'completed' and result eq 'failure'",
            select=["id", "failure", "exit_code", "signal", "retry_count", "task_dir"],
            max_results=SUMMARY_FAILED).items
        out.print(table(["task", "failure", "exit", "retries"],
                        [[r["id"], r["failure"] or "", exit_text(r), r["retry_count"]]
                         for r in failed], keep=("task",),
                        title=f"failed tasks ({counts['failed']})"))
        for r in failed:  # unwrapped, so the paths can be copied
            stderr_path = os.path.join(r["task_dir"], "stderr.txt") if r["task_dir"] else "-"
            out.print(f"{r['id']} stderr: {stderr_path}", soft_wrap=True, markup=False)
        more = (f" ({counts['failed'] - len(failed)} more: 'hpcbatch task list {job_id} "
                "--failed')") if counts["failed"] > len(failed) else ""
        out.print(f"read one with 'hpcbatch task logs {job_id} TASK --stderr'{more}",
                  soft_wrap=True, markup=False)


# ---------------------------------------------------------------- pools

@cli.group()
def pool() -> None:
    """Pools of nodes."""


@pool.command("list")
def pool_list() -> None:
    """The pools, with how many nodes are in each state."""
    with _service() as service:
        rows = [[p.id, p.provider, p.task_slots_per_node, p.scheduling_policy, p.nodes,
                 ", ".join(f"{k} {v}" for k, v in p.node_states.items())]
                for p in service.list_pools()]
    out.print(table(["pool", "provider", "slots/node", "policy", "nodes", "states"], rows,
                    keep=("pool",)))


@pool.command("show")
@click.argument("pool_id")
def pool_show(pool_id: str) -> None:
    """A pool's settings and each node's state (with the reason when it is unusable)."""
    with _service() as service:
        p = service.get_pool(pool_id)
        nodes = service.list_nodes(pool_id)
    out.print(f"pool [bold]{p.id}[/]  provider {p.provider}  {p.task_slots_per_node} slots/node"
              f"  policy {p.scheduling_policy}  target nodes {p.target_nodes}")
    if p.start_task:
        out.print(f"start task: {p.start_task}", markup=False)
    for line in p.notes:
        out.print(line, markup=False)
    rows = [[n.id, n.state + (" (reconnecting)" if n.reconnecting else ""), n.slots,
             n.hostname or "", n.reason or ""] for n in nodes]
    out.print(table(["node", "state", "slots", "host", "reason"], rows, keep=("node",)))
    from hpcbatch.cli_autoscale import show_lines
    for line in show_lines(p):
        out.print(line, markup=False, soft_wrap=True)


@pool.command("delete")
@click.argument("pool_id")
def pool_delete(pool_id: str) -> None:
    """Delete a pool that has no jobs left. An SSH pool's inter-node key is taken out
    of every node's authorized_keys (a node that cannot be reached is named)."""
    with _service() as service:
        problems = service.delete_pool(pool_id)
    _warn(problems)
    out.print(f"pool {pool_id} deleted", markup=False)
    if problems:
        raise SystemExit(1)


@pool.command("create")
@click.argument("pool_id")
@click.option("--slots", "slots", type=click.IntRange(min=1), default=1, show_default=True,
              help="Task slots per node.")
@click.option("--policy", type=click.Choice(["pack", "spread"]), default="pack",
              show_default=True)
@click.option("--start-task", help="Command every node runs before it takes tasks.")
@click.option("--nodes", type=click.IntRange(0, 64), default=None,
              help="Local pools: simulated nodes on this machine (one agent each; 0: none until "
              "it is resized or autoscaled) [default: 1]; Slurm pools: allocation slots "
              "to hold at once [default: 0].")
@click.option("--spec", type=click.Path(dir_okay=False), help="SSH pool from a pool.json "
              "(as 'hpcbatch cluster up' writes).")
@click.option("--ssh", "hostlist", help="SSH pool from a host list: node[01-16],login1.")
@click.option("--user", help="SSH user (default: yours).")
@click.option("--key", type=click.Path(dir_okay=False), help="SSH private key.")
@click.option("--known-hosts", type=click.Path(dir_okay=False),
              help="known_hosts holding the nodes' host keys (checked strictly).")
@click.option("--ssh-config", type=click.Path(dir_okay=False),
              help="ssh_config with per-host HostName/Port/User.")
@click.option("--port", type=click.IntRange(1, 65535))
@click.option("--python", "python", help="python3 on the nodes (default: python3).")
@click.option("--mpi-prefix", help="SSH pools: the nodes' MPI installation, PREFIX/bin/"
              "mpiexec, for hpcbatch-mpiexec (default: the mpiexec beside --python, else "
              "the nodes' PATH).")
@click.option("--node-root", help="Where nodes keep task directories: NODE_ROOT/HOME_ID/"
              "POOL/NODE, HOME_ID a random id of this home (default ~/.hpcbatch-node).")
@click.option("--authorized-keys", help="The nodes' authorized_keys file, where the pool's "
              "inter-node key is added (default: ~/.ssh/authorized_keys).")
@click.option("--inter-node-communication/--no-inter-node-communication", "inter_node",
              default=None, help="SSH pools: give the nodes a pool key and ssh_config so "
              "MPI reaches every node (default: on). Off: the nodes' own SSH set-up is used.")
@click.option("--trust-on-first-use", is_flag=True,
              help="Record unknown host keys into --known-hosts instead of refusing them.")
@click.option("--slurm", is_flag=True, default=None, help="A Slurm pool: nodes held as "
              "Slurm allocations (sbatch pilot jobs), agents started in them with srun.")
@click.option("--partition", help="Slurm pools: the partition to allocate in.")
@click.option("--account", help="Slurm pools: the account to charge.")
@click.option("--nodes-per-allocation", type=int, help="Slurm pools: nodes per allocation "
              "(at least a multi-instance task's nodes) [default: 1].")
@click.option("--walltime", help="Slurm pools: each allocation's time limit (1:00:00).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="OPTION",
              help="Slurm pools: one more sbatch option (--qos=high); repeatable.")
@click.option("--app", "apps", multiple=True, metavar="NAME[:VERSION]",
              help="An application package every node gets before its start task, for "
              "all the pool's tasks (repeatable; see hpcbatch app).")
def pool_create(pool_id, slots, policy, start_task, nodes, spec, hostlist, user, key,
                known_hosts, ssh_config, port, python, mpi_prefix, node_root, authorized_keys,
                inter_node, trust_on_first_use, slurm, partition, account,
                nodes_per_allocation, walltime, sbatch_args, apps) -> None:
    """Create a pool: local (this machine) or SSH (--spec or --ssh).

    An SSH pool's hosts are all contacted first (host keys checked strictly); nothing
    is stored unless every one answers. Its nodes are bootstrapped by the next
    coordinator that runs (submit, run, job wait)."""
    ssh_options = {k: v for k, v in dict(
        spec=spec, hostlist=hostlist, user=user, key=key, known_hosts=known_hosts,
        ssh_config=ssh_config, port=port, python=python, mpi_prefix=mpi_prefix,
        node_root=node_root, authorized_keys=authorized_keys, slurm=slurm,
        partition=partition, account=account, nodes_per_allocation=nodes_per_allocation,
        walltime=walltime, sbatch_args=sbatch_args or None).items() if v is not None}
    from hpcbatch.providers import provider_of_options
    with _service(create=True) as service:
        p = service.create_pool(
            pool_id, provider_of_options(ssh_options), task_slots_per_node=slots,
            scheduling_policy=policy, target_nodes=nodes, start_task=start_task,
            inter_node_communication=inter_node, trust_on_first_use=trust_on_first_use,
            **ssh_options, **({"application_package_references": list(apps)} if apps else {}))
    trust = "; inter-node SSH on" if p.inter_node_communication else ""
    out.print(f"pool {pool_id} created: {p.where}; {slots} slot(s) per node, {policy}{trust}",
              soft_wrap=True, markup=False)


# ---------------------------------------------------------------- jobs

@cli.group()
def job() -> None:
    """Jobs: groups of tasks bound to a pool."""


def _filter_option(what: str):
    return click.option("--filter", "filter_", metavar="FILTER",
                        help=f"Only the {what} that match, in Batch's $filter style: "
                        "\"state eq 'completed' and exit_code ne 0\", "
                        "\"startswith(id,'sim-')\" (see hpcbatch.query).")


def _select_option(fields: tuple[str, ...]):
    return click.option("--select", metavar="FIELDS",
                        help=f"Comma-separated fields to show: {', '.join(fields)}.")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _pages(query, wanted: int, continuation: str | None):
    """Up to ``wanted`` items, a page (of at most 1000) at a time; and the token of the
    rest (None: no more)."""
    from hpcbatch.query import MAX_RESULTS
    items: list[dict] = []
    token = continuation
    while len(items) < wanted:
        page = query(min(MAX_RESULTS, wanted - len(items)), token)
        items += page.items
        token = page.continuation
        if token is None:
            break
    return items, token


def _more(what: str, token: str | None, shown: int, total: int | None) -> None:
    if token is None:
        return
    of = f" of {total}" if total is not None else ""
    err.print(f"showing {shown}{of} {what}; the next ones: add --continuation {token}",
              markup=False, soft_wrap=True)


JOB_COLUMNS = ("job", "pool", "state", "priority", "tasks", "completed", "failed", "created")


@job.command("list")
@_filter_option("jobs")
@_select_option(JOB_ITEM_FIELDS)
@click.option("--max", "max_", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Show at most this many jobs.")
@click.option("--continuation", metavar="TOKEN", help="Go on from where a listing stopped.")
def job_list(filter_, select, max_, continuation) -> None:
    """The jobs, newest last, with their task counts."""
    fields = parse_select(select, JOB_ITEM_FIELDS) if select else None
    with _service() as service:
        jobs, token = _pages(lambda n, t: service.query_jobs(
            filter=filter_, select=fields, max_results=n, continuation=t), max_, continuation)
    if fields:
        out.print(table(list(fields), [[_cell(j[f]) for f in fields] for j in jobs],
                        keep=tuple(f for f in fields if f in ("id", "pool_id"))))
    else:
        zero = {"total": 0, "completed": 0, "failed": 0}
        rows = [[j["id"], j["pool_id"], j["state"], j["priority"],
                 (j["counts"] or zero)["total"], (j["counts"] or zero)["completed"],
                 (j["counts"] or zero)["failed"],
                 dt.datetime.fromtimestamp(j["created_at"]).strftime("%Y-%m-%d %H:%M:%S")]
                for j in jobs]
        out.print(table(list(JOB_COLUMNS), rows, keep=("job", "pool", "completed", "created")))
    _more("jobs", token, len(jobs), None)


@job.command("show")
@click.argument("job_id")
def job_show(job_id: str) -> None:
    """A job's settings and task counts."""
    with _service() as service:
        j = service.get_job(job_id)
        c = service.job_counts(job_id)
        jt = service.job_task_status(job_id)
    out.print(f"job [bold]{job_id}[/]  pool {j.pool_id}  state {j.state}  priority "
              f"{j.priority}  on_all_tasks_complete {j.on_all_tasks_complete}")
    out.print(f"tasks {c['total']}: active {c['active']}, preparing {c['preparing']}, "
              f"running {c['running']}, completed "
              f"{c['completed']} (succeeded {c['succeeded']}, failed {c['failed']}); "
              f"retries {c['retries']}, requeues {c['requeues']}")
    from hpcbatch.cli_apps import print_job_tasks
    print_job_tasks(jt)


@job.command("delete")
@click.argument("job_id")
def job_delete(job_id: str) -> None:
    """Delete a finished job, its tasks' records and their directories on the nodes."""
    with _service() as service:
        problems = service.delete_job(job_id)
    _warn(problems)
    out.print(f"job {job_id} deleted", markup=False)
    if problems:
        raise SystemExit(1)


@job.command("create")
@click.argument("job_id")
@click.option("--pool", "pool_id", default="local", show_default=True)
@click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True)
@click.option("--retries", type=click.IntRange(min=-1), default=0, show_default=True)
@click.option("--on-all-tasks-complete", "on_complete",
              type=click.Choice(["no_action", "terminate_job"]), default="no_action",
              show_default=True, help="terminate_job: the job completes once all its tasks "
              "have (no_action: it stays active for more tasks until 'job terminate').")
@click.option("--prep-command", metavar="CMD", help="Job preparation task: runs on a node "
              "before the job's first task there, in $HPCBATCH_JOB_PREP_DIR (which the "
              "job's tasks on that node share).")
@click.option("--prep-no-wait", is_flag=True, help="Tasks need not wait for it to succeed "
              "(by default they wait, and a node where it fails skips the job).")
@click.option("--prep-retries", type=click.IntRange(0, 100), default=0, show_default=True)
@click.option("--prep-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Wall-clock limit of the preparation task, in seconds.")
@click.option("--prep-env", multiple=True, metavar="K=V")
@click.option("--prep-file", multiple=True, metavar="SRC[:DEST]",
              help="A file copied into $HPCBATCH_JOB_PREP_DIR first (repeatable).")
@click.option("--release-command", metavar="CMD", help="Job release task: runs on every "
              "node that ran the job's tasks when the job completes or is terminated.")
@click.option("--release-timeout", type=click.FloatRange(min=0, min_open=True),
              default=900, show_default=True, help="Its wall-clock limit, in seconds.")
def job_create(job_id, pool_id, priority, retries, on_complete, prep_command, prep_no_wait,
               prep_retries, prep_timeout, prep_env, prep_file, release_command,
               release_timeout) -> None:
    """Create an empty job (add tasks with 'hpcbatch task add')."""
    prep = release = None
    if prep_command is not None:
        prep = {"command_line": prep_command, "wait_for_success": not prep_no_wait,
                "max_task_retry_count": prep_retries, "max_wall_clock_time_s": prep_timeout,
                "environment": parse_env(prep_env),
                "resource_files": parse_files("--prep-file", prep_file)}
    elif prep_no_wait or prep_timeout or prep_env or prep_file or prep_retries:
        raise ValidationError("--prep-command", "the --prep-* options need --prep-command")
    if release_command is not None:
        release = {"command_line": release_command, "max_wall_clock_time_s": release_timeout}
    with _service(create=True) as service:
        service.create_job(job_id, pool_id, priority=priority, max_task_retry_count=retries,
                           on_all_tasks_complete=on_complete, preparation_task=prep,
                           release_task=release)
    out.print(f"job {job_id} created on pool {pool_id}")


@job.command("wait")
@click.argument("job_id")
@click.option("--progress/--no-progress", default=None)
def job_wait(job_id: str, progress) -> None:
    """Drive JOB to completion with an embedded coordinator (resumes after a crash);
    with a running service (hpcbatch serve), follow JOB there."""
    from hpcbatch.client import Batch
    with _service() as service:
        service.get_job(job_id)
    with Batch() as batch:
        if batch.requeued_at_start:
            err.print(f"requeued {batch.requeued_at_start} task(s) that were "
                      "running when the previous coordinator stopped")
        _wait_and_report(batch, job_id, progress)


# ---------------------------------------------------------------- tasks

@cli.group()
def task() -> None:
    """Tasks of a job."""


TASK_LIST_FIELDS = ("id", "state", "result", "exit_code", "signal", "retry_count", "node_id",
                    "started_at", "ended_at")


@task.command("list")
@click.argument("job_id")
@click.option("--state", type=click.Choice(["active", "preparing", "running", "completed"]))
@click.option("--failed", is_flag=True, help="Only completed tasks that failed.")
@_filter_option("tasks")
@_select_option(TASK_ITEM_FIELDS)
@click.option("--max", "--limit", "max_", type=click.IntRange(min=1), default=1000,
              show_default=True, help="Show at most this many tasks (read 1000 at a time).")
@click.option("--continuation", metavar="TOKEN", help="Go on from where a listing stopped.")
def task_list(job_id, state, failed, filter_, select, max_, continuation) -> None:
    """A job's tasks (at most --max of them), in submission order."""
    parse_filter(filter_, TASK_FIELDS)  # a bad one named at its own positions
    fields = parse_select(select, TASK_ITEM_FIELDS) if select else None
    terms = [f"state eq '{state}'"] if state else []
    terms += ["state eq 'completed' and result eq 'failure'"] if failed else []
    terms += [f"({filter_})"] if filter_ and filter_.strip() else []
    query = " and ".join(terms) or None
    with _service() as service:
        rows, token = _pages(lambda n, t: service.query_tasks(
            job_id, filter=query, select=fields or TASK_LIST_FIELDS, max_results=n,
            continuation=t), max_, continuation)
        total = None
        if token is not None and not (filter_ and filter_.strip()):
            counts = service.job_counts(job_id)  # kept: one row read
            total = counts["failed"] if failed else counts[state] if state else counts["total"]
    if fields:
        out.print(table(list(fields), [[_cell(r[f]) for f in fields] for r in rows],
                        keep=tuple(f for f in fields if f in ("id", "node_id"))))
    else:
        shown = [[r["id"], r["state"], r["result"] or "", exit_text(r), r["retry_count"],
                  r["node_id"] or "", f"{d:.3f}" if (d := _duration(r)) is not None else ""]
                 for r in rows]
        out.print(table(["task", "state", "result", "exit", "retries", "node", "seconds"],
                        shown, keep=("task", "node")))
    _more("tasks", token, len(rows), total)


def _iso(t: float | None) -> str | None:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat() if t else None


@task.command("show")
@click.argument("job_id")
@click.argument("task_id")
def task_show(job_id, task_id) -> None:
    """Everything stored about one task, with its attempts, as JSON."""
    with _service() as service:
        r = service.get_task(job_id, task_id).to_dict()
        attempts = [a.to_dict() for a in service.task_attempts(job_id, task_id)]
    for item in (r, *attempts):
        for k in ("started_at", "ended_at"):
            item[k] = _iso(item[k])
    if r["task_dir"]:
        r["stdout"] = os.path.join(r["task_dir"], "stdout.txt")
        r["stderr"] = os.path.join(r["task_dir"], "stderr.txt")
    r["attempts"] = attempts
    out.print_json(json.dumps(r))


@task.command("attempts")
@click.argument("job_id")
@click.argument("task_id")
def task_attempts(job_id, task_id) -> None:
    """A task's attempts: where each ran, how long, how it ended."""
    with _service() as service:
        attempts = service.task_attempts(job_id, task_id)
    rows = [[a.attempt, a.node_id or "", a.outcome, exit_text(a),
             a.failure_kind or "", a.failure_detail or "",
             f"{a.ended_at - a.started_at:.3f}" if a.started_at and a.ended_at else ""]
            for a in attempts]
    out.print(table(["attempt", "node", "outcome", "exit", "failure", "detail", "seconds"],
                    rows, keep=("node",)))


@task.command("add", cls=_StrictCommand)
@click.argument("job_id")
@click.argument("task_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--slots", type=click.IntRange(min=1), help="Task slots it takes (default 1; "
              "with --nodes, per node: default the whole node).")
@click.option("--retries", type=click.IntRange(min=-1))
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True))
@_task_options
def task_add(job_id, task_id, command, slots, retries, timeout_s, nodes, coordination,
             common_files, env, files, workdir, apps) -> None:
    """Add one task to JOB: hpcbatch task add JOB TASK [OPTIONS] -- CMD ARGS..."""
    check_seconds("--timeout", timeout_s)
    fields = task_fields(nodes=nodes, coordination=coordination, common_files=common_files,
                         env=env, files=files, slots=slots, apps=apps)
    resolve_workdir(workdir, "local")  # a bad --workdir: said before anything is read
    with _service() as service:
        pool_id = service.get_job(job_id).pool_id
        values = {E.JOB_ID: job_id, E.TASK_ID: task_id, E.POOL_ID: pool_id}
        spec = TaskSpec(task_id, command_line(command, values), max_task_retry_count=retries,
                        max_wall_clock_time_s=timeout_s, working_dir=resolve_workdir(
                            workdir, _pool_provider(service, pool_id)), **fields)
        service.add_tasks(job_id, [spec])
    out.print(f"task {task_id} added to job {job_id}")


@task.command("logs")
@click.argument("job_id")
@click.argument("task_id")
@click.option("--stderr", "which", flag_value="stderr.txt", help="Show stderr.")
@click.option("--stdout", "which", flag_value="stdout.txt", default=True, help="Show stdout.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the task writes until "
              "it completes (waits for one that has not started).")
@click.option("--coordination", is_flag=True, help="A multi-instance task's coordination "
              "command output (coordination-stdout.txt / -stderr.txt), of every node that "
              "ran it, each under a '==> node N <==' line (or only --node's).")
@click.option("--node", "node_id", help="Read the task's directory on this node of its pool "
              "(a multi-instance task's other instances).")
def task_logs(job_id, task_id, which, follow, coordination, node_id) -> None:
    """Print a task's stdout (or --stderr); SSH nodes' files are fetched over SFTP.
    With -f, tail a running task to its end."""
    if node_id is not None:
        check_id("--node", node_id)
    if follow and coordination and node_id is None:
        raise ValidationError("--follow", "with --coordination follows one node: add "
                              "--node N")
    name = f"coordination-{which}" if coordination else which
    with _service() as service:
        if coordination and node_id is None:
            _coordination_logs(service, job_id, task_id, name)
            return
        if not follow:
            sys.stdout.buffer.write(service.read_task_file(job_id, task_id, name,
                                                           node=node_id))
            return
        service.get_task(job_id, task_id)  # a task that does not exist: say so at once
        for chunk in service.follow_task_file(job_id, task_id, name, node=node_id):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


def _coordination_logs(service, job_id: str, task_id: str, name: str) -> None:
    """The coordination output of every node that holds the task's directory: its own
    node first, then the pool's others, each under a '==> node N <==' line."""
    from hpcbatch.errors import NotFound
    t = service.get_task(job_id, task_id)
    first = service.read_task_file(job_id, task_id, name)  # its own node: errors said
    pool_id = service.get_job(job_id).pool_id
    shown = 0
    for n in [t.node_id] + [n.id for n in service.list_nodes(pool_id) if n.id != t.node_id]:
        try:
            data = first if n == t.node_id else service.read_task_file(
                job_id, task_id, name, node=n)
        except (NotFound, HpcBatchError):
            continue
        sys.stdout.write(f"==> node {n}: {name} <==\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        if data and not data.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
        shown += 1
    if not shown:
        raise NotFound(f"task {job_id}/{task_id} has no {name}")


# ---------------------------------------------------------------- pool size, nodes, job
# ---------------------------------------------------------------- terminate, task reactivate
# ---------------------------------------------------------------- and delete

RUNNING_CHOICES = ("requeue", "terminate", "taskcompletion")  # hpcbatch.state.RUNNING_OPTIONS


@pool.command("resize")
@click.argument("pool_id")
@click.argument("target_nodes", type=int, required=False)
@click.option("--target", "target", type=int, help="The number of nodes (0 and up; or "
              "give it as TARGET_NODES).")
@click.option("--deallocation", default="requeue", show_default=True,
              help="What becomes of the running tasks of a node that leaves: requeue "
              "(killed, run again), terminate (killed, failed), task_completion (left to "
              "finish), retained_data (left to finish, task directories kept).")
def pool_resize(pool_id: str, target_nodes: int | None, target: int | None,
                deallocation: str) -> None:
    """Grow or shrink POOL to TARGET_NODES nodes. A node that leaves first takes no new
    work; idle nodes leave first. An SSH pool's host list is its capacity: the first
    TARGET_NODES hosts are in, the others drained and left idle."""
    if (target_nodes is None) == (target is None):
        raise ValidationError("--target", "give the number of nodes once: --target N (or "
                              "as TARGET_NODES)")
    n = target if target is not None else target_nodes
    from hpcbatch.autoscale import normalize_option
    deallocation = normalize_option(deallocation, "--deallocation")
    with _service() as service:
        p = service.resize_pool(pool_id, n, deallocation=deallocation)
    out.print(f"pool {pool_id}: target {p.target_nodes} node(s) (deallocation "
              f"{deallocation})", markup=False)


@cli.group()
def node() -> None:
    """Nodes of a pool: disable or enable scheduling, remove."""


_RUNNING_HELP = ("What happens to the node's running tasks: killed and requeued (not a "
                 "retry), killed and failed (killed:terminate), or left to finish.")


@node.command("disable")
@click.argument("pool_id")
@click.argument("node_id")
@click.option("--running", type=click.Choice(RUNNING_CHOICES), default="taskcompletion",
              show_default=True, help=_RUNNING_HELP)
def node_disable(pool_id: str, node_id: str, running: str) -> None:
    """Place no new tasks on NODE of POOL."""
    with _service() as service:
        n = service.disable_node_scheduling(pool_id, node_id, running=running)
    out.print(f"node {pool_id}/{n.id}: scheduling disabled ({n.state})", markup=False)


@node.command("enable")
@click.argument("pool_id")
@click.argument("node_id")
def node_enable(pool_id: str, node_id: str) -> None:
    """Let NODE of POOL take tasks again."""
    with _service() as service:
        n = service.enable_node_scheduling(pool_id, node_id)
    out.print(f"node {pool_id}/{n.id}: scheduling enabled ({n.state})", markup=False)


@node.command("remove")
@click.argument("pool_id")
@click.argument("node_id")
@click.option("--running", type=click.Choice(RUNNING_CHOICES), default="requeue",
              show_default=True, help=_RUNNING_HELP)
def node_remove(pool_id: str, node_id: str, running: str) -> None:
    """Take NODE out of POOL: its agent stops once its tasks are handled as --running
    says (a local pool is one node smaller; an SSH pool loses the host)."""
    with _service() as service:
        service.remove_node(pool_id, node_id, running=running)
    out.print(f"node {pool_id}/{node_id}: removed from the pool", markup=False)


@job.command("terminate")
@click.argument("job_id")
def job_terminate(job_id: str) -> None:
    """Stop JOB: tasks not started complete as failed (killed:terminate), running ones
    are killed; no tasks can be added to it afterwards."""
    with _service() as service:
        j = service.terminate_job(job_id)
    out.print(f"job {job_id} terminated ({j.state})", markup=False)


@task.command("reactivate")
@click.argument("job_id")
@click.argument("task_id")
def task_reactivate(job_id: str, task_id: str) -> None:
    """Run a failed completed task again (its retry count starts again at 0)."""
    with _service() as service:
        t = service.reactivate_task(job_id, task_id)
    out.print(f"task {job_id}/{task_id} reactivated ({t.state})", markup=False)


@task.command("delete")
@click.argument("job_id")
@click.argument("task_id")
def task_delete(job_id: str, task_id: str) -> None:
    """Delete a task (terminated first if it has not completed), its attempts and its
    directories on the nodes."""
    with _service() as service:
        service.delete_task(job_id, task_id)
    out.print(f"task {job_id}/{task_id} deleted", markup=False)


@click.command("get")
@click.argument("run_id")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where the HDF5 result file goes.")
def results_get(run_id: str, output: str) -> None:
    """Download kernel run RUN_ID's result file (from the running service, or this
    home's runs) to OUTPUT."""
    import shutil
    dest = Path(output).expanduser().resolve()
    if not dest.parent.is_dir():
        raise ValidationError("--output", f"directory {dest.parent} does not exist")
    with _service() as service:
        if hasattr(service, "save_run_result"):
            service.save_run_result(run_id, dest)
        else:
            run = service.get_run(run_id)
            if run.state != "succeeded":
                from hpcbatch.errors import Conflict
                raise Conflict(f"kernel run {run_id!r} is {run.state}; its result file comes "
                               "once it succeeded" + (f" ({run.error})" if run.error else ""))
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            try:
                shutil.copyfile(service.run_output(run_id), tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    out.print(f"kernel run {run_id}: result file {dest} ({dest.stat().st_size:,} bytes)",
              soft_wrap=True, markup=False)


def _register_optional() -> None:
    """Commands that live in their own modules."""
    import importlib
    for mod, name in (("hpcbatch.cli_cluster", "cluster"), ("hpcbatch.cli_kernels", "run"),
                      ("hpcbatch.cli_kernels", "results"), ("hpcbatch.cli_serve", "serve"),
                      ("hpcbatch.cli_serve", "keys"), ("hpcbatch.cli_storage", "storage"),
                      ("hpcbatch.cli_apps", "app"), ("hpcbatch.cli_bench", "bench")):
        try:
            cmd = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        cli.add_command(cmd)


_register_optional()
from hpcbatch.cli_autoscale import autoscale as _autoscale  # noqa: E402 - beside pool

pool.add_command(_autoscale)
if isinstance(cli.commands.get("results"), click.Group):
    cli.commands["results"].add_command(results_get)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error is one line 'error: ...' on stderr and exit status 2
    (a run whose tasks failed: 1; interrupted: 130). --debug shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("HPCBATCH_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="hpcbatch", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        if debug:
            raise
        err.print(f"error: {_one_line(exc.format_message())}", markup=False, soft_wrap=True)
        return 2 if exc.exit_code in (1, 2) else exc.exit_code
    except HpcBatchError as exc:
        if debug:
            raise
        err.print(f"error: {_one_line(exc)}", markup=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (but --debug)
        if debug:
            raise
        err.print(f"error: {_unexpected(exc)}", markup=False, soft_wrap=True)
        return 2
    return 0


def _unexpected(exc: BaseException) -> str:
    """An error no part of hpcbatch turned into a message: a full disk or another OS
    error (naming the file), a database problem, or a bug."""
    import sqlite3

    from hpcbatch.store import storage_full
    full = storage_full(exc, _home())
    if full is not None:
        return _one_line(full)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return _one_line(f"{exc.strerror or exc}{where}")
    if isinstance(exc, sqlite3.Error):
        return _one_line(f"the state database in {_home()} failed: {exc}")
    return _one_line(f"{type(exc).__name__}: {exc} (a bug in hpcbatch; run again with "
                     "--debug for the traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
