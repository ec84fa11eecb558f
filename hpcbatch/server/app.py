"""The HTTP API of ``hpcbatch serve``: every operation of the service layer under ``/v1``.

``create_app(service, keys)`` builds the ASGI app (FastAPI; see docs/SERVICE.md for why)
over a :class:`hpcbatch.service.Service` and a :class:`hpcbatch.server.auth.KeyRing`.

* JSON bodies are the views' ``to_dict()``, encoded by msgspec. Errors are
  ``{"code", "message", "target"}`` (see ``STATUS``): 400 for a rule a value broke, 404,
  409, 507, 401/403 for keys, 413 for a body too big, 422 for a body or parameter that
  is not what the OpenAPI document says. A 5xx is a fault of the server, never of input.
* Auth: ``Authorization: Bearer <key>`` on every path but ``/health`` (checked before
  routing, so an unknown path without a key is a 401 too); read-only keys: 403 on
  anything but GET/HEAD. Each request is logged with the key's id, never the key.
* Service calls are blocking: they run in the threadpool, never on the event loop. A
  LocalService is used through clones sharing its coordinator, each with its own
  store connection (one SQLite connection must not carry two threads' transactions).
* Bodies of many tasks (addtaskcollection, submit) are not turned into models: msgspec
  decodes the body with each task left as its JSON text, and the service validates and
  stores them in chunks, so 100,000 tasks cost about twice the body in memory. Their
  schema is documented in OpenAPI all the same (``TaskCollectionIn``, ``SubmitIn``).
* The change feed: one thread waits on ``service.wait_for_change`` and wakes every
  long-poll (``/v1/changes``) and server-sent event stream (``/v1/events``) at once.
"""

# no "from __future__ import annotations": FastAPI reads the annotations at run time

import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Annotated, Any, Generic, Literal, TypeVar

import anyio
import msgspec
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hpcbatch._version import __version__
from hpcbatch.errors import (
    Conflict,
    CoordinatorBusy,
    HpcBatchError,
    NotFound,
    StorageFull,
    ValidationError,
)
from hpcbatch.models import RELEASE_WALL_CLOCK_S, JobSpec
from hpcbatch.server.auth import KeyRing
from hpcbatch.views import AttemptView, FileView, JobView, NodeView, PoolView, RunView, TaskView

log = logging.getLogger("hpcbatch.server")

MAX_BODY_BYTES = 512 * 1024 * 1024  # a JSON body (1,000,000 short tasks is ~80 MB)
MAX_UPLOAD_BYTES = 64 * 1024 ** 3  # a file sent to PUT /v1/uploads
MAX_LONG_POLL_S = 60.0
SSE_KEEPALIVE_S = 15.0
SSE_MIN_GAP_S = 0.1  # events of one stream are at least this far apart (changes coalesce)
FILE_CHUNK = 1 << 20
IDLE_CLONES = 16  # store connections kept open for the next requests

# error kind -> HTTP status (first match in this order; HpcBatchError is the catch-all)
STATUS: tuple[tuple[type[HpcBatchError], int, str], ...] = (
    (ValidationError, 400, "ValidationError"),
    (NotFound, 404, "NotFound"),
    (CoordinatorBusy, 409, "CoordinatorBusy"),
    (Conflict, 409, "Conflict"),
    (StorageFull, 507, "StorageFull"),
    (HpcBatchError, 409, "HpcBatchError"),
)
HTTP_CODES = {400: "InvalidBody", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
              405: "MethodNotAllowed", 413: "PayloadTooLarge", 416: "RangeNotSatisfiable",
              422: "InvalidBody"}
READ_METHODS = frozenset({"GET", "HEAD"})


# ================================================================== JSON and errors

def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


class JSON(JSONResponse):
    """A JSON response encoded by msgspec (views, dicts, lists, tuples, dataclasses)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def error(status: int, code: str, message: str, target: str | None = None,
          headers: Mapping[str, str] | None = None) -> JSON:
    return JSON({"code": code, "message": one_line(message), "target": target},
                status_code=status, headers=dict(headers or {}))


def hpcbatch_error(exc: HpcBatchError) -> JSON:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            target = exc.field if isinstance(exc, ValidationError) else None
            return error(status, code, str(exc), target)
    raise AssertionError("unreachable")  # pragma: no cover


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes; "
                         "send the tasks in several requests")


def _loc_text(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSON:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    target = _loc_text(tuple(first.get("loc", ()))) or None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return error(422, "InvalidBody", f"{target or 'request'}: {first.get('msg')}{more}",
                 target)


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSON:
    status = exc.status_code
    if status == 400:  # FastAPI's "error parsing the body": a malformed body
        status = 422
    code = HTTP_CODES.get(status, "HpcBatchError")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /openapi.json"
    elif status == 405:
        message = f"{request.method} is not a method of {request.url.path}"
    return error(status, code, message, None, getattr(exc, "headers", None))


async def _hpcbatch_handler(request: Request, exc: HpcBatchError) -> JSON:
    return hpcbatch_error(exc)


def _internal(request: Request, exc: BaseException) -> JSON:
    return error(500, "InternalError", f"{type(exc).__name__}: {exc} (a fault of the "
                 "server; its log has the traceback)")


async def _os_or_db_handler(request: Request, exc: Exception) -> JSON:
    """A full disk (507) or a store locked for too long (409); else a fault (500)."""
    from hpcbatch.store import storage_full
    full = storage_full(exc, getattr(request.app.state, "home", None) or ".")
    if full is not None:
        return hpcbatch_error(full)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return error(409, "CoordinatorBusy", "the state database is busy (another process "
                     "holds its write lock, such as a large submit); retry")
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _internal(request, exc)


async def _unexpected_handler(request: Request, exc: Exception) -> JSON:
    # (Starlette logs the traceback of what reaches this handler)
    return _internal(request, exc)


# ================================================================== the gate

class _Gate:
    """Outermost: keys (401/403), the body limit (413) and the request log."""

    def __init__(self, app: Any, keys: KeyRing, max_body: int, max_upload: int):
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.max_upload = max_upload

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        method, path = scope["method"], scope["path"]
        status = 0
        who = "-"

        async def logged_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path == "/health":
                await self.app(scope, receive, logged_send)
                return
            headers = dict(scope.get("headers") or ())
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            caller = self.keys.check(token.strip()) if scheme.lower() == "bearer" else None
            if caller is None:
                why = ("the API key is not valid (revoked or mistyped)" if token else
                       "this needs an API key: send 'Authorization: Bearer <key>' "
                       "('hpcbatch keys create' makes one)")
                if self.keys.error and token:
                    why += f"; note: {self.keys.error}"
                await error(401, "Unauthorized", why, None,
                            {"WWW-Authenticate": "Bearer"})(scope, receive, logged_send)
                return
            who = caller.key_id
            scope.setdefault("state", {})["caller"] = caller
            if caller.read_only and method not in READ_METHODS:
                await error(403, "Forbidden", f"key {caller.key_id} ({caller.name or 'no name'}"
                            f") is read-only; {method} needs a key that may write")(
                    scope, receive, logged_send)
                return
            limit = self.max_upload if path.startswith(("/v1/uploads/", "/v1/storage/")) \
                else self.max_body
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await error(413, "PayloadTooLarge", str(_TooLarge(limit).detail))(
                    scope, receive, logged_send)
                return
            seen = 0

            async def limited_receive() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _TooLarge(limit)
                return message

            await self.app(scope, limited_receive, logged_send)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            # the path is decoded: a %0A in it must not start a forged log line
            log.info("%s %s %s%s -> %s %.1f ms key=%s",
                     (scope.get("client") or ("-",))[0], method, _printable(path),
                     f"?{_printable(query)}" if query else "", status or "-",
                     (time.perf_counter() - t0) * 1000, who)


def _printable(text: str) -> str:
    """``text`` for a log line: control characters (newlines, NUL, escapes) as \\xNN."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


