"""Storage containers: the module, the CLI, batch.storage and the REST routes of a real
`hpcbatch serve`.

* names: '..', absolute, NUL, empty parts are refused naming the field; a missing
  container or blob is a NotFound naming it
* round trips (CLI with a directory, Python, REST) keep bytes and SHA-256; listing shows
  size, checksum and time; delete removes a blob or a whole container
* atomicity: an upload whose stream breaks, or whose process (or HTTP client) is
  SIGKILLed mid-way, leaves no visible blob (the old version stays readable); a checksum
  mismatch stores nothing
* a 200 MB upload and download through the service are streamed: the server's RSS does
  not grow by the blob
* a container at an fsspec URL (file://, memory://) works the same way
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import poll, run_cli

from hpcbatch.errors import Conflict, NotFound, ValidationError
from hpcbatch.storage import Storage


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_names_are_checked_and_missing_things_named(tmp_path):
    s = Storage(tmp_path)
    s.create("in")
    for bad in ("../x", "/etc/passwd", "a/../b", "a//b", "a\0b", "", "./a", ".hpcbatch/x"):
        with pytest.raises(ValidationError) as e:
            s.put("in", bad, [b"x"])
        assert e.value.field == "blob"
    for bad in ("a/b", "..", "", "x" * 65, "sp ace"):
        with pytest.raises(ValidationError) as e:
            s.create(bad)
        assert e.value.field == "container"
    with pytest.raises(NotFound, match="container 'nope' does not exist"):
        s.put("nope", "a", [b"x"])
    with pytest.raises(NotFound, match="blob 'zz' is not in container 'in'"):
        s.info("in", "zz")
    with pytest.raises(Conflict, match="already exists"):
        s.create("in")
    s.put("in", "a", [b"1"])
    with pytest.raises(Conflict, match="both a blob and a folder"):
        s.put("in", "a/b", [b"2"])
    assert [b.name for b in s.list_blobs("in")] == ["a"]


def test_round_trip_listing_and_delete(tmp_path):
    s = Storage(tmp_path / "h")
    s.create("in")
    data = os.urandom(300_000)
    view = s.put("in", "d/x.bin", [data[:1000], data[1000:]], sha(data))
    assert (view.size, view.sha256) == (len(data), sha(data))
    s.put("in", "d/y.txt", [b"y"])
    s.put("in", "z.txt", [b"z"])
    listed = s.list_blobs("in")
    assert [(b.name, b.size, b.sha256) for b in listed] == [
        ("d/x.bin", len(data), sha(data)), ("d/y.txt", 1, sha(b"y")), ("z.txt", 1, sha(b"z"))]
    assert all(b.modified_at > 0 for b in listed)
    assert [b.name for b in s.list_blobs("in", "d/")] == ["d/x.bin", "d/y.txt"]
    got, chunks = s.read("in", "d/x.bin")
    assert b"".join(chunks) == data and got.sha256 == sha(data)
    # home files are the owner's only
    blob = tmp_path / "h" / "storage" / "in" / "blobs" / "d" / "x.bin"
    assert blob.stat().st_mode & 0o777 == 0o600
    s.delete_blob("in", "d/x.bin")
    s.delete_blob("in", "d/y.txt")
    assert [b.name for b in s.list_blobs("in")] == ["z.txt"]
    assert not (tmp_path / "h" / "storage" / "in" / "blobs" / "d").exists()
    with pytest.raises(NotFound):
        s.delete_blob("in", "d/x.bin")
    s.delete("in")
    assert s.list() == [] and not s.exists("in")


def test_a_broken_or_mismatched_upload_leaves_the_old_blob(tmp_path):
    s = Storage(tmp_path)
    s.create("in")
    s.put("in", "a", [b"old"])

    def broken():
        yield b"new" * 1000
        raise OSError("the client went away")
    with pytest.raises(OSError, match="went away"):
        s.put("in", "a", broken())
    with pytest.raises(ValidationError, match="hash to"):
        s.put("in", "a", [b"other"], sha(b"not this"))
    view, chunks = s.read("in", "a")
    assert b"".join(chunks) == b"old" and view.sha256 == sha(b"old")
    assert os.listdir(tmp_path / "storage" / "in" / "tmp") == []


def test_a_killed_upload_leaves_no_visible_blob(tmp_path):
    home = tmp_path / "h"
    Storage(home).create("in")
    gate = tmp_path / "gate"
    script = textwrap.dedent(f"""
        import time, pathlib
        from hpcbatch.storage import Storage
        def body():
            yield b"x" * (8 << 20)
            pathlib.Path({str(gate)!r}).write_text("half")
            while True:
                time.sleep(1)
                yield b"y"
        Storage({str(home)!r}).put("in", "big.bin", body())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        poll(gate.exists, timeout_s=60, what="half an upload")
        assert Storage(home).list_blobs("in") == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    s = Storage(home)
    assert s.list_blobs("in") == []
    with pytest.raises(NotFound):
        s.info("in", "big.bin")
    # what it left is a temporary file, not a blob; the name is free for a real upload
    assert len(os.listdir(home / "storage" / "in" / "tmp")) == 1
    s.put("in", "big.bin", [b"ok"])
    assert b"".join(s.read("in", "big.bin")[1]) == b"ok"


