"""Never the same task twice at once, nothing left behind (issue 9), with real processes.

Every task here runs ``marks.sh``: it appends ``start``/``tick``/``end`` lines with
its pid and a timestamp to a marks file, and holds an flock on a lock file of its
task for as long as any of its processes lives. Two runs of one task overlap when
their marked intervals cross, or when a run finds the lock taken (an ``overlap``
line): the lock catches what the marks could miss (a run killed between two ticks).

* the coordinator and agent killed together: ``kill -KILL -- -PGID`` of a ``hpcbatch
  submit`` (and SIGKILL of its agent too), SIGHUP from a closing terminal or ``kill
  -HUP``; then ``hpcbatch job wait``
* a partitioned SSH node (``--netns`` cluster, root only): link down for ~10 s; the
  same with the coordinator SIGKILLed and restarted right after the cut; a multi-node
  Open MPI run whose primary is cut off (prted on the other node)
* a SIGKILLed agent (local and SSH): fenced before its task runs elsewhere
* ten SIGKILLs of the coordinator at random points of a 500-task job
* a 200,000-task submit from a second process beside a running task
* Open MPI leftovers of a timed-out / killed multi-rank run
* symbolic links out of a task directory

benchmarks/fence_faults.py runs 20 random faults of these kinds and reports overlaps
and requeue waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pty
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import poll, run_cli, unavailable

import hpcbatch
from hpcbatch.launch import cluster as ct
from hpcbatch.store import Store

FAST = dict(heartbeat_s=0.25, node_timeout_s=2.0, lease_s=2.0, reconnect_max_s=1.0,
            kill_grace_s=0.5)

MARKS_SH = r"""
# marks.sh MARKS TASK TICKS LOCKS [GATE]: marks, ticks every 0.1 s (at least TICKS
# times, and while GATE is given and missing), then ends
m=$1 t=$2 n=$3 locks=$4 gate=$5
exec 9>>"$locks/$t.lock"
flock -n 9 || echo "overlap $t $$ $(date +%s.%N) ${HPCBATCH_NODE:-local}" >> "$m"
echo "start $t $$ $(date +%s.%N) ${HPCBATCH_NODE:-local}" >> "$m"
i=0
while [ "$i" -lt "$n" ] || { [ -n "$gate" ] && [ ! -e "$gate" ]; }; do
  sleep 0.1
  echo "tick $t $$ $(date +%s.%N)" >> "$m"
  i=$((i+1))
