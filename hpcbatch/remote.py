"""The service over HTTP: :class:`RemoteService` talks to a running ``hpcbatch serve``.

It implements every :class:`hpcbatch.service.Service` method with one request (or a
stream) of the ``/v1`` API and gives back what :class:`~hpcbatch.service.LocalService`
gives: the same views, the same error kinds (a ``{"code", "message", "target"}`` answer
becomes ``ValidationError(target, rule)``, ``NotFound``, ``Conflict`` ...), and the
same ``TimeoutError`` when a wait runs out. So ``hpcbatch.Batch(url=..., key=...)`` is
the embedded ``Batch()`` with the coordinator elsewhere.

* Tasks go in one request whose JSON body is written while it is sent: a generator of
  100,000 tasks is validated here (the errors an embedded ``Batch`` raises, raised
  here) and streamed, never held twice.
* Resource files named on this machine are uploaded first (``PUT /v1/uploads/<sha256>``,
  once per content and session) and the task names the service's copy instead.
* ``wait_job`` follows the change feed (a long poll on the service's change counter)
  and reads the job's counts when something changed, never polling in a tight loop.
* ``follow_task_file`` is one streamed request (``?follow=true``) that ends when the
  task does.

:func:`discover` finds the service a home's clients should use (``HPCBATCH_URL``, or the
``service.json`` that a running ``hpcbatch serve`` leaves in the home).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcbatch import env as E
from hpcbatch._version import __version__
from hpcbatch.errors import (
    Conflict,
    CoordinatorBusy,
    HpcBatchError,
    NotFound,
    StorageFull,
    ValidationError,
)
from hpcbatch.models import JobSpec, TaskSpec
from hpcbatch.service import LOCAL_POOL, Service
from hpcbatch.storage_api import RemoteStorageMethods
from hpcbatch.timings import Timings
from hpcbatch.views import (
    AddResult,
    AttemptView,
    FileView,
    JobView,
    NodeView,
    Page,
    PoolView,
    RunView,
    TaskError,
    TaskView,
)

URL_ENV, KEY_ENV, CAFILE_ENV = E.URL, E.KEY, E.CAFILE
_TASK_DEFAULTS: dict[str, Any] | None = None  # a TaskSpec's fields as sent, by default
_MISSING = object()
SERVICE_FILE = "service.json"  # what a running 'hpcbatch serve' leaves in its home
SERVICE_KEY_FILE = "service.key"  # the key it made for local clients of the same user

REQUEST_TIMEOUT_S = 60.0  # one ordinary request
CONNECT_TIMEOUT_S = 10.0
BULK_TIMEOUT_S = 900.0  # a request that adds many tasks or moves a file
FEED_MAX_S = 60.0  # the longest long poll the service holds (its limit)
WAIT_GAP_S = 0.05  # wait_job reads the job's counts at most this often
POOL_CHECK_S = 2.0  # and the pool's nodes at most this often
PROGRESS_EVERY_S = 0.2  # on_progress at most this often
CHUNK_BYTES = 256 * 1024  # a streamed body is sent in pieces of about this size
PAGE_MAX = 1000  # the most items one list request gives


# ---------------------------------------------------------------- discovery

def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def service_record(home: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The ``service.json`` of a running ``hpcbatch serve`` on ``home`` (default: the
    default home), or None: none there, unreadable, or its process is gone (a
    ``kill -9`` leaves the file; it is then ignored)."""
    from hpcbatch.home import default_home
    path = (Path(home).expanduser() if home else default_home()) / SERVICE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("url"), str):
        return None
    return record if _pid_alive(record.get("pid")) else None


