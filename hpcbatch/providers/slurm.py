"""The ``slurm`` provider: a pool whose nodes are held as Slurm allocations.

An elastic pool: ``fixed_nodes()`` is empty and its nodes are *allocation slots*
(``slurm-1``, ``slurm-2`` .. from ``grow(n)``); the Slurm node a slot runs on is known only
once Slurm grants it. ``start_agent`` (a worker thread, never the loop) does the rest:

1. **Hold an allocation.** A slot joins an allocation of this pool that has a node free
   (``nodes_per_allocation`` K > 1), or submits a new one: an ``sbatch --parsable`` *pilot
   job* of K nodes whose batch script only waits (:data:`PILOT_SCRIPT`, the command from
   :func:`sbatch_argv`; both pinned by tests/data golden files). Its name
   ``hpcbatch-<home id>-<pool>`` tells in ``squeue`` whose it is. A pilot and not
   ``salloc --no-shell``: sbatch answers at once with the job id (no process to keep
   while the job waits in the queue, a refusal comes back on the spot, and a pending
   request is cancelled by its id), and a pilot whose coordinator died is still found
   by its name.
2. **Wait until it runs** (``squeue -j J``), then start the agent on a granted node inside
   it: ``srun --jobid J -w NODE -N1 -n1 --overlap python agent.py ...``. srun carries the
   agent's stdin/stdout, so the framed protocol runs over it as over an SSH channel
   (:class:`hpcbatch.transport.LocalTransport` with a launcher).

Assumptions: a **shared filesystem** (the usual on a Slurm cluster): the nodes see this
hpcbatch installation (the agent runs from where it is installed, with ``python``, by
default this python) and the node roots at the same paths (default
``<home>/nodes/<pool>/<slot>``; task logs are read here directly).

Giving nodes back: ``shrink(ids)`` (the coordinator calls it once a leaving node's agent
is gone) leaves the slot's allocation, which is ``scancel``ed when no slot holds it any
more; ``stop()`` (the coordinator stops) and ``cleanup_pool()`` (pool delete, by name)
cancel them all. An allocation Slurm ends (walltime, an admin's ``scancel``, a node down)
ends its agents' srun: the state machine sees the node lost, fences it (sure once Slurm
reports the job over: it has killed the job's processes; a failed node is not sure and
waits out the lease), requeues its tasks, and starts the slot again after its back-off:
a replacement allocation, as long as the pool's target keeps the slot.
Reaping: the first start of a pool's node in a process cancels every job with the pool's
name that this process did not submit (a crashed coordinator's allocations).

Multi-instance tasks: ``inter_node_env`` gives the task ``HPCBATCH_SLURM_NODES`` (each
slot's job and Slurm node), and ``hpcbatch-mpiexec`` launches with Slurm (``srun
--mpi=pmi2`` for MPICH, Open MPI's ``mpiexec`` whose PRRTE starts its daemons through
Slurm) inside the one allocation the instances share: give the pool
``--nodes-per-allocation`` at least the task's nodes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcbatch import env as E
from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.hostlist import expand_hostlist as expand
from hpcbatch.models import PoolSpec
from hpcbatch.providers import local as local_files
from hpcbatch.providers.base import MAX_LISTED, NodeDesc, NodeFile, Provider, home_id
from hpcbatch.timings import Timings

if TYPE_CHECKING:
    from hpcbatch.ssh import GroupResult
    from hpcbatch.transport import AgentChannel

COMMANDS = ("sbatch", "squeue", "scancel", "srun", "sinfo")
PACKAGE = "slurm-client"
NODE_PREFIX = "slurm-"
# job states in which the allocation's processes may still run
LIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                  "RESIZING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING",
                  "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
# over, but its nodes may still run what it started (unreachable): not sure
UNSURE = frozenset({"NODE_FAIL"})
_WALLTIME = re.compile(r"(\d+-)?\d{1,3}(:\d{2}){0,2}|UNLIMITED|INFINITE")
_FIELDS = ("partition", "account", "nodes_per_allocation", "walltime", "sbatch_args",
           "python", "node_root", "mpi_prefix")

PILOT_SCRIPT = string.Template("""\
#!/bin/sh
# hpcbatch pilot job: holds this allocation for pool ${pool} of hpcbatch home ${home_id}.
# The coordinator starts one agent per node inside it with
#   srun --jobid=$$SLURM_JOB_ID -w NODE -N1 -n1 --overlap ${python} .../agent.py ...
# and gives the nodes back with scancel. Nothing else runs here.
exec sleep infinity
""")


def job_name(home: str | os.PathLike, pool_id: str) -> str:
    """The name of every allocation of this pool of this home (squeue -n finds them)."""
    return f"hpcbatch-{home_id(home)}-{pool_id}"


def slurm_env() -> dict[str, str]:
    """This process's environment for Slurm's commands, without a surrounding job's
    SLURM_* variables (hpcbatch run inside an allocation must not submit into it);
    SLURM_CONF stays."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def _run(argv: list[str], timeout_s: float = 30.0, stdin: str | None = None
         ) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout_s, env=slurm_env())
    except FileNotFoundError:
        raise HpcBatchError(f"{argv[0]} not found: Slurm pools need Slurm's client commands "
                            f"on this machine (apt-get install {PACKAGE})") from None
    except subprocess.TimeoutExpired:
        raise HpcBatchError(f"'{shlex.join(argv[:4])} ...' did not answer within "
                            f"{timeout_s:g} s (is slurmctld up? check 'sinfo')") from None


