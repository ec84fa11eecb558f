"""Durable executor calls outlive their client: a real client process is SIGKILLed after
recording 1,000 calls, and a new one collects every result."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import FAST_TIMINGS, poll

import hpcbatch
from hpcbatch.durable import DurableCallError
from hpcbatch.errors import ValidationError

CLIENT = textwrap.dedent('''
    import json, os, sys, time
    import hpcbatch

    home, markers, timings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def work(i):
        # one marker per execution: the test counts how often each call ran
        fd = os.open(os.path.join(markers, f"{i}.{os.getpid()}.{time.monotonic_ns()}"),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        time.sleep(0.003)
        return i * i

    batch = hpcbatch.Batch(home, local_slots=2, **timings)
    ex = batch.executor(job="sweep-7", durable=True, calls_per_task=25)
    results = ex.map(work, range(1000))  # every call is recorded when map returns
    print("recorded", flush=True)
    for r in results:
        pass
    print("finished (the test should have killed us first)", flush=True)
''')


@pytest.mark.slow
def test_a_killed_client_s_calls_are_collected_by_a_new_process(tmp_path, home):
    markers = tmp_path / "markers"
    markers.mkdir()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), str(home), str(markers),
                             json.dumps(FAST_TIMINGS)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "recorded", proc.stderr.read()
        # some calls done, some running: then the client (and its coordinator) dies
        poll(lambda: len(os.listdir(markers)) >= 150, timeout_s=60, what="150 calls run")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    ran_before = len(os.listdir(markers))
    assert ran_before < 1000, "every call ran before the kill: nothing was left to collect"

    with hpcbatch.Batch(home, local_slots=2, **FAST_TIMINGS) as batch:
        fs = batch.futures("sweep-7")
        assert len(fs) == 1000
        assert [f.result(timeout=120) for f in fs] == [i * i for i in range(1000)]
        assert batch.jobs.get("sweep-7").results(timeout_s=60)[:3] == [0, 1, 4]
        # which calls' tasks were in flight at the kill (their attempt was requeued)
        in_flight = set()
        for t in batch.jobs.get("sweep-7").tasks():
            if any(a.outcome == "requeue" for a in t.attempts()):
                first, last = (int(x) for x in t.id.split("-")[1:])
                in_flight.update(range(first, last + 1))
    runs = collections.Counter(int(name.split(".")[0]) for name in os.listdir(markers))
    assert set(runs) == set(range(1000)), "a call never ran"
    twice = {i for i, n in runs.items() if n > 1}
    assert twice <= in_flight, f"calls {sorted(twice - in_flight)[:10]} ran twice but their " \
        "task was not in flight at the kill"
    assert all(n <= 2 for n in runs.values())
    assert len(in_flight) <= 2 * 25  # at most one task per slot was running


def test_durable_calls_record_errors_and_cancel_what_is_buffered(batch):
    with pytest.raises(ValidationError, match="job"):
        batch.executor(durable=True)
    with batch.executor(job="d1", durable=True, linger_s=30) as ex:
        ok = ex.submit(divmod, 7, 2)
        bad = ex.submit(int, "x")
        gone = ex.submit(abs, -1)
        assert gone.cancel()  # still buffered here: never recorded
        assert ex.flush() == 2
        assert not ok.cancel()  # recorded: it runs whatever happens here
        assert ok.result(timeout=60) == (3, 1)
        with pytest.raises(ValueError, match="invalid literal") as info:
            bad.result(timeout=60)
        assert "durable task d1/calls-" in "\n".join(info.value.__notes__)
    ids = [t.id for t in batch.jobs.get("d1").tasks()]
    assert ids == ["calls-000000000-000000001"]  # the cancelled one is left out
    # a call whose task ends without a result fails with how it ended
    with batch.executor(job="d1", durable=True) as ex:
        f = ex.submit(os._exit, 3)
        with pytest.raises(DurableCallError, match="ended without results.*exit code 3"):
            f.result(timeout=60)
    # a later executor on the job goes on numbering after the recorded calls
    assert [t.id for t in batch.jobs.get("d1").tasks()][-1] == "calls-000000002-000000002"
    assert len(batch.futures("d1")) == 3
    t0 = time.monotonic()
    with pytest.raises(ValueError):
        batch.jobs.get("d1").results(timeout_s=30)
    assert time.monotonic() - t0 < 30