done
echo "end $t $$ $(date +%s.%N)" >> "$m"
"""


# ---- marks ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    task: str
    pid: int
    start: float
    last: float
    node: str = ""
    ended: bool = False


@dataclasses.dataclass
class Marks:
    """What the marks file says: every run, and the runs that found the lock taken."""

    runs: list[Run]
    locked_out: list[str]

    def of(self, task: str) -> list[Run]:
        return sorted((r for r in self.runs if r.task == task), key=lambda r: r.start)

    def overlaps(self) -> list[tuple[Run, Run]]:
        """Pairs of runs of one task whose marked intervals cross."""
        by_task: dict[str, list[Run]] = {}
        for r in self.runs:
            by_task.setdefault(r.task, []).append(r)
        out = []
        for runs in by_task.values():
            runs.sort(key=lambda r: r.start)
            for i, a in enumerate(runs):
                out += [(a, b) for b in runs[i + 1:] if b.start < a.last]
        return out

    def overlap_count(self) -> int:
        return len(self.overlaps()) + len(self.locked_out)


def read_marks(path: Path) -> Marks:
    runs: dict[tuple[str, int], Run] = {}
    locked_out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue  # a line being written
        kind, task, pid, t = parts[0], parts[1], int(parts[2]), float(parts[3])
        if kind == "overlap":
            locked_out.append(line)
        elif kind == "start":
            runs[(task, pid)] = Run(task, pid, t, t, parts[4] if len(parts) > 4 else "")
        elif (task, pid) in runs:
            run = runs[(task, pid)]
            run.last = max(run.last, t)
            run.ended = run.ended or kind == "end"
    return Marks(list(runs.values()), locked_out)


class Bench:
    """A marks file, a locks folder and the script, in one folder (no spaces: netns
    nodes' Open MPI and shells see the same paths)."""

    def __init__(self, d: Path):
        self.dir = d
        self.marks = d / "marks.txt"
        self.locks = d / "locks"
        self.locks.mkdir(parents=True)
        self.script = d / "marks.sh"
        self.script.write_text(MARKS_SH)

    def command(self, task: str, ticks: int = 0, gate: Path | None = None) -> str:
        cmd = f"sh '{self.script}' '{self.marks}' {task} {ticks} '{self.locks}'"
        return cmd + (f" '{gate}'" if gate else "")

    def argv(self, task: str, ticks: int = 0) -> list[str]:
        return ["sh", str(self.script), str(self.marks), task, str(ticks), str(self.locks)]

    def read(self) -> Marks:
        return read_marks(self.marks)

    def started(self, task: str, n: int = 1) -> bool:
        return len(self.read().of(task)) >= n


@pytest.fixture
def bench(tmp_path) -> Bench:
    import shutil
    if not shutil.which("flock"):
        pytest.skip("the runs' overlap check needs flock (util-linux)")
    return Bench(tmp_path / "bench")


# ---- processes -------------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            break
        pid = int(stat[stat.rindex(b")") + 2:].split()[1])
    return out


def processes_of(*needles: str) -> dict[int, str]:
    """Live processes (not this one or its ancestors) whose environment or command line
    holds one of these strings: {pid: command line}."""
    mine = _ancestors()
    keys = [n.encode() for n in needles if n]
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        cmd = _read(f"/proc/{entry}/cmdline")
        env = _read(f"/proc/{entry}/environ")
        if any(k in cmd or k in env for k in keys) and _alive(int(entry)):
            found[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HPCBATCH_HOME=str(home), COLUMNS="200", **extra)
    env.pop("HPCBATCH_DEBUG", None)
    return env


def popen_cli(home: Path, *args: str, **kw) -> subprocess.Popen:
    """The CLI as a background process in a session (and process group) of its own."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", *args],
                            env=cli_env(home), start_new_session=True, **kw)


@pytest.fixture(autouse=True)
def nothing_left(home):
    """No process of this test's home outlives it (agents, tasks, MPI ranks); what is
    left is killed and named."""
    children: list[subprocess.Popen] = []
    yield children
    for p in children:
        if p.poll() is None:
            p.kill()
        p.wait(30)
    try:
        poll(lambda: not processes_of(f"HPCBATCH_HOME={home}", str(home)), timeout_s=20,
             interval_s=0.1, what="no process of the test's home left")
    except AssertionError:
        left = processes_of(f"HPCBATCH_HOME={home}", str(home))
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if left:
            raise AssertionError(f"processes of {home} outlived the test: {left}") from None


def store_tasks(home: Path, job: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """The job's task rows and each task's attempt rows, read from the store."""
    store = Store(home / "state.db")
    try:
        rows = [dict(r) for r in store.list_tasks(job)]
        seqs = {r["seq"]: r["id"] for r in rows}
        attempts: dict[str, list[dict]] = {r["id"]: [] for r in rows}
        for a in store.dump_tables(["task_attempts"])["task_attempts"]:
            if a["seq"] in seqs:
                attempts[seqs[a["seq"]]].append(a)
    finally:
        store.close()
    for v in attempts.values():
        v.sort(key=lambda a: a["attempt"])
    return rows, attempts


# ---- coordinator and agent killed together, SIGHUP --------------------------------------

def _agent_pids(home: Path) -> set[int]:
    return {pid for pid, cmd in processes_of(str(home)).items() if "agent.py" in cmd}


def _close_terminal(home: Path, bench: Bench, children) -> subprocess.Popen:
    """`hpcbatch submit` on a terminal of its own (a pty it controls), which then closes:
    the kernel sends it SIGHUP."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(["setsid", "--ctty", sys.executable, "-m", "hpcbatch.cli",
                             "submit", "--job", "D", "--no-progress", "--",
                             *bench.argv("t", 30)],
                            env=cli_env(home), stdin=slave, stdout=slave, stderr=slave)
    children.append(proc)
    os.close(slave)
    said = bytearray()
    stop = threading.Event()

    def drain() -> None:  # a terminal nobody reads would block the CLI's writes
        # (never blocked in read(): a close() of the master would wait for that read)
        while not stop.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    said.extend(os.read(master, 4096))
                except OSError:
                    return
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        poll(lambda: bench.started("t"), timeout_s=60, what="the task's first run")
    finally:
        stop.set()
        reader.join(5)
        os.close(master)  # the terminal goes away: SIGHUP to its controlling process
    proc.wait(30)
    assert proc.returncode == -signal.SIGHUP, (proc.returncode, bytes(said))
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -KILL -- -PGID", "kill -KILL -- -PGID, and the agent",
                                 "SIGHUP: its terminal closes", "setsid + kill -HUP"])
def test_a_killed_submit_and_job_wait_never_run_a_task_twice_at_once(home, bench, how,
                                                                     nothing_left):
    """The issue's reproduction: `setsid hpcbatch submit --job D -- sh -c 'echo start
    $$ >> m; sleep; echo end $$ >> m' & kill -KILL -- -$!; hpcbatch job wait D`."""
    if how.startswith("SIGHUP"):
        _close_terminal(home, bench, nothing_left)
    else:
        proc = popen_cli(home, "submit", "--job", "D", "--no-progress", "--",
                         *bench.argv("t", 30))
        nothing_left.append(proc)
        poll(lambda: bench.started("t"), timeout_s=60, what="the task's first run")
        agents = _agent_pids(home)
        assert len(agents) == 1, agents
        if how.startswith("kill -KILL"):
            os.killpg(proc.pid, signal.SIGKILL)  # the agent is in a session of its own
            if how.endswith("the agent"):
                os.kill(agents.pop(), signal.SIGKILL)  # its task lives on, orphaned
        else:
            os.kill(proc.pid, signal.SIGHUP)
        proc.wait(30)
    t_kill = time.time()
    r = run_cli(home, "job", "wait", "D", "--no-progress", timeout_s=180)
    assert r.returncode == 0, r.stdout + r.stderr
    marks = bench.read()
    assert marks.overlap_count() == 0, (marks.overlaps(), marks.locked_out)
    runs = marks.of("t")
    assert len(runs) == 2 and not runs[0].ended and runs[1].ended, runs
    assert runs[0].last < t_kill + 5  # the first run was stopped, not left to run on
    rows, attempts = store_tasks(home, "D")
    assert [(r["state"], r["result"], r["requeue_count"]) for r in rows] == \
        [("completed", "success", 1)]
    assert [a["outcome"] for a in attempts["task-1"]] == ["requeue", "success"]