def _said(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stderr or r.stdout or f"exit status {r.returncode}").split())[:400]


# ---------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True, slots=True)
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    nodes_per_allocation: int = 1
    walltime: str | None = None
    sbatch_args: tuple[str, ...] = ()
    python: str | None = None  # on the nodes; default this python (a shared filesystem)
    node_root: str | None = None  # default <home>/nodes
    mpi_prefix: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SlurmConfig:
        if not isinstance(raw, Mapping):
            raise ValidationError("pool.provider_config", "must be a JSON object")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise ValidationError("pool.provider_config", f"unknown field(s) "
                                  f"{', '.join(unknown)}; known: {', '.join(_FIELDS)}")
        k = raw.get("nodes_per_allocation", 1)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 10_000:
            raise ValidationError("--nodes-per-allocation", f"must be a whole number 1..10000,"
                                  f" not {k!r}")
        wt = raw.get("walltime")
        if wt is not None and (not isinstance(wt, str) or not _WALLTIME.fullmatch(wt)):
            raise ValidationError("--walltime", f"{wt!r} is not a Slurm time limit "
                                  "(MINUTES, HH:MM:SS, D-HH:MM:SS)")
        for field in ("partition", "account"):
            v = raw.get(field)
            if v is not None and (not isinstance(v, str) or
                                  not re.fullmatch(r"[A-Za-z0-9_.,-]+", v)):
                raise ValidationError(f"--{field}", f"{v!r} is not a Slurm {field} name")
        for field in ("python", "node_root", "mpi_prefix"):
            v = raw.get(field)
            if v is not None and (not isinstance(v, str) or not v.strip() or "\0" in v):
                raise ValidationError(f"--{field.replace('_', '-')}",
                                      f"must be a non-empty path, not {v!r}")
        args = raw.get("sbatch_args") or ()
        if isinstance(args, str) or not all(isinstance(a, str) and a.startswith("-") and
                                            "\0" not in a for a in args):
            raise ValidationError("--sbatch-arg", f"each must be one sbatch option "
                                  f"(--qos=high, --exclusive), not {args!r}")
        for a in args:
            if a.split("=", 1)[0] in ("--job-name", "-J", "--parsable", "--nodes", "-N",
                                      "--wrap", "--array", "-a"):
                raise ValidationError("--sbatch-arg", f"{a!r} is set by hpcbatch (the "
                                      "allocation's name and size); use "
                                      "--nodes-per-allocation for the size")
        return cls(raw.get("partition"), raw.get("account"), k, wt, tuple(args),
                   raw.get("python"), raw.get("node_root"), raw.get("mpi_prefix"))

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in _FIELDS}
        d["sbatch_args"] = list(self.sbatch_args)
        return {k: v for k, v in d.items() if v not in (None, [])}