def test_containers_at_fsspec_urls(tmp_path):
    s = Storage(tmp_path / "h")
    where = tmp_path / "elsewhere"
    s.create("f", f"file://{where}")
    s.create("m", "memory://hpcbatch-test-m")
    for c in ("f", "m"):
        s.put(c, "x/1.txt", [b"one"], sha(b"one"))
        s.put(c, "2.txt", [b"two"])
        assert [(b.name, b.size, b.sha256) for b in s.list_blobs(c)] == [
            ("2.txt", 3, sha(b"two")), ("x/1.txt", 3, sha(b"one"))]
        assert b"".join(s.read(c, "x/1.txt")[1]) == b"one"
        s.delete_blob(c, "2.txt")
        assert [b.name for b in s.list_blobs(c)] == ["x/1.txt"]
    assert (where / "x" / "1.txt").read_bytes() == b"one"
    with pytest.raises(ValidationError, match="url"):
        s.create("bad", "nosuchproto://x")
    s.delete("f")  # its registration; the data at the URL is the user's
    assert (where / "x" / "1.txt").exists()


def test_cli_round_trip_of_a_directory(tmp_path, home):
    src = tmp_path / "src dir"
    (src / "sub").mkdir(parents=True)
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(50_000), "sub/c d.txt": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    r = run_cli(home, "storage", "create", "in")
    assert r.returncode == 0, r.stderr
    r = run_cli(home, "storage", "upload", "in", str(src), "--name", "data")
    assert r.returncode == 0, r.stderr
    assert "uploaded 3 blob(s)" in r.stdout
    r = run_cli(home, "storage", "ls", "in", "data/", "--json")
    listed = {b["name"]: b for b in map(json.loads, r.stdout.splitlines())}
    assert {k: (v["size"], v["sha256"]) for k, v in listed.items()} == {
        f"data/{n}": (len(d), sha(d)) for n, d in files.items()}
    out = tmp_path / "out"
    r = run_cli(home, "storage", "download", "in", "data/", str(out))
    assert r.returncode == 0, r.stderr
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    r = run_cli(home, "storage", "download", "in", "data/a.txt", str(tmp_path / "one.txt"))
    assert r.returncode == 0 and (tmp_path / "one.txt").read_bytes() == b"alpha\n"
    # bad input: one line, exit 2
    for args, words in ((("storage", "ls", "nope"), "container 'nope' does not exist"),
                        (("storage", "upload", "in", str(src / "a.txt"), "--name", "../x"),
                         "'..'"),
                        (("storage", "download", "in", "missing.txt", str(out)),
                         "blob 'missing.txt' is not in container 'in'")):
        r = run_cli(home, *args)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(home, "storage", "delete", "in", "data/sub/", "--prefix")
    assert r.returncode == 0 and "2 blob(s) deleted" in r.stdout
    r = run_cli(home, "storage", "delete", "in")
    assert r.returncode == 0
    r = run_cli(home, "storage", "list")
    assert " in " not in r.stdout


