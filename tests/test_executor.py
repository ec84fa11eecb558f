"""batch.executor(): real worker processes (tasks on the pool's agents) over TCP.

The core tests run twice: on a local pool and on an SSH pool of the session's three
sshd nodes (tests/conftest_ssh.py), each with one executor for the module (workers
start once). Tests that kill workers make executors of their own.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from helpers import FAST_TIMINGS, poll

import hpcbatch
from hpcbatch.executor import BrokenExecutor, RemoteTraceback, WorkerLostError

# functions defined here travel by value (the SSH nodes cannot import this test module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TOLERANT = dict(heartbeat_s=0.5, node_timeout_s=10.0, lease_s=12.0)
INFLIGHT = 4  # per worker: small, so pending calls stay here (cancel, stealing)


def wait_file(path: str, timeout_s: float = 60.0) -> str:
    """Block (on a worker) until ``path`` exists: a gate the test opens."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return os.environ.get("HPCBATCH_NODE_ID", "?")


def started_then_wait(marker_dir: str, name: str, gate: str) -> int:
    Path(marker_dir, f"{name}.{os.getpid()}").touch()
    wait_file(gate)
    return os.getpid()


@pytest.fixture(scope="module")
def module_batch(tmp_path_factory):
    home = tmp_path_factory.mktemp("exec home")
    # no test here loses a node on purpose: clocks that bear a heavily loaded machine
    b = hpcbatch.Batch(home, local_slots=2, **{**FAST_TIMINGS, **TOLERANT})
    # for the tests with executors of their own (its agent is the module's, not theirs)
    b.pools.create("spare", "local", task_slots_per_node=2, target_nodes=1)
    from test_ssh_pool import wait_idle
    for pool in ("local", "spare"):  # their agents up now, not during a test
        wait_idle(b, pool, 1)
    yield b
    b.close()


def _ssh_pool(batch, request, name: str, nodes: list[str], slots: int) -> None:
    from test_ssh_pool import spec_for, wait_idle
    cluster = request.getfixturevalue("ssh_cluster").directory
    tmp = request.getfixturevalue("tmp_path_factory").mktemp(f"ssh {name}")
    batch.pools.create(name, "ssh", spec=str(spec_for(cluster, nodes, tmp)),
                       task_slots_per_node=slots)
    wait_idle(batch, name, len(nodes))


POOLS = [pytest.param("local", id="local"),
         pytest.param("ssh", id="ssh", marks=pytest.mark.ssh)]


def pool_for(kind: str, batch, request, spare: bool = False) -> str:
    """The local pool, or an SSH pool of the session cluster's three nodes (made once);
    ``spare``: a pool of the same kind the module's executors do not hold (2 slots on
    one node), for the tests that make executors of their own."""
    if kind == "local":
        return "spare" if spare else "local"
    name = "solo" if spare else "trio"
    if name not in {p.id for p in batch.pools.list()}:
        if spare:
            _ssh_pool(batch, request, name, ["node1"], 2)
        else:
            _ssh_pool(batch, request, name, ["node1", "node2", "node3"], 1)
    return name


@pytest.fixture(scope="module", params=POOLS)
def ex(request, module_batch):
    e = module_batch.executor(pool_for(request.param, module_batch, request),
                              max_inflight=INFLIGHT)
    e.wait_for_workers(timeout_s=60)
    yield e
    e.shutdown()
    assert module_batch.jobs.get(e.job_id).state == "completed"


def test_map_gives_results_in_order_and_works_with_as_completed_and_wait(ex):
    assert list(ex.map(lambda x: x * x, range(3000))) == [x * x for x in range(3000)]
    assert list(ex.map(pow, range(1000), [2] * 1000, chunksize=37)) == \
        [x ** 2 for x in range(1000)]
    fs = [ex.submit(divmod, 17, k, ) for k in range(1, 50)]
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=60)) == \
        sorted(divmod(17, k) for k in range(1, 50))
    done, not_done = cf.wait([ex.submit(sorted, [3, 1, 2], reverse=True)], timeout=60)
    assert not not_done and done.pop().result() == [3, 2, 1]
    # the workers are tasks of the executor's job, running on the pool's nodes
    nodes = {w["node"] for w in ex.workers()}
    assert len(nodes) == (1 if ex.pool == "local" else 3), ex.workers()
    # (a task's 'running' is written a moment after it started, with the next turn)
    poll(lambda: all(t.state == "running" for t in ex._batch.jobs.get(ex.job_id).tasks()),
         what="the workers' tasks running")