# ================================================================== service calls

class _Services:
    """Service objects for worker threads. A LocalService gets clones sharing its
    coordinator, each with its own store connection (checked out per call); any other
    Service is used as it is (it must be thread-safe)."""

    def __init__(self, service: Any):
        from hpcbatch.service import LocalService
        self.main = service
        self.local = isinstance(service, LocalService)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def _clone(self) -> Any:
        from hpcbatch.service import LocalService
        m = self.main
        return LocalService(m.home, m.coordinator, timings=m.timings, create=False,
                            command_timeout_s=m.command_timeout_s)

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        if not self.local:
            yield self.main
            return
        with self._lock:
            clone = self._idle.pop() if self._idle else None
        if clone is None:
            clone = self._clone()
        try:
            yield clone
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < IDLE_CLONES
                if keep:
                    self._idle.append(clone)
            if not keep:
                self._drop(clone)

    @staticmethod
    def _drop(clone: Any) -> None:
        clone.coordinator = None  # the main service owns it
        clone.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for clone in idle:
            self._drop(clone)


class _Changes:
    """The store's change counter, watched by one thread for every waiter."""

    def __init__(self, services: _Services):
        self.services = services
        self.counter = 0
        self._event: asyncio.Event | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stopping: asyncio.Event | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.stopping = asyncio.Event()

        def first() -> int:
            with self.services.use() as s:
                return s.change_counter()
        self.counter = await anyio.to_thread.run_sync(first)
        self._thread = threading.Thread(target=self._watch, args=(loop,),
                                        name="hpcbatch-changes", daemon=True)
        self._thread.start()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        last = self.counter
        failing = False
        with self.services.use() as s:
            while not self._stop.is_set():
                try:
                    value = s.wait_for_change(last, 0.5)
                except Exception:  # noqa: BLE001 - a busy or failing store: said, retried
                    if not failing:
                        log.exception("the change feed cannot read the store; retrying")
                    failing = True
                    self._stop.wait(1.0)
                    continue
                if failing:
                    log.info("the change feed reads the store again")
                    failing = False
                if value != last:
                    last = value
                    with contextlib.suppress(RuntimeError):  # the loop has closed
                        loop.call_soon_threadsafe(self._publish, value)

    def _publish(self, value: int) -> None:
        self.counter = value
        event, self._event = self._event, asyncio.Event()
        event.set()

    def begin_stop(self) -> None:
        if self.stopping is not None:
            self.stopping.set()
        if self._event is not None:
            self._event.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    async def wait(self, after: int, timeout_s: float) -> int:
        """The counter once above ``after``, or at the timeout (or when stopping)."""
        deadline = time.monotonic() + timeout_s
        while self.counter <= after and not (self.stopping and self.stopping.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
        return self.counter


# ================================================================== models (OpenAPI)

class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# The rules of hpcbatch.models, written into the document (json_schema_extra) but not
# enforced by pydantic: the service checks them and answers a 400 naming the field, the
# same one-line message the CLI prints (pydantic's own would be a 422).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NOT_BLANK = r"^[^\x00]*\S[^\x00]*$"  # some non-space, and no NUL
NO_NUL = r"^[^\x00]*$"


def _whole(value: Any) -> Any:
    """JSON Schema's integer takes 3.0; so does this API (strict pydantic would not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole)]


def _doc(**schema: Any) -> Any:
    return Field(json_schema_extra=schema)


def _int(default: Any, **schema: Any) -> Any:
    return Field(default, json_schema_extra=schema)


Id = Annotated[str, _doc(pattern=ID_PATTERN, description="1 to 64 letters, digits, - or _")]
Command = Annotated[str, _doc(pattern=NOT_BLANK, description="a shell command line")]
IdPath = Annotated[str, PathParam(json_schema_extra={"pattern": ID_PATTERN})]
NodeQuery = Annotated[str | None, Query(json_schema_extra={"pattern": ID_PATTERN},
                                        description="a node of the task's pool")]
RunPath = Annotated[str, PathParam(json_schema_extra={"pattern": r"^run-[A-Za-z0-9_-]{1,80}$"})]
ShaPath = Annotated[str, PathParam(json_schema_extra={"pattern": r"^[0-9a-f]{64}$"})]


class PoolIn(_In):
    """A pool to create; ``options`` are the provider's own (an SSH pool's ``hosts``,
    ``hostlist``, ``user``, ``port``, ``python`` ...; a local pool has none)."""

    id: Id
    provider: Annotated[str, _doc(enum=["local", "ssh"])] = "local"
    task_slots_per_node: Int = _int(1, minimum=1, maximum=1024)
    scheduling_policy: Annotated[str, _doc(enum=["pack", "spread"])] = "pack"
    # none: the provider's default (1 node; a Slurm pool 0); 0: empty until resized
    target_nodes: Int | None = _int(None, minimum=0, maximum=100_000)
    start_task: Annotated[str | None, _doc(pattern=NOT_BLANK)] = None
    inter_node_communication: bool | None = None
    trust_on_first_use: bool = False
    options: dict[str, Any] = {}


class ResizeIn(_In):
    target_nodes: Int = _int(..., minimum=0, maximum=100_000)
    deallocation: Annotated[str, _doc(enum=["requeue", "terminate", "taskcompletion",
                                            "retaineddata"])] = "requeue"


class AutoscaleIn(_In):
    formula: Annotated[str, _doc(maxLength=8192)]
    interval_s: float = Field(30.0, json_schema_extra={"minimum": 1})


class EvaluateIn(_In):
    formula: Annotated[str, _doc(maxLength=8192)]


Running = Literal["requeue", "terminate", "taskcompletion"]


class DisableSchedulingIn(_In):
    running: Running = "taskcompletion"


class JobIn(_In):
    id: Id
    pool_id: Id = "local"
    priority: Int = _int(0, minimum=-1000, maximum=1000)
    on_all_tasks_complete: Annotated[str, _doc(enum=["no_action", "terminate_job"])] = \
        "no_action"
    max_task_retry_count: Int = _int(0, minimum=-1, description="-1: no limit")
    # forward references: their models use ResourceFiles, defined below
    preparation_task: "PreparationTaskIn | None" = None
    release_task: "ReleaseTaskIn | None" = None


class ResourceFileIn(_In):
    """A file copied into the task's working directory as ``file_path``, from one of:
    ``source`` (a file on the service's machine: ``PUT /v1/uploads`` puts one there),
    ``container`` (+ ``blob_prefix``: its blobs, by name, under the directory
    ``file_path``), ``container_url`` (the same from an fsspec URL), ``storage_path``
    (``CONTAINER/BLOB``), ``url`` (http(s) or fsspec). ``file_mode``: '0644'. Azure
    Batch's names are taken too (auto_storage_container_name, storage_container_url,
    http_url) and path/mode for file_path/file_mode."""

    model_config = ConfigDict(extra="allow")
    source: str = ""
    file_path: str = ""
    container: str | None = None
    blob_prefix: str | None = None
    container_url: str | None = None
    storage_path: str | None = None
    url: str | None = None
    file_mode: str | None = None


class OutputFileIn(_In):
    """Files matching ``pattern`` (relative to the working directory; may begin with
    ``../``) uploaded to ``destination.container`` at ``destination.path`` ({job},
    {task}, {attempt} replaced) when ``upload_condition`` holds, before the task
    completes."""

    model_config = ConfigDict(extra="allow")
    pattern: str
    destination: dict[str, str] | None = None
    container: str | None = None
    path: str | None = None
    upload_condition: Annotated[str, _doc(enum=["task_success", "task_failure",
                                                "task_completion"])] = "task_completion"


ResourceFiles = Annotated[list[ResourceFileIn | str], _doc(
    description="files on the service's machine (each must exist there)")]


class AppRefIn(_In):
    """An application package (``hpcbatch app upload``); no version: its default."""

    application_id: Id
    version: str | None = None


AppRefs = Annotated[list[AppRefIn | str], _doc(
    description="application packages ('NAME' or 'NAME:VERSION' also taken)")]


class MultiInstanceIn(_In):
    instances: Int = _int(..., minimum=1, maximum=100_000)
    coordination_command: Annotated[str | None, _doc(pattern=NOT_BLANK)] = None
    slots_per_instance: Int = _int(0, minimum=0, maximum=1024, description="0: whole nodes")
    common_resource_files: ResourceFiles = []


class TaskIn(_In):
    """A task (hpcbatch.TaskSpec's fields)."""

    id: Id
    command_line: Command
    environment: Annotated[dict[str, str], _doc(
        propertyNames={"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
        additionalProperties={"type": "string", "pattern": NO_NUL})] = {}
    required_slots: Int = _int(1, minimum=1, maximum=1024)
    max_task_retry_count: Int | None = _int(None, minimum=-1,
                                            description="-1: no limit; null: the job's")
    max_wall_clock_time_s: float | None = _int(None, exclusiveMinimum=0)
    multi_instance: MultiInstanceIn | None = None
    resource_files: ResourceFiles = []
    output_files: list[OutputFileIn] = []
    application_package_references: AppRefs = []


class JobResourceFileIn(ResourceFileIn):
    """A file copied into the job's preparation (or release) directory: the same
    fields, without Azure Batch's other names."""

    model_config = ConfigDict(extra="forbid", strict=True)


JobResourceFiles = Annotated[list[JobResourceFileIn | str], _doc(
    description="files on the service's machine (each must exist there)")]
Environment = Annotated[dict[str, str], _doc(
    propertyNames={"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
    additionalProperties={"type": "string", "pattern": NO_NUL})]
Seconds = Annotated[float, _doc(exclusiveMinimum=0)]


class PreparationTaskIn(_In):
    """Runs on a node before the job's tasks there (hpcbatch.JobPreparationTask): with
    ``wait_for_success`` they wait for it to succeed, and a node where it fails skips
    the job."""

    command_line: Command
    environment: Environment = {}
    resource_files: JobResourceFiles = []
    wait_for_success: bool = True
    max_task_retry_count: Int = _int(0, minimum=0, maximum=100)
    max_wall_clock_time_s: Seconds | None = None
    rerun_on_node_reboot_after_success: bool = True


class ReleaseTaskIn(_In):
    """Runs on every node that ran the job's tasks when the job ends
    (hpcbatch.JobReleaseTask), killed after ``max_wall_clock_time_s``."""

    command_line: Command
    environment: Environment = {}
    resource_files: JobResourceFiles = []
    max_wall_clock_time_s: Seconds = RELEASE_WALL_CLOCK_S


JobIn.model_rebuild()


class TaskCollectionIn(_In):
    """Up to millions of tasks in one body. Each is validated on its own: with
    ``atomic`` false the valid ones are stored and each bad one is reported in
    ``errors``; with ``atomic`` true any bad task refuses the whole request (400)."""

    tasks: Annotated[list[TaskIn], _doc(description="task ids must differ")]
    atomic: bool = False


class SubmitIn(_In):
    """Create the job unless it exists (``existing_ok``) and add the tasks, all or
    nothing."""

    job: JobIn
    tasks: list[TaskIn]
    existing_ok: bool = True


class RunIn(_In):
    kernel: Annotated[str | None, _doc(description="a built-in kernel's name (pi, heat, ...) "
                                       "or a kernel file on the service's machine")] = None
    function: str | None = _int(None, pattern=r"^[0-9a-f]{64}$", description=(
        "instead of a kernel: the SHA-256 of a packed Python function uploaded as "
        "function.pkl (PUT /v1/uploads); its params travel in it"))
    ranks: Int | None = _int(None, minimum=1)
    params: dict[str, Any] | list[str] | None = None
    pool: str | None = None
    nodes: Int | None = _int(None, minimum=1)
    ranks_per_node: Int | None = _int(None, minimum=1)
    oversubscribe: bool = False
    timeout_s: float | None = _int(None, exclusiveMinimum=0)
    retries: Int = _int(0, minimum=-1)
    compress: bool = Field(False, description="gzip the result's datasets")


class ErrorOut(BaseModel):
    code: str = Field(description="ValidationError, NotFound, Conflict, CoordinatorBusy, "
                      "StorageFull, Unauthorized, Forbidden, PayloadTooLarge, InvalidBody, "
                      "RangeNotSatisfiable, MethodNotAllowed, HpcBatchError, InternalError")
    message: str = Field(description="one line: what was wrong and how to fix it")
    target: str | None = Field(description="the field a ValidationError names")


class HealthOut(BaseModel):
    status: str
    version: str


class ChangesOut(BaseModel):
    counter: int


T = TypeVar("T")


class Items(BaseModel, Generic[T]):
    items: list[T]


class PageOut(BaseModel):
    items: list[dict[str, Any]]
    continuation: str | None


class ProblemsOut(BaseModel):
    problems: list[str]


class AddedOut(BaseModel):
    added: int


class TaskErrorOut(BaseModel):
    index: int
    task_id: str | None
    code: str
    message: str
    target: str | None


class AddResultOut(BaseModel):
    added: int
    errors: list[TaskErrorOut]


class UploadOut(BaseModel):
    path: str


class EventOut(BaseModel):
    """An event of /v1/events (``event: message``)."""

    counter: int
    counts: dict[str, int] | None = Field(None, description="the job's task counts (with "
                                          "job_id)")


class EventErrorOut(BaseModel):
    """``event: error``: the stream's job went away; the stream ends."""

    message: str


SSE_ITEM = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": "#/components/schemas/EventOut"},
                  {"$ref": "#/components/schemas/EventErrorOut"}]}},
    "event": {"type": "string", "enum": ["message", "error"]},
    "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}


