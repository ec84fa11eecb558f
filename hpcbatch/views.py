"""What the service answers: frozen, typed snapshots of pools, nodes, jobs and tasks.

Every view is a frozen dataclass with ``to_dict()`` (JSON-serialisable: what an HTTP
backend sends) and ``from_dict()`` (what a remote client rebuilds). Views also read like
the dict rows they replace (``node["state"]``, ``task.get("result")``), so code
written against the old dicts keeps working.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar


class _View:
    """Mapping-style reads of a frozen dataclass's fields."""

    __slots__ = ()
    _json_fields: ClassVar[tuple[str, ...]] = ()  # dict fields stored as JSON text

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (dicts, lists, str, numbers, None)."""
        return json.loads(json.dumps({k: _plain(getattr(self, k)) for k in self.keys()}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _freeze(v) for k, v in data.items() if k in names})


def _plain(v: Any) -> Any:
    if isinstance(v, _View):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _json(text: str | None, default: Any = None) -> Any:
    if text is None or text == "":
        return default
    return json.loads(text) if isinstance(text, str) else text


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView(_View):
    """A node of a pool as the store last recorded it. ``reconnecting``: the node
    failed and a new agent is being started on it (its state is then 'starting')."""

    pool_id: str
    id: str
    state: str
    slots: int
    reason: str | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    updated_at: float | None = None

    @property
    def reconnecting(self) -> bool:
        return bool(self.info.get("reconnecting"))

    @property
    def hostname(self) -> str | None:
        return self.info.get("hostname")

    @property
    def usable(self) -> bool:
        """Can take work now, or is starting for the first time (may soon)."""
        if self.state in ("idle", "running"):
            return True
        return self.state == "starting" and not self.reconnecting

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> NodeView:
        return cls(row["pool_id"], row["id"], row["state"], row["slots"], row.get("reason"),
                   _json(row.get("info"), {}), row.get("updated_at"))


@dataclasses.dataclass(frozen=True, slots=True)
class PoolView(_View):
    """A pool's settings, with how many of its nodes are in each state."""

    id: str
    provider: str
    task_slots_per_node: int
    scheduling_policy: str
    target_nodes: int
    start_task: str | None
    inter_node_communication: bool
    provider_config: Mapping[str, Any]
    node_states: Mapping[str, int] = dataclasses.field(default_factory=dict)
    where: str = ""  # where its nodes are, in words ("node1, node2", "2 local node(s)")
    notes: tuple[str, ...] = ()  # what 'pool show' says about the provider's set-up
    node_python: str = ""  # the python that runs hpcbatch on its nodes
    # its autoscale formula ({formula, interval_s, enabled_at}; None: sized by hand) and
    # its newest evaluations and resizes ({at, kind, result, error}, newest first)
    autoscale: Mapping[str, Any] | None = None
    autoscale_events: tuple[Mapping[str, Any], ...] = ()

    @property
    def nodes(self) -> int:
        return sum(self.node_states.values())


