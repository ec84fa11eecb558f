"""SSH pools against real OpenSSH sshd nodes from `hpcbatch cluster up` (loopback ports).

Pools use the session's three nodes (tests/conftest_ssh.py); a test that kills or
restarts nodes makes a cluster of its own (make_cluster)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_ssh import take_down
from helpers import barrier, gate, pid_alive, poll, processes_with, run_cli, snapshot

from hpcbatch.errors import Conflict
from hpcbatch.launch.cluster import cluster_status, kill_node, start_node
from hpcbatch.providers import home_id


@pytest.fixture
def cluster(ssh_cluster) -> Path:
    """The folder of the session's three sshd nodes, node1..node3."""
    return ssh_cluster.directory


def spec_for(cluster: Path, names: list[str], tmp_path: Path, **extra) -> Path:
    spec = json.loads((cluster / "pool.json").read_text())
    spec["hosts"] = [h for h in spec["hosts"] if h["name"] in names]
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node roots")  # not under the real ~
    spec.update(extra)
    path = tmp_path / f"pool-{'-'.join(names)}.json"
    path.write_text(json.dumps(spec))
    return path


def wait_idle(batch, pool: str, n: int) -> None:
    try:
        poll(lambda: sum(nd["state"] == "idle" for nd in batch.pools.nodes(pool)) == n,
             timeout_s=30, what=f"{n} idle nodes in {pool}")
    except AssertionError:
        states = [(nd["id"], nd["state"], nd["reason"]) for nd in batch.pools.nodes(pool)]
        raise AssertionError(f"{n} idle nodes in {pool} not reached: {states}") from None


def ssh_pool(batch, cluster: Path, tmp_path: Path, pool: str, names: list[str],
             **pool_options) -> None:
    """An SSH pool of those cluster nodes, all idle."""
    batch.pools.create(pool, "ssh", spec=str(spec_for(cluster, names, tmp_path)),
                       **pool_options)
    wait_idle(batch, pool, len(names))


def test_three_node_pool_bootstraps_and_lists_idle_nodes(batch, cluster, tmp_path, home):
    ssh_pool(batch, cluster, tmp_path, "trio", ["node1", "node2", "node3"],
             task_slots_per_node=2)
    shown = run_cli(home, "pool", "show", "trio").stdout
    for name in ("node1", "node2", "node3"):
        assert f"│ {name} │ idle  │ 2     │" in shown, shown


def test_tasks_really_run_on_each_node_over_ssh(batch, cluster, tmp_path):
    ssh_pool(batch, cluster, tmp_path, "spread", ["node1", "node2", "node3"],
             scheduling_policy="spread")
    job = batch.jobs.create("where", pool="spread")
    job.add_tasks({"id": f"t{i}", "command_line":
                   'echo "$HPCBATCH_NODE $HPCBATCH_NODE_ID ${SSH_CONNECTION:+ssh}"'}
                  for i in range(6))
    job.wait(timeout_s=60)
    seen = {tuple(t.stdout().split()) for t in job.tasks()}
    # HPCBATCH_NODE is set by each node's own sshd: the task ran in that node's session
    assert seen == {("node1", "node1", "ssh"), ("node2", "node2", "ssh"),
                    ("node3", "node3", "ssh")}


