"""Resource files from storage, output files to storage, and task logs kept by the
coordinator, on local nodes and on real sshd nodes.

* resource files from a container by prefix (full blob names under file_path), a
  storage path, a file:// URL and a real HTTP server, each with its mode; refused at
  input: a path with '..', a bad mode, two sources; recorded on the task as
  pre_processing_error naming the file: no blob under the prefix, a container that does
  not exist, an HTTP 404; the other tasks of the job unaffected
* the node cache: a second task on the same node gets the file without it being sent
  again (the stager's counts, and the cached copy's inode unchanged)
* output files with each upload condition, {job}/{task}/{attempt}, '../std*.txt'; an
  upload to a deleted container is the attempt's file_upload_error
* logs: kept per attempt under the home (the tail beyond the cap), read after the
  pool is deleted and after the node's sshd and agent are killed; on a local node a
  failed attempt's at once, a successful one's when its node leaves the pool and its
  task directories are removed
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from helpers import FAST_TIMINGS

import hpcbatch
from hpcbatch.errors import ValidationError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def http_files(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


LIST = "find data y u -type f -exec stat -c '%n %a' {} + | sort; cat data/x/a.txt"


def test_resource_files_from_storage_and_urls_with_modes(batch, tmp_path, http_files):
    base, www = http_files
    (www / "u.bin").write_bytes(b"from http")
    (tmp_path / "f.txt").write_bytes(b"from file url")
    batch.storage.create("in")
    batch.storage.put_bytes("in", "x/a.txt", b"AAA")
    batch.storage.put_bytes("in", "x/sub/b.sh", b"#!/bin/sh\necho B\n")
    batch.storage.put_bytes("in", "other.txt", b"not under x/")
    job = batch.jobs.create("rf")
    job.add_tasks([
        {"id": "ok", "command_line": LIST + "; ./data/x/sub/b.sh", "resource_files": [
            {"container": "in", "blob_prefix": "x/", "path": "data/", "mode": "0750"},
            {"storage_path": "in/other.txt", "file_path": "y/o.txt", "file_mode": "0400"},
            {"http_url": f"{base}/u.bin", "file_path": "u/u.bin"},
            {"url": f"file://{tmp_path}/f.txt", "file_path": "u/f.txt", "mode": "0600"}]},
        {"id": "noblob", "command_line": "true",
         "resource_files": [{"container": "in", "blob_prefix": "nothing/"}]},
        {"id": "http404", "command_line": "true",
         "resource_files": [{"url": f"{base}/absent.bin"}]},
        {"id": "fine", "command_line": "echo fine"},
    ])
    # a container that does not exist: refused at input, naming the field ...
    for bad, field in (({"resource_files": [{"auto_storage_container_name": "missing"}]},
                        "resource_files[0].container"),
                       ({"resource_files": [{"storage_path": "missing/x"}]},
                        "resource_files[0].storage_path"),
                       ({"output_files": [{"pattern": "x", "container": "missing"}]},
                        "output_files[0].container")):
        with pytest.raises(ValidationError, match="container 'missing' does not exist") as e:
            job.add_tasks([{"id": "refused", "command_line": "true", **bad}])
        assert e.value.field == f"task refused: {field}"
    # ... and where it is not checked at input (a collection), recorded on the task
    added = batch.service.add_task_collection("rf", [{
        "id": "nocontainer", "command_line": "true",
        "resource_files": [{"auto_storage_container_name": "missing"}]}])
    assert added.added == 1
    job.wait(timeout_s=60)
    ok = job.task("ok")
    assert ok.result == "success", ok.view
    assert ok.stdout().splitlines() == [
        "data/x/a.txt 750", "data/x/sub/b.sh 750", "u/f.txt 600", "u/u.bin 644",
        "y/o.txt 400", "AAAB"]
    failures = {t.id: (t.failure_kind, t.failure) for t in job.tasks() if t.id != "ok"}
    assert failures["fine"] == (None, None)
    assert failures["noblob"][0] == "pre_processing_error"
    assert "no blob of container 'in' starts with 'nothing/'" in failures["noblob"][1]
    assert failures["nocontainer"][0] == "pre_processing_error"
    assert "container 'missing' does not exist" in failures["nocontainer"][1]
    assert failures["http404"][0] == "pre_processing_error"
    assert "absent.bin: HTTP 404" in failures["http404"][1]
    # never a silent empty file
    assert not any(p.name == "absent.bin" for p in Path(batch.home).rglob("absent.bin"))


@pytest.mark.parametrize("rf, field", [
    ({"container": "in", "path": "../up"}, "resource_files[0].file_path"),
    ({"storage_path": "in/../etc/passwd"}, "resource_files[0].storage_path"),
    ({"source": "/etc/hostname", "file_path": "/abs"}, "resource_files[0].file_path"),
    ({"container": "in", "file_mode": "rwx"}, "resource_files[0].file_mode"),
    ({"container": "in", "url": "https://x/y"}, "resource_files[0].source"),
    ({"container": "in", "blob_prefix": "../"}, "resource_files[0].blob_prefix"),
])
def test_bad_resource_files_are_refused_at_input(batch, rf, field):
    job = batch.jobs.create("bad")
    with pytest.raises(ValidationError) as e:
        job.add_tasks([{"id": "t", "command_line": "true", "resource_files": [rf]}])
    assert e.value.field == f"task t: {field}"
    assert job.tasks() == [] or list(job.tasks()) == []


def test_a_second_task_on_the_node_takes_the_file_from_its_cache(make_batch, tmp_path):
    batch = make_batch(local_slots=1)
    data = os.urandom(3 << 20)
    batch.storage.create("in")
    batch.storage.put_bytes("in", "big.bin", data)
    job = batch.jobs.create("cache")
    rf = [{"storage_path": "in/big.bin"}]
    job.add_task("first", "sha256sum big.bin", resource_files=rf)
    job.wait(timeout_s=60)
    stager = batch.coordinator.stager
    assert stager.counts == {"fetched": 1, "hits": 0, "bytes_sent": len(data)}
    node_root = Path(job.task("first").task_dir).parent.parent.parent
    cached = node_root / "cache" / sha(data)
    assert cached.is_file()
    ino = cached.stat().st_ino
    job.add_task("second", "sha256sum big.bin", resource_files=rf)
    job.wait(timeout_s=60)
    assert stager.counts == {"fetched": 1, "hits": 1, "bytes_sent": len(data)}
    assert cached.stat().st_ino == ino  # the same copy: not fetched again
    for t in ("first", "second"):
        assert job.task(t).stdout().split()[0] == sha(data)


def test_output_files_by_condition_and_an_upload_to_a_deleted_container(batch):
    import shlex
    import sys
    batch.storage.create("out")
    batch.storage.create("doomed")
    # deleted by another client while the task runs
    delete = shlex.join([sys.executable, "-m", "hpcbatch.cli", "--home", str(batch.home),
                         "storage", "delete", "doomed"])
    job = batch.jobs.create("o")
    conds = [{"pattern": "r/*.txt", "destination": {"container": "out",
                                                    "path": "{job}/{task}/" + c + "/"},
              "upload_condition": c}
             for c in ("task_success", "task_failure", "task_completion")]
    make = "mkdir -p r/s; echo $HPCBATCH_TASK_ID > r/1.txt; echo deep > r/s/2.txt; echo log"
    job.add_tasks([
        {"id": "good", "command_line": make, "output_files": conds + [
            {"pattern": "../std*.txt", "destination": {"container": "out",
                                                       "path": "{job}/{task}/logs"}},
            {"pattern": "**/2.txt", "container": "out", "path": "{job}/deep/"},
            {"pattern": "r/1.txt", "container": "out", "path": "{job}/{task}/one.txt"}]},
        {"id": "bad", "command_line": make + "; exit 4", "max_task_retry_count": 1,
         "output_files": [dict(c, destination={"container": "out",
                                               "path": "{job}/{task}/{attempt}/" +
                                               c["upload_condition"] + "/"})
                          for c in conds]},
        {"id": "lost", "command_line": f"{make}; {delete}",
         "output_files": [{"pattern": "r/1.txt", "container": "doomed"}]},
        {"id": "bystander", "command_line": "echo unaffected"},
    ])
    job.wait(timeout_s=60)
    names = {b.name for b in batch.storage.ls("out")}
    assert names == {
        "o/good/task_success/1.txt", "o/good/task_completion/1.txt",
        "o/good/logs/stdout.txt", "o/good/logs/stderr.txt", "o/deep/r/s/2.txt",
        "o/good/one.txt",
        "o/bad/0/task_failure/1.txt", "o/bad/0/task_completion/1.txt",
        "o/bad/1/task_failure/1.txt", "o/bad/1/task_completion/1.txt"}
    assert batch.storage.get_bytes("out", "o/good/one.txt") == b"good\n"
    assert batch.storage.get_bytes("out", "o/good/logs/stdout.txt") == b"log\n"
    lost = job.task("lost")
    assert (lost.result, lost.failure_kind, lost.exit_code) == \
        ("failure", "file_upload_error", 0)
    assert "container 'doomed' does not exist" in lost.failure
    bad = job.task("bad")
    assert (bad.failure_kind, bad.retry_count) == ("exit_code", 1)
    assert job.task("bystander").result == "success"


def test_an_output_pattern_leaving_the_task_directory_is_refused(batch):
    job = batch.jobs.create("esc")
    for pattern in ("../../x", "a/../../b", "/etc/*"):
        with pytest.raises(ValidationError, match="output_files"):
            job.add_tasks([{"id": "t", "command_line": "true", "output_files": [
                {"pattern": pattern, "container": "out"}]}])
    with pytest.raises(ValidationError, match="only .* may be substituted"):
        job.add_tasks([{"id": "t", "command_line": "true", "output_files": [
            {"pattern": "x", "container": "out", "path": "{node}/x"}]}])


def test_logs_are_kept_capped_and_read_after_the_nodes_files_are_gone(home, monkeypatch):
    monkeypatch.setenv("HPCBATCH_LOG_CAP_BYTES", "1000")
    from helpers import poll
    with hpcbatch.Batch(home, **FAST_TIMINGS) as batch:
        batch.pools.create("temp", target_nodes=1)
        job = batch.jobs.create("logs", pool="temp")
        job.add_task("small", "echo out; echo err >&2")
        job.add_task("big", "seq 1 2000")  # 8,893 bytes
        job.add_task("failed", "echo why; exit 3")
        job.wait(timeout_s=60)
        logs = Path(home) / "logs" / "logs"
        # a failed attempt's logs are kept at once (another attempt would write over
        # them); a local node's successful ones are read where they are ...
        poll(lambda: (logs / "failed" / "0" / "kept.json").is_file(), timeout_s=20,
             what="the failed task's kept logs")
        assert not (logs / "small").exists() and not (logs / "big").exists()
        assert job.task("small").stdout() == "out\n"
        # ... until hpcbatch removes the node's task directories (the node leaves its
        # pool): then they are kept first
        node_root = Path(job.task("small").task_dir).parent.parent.parent
        batch.pools.resize("temp", 0)
        poll(lambda: not (node_root / "jobs").exists(), timeout_s=30,
             what="the node's task directories removed")
        kept = logs / "big" / "0"
        info = json.loads((kept / "kept.json").read_text())["files"]["stdout.txt"]
        assert info["size"] == 8893 and info["kept_from"] == 8893 - 1000
        assert (kept / "stdout.txt").read_bytes().endswith(b"1999\n2000\n")
        assert len((kept / "stdout.txt").read_bytes()) == 1000
        assert (kept / "stdout.txt").stat().st_mode & 0o777 == 0o600
        assert (logs / "small" / "0" / "stdout.txt").stat().st_mode & 0o777 == 0o600
        assert not Path(job.task("small").task_dir).exists()
        assert job.task("small").stdout() == "out\n"
        assert job.task("small").stderr() == "err\n"
        assert job.task("big").stdout().endswith("1999\n2000\n")  # the tail
        assert job.task("failed").stdout() == "why\n"
        job_files = batch.service.list_task_files("logs", "small")
        assert sorted(f.name for f in job_files) == ["stderr.txt", "stdout.txt"]
        batch.jobs.delete("logs")
        assert not logs.exists()
        batch.pools.delete("temp")


# ---------------------------------------------------------------- over SSH

def _ssh_pool(batch, directory: Path, tmp_path: Path, pool: str, names: list[str]) -> None:
    from test_ssh_pool import spec_for, wait_idle
    batch.pools.create(pool, "ssh", spec=str(spec_for(directory, names, tmp_path)))
    wait_idle(batch, pool, len(names))


@pytest.mark.slow
def test_ssh_nodes_fetch_by_prefix_once_per_node_and_upload_outputs(batch, ssh_cluster,
                                                                    tmp_path):
    data = os.urandom(2 << 20)
    batch.storage.create("in")
    batch.storage.create("out")
    batch.storage.put_bytes("in", "set/big.bin", data)
    batch.storage.put_bytes("in", "set/run.sh", b"#!/bin/sh\nsha256sum data/set/big.bin\n")
    _ssh_pool(batch, ssh_cluster.directory, tmp_path, "sshrf", ["node1", "node2"])
    job = batch.jobs.create("s", pool="sshrf")
    rf = [{"container": "in", "blob_prefix": "set/", "path": "data", "mode": "0755"}]
    out = [{"pattern": "res/*.txt", "destination": {"container": "out",
                                                    "path": "{job}/{task}/"},
            "upload_condition": "task_success"},
           {"pattern": "../stderr.txt", "container": "out", "path": "{job}/{task}/err.txt",
            "upload_condition": "task_failure"}]
    cmd = ("mkdir res; ./data/set/run.sh > res/sum.txt; stat -c %a data/set/run.sh "
           ">> res/sum.txt; echo $HPCBATCH_NODE_ID >> res/sum.txt")
    job.add_tasks([{"id": f"t{i}", "command_line": cmd, "resource_files": rf,
                    "output_files": out} for i in range(4)])
    job.add_task("fails", "echo broken >&2; exit 2", output_files=out)
    job.wait(timeout_s=120)
    nodes = set()
    for i in range(4):
        t = job.task(f"t{i}")
        assert t.result == "success", t.view
        digest, mode, node = batch.storage.get_bytes(
            "out", f"s/t{i}/sum.txt").decode().split("\n")[:3]
        assert (digest.split()[0], mode) == (sha(data), "755")
        nodes.add(node)
    assert nodes == {"node1", "node2"}  # both nodes were used
    assert batch.storage.get_bytes("out", "s/fails/err.txt") == b"broken\n"
    assert not [b for b in batch.storage.ls("out", "s/fails/") if b.name.endswith("sum.txt")]
    # 4 tasks x 2 files on 2 nodes: each file sent once per node, the rest from the cache
    counts = batch.coordinator.stager.counts
    assert counts["fetched"] == 4 and counts["hits"] == 4, counts
    assert counts["bytes_sent"] == 2 * (len(data) + len(b"#!/bin/sh\nsha256sum "
                                                         b"data/set/big.bin\n"))


@pytest.mark.slow
def test_logs_are_read_after_the_ssh_node_is_killed(batch, make_cluster, tmp_path):
    from hpcbatch.launch.cluster import kill_node
    info = make_cluster(1, "solo")
    _ssh_pool(batch, info.directory, tmp_path, "solo", ["node1"])
    job = batch.jobs.create("k", pool="solo")
    job.add_task("t", "echo kept-out; echo kept-err >&2")
    job.wait(timeout_s=60)
    kill_node(info.directory, "node1")  # its sshd and everything of it, the agent too
    from helpers import poll
    poll(lambda: batch.pools.nodes("solo")[0]["state"] != "idle", timeout_s=30,
         what="the node seen lost")
    t = job.task("t")
    assert t.stdout() == "kept-out\n" and t.stderr() == "kept-err\n"
    assert sorted(f.name for f in batch.service.list_task_files("k", "t")) == [
        "stderr.txt", "stdout.txt"]


def test_cli_submit_with_resource_and_output_options(tmp_path, home):
    from helpers import run_cli
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A\n")
    (src / "sub" / "b.txt").write_text("B\n")
    for args in (("storage", "create", "in"), ("storage", "create", "out"),
                 ("storage", "upload", "in", str(src), "--name", "x")):
        r = run_cli(home, *args)
        assert r.returncode == 0, r.stderr
    r = run_cli(home, "submit", "--job", "cj", "--workdir", "task",
                "--resource", "in/x/=data@0700", "--resource", "in/x/a.txt=one.txt",
                "--output", "data/**/*.txt=out/{job}/{task}/@success",
                "--", "sh", "-c", "cat one.txt data/x/sub/b.txt; stat -c %a data/x/a.txt")
    assert r.returncode == 0, r.stderr
    r = run_cli(home, "task", "logs", "cj", "task-1")
    assert r.stdout.split() == ["A", "B", "700"], r
    r = run_cli(home, "storage", "ls", "out", "--json")
    assert sorted(json.loads(x)["name"] for x in r.stdout.splitlines()) == [
        "cj/task-1/x/a.txt", "cj/task-1/x/sub/b.txt"]
    for args, words in ((("--resource", "in/../x"), "--resource: 'in/../x'"),
                        (("--output", "x=out/a/../b"), "--output: 'x=out/a/../b'"),
                        (("--output", "nonsense"), "is not PATTERN=CONTAINER"),
                        (("--resource", "in/x/=../up"), "leaves the task")):
        r = run_cli(home, "task", "add", "cj", "bad", *args, "true")
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_the_node_cache_is_bounded_least_recently_used_first(tmp_path):
    from hpcbatch.launch import nodecache
    root = tmp_path / "root"
    cache = root / "cache"
    cache.mkdir(parents=True)
    (root / "wd").mkdir()
    now = __import__("time").time()
    blobs = {}
    for i in range(5):  # 5 x 1 MB, used at now-500, now-400, ... now-100
        data = bytes([i]) * 1_000_000
        digest = sha(data)
        (cache / digest).write_bytes(data)
        os.utime(cache / digest, (now - 500 + 100 * i, now - 500 + 100 * i))
        blobs[i] = digest
    # placing the oldest renews it; the cap (3 MB) then removes the next two oldest
    out = nodecache.place({"root": str(root), "dest_dir": str(root / "wd"),
                           "cap_bytes": 3_000_000, "fetched": [blobs[0]],
                           "entries": [{"sha256": blobs[0], "rel": "a/b.bin", "mode": 0o640}]})
    assert out == {"placed": 1, "evicted": 2}
    assert sorted(p.name for p in cache.iterdir()) == sorted([blobs[0], blobs[3], blobs[4]])
    placed = root / "wd" / "a" / "b.bin"
    assert placed.read_bytes() == bytes([0]) * 1_000_000
    assert placed.stat().st_mode & 0o777 == 0o640
    # a damaged copy (its bytes do not hash to its name) is removed and refused
    (cache / blobs[1]).write_bytes(b"not what was sent")
    with pytest.raises(OSError, match="damaged on the way"):
        nodecache.place({"root": str(root), "dest_dir": str(root / "wd"), "cap_bytes": 0,
                         "fetched": [blobs[1]],
                         "entries": [{"sha256": blobs[1], "rel": "x", "mode": 0o600}]})
    assert not (cache / blobs[1]).exists() and not (root / "wd" / "x").exists()
    with pytest.raises(OSError, match="must stay inside"):
        nodecache.place({"root": str(root), "dest_dir": str(root / "wd"), "cap_bytes": 0,
                         "fetched": [], "entries": [{"sha256": blobs[0], "rel": "../up",
                                                     "mode": 0o600}]})


def test_a_file_path_naming_a_directory_places_the_file_in_it(batch, tmp_path):
    """A single file's file_path ending in '/' (or '.') is a directory, as cp's and scp's
    destination is: the file lands there under its own name (it used to become a file
    named 'data')."""
    batch.storage.create("in")
    batch.storage.put_bytes("in", "x/a.txt", b"A")
    (tmp_path / "local.txt").write_bytes(b"L")
    job = batch.jobs.create("into")
    job.add_task("t", "find . -type f | sort; cat data/a.txt a.txt sub/dir/local.txt",
                 resource_files=[{"storage_path": "in/x/a.txt", "file_path": "data/"},
                                 {"storage_path": "in/x/a.txt", "file_path": "."},
                                 {"source": str(tmp_path / "local.txt"),
                                  "file_path": "sub/dir/"}])
    job.wait(timeout_s=60)
    assert job.task("t").stdout().splitlines() == [
        "./a.txt", "./data/a.txt", "./sub/dir/local.txt", "AAL"], job.task("t").view
    with pytest.raises(ValidationError, match="leaves the task's working directory"):
        job.add_task("up", "true", resource_files=[{"storage_path": "in/x/a.txt",
                                                    "file_path": "../"}])
