"""The agent, as a real subprocess speaking its protocol over pipes."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import pid_alive, poll

from hpcbatch.launch import agent as agent_module
from hpcbatch.launch import protocol as P
from hpcbatch.timings import Timings
from hpcbatch.transport import AGENT_PATH, PROTOCOL_PATH, LocalTransport, agent_args

# the lease far away: these tests send no pings unless they test the lease
FAST = Timings(heartbeat_s=0.2, node_timeout_s=5, lease_s=600, kill_grace_s=1)


class AgentUnderTest:
    def __init__(self, root, timings: Timings = FAST, token: str = "", slots: int = 1,
                 chan=None):
        self.root = root
        self.chan = chan or LocalTransport().start_agent("n1", root, token=token,
                                                         timings=timings, slots=slots)
        self.msgs: queue.Queue = queue.Queue()
        self.pending: list = []
        self.chan.listen(self.msgs.put)
        self.hello = self.expect(P.Hello)

    def expect(self, kind: type, timeout_s: float = 10.0, **match):
        """Next message (or batched event) of class ``kind`` matching ``match``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, item in enumerate(self.pending):
                if type(item) is kind and all(getattr(item, k) == v for k, v in match.items()):
                    return self.pending.pop(i)
            try:
                msg = self.msgs.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {kind.__name__} {match} within {timeout_s} s; "
                                     f"seen: {self.pending[-5:]}") from None
            if msg is None:
                raise AssertionError(f"agent closed while waiting for {kind.__name__}")
            self.pending.extend(msg.items if isinstance(msg, P.Events) else [msg])

    def run(self, tid, cmd, tmp, timeout_s=None, env=None, **kw):
        tdir = kw.pop("tdir", None) or tmp / f"task-{tid}"
        self.chan.send(P.Run(id=tid, cmd=cmd, dir=str(tdir), env=env or {},
                             timeout_s=timeout_s, **kw))
        return tdir

    def close(self) -> None:
        self.chan.close()
        assert self.chan.wait_closed(30), "the agent did not end"
        assert not pid_alive(self.chan.pid or self.hello.pid)