# ---- a partitioned node --------------------------------------------------------------

NO_NETNS = unavailable(ct.check_netns) or unavailable(ct.check_sshd)


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory):
    """Three sshd nodes, each in a network namespace of its own (links can be cut);
    nothing of it left afterwards."""
    if NO_NETNS:
        pytest.skip(f"a partition needs a --netns cluster: {NO_NETNS}")
    d = tmp_path_factory.mktemp("netns")
    info = ct.cluster_up(3, d, netns=True)
    try:
        yield info
    finally:
        ct.cluster_down(d)
        assert not ct.sshd_pids_under(d)
        assert not ct.network_leftovers(info)


def _ssh_pool(batch, info: ct.ClusterInfo, tmp_path: Path, names: list[str],
              pool: str = "part") -> None:
    spec = json.loads(info.pool_json.read_text())
    spec["hosts"] = [h for h in spec["hosts"] if h["name"] in names]
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node-roots")
    path = tmp_path / f"{pool}.json"
    path.write_text(json.dumps(spec))
    batch.pools.create(pool, "ssh", spec=str(path), inter_node_communication=False)

    def idle() -> bool:
        return sum(n.state == "idle" for n in batch.pools.nodes(pool)) == len(names)
    poll(idle, timeout_s=60, what=f"{names} idle")


PARTITION = dict(heartbeat_s=0.5, node_timeout_s=3.0, lease_s=3.0, kill_grace_s=1.0,
                 reconnect_min_s=1.0, reconnect_max_s=2.0)
LINK_DOWN_S = 10.0


@pytest.mark.slow
@pytest.mark.ssh
def test_a_partitioned_nodes_task_is_requeued_only_after_its_lease(netns_cluster, home,
                                                                   bench, tmp_path):
    """A long task; its node's link goes down for 10 s: the task runs again on the other
    node only after the cut-off copy's lease ran out (it stops itself), never beside it."""
    info = netns_cluster
    with hpcbatch.Batch(home, **PARTITION) as batch:
        _ssh_pool(batch, info, tmp_path, ["node1", "node2"])
        job = batch.jobs.create("p", pool="part")
        gate = tmp_path / "gate"  # (the requeued run ends once the link is back)
        job.add_task("t", bench.command("t", 0, gate))
        poll(lambda: bench.started("t") and len(bench.read().runs) == 1 and
             bench.read().of("t")[0].last > bench.read().of("t")[0].start,
             timeout_s=60, what="the task running")
        first = bench.read().of("t")[0]
        node = first.node
        other = {"node1": "node2", "node2": "node1"}[node]
        agent = [p for p, c in processes_of(str(tmp_path / "node-roots")).items()
                 if "agent.py" in c and f"--node-id {node} " in c]
        assert len(agent) == 1, agent
        cut = time.time()
        ct.set_link(info.directory, node, up=False)
        try:
            poll(lambda: bench.started("t", 2), timeout_s=30, interval_s=0.05,
                 what="the task requeued on the other node")
            # the cut-off agent fenced itself: gone while its link is still down
            poll(lambda: not _alive(agent[0]), timeout_s=PARTITION["kill_grace_s"] + 5,
                 what="the cut-off agent gone")
            assert time.time() - cut < LINK_DOWN_S
            rest = LINK_DOWN_S - (time.time() - cut)
            if rest > 0:
                time.sleep(rest)  # the fault's duration (~10 s), not a wait for a state
        finally:
            ct.set_link(info.directory, node, up=True)
            gate.touch()
        counts = job.wait(timeout_s=120)
        assert counts["succeeded"] == 1, counts
        marks = bench.read()
        runs = marks.of("t")
        assert marks.overlap_count() == 0, (marks.overlaps(), marks.locked_out)
        assert [r.node for r in runs] == [node, other], runs
        assert not runs[0].ended and runs[1].ended
        stopped = runs[0].last - cut
        waited = runs[1].start - cut
        print(f"partition: the cut-off run stopped {stopped:.2f} s after the cut; the "
              f"requeued run started {waited:.2f} s after it (lease {PARTITION['lease_s']} s)")
        assert waited > PARTITION["lease_s"]
        assert stopped < PARTITION["lease_s"] + PARTITION["kill_grace_s"] + 1.5
        t = job.task("t")
        assert [a.outcome for a in t.attempts()] == ["requeue", "success"]
        assert t.attempts()[0].node_id == node and t.node_id == other
    # the cut-off agent stopped itself; nothing of either agent outlives the pool
    poll(lambda: not processes_of(str(tmp_path / "node-roots")), timeout_s=20,
         what="no agent or task on the nodes")


