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

from hpcbatch.apps import AppRef
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
    PRE_PROCESSING_ERROR = "pre_processing_error"  # a resource file could not be fetched
    FILE_UPLOAD_ERROR = "file_upload_error"  # an output file could not be uploaded


def failure_text(kind: FailureKind | str | None, detail: str | None) -> str | None:
    """The one-string form listings show (and stored before schema 2): 'exit_code',
    'start_failed: WHY', 'killed:terminate'."""
    if kind is None:
        return None
    kind = FailureKind(kind)
    if kind is FailureKind.KILLED:
        return f"killed:{detail or 'terminate'}"
    if kind in (FailureKind.START_FAILED, FailureKind.PRE_PROCESSING_ERROR,
                FailureKind.FILE_UPLOAD_ERROR) and detail:
        return f"{kind.value}: {detail}"
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
    JOB_PREP = "p"  # a job's preparation task on a node (seq: the state's number of the job)
    JOB_RELEASE = "r"  # a job's release task on a node (likewise)


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
        if self.kind in (RunKind.APPLICATION, RunKind.JOB_PREP, RunKind.JOB_RELEASE):
            return f"{self.seq}.{self.kind.value}"
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
        if part in ("p", "r"):
            return cls(int(seq), RunKind(part))
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
    # application packages every node gets (before its start task), for all its tasks
    application_package_references: tuple[AppRef, ...] = ()

    def __post_init__(self) -> None:
        check_id("pool.id", self.id)
        object.__setattr__(self, "application_package_references", AppRef.check_list(
            "pool.application_package_references", self.application_package_references))
        if not isinstance(self.inter_node_communication, bool):
            raise ValidationError("pool.inter_node_communication", "must be true or false")
        _check_choice("pool.provider", self.provider, PROVIDERS)
        _check_int("pool.task_slots_per_node", self.task_slots_per_node, 1, 1024)
        _check_choice("pool.scheduling_policy", self.scheduling_policy, POLICIES)
        _check_int("pool.target_nodes", self.target_nodes, 0, 100_000)  # 0: scaled down
        if self.start_task is not None and not str(self.start_task).strip():
            raise ValidationError("pool.start_task", "is empty; give a command line or omit it")


# the ids a job's preparation and release tasks go by in listings, logs and directories
# (<node root>/jobs/<job>/jobpreparation): no task of a job may take them
JOB_PREPARATION_ID, JOB_RELEASE_ID = "jobpreparation", "jobrelease"
JOB_TASK_IDS = (JOB_PREPARATION_ID, JOB_RELEASE_ID)
RELEASE_WALL_CLOCK_S = 900.0  # a release task's default limit (Azure Batch's 15 minutes)


def _check_wall(field: str, wall: Any) -> None:
    if wall is not None and (isinstance(wall, bool) or not isinstance(wall, int | float)
                             or not math.isfinite(wall) or wall <= 0):
        raise ValidationError(field, f"{wall!r} must be a number of seconds > 0")


def _check_command(field: str, cmd: Any) -> None:
    if not isinstance(cmd, str) or not cmd.strip():
        raise ValidationError(field, "is empty; give a command line")
    if "\0" in cmd:
        raise ValidationError(field, "contains a NUL byte")
    if len(cmd.encode(errors="replace")) > MAX_COMMAND_BYTES:
        raise ValidationError(field, f"is longer than the {MAX_COMMAND_BYTES:,} bytes a "
                              "process can be given; put it in a resource file")