def _inner(x):
    raise ValueError(f"bad value {x}")


def _outer(x):
    return _inner(x)


def test_an_exception_comes_back_with_its_remote_traceback(ex):
    f = ex.submit(_outer, 42)
    with pytest.raises(ValueError, match="bad value 42") as info:
        f.result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "_outer" in cause.tb and "_inner" in cause.tb and "ValueError" in cause.tb
    note = "\n".join(info.value.__notes__)
    assert "raised on worker w" in note and " on node " in note and "_inner" in note
    # an exception that does not pickle still arrives, as text
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def raise_it():
        raise Unpicklable("boom")
    with pytest.raises(hpcbatch.HpcBatchError, match="Unpicklable.*boom"):
        ex.submit(raise_it).result(timeout=60)
    assert ex.submit(abs, -3).result(timeout=60) == 3  # and the worker goes on


def test_pending_futures_cancel_and_a_slow_call_does_not_block_the_rest(ex, tmp_path):
    gate = str(tmp_path / "gate")
    n = ex.n_workers
    held = [ex.submit(wait_file, gate) for _ in range(n * INFLIGHT)]
    poll(lambda: all(f.running() for f in held), what="every worker full")
    pending = [ex.submit(abs, -i) for i in range(10)]
    assert all(f.cancel() for f in pending) and all(f.cancelled() for f in pending)
    Path(gate).touch()
    assert all(f.result(timeout=60) for f in held)
    # one slow call holds its worker; the calls queued behind it go elsewhere
    gate2 = str(tmp_path / "gate2")
    slow = ex.submit(wait_file, gate2)
    quick = [ex.submit(abs, -i) for i in range(200)]
    try:
        assert [f.result(timeout=60) for f in quick] == list(range(200))
        assert not slow.done()
    finally:
        Path(gate2).touch()
    assert slow.result(timeout=60)