@pytest.mark.slow
@pytest.mark.ssh
def test_a_coordinator_restarted_while_a_node_is_cut_off_waits_for_its_lease(
        netns_cluster, home, bench, tmp_path, nothing_left):
    """The coordinator dies (SIGKILL) just after a node's link went down, and a new one
    starts at once: the cut-off agent heard of neither, so its task runs on until its
    lease ends. The new coordinator must not run that task elsewhere before then
    (production timings, as `hpcbatch job wait` has them)."""
    info = netns_cluster
    spec = json.loads(info.pool_json.read_text())
    spec["hosts"] = [h for h in spec["hosts"] if h["name"] in ("node1", "node2")]
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node-roots")
    (tmp_path / "pool.json").write_text(json.dumps(spec))
    r = run_cli(home, "pool", "create", "part", "--spec", str(tmp_path / "pool.json"),
                "--no-inter-node-communication")
    assert r.returncode == 0, r.stdout + r.stderr
    gate = tmp_path / "gate"
    (tmp_path / "t.txt").write_text(bench.command("t", 0, gate) + "\n")
    r = run_cli(home, "submit", "--each-line", str(tmp_path / "t.txt"), "--job", "c",
                "--pool", "part", "--no-wait")
    assert r.returncode == 0, r.stdout + r.stderr
    proc = popen_cli(home, "job", "wait", "c", "--no-progress")
    nothing_left.append(proc)
    poll(lambda: bench.started("t"), timeout_s=60, what="the task running")
    node = bench.read().of("t")[0].node
    cut = time.time()
    ct.set_link(info.directory, node, up=False)
    try:
        proc.kill()
        proc.wait(30)
        proc = popen_cli(home, "job", "wait", "c", "--no-progress")
        nothing_left.append(proc)
        poll(lambda: bench.started("t", 2), timeout_s=60, interval_s=0.05,
             what="the task run again")
        rest = LINK_DOWN_S - (time.time() - cut)
        if rest > 0:
            time.sleep(rest)  # the fault's duration, not a wait for a state
    finally:
        ct.set_link(info.directory, node, up=True)
        gate.touch()
    t_gate = time.time()
    assert proc.wait(120) == 0
    print(f"job wait ended {time.time() - t_gate:.1f} s after the gate opened")
    marks = bench.read()
    runs = marks.of("t")
    print(f"restart during a cut: the cut-off run stopped {runs[0].last - cut:.2f} s after "
          f"the cut, the task ran again after {runs[1].start - cut:.2f} s")
    assert marks.overlap_count() == 0, (marks.overlaps(), marks.locked_out)
    assert runs[1].node != node


def _held_pool(tm):
    """A pool of n1 (its earlier agent may still run task 1) and n2 (up), held."""
    from hpcbatch import state as S
    st = S.CoordinatorState(tm, prefetch=0)
    st.handle(S.Started(0.0, (("j", 1),), 1))
    st.handle(S.PoolAdded(0.0, S.PoolInfo("p", 1), (S.NodeInfo("n1", "h1", 1),
                                                    S.NodeInfo("n2", "h2", 1))))
    st.handle(S.PoolHeld(0.0, "p", tm.fence_wait_s, ("n1",)))
    st.handle(S.WindowLoaded(0.0, "p", (S.TaskRow(1, "j", "t1", "p", 0),), True))
    st.handle(S.AgentUp(0.5, "p", "n2", 1))
    return st, st.handle(S.AgentHello(1.0, "p", "n2", 1, "/r/n2", 2))


@pytest.mark.parametrize("release", ["n1 reaped", "n1's new agent said hello", "the lease"])
def test_a_restarted_coordinator_places_nothing_while_an_earlier_agent_may_run(release):
    """The pure state: a pool held at start (PoolHeld) places nothing until every
    suspect node is reaped (sure), its new agent said hello, or the wait is over."""
    from hpcbatch import state as S
    from hpcbatch.timings import Timings
    tm = Timings(node_timeout_s=100.0)  # (no heartbeats in this test)
    st, out = _held_pool(tm)
    runs = lambda out: [i for i in out if isinstance(i, S.RunTask)]  # noqa: E731
    assert runs(out) == []
    assert runs(st.handle(S.NodeReaped(1.5, "p", "n1", False))) == []  # unreachable
    assert runs(st.handle(S.Tick(tm.fence_wait_s - 0.01))) == []
    if release == "n1 reaped":
        out = st.handle(S.NodeReaped(2.0, "p", "n1", True))
    elif release == "the lease":
        out = st.handle(S.Tick(tm.fence_wait_s))
    else:
        st.handle(S.AgentUp(2.0, "p", "n1", 1))
        out = st.handle(S.AgentHello(2.0, "p", "n1", 1, "/r/n1", 2))
    assert [(r.node_id, r.seq) for r in runs(out)] in ([("n2", 1)], [("n1", 1)])