@pytest.fixture
def agent(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    yield a
    a.close()


def wait_file(path, timeout_s=10.0) -> str:
    return poll(lambda: path.exists() and path.read_text().strip() and path.read_text(),
                timeout_s, what=f"{path} written")


def wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    poll(lambda: not pid_alive(pid), timeout_s, what=f"process {pid} gone (it outlived its "
         "task)")


def test_hello_describes_the_node(agent, tmp_path):
    assert agent.hello.node_id == "n1"
    assert agent.hello.root == str(tmp_path / "node")
    assert agent.hello.protocol == P.PROTOCOL_VERSION
    assert agent.hello.token == agent.chan.token and agent.hello.pid == agent.chan.pid
    assert (tmp_path / "node" / "shared").is_dir()


def test_runs_a_command_with_its_files_and_env(agent, tmp_path):
    tdir = agent.run(1, 'echo "out $GREETING"; echo err >&2; pwd; exit 7', tmp_path,
                     env={"GREETING": "hello world"})
    started = agent.expect(P.Started, id=1)
    exited = agent.expect(P.Exited, id=1)
    assert started.pid > 0
    assert exited.exit_code == 7 and exited.signal is None and not exited.timed_out
    assert exited.end >= exited.start
    assert set(exited.usage) == {"utime_s", "stime_s", "maxrss_kb"}
    assert (tdir / "stdout.txt").read_text() == f"out hello world\n{tdir / 'wd'}\n"
    assert (tdir / "stderr.txt").read_text() == "err\n"


def test_hostile_command_text_is_not_reinterpreted(agent, tmp_path):
    cmd = "printf '%s\\n' \"a b; echo x\" 'it'\"'\"'s'"
    tdir = agent.run(1, cmd, tmp_path)
    assert agent.expect(P.Exited, id=1).exit_code == 0
    assert (tdir / "stdout.txt").read_text() == "a b; echo x\nit's\n"


def test_timeout_kills_the_whole_process_group(agent, tmp_path):
    pidfile = tmp_path / "child.pid"
    agent.run(1, f"sleep 300 & echo $! > {pidfile}; wait", tmp_path, timeout_s=0.5)
    child = int(wait_file(pidfile))
    exited = agent.expect(P.Exited, id=1, timeout_s=10)
    assert exited.timed_out is True
    assert exited.signal == 15  # SIGTERM reached the shell
    wait_gone(child)


def test_term_ignoring_task_gets_sigkill(agent, tmp_path):
    """Shell and sleep both ignore SIGTERM: only the SIGKILL after the grace ends them."""
    pidfile = tmp_path / "sleep.pid"
    agent.run(1, f"trap '' TERM; sleep 300 & echo $! > {pidfile}; wait", tmp_path,
              timeout_s=0.3)
    child = int(wait_file(pidfile))
    exited = agent.expect(P.Exited, id=1, timeout_s=10)
    assert exited.timed_out and exited.signal == signal.SIGKILL
    assert exited.end - exited.start >= 0.3 + FAST.kill_grace_s - 0.05  # after the grace
    wait_gone(child)


def test_kill_op_terminates_a_task(agent, tmp_path):
    agent.run(1, "sleep 300", tmp_path)
    agent.expect(P.Started, id=1)
    agent.chan.send(P.Kill(id=1, reason="terminate"))
    exited = agent.expect(P.Exited, id=1)
    assert exited.killed == "terminate" and exited.signal == 15


def test_leftover_background_processes_die_with_the_task(agent, tmp_path):
    pidfile = tmp_path / "bg.pid"
    agent.run(1, f"sleep 300 & echo $! > {pidfile}", tmp_path)
    assert agent.expect(P.Exited, id=1).exit_code == 0
    wait_gone(int(wait_file(pidfile)))


def test_many_tasks_in_parallel(tmp_path):
    a = AgentUnderTest(tmp_path / "node", slots=8)
    try:
        gate = tmp_path / "gate"
        # eight at once, each waiting until all eight have started: only parallel passes
        for i in range(8):
            a.run(i, f"touch {tmp_path}/up.{i}; while [ ! -e {gate} ]; do sleep 0.01; done; "
                     f"exit {i % 3}", tmp_path)
        poll(lambda: all((tmp_path / f"up.{i}").exists() for i in range(8)), 20,
             what="eight tasks running at once")
        gate.touch()
        for i in range(8, 50):
            a.run(i, f"exit {i % 3}", tmp_path)
        codes = {}
        while len(codes) < 50:
            ev = a.expect(P.Exited, timeout_s=20)
            codes[ev.id] = ev.exit_code
        assert codes == {i: i % 3 for i in range(50)}
    finally:
        a.close()


def test_heartbeats_list_running_tasks(agent, tmp_path):
    agent.run(5, "sleep 300", tmp_path)
    agent.expect(P.Started, id=5)
    hb = agent.expect(P.Heartbeat, timeout_s=5)
    while 5 not in hb.running:
        hb = agent.expect(P.Heartbeat, timeout_s=5)
    assert hb.running == (5,)


def test_start_failure_is_reported(agent, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    agent.run(1, "true", tmp_path, tdir=blocker / "sub")
    ev = agent.expect(P.Exited, id=1)
    assert ev.start_failed and ev.exit_code is None


def test_coordinator_going_away_kills_tasks(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    pidfile = tmp_path / "p"
    a.run(1, f"echo $$ > {pidfile}; exec sleep 300", tmp_path)
    pid = int(wait_file(pidfile))
    agent_pid = a.chan.pid
    a.chan.close()  # stdin EOF
    poll(lambda: not pid_alive(pid) and not pid_alive(agent_pid), 10,
         what="the task and the agent gone")
    assert a.chan.wait_closed(10)


# a child that leaves the task's process group but stays in its session, as Open MPI's
# launcher does with each local rank
OWN_GROUP = ("python3 -c 'import os, sys, time; os.setpgid(0, 0); "
             "open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(300)' {} & wait")


def test_a_killed_task_takes_processes_in_other_groups_of_its_session(agent, tmp_path):
    pidfile = tmp_path / "rank.pid"
    agent.run(1, OWN_GROUP.format(pidfile), tmp_path, timeout_s=0.5)
    rank = int(wait_file(pidfile))
    assert agent.expect(P.Exited, id=1).timed_out
    wait_gone(rank)


def test_coordinator_going_away_kills_other_groups_of_a_task_too(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    pidfile = tmp_path / "rank.pid"
    a.run(1, OWN_GROUP.format(pidfile), tmp_path)
    rank = int(wait_file(pidfile))
    a.chan.close()  # stdin EOF: the agent kills everything it started
    wait_gone(rank)
    assert a.chan.wait_closed(10)


# ---- one bad task is that task's failure, never the agent's ----------------------------

def test_a_nul_byte_in_the_environment_fails_that_task_and_the_next_runs(agent, tmp_path):
    agent.run(1, "echo never", tmp_path, env={"X": "a\0b"})
    ev = agent.expect(P.Exited, id=1)
    assert ev.exit_code is None and "NUL" in ev.start_failed and "X" in ev.start_failed
    agent.run(2, "echo fine", tmp_path / "x", env={"Y": "ok"})
    assert agent.expect(P.Exited, id=2).exit_code == 0
    assert pid_alive(agent.chan.pid)


def test_odd_file_names_and_task_dirs_fail_only_their_task(agent, tmp_path):
    agent.run(1, "true", tmp_path, files={"../escape": "x"})
    assert "refusing file name" in agent.expect(P.Exited, id=1).start_failed
    agent.run(2, "true", tmp_path, tdir=agent.root)  # the node root itself
    assert "node root" in agent.expect(P.Exited, id=2).start_failed
    assert not (tmp_path / "escape").exists()
    agent.run(3, "true", tmp_path)
    assert agent.expect(P.Exited, id=3).exit_code == 0


class RawAgent:
    """The agent script run directly, spoken to in raw bytes."""

    def __init__(self, cmd: list[str], **kw):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, **kw)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.put(P.decode_ev(line))
        self.lines.put(None)

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def until(self, pred, timeout_s: float = 10.0) -> list:
        """Messages and items up to (and including) the first that satisfies pred."""
        seen, end = [], time.monotonic() + timeout_s
        while True:
            msg = self.lines.get(timeout=max(end - time.monotonic(), 0.01))
            assert msg is not None, f"agent ended; saw {seen}"
            for m in (msg.items if isinstance(msg, P.Events) else (msg,)):
                seen.append(m)
                if pred(m):
                    return seen

    def stop(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(20)
        err = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err


def raw_agent(root, *extra: str, python=sys.executable, script=AGENT_PATH, **kw) -> RawAgent:
    args = agent_args("n1", root, token="rawtoken", timings=FAST, slots=1)
    return RawAgent([python, str(script), *args, *extra], **kw)


def test_malformed_lines_are_answered_with_errors_and_the_agent_goes_on(tmp_path):
    a = raw_agent(tmp_path / "node")
    try:
        assert isinstance(a.until(lambda m: True)[0], P.Hello)
        a.write(b"this is not json\n[1, 2]\n" b'{"op": "launch"}\n' b'{"op": "run", "id": 1}\n'
                b'{"op": "run", "id": 1, "cmd": "true", "dir": "d", "env": {"A": 1}}\n')
        run = P.Run(id=7, cmd="echo alive", dir=str(tmp_path / "t7"), env={})
        a.write(P.encode(run))
        seen = a.until(lambda m: isinstance(m, P.Exited) and m.id == 7)
        errors = [m.message for m in seen if isinstance(m, P.Error)]
        assert len(errors) == 5, errors
        assert "not JSON" in errors[0] and "not a JSON object" in errors[1]
        assert "'launch'" in errors[2] and "'cmd' is missing" in errors[3]
        assert "'env'" in errors[4] and "'A'" in errors[4]
        assert seen[-1].exit_code == 0
        assert (tmp_path / "t7" / "stdout.txt").read_text() == "alive\n"
    finally:
        err = a.stop()
    assert err.count("skipped a line") == 5


def test_the_uploaded_pair_runs_without_hpcbatch_and_beside_stale_copies(tmp_path):
    """What SSHTransport uploads: agent.py + protocol.py in one folder. A stale hpcbatch
    and a foreign `protocol` module on the node's path change nothing."""
    node = tmp_path / "upload"
    node.mkdir()
    shutil.copy(AGENT_PATH, node / "agent.py")
    shutil.copy(PROTOCOL_PATH, node / "protocol.py")
    stale = tmp_path / "site"
    (stale / "hpcbatch" / "launch").mkdir(parents=True)
    for f in ("hpcbatch/__init__.py", "hpcbatch/launch/__init__.py",
              "hpcbatch/launch/protocol.py", "protocol.py"):
        (stale / f).write_text("raise ImportError('a stale copy was imported')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(stale)
    a = raw_agent(tmp_path / "node", script=node / "agent.py", env=env, cwd=str(stale))
    try:
        hello = a.until(lambda m: True)[0]
        assert isinstance(hello, P.Hello) and hello.protocol == P.PROTOCOL_VERSION
        assert hello.token == "rawtoken"
        a.write(P.encode(P.Run(id=1, cmd="true", dir=str(tmp_path / "t1"), env={})))
        assert a.until(lambda m: isinstance(m, P.Exited))[-1].exit_code == 0
    finally:
        err = a.stop()
    assert "stale" not in err


def test_sighup_and_sigint_do_not_stop_the_agent(tmp_path):
    agent = AgentUnderTest(tmp_path / "node", slots=2)
    try:
        agent.run(1, "sleep 300", tmp_path)
        agent.expect(P.Started, id=1)
        os.kill(agent.chan.pid, signal.SIGHUP)
        os.kill(agent.chan.pid, signal.SIGINT)
        agent.run(2, "echo still here", tmp_path)
        assert agent.expect(P.Exited, id=2).exit_code == 0
        assert pid_alive(agent.chan.pid)
        agent.chan.send(P.Kill(id=1))
        agent.expect(P.Exited, id=1)
    finally:
        agent.close()


def test_tasks_get_default_signal_dispositions(agent, tmp_path):
    """The agent ignores SIGHUP/SIGINT (and Python SIGPIPE); its tasks must not."""
    tdir = agent.run(1, "grep -E '^Sig(Ign|Cgt)' /proc/self/status", tmp_path)
    assert agent.expect(P.Exited, id=1).exit_code == 0
    ignored = int((tdir / "stdout.txt").read_text().split()[1], 16)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        assert not ignored & (1 << (sig - 1)), f"{sig!r} ignored in the task"


# ---- TMPDIR, symlinks, modes -------------------------------------------------------------

def test_each_task_has_its_own_tmpdir_inside_its_task_dir_removed_after(agent, tmp_path):
    gate = tmp_path / "gate"
    tdir = agent.run(1, 'printf "%s\\n" "$TMPDIR" "$PRTE_MCA_prte_local_tmpdir_base" '
                        '"$OMPI_MCA_orte_local_tmpdir_base" "$HPCBATCH_AGENT_TOKEN" > vars; '
                        'stat -c %a "$TMPDIR" >> vars; mkdir -p "$TMPDIR/ompi.1/x"; '
                        f'touch "$TMPDIR/ompi.1/x/f" ready; while [ ! -e {gate} ]; do sleep 0.01; '
                        'done', tmp_path)
    poll((tdir / "wd" / "ready").exists, 10, what="the task's files")
    lines = (tdir / "wd" / "vars").read_text().split("\n")[:-1]
    tmp = str(tdir / "tmp")
    assert lines == [tmp, tmp, tmp, agent.chan.token, "700"]
    assert (tdir / "tmp" / "ompi.1" / "x" / "f").exists()
    gate.touch()
    assert agent.expect(P.Exited, id=1).exit_code == 0
    assert not (tdir / "tmp").exists()


def test_a_task_that_names_its_own_tmpdir_keeps_it(agent, tmp_path):
    tdir = agent.run(1, 'echo "$TMPDIR"', tmp_path, env={"TMPDIR": "/scratch/me"})
    assert agent.expect(P.Exited, id=1).exit_code == 0
    assert (tdir / "stdout.txt").read_text() == "/scratch/me\n"


def test_a_planted_stdout_symlink_is_not_followed(agent, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    tdir = tmp_path / "task-1"
    tdir.mkdir()
    (tdir / "stdout.txt").symlink_to(victim)
    (tdir / "hostfile").symlink_to(victim)
    agent.run(1, "echo written", tmp_path, files={"hostfile": "node1 slots=1\n"})
    assert agent.expect(P.Exited, id=1).exit_code == 0
    assert victim.read_text() == "precious\n"
    assert not (tdir / "stdout.txt").is_symlink()
    assert (tdir / "stdout.txt").read_text() == "written\n"
    assert (tdir / "hostfile").read_text() == "node1 slots=1\n"


def test_a_symlinked_task_dir_component_is_refused(agent, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a job folder under the node root replaced by a link
    (agent.root / "jobs" / "J").symlink_to(elsewhere, target_is_directory=True)
    agent.run(1, "echo x > out", tmp_path, tdir=agent.root / "jobs" / "J" / "T")
    assert "symbolic link" in agent.expect(P.Exited, id=1).start_failed
    # a working directory replaced by a link (by the task's previous attempt)
    tdir = tmp_path / "task-2"
    tdir.mkdir()
    (tdir / "wd").symlink_to(elsewhere, target_is_directory=True)
    agent.run(2, "echo x > out", tmp_path)
    assert "symbolic link" in agent.expect(P.Exited, id=2).start_failed
    assert list(elsewhere.iterdir()) == []


def test_task_dirs_are_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        a = AgentUnderTest(tmp_path / "node")
    finally:
        os.umask(old)
    try:
        tdir = a.root / "jobs" / "J" / "T"
        a.run(1, "true", tmp_path, tdir=tdir, dirs=("shared",))
        assert a.expect(P.Exited, id=1).exit_code == 0
        for d in (a.root / "jobs" / "J", tdir, tdir / "wd", tdir / "shared"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    finally:
        a.close()


# ---- the lease ------------------------------------------------------------------------

def test_an_agent_that_hears_nothing_for_its_lease_kills_its_tasks_and_exits(tmp_path):
    a = AgentUnderTest(tmp_path / "node", timings=FAST.replace(lease_s=1.5))
    pidfile = tmp_path / "rank.pid"
    tpid = tmp_path / "task.pid"
    a.run(1, f"echo $$ > {tpid}; " + OWN_GROUP.format(pidfile), tmp_path)
    rank, task = int(wait_file(pidfile)), int(wait_file(tpid))
    t0 = time.monotonic()
    exited = a.expect(P.Exited, id=1, timeout_s=15)
    assert exited.killed == P.KILLED_LEASE
    assert "lease" in a.expect(P.Error, timeout_s=5).message
    a.expect(P.Bye, timeout_s=5)
    wait_gone(rank)
    wait_gone(task)
    poll(lambda: not pid_alive(a.chan.pid), 10, what="the agent's exit")
    assert time.monotonic() - t0 < 10
    assert not (a.root / "agents" / f"{a.chan.token}.json").exists()
    a.close()


@pytest.mark.slow
def test_pings_keep_the_lease(tmp_path):
    a = AgentUnderTest(tmp_path / "node", timings=FAST.replace(lease_s=1))
    try:
        tpid = tmp_path / "task.pid"
        a.run(1, f"echo $$ > {tpid}; exec sleep 300", tmp_path)
        task = int(wait_file(tpid))
        end = time.monotonic() + 3.5  # well past the lease
        while time.monotonic() < end:
            assert a.chan.send(P.Ping(t=time.time()))
            time.sleep(0.2)
        assert pid_alive(task) and pid_alive(a.chan.pid)
        a.chan.send(P.Kill(id=1))
        assert a.expect(P.Exited, id=1).killed == "terminate"
    finally:
        a.close()


# ---- orphan records and reaping -----------------------------------------------------------

def read_record(root, token) -> dict:
    path = root / "agents" / f"{token}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return json.loads(path.read_text())


def test_the_record_lists_running_tasks_and_goes_with_a_clean_exit(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    tpid = tmp_path / "task.pid"
    a.run("7.a", f"echo $$ > {tpid}; exec sleep 300", tmp_path)
    task = int(wait_file(tpid))
    a.expect(P.Started, id="7.a")
    rec = read_record(a.root, a.chan.token)
    assert rec["pid"] == a.chan.pid and rec["token"] == a.chan.token
    assert [(t["id"], t["pid"], t["sid"]) for t in rec["tasks"]] == [("7.a", task, task)]
    a.close()
    assert not pid_alive(task)
    assert not (a.root / "agents" / f"{a.chan.token}.json").exists()


def _leave_orphans(tmp_path):
    """An agent SIGKILLed under a task that has a child in a session of its own: both
    live on. The task cleared its environment (no token there): only the record leads
    to it. Returns (the dead agent's channel, task pid, escaped child pid)."""
    a = AgentUnderTest(tmp_path / "node")
    tpid, cpid = tmp_path / "task.pid", tmp_path / "child.pid"
    a.run(1, f"echo $$ > {tpid}; setsid sh -c 'echo $$ > {cpid}; exec sleep 300' & "
             "exec env -i sleep 300", tmp_path)
    task, child = int(wait_file(tpid)), int(wait_file(cpid))
    a.expect(P.Started, id=1)
    poll(lambda: read_record(a.root, a.chan.token)["tasks"], 5, what="the task recorded")
    environ = Path(f"/proc/{task}/environ")
    poll(lambda: P.AGENT_TOKEN_ENV.encode() not in environ.read_bytes(), 5, what="env -i")
    os.kill(a.chan.pid, signal.SIGKILL)
    poll(lambda: not pid_alive(a.chan.pid), 10, what="the agent's death")
    assert pid_alive(task) and pid_alive(child)
    return a, task, child


def test_reap_stale_agents_kills_what_a_killed_agent_left(tmp_path):
    a, task, child = _leave_orphans(tmp_path)
    try:
        killed = agent_module.reap_stale_agents(str(a.root))
        assert task in killed and child in killed
        wait_gone(task)
        wait_gone(child)
        assert list((a.root / "agents").iterdir()) == []
    finally:
        for pid in (task, child):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        a.chan.close(abort=True)
        assert a.chan.wait_closed(30)


def test_a_new_agent_reaps_what_the_last_one_left(tmp_path):
    a, task, child = _leave_orphans(tmp_path)
    try:
        b = AgentUnderTest(tmp_path / "node")  # --reap-stale
        reaped = b.expect(P.Reaped, timeout_s=10)
        assert {task, child} <= set(reaped.pids)
        wait_gone(task)
        wait_gone(child)
        assert [p.name for p in (b.root / "agents").iterdir()] == [f"{b.chan.token}.json"]
        b.close()
    finally:
        for pid in (task, child):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        a.chan.close(abort=True)
        assert a.chan.wait_closed(30)


def test_a_record_whose_pids_were_reused_kills_nothing(tmp_path):
    root = tmp_path / "node"
    (root / "agents").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        start = agent_module.proc_start_time(bystander.pid)
        agent_module.write_record(str(root), "old", {
            "token": "old", "pid": bystander.pid, "start": start - 1,
            "boot": agent_module.boot_id(),
            "tasks": [{"id": 1, "pid": bystander.pid, "sid": bystander.pid,
                       "spawned": start / agent_module.CLK_TCK - 5}]})
        assert agent_module.reap_stale_agents(str(root)) == []
        assert pid_alive(bystander.pid)
        assert not (root / "agents" / "old.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_reap_by_environment_takes_the_session_and_by_session_id(agent, tmp_path):
    """Like Open MPI's prted: a process without the task's variables in the session of
    one that has them goes too; Reap(sessions=...) takes a whole session."""
    bg = tmp_path / "bg.pid"
    marked = subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {bg}; "
                               "exec env HPCBATCH_REAP_TEST=1 sleep 300"],
                              start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    daemon = 0
    try:
        daemon = int(wait_file(bg))
        environ = Path(f"/proc/{marked.pid}/environ")
        poll(lambda: b"HPCBATCH_REAP_TEST=1" in environ.read_bytes(), 5, what="the exec")
        agent.chan.send(P.Reap(match={"HPCBATCH_REAP_TEST": "1"}))
        reaped = agent.expect(P.Reaped)
        assert {marked.pid, daemon} <= set(reaped.pids)
        assert reaped.match == {"HPCBATCH_REAP_TEST": "1"}
        wait_gone(daemon)
        assert marked.wait(5) == -9
        assert other.poll() is None
        agent.chan.send(P.Reap(match={}, sessions=(other.pid,)))
        assert other.pid in agent.expect(P.Reaped).pids
        assert other.wait(5) == -9
    finally:
        for p in (marked, other):
            if p.poll() is None:
                p.kill()
                p.wait()
        if daemon and pid_alive(daemon):
            os.kill(daemon, signal.SIGKILL)


# ---- the channel: a stopped agent never blocks the caller ----------------------------------

def test_a_stopped_agent_marks_its_channel_broken_without_blocking_sends(tmp_path):
    a = AgentUnderTest(tmp_path / "node", timings=FAST.replace(node_timeout_s=1))
    tpid = tmp_path / "task.pid"
    try:
        a.run(1, f"echo $$ > {tpid}; exec sleep 300", tmp_path)
        task = int(wait_file(tpid))
        a.expect(P.Started, id=1)
        poll(lambda: read_record(a.root, a.chan.token)["tasks"], 5, what="the task recorded")
        os.kill(a.chan.pid, signal.SIGSTOP)
        big = P.Run(id=2, cmd="true " + "x" * 300_000, dir=str(tmp_path / "t2"), env={})
        t0 = time.monotonic()
        assert a.chan.send(big)  # more than a pipe holds: the writer thread blocks
        assert a.chan.send(big)
        assert time.monotonic() - t0 < 0.5
        poll(lambda: not a.chan.send(P.Ping()), 10, what="the channel marked broken")
        assert "has not read its input" in a.chan.broken
        poll(lambda: any(m is None for m in drain(a.msgs)), 5, what="the end delivered")
        t0 = time.monotonic()
        a.chan.close(abort=True)
        assert time.monotonic() - t0 < 0.5
        assert a.chan.wait_closed(30)
        assert not pid_alive(a.chan.pid)
        wait_gone(task)  # the agent died SIGKILLed: its record led to the task
    finally:
        if pid_alive(a.chan.pid):
            os.kill(a.chan.pid, signal.SIGKILL)


def drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


# ---- over SSH: the same agent, uploaded with its protocol ---------------------------------

@pytest.mark.ssh
def test_an_agent_over_ssh_is_uploaded_with_its_protocol_and_fenced_on_abort(ssh_targets,
                                                                              tmp_path):
    from hpcbatch._version import __version__
    from hpcbatch.transport import SSHTransport, agent_digest

    root = tmp_path / "ssh node"
    a = AgentUnderTest(root, chan=SSHTransport().start_agent(
        ssh_targets[0], "node1", str(root), timings=FAST))
    assert a.hello.protocol == P.PROTOCOL_VERSION and a.hello.token == a.chan.token
    assert a.chan.pid is None  # (a remote agent's pid is in its hello)
    up = Path.home() / ".hpcbatch" / f"agent-{__version__}-{agent_digest()}"
    assert (up / "agent.py").read_bytes() == AGENT_PATH.read_bytes()
    assert (up / "protocol.py").read_bytes() == PROTOCOL_PATH.read_bytes()
    tdir = a.run(1, "echo over ssh", tmp_path)
    assert a.expect(P.Exited, id=1).exit_code == 0
    assert (tdir / "stdout.txt").read_text() == "over ssh\n"
    a.close()  # graceful: EOF, the agent exits, its record goes
    assert not (root / "agents" / f"{a.hello.token}.json").exists()

    b = AgentUnderTest(root, chan=SSHTransport().start_agent(
        ssh_targets[0], "node1", str(root), timings=FAST))
    tpid = tmp_path / "task.pid"
    b.run(2, f"echo $$ > {tpid}; exec sleep 300", tmp_path)
    task = int(wait_file(tpid))
    t0 = time.monotonic()
    b.chan.close(abort=True)  # a lost node: the connection is reset, nothing more sent
    assert time.monotonic() - t0 < 0.5
    assert b.chan.wait_closed(10)
    wait_gone(task, 15)  # sshd ends the session: the agent sees EOF and stops its task
    poll(lambda: not pid_alive(b.hello.pid), 15, what="the remote agent's exit")