def sbatch_argv(config: SlurmConfig, name: str, slots: int, output: str) -> list[str]:
    """The pilot job's submission (its script comes on stdin)."""
    argv = ["sbatch", "--parsable", f"--job-name={name}",
            f"--nodes={config.nodes_per_allocation}", "--ntasks-per-node=1",
            f"--cpus-per-task={slots}", f"--output={output}"]
    if config.partition:
        argv.append(f"--partition={config.partition}")
    if config.account:
        argv.append(f"--account={config.account}")
    if config.walltime:
        argv.append(f"--time={config.walltime}")
    return [*argv, *config.sbatch_args]


def pilot_script(pool_id: str, home: str, python: str) -> str:
    return PILOT_SCRIPT.substitute(pool=pool_id, home_id=home, python=shlex.quote(python))


def srun_argv(job_id: str, node: str) -> list[str]:
    """How a process starts on one node of a held allocation, its stdin/stdout carried."""
    return ["srun", f"--jobid={job_id}", f"--nodelist={node}", "--nodes=1", "--ntasks=1",
            "--overlap", "--unbuffered", "--quiet", "--kill-on-bad-exit=0"]


def job_state(job_id: str) -> tuple[str | None, list[str], str]:
    """(state, nodes, reason) of a job from squeue; state None once Slurm forgot it."""
    r = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%N|%r"], 15)
    line = r.stdout.strip().splitlines()[:1]
    if r.returncode != 0 or not line:
        return None, [], ""
    state, nodes, reason = (line[0].split("|") + ["", ""])[:3]
    return state, (expand(nodes) if nodes and nodes != "(null)" else []), reason


def jobs_named(name: str) -> dict[str, str]:
    """job id -> state of the jobs with this name (ours: the pool's allocations)."""
    r = _run(["squeue", "-h", "-n", name, "-o", "%i|%T"], 15)
    if r.returncode != 0:
        raise HpcBatchError(f"squeue could not list the pool's allocations: {_said(r)}")
    return dict(line.split("|", 1) for line in r.stdout.split() if "|" in line)


def scancel(job_ids: Iterable[str]) -> str | None:
    ids = [str(j) for j in job_ids]
    if not ids:
        return None
    r = _run(["scancel", *ids], 30)
    return None if r.returncode == 0 else _said(r)


# ---------------------------------------------------------------- allocations

@dataclasses.dataclass
class Allocation:
    job_id: str
    size: int
    members: dict[str, str | None]  # slot -> Slurm node (None until granted)
    nodes: list[str] = dataclasses.field(default_factory=list)
    over: str | None = None  # why it ended (cancelled by us, or Slurm's state)
    submitted_at: float = 0.0  # (time.time(): when sbatch answered, when seen running)
    granted_at: float = 0.0