@dataclasses.dataclass(frozen=True, slots=True)
class JobView(_View):
    id: str
    pool_id: str
    state: str
    priority: int
    on_all_tasks_complete: str
    max_task_retry_count: int
    created_at: float
    completed_at: float | None = None
    counts: Mapping[str, int] | None = None  # when asked for (list_jobs(counts=True))

    @classmethod
    def from_row(cls, row: Mapping[str, Any],
                 counts: Mapping[str, int] | None = None) -> JobView:
        spec = row["spec"]
        return cls(row["id"], row["pool_id"], row["state"], spec.priority,
                   spec.on_all_tasks_complete, spec.max_task_retry_count, row["created_at"],
                   row.get("completed_at"), counts)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskView(_View):
    """One task as stored. ``failure`` is the display text ('exit_code', 'timeout',
    'killed:terminate', 'start_failed: WHY'); ``failure_kind``/``failure_detail`` its
    typed parts. ``task_dir`` and ``node_id`` are those of the latest attempt."""

    job_id: str
    id: str
    state: str
    command_line: str
    spec: Mapping[str, Any]
    required_slots: int = 1
    result: str | None = None
    failure: str | None = None
    failure_kind: str | None = None
    failure_detail: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    retry_count: int = 0
    requeue_count: int = 0
    node_id: str | None = None
    task_dir: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    usage: Mapping[str, Any] | None = None
    seq: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.result == "success"

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.ended_at:
            return self.ended_at - self.started_at
        return None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskView:
        return cls(
            row["job_id"], row["id"], row["state"], row["command_line"],
            _json(row.get("spec"), {}), row.get("required_slots", 1), row.get("result"),
            row.get("failure"), row.get("failure_kind"), row.get("failure_detail"),
            row.get("exit_code"), row.get("signal"), row.get("retry_count") or 0,
            row.get("requeue_count") or 0, row.get("node_id"), row.get("task_dir"),
            row.get("started_at"), row.get("ended_at"), _json(row.get("usage")),
            row.get("seq"))


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptView(_View):
    """One attempt of a task: where and when it ran and how it ended. ``outcome``:
    success, failure (the last attempt), retry (failed, tried again) or requeue (its
    node was lost, or the coordinator restarted: not counted as a retry)."""

    job_id: str
    task_id: str
    attempt: int
    outcome: str
    node_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure_kind: str | None = None
    failure_detail: str | None = None
    usage: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_row(cls, job_id: str, task_id: str, row: Mapping[str, Any]) -> AttemptView:
        return cls(job_id, task_id, row["attempt"], row["outcome"], row.get("node_id"),
                   row.get("started_at"), row.get("ended_at"), row.get("exit_code"),
                   row.get("signal"), row.get("failure_kind"), row.get("failure_detail"),
                   _json(row.get("usage"), {}) or {})


@dataclasses.dataclass(frozen=True, slots=True)
class FileView(_View):
    """An entry of a task's directory: ``name`` relative to it; ``kind`` file, dir, link
    (never followed) or other."""

    name: str
    size: int
    modified_at: float
    kind: str = "file"

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


@dataclasses.dataclass(frozen=True, slots=True)
class RunView(_View):
    """A kernel run: one task of its own job (``job_id``, ``task_id``). ``state``
    running, succeeded or failed; once it succeeded ``reduced`` holds the reduced values
    (scalars, short arrays as lists), ``attrs`` the result file's provenance and
    ``timings`` its phases; ``error`` says why it failed. ``function``: for a Python
    function's run (``kernel`` is then its qualified name), its name and the SHA-256
    of its pickled bytes."""

    id: str
    kernel: str
    state: str
    job_id: str
    task_id: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ranks: int = 1
    nodes: int | None = None
    pool_id: str = "local"
    created_at: float | None = None
    reduced: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    result_size: int | None = None
    function: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Page(_View):
    """One page of a list query: ``items`` (each a dict of the selected fields of a
    TaskView or JobView; all of them when nothing was selected) and ``continuation``,
    the opaque token that asks for the next page (None: this is the last one)."""

    items: tuple[dict[str, Any], ...] = ()
    continuation: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Page:
        return cls(tuple(dict(i) for i in data.get("items") or ()), data.get("continuation"))


@dataclasses.dataclass(frozen=True, slots=True)
class TaskError(_View):
    """Why one task of a collection was not added: its position in the request, the id
    it gave (None when it had none), the error's kind (``code``: ValidationError,
    Conflict), its one-line message and the field it names (``target``)."""

    index: int
    task_id: str | None
    code: str
    message: str
    target: str | None = None

    @classmethod
    def from_error(cls, index: int, task_id: str | None, exc: BaseException) -> TaskError:
        return cls(index, task_id, type(exc).__name__, str(exc), getattr(exc, "field", None))


@dataclasses.dataclass(frozen=True, slots=True)
class AddResult(_View):
    """What adding a collection of tasks did: how many were stored, and an error for
    each one that was not."""

    added: int
    errors: tuple[TaskError, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AddResult:
        return cls(int(data["added"]),
                   tuple(TaskError.from_dict(e) for e in data.get("errors") or ()))


__all__ = ["AddResult", "AttemptView", "FileView", "JobView", "NodeView", "Page", "PoolView",
           "RunView", "TaskError", "TaskView"]
