"""One module, two backends: every test here runs against the embedded ``Batch()`` and
against ``Batch(url=..., key=...)`` talking to a real ``hpcbatch serve`` process over
real HTTP (started per test on its own home, found through the ``service.json`` it
writes and its ``/health``; stopped with SIGTERM afterwards).

* an SSH pool on the test cluster, a job, 10,000 tasks added in one request, the change
  feed followed to the job's end, a task's stdout read through the files API
* errors are the same classes (ValidationError with the same ``.field``, NotFound,
  Conflict, HpcBatchError, TimeoutError) with the same one-line messages as an
  embedded service on a reference home gives, and a refused request stores nothing
* listing and paging (continuation tokens, filters, select), views as return types
* terminate a running task; ``Job.wait(progress=True)``; following a running task's
  stdout as it is written
* resource files named on the client reach the task (uploaded once per content to a
  remote service)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import httpx
import pytest
from helpers import FAST_TIMINGS, gate, poll, run_cli, wait_for_service

import hpcbatch
from hpcbatch.errors import Conflict, HpcBatchError, NotFound, ValidationError
from hpcbatch.service import LocalService
from hpcbatch.views import AttemptView, FileView, JobView, NodeView, PoolView, TaskView

SERVE_START_S = 90.0  # a busy 2-core machine imports the web stack slowly
SERVE_STOP_S = 30.0


# ---------------------------------------------------------------- a real service

@dataclasses.dataclass
class Served:
    url: str
    key: str
    home: Path
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# the service's coordinator runs on the clocks of the embedded backend
FAST_ARGS = tuple(a for name, secs in FAST_TIMINGS.items()
                  for a in ("--timing", f"{name}={secs}"))


def _healthy(url: str) -> bool:
    try:
        r = httpx.get(f"{url}/health", timeout=5)
        return r.status_code == 200 and r.json().get("status") == "ok"
    except (ValueError, httpx.HTTPError):
        return False


@contextlib.contextmanager
def running_service(home: Path, *, env: dict[str, str] | None = None,
                    args: tuple[str, ...] = FAST_ARGS) -> Iterator[Served]:
    """``hpcbatch serve`` on ``home`` (a real process on a free loopback port: it says
    which in service.json), ready: service.json written and /health answering. SIGTERM
    at the end (SIGKILL if it does not stop within SERVE_STOP_S, and the test fails)."""
    log = home.parent / f"serve-{time.time_ns()}.log"
    home.parent.mkdir(parents=True, exist_ok=True)
    penv = dict(os.environ, HPCBATCH_HOME=str(home), **(env or {}))
    penv.pop("HPCBATCH_URL", None)
    penv.pop("HPCBATCH_KEY", None)
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "hpcbatch.cli", "--home", str(home), "serve", "--bind",
               "127.0.0.1:0", *args]
        proc = subprocess.Popen(cmd, env=penv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    served = None
    try:
        record, key = wait_for_service(home, proc,
                                       lambda: log.read_text(errors="replace")[-3000:],
                                       SERVE_START_S)
        poll(lambda: _healthy(record["url"]), timeout_s=SERVE_START_S, what="/health")
        assert record["pid"] == proc.pid, record
        assert record["url"].startswith("http://127.0.0.1:"), record
        served = Served(record["url"], key, home, proc, log)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SERVE_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"hpcbatch serve did not stop within {SERVE_STOP_S} s "
                                     "of SIGTERM") from None
    if served is not None:
        assert not (home / "service.json").exists(), "service.json left after a clean stop"
        assert not (home / "service.key").exists(), "service.key left after a clean stop"


@pytest.fixture(params=["embedded", "remote"])
def backend(request, home) -> Iterator[hpcbatch.Batch]:
    """The Batch under test: embedded on ``home`` (FAST_TIMINGS), or over HTTP to a
    ``hpcbatch serve`` on ``home``."""
    if request.param == "embedded":
        b = hpcbatch.Batch(home, **FAST_TIMINGS)
        try:
            yield b
        finally:
            b.close()
        return
    with running_service(home) as served:
        b = hpcbatch.Batch(url=served.url, key=served.key,
                           pool_grace_s=FAST_TIMINGS["pool_grace_s"])
        try:
            assert b.url == served.url and b.coordinator is None
            yield b
        finally:
            b.close()


def remote(batch: hpcbatch.Batch) -> bool:
    return batch.url is not None


# ---------------------------------------------------------------- the end-to-end case

def ssh_spec(cluster_dir: Path, tmp_path: Path) -> Path:
    spec = json.loads((cluster_dir / "pool.json").read_text())
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node roots")
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow  # 25-80 s per backend on a busy 2-core machine
def test_ssh_pool_ten_thousand_tasks_in_one_request_to_the_end(backend, ssh_cluster,
                                                              tmp_path):
    spec = ssh_spec(ssh_cluster.directory, tmp_path)
    pool = backend.pools.create("cluster", "ssh", spec=str(spec), task_slots_per_node=4,
                                inter_node_communication=False)
    assert isinstance(pool, PoolView) and pool.provider == "ssh"
    poll(lambda: sum(n.state == "idle" for n in backend.pools.nodes("cluster")) == 3,
         timeout_s=60, what="3 idle ssh nodes")
    job = backend.jobs.create("tenk", pool="cluster")
    # a generator: one request whose body is written while it is sent
    n = job.add_tasks({"id": f"t{i:05d}", "command_line": f"echo out-{i}"}
                      for i in range(10_000))
    assert n == 10_000
    service = backend.service
    counter = service.change_counter()
    wakes = 0
    deadline = time.monotonic() + 270  # (pytest's timeout is 300 s)
    counts = job.counts()
    while counts["completed"] < counts["total"]:
        assert time.monotonic() < deadline, counts
        moved = service.wait_for_change(counter, 10.0)
        assert moved >= counter
        counter, wakes = moved, wakes + 1
        counts = job.counts()
    assert counts["total"] == counts["succeeded"] == 10_000, counts
    assert wakes >= 1
    # a wait on a finished job returns at once, with the same counts
    assert job.wait(timeout_s=30, progress=True) == counts
    t = job.task("t04242")
    assert isinstance(t.view, TaskView) and t.node_id in {"node1", "node2", "node3"}
    assert t.stdout() == "out-4242\n"
    assert t.stderr() == ""
    files = {f.name: f for f in service.list_task_files("tenk", "t04242")}
    assert isinstance(files["stdout.txt"], FileView) and files["stdout.txt"].size == 9
    assert service.read_task_file("tenk", "t04242", "stdout.txt", offset=4,
                                  length=4) == b"4242"
    assert service.read_task_file("tenk", "t04242", "stdout.txt", offset=100) == b""
    assert backend.jobs.delete("tenk") == []
    assert backend.pools.delete("cluster") == []


# ---------------------------------------------------------------- errors

def _setup(service) -> None:
    service.create_job("have")


ERROR_CASES = {
    "bad job id": (ValidationError, lambda s: s.create_job("bad id!")),
    "job on a missing pool": (NotFound, lambda s: s.create_job("j2", "nopool")),
    "job twice": (Conflict, lambda s: s.create_job("have")),
    "missing job": (NotFound, lambda s: s.get_job("nope")),
    "counts of a missing job": (NotFound, lambda s: s.job_counts("nope")),
    "missing task": (NotFound, lambda s: s.get_task("have", "nope")),
    "missing pool": (NotFound, lambda s: s.get_pool("nope")),
    "nodes of a missing pool": (NotFound, lambda s: s.list_nodes("nope")),
    "empty command": (ValidationError, lambda s: s.add_tasks(
        "have", [{"id": "t", "command_line": " "}])),
    "unknown task field": (ValidationError, lambda s: s.add_tasks(
        "have", [{"id": "t", "command_line": "true", "colour": "red"}])),
    "a bad task after good ones": (ValidationError, lambda s: s.add_tasks(
        "have", [*({"id": f"ok{i}", "command_line": "true"} for i in range(50)),
                 {"id": "bad id", "command_line": "true"}])),
    "one id twice": (ValidationError, lambda s: s.add_tasks(
        "have", [{"id": "t", "command_line": "true"}] * 2)),
    "tasks of a missing job": (NotFound, lambda s: s.add_tasks(
        "nope", [{"id": "t", "command_line": "true"}])),
    "a missing resource file": (ValidationError, lambda s: s.add_tasks(
        "have", [{"id": "t", "command_line": "true", "resource_files": ["/nonexistent/x"]}])),
    "submit to a job that exists": (Conflict, lambda s: s.submit(
        hpcbatch.JobSpec("have", "local"), [{"id": "t", "command_line": "true"}],
        existing_ok=False)),
    "submit on another pool": (ValidationError, lambda s: s.submit(
        hpcbatch.JobSpec("have", "other"), [{"id": "t", "command_line": "true"}])),
    "delete the local pool": (Conflict, lambda s: s.delete_pool("local")),
    "zero slots": (ValidationError, lambda s: s.create_pool("p", task_slots_per_node=0)),
    "unknown provider": (ValidationError, lambda s: s.create_pool("p", "cloud")),
    "delete a missing job": (NotFound, lambda s: s.delete_job("nope")),
    "attempts of a missing task": (NotFound, lambda s: s.task_attempts("have", "nope")),
    "terminate a missing task": (NotFound, lambda s: s.terminate_task("have", "nope")),
    "stdout of a missing task": (NotFound, lambda s: s.read_task_file("have", "nope",
                                                                        "stdout.txt")),
}


@pytest.fixture(scope="module")
def reference_errors(tmp_path_factory) -> dict[str, BaseException]:
    """What an embedded service (no coordinator) raises for each case, on a home of its
    own: the remote backend must raise the same class, field and message."""
    service = LocalService(tmp_path_factory.mktemp("reference") / "home")
    try:
        _setup(service)
        found = {}
        for name, (_, case) in ERROR_CASES.items():
            try:
                case(service)
            except HpcBatchError as exc:
                found[name] = exc
            else:
                raise AssertionError(f"{name}: the reference service raised nothing")
        return found
    finally:
        service.close()


def _stored(batch) -> dict:
    return {j.id: (j.pool_id, j.state, dict(j.counts)) for j in batch.jobs.list(counts=True)}


def test_errors_are_the_same_kinds_with_the_same_lines(backend, reference_errors):
    _setup(backend.service)
    before = _stored(backend)
    pools = sorted(p.id for p in backend.pools.list())
    for name, (kind, case) in ERROR_CASES.items():
        with pytest.raises(HpcBatchError) as info:
            case(backend.service)
        exc, ref = info.value, reference_errors[name]
        assert type(exc) is type(ref) is kind, (name, exc, ref)
        assert str(exc) == str(ref), name
        if isinstance(ref, ValidationError):
            assert (exc.field, exc.rule) == (ref.field, ref.rule), name
    assert _stored(backend) == before  # nothing refused was stored
    assert sorted(p.id for p in backend.pools.list()) == pools


def test_a_wait_that_runs_out_is_a_timeout_error(backend, tmp_path):
    job = backend.jobs.create("slow")
    job.add_task("t", gate(tmp_path / "go"))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"job slow: 0/1 tasks completed after 0.5 s"):
        job.wait(timeout_s=0.5)
    assert time.monotonic() - t0 < 10
    (tmp_path / "go").touch()
    assert job.wait(timeout_s=60)["succeeded"] == 1


def test_a_file_outside_the_task_directory_is_refused(backend, tmp_path):
    job = backend.jobs.create("files")
    job.add_task("t", "echo inside > note.txt; echo out")  # runs in wd/
    job.wait(timeout_s=60)
    secret = tmp_path / "secret.txt"
    secret.write_text("never read\n")
    for name in ("../t/stdout.txt", "/etc/passwd", str(secret), "wd/../../t/stdout.txt"):
        with pytest.raises((ValidationError, NotFound)):
            backend.service.read_task_file("files", "t", name)
    assert backend.service.read_task_file("files", "t", "wd/note.txt") == b"inside\n"
    names = {f.name for f in backend.service.list_task_files("files", "t")}
    assert {"stdout.txt", "stderr.txt", "wd", "wd/note.txt"} <= names, names


# ---------------------------------------------------------------- listing and paging

def test_listing_and_paging(backend):
    job = backend.jobs.create("pages")
    job.add_tasks({"id": f"t{i:02d}", "command_line": f"exit {1 if i % 5 == 0 else 0}"}
                  for i in range(23))
    counts = job.wait(timeout_s=120)
    assert (counts["total"], counts["failed"]) == (23, 5)
    service = backend.service
    ids = [f"t{i:02d}" for i in range(23)]
    # list_tasks: views, in submission order, at most limit
    first = service.list_tasks("pages", limit=7)
    assert [t.id for t in first] == ids[:7] and all(isinstance(t, TaskView) for t in first)
    assert [t.id for t in service.list_tasks("pages")] == ids
    assert [t.id for t in service.list_tasks("pages", failed=True)] == ids[::5]
    assert len(service.list_tasks("pages", "completed")) == 23
    assert service.list_tasks("pages", "active") == []
    # pages of 7 with a continuation token, none seen twice
    seen, token, pages = [], None, 0
    while True:
        page = service.query_tasks("pages", max_results=7, continuation=token)
        assert len(page.items) <= 7
        seen += [item["id"] for item in page.items]
        pages += 1
        token = page.continuation
        if not token:
            break
    assert seen == ids and pages in (4, 5)
    # a filter and a select
    page = service.query_tasks("pages", filter="state eq 'completed' and exit_code ne 0",
                               select=["id", "exit_code"])
    assert [dict(item) for item in page.items] == [{"id": i, "exit_code": 1}
                                                   for i in ids[::5]]
    page = service.query_tasks("pages", filter="startswith(id,'t1')", select=["id"])
    assert [item["id"] for item in page.items] == ids[10:20]
    with pytest.raises(ValidationError):
        service.query_tasks("pages", filter="state eq 'completed'; DROP TABLE tasks")
    assert job.counts()["total"] == 23
    # jobs, pools, nodes: views
    jobs = backend.jobs.list(counts=True)
    assert all(isinstance(j, JobView) for j in jobs)
    assert {j.id: j.counts["total"] for j in jobs}["pages"] == 23
    assert all(j.counts is None for j in backend.jobs.list())
    assert "local" in {p.id for p in backend.pools.list()}
    assert all(isinstance(n, NodeView) for n in backend.pools.nodes("local"))
    attempts = job.task("t05").attempts()
    assert [a.outcome for a in attempts] == ["failure"]
    assert isinstance(attempts[0], AttemptView)


# ---------------------------------------------------------------- terminate, progress, logs

def test_terminate_a_running_task(backend):
    job = backend.jobs.create("term")
    job.add_task("long", "sleep 300")
    poll(lambda: job.task("long").state == "running", timeout_s=60, what="running")
    job.terminate_task("long")
    job.wait(timeout_s=60)
    t = job.task("long")
    assert (t.result, t.failure) == ("failure", "killed:terminate")


def test_wait_with_progress_and_a_task_followed_as_it_writes(backend, tmp_path, capsys):
    job = backend.jobs.create("follow")
    go = tmp_path / "go"
    job.add_task("t", f"echo one; {gate(go)}; echo two")
    chunks = backend.service.follow_task_file("follow", "t", "stdout.txt")
    assert next(chunks) == b"one\n"  # written while the task still runs
    poll(lambda: job.task("t").state == "running", what="t running")
    go.touch()
    assert b"".join(chunks) == b"two\n"  # and the stream ends with the task
    job.add_tasks({"id": f"p{i}", "command_line": "true"} for i in range(20))
    seen = []
    counts = backend.service.wait_job("follow", on_progress=lambda c: seen.append(dict(c)))
    assert counts["succeeded"] == 21 and seen[-1] == counts
    assert job.wait(progress=True)["total"] == 21


def test_resource_files_named_here_reach_the_task(backend, tmp_path, home):
    data = tmp_path / "input data.txt"
    data.write_text("payload\n")
    job = backend.jobs.create("files")
    job.add_tasks({"id": f"t{i}", "command_line": 'cat "input data.txt"; cat renamed.txt',
                   "resource_files": [str(data), {"source": str(data),
                                                  "file_path": "renamed.txt"}]}
                  for i in range(5))
    job.wait(timeout_s=60)
    assert all(t.stdout() == "payload\npayload\n" for t in (job.task(f"t{i}")
                                                           for i in range(5)))
    sources = {rf["source"] for rf in job.task("t3").spec["resource_files"]}
    if remote(backend):  # the service's own copy, uploaded once for all ten uses
        (source,) = sources
        assert Path(source).parent.parent == home / "uploads"
        assert len(list((home / "uploads").iterdir())) == 1
    else:
        assert sources == {str(data)}


def test_views_and_handles_are_the_same_types(backend):
    job = backend.jobs.create("types", priority=5, max_task_retry_count=2)
    assert isinstance(job, hpcbatch.Job) and job.view().priority == 5
    assert job.spec == hpcbatch.JobSpec("types", "local", priority=5, max_task_retry_count=2)
    job.add_task("t", "echo hi")
    counts = job.wait(timeout_s=60)
    assert set(counts) >= {"active", "preparing", "running", "completed", "succeeded",
                           "failed", "retries", "requeues", "total"}
    t = job.task("t")
    assert isinstance(t, hpcbatch.Task) and t.succeeded and t.stdout() == "hi\n"
    assert t.refresh().exit_code == 0
    assert isinstance(backend.pools.get("local"), PoolView)
    assert backend.jobs.get("types").state in ("active", "completed")


def test_a_kernel_run_and_its_result_file(backend, home, tmp_path):
    res = backend.run_kernel("pi", ranks=1, params={"samples": 20_000, "seed": 3},
                             output=tmp_path / "pi.h5")
    assert res.path == tmp_path / "pi.h5" and res.path.is_file()
    assert abs(float(res.reduced["pi"]) - 3.14159) < 0.1
    run = backend.service.get_run(res.job_id)
    assert run.state == "succeeded" and run.kernel == "pi"
    # the CLI downloads it (from the service when one runs, else from the home's runs)
    r = run_cli(home, "results", "get", res.job_id, "-o", str(tmp_path / "copy.h5"))
    assert r.returncode == 0, r.stderr
    if remote(backend):
        assert (tmp_path / "copy.h5").read_bytes() == backend.service.read_run_result(
            res.job_id)
    assert (tmp_path / "copy.h5").stat().st_size > 0
    r = run_cli(home, "results", "get", "run-nope", "-o", str(tmp_path / "x.h5"))
    assert r.returncode == 2 and "no kernel run 'run-nope'" in r.stderr, r.stderr


def test_a_compressed_run_without_an_output_is_named_after_its_run(backend, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = backend.run_kernel("mandelbrot", ranks=1,  # > 1 MiB: compressed when asked
                             params={"width": 640, "height": 480, "max_iter": 5},
                             compress=True)
    assert res.path == tmp_path / f"{res.job_id}.h5"  # as embedded runs name theirs
    with h5py.File(res.path, "r") as f:
        assert f["result/image"].compression == "gzip"


def test_a_collection_of_tasks_with_bad_ones_reports_each(backend, tmp_path):
    tasks = [{"id": "ok0", "command_line": "true"},
             {"id": "bad id", "command_line": "true"},
             {"id": "ok2", "command_line": "true"},
             {"id": "ok0", "command_line": "true"},
             {"id": "empty", "command_line": ""},
             {"id": "nofile", "command_line": "true", "resource_files": ["/nonexistent/x"]},
             {"id": "ok6", "command_line": "true", "colour": "red"}]
    reference = LocalService(tmp_path / "reference")
    try:
        reference.create_job("mixed")
        expected = reference.add_task_collection("mixed", tasks, atomic=False)
    finally:
        reference.close()
    assert expected.added == 2 and [e.index for e in expected.errors] == [1, 3, 4, 5, 6]
    job = backend.jobs.create("mixed")
    got = backend.service.add_task_collection("mixed", iter(tasks), atomic=False)
    assert got == expected
    assert sorted(t.id for t in job.tasks()) == ["ok0", "ok2"]
    with pytest.raises(ValidationError) as info:  # atomic: nothing more is stored
        backend.service.add_task_collection("mixed", [{"id": "ok7", "command_line": "true"},
                                                      tasks[1]])
    assert info.value.field == "task.id"
    assert job.counts()["total"] == 2