class PoolAllocations:
    """A pool's allocations held by this process (every provider instance of the pool
    shares it: the coordinator makes a new provider at each resize)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allocs: dict[str, Allocation] = {}
        self.slot_job: dict[str, str] = {}
        self.next_slot = 1
        self.reaped = False
        self.closing = False

    def where(self, slot: str) -> tuple[str, str | None] | None:
        with self.cond:
            job = self.slot_job.get(slot)
            if job is None:
                return None
            return job, self.allocs[job].members.get(slot)

    def mapping(self) -> dict[str, list[str]]:
        with self.cond:
            return {slot: [job, node] for job, a in self.allocs.items() if a.over is None
                    for slot, node in a.members.items() if node}


_REGISTRY: dict[tuple[str, str], PoolAllocations] = {}
_REGISTRY_LOCK = threading.Lock()


def allocations_of(home: str | os.PathLike, pool_id: str) -> PoolAllocations:
    key = (str(Path(home).resolve()), pool_id)
    with _REGISTRY_LOCK:
        reg = _REGISTRY.get(key)
        if reg is None:
            reg = _REGISTRY[key] = PoolAllocations()
        return reg


def _forget(home: str | os.PathLike, pool_id: str, reg: PoolAllocations) -> None:
    key = (str(Path(home).resolve()), pool_id)
    with _REGISTRY_LOCK:
        if _REGISTRY.get(key) is reg:
            del _REGISTRY[key]


# ---------------------------------------------------------------- the provider

class SlurmProvider(Provider):
    name = "slurm"
    options = frozenset({"slurm", "partition", "account", "nodes_per_allocation", "walltime",
                         "sbatch_args", "python", "node_root", "mpi_prefix"})
    elastic = True
    config: SlurmConfig
    poll_s = 0.1  # squeue while an allocation is pending: 0.1 s, doubling to 2 s
    # a start waits this long for its allocation, then says it is pending (the node's
    # reason) and frees its worker thread; the next start (after the back-off) waits on
    pending_wait_s = 30.0

    @classmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> SlurmConfig:
        return SlurmConfig.from_dict(raw)

    @classmethod
    def make_spec(cls, pool_id: str, *, task_slots_per_node: int = 1,
                  scheduling_policy: str = "pack", target_nodes: int = 0,
                  start_task: str | None = None, inter_node_communication: bool | None = None,
                  slurm: bool = True, **options: Any) -> PoolSpec:
        """A Slurm pool starts at 0 nodes unless told (``pool resize`` grows it)."""
        missing = missing_commands()
        if missing:
            raise ValidationError("pool.provider", f"slurm pools need Slurm's client "
                                  f"commands here, and {', '.join(missing)} is not on PATH: "
                                  f"install the Debian package {PACKAGE} (apt-get install "
                                  f"{PACKAGE}) and point SLURM_CONF at your cluster's "
                                  "slurm.conf")
        unknown = sorted(set(options) - cls.options)
        if unknown:
            raise ValidationError("pool", f"{', '.join(unknown)} are not options of slurm "
                                  "pools")
        raw = {k: (list(v) if k == "sbatch_args" else v) for k, v in options.items()
               if v not in (None, (), [])}
        config = SlurmConfig.from_dict(raw)
        return PoolSpec(pool_id, cls.name, task_slots_per_node=task_slots_per_node,
                        scheduling_policy=scheduling_policy, target_nodes=target_nodes,
                        start_task=start_task, provider_config=config.to_dict(),
                        inter_node_communication=bool(inter_node_communication))

    @property
    def allocations(self) -> PoolAllocations:
        return allocations_of(self.home, self.pool_id)

    @property
    def job_name(self) -> str:
        return job_name(self.home, self.pool_id)

    @property
    def node_python(self) -> str:
        return self.config.python or sys.executable

    @property
    def mpi_prefix(self) -> str | None:
        return self.config.mpi_prefix

    def where(self) -> str:
        c = self.config
        return (f"Slurm allocations of {c.nodes_per_allocation} node(s)"
                + (f" in partition {c.partition}" if c.partition else "")
                + (f", account {c.account}" if c.account else "")
                + (f", walltime {c.walltime}" if c.walltime else "")
                + f" (job name {self.job_name})")

    def notes(self) -> list[str]:
        return [self.launch_note(), "agents: srun --overlap inside each allocation; "
                "nodes share this filesystem (node roots, the hpcbatch installation)"]

    def preflight(self, *, trust_on_first_use: bool = False,
                  timeout_s: float = 30.0) -> GroupResult:
        """The partition exists, and sbatch would take the request (``--test-only``)."""
        from hpcbatch.ssh import GroupResult, HostResult
        r = _run(["sinfo", "-h", "-o", "%R"], timeout_s)
        if r.returncode != 0:
            return GroupResult([HostResult("slurm", error=HpcBatchError(
                f"sinfo cannot reach the Slurm controller: {_said(r)}"))])
        parts = sorted(set(r.stdout.split()))
        p = self.config.partition
        if p and p not in parts:
            raise ValidationError("--partition", f"Slurm has no partition {p!r} (its "
                                  f"partitions: {', '.join(parts) or 'none'}); nothing "
                                  "was created")
        argv = sbatch_argv(self.config, self.job_name, self.spec.task_slots_per_node,
                           os.devnull)
        r = _run([argv[0], "--test-only", *argv[2:]], timeout_s,
                 stdin=pilot_script(self.pool_id, home_id(self.home), self.node_python))
        if r.returncode != 0:
            return GroupResult([HostResult("slurm", error=HpcBatchError(
                f"sbatch refused the allocation request ({_said(r)})"))])
        return GroupResult([HostResult("slurm", value="ok")])

    # ---- nodes -----------------------------------------------------------

    def fixed_nodes(self) -> list[NodeDesc]:
        return []

    def grow(self, n: int) -> list[NodeDesc]:
        """n new allocation slots (fresh ids); the allocations are asked for when their
        agents start."""
        reg = self.allocations
        with reg.cond:
            first = reg.next_slot
            reg.next_slot += n
        return [NodeDesc(f"{NODE_PREFIX}{i}", f"{NODE_PREFIX}{i}",
                         self.spec.task_slots_per_node, {"slurm": "allocation slot"})
                for i in range(first, first + n)]

    def shrink(self, node_ids: Iterable[str]) -> None:
        """The slots leave their allocations; one no slot holds is cancelled (a pending
        one too: its start_agent gives up)."""
        reg = self.allocations
        cancel = []
        with reg.cond:
            for slot in node_ids:
                job = reg.slot_job.pop(slot, None)
                if job is None:
                    continue
                alloc = reg.allocs.get(job)
                if alloc is None:
                    continue
                alloc.members.pop(slot, None)
                if not alloc.members:
                    del reg.allocs[job]
                    if alloc.over is None:
                        alloc.over = "cancelled: the pool shrank"
                        cancel.append(job)
            reg.cond.notify_all()
        why = scancel(cancel)
        if why:
            raise HpcBatchError(f"pool {self.pool_id}: scancel {' '.join(cancel)} failed: "
                                f"{why}")

    def stop(self, final: bool = True) -> None:
        """hpcbatch stops: first (``final=False``) the requests still pending are
        cancelled and no slot asks for more; then (once the agents have shut down) every
        allocation of the pool held by this process is cancelled."""
        reg = self.allocations
        with reg.cond:
            reg.closing = True
            ended = [a for a in reg.allocs.values() if a.over is None and
                     (final or not any(reg.allocs[a.job_id].members.values()))]
            for a in ended:
                a.over = "cancelled: hpcbatch stopped"
            reg.cond.notify_all()
        if final:
            _forget(self.home, self.pool_id, reg)
        scancel(a.job_id for a in ended)

    def _acquire(self, slot: str) -> tuple[str, str]:
        """(job id, Slurm node) for the slot: its allocation (if still live), or a node
        free in another of the pool's allocations, or a new allocation, once running."""
        reg = self.allocations
        held = reg.where(slot)
        if held is not None and held[1]:  # started before: is its allocation still there?
            state, _, _ = job_state(held[0])
            if state != "RUNNING":
                self._ended(held[0], f"ended ({state or 'gone'})")
        with reg.cond:
            if reg.closing:
                raise HpcBatchError("hpcbatch is stopping")
            job = reg.slot_job.get(slot)
            alloc = reg.allocs.get(job) if job else None
            if alloc is not None and alloc.over is not None:
                alloc.members.pop(slot, None)
                reg.slot_job.pop(slot, None)
                if not alloc.members:
                    reg.allocs.pop(alloc.job_id, None)
                alloc = None
            if alloc is None:
                alloc = next((a for a in reg.allocs.values()
                              if a.over is None and len(a.members) < a.size), None)
            if alloc is None:
                alloc = Allocation(self._submit(), self.config.nodes_per_allocation, {},
                                   submitted_at=time.time())
                reg.allocs[alloc.job_id] = alloc
            alloc.members.setdefault(slot, None)
            reg.slot_job[slot] = alloc.job_id
        delay = self.poll_s
        give_up = time.monotonic() + self.pending_wait_s
        while True:
            with reg.cond:
                if alloc.over is not None or reg.slot_job.get(slot) != alloc.job_id:
                    raise HpcBatchError(f"Slurm allocation {alloc.job_id} "
                                        f"{alloc.over or 'was given up'}")
                node = alloc.members.get(slot)
                if node:
                    return alloc.job_id, node
            state, nodes, reason = job_state(alloc.job_id)
            with reg.cond:
                if reg.closing and alloc.over is None:
                    alloc.over = "cancelled: hpcbatch stopped"
                    scancel([alloc.job_id])
                    continue
                if state == "RUNNING" and nodes:
                    alloc.nodes = nodes
                    alloc.granted_at = alloc.granted_at or time.time()
                    taken = {n for n in alloc.members.values() if n}
                    free = [n for n in nodes if n not in taken]
                    if not free:
                        alloc.members.pop(slot, None)
                        reg.slot_job.pop(slot, None)
                        raise HpcBatchError(f"Slurm allocation {alloc.job_id} has no node "
                                            "free for this slot")
                    alloc.members[slot] = free[0]
                    return alloc.job_id, free[0]
                if state not in LIVE:
                    alloc.over = alloc.over or f"ended ({state or 'gone'}) before it ran"
                    raise HpcBatchError(f"Slurm allocation {alloc.job_id} {alloc.over}"
                                        + (f"; reason {reason}" if reason else ""))
                if time.monotonic() > give_up:  # (the slot stays in it: the next start
                    raise HpcBatchError(  # waits on)
                        f"Slurm allocation {alloc.job_id} is {state.lower()}"
                        + (f" ({reason})" if reason and reason != "None" else "")
                        + "; waiting for Slurm to grant it")
                reg.cond.wait(delay)
            delay = min(delay * 2, 2.0)

    def _ended(self, job_id: str, why: str) -> None:
        """Slurm ended the allocation: its slots need another."""
        reg = self.allocations
        with reg.cond:
            alloc = reg.allocs.get(job_id)
            if alloc is not None and alloc.over is None:
                alloc.over = why
            reg.cond.notify_all()

    def _submit(self) -> str:
        """sbatch the pilot job (under the registry's lock, so a reap never sees it as
        another's)."""
        out_dir = Path(self.key_dir) / "slurm"
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = sbatch_argv(self.config, self.job_name, self.spec.task_slots_per_node,
                           str(out_dir / "pilot-%j.out"))
        r = _run(argv, 60, stdin=pilot_script(self.pool_id, home_id(self.home),
                                              self.node_python))
        job = r.stdout.strip().split(";")[0]
        if r.returncode != 0 or not job.isdigit():
            raise HpcBatchError(f"sbatch refused the allocation request ({_said(r)})")
        return job

    def node_root(self, node_id: str) -> str:
        if self.config.node_root:
            return os.path.join(self.config.node_root, home_id(self.home), self.pool_id,
                                node_id)
        return str(self.home / "nodes" / self.pool_id / node_id)

    def start_agent(self, node: NodeDesc, *, token: str, timings: Timings) -> AgentChannel:
        from hpcbatch.transport import LocalTransport
        job, snode = self._acquire(node.node_id)
        root = Path(self.node_root(node.node_id))
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return LocalTransport().start_agent(
            node.node_id, root, token=token, timings=timings, slots=node.slots,
            mpi_prefix=self.mpi_prefix, launcher=srun_argv(job, snode),
            python=self.node_python, env=slurm_env())

    def fence(self, node: NodeDesc, token: str, pids: Iterable[int]) -> bool:
        """Sure when Slurm says the slot's allocation is over (it killed the job's
        processes), or when the reaper, run on the node inside the allocation, killed
        everything of the agent; not sure for a failed node or an unreachable one."""
        where = self.allocations.where(node.node_id)
        if where is None or not where[1]:
            return True  # it never had a node: no agent ever ran
        job, snode = where
        deadline = time.monotonic() + 15
        while True:
            state, _, _ = job_state(job)
            if state in UNSURE:
                return False
            if state not in LIVE:
                self._ended(job, f"ended ({state or 'gone'})")
                return True
            if state != "COMPLETING" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if state != "RUNNING":
            return False
        from hpcbatch.providers.ssh import _reap_program
        request = {"tokens": [token], "sessions": [int(p) for p in pids], "deadline_s": 5.0,
                   "grace_s": Timings.kill_grace_s}
        r = _run([*srun_argv(job, snode), self.node_python, "-c", _reap_program(),
                  json.dumps(request)], 30)
        try:
            return int(json.loads(r.stdout.strip().splitlines()[-1])["left"]) == 0
        except (ValueError, KeyError, IndexError):
            return False

    def reap_orphans(self, agent_records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Once per pool and process: cancel the pool's allocations this process did not
        submit (left by a coordinator that died); their agents and tasks go with them."""
        reg = self.allocations
        with reg.cond:
            if reg.reaped:
                return []
            try:
                left = {j: s for j, s in jobs_named(self.job_name).items()
                        if j not in reg.allocs}
            except HpcBatchError as exc:
                return [f"{self.pool_id}: {exc}"]
            why = scancel(left)
            reg.reaped = why is None
        if why:
            return [f"{self.pool_id}: allocations {' '.join(left)} of an earlier coordinator "
                    f"could not be cancelled: {why}"]
        return []

    # ---- files: on the shared filesystem ----------------------------------

    def read_node_file(self, node_id: str, path: str, *, offset: int = 0,
                       length: int | None = None) -> bytes:
        return local_files.read_inside(self.node_root(node_id), path, offset, length)

    def list_node_dir(self, node_id: str, path: str,
                      limit: int = MAX_LISTED) -> list[NodeFile]:
        return local_files.list_inside(self.node_root(node_id), path, limit)

    def remove_tree(self, node_id: str, relpath: str) -> None:
        local_files.LocalProvider.remove_tree(self, node_id, relpath)  # type: ignore[arg-type]

    def remove_trees(self, node_ids: Iterable[str], relpath: str,
                     timeout_s: float = 60.0) -> dict[str, str]:
        """Every slot's directory there is (slots that left the pool kept theirs on the
        shared filesystem), not only the nodes the pool has now."""
        base = Path(self.node_root("x")).parent
        try:
            slots = [p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            slots = []
        return super().remove_trees([*node_ids, *slots], relpath, timeout_s)

    def cleanup_pool(self) -> list[str]:
        """Pool delete: cancel every allocation with the pool's name, and remove its node
        roots and files."""
        reg = self.allocations
        with reg.cond:
            reg.closing = True
            for a in reg.allocs.values():
                a.over = a.over or "cancelled: the pool was deleted"
            reg.cond.notify_all()
        _forget(self.home, self.pool_id, reg)
        problems = []
        try:
            why = scancel(jobs_named(self.job_name))
            if why:
                problems.append(f"{self.pool_id}: scancel failed: {why}")
        except HpcBatchError as exc:
            problems.append(f"{self.pool_id}: {exc}")
        problems += super().cleanup_pool()
        shutil.rmtree(Path(self.node_root("x")).parent, ignore_errors=True)
        return problems

    # ---- multi-instance tasks -------------------------------------------

    def inter_node_env(self, node_id: str, node_root: str) -> dict[str, str]:
        return {E.SLURM_NODES: json.dumps(self.allocations.mapping(), separators=(",", ":"))}


PROVIDER = SlurmProvider