@pytest.mark.slow
def test_a_killed_local_agent_is_fenced_before_its_task_runs_elsewhere(home, bench, tmp_path):
    _a_killed_agent_is_fenced(home, bench, tmp_path, None)


@pytest.mark.slow
@pytest.mark.ssh
def test_a_killed_ssh_agent_is_fenced_before_its_task_runs_elsewhere(ssh_cluster, home, bench,
                                                                     tmp_path):
    _a_killed_agent_is_fenced(home, bench, tmp_path, ssh_cluster)


def _a_killed_agent_is_fenced(home: Path, bench: Bench, tmp_path: Path, cluster) -> None:
    """SIGKILL of an agent leaves its task running with no agent (and no lease) to stop
    it: the coordinator's fence (here, or over SSH: the node answers) kills it, and only
    then is the task requeued; being sure, it does not wait out the lease."""
    with hpcbatch.Batch(home, **PARTITION) as batch:
        if cluster is not None:
            _ssh_pool(batch, cluster, tmp_path, ["node1", "node2"])
            roots = tmp_path / "node-roots"
        else:
            batch.pools.create("part", "local", target_nodes=2, task_slots_per_node=1)
            roots = home / "nodes" / "part"
        provider = "local" if cluster is None else "ssh"
        job = batch.jobs.create("k", pool="part")
        gate = tmp_path / "gate"
        job.add_task("t", bench.command("t", 0, gate))
        poll(lambda: bench.started("t"), timeout_s=60, what="the task running")
        node = job.task("t").node_id
        agent = [p for p, c in processes_of(str(roots)).items()
                 if "agent.py" in c and f"--node-id {node} " in c]
        assert len(agent) == 1, agent
        killed = time.time()
        os.kill(agent[0], signal.SIGKILL)
        poll(lambda: bench.started("t", 2), timeout_s=30, interval_s=0.05,
             what="the task requeued")
        gate.touch()
        counts = job.wait(timeout_s=60)
        assert counts["succeeded"] == 1, counts
        marks = bench.read()
        assert marks.overlap_count() == 0, (marks.overlaps(), marks.locked_out)
        runs = marks.of("t")
        waited = runs[1].start - killed
        print(f"killed {provider} agent: the task ran again {waited:.2f} s later")
        fence_wait = hpcbatch.client.Timings(**PARTITION).fence_wait_s
        assert waited < fence_wait, "the fence was sure: no need to wait out the lease"
        assert [a.outcome for a in job.task("t").attempts()] == ["requeue", "success"]


# ---- ten SIGKILLs of the coordinator in a 500-task job -------------------------------