def test_batch_storage_embedded(batch, tmp_path):
    batch.storage.create("in")
    batch.storage.put_bytes("in", "k/v.txt", b"value")
    assert batch.storage.get_bytes("in", "k/v.txt") == b"value"
    assert [(b.name, b.sha256) for b in batch.storage.ls("in")] == [("k/v.txt", sha(b"value"))]
    paths = batch.storage.download("in", "k/", tmp_path / "dl")
    assert [p.read_bytes() for p in paths] == [b"value"]


@pytest.fixture
def serve(tmp_path):
    """serve() -> a real `hpcbatch serve` (tests/test_server.py's Served), stopped after."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_server import Served
    made = []

    def start(home: Path | None = None, *args: str):
        s = Served(home or tmp_path / "hpc home", tmp_path / "logs", *args)
        made.append(s)
        return s
    try:
        yield start
    finally:
        for s in reversed(made):
            s.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_through_the_service_streamed_both_ways(serve, tmp_path):
    """A real `hpcbatch serve`; Batch(url=) and raw HTTP. 200 MB goes up and comes back
    with the server's RSS growing by far less than that."""
    import hpcbatch
    pytest.importorskip("fastapi")
    srv = serve()
    with hpcbatch.Batch(url=srv.url, key=srv.key) as b:
        b.storage.create("big")
        with pytest.raises(Conflict):
            b.storage.create("big")
        with pytest.raises(NotFound, match="container 'nope'"):
            b.storage.ls("nope")
        with pytest.raises(ValidationError, match="'..'"):
            b.storage.put_bytes("big", "../x", b"1")
        # a checksum mismatch over HTTP stores nothing
        r = srv.client.put("/v1/storage/big/blobs/bad.bin", content=b"abc",
                           params={"sha256": "0" * 64})
        assert r.status_code == 400 and r.json()["target"] == "sha256"
        assert b.storage.ls("big") == []
        # 200 MB, generated on the fly, with its hash computed as it goes
        block = os.urandom(1 << 20)
        n = 200
        h = hashlib.sha256()
        for _ in range(n):
            h.update(block)
        digest = h.hexdigest()
        before = _rss_kib(srv.proc.pid)
        view = b.service.put_blob("big", "blob.bin", (block for _ in range(n)), digest)
        assert (view.size, view.sha256) == (n << 20, digest)
        grown_up = _rss_kib(srv.proc.pid) - before
        got, chunks = b.service.read_blob("big", "blob.bin")
        assert got.sha256 == digest
        h2 = hashlib.sha256()
        size = 0
        for chunk in chunks:
            h2.update(chunk)
            size += len(chunk)
        grown = _rss_kib(srv.proc.pid) - before
        assert (size, h2.hexdigest()) == (n << 20, digest)
        assert grown_up < 60 * 1024 and grown < 60 * 1024, (grown_up, grown)
        listed = srv.client.get("/v1/storage/big/blobs").json()["items"]
        assert [(x["name"], x["size"], x["sha256"]) for x in listed] == [
            ("blob.bin", n << 20, digest)]
        r = srv.client.get("/v1/storage/big/blobs/blob.bin", params={"info": "true"})
        assert r.json()["sha256"] == digest
        b.storage.delete("big", "blob.bin")
        assert srv.client.get("/v1/storage/big/blobs/blob.bin").status_code == 404
        b.storage.delete("big")
        assert [c.name for c in b.storage.list()] == []
        # a client killed half-way through an upload: no blob, its temporary file gone
        b.storage.create("half")
        gate = tmp_path / "half-sent"
        script = textwrap.dedent(f"""
            import pathlib, time, httpx
            def body():
                yield b"x" * (16 << 20)
                pathlib.Path({str(gate)!r}).write_text("sent")
                while True:
                    time.sleep(1)
                    yield b"y"
            httpx.put({srv.url!r} + "/v1/storage/half/blobs/part.bin", content=body(),
                      headers={{"Authorization": "Bearer {srv.key}"}}, timeout=600)
        """)
        client = subprocess.Popen([sys.executable, "-c", script])
        try:
            poll(gate.exists, timeout_s=60, what="half an upload sent")
            tmp_dir = srv.home / "storage" / "half" / "tmp"
            poll(lambda: os.listdir(tmp_dir) != [], timeout_s=30, what="the upload in flight")
            assert b.storage.ls("half") == []
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
        poll(lambda: os.listdir(tmp_dir) == [], timeout_s=30, what="the partial upload removed")
        assert b.storage.ls("half") == []
        # tasks through the service: inputs from a container, outputs into another
        b.storage.create("in")
        b.storage.create("out")
        b.storage.put_bytes("in", "d/x.txt", b"x-data")
        job = b.jobs.create("svc")
        job.add_task("t", "tr a-z A-Z < d/x.txt > up.txt", resource_files=[
            {"container": "in", "blob_prefix": "d/"}], output_files=[
            {"pattern": "up.txt", "destination": {"container": "out", "path": "{task}.txt"}}])
        r = srv.client.post("/v1/jobs/svc/tasks", json={
            "id": "rest", "command_line": "cat d/x.txt > copy.txt",
            "resource_files": [{"auto_storage_container_name": "in", "blob_prefix": "d/",
                                "file_mode": "0600"}],
            "output_files": [{"pattern": "copy.txt", "destination": {
                "container": "out", "path": "{job}/{task}/{attempt}/"}}]})
        assert r.status_code == 201, r.text
        r = srv.client.post("/v1/jobs/svc/tasks", json={
            "id": "escape", "command_line": "true",
            "resource_files": [{"container": "in", "file_path": "../x"}]})
        assert r.status_code == 400 and "file_path" in r.json()["target"], r.text
        job.wait(timeout_s=60)
        assert b.storage.get_bytes("out", "t.txt") == b"X-DATA"
        assert b.storage.get_bytes("out", "svc/rest/0/copy.txt") == b"x-data"


