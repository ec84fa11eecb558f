"""`hpcbatch serve` as a real process, spoken to over real HTTP (httpx).

* keys: no key or a wrong one is a 401 on every route of the OpenAPI document but
  /health; keys.json holds hashes only (0600); a read-only key gets 403 on writes;
  a revoked key is refused at once; `keys list` never shows a key
* errors are {code, message, target} with 400/404/409/413/422, never a 5xx for input
* a job of tasks added in one collection (some refused, each reported) runs to the end,
  followed on the change feed (long-poll and server-sent events)
* task files: Range (206, Content-Range, 416), a follow stream of a task that writes over
  time, and paths that escape the task directory ('..', absolute, a symlink to
  /etc/passwd) read nothing
* a filter with SQL in it is a 400 and changes nothing
* SIGTERM: exit 0, service.json and service.key gone, running tasks requeued by the next
  start, which resumes the job; a second serve on a running home and bad flags: exit 2
* TLS: https with the certificate recorded in service.json; a non-loopback bind without
  TLS warns

Every server is stopped by its fixture (terminate, wait, kill), whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import gate, poll, run_cli, snapshot, wait_for_service

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

START_TIMEOUT_S = 60.0
KEY_TEXT = re.compile(rb"hpcb_[0-9a-f]{8}_[A-Za-z0-9_-]{20,100}")


class Served:
    """One `hpcbatch serve` process on a home, with an httpx client holding its key."""

    def __init__(self, home: Path, logs: Path, *args: str, wait: bool = True):
        self.home = home
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("serve-*.out")))
        self.out_path, self.err_path = logs / f"serve-{n}.out", logs / f"serve-{n}.err"
        env = dict(os.environ, HPCBATCH_HOME=str(home))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpcbatch.cli", "serve", "--home", str(home),
                 "--bind", "127.0.0.1:0", *args], stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=env)
        self.client: httpx.Client | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        record, self.key = wait_for_service(self.home, self.proc, self.stderr,
                                            START_TIMEOUT_S)
        self.record = record
        self.url = record["url"]
        verify = ssl.create_default_context(cafile=record["cafile"]) if record.get("cafile") \
            else True
        self.client = httpx.Client(base_url=self.url, timeout=30, verify=verify,
                                   headers={"Authorization": f"Bearer {self.key}"})
        poll(lambda: self._health(), timeout_s=START_TIMEOUT_S, what="/health")

    def _health(self) -> bool:
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def stdout(self) -> bytes:
        return self.out_path.read_bytes()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")[-4000:]

    def first_key(self) -> str:
        m = KEY_TEXT.search(self.stdout())
        assert m, self.stdout()
        return m.group().decode()

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def serve(tmp_path):
    """serve(home=None, *args) -> Served; every one stopped after the test."""
    made: list[Served] = []

    def start(home: Path | None = None, *args: str, wait: bool = True) -> Served:
        s = Served(home or tmp_path / "hpc home", tmp_path / "logs", *args, wait=wait)
        made.append(s)
        return s
    try:
        yield start
    finally:
        for s in reversed(made):
            s.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests that only talk to it (a small body limit, for 413)."""
    base = tmp_path_factory.mktemp("served")
    s = Served(base / "hpc home", base / "logs", "--max-body-bytes", "2000000")
    try:
        yield s
    finally:
        s.stop()


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def wait_done(c: httpx.Client, job: str, timeout_s: float = 60) -> dict:
    """Follow the long-poll feed until every task of the job has completed."""
    deadline = time.monotonic() + timeout_s
    counter = 0
    while time.monotonic() < deadline:
        counts = c.get(f"/v1/jobs/{job}/taskcounts").json()
        if counts["total"] and counts["completed"] == counts["total"]:
            return counts
        r = c.get("/v1/changes", params={"after": counter, "timeout": 5})
        assert r.status_code == 200, r.text
        counter = r.json()["counter"]
    raise AssertionError(f"job {job} not done within {timeout_s} s: {counts}")