def test_a_100_mb_numpy_array_round_trips_exactly(ex):
    a = np.random.default_rng(7).random(100 * 2**20 // 8)  # 100 MiB of float64
    back = ex.submit(lambda x: x, a).result(timeout=120)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    s = ex.submit(lambda x: float(x.sum()), a).result(timeout=120)
    assert s == float(a.sum())


def test_a_module_missing_on_the_node_is_one_clear_error(ex, tmp_path):
    d = tmp_path / "only here"
    d.mkdir()
    (d / "hpcb_only_here.py").write_text("def f(x):\n    return x + 1\n")
    sys.path.insert(0, str(d))  # after the workers started: they do not have it
    try:
        import hpcb_only_here
        with pytest.raises(ModuleNotFoundError) as info:
            ex.submit(hpcb_only_here.f, 1).result(timeout=60)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("hpcb_only_here", None)
    text = str(info.value)
    assert "'hpcb_only_here' is not installed on node " in text, text
    assert "python 3." in text


def test_a_peer_without_the_token_is_dropped(ex):
    with socket.create_connection(("127.0.0.1", ex._port), timeout=10) as s:
        s.sendall(b"hpcbatch-exec-1\n" + os.urandom(32))
        s.settimeout(10)
        got = b""
        while len(got) < 48 + 32:  # its challenge, then its answer to ours
            more = s.recv(80 - len(got))
            assert more, "closed before the challenge"
            got += more
        s.sendall(os.urandom(32))  # a wrong answer to its challenge
        assert s.recv(1) == b""  # closed on us, nothing unpickled
    assert ex.submit(abs, -1).result(timeout=60) == 1


@pytest.fixture(scope="module", params=POOLS)
def spare(request, module_batch) -> str:
    """A pool of each kind the module's executors do not hold (made at module scope:
    what it starts is the module's, not a test's)."""
    return pool_for(request.param, module_batch, request, spare=True)


def test_a_worker_killed_mid_call_fails_exactly_its_calls_and_is_replaced(
        module_batch, spare, tmp_path):
    name = spare
    markers, gate = tmp_path / "markers", str(tmp_path / "gate")
    markers.mkdir()
    with module_batch.executor(name, max_inflight=3) as e:
        e.wait_for_workers(timeout_s=60)
        fs = [e.submit(started_then_wait, str(markers), str(i), gate)
              for i in range(e.n_workers * 3)]
        poll(lambda: len(list(markers.iterdir())) == e.n_workers, what="each worker busy")
        victim = e.workers()[0]
        held = e.held_by(victim["id"])
        assert len(held) == 3
        os.kill(victim["pid"], signal.SIGKILL)
        for f in held:
            with pytest.raises(WorkerLostError) as info:
                f.result(timeout=60)
            text = str(info.value)
            assert f"worker {victim['id']} on node {victim['node']}" in text, text
            assert "killed by SIGKILL" in text, text
        Path(gate).touch()
        others = [f for f in fs if f not in held]
        assert all(isinstance(f.result(timeout=60), int) for f in others)
        # a replacement started; new calls run (on it too)
        assert list(e.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        e.wait_for_workers(timeout_s=60)
        assert len(e.workers()) == e.n_workers + 1


def test_bad_executor_arguments_are_one_line_naming_the_field(module_batch, ex):
    jobs = len(module_batch.jobs.list())
    with pytest.raises(hpcbatch.ValidationError, match="workers_per_node.*at most"):
        module_batch.executor(ex.pool, workers_per_node=3)
    with pytest.raises(hpcbatch.ValidationError, match="max_inflight"):
        module_batch.executor(ex.pool, max_inflight=0)
    with pytest.raises(hpcbatch.NotFound):
        module_batch.executor("no-such-pool")
    with pytest.raises(hpcbatch.ValidationError, match="chunksize"):
        ex.map(abs, [1], chunksize=0)
    assert len(module_batch.jobs.list()) == jobs  # nothing was stored


def test_without_restarts_left_the_executor_says_why_it_gave_up(module_batch, tmp_path):
    gate = str(tmp_path / "gate")
    e = module_batch.executor(pool_for("local", module_batch, None, spare=True),
                              workers_per_node=1, max_restarts=0, max_inflight=1)
    try:
        e.wait_for_workers(timeout_s=60)
        first = e.submit(wait_file, gate)
        queued = e.submit(abs, 1)
        poll(first.running, what="the call running")
        os.kill(e.workers()[0]["pid"], signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="killed by SIGKILL"):
            first.result(timeout=60)
        with pytest.raises(BrokenExecutor, match="gave up after 0 worker restart"):
            queued.result(timeout=60)
        with pytest.raises(BrokenExecutor, match="SIGKILL"):
            e.submit(abs, 2)
    finally:
        e.shutdown()


MAIN_SCRIPT = textwrap.dedent('''
    import sys
    import hpcbatch

    def square_plus(k):
        return lambda x: x * x + k

    class Point:
        def __init__(self, x):
            self.x = x

    def norm(p):
        return Point(p.x * 2)

    with hpcbatch.Batch(url=sys.argv[1], key=sys.argv[2]) as batch:
        with batch.executor() as ex:
            f = square_plus(10)
            assert list(ex.map(f, range(5))) == [10, 11, 14, 19, 26]
            assert ex.submit(norm, Point(4)).result().x == 8
            assert type(ex.submit(norm, Point(1)).result()).__name__ == "Point"
            try:
                ex.submit(lambda: {}["missing"]).result()
            except KeyError as exc:
                assert "<lambda>" in str(exc.__cause__), exc.__cause__
            total = 0
            for fut in hpcbatch.as_completed([ex.submit(f, i) for i in range(20)],
                                             progress=True):
                total += fut.result()
            assert total == sum(i * i + 10 for i in range(20))
            assert sum(ex.map(f, range(100), chunksize=10, progress=True)) == \\
                sum(i * i + 10 for i in range(100))
    print("main-ok")
''')


@pytest.mark.slow
def test_lambdas_closures_and_main_classes_through_hpcbatch_serve(tmp_path):
    from test_backends import running_service
    script = tmp_path / "sweep.py"
    script.write_text(MAIN_SCRIPT)
    with running_service(tmp_path / "serve home") as served:
        r = subprocess.run([sys.executable, str(script), served.url, served.key],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "main-ok" in r.stdout, r.stdout + r.stderr


def _other_python() -> Path | None:
    """An interpreter of another minor version than this one, if the machine has one."""
    import glob
    import shutil
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for v in ("3.12", "3.13", "3.10", "3.11"):
        if v == mine:
            continue
        for found in (*sorted(glob.glob(f"/root/.pyenv/versions/{v}.*/bin/python")),
                      shutil.which(f"python{v}")):
            if found and subprocess.run([found, "-c", "pass"], capture_output=True,
                                        env={"PATH": "/usr/bin:/bin"}).returncode == 0:
                return Path(found)  # a real interpreter (not a pyenv shim)
    return None


@pytest.mark.slow
@pytest.mark.ssh
def test_a_node_python_of_another_version_is_one_clear_error(module_batch, ssh_cluster,
                                                            tmp_path):
    from test_ssh_pool import spec_for, wait_idle
    other = _other_python()
    if other is None:
        pytest.skip("no python of another minor version here (pyenv or python3.X)")
    # that python with this checkout's hpcbatch importable (the agent and the worker)
    root = tmp_path / "pkg" / "hpcbatch"
    root.mkdir(parents=True)
    src = Path(hpcbatch.__file__).parent
    for entry in src.iterdir():
        (root / entry.name).symlink_to(entry)
    import hpcbatch.launch.pyworker as pw
    (root / "launch").symlink_to(Path(pw.__file__).parent)
    wrapper = tmp_path / "py-other"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'pkg'} exec {other} \"$@\"\n")
    wrapper.chmod(0o755)
    spec = spec_for(ssh_cluster.directory, ["node2"], tmp_path)
    import json
    data = json.loads(spec.read_text())
    data["python"] = str(wrapper)
    spec.write_text(json.dumps(data))
    module_batch.pools.create("otherpy", "ssh", spec=str(spec), task_slots_per_node=1)
    try:
        wait_idle(module_batch, "otherpy", 1)
        e = module_batch.executor("otherpy")
        try:
            f = e.submit(abs, -1)
            with pytest.raises(BrokenExecutor) as info:
                f.result(timeout=60)
        finally:
            e.shutdown()
        text = str(info.value)
        mine = ".".join(map(str, sys.version_info[:3]))
        assert f"node node2 runs Python {other.parent.parent.name}" in text or \
            "node node2 runs Python 3." in text, text
        assert f"this client runs Python {mine}" in text, text
        module_batch.jobs.delete(e.job_id)
    finally:
        module_batch.pools.delete("otherpy")


@pytest.mark.slow
def test_workers_on_netns_nodes_reach_the_client_at_the_bridge_address(make_batch,
                                                                       make_cluster, tmp_path):
    from helpers import unavailable
    from test_ssh_pool import spec_for, wait_idle

    from hpcbatch.launch import cluster as ct
    reason = unavailable(ct.check_netns)
    if reason:
        pytest.skip(reason)
    info = make_cluster(2, netns=True)
    batch = make_batch()
    batch.pools.create("ns", "ssh", spec=str(spec_for(info.directory, ["node1", "node2"],
                                                      tmp_path)), task_slots_per_node=1)
    wait_idle(batch, "ns", 2)
    with batch.executor("ns") as e:
        assert e._connect != "127.0.0.1" and not e._connect.startswith("127.")
        assert sorted(e.map(lambda x: x + 1, range(100))) == list(range(1, 101))
        # (one worker may have done all 100 before the other connected, on a loaded box)
        poll(lambda: {w["node"] for w in e.workers()} == {"node1", "node2"}, timeout_s=60,
             what="a worker of each netns node connected")
    batch.jobs.delete(e.job_id)
    batch.pools.delete("ns")
