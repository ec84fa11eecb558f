"""Specs (what a user describes) and states (what the coordinator tracks).

Specs validate on the way in: a bad value raises :class:`ValidationError`
naming the field and the rule, before anything is stored. States are enums
with an explicit transitions table; an illegal transition is a bug and raises.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpcbatch.env import TASK_WORKING_DIR
from hpcbatch.errors import ValidationError

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_RULE = "use 1 to 64 letters, digits, '-' or '_'"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WORKING_DIR_VAR = TASK_WORKING_DIR  # a task's environment may set it: where it runs


def check_id(field: str, value: Any) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValidationError(field, f"{value!r} is not a valid id; {ID_RULE}")
    return value


def _check_int(field: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"{value!r} is not an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValidationError(field, f"{value} is out of range; must be >= {minimum}{upper}")
    return value


def _check_choice(field: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValidationError(field, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _check_env(field: str, env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise ValidationError(field, "must be a mapping of NAME -> value")
    out = {}
    for key, val in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
            raise ValidationError(field, f"{key!r} is not a valid environment variable name")
        val = str(val)
        if "\0" in val:
            raise ValidationError(f"{field}.{key}", "the value holds a NUL byte, which no "
                                  "process environment can carry; remove it")
        out[key] = val
    return out


class _StateEnum(enum.StrEnum):
    """A state enum whose legal moves are listed in ``TRANSITIONS``."""

    def check_move(self, new: _StateEnum) -> _StateEnum:
        if new not in TRANSITIONS[type(self)][self]:
            raise RuntimeError(f"illegal {type(self).__name__} transition "
                               f"{self.value} -> {new.value}")
        return new


class NodeState(_StateEnum):
    STARTING = "starting"
    START_TASK_FAILED = "start_task_failed"
    IDLE = "idle"
    RUNNING = "running"
    UNUSABLE = "unusable"
    OFFLINE = "offline"
    LEAVING = "leaving"


class JobState(_StateEnum):
    ACTIVE = "active"
    TERMINATING = "terminating"
    COMPLETED = "completed"


class TaskState(_StateEnum):
    ACTIVE = "active"
    PREPARING = "preparing"
    RUNNING = "running"
    COMPLETED = "completed"


class TaskResult(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class FailureKind(enum.StrEnum):
    """Why an attempt did not succeed; the detail (which signal, what failed to start, who
    killed it) is kept beside it as text."""

    EXIT_CODE = "exit_code"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    START_FAILED = "start_failed"
    NODE_LOST = "node_lost"
    KILLED = "killed"


def failure_text(kind: FailureKind | str | None, detail: str | None) -> str | None:
    """The one-string form listings show (and stored before schema 2): 'exit_code',
    'start_failed: WHY', 'killed:terminate'."""
    if kind is None:
        return None
    kind = FailureKind(kind)
    if kind is FailureKind.KILLED:
        return f"killed:{detail or 'terminate'}"
    if kind is FailureKind.START_FAILED and detail:
        return f"start_failed: {detail}"
    if kind is FailureKind.EXIT_CODE and detail:  # e.g. which node's coordination command
        return f"exit_code: {detail}"
    return kind.value


class MIPhase(enum.StrEnum):
    """Where a multi-instance task's attempt is: copying common files, running the
    coordination command on every node, running the application on the primary."""

    STAGING = "staging"
    COORDINATION = "coordination"
    APPLICATION = "application"
    ENDING = "ending"  # failed or done: waiting for the other instances to exit


class RunKind(enum.StrEnum):
    TASK = "task"  # an ordinary task (wire id: the task's seq)
    APPLICATION = "a"  # a multi-instance task's application command on the primary
    COORDINATION = "c"  # its coordination command on instance I
    STAGING = "s"  # copying its files to instance I (never on the wire)
    INSTANCE = "i"  # the slots instance I holds on its node (never on the wire)
    START_TASK = "start"  # a node's start task


@dataclasses.dataclass(frozen=True, slots=True)
class RunId:
    """What runs on a node, as a typed value; ``wire`` is how the agent protocol spells it
    (an int for an ordinary task, 'SEQ.a' / 'SEQ.cI' / 'SEQ.sI', '__start_task__')."""

    seq: int
    kind: RunKind = RunKind.TASK
    index: int = 0

    START_WIRE = "__start_task__"

    @property
    def wire(self) -> int | str:
        if self.kind is RunKind.TASK:
            return self.seq
        if self.kind is RunKind.START_TASK:
            return self.START_WIRE
        if self.kind is RunKind.APPLICATION:
            return f"{self.seq}.a"
        return f"{self.seq}.{self.kind.value}{self.index}"

    @classmethod
    def parse(cls, wire: int | str) -> RunId:
        """The RunId of a wire id; ValueError for anything else."""
        if isinstance(wire, bool):
            raise ValueError(f"not a run id: {wire!r}")
        if isinstance(wire, int):
            return cls(wire)
        if wire == cls.START_WIRE:
            return START_TASK_RUN
        seq, _, part = str(wire).partition(".")
        if not seq.isdigit() or not part:
            raise ValueError(f"not a run id: {wire!r}")
        if part == "a":
            return cls(int(seq), RunKind.APPLICATION)
        kind, index = part[0], part[1:]
        if kind not in ("c", "s") or not index.isdigit():
            raise ValueError(f"not a run id: {wire!r}")
        return cls(int(seq), RunKind(kind), int(index))


START_TASK_RUN = RunId(0, RunKind.START_TASK)


_N = NodeState
_J = JobState
_T = TaskState
TRANSITIONS: dict[type, dict[Any, frozenset]] = {
    NodeState: {
        _N.STARTING: frozenset({_N.IDLE, _N.START_TASK_FAILED, _N.UNUSABLE, _N.OFFLINE,
                                _N.LEAVING}),
        _N.START_TASK_FAILED: frozenset({_N.STARTING, _N.UNUSABLE, _N.OFFLINE, _N.LEAVING}),
        _N.IDLE: frozenset({_N.RUNNING, _N.UNUSABLE, _N.OFFLINE, _N.LEAVING}),
        _N.RUNNING: frozenset({_N.IDLE, _N.UNUSABLE, _N.OFFLINE, _N.LEAVING}),
        _N.UNUSABLE: frozenset({_N.STARTING, _N.IDLE, _N.OFFLINE, _N.LEAVING}),
        _N.OFFLINE: frozenset({_N.STARTING, _N.LEAVING}),
        # leaving (removed, or the pool shrinks): its tasks end or are requeued first; its
        # agent may be lost meanwhile (then fenced before it goes)
        _N.LEAVING: frozenset({_N.OFFLINE, _N.UNUSABLE}),
    },
    JobState: {
        _J.ACTIVE: frozenset({_J.TERMINATING, _J.COMPLETED}),
        _J.TERMINATING: frozenset({_J.COMPLETED}),
        _J.COMPLETED: frozenset({_J.ACTIVE}),  # a failed task of it reactivated
    },
    TaskState: {
        _T.ACTIVE: frozenset({_T.PREPARING, _T.RUNNING, _T.COMPLETED}),
        _T.PREPARING: frozenset({_T.RUNNING, _T.ACTIVE, _T.COMPLETED}),
        _T.RUNNING: frozenset({_T.ACTIVE, _T.COMPLETED}),
        _T.COMPLETED: frozenset({_T.ACTIVE}),  # reactivated (a failed task runs again)
    },
}

PROVIDERS = ("local", "ssh", "slurm")
# a command line, with its environment, must fit the system's limit on what one exec takes
# (ARG_MAX; Linux also caps one argument at 128 KiB): refused at input, not with E2BIG later
try:
    _ARG_MAX = os.sysconf("SC_ARG_MAX")
except (ValueError, OSError):  # pragma: no cover - every POSIX system has it
    _ARG_MAX = 2 * 1024 * 1024
MAX_COMMAND_BYTES = min(_ARG_MAX // 2, 128 * 1024 - 1)
POLICIES = ("pack", "spread")
ON_ALL_TASKS_COMPLETE = ("no_action", "terminate_job")


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A pool as a user describes it."""

    id: str
    provider: str = "local"
    task_slots_per_node: int = 1
    scheduling_policy: str = "pack"
    target_nodes: int = 1
    start_task: str | None = None
    provider_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    # SSH pools: bootstrap makes a pool key pair and an ssh_config of node aliases on
    # every node, so MPI on the primary reaches the others (HPCBATCH_SSH_CONFIG)
    inter_node_communication: bool = False

    def __post_init__(self) -> None:
        check_id("pool.id", self.id)
        if not isinstance(self.inter_node_communication, bool):
            raise ValidationError("pool.inter_node_communication", "must be true or false")
        _check_choice("pool.provider", self.provider, PROVIDERS)
        _check_int("pool.task_slots_per_node", self.task_slots_per_node, 1, 1024)
        _check_choice("pool.scheduling_policy", self.scheduling_policy, POLICIES)
        _check_int("pool.target_nodes", self.target_nodes, 0, 100_000)  # 0: an elastic pool at rest
        if self.start_task is not None and not str(self.start_task).strip():
            raise ValidationError("pool.start_task", "is empty; give a command line or omit it")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A job as a user describes it."""

    id: str
    pool_id: str
    priority: int = 0
    on_all_tasks_complete: str = "no_action"
    max_task_retry_count: int = 0

    def __post_init__(self) -> None:
        check_id("job.id", self.id)
        check_id("job.pool_id", self.pool_id)
        _check_int("job.priority", self.priority, -1000, 1000)
        _check_choice("job.on_all_tasks_complete", self.on_all_tasks_complete,
                      ON_ALL_TASKS_COMPLETE)
        _check_int("job.max_task_retry_count", self.max_task_retry_count, -1)


@dataclasses.dataclass(frozen=True)
class ResourceFile:
    """A file on the coordinator's machine that is copied to the node before a task runs.

    ``source`` is read when the task is dispatched (over SFTP to SSH nodes, by a copy
    to local ones); ``file_path`` is where it lands, relative to the destination (the
    task's working directory, or for ``common_resource_files`` the task's shared
    directory); by default the source's file name. Its permission bits are kept.
    """

    source: str
    file_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise ValidationError("resource_file.source", f"must be a file path, not "
                                  f"{self.source!r}")
        if not self.source.strip():
            raise ValidationError("resource_file.source", "is empty; give a file path")
        src = Path(self.source).expanduser()
        if not src.is_absolute():
            src = Path.cwd() / src
        object.__setattr__(self, "source", str(src))
        dest = self.file_path or src.name
        if not isinstance(dest, str) or dest.startswith("/") or "\0" in dest:
            raise ValidationError("resource_file.file_path",
                                  f"{dest!r} must be a relative path inside the task directory")
        norm = posixpath.normpath(dest)
        if norm in (".", "") or norm == ".." or norm.startswith("../"):
            raise ValidationError("resource_file.file_path",
                                  f"{dest!r} leaves the task directory; use a relative path "
                                  "without '..'")
        object.__setattr__(self, "file_path", norm)

    @classmethod
    def check_list(cls, field: str, value: Any) -> tuple[ResourceFile, ...]:
        """Coerce a list of ResourceFile / {"source", "file_path"} / path strings, checking
        that every source is a readable file now (bad input fails before it is stored)."""
        if value is None:
            return ()
        if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
            raise ValidationError(field, "must be a list of files")
        out = []
        for i, item in enumerate(value):
            where = f"{field}[{i}]"
            try:
                if isinstance(item, ResourceFile):
                    rf = item
                elif isinstance(item, str):
                    rf = cls(item)
                elif isinstance(item, Mapping):
                    unknown = sorted(set(item) - {"source", "file_path"})
                    if unknown:
                        raise ValidationError(where, f"unknown field(s) {', '.join(unknown)}; "
                                              "known: source, file_path")
                    if "source" not in item:
                        raise ValidationError(where, "needs a 'source' (the file to copy)")
                    rf = cls(**item)
                else:
                    raise ValidationError(where, f"{item!r} is not a file path or "
                                          "{'source': ..., 'file_path': ...}")
            except ValidationError as exc:
                if exc.field.startswith(field):
                    raise
                raise ValidationError(f"{where}.{exc.field.split('.')[-1]}", exc.rule) from None
            if not Path(rf.source).is_file():
                raise ValidationError(f"{where}.source", f"{rf.source} is not a file on this "
                                      "machine; give an existing file")
            out.append(rf)
        dests = [rf.file_path for rf in out]
        dup = next((d for d in dests if dests.count(d) > 1), None)
        if dup is not None:
            raise ValidationError(field, f"two files go to {dup!r}; give each a file_path")
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class MultiInstanceSpec:
    """Run a task on ``instances`` nodes at once (an allocation).

    Every node runs ``coordination_command`` first (if given); when all of them
    have succeeded the primary runs the task's command line, typically mpiexec
    over ``$HPCBATCH_HOSTFILE``. ``slots_per_instance`` of 0 takes whole nodes.
    ``common_resource_files`` are copied to every node's ``$HPCBATCH_TASK_SHARED_DIR``
    before the coordination command runs.
    """

    instances: int
    coordination_command: str | None = None
    slots_per_instance: int = 0
    common_resource_files: tuple[ResourceFile, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "common_resource_files", ResourceFile.check_list(
            "multi_instance.common_resource_files", self.common_resource_files))
        _check_int("multi_instance.instances", self.instances, 1, 100_000)
        _check_int("multi_instance.slots_per_instance", self.slots_per_instance, 0, 1024)
        cc = self.coordination_command
        if cc is not None and (not isinstance(cc, str) or not cc.strip()):
            raise ValidationError("multi_instance.coordination_command",
                                  "is empty; give a command line or omit it")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task as a user describes it.

    ``command_line`` runs under ``/bin/sh -c`` in the task's working directory: its own
    ``wd/``, or ``working_dir`` (an absolute path on the node) when given.
    ``max_task_retry_count`` of ``None`` takes the job's value; ``-1`` retries
    without limit.
    """

    id: str
    command_line: str
    environment: dict[str, str] = dataclasses.field(default_factory=dict)
    required_slots: int = 1
    max_task_retry_count: int | None = None
    max_wall_clock_time_s: float | None = None
    multi_instance: MultiInstanceSpec | None = None
    resource_files: tuple[ResourceFile, ...] = ()  # copied into the working directory
    # where the command runs: None, the task's own wd/ on its node; else an absolute path
    # on the node (the CLI's --workdir submit: the directory 'hpcbatch submit' ran in).
    # Kept as the task's HPCBATCH_TASK_WORKING_DIR (see TaskSpec.working_dir_of), so it
    # travels with the environment to the store, the API and the agent.
    working_dir: dataclasses.InitVar[str | None] = None

    def __post_init__(self, working_dir: str | None = None) -> None:
        check_id("task.id", self.id)
        if working_dir is not None:
            if not isinstance(working_dir, str) or not working_dir.startswith("/") or \
                    "\0" in working_dir:
                raise ValidationError(f"task {self.id}: working_dir",
                                      f"{working_dir!r} must be an absolute path on the node, "
                                      "or null (the task's own wd/)")
            object.__setattr__(self, "environment", {**(self.environment or {}),
                                                     WORKING_DIR_VAR: working_dir})
        object.__setattr__(self, "resource_files", ResourceFile.check_list(
            f"task {self.id}: resource_files", self.resource_files))
        mi = self.multi_instance
        if isinstance(mi, Mapping):
            known = {f.name for f in dataclasses.fields(MultiInstanceSpec)}
            unknown = sorted(set(mi) - known)
            if unknown or "instances" not in mi:
                raise ValidationError(f"task {self.id}: multi_instance",
                                      f"unknown field(s) {', '.join(unknown)}; known: "
                                      f"{', '.join(sorted(known))}" if unknown else
                                      "needs 'instances' (how many nodes)")
            object.__setattr__(self, "multi_instance", MultiInstanceSpec(**mi))
        elif mi is not None and not isinstance(mi, MultiInstanceSpec):
            raise ValidationError(f"task {self.id}: multi_instance",
                                  "must be a MultiInstanceSpec or a mapping")
        if not isinstance(self.command_line, str) or not self.command_line.strip():
            raise ValidationError(f"task {self.id}: command_line", "is empty")
        if "\0" in self.command_line:
            raise ValidationError(f"task {self.id}: command_line", "contains a NUL byte")
        if len(self.command_line.encode(errors="replace")) > MAX_COMMAND_BYTES:
            raise ValidationError(f"task {self.id}: command_line",
                                  f"is {len(self.command_line.encode(errors='replace')):,} bytes, "
                                  f"more than the {MAX_COMMAND_BYTES:,} a process can be given "
                                  "here; put the data in a resource file instead")
        object.__setattr__(self, "environment",
                           _check_env(f"task {self.id}: environment", self.environment))
        wdir = self.environment.get(WORKING_DIR_VAR)
        if wdir is not None and not wdir.startswith("/"):
            raise ValidationError(f"task {self.id}: environment.{WORKING_DIR_VAR}",
                                  f"{wdir!r} must be an absolute path (where the task runs)")
        _check_int(f"task {self.id}: required_slots", self.required_slots, 1, 1024)
        if self.max_task_retry_count is not None:
            _check_int(f"task {self.id}: max_task_retry_count", self.max_task_retry_count, -1)
        wall = self.max_wall_clock_time_s
        if wall is not None and (isinstance(wall, bool) or not isinstance(wall, int | float)
                                 or not math.isfinite(wall) or wall <= 0):
            raise ValidationError(f"task {self.id}: max_wall_clock_time_s",
                                  f"{wall!r} must be a number of seconds > 0")

    @property
    def working_directory(self) -> str | None:
        """Where the task runs (an absolute path on the node), or None: its own wd/."""
        return self.environment.get(WORKING_DIR_VAR)

    @classmethod
    def coerce(cls, value: TaskSpec | Mapping[str, Any]) -> TaskSpec:
        if isinstance(value, TaskSpec):
            return value
        if not isinstance(value, Mapping):
            raise ValidationError("task", f"expected a TaskSpec or a mapping, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)} | {"working_dir"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValidationError("task", f"unknown field(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(sorted(known))}")
        if "id" not in value or "command_line" not in value:
            raise ValidationError("task", "needs both 'id' and 'command_line'")
        return cls(**value)


def check_unique_ids(tasks: Iterable[TaskSpec]) -> None:
    seen: set[str] = set()
    for t in tasks:
        if t.id in seen:
            raise ValidationError("task.id", f"{t.id!r} appears twice in this request")
        seen.add(t.id)