def test_storage_and_apps_refusals_are_the_api_error_body(serve):
    """A real `hpcbatch serve`: each refusal of a storage or application-package route is
    the API's JSON error {code, message, target}, naming the field, and changes nothing."""
    c = serve().client
    assert c.post("/v1/storage", json={"name": "box"}).status_code == 201
    cases = [  # method, path, json body, status, code, target
        ("post", "/v1/storage", {"name": ""}, 400, "ValidationError", "name"),
        ("post", "/v1/storage", {"name": "b", "junk": 1}, 422, "InvalidBody", "junk"),
        ("post", "/v1/storage", {"name": "b", "url": "no-scheme"}, 400, "ValidationError",
         "url"),
        ("post", "/v1/storage", {"name": "box"}, 409, "Conflict", None),
        ("get", "/v1/storage/no%20such", None, 400, "ValidationError", "container"),
        ("get", "/v1/storage/nope/blobs", None, 404, "NotFound", None),
        ("get", "/v1/storage/box/blobs/x/%2E%2E/y", None, 400, "ValidationError", "blob"),
        ("get", "/v1/storage/box/blobs/.hpcbatch/meta", None, 400, "ValidationError",
         "blob"),
        ("get", "/v1/storage/box/blobs/missing.txt", None, 404, "NotFound", None),
        ("post", "/v1/apps", {"name": "a", "version": "-1", "source": "x"}, 400,
         "ValidationError", "version"),
        ("post", "/v1/apps", {"name": "a b", "version": "1", "source": "x"}, 400,
         "ValidationError", "name"),
        ("delete", "/v1/apps/nope", None, 404, "NotFound", None),
        ("post", "/v1/apps/nope/default", {"version": "1", "x": 2}, 422, "InvalidBody",
         "x"),
    ]
    for method, path, body, status, code, target in cases:
        r = c.request(method.upper(), path, json=body)
        got = r.json()
        assert (r.status_code, got["code"]) == (status, code), (path, body, r.text)
        assert set(got) == {"code", "message", "target"} and got["message"], r.text
        if target is not None:
            assert got["target"] == target, (path, body, r.text)
    assert [b["name"] for b in c.get("/v1/storage").json()["items"]] == ["box"]
    assert c.get("/v1/apps").json()["items"] == []