def _read_key(home: Path) -> str | None:
    try:
        return (home / SERVICE_KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def discover(home: str | os.PathLike | None = None) -> tuple[str, str | None] | None:
    """The service a client on ``home`` uses, as (url, key), or None (embedded).

    In this order: ``HPCBATCH_URL`` (with ``HPCBATCH_KEY``); the ``service.json`` of a
    live ``hpcbatch serve`` in the home, with the key it left in ``service.key``."""
    from hpcbatch.home import default_home
    h = Path(home).expanduser() if home else default_home()
    url = os.environ.get(URL_ENV, "").strip()
    if url:
        return url, os.environ.get(KEY_ENV) or _key_for(h, url)
    record = service_record(h)
    if record is None:
        return None
    return record["url"], os.environ.get(KEY_ENV) or _read_key(h)


def _key_for(home: Path, url: str) -> str | None:
    """The local key of the home's service when ``url`` is that service."""
    record = service_record(home)
    if record is not None and record["url"].rstrip("/") == url.rstrip("/"):
        return _read_key(home)
    return None


def _cafile_for(home: Path | None, url: str) -> str | None:
    if os.environ.get(CAFILE_ENV):
        return os.environ[CAFILE_ENV]
    record = service_record(home) if home is not None else None
    if record is not None and record["url"].rstrip("/") == url.rstrip("/"):
        cafile = record.get("cafile")
        return cafile if isinstance(cafile, str) and cafile else None
    return None


# ---------------------------------------------------------------- errors

def _seg(value: Any, what: str) -> str:
    """One path segment: an id as typed (quoted); an empty one cannot name anything."""
    text = value if isinstance(value, str) else str(value)
    if not text:
        raise NotFound(f"{what} {text!r} does not exist")
    return urllib.parse.quote(text, safe="")


def error_from(status: int, body: Any, url: str) -> HpcBatchError:
    """The exception an answer with this status and ``{"code","message","target"}`` body
    stands for: the error kinds of :mod:`hpcbatch.errors`, as the embedded service
    raises them."""
    code = message = target = None
    if isinstance(body, Mapping):
        code, message, target = body.get("code"), body.get("message"), body.get("target")
        if message is None and "detail" in body:  # a framework's own answer
            message = body["detail"] if isinstance(body["detail"], str) else json.dumps(
                body["detail"])[:500]
    message = " ".join(str(message).split()) if message else f"HTTP {status}"
    if code == "ValidationError" or (code in (None, "InvalidBody") and status in (400, 422)):
        field = target if isinstance(target, str) and target else (
            "body" if status == 422 else "request")
        rule = message[len(field) + 2:] if message.startswith(f"{field}: ") else message
        return ValidationError(field, rule)
    if code == "NotFound" or (code is None and status == 404):
        return NotFound(message)
    if code == "CoordinatorBusy":
        return CoordinatorBusy(message)
    if code == "Conflict" or (code is None and status == 409):
        return Conflict(message)
    if code == "StorageFull" or status == 507:
        return StorageFull(message)
    if code == "Unauthorized" or status == 401:
        return HpcBatchError(f"the hpcbatch service at {url} refused the request: {message} "
                             f"(give its key: {KEY_ENV} or Batch(key=...); 'hpcbatch keys "
                             "create' on the service makes one)")
    if code == "Forbidden" or status == 403:
        return HpcBatchError(f"the hpcbatch service at {url} refused the request: {message} "
                             "(the key is read-only; use a key that may write)")
    if code == "PayloadTooLarge" or status == 413:
        return HpcBatchError(f"the hpcbatch service at {url} refused a request this large: "
                             f"{message}")
    if status >= 500:
        return HpcBatchError(f"the hpcbatch service at {url} failed (HTTP {status}): "
                             f"{message}; see its log")
    return HpcBatchError(message)


def _task_error(err: Mapping[str, Any], url: str) -> HpcBatchError:
    """The exception a TaskError of an add-collection answer stands for."""
    code = err.get("code")
    status = {"ValidationError": 400, "NotFound": 404, "Conflict": 409,
              "StorageFull": 507}.get(code, 409)
    return error_from(status, err, url)


# ---------------------------------------------------------------- the service

class RemoteService(RemoteStorageMethods, Service):
    """Every :class:`Service` operation as a request to ``url`` (``https://`` with
    TLS: ``verify`` is a CA file or True), authorised by ``key``.

    ``pool_grace_s``: ``wait_job`` gives up when the job's pool has had no usable node
    this long (as the embedded service does)."""

    coordinator = None  # none in this process

    def __init__(self, url: str, key: str | None = None, *, verify: bool | str = True,
                 timeout_s: float = REQUEST_TIMEOUT_S,
                 pool_grace_s: float = Timings.pool_grace_s):
        import httpx
        if not isinstance(url, str) or not url.strip():
            raise ValidationError("url", f"{url!r} is not a URL (such as "
                                  "http://127.0.0.1:8470)")
        url = url.strip().rstrip("/")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValidationError("url", f"{url!r} is not an http:// or https:// URL")
        self.url = url
        self.found_in = f"{URL_ENV}; unset it to use an embedded coordinator" \
            if os.environ.get(URL_ENV, "").strip() == url else "Batch(url=...)"
        self.pool_grace_s = pool_grace_s
        headers = {"User-Agent": f"hpcbatch/{__version__}", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        self._http = httpx.Client(base_url=url, headers=headers, verify=verify,
                                  timeout=self._timeout, follow_redirects=False)
        self._hashes: dict[tuple[str, int, int, int], str] = {}  # (path, dev, ino, mtime)
        self._uploaded: dict[tuple[str, str], str] = {}  # (sha256, name) -> service path

    def __repr__(self) -> str:
        return f"<RemoteService {self.url}>"

    # ---- requests --------------------------------------------------------

    def _send(self, method: str, path: str, *, stream: bool = False,
              timeout: Any = None, **kw: Any):
        import httpx
        try:
            request = self._http.build_request(method, path, timeout=timeout or self._timeout,
                                               **kw)
            response = self._http.send(request, stream=stream)
        except httpx.TimeoutException:
            raise HpcBatchError(f"the hpcbatch service at {self.url} did not answer "
                                f"{method} {path} in time; it may be overloaded (see its "
                                "log); ask again") from None
        except httpx.TransportError as exc:
            raise HpcBatchError(f"cannot reach the hpcbatch service at {self.url} "
                                f"({type(exc).__name__}: {exc}); is 'hpcbatch serve' "
                                f"running? (the URL came from {self.found_in})") from None
        if response.status_code >= 300:
            if stream:
                response.read()
                response.close()
            try:
                body = response.json()
            except ValueError:
                body = {"message": response.text[:500]}
            exc = error_from(response.status_code, body, self.url)
            exc.status = response.status_code
            raise exc
        return response

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = self._send(method, path, **kw)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise HpcBatchError(f"the hpcbatch service at {self.url} answered {method} "
                                f"{path} with something that is not JSON") from None

    def _get(self, path: str, **params: Any) -> Any:
        return self._json("GET", path, params={k: v for k, v in params.items()
                                               if v is not None} or None)

    def _post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self._json("POST", path, json=body, **kw)

    def _bulk_timeout(self):
        import httpx
        return httpx.Timeout(BULK_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)

    # ---- pools -----------------------------------------------------------

    def create_pool(self, pool_id: str, provider: str = "local", *,
                    task_slots_per_node: int = 1, scheduling_policy: str = "pack",
                    target_nodes: int | None = None, start_task: str | None = None,
                    inter_node_communication: bool | None = None,
                    trust_on_first_use: bool = False, **provider_options: Any) -> PoolView:
        """Provider options that name files (``spec``, ``key``, ``known_hosts`` ...) name
        them on the service's machine."""
        body = {"id": pool_id, "provider": provider,
                "task_slots_per_node": task_slots_per_node,
                "scheduling_policy": scheduling_policy, "target_nodes": target_nodes,
                "start_task": start_task, "inter_node_communication": inter_node_communication,
                "trust_on_first_use": trust_on_first_use, "options": provider_options}
        refs = provider_options.get("application_package_references")
        if refs:  # AppRef / "NAME:VERSION" as JSON
            from hpcbatch.apps import AppRef
            provider_options["application_package_references"] = [
                {"application_id": r.application_id, "version": r.version}
                for r in AppRef.check_list("pool.application_package_references", refs)]
        return PoolView.from_dict(self._post("/v1/pools", body, timeout=self._bulk_timeout()))

    def get_pool(self, pool_id: str) -> PoolView:
        return PoolView.from_dict(self._get(f"/v1/pools/{_seg(pool_id, 'pool')}"))

    def list_pools(self) -> list[PoolView]:
        return [PoolView.from_dict(p) for p in self._get("/v1/pools")["items"]]

    def delete_pool(self, pool_id: str) -> list[str]:
        out = self._json("DELETE", f"/v1/pools/{_seg(pool_id, 'pool')}",
                         timeout=self._bulk_timeout())
        return list((out or {}).get("problems") or [])

    def list_nodes(self, pool_id: str | None = None) -> list[NodeView]:
        pools = [pool_id] if pool_id is not None else [p.id for p in self.list_pools()]
        nodes: list[NodeView] = []
        for p in pools:
            try:
                items = self._get(f"/v1/pools/{_seg(p, 'pool')}/nodes")["items"]
            except NotFound:
                if pool_id is not None:
                    raise
                continue  # deleted meanwhile
            nodes += [NodeView.from_dict(n) for n in items]
        return nodes

    def resize_pool(self, pool_id: str, target_nodes: int, *,
                    deallocation: str = "requeue") -> PoolView:
        return PoolView.from_dict(self._post(f"/v1/pools/{_seg(pool_id, 'pool')}/resize",
                                             {"target_nodes": target_nodes,
                                              "deallocation": deallocation},
                                             timeout=self._bulk_timeout()))

    def enable_autoscale(self, pool_id: str, formula: str, *,
                         interval_s: float = 30.0) -> PoolView:
        from hpcbatch.autoscaling import parse_interval
        return PoolView.from_dict(self._post(
            f"/v1/pools/{_seg(pool_id, 'pool')}/enableautoscale",
            {"formula": formula, "interval_s": parse_interval(interval_s)}))

    def disable_autoscale(self, pool_id: str) -> PoolView:
        return PoolView.from_dict(self._post(
            f"/v1/pools/{_seg(pool_id, 'pool')}/disableautoscale"))

    def evaluate_autoscale(self, pool_id: str, formula: str) -> dict[str, Any]:
        return self._post(f"/v1/pools/{_seg(pool_id, 'pool')}/evaluateautoscale",
                          {"formula": formula})

    def _node_path(self, pool_id: str, node_id: str) -> str:
        return f"/v1/pools/{_seg(pool_id, 'pool')}/nodes/{_seg(node_id, 'node')}"

    def disable_node_scheduling(self, pool_id: str, node_id: str, *,
                                running: str = "taskcompletion") -> NodeView:
        return NodeView.from_dict(self._post(
            f"{self._node_path(pool_id, node_id)}/disablescheduling", {"running": running}))

    def enable_node_scheduling(self, pool_id: str, node_id: str) -> NodeView:
        return NodeView.from_dict(self._post(
            f"{self._node_path(pool_id, node_id)}/enablescheduling"))

    def remove_node(self, pool_id: str, node_id: str, *, running: str = "requeue") -> None:
        self._json("DELETE", self._node_path(pool_id, node_id), params={"running": running},
                   timeout=self._bulk_timeout())

    # ---- jobs ------------------------------------------------------------

    def create_job(self, job_id: str, pool_id: str = LOCAL_POOL, *, priority: int = 0,
                   on_all_tasks_complete: str = "no_action",
                   max_task_retry_count: int = 0, preparation_task: Any = None,
                   release_task: Any = None) -> JobView:
        import dataclasses
        spec = JobSpec(job_id, pool_id, priority=priority,  # checked here first
                       on_all_tasks_complete=on_all_tasks_complete,
                       max_task_retry_count=max_task_retry_count,
                       preparation_task=preparation_task, release_task=release_task)
        body = {"id": job_id, "pool_id": pool_id, "priority": priority,
                "on_all_tasks_complete": on_all_tasks_complete,
                "max_task_retry_count": max_task_retry_count}
        for name in ("preparation_task", "release_task"):
            task = getattr(spec, name)
            if task is not None:
                d = dataclasses.asdict(task)
                for rf in d["resource_files"]:  # this machine's files, uploaded
                    rf["source"] = self._upload_file(rf["source"])
                body[name] = d
        return JobView.from_dict(self._post("/v1/jobs", body))

    def job_task_status(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{_seg(job_id, 'job')}/preparationandreleasestatus")

    def get_job(self, job_id: str) -> JobView:
        return JobView.from_dict(self._get(f"/v1/jobs/{_seg(job_id, 'job')}"))

    def list_jobs(self, *, counts: bool = False) -> list[JobView]:
        jobs: list[JobView] = []
        continuation = None
        while True:
            page = self._get("/v1/jobs", maxresults=PAGE_MAX, continuation=continuation)
            for item in page["items"]:
                view = JobView.from_dict(item)
                if counts and view.counts is None:
                    try:
                        view = JobView.from_dict({**item, "counts": self.job_counts(view.id)})
                    except NotFound:
                        continue  # deleted meanwhile
                elif not counts and view.counts is not None:
                    view = JobView.from_dict({**item, "counts": None})
                jobs.append(view)
            continuation = page.get("continuation")
            if not continuation:
                return jobs

    def query_jobs(self, *, filter: str | None = None, select: Sequence[str] | None = None,
                   max_results: int = 1000, continuation: str | None = None) -> Page:
        return self._page(self._get("/v1/jobs", filter=filter, select=_select(select),
                                    maxresults=max_results, continuation=continuation))

    def delete_job(self, job_id: str) -> list[str]:
        out = self._json("DELETE", f"/v1/jobs/{_seg(job_id, 'job')}",
                         timeout=self._bulk_timeout())
        return list((out or {}).get("problems") or [])

    def terminate_job(self, job_id: str) -> JobView:
        return JobView.from_dict(self._post(f"/v1/jobs/{_seg(job_id, 'job')}/terminate",
                                            timeout=self._bulk_timeout()))

    def job_counts(self, job_id: str) -> dict[str, int]:
        return dict(self._get(f"/v1/jobs/{_seg(job_id, 'job')}/taskcounts"))

    def wait_job(self, job_id: str, *, timeout_s: float | None = None,
                 on_progress: Callable[[dict[str, int]], None] | None = None,
                 on_waiting: Callable[[str], None] | None = None) -> dict[str, int]:
        """Follows the change feed: a long poll on the service's change counter, then the
        job's counts (at most every WAIT_GAP_S); the pool's nodes every POOL_CHECK_S.
        (``on_waiting``: what a wide task waits for is not served over REST yet.)"""
        pool_id = self.get_job(job_id).pool_id
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        grace = self.pool_grace_s
        next_pool_check = start + min(POOL_CHECK_S, grace)
        next_progress = start
        dead_since = None
        change = self.change_counter()
        last = 0.0
        while True:
            now = time.monotonic()
            if now - last < WAIT_GAP_S:
                time.sleep(WAIT_GAP_S - (now - last))
                now = time.monotonic()
            last = now
            counts = self.job_counts(job_id)
            if counts["completed"] >= counts["total"] and not any(  # (its release tasks too)
                    n["kind"] == "release" and n["state"] == "running"
                    for n in self.job_task_status(job_id)["nodes"]):
                if on_progress is not None:
                    on_progress(counts)
                return counts
            if on_progress is not None and now >= next_progress:
                on_progress(counts)
                next_progress = now + PROGRESS_EVERY_S
            if now >= next_pool_check:
                nodes = self.list_nodes(pool_id)
                why = None if not nodes or any(n.usable for n in nodes) else "; ".join(
                    f"{n.id}: {n.reason or n.state}" for n in nodes[:3])
                dead_since = (dead_since or now) if why else None
                if why and now - dead_since >= grace:
                    raise HpcBatchError(
                        f"pool {pool_id!r} has had no usable node for {grace:g} s ({why}); "
                        "the job's tasks stay stored and its nodes are still being retried: "
                        f"fix the pool, then 'hpcbatch job wait {job_id}'")
                next_pool_check = now + min(POOL_CHECK_S, max(grace / 4, 0.05))
            if deadline is not None and now > deadline:
                raise TimeoutError(f"job {job_id}: {counts['completed']}/{counts['total']} "
                                   f"tasks completed after {timeout_s} s")
            wake = [next_pool_check - now, FEED_MAX_S]
            if deadline is not None:
                wake.append(deadline - now)
            if on_progress is not None:
                wake.append(next_progress - now)
            change = self.wait_for_change(change, max(0.0, min(wake)))

    # ---- tasks -----------------------------------------------------------

    def _file_hash(self, path: str) -> str:
        st = os.stat(path)
        key = (path, st.st_dev, st.st_ino, st.st_mtime_ns)
        digest = self._hashes.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digest = self._hashes[key] = h.hexdigest()
        return digest

    def _upload_file(self, source: str) -> str:
        """The service's path of this machine's file ``source`` (uploaded once per content
        and name in this session; the service keeps uploads by content too)."""
        try:
            digest = self._file_hash(source)
        except OSError as exc:
            raise ValidationError("resource_file.source", f"{source} cannot be read "
                                  f"({exc.strerror or exc}); give an existing file") from None
        name = os.path.basename(source)
        there = self._uploaded.get((digest, name))
        if there is None:
            def chunks() -> Iterator[bytes]:
                with open(source, "rb") as f:
                    while block := f.read(CHUNK_BYTES):
                        yield block
            there = self.upload(name, chunks(), digest)
            self._uploaded[(digest, name)] = there
        return there

    def _task_body(self, task: TaskSpec | Mapping[str, Any]) -> dict[str, Any]:
        """A task as the service takes it, checked here first (the embedded errors), its
        resource files uploaded."""
        from hpcbatch.store import spec_to_dict
        global _TASK_DEFAULTS
        if _TASK_DEFAULTS is None:
            _TASK_DEFAULTS = spec_to_dict(TaskSpec("x", "true"))
        # what differs from the defaults only: 100,000 tasks were a 17.5 MB body with
        # every null and empty list spelled out, 4 MB without
        d = {k: v for k, v in spec_to_dict(TaskSpec.coerce(task)).items()
             if k in ("id", "command_line") or _TASK_DEFAULTS.get(k, _MISSING) != v}
        for rf in d.get("resource_files") or ():
            if rf.get("source"):  # (a container, storage path or URL: read by the service)
                rf["source"] = self._upload_file(rf["source"])
        mi = d.get("multi_instance")
        for rf in (mi or {}).get("common_resource_files") or ():
            if rf.get("source"):
                rf["source"] = self._upload_file(rf["source"])
        return d

    def _tasks_stream(self, head: Mapping[str, Any], tasks: Iterable[Any], *, strict: bool,
                      failure: list[BaseException]) -> Iterator[bytes]:
        """``{**head, "tasks": [...]}`` as JSON, written while it is sent. ``strict``: a
        task refused here stops the body short (malformed: the service stores nothing)
        and its error goes to ``failure``; otherwise it is sent as given, for the
        service to report in its answer."""
        opening = json.dumps(dict(head), separators=(",", ":"))[:-1]
        parts = [opening + ("," if head else "") + '"tasks":[']
        size = len(parts[0])
        dumps = json.JSONEncoder(separators=(",", ":"), default=repr).encode
        first = True
        for task in tasks:
            try:
                body = self._task_body(task)
            except Exception as exc:  # noqa: BLE001 - raised by the caller after the send
                if strict:
                    failure.append(exc)
                    yield "".join(parts).encode()
                    return
                body = _as_sent(task)
            text = dumps(body) if first else "," + dumps(body)
            first = False
            parts.append(text)
            size += len(text)
            if size >= CHUNK_BYTES:
                yield "".join(parts).encode()
                parts, size = [], 0
        parts.append("]}")
        yield "".join(parts).encode()

    def _post_tasks(self, path: str, head: Mapping[str, Any], tasks: Iterable[Any], *,
                    strict: bool) -> Any:
        if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Iterable):
            raise ValidationError("tasks", "must be a list (or other iterable) of tasks")
        failure: list[BaseException] = []
        try:
            out = self._json("POST", path, content=self._tasks_stream(
                head, tasks, strict=strict, failure=failure),
                headers={"Content-Type": "application/json"}, timeout=self._bulk_timeout())
        except HpcBatchError:
            if failure:  # the service refused the body cut short: the real reason
                raise failure[0] from None
            raise
        if failure:  # (a service that took a cut body: it must not have; say why)
            raise failure[0]
        return out

    def add_tasks(self, job_id: str, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> int:
        """One request, all or nothing."""
        out = self._post_tasks(f"/v1/jobs/{_seg(job_id, 'job')}/addtaskcollection",
                               {"atomic": True}, tasks, strict=True)
        errors = out.get("errors") or []
        if errors:
            raise _task_error(errors[0], self.url)
        return int(out["added"])

    def add_task_collection(self, job_id: str, tasks: Iterable[TaskSpec | Mapping[str, Any]],
                            *, atomic: bool = True) -> AddResult:
        out = self._post_tasks(f"/v1/jobs/{_seg(job_id, 'job')}/addtaskcollection",
                               {"atomic": bool(atomic)}, tasks, strict=bool(atomic))
        errors = tuple(TaskError.from_dict(e) for e in out.get("errors") or ())
        if atomic and errors:
            raise _task_error(errors[0].to_dict(), self.url)
        return AddResult(int(out["added"]), errors)

    def submit(self, job: JobSpec, tasks: Iterable[TaskSpec | Mapping[str, Any]], *,
               existing_ok: bool = True) -> int:
        import dataclasses
        if not isinstance(job, JobSpec):
            raise ValidationError("job", f"must be a JobSpec, not {type(job).__name__}")
        body = dataclasses.asdict(job)
        for name in ("preparation_task", "release_task"):
            for rf in (body.get(name) or {}).get("resource_files") or ():
                rf["source"] = self._upload_file(rf["source"])  # this machine's files
        out = self._post_tasks("/v1/submit", {"job": body,
                                              "existing_ok": bool(existing_ok)},
                               tasks, strict=True)
        return int(out["added"])

    def _task_path(self, job_id: str, task_id: str) -> str:
        return f"/v1/jobs/{_seg(job_id, 'job')}/tasks/{_seg(task_id, 'task')}"

    def get_task(self, job_id: str, task_id: str) -> TaskView:
        return TaskView.from_dict(self._get(self._task_path(job_id, task_id)))

    def _page(self, data: Mapping[str, Any]) -> Page:
        return Page(tuple(data.get("items") or ()), data.get("continuation") or None)

    def query_tasks(self, job_id: str, *, filter: str | None = None,
                    select: Sequence[str] | None = None, max_results: int = 1000,
                    continuation: str | None = None) -> Page:
        return self._page(self._get(f"/v1/jobs/{_seg(job_id, 'job')}/tasks", filter=filter,
                                    select=_select(select), maxresults=max_results,
                                    continuation=continuation))

    def list_tasks(self, job_id: str, state: str | None = None, *, failed: bool = False,
                   limit: int | None = None) -> list[TaskView]:
        """Page by page, until ``limit``."""
        if state is not None:
            from hpcbatch.models import TaskState
            if state not in {s.value for s in TaskState}:
                raise ValidationError("state", f"{state!r} is not a task state (one of "
                                      f"{', '.join(s.value for s in TaskState)})")
        terms = []
        if failed:
            terms.append("state eq 'completed' and result eq 'failure'")
        elif state:
            terms.append(f"state eq '{state}'")
        views: list[TaskView] = []
        continuation = None
        while limit is None or len(views) < limit:
            want = PAGE_MAX if limit is None else min(PAGE_MAX, limit - len(views))
            page = self.query_tasks(job_id, filter=" and ".join(terms) or None,
                                    max_results=want, continuation=continuation)
            views += [TaskView.from_dict(item) for item in page.items]
            continuation = page.continuation
            if not continuation:
                break
        return views[:limit] if limit is not None else views

    def task_attempts(self, job_id: str, task_id: str) -> list[AttemptView]:
        return [AttemptView.from_dict(a) for a in
                self._get(f"{self._task_path(job_id, task_id)}/attempts")["items"]]

    def terminate_task(self, job_id: str, task_id: str) -> None:
        self._post(f"{self._task_path(job_id, task_id)}/terminate")

    def reactivate_task(self, job_id: str, task_id: str) -> TaskView:
        return TaskView.from_dict(self._post(f"{self._task_path(job_id, task_id)}/reactivate"))

    def delete_task(self, job_id: str, task_id: str) -> None:
        self._json("DELETE", self._task_path(job_id, task_id))

    # ---- task files ------------------------------------------------------

    def _file_path(self, job_id: str, task_id: str, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise ValidationError("file", f"{name!r} is not a file of a task directory "
                                  "(such as stdout.txt)")
        # '.' and '..' segments are sent as they are written (percent-encoded, so no
        # URL normalisation resolves them here): the service refuses them, as the
        # embedded one does
        parts = [p.replace(".", "%2E") if p in (".", "..") else urllib.parse.quote(p, safe="")
                 for p in name.split("/")]
        return f"{self._task_path(job_id, task_id)}/files/{'/'.join(parts)}"

    def list_task_files(self, job_id: str, task_id: str, *,
                        node: str | None = None) -> list[FileView]:
        return [FileView.from_dict(f) for f in
                self._get(f"{self._task_path(job_id, task_id)}/files", node=node)["items"]]

    def read_task_file(self, job_id: str, task_id: str, name: str, *, offset: int = 0,
                       length: int | None = None, node: str | None = None) -> bytes:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValidationError("offset", f"{offset!r} must be a whole number >= 0")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                                   or length < 0):
            raise ValidationError("length", f"{length!r} must be a whole number >= 0")
        if length == 0:
            self.get_task(job_id, task_id)  # the task must exist all the same
            return b""
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        try:
            response = self._send("GET", self._file_path(job_id, task_id, name),
                                  headers=headers, timeout=self._bulk_timeout(),
                                  **({"params": {"node": node}} if node is not None else {}))
        except HpcBatchError as exc:
            if getattr(exc, "status", None) == 416:  # from beyond its end: nothing
                return b""
            raise
        data = response.content
        if response.status_code == 200 and (offset or length is not None):
            data = data[offset:] if length is None else data[offset:offset + length]
        return data

    def follow_task_file(self, job_id: str, task_id: str, name: str, *, offset: int = 0,
                         node: str | None = None, **_: Any) -> Iterator[bytes]:
        """One streamed request that gives the file's bytes as they are written and ends
        once the task has completed (its last bytes included)."""
        import httpx
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self._send("GET", self._file_path(job_id, task_id, name), stream=True,
                              params={"follow": "true", **({"node": node} if node else {})},
                              headers=headers,
                              timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S))
        try:
            skip = offset if response.status_code == 200 else 0
            try:
                for chunk in response.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if chunk:
                        yield chunk
            except httpx.TransportError as exc:
                raise HpcBatchError(f"the hpcbatch service at {self.url} broke off the "
                                    f"stream of {name} of task {job_id}/{task_id} "
                                    f"({type(exc).__name__}: {exc})") from None
        finally:
            response.close()
        # the stream ends with the task, or when the service stops: say which
        if self.get_task(job_id, task_id).state != "completed":
            raise HpcBatchError(f"the hpcbatch service at {self.url} ended the stream of "
                                f"{name} of task {job_id}/{task_id} before the task "
                                "completed (is it stopping?); follow it again")

    # ---- changes ---------------------------------------------------------

    def change_counter(self) -> int:
        return int(self._get("/v1/changes", after=0, timeout=0)["counter"])

    def wait_for_change(self, after: int, timeout_s: float) -> int:
        import httpx
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            left = max(0.0, deadline - time.monotonic())
            hold = min(left, FEED_MAX_S)
            data = self._json("GET", "/v1/changes",
                              params={"after": after, "timeout": round(hold, 3)},
                              timeout=httpx.Timeout(hold + REQUEST_TIMEOUT_S,
                                                    connect=CONNECT_TIMEOUT_S))
            counter = int(data["counter"])
            if counter > after or deadline - time.monotonic() <= 0:
                return counter

    # ---- kernel runs -----------------------------------------------------

    def start_run(self, kernel: str | None, *, ranks: int | None = None,
                  params: Mapping[str, Any] | list[str] | None = None,
                  pool: str = LOCAL_POOL, nodes: int | None = None,
                  ranks_per_node: int = 1, oversubscribe: bool = False,
                  timeout_s: float | None = None, retries: int = 0,
                  compress: bool = False, function: str | None = None) -> RunView:
        """``params``: name: value, or NAME=VALUE words (as the CLI takes them: the
        service reads them by the kernel's parameter types). ``function``: an uploaded
        packed function's SHA-256 instead of a kernel."""
        if isinstance(params, Mapping):
            params = dict(params)
        body = {"kernel": kernel, "ranks": ranks, "params": params, "pool": pool,
                "nodes": nodes, "ranks_per_node": ranks_per_node,
                "oversubscribe": oversubscribe, "timeout_s": timeout_s, "retries": retries,
                "compress": compress}
        if function is not None:
            body["function"] = function
        return RunView.from_dict(self._post("/v1/runs", body))

    def get_run(self, run_id: str) -> RunView:
        return RunView.from_dict(self._get(f"/v1/runs/{_seg(run_id, 'kernel run')}"))

    def list_runs(self) -> list[RunView]:
        return [RunView.from_dict(r) for r in self._get("/v1/runs")]

    def read_run_result(self, run_id: str) -> bytes:
        return self._send("GET", f"/v1/runs/{_seg(run_id, 'kernel run')}/result",
                          timeout=self._bulk_timeout()).content

    def save_run_result(self, run_id: str, path: str | os.PathLike) -> Path:
        """The run's result file streamed into ``path`` (written whole, then renamed)."""
        dest = Path(path).expanduser().resolve()
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        response = self._send("GET", f"/v1/runs/{_seg(run_id, 'kernel run')}/result",
                              stream=True, timeout=self._bulk_timeout())
        try:
            with open(tmp, "wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
            os.replace(tmp, dest)
        finally:
            response.close()
            tmp.unlink(missing_ok=True)
        return dest

    # ---- files a client sends ---------------------------------------------

    def upload(self, name: str, chunks: Iterable[bytes], sha256: str) -> str:
        out = self._json("PUT", f"/v1/uploads/{_seg(sha256, 'upload')}",
                         params={"name": name}, content=iter(chunks),
                         headers={"Content-Type": "application/octet-stream"},
                         timeout=self._bulk_timeout())
        return str(out["path"])

    # ---- application packages (hpcbatch.apps) ----------------------------

    def upload_app(self, name: str, version: str, archive: str | os.PathLike, *,
                   default: bool = False) -> Any:
        """The archive streamed to PUT /v1/uploads, then kept by POST /v1/apps."""
        from hpcbatch.apps import AppView, check_name, check_version
        check_name("name", name)
        check_version("version", version)
        path = Path(archive).expanduser().absolute()
        if not path.is_file():
            raise ValidationError("archive", f"{path} is not a file on this machine")
        there = self._upload_file(str(path))
        return AppView(**self._post("/v1/apps", {"name": name, "version": version,
                                                 "source": there, "default": bool(default)},
                                    timeout=self._bulk_timeout()))

    def list_apps(self, name: str | None = None) -> list[Any]:
        from hpcbatch.apps import AppView
        return [AppView(**d) for d in self._get("/v1/apps", name=name)["items"]]

    def delete_app(self, name: str, version: str | None = None) -> list[str]:
        params = {"version": version} if version is not None else None
        return list(self._json("DELETE", f"/v1/apps/{_seg(name, 'application')}",
                               params=params)["deleted"])

    def set_default_app(self, name: str, version: str) -> Any:
        from hpcbatch.apps import AppView
        return AppView(**self._post(f"/v1/apps/{_seg(name, 'application')}/default",
                                    {"version": version}))

    # ---- the service itself ---------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health``: {"status": "ok", "version": ...} (needs no key)."""
        return self._get("/health")

    def close(self) -> None:
        self._http.close()


def _as_sent(task: Any) -> Any:
    """A task refused here, sent as it was given for the service to report on."""
    if isinstance(task, TaskSpec):
        from hpcbatch.store import spec_to_dict
        return spec_to_dict(task)
    return dict(task) if isinstance(task, Mapping) else task


def _select(select: Sequence[str] | str | None) -> str | None:
    if select is None:
        return None
    if isinstance(select, str):
        return select
    return ",".join(select)


def connect(url: str | None = None, key: str | None = None, *,
            home: str | os.PathLike | None = None, **kw: Any) -> RemoteService | None:
    """A RemoteService for ``url`` (or the discovered one; None when there is none)."""
    from hpcbatch.home import default_home
    h = Path(home).expanduser() if home else default_home()
    found = None
    if url is None:
        found = discover(h)
        if found is None:
            return None
        url, found_key = found
        key = key or found_key
    elif key is None:
        key = os.environ.get(KEY_ENV) or _key_for(h, url)
    if "verify" not in kw:
        kw["verify"] = _cafile_for(h, url) or True
    service = RemoteService(url, key, **kw)
    if found is not None and not os.environ.get(URL_ENV, "").strip():
        service.found_in = f"{h / 'service.json'}, left by 'hpcbatch serve' (pid alive)"
    return service


__all__ = ["RemoteService", "connect", "discover", "error_from", "service_record"]