@dataclasses.dataclass(frozen=True)
class JobPreparationTask:
    """Runs on a node before the job's first task there, in the job's preparation
    directory (``$HPCBATCH_JOB_PREP_DIR``, which the job's tasks on that node share).

    ``wait_for_success``: the job's tasks on that node wait until it has succeeded; if
    it fails (after ``max_task_retry_count`` retries) the node skips the job (its tasks
    go to other nodes). Without it a failure is only recorded. With
    ``rerun_on_node_reboot_after_success`` a node whose agent restarts runs it again."""

    command_line: str
    environment: dict[str, str] = dataclasses.field(default_factory=dict)
    resource_files: tuple[ResourceFile, ...] = ()  # copied into HPCBATCH_JOB_PREP_DIR
    wait_for_success: bool = True
    max_task_retry_count: int = 0
    max_wall_clock_time_s: float | None = None
    rerun_on_node_reboot_after_success: bool = True

    def __post_init__(self) -> None:
        _check_command("job.preparation_task.command_line", self.command_line)
        object.__setattr__(self, "environment", _check_env(
            "job.preparation_task.environment", self.environment))
        object.__setattr__(self, "resource_files", _file_list(
            "job.preparation_task.resource_files", self.resource_files))
        for name in ("wait_for_success", "rerun_on_node_reboot_after_success"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(f"job.preparation_task.{name}", "must be true or false")
        _check_int("job.preparation_task.max_task_retry_count", self.max_task_retry_count,
                   0, 100)
        _check_wall("job.preparation_task.max_wall_clock_time_s", self.max_wall_clock_time_s)


@dataclasses.dataclass(frozen=True)
class JobReleaseTask:
    """Runs on every node that ran the job's tasks once the job completes or is
    terminated, in ``<node root>/jobs/<job>/jobrelease``, killed after
    ``max_wall_clock_time_s`` (default 15 minutes); the job completes after it."""

    command_line: str
    environment: dict[str, str] = dataclasses.field(default_factory=dict)
    resource_files: tuple[ResourceFile, ...] = ()
    max_wall_clock_time_s: float = RELEASE_WALL_CLOCK_S

    def __post_init__(self) -> None:
        _check_command("job.release_task.command_line", self.command_line)
        object.__setattr__(self, "environment", _check_env(
            "job.release_task.environment", self.environment))
        object.__setattr__(self, "resource_files", _file_list(
            "job.release_task.resource_files", self.resource_files))
        _check_wall("job.release_task.max_wall_clock_time_s", self.max_wall_clock_time_s)
        if self.max_wall_clock_time_s is None:
            raise ValidationError("job.release_task.max_wall_clock_time_s",
                                  "a release task needs a limit (seconds > 0)")


def _file_list(field: str, value: Any) -> tuple[ResourceFile, ...]:
    """Resource files of a preparation or release task, checked in form only (a job's
    spec is read back often; create_job checks that each source exists)."""
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
        raise ValidationError(field, "must be a list of files")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(item if isinstance(item, ResourceFile) else ResourceFile(item)
                       if isinstance(item, str) else ResourceFile(**item))
        except TypeError:
            raise ValidationError(f"{field}[{i}]", "is not a file path or {'source': ..., "
                                  "'file_path': ...}") from None
    return tuple(out)


def _coerce(cls: type, field: str, value: Any) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be an object with a command_line, not {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown or "command_line" not in value:
        raise ValidationError(field, f"unknown field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}" if unknown else
                              "needs a 'command_line'")
    return cls(**value)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A job as a user describes it."""

    id: str
    pool_id: str
    priority: int = 0
    on_all_tasks_complete: str = "no_action"
    max_task_retry_count: int = 0
    preparation_task: JobPreparationTask | None = None
    release_task: JobReleaseTask | None = None

    def __post_init__(self) -> None:
        check_id("job.id", self.id)
        check_id("job.pool_id", self.pool_id)
        _check_int("job.priority", self.priority, -1000, 1000)
        _check_choice("job.on_all_tasks_complete", self.on_all_tasks_complete,
                      ON_ALL_TASKS_COMPLETE)
        _check_int("job.max_task_retry_count", self.max_task_retry_count, -1)
        object.__setattr__(self, "preparation_task", _coerce(
            JobPreparationTask, "job.preparation_task", self.preparation_task))
        object.__setattr__(self, "release_task", _coerce(
            JobReleaseTask, "job.release_task", self.release_task))


def _rel_path(field: str, value: Any, *, may_be_dir: bool = False) -> str:
    """A relative path inside the task's directory, normalised ('' allowed where a
    directory may be meant: the working directory itself)."""
    if not isinstance(value, str) or value.startswith("/") or "\0" in value:
        raise ValidationError(field, f"{value!r} must be a relative path inside the task's "
                              "working directory")
    norm = posixpath.normpath(value) if value else ""
    if norm == "." and may_be_dir:
        return ""
    if norm in (".", "") and not may_be_dir or norm == ".." or norm.startswith("../"):
        raise ValidationError(field, f"{value!r} leaves the task's working directory; use a "
                              "relative path without '..'")
    return norm + ("/" if may_be_dir and norm and value.endswith("/") else "")


def _file_mode(field: str, value: Any) -> str | None:
    """'0644' / '644' / '0o644' / 0o644 -> '0644'."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip()):
        mode = int(value.strip().replace("0o", ""), 8)
    else:
        raise ValidationError(field, f"{value!r} is not an octal file mode such as '0644'")
    if not 0 <= mode <= 0o777:
        raise ValidationError(field, f"{value!r}: only permission bits (0000 to 0777)")
    return f"{mode:04o}"


# a resource file's other spellings (Azure Batch's names) -> ours
RESOURCE_FILE_ALIASES = {"path": "file_path", "mode": "file_mode",
                         "auto_storage_container_name": "container",
                         "storage_container_url": "container_url", "http_url": "url"}


@dataclasses.dataclass(frozen=True)
class ResourceFile:
    """A file copied to the node before a task runs, from exactly one of:

    * ``source``: a file on the coordinator's machine (its permission bits kept);
    * ``container`` (+ ``blob_prefix``): every blob of a storage container whose name
      starts with the prefix, placed under ``file_path`` (a directory; default the
      working directory) by its full blob name (Azure Batch's
      ``auto_storage_container_name``);
    * ``container_url`` (+ ``blob_prefix``): the same from any fsspec URL of a folder
      (``storage_container_url``);
    * ``storage_path``: one blob, ``CONTAINER/BLOB``;
    * ``url``: one file at an http(s) or fsspec URL (``http_url``).

    ``file_path`` is relative to the task's working directory (or for
    ``common_resource_files`` its shared directory); for one file by default its name.
    ``file_mode`` ('0644') sets the permission bits (default: a source's own, else
    0644). A path leaving the directory is refused here, when the task is given.
    """

    source: str = ""
    file_path: str = ""
    container: str | None = None
    blob_prefix: str | None = None
    container_url: str | None = None
    storage_path: str | None = None
    url: str | None = None
    file_mode: str | None = None

    @property
    def kind(self) -> str:
        for k in ("container", "container_url", "storage_path", "url"):
            if getattr(self, k):
                return k
        return "source"

    def __post_init__(self) -> None:
        from hpcbatch.storage import check_blob_name, check_container
        given = [k for k in ("source", "container", "container_url", "storage_path", "url")
                 if getattr(self, k)]
        if len(given) != 1:
            raise ValidationError("resource_file.source", "give exactly one of source, "
                                  "container, container_url, storage_path or url"
                                  + (f" (got {', '.join(given)})" if given else ""))
        object.__setattr__(self, "file_mode", _file_mode("resource_file.file_mode",
                                                         self.file_mode))
        if self.blob_prefix is not None and not (self.container or self.container_url):
            raise ValidationError("resource_file.blob_prefix", "goes with a container or "
                                  "container_url")
        kind = given[0]
        if kind in ("container", "container_url"):
            if kind == "container":
                check_container(self.container, "resource_file.container")
            elif not isinstance(self.container_url, str) or "://" not in self.container_url:
                raise ValidationError("resource_file.container_url", f"{self.container_url!r} "
                                      "is not a URL (file:///data, s3://bucket/prefix ...)")
            check_blob_name(self.blob_prefix or "", "resource_file.blob_prefix", prefix=True)
            path = _rel_path("resource_file.file_path", self.file_path or "", may_be_dir=True)
            object.__setattr__(self, "file_path", path.rstrip("/"))
            return
        if kind == "storage_path":
            container, _, blob = str(self.storage_path).partition("/")
            check_container(container, "resource_file.storage_path")
            check_blob_name(blob, "resource_file.storage_path")
            default = blob.rpartition("/")[2]
        elif kind == "url":
            import urllib.parse
            if not isinstance(self.url, str) or "://" not in self.url or "\0" in self.url:
                raise ValidationError("resource_file.url", f"{self.url!r} is not a URL "
                                      "(https://host/file, s3://bucket/key ...)")
            default = posixpath.basename(urllib.parse.urlsplit(self.url).path)
            if not default and not self.file_path:
                raise ValidationError("resource_file.file_path", f"{self.url} names no file; "
                                      "give a file_path")
        else:
            if not isinstance(self.source, str):
                raise ValidationError("resource_file.source", f"must be a file path, not "
                                      f"{self.source!r}")
            if not self.source.strip():
                raise ValidationError("resource_file.source", "is empty; give a file path")
            src = Path(self.source).expanduser()
            if not src.is_absolute():
                src = Path.cwd() / src
            object.__setattr__(self, "source", str(src))
            default = src.name
        path = self.file_path or default
        if default and isinstance(self.file_path, str) and (
                self.file_path.endswith("/") or posixpath.normpath(self.file_path) == "."):
            path = posixpath.join(self.file_path, default)  # into that directory, as cp does
        object.__setattr__(self, "file_path", _rel_path("resource_file.file_path", path))

    def to_dict(self) -> dict[str, Any]:
        """Only the fields given (what a user would write)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}

    @classmethod
    def check_list(cls, field: str, value: Any) -> tuple[ResourceFile, ...]:
        """Coerce a list of ResourceFile / mappings / path strings, checking that every
        local source is a readable file now (bad input fails before it is stored)."""
        if value is None:
            return ()
        if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
            raise ValidationError(field, "must be a list of files")
        known = [f.name for f in dataclasses.fields(cls)]
        out = []
        for i, item in enumerate(value):
            where = f"{field}[{i}]"
            try:
                if isinstance(item, ResourceFile):
                    rf = item
                elif isinstance(item, str):
                    rf = cls(item)
                elif isinstance(item, Mapping):
                    item = {RESOURCE_FILE_ALIASES.get(k, k): v for k, v in item.items()}
                    unknown = sorted(set(item) - set(known))
                    if unknown:
                        raise ValidationError(where, f"unknown field(s) {', '.join(unknown)}; "
                                              f"known: {', '.join(known)}")
                    rf = cls(**item)
                else:
                    raise ValidationError(where, f"{item!r} is not a file path or "
                                          "{'source': ..., 'file_path': ...}")
            except ValidationError as exc:
                if exc.field.startswith(field):
                    raise
                raise ValidationError(f"{where}.{exc.field.split('.')[-1]}", exc.rule) from None
            if rf.kind == "source" and not Path(rf.source).is_file():
                raise ValidationError(f"{where}.source", f"{rf.source} is not a file on this "
                                      "machine; give an existing file")
            out.append(rf)
        dests = [rf.file_path for rf in out if rf.kind not in ("container", "container_url")]
        dup = next((d for d in dests if dests.count(d) > 1), None)
        if dup is not None:
            raise ValidationError(field, f"two files go to {dup!r}; give each a file_path")
        return tuple(out)


UPLOAD_CONDITIONS = ("task_success", "task_failure", "task_completion")
OUTPUT_SUBSTITUTIONS = ("{job}", "{task}", "{attempt}")


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """Files a task leaves, uploaded to a storage container after it exits and before it
    is reported complete (Azure Batch's output files).

    ``pattern`` is a glob relative to the working directory (``*.h5``, ``**/*.csv``,
    ``out/result.txt``) and may reach the task's directory above it
    (``../std*.txt``), never outside that. ``container`` and ``path`` say where: one
    file matched by a pattern without wildcards goes to ``path`` itself (unless it ends
    in '/'), every other match to ``path`` + its path below the pattern's fixed
    directory. ``{job}``, ``{task}`` and ``{attempt}`` in ``path`` are replaced.
    ``upload_condition``: ``task_success`` (exit code 0), ``task_failure`` or
    ``task_completion`` (either; the default). A failed upload fails the attempt with
    ``file_upload_error``.
    """

    pattern: str
    container: str
    path: str = ""
    upload_condition: str = "task_completion"

    def __post_init__(self) -> None:
        from hpcbatch.storage import check_container
        if not isinstance(self.pattern, str) or not self.pattern.strip() or \
                self.pattern.startswith("/") or "\0" in self.pattern:
            raise ValidationError("output_file.pattern", f"{self.pattern!r} must be a glob "
                                  "relative to the working directory ('*.h5', '../std*.txt')")
        parts = [p for p in self.pattern.split("/") if p not in ("", ".")]
        depth = 0
        for i, p in enumerate(parts):
            if p == "..":
                depth -= 1
                if depth < -1 or any(q != ".." for q in parts[:i]):
                    raise ValidationError("output_file.pattern", f"{self.pattern!r} leaves "
                                          "the task's directory; '../' may only begin it, "
                                          "once (the task directory holds std*.txt)")
            else:
                depth += 1
        if not parts or parts[-1] == "..":
            raise ValidationError("output_file.pattern", f"{self.pattern!r} names no file")
        check_container(self.container, "output_file.container")
        path = self.path or ""
        if not isinstance(path, str) or path.startswith("/") or "\0" in path or any(
                p in (".", "..") for p in path.split("/")):
            raise ValidationError("output_file.path", f"{path!r} must be a relative blob path "
                                  "without '.' or '..' parts ('{job}/{task}/')")
        leftover = path
        for sub in OUTPUT_SUBSTITUTIONS:
            leftover = leftover.replace(sub, "")
        if "{" in leftover or "}" in leftover:
            subs = ", ".join(OUTPUT_SUBSTITUTIONS)
            raise ValidationError("output_file.path", f"{path!r}: only {subs} may be "
                                  "substituted")
        _check_choice("output_file.upload_condition", self.upload_condition, UPLOAD_CONDITIONS)

    @classmethod
    def check_list(cls, field: str, value: Any) -> tuple[OutputFile, ...]:
        """Coerce a list of OutputFile / mappings (``destination: {container, path}``
        as Azure nests it, or flat)."""
        if value is None:
            return ()
        if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
            raise ValidationError(field, "must be a list of output files")
        out = []
        known = ("pattern", "container", "path", "upload_condition", "destination")
        for i, item in enumerate(value):
            where = f"{field}[{i}]"
            try:
                if isinstance(item, OutputFile):
                    out.append(item)
                    continue
                if not isinstance(item, Mapping):
                    raise ValidationError(where, f"{item!r} is not an output file "
                                          "{'pattern', 'destination': {'container', 'path'}}")
                item = dict(item)
                unknown = sorted(set(item) - set(known))
                if unknown:
                    raise ValidationError(where, f"unknown field(s) {', '.join(unknown)}; "
                                          f"known: {', '.join(known)}")
                dest = item.pop("destination", None)
                if dest is not None:
                    if not isinstance(dest, Mapping) or set(dest) - {"container", "path"}:
                        raise ValidationError(f"{where}.destination", "must be "
                                              "{'container': ..., 'path': ...}")
                    item.update(dest)
                if "pattern" not in item or "container" not in item:
                    raise ValidationError(where, "needs a 'pattern' and a destination "
                                          "container")
                out.append(cls(**item))
            except ValidationError as exc:
                if exc.field.startswith(field):
                    raise
                raise ValidationError(f"{where}.{exc.field.split('.')[-1]}", exc.rule) from None
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    output_files: tuple[OutputFile, ...] = ()  # uploaded to storage after it exits
    # application packages unpacked on its node(s) before it starts (see hpcbatch.apps)
    application_package_references: tuple[AppRef, ...] = ()
    # where the command runs: None, the task's own wd/ on its node; else an absolute path
    # on the node (the CLI's --workdir submit: the directory 'hpcbatch submit' ran in).
    # Kept as the task's HPCBATCH_TASK_WORKING_DIR (see TaskSpec.working_dir_of), so it
    # travels with the environment to the store, the API and the agent.
    working_dir: dataclasses.InitVar[str | None] = None

    def __post_init__(self, working_dir: str | None = None) -> None:
        check_id("task.id", self.id)
        if self.id in JOB_TASK_IDS:
            raise ValidationError("task.id", f"{self.id!r} is the id of the job's "
                                  f"{self.id[3:]} task in listings; pick another id")
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
        object.__setattr__(self, "output_files", OutputFile.check_list(
            f"task {self.id}: output_files", self.output_files))
        object.__setattr__(self, "application_package_references", AppRef.check_list(
            f"task {self.id}: application_package_references",
            self.application_package_references))
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