@pytest.mark.parametrize("case", ["unknown_key", "wrong_key", "unreachable", "bad_hostlist"])
def test_bad_hosts_are_one_line_naming_the_host_and_create_nothing(ssh_cluster, cluster,
                                                                   tmp_path, home, case):
    assert run_cli(home, "job", "create", "keep").returncode == 0  # accepted state to protect
    spec = json.loads(spec_for(cluster, ["node1", "node2"], tmp_path).read_text())
    args = ["pool", "create", "bad"]
    if case == "unknown_key":
        empty = tmp_path / "empty_known_hosts"
        empty.write_text("")
        spec["known_hosts"] = str(empty)
        needle = "host key ssh-ed25519 SHA256:"
    elif case == "wrong_key":
        other = tmp_path / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                       check=True)
        spec["key"] = str(other)
        needle = f"with key {other} was refused"
    elif case == "unreachable":
        spec["hosts"][1]["port"] = 1  # nothing listens there
        needle = f"node2 ({ssh_cluster.user}@127.0.0.1:1): cannot connect"
    if case == "bad_hostlist":
        args += ["--ssh", "node[1-", "--known-hosts", str(cluster / "known_hosts")]
        needle = "hostlist: 'node[1-' at position 4: '[' is never closed"
    else:
        path = tmp_path / "spec.json"
        path.write_text(json.dumps(spec))
        args += ["--spec", str(path)]
    before = snapshot(home)
    r = run_cli(home, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    if case != "bad_hostlist":
        assert "node1" in r.stderr or "node2" in r.stderr
    assert snapshot(home) == before


def test_trust_on_first_use_records_host_keys(cluster, tmp_path, home):
    spec = json.loads(spec_for(cluster, ["node1"], tmp_path).read_text())
    kh = tmp_path / "kh"
    kh.write_text("")
    spec["known_hosts"] = str(kh)
    path = tmp_path / "tofu.json"
    path.write_text(json.dumps(spec))
    r = run_cli(home, "pool", "create", "tofu", "--spec", str(path), "--trust-on-first-use")
    assert r.returncode == 0, r.stderr
    port = spec["hosts"][0]["port"]
    assert kh.read_text().startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")


@pytest.mark.slow
def test_multi_instance_task_reaches_every_node_over_the_pool_ssh_config(batch, cluster,
                                                                         tmp_path):
    ssh_pool(batch, cluster, tmp_path, "mi", ["node1", "node2", "node3"])
    job = batch.jobs.create("reach", pool="mi")
    app = ('while read host rest; do ssh -n -F "$HPCBATCH_SSH_CONFIG" "$host" '
           "'echo $HPCBATCH_NODE'; done < \"$HPCBATCH_HOSTFILE\"")
    job.add_task("t", app, multi_instance={"instances": 3,
                                           "coordination_command": "echo $HPCBATCH_NODE"})
    job.wait(timeout_s=60)
    t = job.task("t")
    assert t.succeeded, t.stderr()
    assert t.stdout().split() == ["node1", "node2", "node3"]
    hostfile = Path(t.task_dir, "hostfile").read_text()
    assert hostfile == "node1 slots=1\nnode2 slots=1\nnode3 slots=1\n"


@pytest.mark.slow
def test_a_dead_node_is_unusable_and_its_tasks_are_requeued(make_cluster, batch, tmp_path):
    d = make_cluster(2).directory
    ssh_pool(batch, d, tmp_path, "fragile", ["node1", "node2"], scheduling_policy="spread")
    job = batch.jobs.create("survive", pool="fragile")
    go = tmp_path / "go"  # the tasks hold until node2 is gone: its task must run again
    job.add_tasks({"id": f"t{i}", "command_line": f"{gate(go)}; echo $HPCBATCH_NODE"}
                  for i in range(4))
    poll(lambda: {t.node_id for t in job.tasks("running")} == {"node1", "node2"},
         what="tasks on both nodes")
    killed = time.monotonic()
    kill_node(d, "node2")
    poll(lambda: {n["id"]: n["state"] for n in batch.pools.nodes("fragile")}["node2"]
         == "unusable", timeout_s=5, what="node2 unusable")
    assert time.monotonic() - killed < 5
    go.touch()
    job.wait(timeout_s=60)
    tasks = job.tasks()
    assert all(t.succeeded for t in tasks)
    assert {t.stdout().strip() for t in tasks} == {"node1"}
    assert sum(t.requeue_count for t in tasks) >= 1
    assert not cluster_status(d).node("node2").alive


def test_pool_create_mpi_prefix_is_kept_and_shown(cluster, tmp_path, home):
    """--mpi-prefix (the nodes' MPI, PREFIX/bin/mpiexec) is stored with the pool and
    'pool show' says what hpcbatch-mpiexec will use; without it, the pool's python."""
    spec = spec_for(cluster, ["node1"], tmp_path)
    r = run_cli(home, "pool", "create", "pfx", "--spec", str(spec), "--mpi-prefix",
                "/opt/openmpi-5")
    assert r.returncode == 0, r.stderr
    shown = run_cli(home, "pool", "show", "pfx").stdout
    assert f"launch: python {sys.executable}; MPI /opt/openmpi-5/bin/mpiexec" in shown, shown
    r = run_cli(home, "pool", "create", "nopfx", "--spec", str(spec))
    assert r.returncode == 0, r.stderr
    shown = run_cli(home, "pool", "show", "nopfx").stdout
    assert "MPI the mpiexec beside that python, else the nodes' PATH" in shown, shown
    r = run_cli(home, "pool", "create", "bad", "--spec", str(spec), "--mpi-prefix", " ")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mpi_prefix" in r.stderr, \
        r.stderr


@pytest.mark.ssh
def test_cluster_cli_up_status_down(tmp_path, home):
    d = tmp_path / "c"
    try:
        up = run_cli(home, "cluster", "up", "-n", "2", "--dir", str(d))
        assert up.returncode == 0, up.stderr
        assert f"hpcbatch pool create mypool --spec {d}/pool.json" in up.stdout
        pids = [nd["pid"] for nd in json.loads((d / "cluster.json").read_text())["nodes"]]
        assert all(pid_alive(p) for p in pids)
        assert run_cli(home, "cluster", "status", "--dir", str(d)).stdout.count(" up ") == 2
        again = run_cli(home, "cluster", "up", "-n", "2", "--dir", str(d))
        assert again.returncode == 2 and "already running" in again.stderr
        down = run_cli(home, "cluster", "down", "--dir", str(d))
        assert down.returncode == 0 and "stopped 2" in down.stdout
        assert not any(pid_alive(p) for p in pids)
        assert (d / "pool.json").exists() and (d / "known_hosts").exists()  # nothing removed
    finally:
        take_down(d)  # (whatever a failed step left)


@pytest.mark.ssh  # (ssh-keygen)
def test_missing_sshd_is_named(monkeypatch, tmp_path):
    from hpcbatch.launch import cluster as c
    monkeypatch.setattr(c, "SSHD", str(tmp_path / "no-sshd"))
    with pytest.raises(c.ClusterError, match="install the Debian/Ubuntu packages openssh-server"):
        c.cluster_up(1, tmp_path / "x")
    assert shutil.which("ssh-keygen")


@pytest.mark.slow
def test_a_node_dying_under_a_multi_node_task_retries_it_on_a_spare(make_cluster, batch,
                                                                     tmp_path):
    """Kill one node's sshd (and everything under it) while a 3-node task runs: the task
    fails, is retried on the fourth node within 10 s, and no rank survives anywhere
    (the ranks are found by the rule the agent's reap_matching kills by)."""
    d = make_cluster(4, "c4").directory
    ssh_pool(batch, d, tmp_path, "quad", ["node1", "node2", "node3", "node4"])
    job = batch.jobs.create("wide", pool="quad", max_task_retry_count=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    # the "ranks": one per node, started over ssh like mpiexec does, carrying the
    # HPCBATCH ids as hpcbatch-mpiexec forwards them
    rank = ("HPCBATCH_JOB_ID=$HPCBATCH_JOB_ID HPCBATCH_TASK_ID=$HPCBATCH_TASK_ID "
            "HPCBATCH_TASK_ATTEMPT=$HPCBATCH_TASK_ATTEMPT exec sleep 300")
    app = ('while read host rest; do ssh -n -F "$HPCBATCH_SSH_CONFIG" "$host" '
           f'"{rank}" & done < "$HPCBATCH_HOSTFILE"; '
           f'echo "$HPCBATCH_NODE_LIST" > "{marks}/$HPCBATCH_TASK_ATTEMPT"; wait')
    job.add_task("t", app, multi_instance={"instances": 3})
    first = {"HPCBATCH_JOB_ID": "wide", "HPCBATCH_TASK_ID": "t",
             "HPCBATCH_TASK_ATTEMPT": "0"}
    poll(lambda: (marks / "0").exists() and len(processes_with(first)) >= 3,
         timeout_s=30, what="3 ranks of attempt 0")
    nodes0 = (marks / "0").read_text().strip().split(",")
    victim = nodes0[1]
    t0 = time.monotonic()
    kill_node(d, victim)
    poll(lambda: (marks / "1").exists(), timeout_s=10, what="the retry starting")
    assert time.monotonic() - t0 < 10
    nodes1 = (marks / "1").read_text().strip().split(",")
    assert nodes0 == ["node1", "node2", "node3"]
    assert victim not in nodes1 and "node4" in nodes1  # the spare replaced it
    poll(lambda: not processes_with(first), timeout_s=5, what="attempt 0 ranks gone")
    # unusable, between attempts to reconnect to it (each briefly 'starting')
    poll(lambda: {n["id"]: n["state"] for n in batch.pools.nodes("quad")}[victim]
         == "unusable", timeout_s=5, what=f"{victim} unusable")
    poll(lambda: job.task("t").state == "running", timeout_s=5, what="attempt 1 running")
    assert job.task("t").retry_count == 1
    job.terminate_task("t")
    job.wait(timeout_s=30)
    second = dict(first, HPCBATCH_TASK_ATTEMPT="1")
    poll(lambda: not processes_with(second), timeout_s=5, what="attempt 1 ranks gone")


def tree(path: Path) -> dict[str, tuple]:
    """Every file under path with its bytes and mtime (to prove nothing was touched)."""
    if not path.exists():
        return {}
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_inter_node_trust_is_a_pool_key_and_ssh_config_on_every_node(batch, cluster,
                                                                     tmp_path, home):
    user_ssh = tree(Path.home() / ".ssh")
    ssh_pool(batch, cluster, tmp_path, "trusted", ["node1", "node2"])
    pub = (home / "pools" / "trusted" / "id_ed25519.pub").read_text().split()
    assert pub[0] == "ssh-ed25519" and pub[2] == "hpcbatch-pool:trusted"
    authorized = (cluster / "authorized_keys").read_text()
    assert authorized.count(pub[1]) == 1  # both nodes read this file: added once
    host_keys = {nd["name"]: nd["host_key"] for nd in cluster_status(cluster)["nodes"]}
    for node in ("node1", "node2"):
        ssh_dir = tmp_path / "node roots" / home_id(home) / "trusted" / node / "ssh"
        assert (ssh_dir / "id_ed25519").stat().st_mode & 0o777 == 0o600
        assert (ssh_dir / "id_ed25519").read_text() == \
            (home / "pools" / "trusted" / "id_ed25519").read_text()
        known = (ssh_dir / "known_hosts").read_text().splitlines()
        assert known == [f"{n} {host_keys[n]}" for n in ("node1", "node2")]
        config = (ssh_dir / "config").read_text()
        assert f'IdentityFile "{ssh_dir}/id_ed25519"' in config
        assert config.count("StrictHostKeyChecking yes") == 2
    # the primary reaches the other node with real ssh and only these files
    job = batch.jobs.create("hop", pool="trusted")
    job.add_task("t", 'ssh -n -F "$HPCBATCH_SSH_CONFIG" node2 \'echo "$HPCBATCH_NODE"\'',
                 multi_instance={"instances": 2})
    job.wait(timeout_s=60)
    t = job.task("t")
    assert t.succeeded, t.stderr()
    assert t.stdout() == "node2\n"
    assert tree(Path.home() / ".ssh") == user_ssh  # the user's own ~/.ssh is untouched


def test_without_inter_node_communication_no_pool_key_is_installed(batch, cluster, tmp_path,
                                                                   home):
    ssh_pool(batch, cluster, tmp_path, "plain", ["node3"], inter_node_communication=False)
    job = batch.jobs.create("env", pool="plain")
    job.add_task("t", 'echo "[${HPCBATCH_SSH_CONFIG-unset}]"', multi_instance={"instances": 1})
    job.wait(timeout_s=60)
    assert job.task("t").stdout() == "[unset]\n"
    assert not (home / "pools" / "plain").exists()
    assert not (tmp_path / "node roots" / home_id(home) / "plain" / "node3" / "ssh").exists()


def test_resource_files_go_over_sftp_and_logs_come_back_over_it(batch, cluster, tmp_path,
                                                                home):
    data = tmp_path / "mesh.dat"
    data.write_text("mesh v1\n")
    ssh_pool(batch, cluster, tmp_path, "files", ["node2", "node3"])
    job = batch.jobs.create("stage", pool="files")
    job.add_task("one", "cat in/mesh.dat", resource_files=[{"source": str(data),
                                                             "file_path": "in/mesh.dat"}])
    job.add_task("wide", 'cat "$HPCBATCH_TASK_SHARED_DIR/mesh.dat"', multi_instance={
        "instances": 2, "common_resource_files": [str(data)],
        "coordination_command": 'test -s "$HPCBATCH_TASK_SHARED_DIR/mesh.dat"'})
    job.wait(timeout_s=60)
    for tid in ("one", "wide"):
        t = job.task(tid)
        assert t.succeeded, (t.failure, t.stderr())
        assert t.stdout() == "mesh v1\n"
    r = run_cli(home, "task", "logs", "stage", "one")
    assert r.returncode == 0 and r.stdout == "mesh v1\n", r.stderr


@pytest.mark.slow
def test_an_unusable_node_comes_back_when_it_answers_again(ssh_cluster, make_cluster, batch,
                                                           tmp_path, home):
    d = make_cluster(2, "c2").directory
    ssh_pool(batch, d, tmp_path, "phoenix", ["node1", "node2"], scheduling_policy="spread")
    job = batch.jobs.create("before", pool="phoenix")
    # each waits until both run: one on each node
    job.add_tasks({"id": f"t{i}", "command_line": f"{barrier(tmp_path / 'in', 2)}; echo hi"}
                  for i in range(2))
    job.wait(timeout_s=30)
    on_node2 = next(t.id for t in job.tasks() if t.node_id == "node2")
    kill_node(d, "node2")

    def state():
        return {n["id"]: (n["state"], n["reason"]) for n in batch.pools.nodes("phoenix")}
    poll(lambda: state()["node2"][0] == "unusable", timeout_s=10, what="node2 unusable")
    # while node2 is down its task's logs come from the copy the coordinator kept
    r = run_cli(home, "task", "logs", "before", on_node2)
    assert r.returncode == 0 and r.stdout == "hi\n", r.stdout + r.stderr
    # the node's own directory (--node) cannot be read: one line naming the node
    r = run_cli(home, "task", "logs", "before", on_node2, "--node", "node2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"node2 ({ssh_cluster.user}@127.0.0.1:" in r.stderr, r.stderr
    assert "connection refused" in r.stderr
    start_node(d, "node2")  # the same sshd (same host key and port) comes back
    poll(lambda: state()["node2"][0] == "idle", timeout_s=20, what="node2 idle again")
    job2 = batch.jobs.create("after", pool="phoenix")
    job2.add_tasks({"id": f"t{i}", "command_line":
                    f"{barrier(tmp_path / 'again', 2)}; echo $HPCBATCH_NODE"}
                   for i in range(4))
    job2.wait(timeout_s=60)
    assert {t.stdout().strip() for t in job2.tasks()} == {"node1", "node2"}


def test_wide_tasks_on_ssh_nodes_fail_fast_or_wait_and_are_not_overtaken(batch, cluster,
                                                                         tmp_path):
    """The pool busy, then a task as wide as the pool and small ones after it: as each
    node frees up (its gate opens, one at a time) it waits for the wide task rather than
    take a small one, so every small task starts after the wide one ends."""
    ssh_pool(batch, cluster, tmp_path, "wide", ["node1", "node2", "node3"])
    job = batch.jobs.create("mix", pool="wide")
    with pytest.raises(Conflict, match="instances 4 is more than the 3 nodes of pool 'wide'"):
        job.add_task("too-wide", "true", multi_instance={"instances": 4})
    job.add_tasks({"id": f"first-{i}", "command_line": gate(tmp_path / f"go{i}")}
                  for i in range(3))
    poll(lambda: len(job.tasks("running")) == 3, what="the pool busy")
    job.add_task("all", gate(tmp_path / "go-all"), multi_instance={"instances": 3})
    n = 0
    for i in range(3):  # small tasks submitted after it, before and as each node frees up
        job.add_tasks({"id": f"later-{n + k}", "command_line": "true"} for k in range(5))
        n += 5
        (tmp_path / f"go{i}").touch()
        poll(lambda i=i: job.task(f"first-{i}").state == "completed", what=f"first-{i} done")
    poll(lambda: job.task("all").state == "running", what="the wide task running")
    assert not [t.id for t in job.tasks("completed") if t.id.startswith("later-")]
    (tmp_path / "go-all").touch()
    job.wait(timeout_s=60)
    tasks = {t.id: t for t in job.tasks()}
    assert all(t.succeeded for t in tasks.values()), [(t.id, t.failure) for t in
                                                      tasks.values() if not t.succeeded]
    wide = tasks["all"]
    assert wide.started_at >= max(tasks[f"first-{k}"].ended_at for k in range(3)) - 0.01
    later = [t for tid, t in tasks.items() if tid.startswith("later-")]
    assert len(later) == 15
    assert min(t.started_at for t in later) >= wide.ended_at - 0.01


def agents_of(root: Path) -> list[int]:
    """PIDs of agents whose node root is under root."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--root" in cmd and str(root).encode() in cmd[cmd.index(b"--root") + 1]:
                found.append(int(entry.name))
    return found


def test_deleting_a_pool_stops_its_agents_and_revokes_its_key(make_cluster, batch, tmp_path,
                                                             home):
    d = make_cluster(3, "c3").directory
    ssh_pool(batch, d, tmp_path, "gone", ["node1", "node2", "node3"],
             scheduling_policy="spread")
    pub = (home / "pools" / "gone" / "id_ed25519.pub").read_text().split()[1]
    assert pub in (d / "authorized_keys").read_text()
    job = batch.jobs.create("j", pool="gone")
    # all three at once, so each node has a job folder to remove
    job.add_tasks({"id": f"t{i}", "command_line": barrier(tmp_path / "in", 3)}
                  for i in range(3))
    job.wait(timeout_s=60)
    dirs = [Path(t.task_dir).parent for t in job.tasks()]
    with pytest.raises(Conflict, match="still has job"):
        batch.pools.delete("gone")
    assert batch.jobs.delete("j") == []
    assert not any(p.exists() for p in dirs)  # removed over SSH
    roots = tmp_path / "node roots" / home_id(home) / "gone"
    assert agents_of(roots)
    kill_node(d, "node3")  # one node cannot be reached to revoke the key
    problems = batch.pools.delete("gone")
    assert len(problems) == 1 and problems[0].startswith("node3: the pool key is still"), \
        problems
    assert "its node root" in problems[0] and "remains" in problems[0], problems
    poll(lambda: not agents_of(roots), timeout_s=15, what="the pool's agents stopped")
    # the reachable nodes' roots (with their copies of the pool's private key) are gone
    assert sorted(p.name for p in roots.iterdir()) == ["node3"]
    assert pub not in (d / "authorized_keys").read_text()  # node1/node2 share this file
    assert not (home / "pools" / "gone").exists()
    assert "gone" not in [p.id for p in batch.pools.list()]


@pytest.mark.slow
def test_an_agent_that_cannot_start_is_named_and_its_node_retried(batch, cluster,
                                                                  tmp_path):
    spec = spec_for(cluster, ["node1"], tmp_path, python="/nonexistent/python3")
    batch.pools.create("nopy", "ssh", spec=str(spec))

    def node():
        rows = batch.pools.nodes("nopy")
        return rows[0] if rows else {"state": None, "reason": None}
    poll(lambda: node()["state"] == "unusable", timeout_s=15, what="node1 unusable")
    reason = node()["reason"]  # the agent's stderr (and its exit status, 127)
    assert "stderr:" in reason and "/nonexistent/python3" in reason, reason
    # it is tried again (and fails again): a later attempt records a new reason
    poll(lambda: node()["state"] == "starting" and node()["reason"].startswith(
        "reconnecting"), timeout_s=15, what="a reconnect attempt")
    poll(lambda: node()["state"] == "unusable", timeout_s=15, what="unusable again")


def test_a_pool_whose_known_hosts_vanished_does_not_stop_the_home(cluster, make_batch,
                                                                   tmp_path, home):
    spec = json.loads(spec_for(cluster, ["node2"], tmp_path).read_text())
    kh = tmp_path / "kh-copy"
    kh.write_text((cluster / "known_hosts").read_text())
    spec["known_hosts"] = str(kh)
    path = tmp_path / "vanish.json"
    path.write_text(json.dumps(spec))
    assert run_cli(home, "pool", "create", "vanish", "--spec", str(path)).returncode == 0
    kh.unlink()  # the cluster folder was cleaned up after the pool was made
    with make_batch() as b:  # local work on the same home still runs
        job = b.jobs.create("local-work")
        job.add_task("t", "echo fine")
        job.wait(timeout_s=30)
        assert job.task("t").stdout() == "fine\n"
        poll(lambda: [n["state"] for n in b.pools.nodes("vanish")] == ["unusable"],
             timeout_s=15, what="the pool's node unusable")
        assert str(kh) in b.pools.nodes("vanish")[0]["reason"]