_DOCS: dict[str, dict] = {}


def conforms(c: httpx.Client, template: str, r: httpx.Response, method: str = "get") -> dict:
    """The JSON body of ``r`` is what the served OpenAPI document says for the route."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    doc = _DOCS.get(str(c.base_url)) or _DOCS.setdefault(str(c.base_url),
                                                         c.get("/openapi.json").json())
    content = doc["paths"][template][method]["responses"][str(r.status_code)]["content"]
    schema = {**content["application/json"]["schema"], "components": doc["components"]}
    jsonschema_rs.Draft202012Validator(schema).validate(r.json())
    return r.json()


def is_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"code", "message", "target"}, body
    assert "\n" not in body["message"]
    if code is not None:
        assert body["code"] == code, body
    return body


# ---------------------------------------------------------------- keys and auth

def test_every_route_but_health_needs_a_valid_key(shared):
    c = shared.client
    doc = c.get("/openapi.json").json()
    anon = httpx.Client(base_url=shared.url, timeout=30)
    wrong = "hpcb_" + shared.key.split("_")[1] + "_" + "A" * 43  # a real id, a wrong secret
    routes = [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]
    assert len(routes) >= 30
    try:
        for method, path in routes + [("GET", "/openapi.json"), ("GET", "/v1/nope")]:
            for headers in ({}, {"Authorization": f"Bearer {wrong}"},
                            {"Authorization": "Bearer nonsense"},
                            {"Authorization": f"Basic {shared.key}"}):
                r = anon.request(method, concrete(path), headers=headers)
                if path == "/health":
                    assert r.status_code == 200
                    continue
                is_error(r, 401, "Unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
    finally:
        anon.close()
    log = shared.stderr()
    assert "key=-" in log and shared.key not in log and wrong not in log


def test_a_request_path_cannot_forge_a_log_line(shared):
    anon = httpx.Client(base_url=shared.url, timeout=30)
    try:  # no key needed to be logged: a newline in the decoded path
        r = anon.get("/v1/x%0A2026-01-01%2000:00:00%20INFO%20forged%20-%3E%20200%00")
        assert r.status_code == 401
    finally:
        anon.close()
    poll(lambda: "forged" in shared.stderr(), what="the request logged")
    lines = shared.stderr().splitlines()
    assert not [ln for ln in lines if ln.startswith("2026-01-01")]
    assert "\0" not in shared.stderr()
    assert any("/v1/x\\x0a2026-01-01" in ln for ln in lines)


def test_keys_are_stored_hashed_read_only_keys_only_read_and_revoked_keys_fail(shared):
    home, c = shared.home, shared.client
    first = shared.first_key()
    made = run_cli(home, "keys", "create", "--name", "viewer", "--read-only")
    assert made.returncode == 0, made.stderr
    viewer = made.stdout.strip()
    assert KEY_TEXT.fullmatch(viewer.encode())
    text = (home / "keys.json").read_text()
    for k in (first, viewer, shared.key):
        assert k not in text and k.split("_", 2)[2] not in text
    entries = json.loads(text)
    assert {e["name"] for e in entries} == {"default", "viewer"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", e["hash"]) for e in entries)
    for name in ("keys.json", "service.json", "service.key"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    listed = run_cli(home, "keys", "list")
    assert listed.returncode == 0 and "viewer" in listed.stdout and viewer not in listed.stdout

    with httpx.Client(base_url=shared.url, timeout=30,
                      headers={"Authorization": f"Bearer {viewer}"}) as v:
        assert v.get("/v1/pools").status_code == 200  # a new key works at once
        is_error(v.post("/v1/jobs", json={"id": "by-viewer"}), 403, "Forbidden")
        is_error(v.delete("/v1/pools/local"), 403, "Forbidden")
        is_error(c.get("/v1/jobs/by-viewer"), 404, "NotFound")
        with httpx.Client(base_url=shared.url, timeout=30,
                          headers={"Authorization": f"Bearer {first}"}) as admin:
            assert admin.get("/v1/pools").status_code == 200
        key_id = viewer.split("_")[1]
        gone = run_cli(home, "keys", "revoke", key_id)
        assert gone.returncode == 0, gone.stderr
        is_error(v.get("/v1/pools"), 401, "Unauthorized")
    again = run_cli(home, "keys", "revoke", key_id)
    assert again.returncode == 2 and again.stderr.startswith("error: no key")
    assert len(again.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- errors

def test_errors_are_one_shape_and_never_a_5xx_for_bad_input(shared):
    c = shared.client
    assert is_error(c.get("/v1/jobs/no-such-job"), 404, "NotFound")["message"]
    is_error(c.get("/v1/no/such/route"), 404, "NotFound")
    bad = is_error(c.post("/v1/jobs", json={"id": "bad id!"}), 400, "ValidationError")
    assert bad["target"] == "job.id"
    assert c.post("/v1/jobs", json={"id": "errs"}).status_code == 201
    is_error(c.post("/v1/jobs", json={"id": "errs"}), 409, "Conflict")
    is_error(c.post("/v1/jobs", content=b"{not json", headers={
        "Content-Type": "application/json"}), 422, "InvalidBody")
    wrong = is_error(c.post("/v1/jobs", json={"id": "j", "priority": "high"}), 422,
                     "InvalidBody")
    assert wrong["target"] == "priority"
    is_error(c.post("/v1/jobs", json={"id": "j", "surprise": 1}), 422, "InvalidBody")
    is_error(c.get("/v1/changes", params={"timeout": 61}), 422, "InvalidBody")
    is_error(c.get("/v1/jobs/errs/tasks", params={"maxresults": 0}), 422, "InvalidBody")
    for body in (b"[]", b'{"tasks": 5}', b'{"tasks": [], "atomic": "yes"}', b"\xff\xfe"):
        is_error(c.post("/v1/jobs/errs/addtaskcollection", content=body), 422, "InvalidBody")
    is_error(c.post("/v1/submit", content=b'{"job": {"id": 3}, "tasks": []}'), 422)
    is_error(c.post("/v1/pools", json={"id": "p", "options": {"pool_id": "x"}}), 400,
             "ValidationError")
    is_error(c.post("/v1/pools", json={"id": "p", "provider": "ssh",
                                       "options": {"no_such_option": 1}}), 400)
    big = {"tasks": [{"id": f"t{i}", "command_line": "x" * 1000} for i in range(3000)]}
    is_error(c.post("/v1/jobs/errs/addtaskcollection", json=big), 413, "PayloadTooLarge")

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"tasks": ['
        for i in range(3000):
            yield json.dumps({"id": f"c{i}", "command_line": "y" * 1000}).encode() + b","
        yield b'{"id": "end", "command_line": "true"}]}'
    is_error(c.post("/v1/jobs/errs/addtaskcollection", content=chunked()), 413,
             "PayloadTooLarge")
    r = c.put("/v1/jobs/errs")
    is_error(r, 405, "MethodNotAllowed")
    assert "GET" in r.headers["allow"]
    assert c.get("/v1/jobs/errs/taskcounts").json()["total"] == 0  # nothing got in


def test_the_openapi_document_describes_every_route_and_error(shared):
    doc = shared.client.get("/openapi.json").json()
    want = {
        ("get", "/health"), ("get", "/v1/changes"), ("get", "/v1/events"),
        ("post", "/v1/pools"), ("get", "/v1/pools"), ("get", "/v1/pools/{pool_id}"),
        ("delete", "/v1/pools/{pool_id}"), ("post", "/v1/pools/{pool_id}/resize"),
        ("get", "/v1/pools/{pool_id}/nodes"),
        ("post", "/v1/pools/{pool_id}/nodes/{node_id}/disablescheduling"),
        ("post", "/v1/pools/{pool_id}/nodes/{node_id}/enablescheduling"),
        ("delete", "/v1/pools/{pool_id}/nodes/{node_id}"), ("post", "/v1/jobs"),
        ("get", "/v1/jobs"), ("get", "/v1/jobs/{job_id}"),
        ("post", "/v1/jobs/{job_id}/terminate"), ("delete", "/v1/jobs/{job_id}"),
        ("get", "/v1/jobs/{job_id}/taskcounts"), ("post", "/v1/submit"),
        ("post", "/v1/jobs/{job_id}/tasks"), ("post", "/v1/jobs/{job_id}/addtaskcollection"),
        ("get", "/v1/jobs/{job_id}/tasks"), ("get", "/v1/jobs/{job_id}/tasks/{task_id}"),
        ("get", "/v1/jobs/{job_id}/tasks/{task_id}/attempts"),
        ("post", "/v1/jobs/{job_id}/tasks/{task_id}/terminate"),
        ("post", "/v1/jobs/{job_id}/tasks/{task_id}/reactivate"),
        ("delete", "/v1/jobs/{job_id}/tasks/{task_id}"),
        ("get", "/v1/jobs/{job_id}/tasks/{task_id}/files"),
        ("get", "/v1/jobs/{job_id}/tasks/{task_id}/files/{path}"), ("post", "/v1/runs"),
        ("get", "/v1/runs/{run_id}"), ("get", "/v1/runs/{run_id}/result"),
        ("put", "/v1/uploads/{sha256}")}
    have = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert want <= have, want - have
    schemas = doc["components"]["schemas"]
    for name in ("TaskCollectionIn", "SubmitIn", "TaskIn", "ErrorOut", "PoolView", "TaskView"):
        assert name in schemas, name
    for method, path in want - {("get", "/health")}:
        op = doc["paths"][path][method]
        assert op["security"] == [{"bearer": []}]
        for status in ("400", "401", "403", "404", "409", "413", "422", "507"):
            assert status in op["responses"], (method, path, status)
    body = doc["paths"]["/v1/jobs/{job_id}/addtaskcollection"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("TaskCollectionIn")


# ---------------------------------------------------------------- a job, files, feeds

def test_a_collection_runs_to_the_end_and_its_files_are_read_with_ranges(shared):
    c = shared.client
    assert c.post("/v1/jobs", json={"id": "coll"}).status_code == 201
    tasks = [{"id": f"t{i}", "command_line": f"printf 'out of task {i}'"} for i in range(40)]
    tasks[5] = {"id": "bad id", "command_line": "true"}
    tasks[9] = {"id": "t9", "command_line": "true", "surprise": 1}
    tasks.append({"id": "t1", "command_line": "true"})  # a duplicate
    r = c.post("/v1/jobs/coll/addtaskcollection", json={"tasks": tasks})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["added"] == 38
    assert [e["index"] for e in result["errors"]] == [5, 9, 40]
    assert all(e["message"] and e["code"] == "ValidationError" for e in result["errors"])
    counts = wait_done(c, "coll")
    assert counts["total"] == 38 and counts["succeeded"] == 38

    job = c.get("/v1/jobs/coll").json()
    assert job["counts"]["completed"] == 38
    path = "/v1/jobs/coll/tasks/t3/files/stdout.txt"
    assert c.get(path).content == b"out of task 3"
    r = c.get(path, headers={"Range": "bytes=4-5"})
    assert r.status_code == 206 and r.content == b"of"
    assert r.headers["content-range"] == "bytes 4-5/13"
    r = c.get(path, headers={"Range": "bytes=-6"})
    assert r.status_code == 206 and r.content == b"task 3"
    r = c.get(path, headers={"Range": "bytes=7-"})
    assert r.status_code == 206 and r.content == b"task 3"
    r = c.get(path, headers={"Range": "bytes=5-1000"})
    assert r.status_code == 206 and r.headers["content-range"] == "bytes 5-12/13"
    r = c.get(path, headers={"Range": "bytes=13-"})
    is_error(r, 416, "RangeNotSatisfiable")
    assert r.headers["content-range"] == "bytes */13"
    assert c.get(path, headers={"Range": "bytes=0-1,4-5"}).status_code == 200  # ignored
    files = {f["name"]: f for f in c.get("/v1/jobs/coll/tasks/t3/files").json()["items"]}
    assert files["stdout.txt"]["size"] == 13
    attempts = c.get("/v1/jobs/coll/tasks/t3/attempts").json()["items"]
    assert [a["outcome"] for a in attempts] == ["success"]
    # what a job that ran answers is what the document says (the fuzzer's home ran none)
    for template, path in (
            ("/v1/jobs/{job_id}", "/v1/jobs/coll"), ("/v1/jobs", "/v1/jobs"),
            ("/v1/jobs/{job_id}/taskcounts", "/v1/jobs/coll/taskcounts"),
            ("/v1/jobs/{job_id}/tasks", "/v1/jobs/coll/tasks"),
            ("/v1/jobs/{job_id}/tasks/{task_id}", "/v1/jobs/coll/tasks/t3"),
            ("/v1/jobs/{job_id}/tasks/{task_id}/attempts", "/v1/jobs/coll/tasks/t3/attempts"),
            ("/v1/jobs/{job_id}/tasks/{task_id}/files", "/v1/jobs/coll/tasks/t3/files"),
            ("/v1/pools", "/v1/pools"), ("/v1/pools/{pool_id}", "/v1/pools/local"),
            ("/v1/pools/{pool_id}/nodes", "/v1/pools/local/nodes")):
        conforms(c, template, c.get(path))


def test_follow_streams_a_task_that_writes_over_time(shared, tmp_path):
    c = shared.client
    opened = tmp_path / "gate"
    cmd = f"echo first; {gate(opened)}; echo second"
    assert c.post("/v1/jobs", json={"id": "follow"}).status_code == 201
    assert c.post("/v1/jobs/follow/tasks",
                  json={"id": "talk", "command_line": cmd}).status_code == 201
    got = b""
    with c.stream("GET", "/v1/jobs/follow/tasks/talk/files/stdout.txt",
                  params={"follow": "true"}, timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        while b"first\n" not in got:
            got += next(chunks)
        poll(lambda: c.get("/v1/jobs/follow/tasks/talk").json()["state"] == "running",
             what="talk running")
        opened.touch()
        for chunk in chunks:  # ends when the task has completed
            got += chunk
    assert got == b"first\nsecond\n"
    assert c.get("/v1/jobs/follow/tasks/talk").json()["state"] == "completed"
    r = c.get("/v1/jobs/follow/tasks/talk/files/stdout.txt", params={"follow": "true"},
              headers={"Range": "bytes=3-"})  # from byte 3 of a task that has ended
    assert r.status_code == 206 and r.content == b"st\nsecond\n"


def test_paths_out_of_the_task_directory_read_nothing(shared):
    c = shared.client
    assert c.post("/v1/jobs", json={"id": "escape"}).status_code == 201
    cmd = ("ln -s /etc/passwd leak; ln -s /etc passwd-dir; ln -s /etc/passwd ../up; "
           "mkdir sub; echo inside > sub/ok")
    assert c.post("/v1/jobs/escape/tasks",
                  json={"id": "t", "command_line": cmd}).status_code == 201
    wait_done(c, "escape")
    task = c.get("/v1/jobs/escape/tasks/t").json()
    assert task["result"] == "success", task
    base = "/v1/jobs/escape/tasks/t/files/"
    assert c.get(base + "wd/sub/ok").content == b"inside\n"
    passwd = Path("/etc/passwd").read_bytes()[:16]
    for name in ("..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "wd%2F..%2F..%2F..%2Fx",
                 "wd/leak", "wd/passwd-dir/passwd", "up", "wd/%2E%2E/%2E%2E/up", "%00"):
        for params, headers in (({}, {}), ({}, {"Range": "bytes=0-10"}),
                                ({"follow": "true"}, {})):
            r = c.get(base + name, params=params, headers=headers, timeout=30)
            assert r.status_code in (400, 404), (name, params, r.status_code, r.text)
            assert passwd not in r.content and b"root:" not in r.content
    listing = c.get("/v1/jobs/escape/tasks/t/files").json()["items"]
    assert b"root:" not in json.dumps(listing).encode()


def test_the_change_feed_long_polls_and_streams_events(shared):
    c = shared.client
    now = c.get("/v1/changes", params={"after": 0, "timeout": 0}).json()["counter"]
    t0 = time.monotonic()
    assert c.get("/v1/changes", params={"after": now, "timeout": 0.5}).json() == \
        {"counter": now}
    assert time.monotonic() - t0 >= 0.4
    assert c.post("/v1/jobs", json={"id": "feed"}).status_code == 201
    assert c.get("/v1/changes", params={"after": now, "timeout": 30}).json()["counter"] > now
    is_error(c.get("/v1/events", params={"job_id": "no-such-job"}), 404, "NotFound")
    events = []
    with c.stream("GET", "/v1/events", params={"job_id": "feed"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    assert c.post("/v1/jobs/feed/tasks", json={
                        "id": "t", "command_line": "true"}).status_code == 201
                if events[-1]["counts"]["completed"] == 1:
                    break
    assert events[0]["counts"]["total"] == 0
    assert events[-1]["counts"]["succeeded"] == 1
    assert [e["counter"] for e in events] == sorted({e["counter"] for e in events})


def test_a_filter_with_sql_is_refused_and_changes_nothing(shared):
    c = shared.client
    assert c.post("/v1/jobs", json={"id": "sql"}).status_code == 201
    assert c.post("/v1/jobs/sql/tasks", json={"id": "t", "command_line": "true"}
                  ).status_code == 201
    wait_done(c, "sql")
    before = snapshot(shared.home)
    for f in ("state eq 'completed'; DROP TABLE tasks", "1=1 OR 1=1",
              "id eq 'x' UNION SELECT * FROM keys", "state eq 'a' -- ",
              "id eq ''); DELETE FROM tasks; --"):
        for path in ("/v1/jobs/sql/tasks", "/v1/jobs"):
            body = is_error(c.get(path, params={"filter": f}), 400, "ValidationError")
            assert body["message"]
    assert snapshot(shared.home) == before
    page = c.get("/v1/jobs/sql/tasks", params={"filter": "state eq 'completed'",
                                                "select": "id,state"}).json()
    assert page["items"] == [{"id": "t", "state": "completed"}]


# ---------------------------------------------------------------- the process

def test_sigterm_stops_cleanly_and_a_restart_resumes_every_job(serve, tmp_path):
    s = serve()
    c = s.client
    opened = tmp_path / "gate"
    marks = tmp_path / "marks"
    marks.mkdir()
    cmd = (f'echo x >> {marks}/"$HPCBATCH_TASK_ID"; {gate(opened)}')
    r = c.post("/v1/submit", json={"job": {"id": "long"}, "tasks": [
        {"id": f"t{i}", "command_line": cmd} for i in range(6)]})
    assert r.status_code == 200 and r.json() == {"added": 6}, r.text
    poll(lambda: c.get("/v1/jobs/long/taskcounts").json()["running"] >= 1, timeout_s=60,
         what="a task running")
    ended: list[float] = []

    def long_poll() -> None:  # open across the SIGTERM: it must not hold the stop up
        with httpx.Client(base_url=s.url, headers=c.headers, timeout=90) as other, \
                contextlib.suppress(httpx.HTTPError):
            other.get("/v1/changes", params={"after": 10**9, "timeout": 60})
        ended.append(time.monotonic())
    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)  # (not a gate: the poll is open, or it fails the same way below)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit(60) == 0, s.stderr()
    poller.join(30)
    assert ended and ended[0] - t0 < 20, "the long-poll held the stop up"
    assert not (s.home / "service.json").exists()
    assert not (s.home / "service.key").exists()
    ran_before = {p.name for p in marks.iterdir()}
    assert ran_before

    s2 = serve(s.home)
    assert not KEY_TEXT.search(s2.stdout())  # the home has a key: no new one
    opened.touch()
    counts = wait_done(s2.client, "long", timeout_s=120)
    assert counts["succeeded"] == 6 and counts["requeues"] >= len(ran_before), counts
    for p in marks.iterdir():  # the ones cut off ran again, the others once
        runs = p.read_text().count("x")
        assert runs == (2 if p.name in ran_before else 1), (p.name, runs)


def test_a_second_serve_on_a_running_home_and_bad_flags_exit_2(serve, tmp_path):
    s = serve(None, "--store-only")
    r = run_cli(s.home, "serve", "--home", str(s.home), "--bind", "127.0.0.1:0")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: a service is already running on")
    assert str(s.proc.pid) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other = tmp_path / "other"
    for args, says in ((["--bind", "nonsense"], "--bind"),
                       (["--bind", "127.0.0.1:99999"], "--bind"),
                       (["--tls-cert", str(tmp_path / "none.pem")], "--tls-cert"),
                       (["--tls-key", __file__], "--tls-cert"),
                       (["--tls-cert", __file__, "--tls-key", __file__], "--tls-cert"),
                       (["--bind", s.url.split("//")[1]], "cannot listen"),
                       (["--no-such-flag"], "no-such-flag")):
        r = run_cli(other, "serve", "--home", str(other), *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], \
            (args, r.stderr)
    assert not (other / "service.json").exists()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_serves_https_and_a_public_bind_without_it_warns(serve, tmp_path):
    cert, key = _self_signed(tmp_path)
    s = serve(tmp_path / "tls home", "--store-only", "--tls-cert", str(cert), "--tls-key",
              str(key))
    assert s.url.startswith("https://127.0.0.1:") and s.record["tls"] is True
    assert s.record["cafile"] == str(cert)
    assert s.client.get("/v1/pools").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=10)  # an unknown certificate is refused
    assert "warning" not in s.stderr()
    s.stop()

    public = serve(tmp_path / "public home", "--store-only", "--bind", "0.0.0.0:0")
    assert "without TLS" in public.stderr() and "clear text" in public.stderr()


def test_each_error_kind_has_its_status_and_code():
    """The app alone (in this process, over ASGI) on a service whose every answer is an
    error of one kind: the status and code each kind maps to."""
    import asyncio
    import errno
    import sqlite3

    from hpcbatch.errors import (
        Conflict,
        CoordinatorBusy,
        HpcBatchError,
        NotFound,
        StorageFull,
        ValidationError,
    )
    from hpcbatch.server.app import create_app
    from hpcbatch.server.auth import KeyRing

    class Failing:
        def __init__(self):
            self.exc: BaseException = RuntimeError()

        def get_pool(self, pool_id):
            raise self.exc

    service, ring = Failing(), KeyRing(None)
    key = ring.add_session_key()
    app = create_app(service, ring)
    cases = [(ValidationError("pool.id", "bad"), 400, "ValidationError", "pool.id"),
             (NotFound("no pool"), 404, "NotFound", None),
             (Conflict("clash"), 409, "Conflict", None),
             (CoordinatorBusy("busy"), 409, "CoordinatorBusy", None),
             (HpcBatchError("other"), 409, "HpcBatchError", None),
             (StorageFull("full"), 507, "StorageFull", None),
             (OSError(errno.ENOSPC, "No space left on device"), 507, "StorageFull", None),
             (sqlite3.OperationalError("database is locked"), 409, "CoordinatorBusy", None),
             (RuntimeError("a bug"), 500, "InternalError", None)]

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", headers={
                "Authorization": f"Bearer {key}"}) as c:
            for exc, status, code, target in cases:
                service.exc = exc
                body = is_error(await c.get("/v1/pools/p"), status, code)
                assert body["target"] == target and body["message"], body
    asyncio.run(go())