class _LazyCollection(msgspec.Struct, forbid_unknown_fields=True):
    tasks: list[msgspec.Raw]
    atomic: bool = False


class _LazySubmit(msgspec.Struct, forbid_unknown_fields=True):
    job: msgspec.Raw
    tasks: list[msgspec.Raw]
    existing_ok: bool = True


_collection_decoder = msgspec.json.Decoder(_LazyCollection)
_submit_decoder = msgspec.json.Decoder(_LazySubmit)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut, "description": d} for s, d in (
        (400, "A value breaks a rule (target names the field)"),
        (401, "No API key, or not a valid one"),
        (403, "A read-only key asked to change something"),
        (404, "No such pool, node, job, task, file or run"),
        (409, "Clashes with what is stored, or the coordinator is busy"),
        (413, "The body is over the server's limit"),
        (422, "The body or a parameter is not what this document says"),
        (507, "No space left to store it"),
    )}
DOC_MODELS = (TaskCollectionIn, SubmitIn, EventOut, EventErrorOut)  # not in a signature


def _body_doc(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _decode(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        path = re.search(r"at `\$\.?(.*?)`", str(exc))
        raise _Invalid(str(exc), path.group(1) if path else None) from None
    except msgspec.DecodeError as exc:
        raise _Invalid(f"the body is not valid JSON: {exc}", None) from None


def _job_tasks(job: JobIn) -> dict[str, Any]:
    """The job's preparation and release tasks as given (only the fields set), for
    JobSpec to check and complete."""
    return {name: None if task is None else task.model_dump(exclude_unset=True)
            for name in ("preparation_task", "release_task")
            for task in [getattr(job, name)]}


class _Invalid(Exception):
    def __init__(self, message: str, target: str | None):
        super().__init__(message)
        self.target = target


async def _invalid_handler(request: Request, exc: _Invalid) -> JSON:
    return error(422, "InvalidBody", str(exc), exc.target)


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(dependant: Any) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def _known_query_only(request: Request) -> None:
    """A query parameter the route does not take is a 422 (a typo such as
    ``?maxresult=10`` is not silently ignored)."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        names = _QUERY_NAMES[id(route)] = frozenset(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - names)
    if unknown:
        takes = ", ".join(sorted(names)) or "none"
        raise _Invalid(f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this "
                       f"route takes: {takes}", unknown[0])


def _plain(obj: Any) -> Any:
    """A service answer as JSON-ready data."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _page(page: Any) -> dict:
    return {"items": list(page.items), "continuation": page.continuation}


def _select(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


# ================================================================== ranges

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None) -> tuple[int | None, int | None] | None:
    """(first, last) of a single ``bytes=`` range (either may be None: ``a-``,
    ``-suffix``), or None to serve the whole file (no header, or one this server does
    not understand: several ranges, another unit, bad syntax; RFC 9110 lets it ignore
    those)."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first = int(m.group(1)) if m.group(1) else None
    last = int(m.group(2)) if m.group(2) else None
    if first is not None and last is not None and last < first:
        return None
    return first, last


# ================================================================== the app


def body_chunks(request: Request) -> Iterator[bytes]:
    """The request's body, chunk by chunk as it arrives, for the worker thread that
    ``call`` runs a service method on (never the whole body in memory)."""
    it = request.stream().__aiter__()  # (here, on the event loop's thread)

    def chunks() -> Iterator[bytes]:
        while True:
            try:
                chunk = anyio.from_thread.run(it.__anext__)
            except StopAsyncIteration:
                return
            if chunk:
                yield chunk
    return chunks()

def create_app(service: Any, keys: KeyRing, *, max_body_bytes: int = MAX_BODY_BYTES,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> Any:
    """The ASGI app over ``service``. It does not close the service (its owner does)."""
    services = _Services(service)
    changes = _Changes(services)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await changes.start()
        app.state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            changes.begin_stop()
            await anyio.to_thread.run_sync(changes.stop)
            services.close()

    app = FastAPI(title="hpcbatch", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, default_response_class=JSON,
                  description="The hpcbatch service: pools, jobs, tasks, files, kernel runs "
                  "and a change feed. Every route but /health needs `Authorization: Bearer "
                  "<key>`. Errors are `{code, message, target}`.")
    app.state.home = getattr(service, "home", None)
    app.state.changes = changes
    app.add_exception_handler(HpcBatchError, _hpcbatch_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(_Invalid, _invalid_handler)
    app.add_exception_handler(OSError, _os_or_db_handler)
    app.add_exception_handler(sqlite3.Error, _os_or_db_handler)
    app.add_exception_handler(Exception, _unexpected_handler)

    async def call(fn: Callable[[Any], Any]) -> Any:
        """fn(service) in a worker thread."""
        def run() -> Any:
            with services.use() as s:
                return fn(s)
        return await anyio.to_thread.run_sync(run)

    v1 = APIRouter(prefix="/v1", responses=ERROR_RESPONSES,
                   dependencies=[Depends(_known_query_only)])

    # ---- health and changes ---------------------------------------------------

    @app.get("/health", response_model=HealthOut, tags=["service"])
    async def health() -> JSON:
        """Needs no key: whether the service answers, and its version."""
        return JSON({"status": "ok", "version": __version__})

    @v1.get("/changes", response_model=ChangesOut, tags=["changes"])
    async def get_changes(after: Annotated[int, Query(ge=0)] = 0,
                          timeout: Annotated[float, Query(ge=0, le=MAX_LONG_POLL_S)] = 30.0
                          ) -> JSON:
        """Long-poll: the store's change counter once it is above ``after``, or its value
        after ``timeout`` seconds (at most 60)."""
        return JSON({"counter": await changes.wait(after, timeout)})

    @v1.get("/events", tags=["changes"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"itemSchema": SSE_ITEM}},
                             "description": "`data: {\"counter\": M, \"counts\": {...}}` "
                             "at each change (counts with job_id); `event: error` when the "
                             "job is deleted (then the stream ends)"}})
    async def get_events(job_id: Annotated[str | None, Query()] = None,
                         timeout: Annotated[float | None, Query(ge=0)] = None
                         ) -> StreamingResponse:
        """Server-sent events: one at once, then one at each change of the store
        (coalesced, at most every 0.1 s); with ``job_id``, the job's task counts. The
        stream ends after ``timeout`` seconds when given (else when the client goes)."""
        if job_id is not None:
            await call(lambda s: s.job_counts(job_id))  # a 404 before the stream starts
        until = None if timeout is None else time.monotonic() + timeout

        async def stream() -> AsyncIterator[bytes]:
            last = -1
            stopping = changes.stopping
            while not (stopping and stopping.is_set()):
                left = SSE_KEEPALIVE_S if until is None else until - time.monotonic()
                if last >= 0 and left <= 0:
                    return
                counter = changes.counter
                if counter != last:
                    event: dict[str, Any] = {"counter": counter}
                    if job_id is not None:
                        try:
                            event["counts"] = await call(lambda s: s.job_counts(job_id))
                        except HpcBatchError as exc:  # the job was deleted meanwhile
                            yield b"event: error\ndata: %s\n\n" % _encoder.encode(
                                {"message": one_line(exc)})
                            return
                    yield b"id: %d\ndata: %s\n\n" % (counter, _encoder.encode(event))
                    last = counter
                    await asyncio.sleep(SSE_MIN_GAP_S)
                    continue
                if await changes.wait(last, min(left, SSE_KEEPALIVE_S)) == last and (
                        until is None or time.monotonic() < until):
                    yield b": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # ---- pools ------------------------------------------------------------------

    @v1.post("/pools", status_code=201, response_model=PoolView, tags=["pools"])
    async def create_pool(body: PoolIn) -> JSON:
        """Check every node can be reached, store the pool and start its nodes."""
        named = {"pool_id", "provider", "task_slots_per_node", "scheduling_policy",
                 "target_nodes", "start_task", "inter_node_communication",
                 "trust_on_first_use"}
        clash = sorted(named & set(body.options))
        if clash:
            raise ValidationError("options", f"{', '.join(clash)} are fields of the pool, "
                                  "not provider options")
        kw = body.model_dump(exclude={"id", "provider", "options"})

        def run(s: Any) -> Any:
            try:
                return s.create_pool(body.id, body.provider, **kw, **body.options)
            except TypeError as exc:  # a provider option its config does not take
                raise ValidationError("options", one_line(exc)) from None
        return JSON(_plain(await call(run)), status_code=201)

    @v1.get("/pools", response_model=Items[PoolView], tags=["pools"])
    async def list_pools() -> JSON:
        return JSON({"items": _plain(await call(lambda s: s.list_pools()))})

    @v1.get("/pools/{pool_id}", response_model=PoolView, tags=["pools"])
    async def get_pool(pool_id: IdPath) -> JSON:
        return JSON(_plain(await call(lambda s: s.get_pool(pool_id))))

    @v1.delete("/pools/{pool_id}", response_model=ProblemsOut, tags=["pools"])
    async def delete_pool(pool_id: IdPath) -> JSON:
        """Stop the pool's agents and delete it (it must have no jobs); ``problems``: a
        line per node whose clean-up failed."""
        return JSON({"problems": list(await call(lambda s: s.delete_pool(pool_id)))})

    @v1.post("/pools/{pool_id}/resize", response_model=PoolView, tags=["pools"])
    async def resize_pool(pool_id: IdPath, body: ResizeIn) -> JSON:
        """Grow or shrink the pool; ``deallocation`` says what becomes of the tasks of a
        node that leaves (requeue, terminate, taskcompletion, retaineddata)."""
        return JSON(_plain(await call(lambda s: s.resize_pool(
            pool_id, body.target_nodes, deallocation=body.deallocation))))

    @v1.post("/pools/{pool_id}/enableautoscale", response_model=PoolView, tags=["pools"])
    async def enable_autoscale(pool_id: IdPath, body: AutoscaleIn) -> JSON:
        """Size the pool by an autoscale formula, evaluated every ``interval_s``."""
        return JSON(_plain(await call(lambda s: s.enable_autoscale(
            pool_id, body.formula, interval_s=body.interval_s))))

    @v1.post("/pools/{pool_id}/disableautoscale", response_model=PoolView, tags=["pools"])
    async def disable_autoscale(pool_id: IdPath) -> JSON:
        return JSON(_plain(await call(lambda s: s.disable_autoscale(pool_id))))

    @v1.post("/pools/{pool_id}/evaluateautoscale", tags=["pools"])
    async def evaluate_autoscale(pool_id: IdPath, body: EvaluateIn) -> JSON:
        """A dry run of a formula: every variable's value; the pool is unchanged."""
        return JSON(await call(lambda s: s.evaluate_autoscale(pool_id, body.formula)))

    @v1.get("/pools/{pool_id}/nodes", response_model=Items[NodeView], tags=["pools"])
    async def list_nodes(pool_id: IdPath) -> JSON:
        return JSON({"items": _plain(await call(lambda s: s.list_nodes(pool_id)))})

    @v1.post("/pools/{pool_id}/nodes/{node_id}/disablescheduling", response_model=NodeView,
             tags=["pools"])
    async def disable_scheduling(pool_id: IdPath, node_id: str,
                                 body: DisableSchedulingIn | None = None) -> JSON:
        """No new task goes to the node; ``running`` says what becomes of the tasks on it:
        requeue, terminate, or taskcompletion (let them finish)."""
        running = (body or DisableSchedulingIn()).running
        return JSON(_plain(await call(lambda s: s.disable_node_scheduling(
            pool_id, node_id, running=running))))

    @v1.post("/pools/{pool_id}/nodes/{node_id}/enablescheduling", response_model=NodeView,
             tags=["pools"])
    async def enable_scheduling(pool_id: IdPath, node_id: str) -> JSON:
        return JSON(_plain(await call(lambda s: s.enable_node_scheduling(pool_id, node_id))))

    @v1.delete("/pools/{pool_id}/nodes/{node_id}", status_code=204, response_class=Response,
               tags=["pools"])
    async def remove_node(pool_id: IdPath, node_id: str,
                          running: Annotated[Running, Query()] = "requeue") -> Response:
        await call(lambda s: s.remove_node(pool_id, node_id, running=running))
        return Response(status_code=204)

    # ---- jobs -------------------------------------------------------------------

    @v1.post("/jobs", status_code=201, response_model=JobView, tags=["jobs"])
    async def create_job(body: JobIn) -> JSON:
        kw = body.model_dump(exclude={"id", "pool_id"})
        kw.update(_job_tasks(body))
        return JSON(_plain(await call(lambda s: s.create_job(body.id, body.pool_id, **kw))),
                    status_code=201)

    @v1.get("/jobs/{job_id}/preparationandreleasestatus", tags=["jobs"])
    async def job_task_status(job_id: IdPath) -> JSON:
        """The job's preparation and release tasks and, per node, how each ran there."""
        return JSON(_plain(await call(lambda s: s.job_task_status(job_id))))

    @v1.get("/jobs", response_model=PageOut, tags=["jobs"])
    async def list_jobs(filter: Annotated[str | None, Query()] = None,  # noqa: A002
                        select: Annotated[str | None, Query(
                            description="fields, comma-separated")] = None,
                        maxresults: Annotated[int, Query(ge=1, le=1000)] = 1000,
                        continuation: Annotated[str | None, Query()] = None) -> JSON:
        """A page of jobs: ``filter`` in the $filter language (docs/SERVICE.md), the
        next page with ``continuation``."""
        return JSON(_page(await call(lambda s: s.query_jobs(
            filter=filter, select=_select(select), max_results=maxresults,
            continuation=continuation))))

    @v1.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"])
    async def get_job(job_id: IdPath) -> JSON:
        """The job, with its task counts."""
        def run(s: Any) -> dict:
            job = _plain(s.get_job(job_id))
            job["counts"] = dict(s.job_counts(job_id))
            return job
        return JSON(await call(run))

    @v1.post("/jobs/{job_id}/terminate", response_model=JobView, tags=["jobs"])
    async def terminate_job(job_id: IdPath) -> JSON:
        return JSON(_plain(await call(lambda s: s.terminate_job(job_id))))

    @v1.delete("/jobs/{job_id}", response_model=ProblemsOut, tags=["jobs"])
    async def delete_job(job_id: IdPath) -> JSON:
        return JSON({"problems": list(await call(lambda s: s.delete_job(job_id)))})

    @v1.get("/jobs/{job_id}/taskcounts", response_model=dict[str, int], tags=["jobs"])
    async def task_counts(job_id: IdPath) -> JSON:
        return JSON(dict(await call(lambda s: s.job_counts(job_id))))

    @v1.post("/submit", response_model=AddedOut, tags=["jobs"],
             openapi_extra=_body_doc(SubmitIn))
    async def submit(request: Request) -> JSON:
        """Create the job unless it exists and add the tasks, in one transaction."""
        body = _decode(_submit_decoder, await request.body())
        try:
            job = JobIn.model_validate_json(bytes(body.job))
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(["job", *(str(p) for p in first.get("loc", ()))])
            raise _Invalid(f"{where}: {first.get('msg')}", where) from None
        spec = JobSpec(job.id, job.pool_id, priority=job.priority,
                       on_all_tasks_complete=job.on_all_tasks_complete,
                       max_task_retry_count=job.max_task_retry_count,
                       **_job_tasks(job))
        tasks = (msgspec.json.decode(t) for t in body.tasks)
        n = await call(lambda s: s.submit(spec, tasks, existing_ok=body.existing_ok))
        return JSON({"added": n})

    # ---- tasks ------------------------------------------------------------------

    @v1.post("/jobs/{job_id}/tasks", status_code=201, response_model=TaskView,
             tags=["tasks"])
    async def add_task(job_id: IdPath, body: TaskIn) -> JSON:
        spec = body.model_dump(exclude_unset=True)

        def run(s: Any) -> Any:
            s.add_tasks(job_id, [spec])
            return s.get_task(job_id, body.id)
        return JSON(_plain(await call(run)), status_code=201)

    @v1.post("/jobs/{job_id}/addtaskcollection", response_model=AddResultOut, tags=["tasks"],
             openapi_extra=_body_doc(TaskCollectionIn))
    async def add_task_collection(job_id: IdPath, request: Request) -> JSON:
        """Add many tasks in one request, validated and stored in chunks (bounded
        memory); each refused task is reported with its index (atomic false)."""
        body = _decode(_collection_decoder, await request.body())
        tasks = (msgspec.json.decode(t) for t in body.tasks)
        result = await call(lambda s: s.add_task_collection(job_id, tasks,
                                                            atomic=body.atomic))
        return JSON({"added": result.added, "errors": _plain(list(result.errors))})

    @v1.get("/jobs/{job_id}/tasks", response_model=PageOut, tags=["tasks"])
    async def list_tasks(job_id: IdPath,
                         filter: Annotated[str | None, Query()] = None,  # noqa: A002
                         select: Annotated[str | None, Query(
                             description="fields, comma-separated")] = None,
                         maxresults: Annotated[int, Query(ge=1, le=1000)] = 1000,
                         continuation: Annotated[str | None, Query()] = None) -> JSON:
        """A page of the job's tasks in submission order (``filter`` as for jobs)."""
        return JSON(_page(await call(lambda s: s.query_tasks(
            job_id, filter=filter, select=_select(select), max_results=maxresults,
            continuation=continuation))))

    @v1.get("/jobs/{job_id}/tasks/{task_id}", response_model=TaskView, tags=["tasks"])
    async def get_task(job_id: IdPath, task_id: IdPath) -> JSON:
        return JSON(_plain(await call(lambda s: s.get_task(job_id, task_id))))

    @v1.get("/jobs/{job_id}/tasks/{task_id}/attempts", response_model=Items[AttemptView],
            tags=["tasks"])
    async def task_attempts(job_id: IdPath, task_id: IdPath) -> JSON:
        return JSON({"items": _plain(await call(lambda s: s.task_attempts(job_id, task_id)))})

    @v1.post("/jobs/{job_id}/tasks/{task_id}/terminate", status_code=204,
             response_class=Response, tags=["tasks"])
    async def terminate_task(job_id: IdPath, task_id: IdPath) -> Response:
        await call(lambda s: s.terminate_task(job_id, task_id))
        return Response(status_code=204)

    @v1.post("/jobs/{job_id}/tasks/{task_id}/reactivate", response_model=TaskView,
             tags=["tasks"])
    async def reactivate_task(job_id: IdPath, task_id: IdPath) -> JSON:
        return JSON(_plain(await call(lambda s: s.reactivate_task(job_id, task_id))))

    @v1.delete("/jobs/{job_id}/tasks/{task_id}", status_code=204, response_class=Response,
               tags=["tasks"])
    async def delete_task(job_id: IdPath, task_id: IdPath) -> Response:
        await call(lambda s: s.delete_task(job_id, task_id))
        return Response(status_code=204)

    # ---- task files ---------------------------------------------------------------

    @v1.get("/jobs/{job_id}/tasks/{task_id}/files", response_model=Items[FileView],
            tags=["files"])
    async def list_files(job_id: IdPath, task_id: IdPath, node: NodeQuery = None) -> JSON:
        """The files of the task's latest attempt (``node``: that node's copy of its
        directory, as each instance of a multi-instance task has)."""
        return JSON({"items": _plain(await call(lambda s: s.list_task_files(
            job_id, task_id, node=node)))})

    octet = {"application/octet-stream": {"schema": {"type": "string",
                                                      "format": "binary"}}}

    @v1.get("/jobs/{job_id}/tasks/{task_id}/files/{path:path}", tags=["files"],
            response_class=Response,
            responses={200: {"content": octet, "description": "the file"},
                       206: {"content": octet, "description": "the range asked for"},
                       416: {"model": ErrorOut, "description": "the range starts past the "
                             "end of the file"}})
    async def get_file(job_id: IdPath, task_id: IdPath, path: Annotated[str, PathParam()],
                       follow: Annotated[bool, Query()] = False,
                       range_: Annotated[str | None, Header(alias="range")] = None,
                       node: NodeQuery = None) -> Response:
        """A file of the task's latest attempt (``path`` relative to its directory, such
        as stdout.txt). ``Range: bytes=a-b`` gives a 206; ``follow=true`` streams the
        file as it grows until the task has completed (from the Range's start, if one is
        given: then a 206 without Content-Range, its end being unknown). ``node``: from
        that node's copy of the directory (a multi-instance task's other instances, e.g.
        coordination-stderr.txt)."""
        from hpcbatch.service import task_file_name
        name = task_file_name(path)  # '..', absolute: 400 before anything is read
        wanted = parse_range(range_)
        if follow:
            return await _follow(job_id, task_id, name, (wanted or (0, None))[0] or 0, node)
        headers = {"Accept-Ranges": "bytes"}
        if wanted is None:
            first = await call(lambda s: s.read_task_file(job_id, task_id, name, offset=0,
                                                          length=FILE_CHUNK, node=node))
            return StreamingResponse(_chunks(job_id, task_id, name, first, 0, None, node),
                                     media_type="application/octet-stream", headers=headers)
        size = await call(lambda s: _file_size(s, job_id, task_id, name, node))
        start, last = wanted
        if start is None:  # the last N bytes
            start, end = max(0, size - (last or 0)), size
            if last == 0:
                start = size
        else:
            end = size if last is None else min(last + 1, size)
        if start >= size or start >= end:
            return error(416, "RangeNotSatisfiable", f"the range {range_!r} is outside "
                         f"{name} ({size} bytes)", "range",
                         {"Content-Range": f"bytes */{size}"})
        first = await call(lambda s: s.read_task_file(job_id, task_id, name, offset=start,
                                                      length=min(FILE_CHUNK, end - start),
                                                      node=node))
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(_chunks(job_id, task_id, name, first, start, end, node),
                                 status_code=206, media_type="application/octet-stream",
                                 headers=headers)

    def _file_size(s: Any, job_id: str, task_id: str, name: str,
                   node: str | None = None) -> int:
        for f in s.list_task_files(job_id, task_id, node=node):
            if f.name == name:
                if getattr(f, "kind", "file") != "file":
                    raise NotFound(f"{name} of task {job_id}/{task_id} is not a regular file "
                                   f"({f.kind})")
                return int(f.size)
        raise NotFound(f"task {job_id}/{task_id} has no file {name}")

    async def _chunks(job_id: str, task_id: str, name: str, first: bytes, start: int,
                      end: int | None, node: str | None = None) -> AsyncIterator[bytes]:
        """``first`` (read already), then the rest up to ``end`` (None: the end of the
        file), FILE_CHUNK at a time."""
        data, offset = first, start
        while data:
            if end is not None:
                data = data[:end - offset]
            yield data
            offset += len(data)
            if len(data) < FILE_CHUNK or (end is not None and offset >= end):
                return
            want = FILE_CHUNK if end is None else min(FILE_CHUNK, end - offset)
            try:
                data = await call(lambda s, o=offset, w=want: s.read_task_file(
                    job_id, task_id, name, offset=o, length=w, node=node))
            except HpcBatchError as exc:  # the response has started: end it short
                log.warning("reading %s of %s/%s stopped: %s", name, job_id, task_id, exc)
                return

    async def _follow(job_id: str, task_id: str, name: str, offset: int,
                      node: str | None = None) -> Response:
        task = await call(lambda s: s.get_task(job_id, task_id))  # 404 before streaming
        if task.task_dir and task.node_id:
            # a symlink out, a directory: refused before the stream starts
            with contextlib.suppress(NotFound):
                await call(lambda s: s.read_task_file(job_id, task_id, name, offset=0,
                                                      length=0, node=node))

        async def stream() -> AsyncIterator[bytes]:
            done = object()
            with services.use() as s:
                it = s.follow_task_file(job_id, task_id, name, offset=offset, node=node)
                try:
                    while not (changes.stopping and changes.stopping.is_set()):
                        chunk = await anyio.to_thread.run_sync(next, it, done)
                        if chunk is done:
                            return
                        yield chunk
                except HpcBatchError as exc:
                    log.warning("following %s of %s/%s stopped: %s", name, job_id,
                                task_id, exc)
                finally:
                    with anyio.CancelScope(shield=True):  # the client may have gone
                        await anyio.to_thread.run_sync(it.close)

        # from a Range start: 206 (the bytes begin there); the end is not known yet, so
        # there is no Content-Range
        return StreamingResponse(stream(), status_code=206 if offset else 200,
                                 media_type="application/octet-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # ---- kernel runs --------------------------------------------------------------

    @v1.post("/runs", status_code=202, response_model=RunView, tags=["runs"])
    async def start_run(body: RunIn) -> JSON:
        """Start a kernel run (its own job of one task) and answer at once; poll
        GET /v1/runs/{run_id} or follow the change feed."""
        kw = {k: v for k, v in body.model_dump(exclude={"kernel"}).items() if v is not None}
        return JSON(_plain(await call(lambda s: s.start_run(body.kernel, **kw))),
                    status_code=202)

    @v1.get("/runs", response_model=list[RunView], tags=["runs"])
    async def list_runs() -> JSON:
        """Every kernel run whose job is still there, oldest first."""
        return JSON([_plain(r) for r in await call(lambda s: s.list_runs())])

    @v1.get("/runs/{run_id}", response_model=RunView, tags=["runs"])
    async def get_run(run_id: RunPath) -> JSON:
        return JSON(_plain(await call(lambda s: s.get_run(run_id))))

    @v1.get("/runs/{run_id}/result", tags=["runs"], response_class=Response,
            responses={200: {"content": {"application/x-hdf5": {"schema": {
                "type": "string", "format": "binary"}}}, "description": "the HDF5 file"}})
    async def get_run_result(run_id: RunPath) -> Response:
        data = await call(lambda s: s.read_run_result(run_id))
        return Response(data, media_type="application/x-hdf5", headers={
            "Content-Disposition": f'attachment; filename="{run_id}.h5"'})

    # ---- uploads ------------------------------------------------------------------

    @v1.put("/uploads/{sha256}", response_model=UploadOut, tags=["uploads"],
            openapi_extra={"requestBody": {"required": True, "content": octet}})
    async def upload(sha256: ShaPath, name: Annotated[str, Query(min_length=1)],
                     request: Request) -> JSON:
        """Store a file a client sends (checked against its SHA-256); answers the path
        to name in a resource file's ``source``."""
        chunks = body_chunks(request)
        return JSON({"path": await call(lambda s: s.upload(name, chunks, sha256))})

    from hpcbatch.server.storage_routes import add_routes as add_storage_routes
    add_storage_routes(v1, call)
    from hpcbatch.server.apps_routes import add_routes as add_app_routes
    add_app_routes(v1, call, JSON, _plain, app.state.home)

    app.include_router(v1)
    app.add_middleware(_Gate, keys=keys, max_body=max_body_bytes, max_upload=max_upload_bytes)
    _document(app)
    return app


def _document(app: FastAPI) -> None:
    """The OpenAPI document: every route's body and errors, the bearer scheme, and the
    models of the bodies decoded by hand."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in DOC_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = schema
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key: hpcb_<id>_<secret>"}}
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                if path.startswith("/v1"):
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def request_stop(app: Any) -> None:
    """From any thread: end long-polls, event and follow streams (the server stops)."""
    loop = getattr(app.state, "loop", None)
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(app.state.changes.begin_stop)


__all__ = ["MAX_BODY_BYTES", "create_app", "parse_range", "request_stop"]
