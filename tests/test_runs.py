"""Kernel runs through the service (start, state, reduced values, the result file) and
files a client uploads for its tasks' resource files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from helpers import poll

from hpcbatch.errors import Conflict, NotFound, ValidationError


def test_a_run_started_through_the_service_reports_its_reduced_values(batch):
    service = batch.service
    run = service.start_run("pi", ranks=2, params={"samples": 20_000, "seed": 3},
                            oversubscribe=True)
    assert run.id.startswith("run-pi-") and run.state == "running"
    assert (run.job_id, run.task_id, run.ranks, dict(run.params)) == \
        (run.id, "kernel", 2, {"samples": 20_000, "seed": 3})
    batch.jobs.get(run.job_id).wait(timeout_s=120)
    done = service.get_run(run.id)
    assert done.state == "succeeded", done.error
    assert done.reduced["samples"] == 20_000  # the sum reduce of every rank's darts
    assert 2.5 < done.reduced["pi"] < 3.8
    assert done.attrs["kernel"] == "pi" and done.timings
    data = service.read_run_result(run.id)
    assert data[:8] == b"\x89HDF\r\n\x1a\n" and len(data) == done.result_size
    record = batch.home / "runs" / f"{run.id}.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert done.to_dict()["reduced"]["samples"] == 20_000  # plain JSON


def test_a_failed_run_says_why_and_has_no_result(batch):
    run = batch.service.start_run("pi", ranks=1, params={"samples": 10},
                                  timeout_s=0.001)
    batch.jobs.get(run.job_id).wait(timeout_s=60)
    failed = batch.service.get_run(run.id)
    assert failed.state == "failed" and "timed out" in failed.error
    with pytest.raises(Conflict, match="is failed"):
        batch.service.read_run_result(run.id)


def test_bad_runs_are_refused_and_store_nothing(batch):
    before = len(batch.jobs.list())
    with pytest.raises(ValidationError, match="ranks"):
        batch.service.start_run("pi", ranks=0)
    with pytest.raises(ValidationError, match="kernel"):
        batch.service.start_run("no-such-kernel")
    with pytest.raises(ValidationError, match="params"):
        batch.service.start_run("pi", params="samples=3")
    assert len(batch.jobs.list()) == before
    assert not list((batch.home / "runs").glob("*.json"))
    for bad in ("nope", "run-../../state", "../x", ""):
        with pytest.raises(NotFound):
            batch.service.get_run(bad)


def test_uploads_are_content_addressed_private_and_checked(batch, tmp_path):
    data = b"a resource file\n" * 1000
    digest = hashlib.sha256(data).hexdigest()
    path = batch.service.upload("in.txt", [data[:7], data[7:]], digest)
    assert Path(path).read_bytes() == data
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert batch.service.upload("in.txt", [data], digest) == path  # the same bytes: kept
    with pytest.raises(ValidationError, match="sha256: the bytes sent hash to"):
        batch.service.upload("other.txt", [b"not that"], digest)
    assert not (batch.home / "uploads" / digest / "other.txt").exists()
    assert not [p for p in (batch.home / "uploads" / digest).iterdir()
                if p.name.startswith(".")]
    for name, sha in (("../x", digest), ("a/b", digest), ("ok", "XYZ"), ("ok", "0" * 63)):
        with pytest.raises(ValidationError):
            batch.service.upload(name, [b""], sha)
    # the uploaded path is what a task's resource file names
    job = batch.jobs.create("uses-upload")
    job.add_task("t", "wc -c < in.txt", resource_files=[{"source": path}])
    job.wait(timeout_s=60)
    assert job.task("t").stdout().strip() == str(len(data))


def test_follow_streams_a_running_tasks_output_and_ends_with_the_task(batch):
    job = batch.jobs.create("follow")
    job.add_task("t", "echo first; while [ ! -e gate ]; do sleep 0.05; done; echo second")
    chunks = batch.service.follow_task_file("follow", "t", "stdout.txt")
    assert next(chunks) == b"first\n"  # written while the task still runs
    poll(lambda: job.task("t").state == "running", what="t running")  # (written ~50 ms in)
    task = job.task("t")
    (task.stdout_path.parent / "wd" / "gate").touch()  # in its working directory
    assert b"".join(chunks) == b"second\n"
    assert job.task("t").state == "completed"
    # from an offset, after the end: what is left, then done
    assert list(batch.service.follow_task_file("follow", "t", "stdout.txt", offset=6)) == \
        [b"second\n"]