@pytest.mark.slow
def test_ten_sigkills_of_the_coordinator_in_a_500_task_job(home, bench, tmp_path,
                                                          nothing_left):
    seed = int(os.environ.get("FENCING_SEED") or time.time_ns() % 10**6)
    rng = random.Random(seed)
    seed_note = f"(rerun with FENCING_SEED={seed})"
    # (marked with the task ids submit gives them: line-00001 ..)
    lines = [bench.command(f"line-{i:05d}", rng.choice((0, 0, 1, 2))) for i in range(1, 501)]
    (tmp_path / "tasks.txt").write_text("\n".join(lines) + "\n")
    r = run_cli(home, "submit", "--each-line", str(tmp_path / "tasks.txt"), "--job", "big",
                "--no-wait")
    assert r.returncode == 0, r.stdout + r.stderr
    for _ in range(10):
        before = len(bench.read().runs)
        proc = popen_cli(home, "job", "wait", "big", "--no-progress")
        nothing_left.append(proc)
        more = rng.randint(1, 35)
        poll(lambda b=before + more, p=proc: len(bench.read().runs) >= b or
             p.poll() is not None,
             timeout_s=120, interval_s=0.01, what=f"{more} more runs started")
        time.sleep(rng.random() * 0.2)  # a random point between two starts
        assert proc.poll() is None, f"the job ended before the kill {seed_note}"
        proc.kill()  # SIGKILL
        proc.wait(30)
    r = run_cli(home, "job", "wait", "big", "--no-progress", timeout_s=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows, attempts = store_tasks(home, "big")
    assert len(rows) == 500
    assert all((t["state"], t["result"]) == ("completed", "success") for t in rows)
    # each completed exactly once as far as the store is concerned
    assert all([a["outcome"] for a in attempts[t["id"]]].count("success") == 1 and
               {a["outcome"] for a in attempts[t["id"]]} <= {"success", "requeue"}
               for t in rows)
    marks = bench.read()
    assert marks.overlap_count() == 0, (marks.overlaps()[:5], marks.locked_out[:5], seed_note)
    assert {r.task for r in marks.runs if r.ended} == {t["id"] for t in rows}
    requeued = sum(t["requeue_count"] for t in rows)
    assert requeued >= 10, f"the kills should each have caught a run in flight {seed_note}"


# ---- a 200,000-task submit beside a running task ---------------------------------------

@pytest.mark.slow
def test_a_200k_task_submit_from_another_process_kills_no_running_task(home, bench, tmp_path,
                                                                      caplog):
    gate = tmp_path / "gate"
    n = 200_000
    big = tmp_path / "200k.txt"
    big.write_text("true\n" * n)
    caplog.set_level(logging.WARNING, logger="hpcbatch")
    with hpcbatch.Batch(home) as batch:  # production timings: a 4 s node timeout
        batch.pools.create("one", "local", target_nodes=1, task_slots_per_node=1)
        job = batch.jobs.create("a", pool="one")
        job.add_task("long", bench.command("long", 0, gate))
        poll(lambda: bench.started("long"), timeout_s=60, what="the long task running")
        seen: list[tuple[str, str | None]] = []
        stop = threading.Event()

        def watch() -> None:  # what the store says about the node, all along
            while not stop.is_set():
                seen.extend((nd.state, nd.reason) for nd in batch.pools.nodes("one"))
                stop.wait(0.1)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            t0 = time.monotonic()
            r = run_cli(home, "submit", "--each-line", str(big), "--job", "b", "--pool", "one",
                        "--no-wait", timeout_s=300)
            assert r.returncode == 0, r.stdout + r.stderr
            stored = time.monotonic() - t0
            state = batch.coordinator.state
            last = Store(home / "state.db")
            try:
                top = last.last_task_seq()
            finally:
                last.close()
            poll(lambda: state.last_seq >= top, timeout_s=120, interval_s=0.1,
                 what="the coordinator loading all 200,000 new tasks")
            loaded = time.monotonic() - t0 - stored
            gate.touch()
            long = job.task("long")
            poll(lambda: long.refresh().state == "completed", timeout_s=60,
                 what="the long task done")
            poll(lambda: batch.jobs.get("b").counts()["succeeded"] >= 10, timeout_s=60,
                 what="the new tasks running after it")
            attempts = [a.outcome for a in long.attempts()]
        finally:
            stop.set()
            watcher.join(5)
    print(f"200k submit: stored in {stored:.1f} s by the other process, loaded by the "
          f"coordinator {loaded:.1f} s later")
    assert long.result == "success" and long.requeue_count == 0 and long.retry_count == 0
    assert attempts == ["success"]
    assert len(bench.read().of("long")) == 1
    assert {s for s, _ in seen} <= {"idle", "running"}, sorted(set(seen))
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert not lost, lost


# ---- Open MPI leftovers ----------------------------------------------------------------

ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

SLEEPER = textwrap.dedent("""
    import os, sys, time
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()  # the shared-memory transport is up on every rank
    with open(os.path.join(os.environ["FENCING_GATE"], f"rank{MPI.COMM_WORLD.rank}"), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}")
    time.sleep(600)
""")

SLEEPING_KERNEL = textwrap.dedent("""
    import os, time
    import numpy as np
    from hpcbatch.kernels.api import Output
    DESCRIPTION = "writes its pid to $FENCING_GATE/rankN, then sleeps"
    PARAMS = {}
    OUTPUTS = {"n": Output("sum")}

    def run(comm):
        comm.Barrier()
        with open(os.path.join(os.environ["FENCING_GATE"], f"rank{comm.rank}"), "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}")
        time.sleep(600)
        return {"n": np.int64(1)}
""")


def _mpi_ready() -> str | None:
    import shutil
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "needs mpi4py"
    from hpcbatch.launch import mpi
    exe = shutil.which("mpiexec")
    if not exe or mpi.detect_flavour(exe) != "openmpi":
        return "needs Open MPI's mpiexec beside this python"
    return None


def _what_ranks_hold(gate: Path, ranks: int) -> dict:
    """The ranks' pids, their launcher's, the /dev/shm files they map and their session
    directories."""
    pids, parents, shm, sessions = [], set(), set(), set()
    for r in range(ranks):
        pid, ppid = map(int, (gate / f"rank{r}").read_text().split())
        pids.append(pid)
        parents.add(ppid)
        for line in _read(f"/proc/{pid}/maps").decode().splitlines():
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if path.startswith("/dev/shm/"):
                shm.add(path)
        env = dict(x.split("=", 1) for x in _read(f"/proc/{pid}/environ").decode(
            errors="replace").split("\0") if "=" in x)
        for k in ("PMIX_SERVER_TMPDIR",):
            if env.get(k):
                sessions.add(env[k])
    return {"ranks": pids, "launchers": parents, "shm": shm, "sessions": sessions}


def _mpi_leftovers(held: dict, tmpdirs: list[str], before: dict[str, set[str]]) -> list[str]:
    left = [f"process {p}" for p in [*held["ranks"], *held["launchers"]] if _alive(p)]
    left += [f for f in held["shm"] if os.path.exists(f)]
    left += [d for d in held["sessions"] if os.path.exists(d)]
    for d in tmpdirs:  # a session directory named after our launcher
        for name in set(os.listdir(d)) - before[d]:
            if name.startswith(("ompi.", "prte.")):
                left.append(os.path.join(d, name))
    left += [f"process {p}: {c}" for p, c in processes_of("prted", "prterun").items()
             if any(str(lp) in c for lp in held["launchers"])]
    return left


@pytest.fixture
def mpi_gate(tmp_path, monkeypatch) -> Path:
    reason = _mpi_ready()
    if reason:
        pytest.skip(reason)
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("FENCING_GATE", str(gate))
    for k, v in ROOT_OK.items():
        monkeypatch.setenv(k, v)
    return gate


@pytest.mark.slow
@pytest.mark.parametrize("how", ["timeout", "terminate", "agent SIGKILLed"])
def test_a_stopped_open_mpi_run_leaves_no_session_directory_shm_file_or_daemon(
        home, tmp_path, mpi_gate, how):
    tmpdirs = sorted({"/tmp", os.environ.get("TMPDIR") or "/tmp"})
    before = {d: set(os.listdir(d)) for d in tmpdirs}
    if how == "timeout":
        kernel = tmp_path / "sleeping.py"
        kernel.write_text(SLEEPING_KERNEL)
        proc = popen_cli(home, "run", str(kernel), "--ranks", "2", "--timeout", "10",
                         "-o", str(tmp_path / "out.h5"), "--no-progress",
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            poll(lambda: len(os.listdir(mpi_gate)) == 2, timeout_s=10, interval_s=0.05,
                 what="both ranks up")
            held = _what_ranks_hold(mpi_gate, 2)
            out = proc.communicate(timeout=120)[0].decode(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode != 0 and "timed out" in out.lower(), out
    else:
        script = tmp_path / "sleeper.py"
        script.write_text(SLEEPER)
        with hpcbatch.Batch(home, **FAST) as batch:
            job = batch.jobs.create("mpi")
            job.add_task("t", f"mpiexec --oversubscribe -n 2 {sys.executable} {script}")
            poll(lambda: len(os.listdir(mpi_gate)) == 2, timeout_s=60, interval_s=0.05,
                 what="both ranks up")
            held = _what_ranks_hold(mpi_gate, 2)
            assert held["shm"], "the ranks map no /dev/shm segment: nothing to check"
            if how == "terminate":
                job.terminate_task("t")
            else:
                agent = {n.id: n for n in batch.pools.nodes("local")}["local-1"].info["pid"]
                os.kill(agent, signal.SIGKILL)  # the node is lost: it is fenced
                poll(lambda: not any(map(_alive, held["ranks"])), timeout_s=30,
                     what="the ranks fenced")
                job.terminate_task("t")
            job.wait(timeout_s=60)
    with contextlib.suppress(AssertionError):  # (the attempt's end removes them)
        poll(lambda: not _mpi_leftovers(held, tmpdirs, before), timeout_s=15, interval_s=0.1)
    assert not _mpi_leftovers(held, tmpdirs, before)


WHERE_KERNEL = textwrap.dedent("""
    import os, time
    import numpy as np
    from hpcbatch.kernels.api import Output
    PARAMS = {}
    OUTPUTS = {"n": Output("sum")}

    def run(comm):
        comm.Barrier()
        node = os.environ.get("HPCBATCH_NODE", "?")
        with open(os.path.join(GATE, f"rank{comm.rank}"), "w") as f:
            f.write(f"{os.getpid()} {os.getppid()} {node}")
        time.sleep(600)
        return {"n": np.int64(1)}
""")


@pytest.mark.slow
@pytest.mark.ssh
def test_a_cut_off_primary_leaves_no_open_mpi_daemon_or_rank_on_the_other_node(
        netns_cluster, home, tmp_path, nothing_left):
    """`hpcbatch run` across two nodes; the primary's link goes down: the cut-off
    primary stops its own mpiexec when its lease ends, and Open MPI's prted on the other
    node (it carries no HPCBATCH variable: found by its rank's session) and its rank are
    reaped when the attempt ends, once the primary is fenced: seconds, not minutes. The
    run fails naming the lost node."""
    reason = _mpi_ready()
    if reason:
        pytest.skip(reason)
    info = netns_cluster
    spec = json.loads(info.pool_json.read_text())
    spec["hosts"] = [h for h in spec["hosts"] if h["name"] in ("node1", "node2")]
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "mpi-roots")  # (Open MPI: no spaces)
    (tmp_path / "mpi.json").write_text(json.dumps(spec))
    r = run_cli(home, "pool", "create", "mpi2", "--spec", str(tmp_path / "mpi.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    gate = tmp_path / "gate"
    gate.mkdir()
    kernel = tmp_path / "where.py"
    kernel.write_text(f"GATE = {str(gate)!r}\n" + WHERE_KERNEL)
    proc = popen_cli(home, "run", str(kernel), "--pool", "mpi2", "--nodes", "2",
                     "--ranks-per-node", "1", "-o", str(tmp_path / "out.h5"), "--no-progress",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    nothing_left.append(proc)
    poll(lambda: len(os.listdir(gate)) == 2, timeout_s=90, interval_s=0.05,
         what="both ranks up")
    ranks = [(gate / f"rank{i}").read_text().split() for i in (0, 1)]
    by_node = {node: (int(pid), int(ppid)) for pid, ppid, node in ranks}
    launcher = {n: _read(f"/proc/{pp}/cmdline").split(b"\0")[0].decode()
                for n, (_, pp) in by_node.items()}
    primary = next(n for n, exe in launcher.items() if "prted" not in exe)
    other = next(n for n in by_node if n != primary)
    assert "prted" in launcher[other], launcher
    cut = time.time()
    ct.set_link(info.directory, primary, up=False)
    try:
        gone: dict[str, float] = {}

        def both_gone() -> bool:
            for n, pids in by_node.items():
                if n not in gone and not any(map(_alive, pids)):
                    gone[n] = time.time() - cut
            return len(gone) == 2
        poll(both_gone, timeout_s=60, interval_s=0.05, what="every rank and launcher gone")
        reaped, stopped = gone[other], gone[primary]
        out = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        ct.set_link(info.directory, primary, up=True)
    print(f"cut-off primary: {other}'s prted and rank reaped {reaped:.2f} s after the cut, "
          f"{primary}'s mpiexec stopped by its lease after {stopped:.2f} s")
    assert proc.returncode != 0 and primary in out and "lost" in out, out
    # production timings: lost after the node timeout (4 s), fenced 7 s later (lease 4 s,
    # kill grace 2 s, heartbeat 1 s); the cut-off agent stops at its lease (4 s + grace)
    assert reaped < 4.0 + 7.0 + 6, reaped
    assert stopped < 4.0 + 7.0 + 6, stopped


# ---- symbolic links out of a task directory ------------------------------------------

def _outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


def test_a_working_directory_link_gets_no_resource_file_written_outside(home, tmp_path):
    outside = _outside(tmp_path)
    src = tmp_path / "res.txt"
    src.write_text("resource\n")
    cmd = (f"if [ -e ../tried ]; then cat sub/res.txt; else touch ../tried; rm -rf sub; "
           f"ln -s '{outside}' sub; exit 1; fi")
    with hpcbatch.Batch(home, **FAST) as batch:
        job = batch.jobs.create("j")
        job.add_task("t", cmd, max_task_retry_count=1,
                     resource_files=[{"source": str(src), "file_path": "sub/res.txt"}])
        job.wait(timeout_s=60)
        t = job.task("t")
        assert list(outside.iterdir()) == []
        assert t.result == "failure" and t.retry_count == 1, t.view
        assert "symbolic link" in (t.failure or ""), t.failure


def test_logs_do_not_follow_a_stdout_link_a_task_made(home, tmp_path, cli):
    secret = _outside(tmp_path) / "secret"
    secret.write_text("secret-text\n")
    with hpcbatch.Batch(home, **FAST) as batch:
        job = batch.jobs.create("j")
        job.add_task("t", f"echo mine; rm -f ../stdout.txt; ln -s '{secret}' ../stdout.txt")
        job.wait(timeout_s=60)
        t = job.task("t")
        assert t.result == "success", t.view
        with pytest.raises(hpcbatch.HpcBatchError, match="symbolic link"):
            t.stdout()
    r = cli("task", "logs", "j", "t")
    assert r.returncode == 2 and "secret-text" not in r.stdout + r.stderr, r
    assert "symbolic link" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert secret.read_text() == "secret-text\n"


def test_the_agent_never_writes_through_a_planted_stdout_link(home, tmp_path):
    """Under umask 000 another user could plant stdout.txt -> a file of ours before the
    task starts, or a task's first attempt leaves one for its retry: the agent replaces
    the link, never writes through it, and makes the directories 0700 whatever the umask."""
    victim = _outside(tmp_path) / "victim"
    victim.write_text("precious\n")
    tdir = home / "nodes" / "local" / "local-1" / "jobs" / "j" / "planted"
    old = os.umask(0)
    try:
        tdir.mkdir(parents=True, mode=0o700)
        (tdir / "stdout.txt").symlink_to(victim)
        (tdir / "stderr.txt").symlink_to(victim)
        with hpcbatch.Batch(home, **FAST) as batch:
            job = batch.jobs.create("j")
            job.add_task("planted", "echo hello")
            job.add_task("retried", "if [ -e ../tried ]; then echo again; else touch ../tried; "
                         f"rm -f ../stdout.txt; ln -s '{victim}' ../stdout.txt; exit 1; fi",
                         max_task_retry_count=1)
            counts = job.wait(timeout_s=60)
            assert counts["succeeded"] == 2, counts
            assert job.task("planted").stdout() == "hello\n"
            assert job.task("retried").stdout() == "again\n"
            tdir2 = Path(job.task("retried").task_dir)
    finally:
        os.umask(old)
    assert victim.read_text() == "precious\n"
    for d in (tdir2, tdir2 / "wd"):  # (the agent made these; the test made jobs/j)
        assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))
    for f in ("stdout.txt", "stderr.txt"):
        # a fresh file, and not writable by others whatever the umask
        assert not (tdir / f).is_symlink() and (tdir / f).stat().st_mode & 0o022 == 0, f
