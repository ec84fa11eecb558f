"""The coordinator <-> agent protocol: typed messages, one JSON object per line.

Standard library only: this file is uploaded to nodes beside ``agent.py``. Every
message name of the wire ("run", "hello", "events", ...) is spelled here and only
here; the coordinator and the agent build and match the classes below.

Wire format (newline-delimited JSON objects, UTF-8):

coordinator -> agent  ``{"op": NAME, ...fields}``
    Run      a task: ``/bin/sh -c cmd`` (or a direct exec) in ``dir/wd`` (or ``cwd``)
    Kill     stop a run (its whole process session): SIGTERM, SIGKILL after the grace
    Reap     SIGKILL processes whose environment holds all of ``match`` (ranks that
             Open MPI or Hydra started over ssh), with their sessions, and every
             process of the sessions ``sessions``
    Ping     the coordinator is there: refreshes the agent's lease
    Shutdown stop every task and exit

agent -> coordinator  ``{"ev": NAME, ...fields}``
    Hello     first line: who the agent is, its protocol version and token
    Events    items (Started, Exited, Reaped, Error: each ``{"ev": NAME, ...}``),
              batched per agent loop turn
    Heartbeat the runs the agent has running and queued
    Bye       last line of an agent that exits on its own terms

Run ids (``RunWire``) are an int (an ordinary task's seq) or a str (``"SEQ.a"``,
``"SEQ.cI"``, ``"__start_task__"``); the protocol passes them through untouched.

``decode_op`` / ``decode_ev`` raise :class:`ProtocolError` (a ValueError) with a one-line
message naming what was wrong and the start of the line. Unknown fields are ignored
(a newer peer may add some); a missing or mistyped field is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Optional, Union

PROTOCOL_VERSION = 2

# every task's environment holds this (its agent's token), so whatever a task leaves
# behind (even across ssh, where hpcbatch-mpiexec forwards HPCBATCH_*) can be found
AGENT_TOKEN_ENV = "HPCBATCH_AGENT_TOKEN"

# Exited.killed values the agent sets on its own (the coordinator's Kill.reason is
# echoed back as given)
KILLED_LEASE = "lease_expired"  # no word from the coordinator for the lease period
KILLED_SHUTDOWN = "shutdown"  # Shutdown, stdin closed, or SIGTERM to the agent

RunWire = Union[int, str]  # noqa: UP007 - runs on the nodes' python (3.9 too)

_DC: dict[str, Any] = {"frozen": True}
if sys.version_info >= (3, 10):  # noqa: UP036 - nodes may run an older python3
    _DC["slots"] = True

_SHOW = 160  # characters of a bad line quoted in an error


class ProtocolError(ValueError):
    """A line that is not a valid message of this protocol."""


# ---- coordinator -> agent ----------------------------------------------------

@dataclasses.dataclass(**_DC)
class Run:
    id: RunWire
    cmd: str
    dir: str
    env: dict
    timeout_s: float | None = None
    slots: int = 1
    files: dict | None = None
    dirs: tuple = ()
    log_prefix: str = ""
    cwd: Optional[str] = None  # noqa: UP045 - where it runs (an absolute path); None: dir/wd
    # application packages it needs, each {"name", "version", "archive" (on the node),
    # "sha256", "dir" (where it is unpacked)}: unpacked first (once per node), their
    # bin/ on its PATH
    apps: tuple = ()


@dataclasses.dataclass(**_DC)
class Kill:
    id: RunWire
    reason: str = "terminate"


@dataclasses.dataclass(**_DC)
class Reap:
    match: dict
    sessions: tuple = ()


@dataclasses.dataclass(**_DC)
class Ping:
    t: float = 0.0


@dataclasses.dataclass(**_DC)
class Shutdown:
    pass


# ---- agent -> coordinator ----------------------------------------------------

@dataclasses.dataclass(**_DC)
class Hello:
    node_id: str
    root: str
    pid: int
    hostname: str
    slots: int
    cores: int | None
    python: str
    protocol: int
    token: str = ""


@dataclasses.dataclass(**_DC)
class Started:
    id: RunWire
    pid: int
    t: float


@dataclasses.dataclass(**_DC)
class Exited:
    id: RunWire
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    killed: str | None = None
    start_failed: str | None = None
    start: float | None = None
    end: float | None = None
    usage: dict = dataclasses.field(default_factory=dict)
    stderr_tail: Optional[str] = None  # noqa: UP045 - a failed coordination command's


@dataclasses.dataclass(**_DC)
class Reaped:
    match: dict
    pids: tuple = ()


@dataclasses.dataclass(**_DC)
class Error:
    message: str
    id: RunWire | None = None


@dataclasses.dataclass(**_DC)
class Events:
    items: tuple = ()


@dataclasses.dataclass(**_DC)
class Heartbeat:
    t: float
    running: tuple = ()
    queued: tuple = ()


@dataclasses.dataclass(**_DC)
class Bye:
    pass


CoordMsg = Union[Run, Kill, Reap, Ping, Shutdown]  # noqa: UP007
Item = Union[Started, Exited, Reaped, Error]  # noqa: UP007
AgentMsg = Union[Hello, Events, Heartbeat, Bye]  # noqa: UP007

# ---- the wire names: here and nowhere else ----------------------------------------

OPS: dict[str, type] = {"run": Run, "kill": Kill, "reap": Reap, "ping": Ping,
                        "shutdown": Shutdown}
EVS: dict[str, type] = {"hello": Hello, "events": Events, "heartbeat": Heartbeat,
                        "bye": Bye}
ITEMS: dict[str, type] = {"started": Started, "exited": Exited, "reaped": Reaped,
                          "error": Error}
_OP_KEY, _EV_KEY = "op", "ev"

_KEY_OF: dict[type, str] = {}
_NAME_OF: dict[type, str] = {}
for _key, _table in ((_OP_KEY, OPS), (_EV_KEY, EVS), (_EV_KEY, ITEMS)):
    for _name, _cls in _table.items():
        _KEY_OF[_cls], _NAME_OF[_cls] = _key, _name
_FIELDS: dict[type, tuple[str, ...]] = {
    c: tuple(f.name for f in dataclasses.fields(c)) for c in _KEY_OF}


# ---- field checks (decode) ---------------------------------------------------------

def _describe(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


class _Bad(Exception):
    def __init__(self, what: str):
        self.what = what


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"must be an integer, got {_describe(v)}")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f"must be a finite number, got {_describe(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, got {_describe(v)}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, got {_describe(v)}")
    return v


def _rid(v: Any) -> RunWire:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _Bad(f"must be a run id (an integer or a string), got {_describe(v)}")
    return v


def _dict(v: Any) -> dict:
    if not isinstance(v, dict):
        raise _Bad(f"must be an object, got {_describe(v)}")
    return v


def _str_dict(v: Any) -> dict:
    for k, x in _dict(v).items():
        if not isinstance(x, str):
            raise _Bad(f"must map names to strings; {k!r} maps to {_describe(x)}")
    return v


def _opt(check):
    def opt(v: Any):
        return None if v is None else check(v)
    return opt


def _seq(check, what: str):
    def seq(v: Any) -> tuple:
        if not isinstance(v, (list, tuple)):
            raise _Bad(f"must be a list of {what}, got {_describe(v)}")
        try:
            return tuple(check(x) for x in v)
        except _Bad as bad:
            raise _Bad(f"must be a list of {what}: an element {bad.what}") from None
    return seq


def _items(v: Any) -> tuple:
    if not isinstance(v, (list, tuple)):
        raise _Bad(f"must be a list of events, got {_describe(v)}")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise _Bad(f"[{i}] must be an object, got {_describe(item)}")
        name = item.get(_EV_KEY)
        cls = ITEMS.get(name) if isinstance(name, str) else None
        if cls is None:
            raise _Bad(f"[{i}] has unknown event {name!r} (known: {', '.join(ITEMS)})")
        try:
            out.append(_build(cls, item))
        except _Bad as bad:
            raise _Bad(f"[{i}] ({name}): {bad.what}") from None
    return tuple(out)


# field -> (check, required); optional fields take the class default when absent
_SCHEMA: dict[type, dict[str, tuple[Any, bool]]] = {
    Run: {"id": (_rid, True), "cmd": (_str, True), "dir": (_str, True),
          "env": (_str_dict, True), "timeout_s": (_opt(_num), False),
          "slots": (_int, False), "files": (_opt(_str_dict), False),
          "dirs": (_seq(_str, "names"), False), "log_prefix": (_str, False),
          "cwd": (_opt(_str), False), "apps": (_seq(_str_dict, "packages"), False)},
    Kill: {"id": (_rid, True), "reason": (_str, False)},
    Reap: {"match": (_str_dict, True), "sessions": (_seq(_int, "session ids"), False)},
    Ping: {"t": (_num, False)},
    Shutdown: {},
    Hello: {"node_id": (_str, True), "root": (_str, True), "pid": (_int, True),
            "hostname": (_str, True), "slots": (_int, True), "cores": (_opt(_int), True),
            "python": (_str, True), "protocol": (_int, True), "token": (_str, False)},
    Started: {"id": (_rid, True), "pid": (_int, True), "t": (_num, True)},
    Exited: {"id": (_rid, True), "exit_code": (_opt(_int), True),
             "signal": (_opt(_int), False), "timed_out": (_bool, False),
             "killed": (_opt(_str), False), "start_failed": (_opt(_str), False),
             "start": (_opt(_num), False), "end": (_opt(_num), False),
             "usage": (_dict, False), "stderr_tail": (_opt(_str), False)},
    Reaped: {"match": (_str_dict, True), "pids": (_seq(_int, "pids"), False)},
    Error: {"message": (_str, True), "id": (_opt(_rid), False)},
    Events: {"items": (_items, True)},
    Heartbeat: {"t": (_num, True), "running": (_seq(_rid, "run ids"), False),
                "queued": (_seq(_rid, "run ids"), False)},
    Bye: {},
}


def _build(cls: type, obj: dict):
    kw = {}
    for name, (check, required) in _SCHEMA[cls].items():
        if name in obj:
            try:
                kw[name] = check(obj[name])
            except _Bad as bad:
                raise _Bad(f"field {name!r} {bad.what}") from None
        elif required:
            raise _Bad(f"field {name!r} is missing")
    return cls(**kw)


def _bad_constant(name: str):
    raise ValueError(f"{name} is not a number this protocol allows")


# one decoder and one encoder for every line (json.loads/dumps given options build a new
# one per call, a cost paid twice per task)
_DECODE = json.JSONDecoder(parse_constant=_bad_constant).decode
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _decode(line: bytes | str, key: str, table: dict[str, type], side: str):
    try:
        obj = _DECODE(line.decode() if isinstance(line, bytes) else line)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"line {side} is not JSON ({exc}): {_quote(line)}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"line {side} is not a JSON object: {_quote(line)}")
    name = obj.get(key)
    cls = table.get(name) if isinstance(name, str) else None
    if cls is None:
        what = "has no" if name is None else f"has unknown {name!r} as"
        raise ProtocolError(f"line {side} {what} {key!r} (known: {', '.join(table)}): "
                            f"{_quote(line)}")
    try:
        return _build(cls, obj)
    except _Bad as bad:
        raise ProtocolError(f"bad {name!r} message {side}: {bad.what}: {_quote(line)}") from None


def _quote(line: bytes | str) -> str:
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.rstrip("\n")
    return repr(line[:_SHOW]) + (f" ... ({len(line)} characters)" if len(line) > _SHOW else "")


def decode_op(line: bytes | str) -> CoordMsg:
    """A coordinator -> agent message from one line (ProtocolError if it is none)."""
    return _decode(line, _OP_KEY, OPS, "from the coordinator")


def decode_ev(line: bytes | str) -> AgentMsg:
    """An agent -> coordinator message from one line (ProtocolError if it is none)."""
    return _decode(line, _EV_KEY, EVS, "from the agent")


# ---- encode ------------------------------------------------------------------------

def _wire(msg: Any) -> dict:
    cls = type(msg)
    try:
        obj = {_KEY_OF[cls]: _NAME_OF[cls]}
    except KeyError:
        raise ProtocolError(f"cannot encode {cls.__name__}: not a message of this "
                            "protocol") from None
    for name in _FIELDS[cls]:
        v = getattr(msg, name)
        if name == "items":
            v = [_wire(item) for item in v]
        obj[name] = v
    return obj


def encode(msg: Any) -> bytes:
    """One message as one line of JSON, ending in b"\\n"."""
    try:
        text = _ENCODE(_wire(msg))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from None
    return text.encode() + b"\n"


def encode_many(msgs) -> bytes:
    return b"".join(encode(m) for m in msgs)
