"""The agent, as a real subprocess speaking its protocol over pipes."""

from __future__ import annotations

import queue
import time

import pytest
from helpers import pid_alive

from hpcbatch.transport import LocalTransport


class AgentUnderTest:
    def __init__(self, root):
        self.chan = LocalTransport().start_agent("n1", root, heartbeat_s=0.2)
        self.msgs: queue.Queue = queue.Queue()
        self.pending: list[dict] = []
        self.chan.listen(self.msgs.put)
        self.hello = self.expect("hello")

    def expect(self, ev: str, timeout_s: float = 10.0, **match):
        """Next message (or batched event) of kind ``ev`` matching ``match``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, item in enumerate(self.pending):
                if item.get("ev") == ev and all(item.get(k) == v for k, v in match.items()):
                    return self.pending.pop(i)
            try:
                msg = self.msgs.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {ev} {match} within {timeout_s} s") from None
            if msg is None:
                raise AssertionError(f"agent closed while waiting for {ev}")
            self.pending.extend(msg["items"] if msg.get("ev") == "events" else [msg])

    def run(self, tid, cmd, tmp, timeout_s=None, env=None):
        tdir = tmp / f"task-{tid}"
        self.chan.send({"op": "run", "id": tid, "cmd": cmd, "dir": str(tdir),
                        "timeout_s": timeout_s, "env": env or {}})
        return tdir


@pytest.fixture
def agent(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    yield a
    a.chan.close()


def wait_file(path, timeout_s=10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_hello_describes_the_node(agent, tmp_path):
    assert agent.hello["node_id"] == "n1"
    assert agent.hello["root"] == str(tmp_path / "node")
    assert (tmp_path / "node" / "shared").is_dir()


def test_runs_a_command_with_its_files_and_env(agent, tmp_path):
    tdir = agent.run(1, 'echo "out $GREETING"; echo err >&2; pwd; exit 7', tmp_path,
                     env={"GREETING": "hello world"})
    started = agent.expect("started", id=1)
    exited = agent.expect("exited", id=1)
    assert started["pid"] > 0
    assert exited["exit_code"] == 7 and exited["signal"] is None and not exited["timed_out"]
    assert exited["end"] >= exited["start"]
    assert set(exited["usage"]) == {"utime_s", "stime_s", "maxrss_kb"}
    assert (tdir / "stdout.txt").read_text() == f"out hello world\n{tdir / 'wd'}\n"
    assert (tdir / "stderr.txt").read_text() == "err\n"


def test_hostile_command_text_is_not_reinterpreted(agent, tmp_path):
    cmd = "printf '%s\\n' \"a b; echo x\" 'it'\"'\"'s'"
    tdir = agent.run(1, cmd, tmp_path)
    assert agent.expect("exited", id=1)["exit_code"] == 0
    assert (tdir / "stdout.txt").read_text() == "a b; echo x\nit's\n"


def test_timeout_kills_the_whole_process_group(agent, tmp_path):
    pidfile = tmp_path / "child.pid"
    agent.run(1, f"sleep 300 & echo $! > {pidfile}; wait", tmp_path, timeout_s=0.5)
    child = int(wait_file(pidfile))
    exited = agent.expect("exited", id=1, timeout_s=10)
    assert exited["timed_out"] is True
    assert exited["signal"] == 15  # SIGTERM reached the shell
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(child), "the task's child outlived the timeout"


def test_term_ignoring_task_gets_sigkill(agent, tmp_path):
    agent.run(1, "trap '' TERM; sleep 300", tmp_path, timeout_s=0.3)
    exited = agent.expect("exited", id=1, timeout_s=10)
    assert exited["timed_out"] and exited["signal"] in (9, 15)


def test_kill_op_terminates_a_task(agent, tmp_path):
    agent.run(1, "sleep 300", tmp_path)
    agent.expect("started", id=1)
    agent.chan.send({"op": "kill", "id": 1, "reason": "terminate"})
    exited = agent.expect("exited", id=1)
    assert exited["killed"] == "terminate" and exited["signal"] == 15


def test_leftover_background_processes_die_with_the_task(agent, tmp_path):
    pidfile = tmp_path / "bg.pid"
    agent.run(1, f"sleep 300 & echo $! > {pidfile}", tmp_path)
    assert agent.expect("exited", id=1)["exit_code"] == 0
    bg = int(wait_file(pidfile))
    deadline = time.monotonic() + 5
    while pid_alive(bg) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(bg)


def test_many_tasks_in_parallel(agent, tmp_path):
    for i in range(50):
        agent.run(i, f"exit {i % 3}", tmp_path)
    codes = {}
    while len(codes) < 50:
        ev = agent.expect("exited", timeout_s=20)
        codes[ev["id"]] = ev["exit_code"]
    assert codes == {i: i % 3 for i in range(50)}


def test_heartbeats_list_running_tasks(agent, tmp_path):
    agent.run(5, "sleep 300", tmp_path)
    agent.expect("started", id=5)
    hb = agent.expect("heartbeat", timeout_s=5)
    while 5 not in hb["running"]:
        hb = agent.expect("heartbeat", timeout_s=5)
    assert hb["running"] == [5]


def test_start_failure_is_reported(agent, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    agent.chan.send({"op": "run", "id": 1, "cmd": "true", "dir": str(blocker / "sub"),
                     "timeout_s": None, "env": {}})
    ev = agent.expect("exited", id=1)
    assert ev["start_failed"] and ev["exit_code"] is None


def test_coordinator_going_away_kills_tasks(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    pidfile = tmp_path / "p"
    a.run(1, f"echo $$ > {pidfile}; exec sleep 300", tmp_path)
    pid = int(wait_file(pidfile))
    agent_pid = a.chan.pid
    a.chan.close()  # stdin EOF
    deadline = time.monotonic() + 10
    while (pid_alive(pid) or pid_alive(agent_pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid) and not pid_alive(agent_pid)


# a child that leaves the task's process group but stays in its session, as Open MPI's
# launcher does with each local rank
OWN_GROUP = ("python3 -c 'import os, sys, time; os.setpgid(0, 0); "
             "open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(300)' {} & wait")


def wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), f"process {pid} outlived its task"


def test_a_killed_task_takes_processes_in_other_groups_of_its_session(agent, tmp_path):
    pidfile = tmp_path / "rank.pid"
    agent.run(1, OWN_GROUP.format(pidfile), tmp_path, timeout_s=0.5)
    rank = int(wait_file(pidfile))
    assert agent.expect("exited", id=1)["timed_out"]
    wait_gone(rank)


def test_coordinator_going_away_kills_other_groups_of_a_task_too(tmp_path):
    a = AgentUnderTest(tmp_path / "node")
    pidfile = tmp_path / "rank.pid"
    a.run(1, OWN_GROUP.format(pidfile), tmp_path)
    rank = int(wait_file(pidfile))
    a.chan.close()  # stdin EOF: the agent kills everything it started
    wait_gone(rank)
