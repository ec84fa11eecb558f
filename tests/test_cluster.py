"""The test-cluster tool (hpcbatch.launch.cluster) and its CLI, with real sshd processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import paramiko
import pytest
from click.testing import CliRunner

from hpcbatch.cli_cluster import cluster as cluster_cli
from hpcbatch.launch import cluster as ct
from hpcbatch.ssh import Unreachable, connect, exec_channel, run, targets_from_spec


def _no_sshd() -> str | None:
    try:
        ct.check_sshd()
    except ct.ClusterError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_no_sshd() is not None, reason=_no_sshd() or "")


@pytest.fixture
def up(tmp_path):
    """cluster_up(n, dir) that is always torn down after the test."""
    made: list[Path] = []

    def _up(n: int, name: str = "c", **kw) -> ct.ClusterInfo:
        d = tmp_path / name
        made.append(d)
        return ct.cluster_up(n, d, **kw)

    yield _up
    for d in made:
        if (d / ct.STATE_FILE).exists():
            ct.cluster_down(d)
        assert not ct.sshd_pids_under(d)


def home_ssh_state() -> tuple:
    ssh = Path.home() / ".ssh"
    if not ssh.exists():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                        for p in ssh.iterdir())) + (ssh.stat().st_mtime_ns,)


def session_sleeper(info: ct.ClusterInfo, name: str):
    """A long-running command in a real SSH session on that node: (client, its pid)."""
    target = next(t for t in targets_from_spec(json.loads(info.pool_json.read_text()))
                  if t.name == name)
    client = connect(target)
    chan = exec_channel(client, ["sh", "-c", "echo $$; exec sleep 300"])
    chan.settimeout(10)
    pid = int(chan.makefile("rb").readline())
    assert ct.pid_alive(pid)
    return client, pid


def test_up_writes_strict_client_files_and_state(up, tmp_path):
    before = home_ssh_state()
    t0 = time.monotonic()
    info = up(3, name="with space")
    took = time.monotonic() - t0
    d = tmp_path / "with space"
    assert info.directory == d.resolve() and took < 10
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "id_ed25519").stat().st_mode) == 0o600
    assert [nd.name for nd in info.nodes] == ["node1", "node2", "node3"]
    assert len({nd.port for nd in info.nodes}) == 3 and all(nd.alive for nd in info.nodes)

    # known_hosts: one strict line per node, the node's own host key
    lines = (d / "known_hosts").read_text().splitlines()
    for nd, line in zip(info.nodes, lines):
        pub = (d / nd.name / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        assert line == f"[127.0.0.1]:{nd.port} {pub[0]} {pub[1]}"
    assert len({line.split()[2] for line in lines}) == 3  # a host key each

    # ssh_config, read back by paramiko and by OpenSSH itself (ssh -G connects nowhere)
    cfg = paramiko.SSHConfig.from_path(str(d / "ssh_config"))
    for nd in info.nodes:
        look = cfg.lookup(nd.name)
        assert (look["hostname"], int(look["port"]), look["user"]) == ("127.0.0.1", nd.port,
                                                                      nd.user)
        assert look["identityfile"] == [str(d / "id_ed25519")]
        assert look["userknownhostsfile"] == str(d / "known_hosts")
        assert look["stricthostkeychecking"] == "yes" and look["batchmode"] == "yes"
        assert look["identitiesonly"] == "yes" and look["globalknownhostsfile"] == "/dev/null"
        assert look["connecttimeout"] == "5"
    g = subprocess.run(["ssh", "-G", "-F", str(d / "ssh_config"), "node2"], check=True,
                       capture_output=True, text=True).stdout.splitlines()
    assert f"port {info.nodes[1].port}" in g and "stricthostkeychecking true" in g
    assert f"userknownhostsfile {d / 'known_hosts'}" in g

    # pool.json: what `hpcbatch pool create NAME --spec` takes
    pool = json.loads((d / "pool.json").read_text())
    assert pool == {
        "provider": "ssh",
        "hosts": [{"name": nd.name, "hostname": "127.0.0.1", "port": nd.port, "user": nd.user}
                  for nd in info.nodes],
        "user": info.user, "key": str(d / "id_ed25519"),
        "known_hosts": str(d / "known_hosts"), "ssh_config": str(d / "ssh_config")}

    # state file: the sshd PIDs, each really an sshd with its config in this folder
    state = json.loads((d / ct.STATE_FILE).read_text())
    assert [n["pid"] for n in state["nodes"]] == info.pids
    for nd in info.nodes:
        cmd = Path(f"/proc/{nd.pid}/cmdline").read_bytes()
        assert b"sshd" in cmd and str(d / nd.name / "sshd_config").encode() in cmd
        assert int((d / nd.name / "sshd.pid").read_text()) == nd.pid
        assert "Server listening" in (d / nd.name / "sshd.log").read_text()
        conf = (d / nd.name / "sshd_config").read_text().splitlines()
        for want in ("UsePAM no", "StrictModes no", "MaxStartups 100:30:200", "MaxSessions 100",
                     f"SetEnv HPCBATCH_NODE={nd.name}", "PasswordAuthentication no",
                     "ListenAddress 127.0.0.1", f"Port {nd.port}"):
            assert want in conf
    assert sorted(ct.sshd_pids_under(d)) == sorted(info.pids)
    assert home_ssh_state() == before  # ~/.ssh untouched


def test_openssh_client_logs_in_strictly_with_the_written_files(up, tmp_path):
    before = home_ssh_state()
    info = up(2)
    cfg = str(info.ssh_config)
    r = subprocess.run(["ssh", "-F", cfg, "node2", 'echo "$HPCBATCH_NODE $SSH_CONNECTION"'],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    node, *conn = r.stdout.split()
    assert node == "node2" and conn[-1] == str(info.nodes[1].port)
    # the same config against a known_hosts without node2's key: refused, nothing recorded
    kh = tmp_path / "kh_without_node2"
    kh.write_text(info.known_hosts.read_text().splitlines()[0] + "\n")
    r = subprocess.run(["ssh", "-F", cfg, "-o", f"UserKnownHostsFile={kh}", "node2", "true"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 255 and "Host key verification failed" in r.stderr
    assert len(kh.read_text().splitlines()) == 1
    assert home_ssh_state() == before


def test_down_stops_exactly_our_sshd_and_its_sessions(up):
    a, b = up(2, name="a"), up(2, name="b")
    client, sleeper = session_sleeper(a, "node1")
    try:
        assert sleeper in ct._descendants(a.nodes[0].pid)
        assert ct.cluster_down(a.directory) == ["node1", "node2"]
        assert not any(ct.pid_alive(p) for p in a.pids)
        assert not ct.pid_alive(sleeper), "a session's process survived cluster_down"
        assert not ct.sshd_pids_under(a.directory)
        assert all(ct.pid_alive(p) for p in b.pids), "the other cluster was touched"
        assert ct.cluster_status(b.directory).running
        assert ct.cluster_down(a.directory) == []  # idempotent
        for f in ("pool.json", "known_hosts", "ssh_config", "id_ed25519", ct.STATE_FILE,
                  "node1/sshd.log"):
            assert (a.directory / f).exists(), f"{f} was removed"
        status = ct.cluster_status(a.directory)
        assert not status.running and [nd.alive for nd in status.nodes] == [False, False]
    finally:
        client.close()


def test_a_reused_pid_is_never_taken_for_ours(up, tmp_path):
    info = up(1)
    ct.cluster_down(info.directory)
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        state = json.loads((info.directory / ct.STATE_FILE).read_text())
        state["nodes"][0]["pid"] = stranger.pid  # as if the PID had been reused
        (info.directory / ct.STATE_FILE).write_text(json.dumps(state))
        assert not ct.cluster_status(info.directory).running
        assert ct.cluster_down(info.directory) == []
        assert ct.kill_node(info.directory, "node1") is False
        assert stranger.poll() is None, "cluster_down killed a process it did not start"
    finally:
        stranger.kill()
        stranger.wait()


def test_kill_node_takes_down_one_node_and_its_sessions(up):
    info = up(2)
    client, sleeper = session_sleeper(info, "node2")
    try:
        assert ct.kill_node(info.directory, "node2") is True
        assert not ct.pid_alive(info.nodes[1].pid) and not ct.pid_alive(sleeper)
        assert ct.pid_alive(info.nodes[0].pid)
        assert [nd.alive for nd in ct.cluster_status(info.directory).nodes] == [True, False]
        assert ct.kill_node(info.directory, "node2") is False
        with pytest.raises(ct.ClusterError, match="no node 'node9'.*node1, node2"):
            ct.kill_node(info.directory, "node9")
        targets = targets_from_spec(json.loads(info.pool_json.read_text()))
        with pytest.raises(Unreachable, match=f"node2 .*127.0.0.1:{info.nodes[1].port}"):
            connect(targets[1])
        c = connect(targets[0])
        assert run(c, ["printenv", "HPCBATCH_NODE"], timeout_s=30)[1] == "node1\n"
        c.close()
        assert ct.cluster_down(info.directory) == ["node1"]
    finally:
        client.close()


def test_up_again_refuses_while_running_then_reuses_keys(up):
    info = up(1)
    with pytest.raises(ct.ClusterError, match="already running in .*cluster down --dir"):
        ct.cluster_up(1, info.directory)
    key = info.nodes[0].host_key
    ct.cluster_down(info.directory)
    again = ct.cluster_up(2, info.directory)
    assert again.nodes[0].host_key == key and again.running
    assert len(again.known_hosts.read_text().splitlines()) == 2


def test_user_and_base_name(up):
    import pwd
    me = pwd.getpwuid(os.geteuid()).pw_name
    info = up(2, user=me, base_name="c")
    assert [nd.name for nd in info.nodes] == ["c1", "c2"]
    spec = json.loads(info.pool_json.read_text())
    assert spec["user"] == me and [h["name"] for h in spec["hosts"]] == ["c1", "c2"]
    t = targets_from_spec(spec)[1]
    c = connect(t)
    assert run(c, ["sh", "-c", 'echo "$HPCBATCH_NODE $(id -un)"'], 30)[1].split() == ["c2", me]
    c.close()


def test_a_port_taken_meanwhile_is_retried(up, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = iter([busy.getsockname()[1]])
    real = ct._free_port
    monkeypatch.setattr(ct, "_free_port", lambda: next(ports, None) or real())
    try:
        info = up(1)
        assert info.nodes[0].port != busy.getsockname()[1]
        c = connect(targets_from_spec(json.loads(info.pool_json.read_text()))[0])
        c.close()
    finally:
        busy.close()


def test_missing_sshd_is_named_and_nothing_is_made(monkeypatch, tmp_path):
    monkeypatch.setattr(ct, "SSHD", str(tmp_path / "no-sshd"))
    with pytest.raises(ct.ClusterError, match="install the Debian/Ubuntu packages "
                       "openssh-server"):
        ct.cluster_up(1, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert shutil.which("ssh-keygen")


@pytest.mark.parametrize("kw,match", [
    ({"n": 0}, "number of nodes must be a whole number >= 1"),
    ({"n": 1, "base_name": "a b"}, "node base name 'a b'"),
    ({"n": 1, "directory": 'we"ird'}, "cannot quote; choose another --dir"),
])
def test_bad_arguments_are_one_line(tmp_path, kw, match):
    directory = tmp_path / kw.pop("directory", "c")
    with pytest.raises(ct.ClusterError, match=match) as info:
        ct.cluster_up(kw.pop("n"), directory, **kw)
    assert "\n" not in str(info.value)
    assert not ct.sshd_pids_under(tmp_path)


def test_status_and_down_without_a_cluster_say_how_to_start_one(tmp_path):
    for fn in (ct.cluster_status, ct.cluster_down):
        with pytest.raises(ct.ClusterError, match="no cluster in .*hpcbatch cluster up -n 3"):
            fn(tmp_path / "none")


# ---------------------------------------------------------------- CLI

def test_cli_up_status_down(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    d = tmp_path / "cli"
    runner = CliRunner()
    r = runner.invoke(cluster_cli, ["up", "-n", "2", "--dir", str(d)])
    try:
        assert r.exit_code == 0, r.output
        assert f"hpcbatch pool create mypool --spec {d}/pool.json" in r.output
        pids = [nd["pid"] for nd in json.loads((d / ct.STATE_FILE).read_text())["nodes"]]
        for nd in ct.cluster_status(d).nodes:
            assert f"127.0.0.1:{nd.port}" in r.output and str(nd.pid) in r.output
        s = runner.invoke(cluster_cli, ["status", "--dir", str(d)])
        assert s.exit_code == 0 and s.output.count(" up ") == 2 and "2 of 2" in s.output
        again = runner.invoke(cluster_cli, ["up", "-n", "2", "--dir", str(d)])
        assert again.exit_code == 1 and "Error: a cluster is already running" in again.output
        assert len(again.output.strip().splitlines()) == 1
    finally:
        down = runner.invoke(cluster_cli, ["down", "--dir", str(d)])
    assert down.exit_code == 0 and "stopped 2 sshd node(s): node1, node2" in down.output
    assert not any(ct.pid_alive(p) for p in pids)
    s = runner.invoke(cluster_cli, ["status", "--dir", str(d)])
    assert s.output.count(" down ") == 2 and "0 of 2" in s.output


def test_cli_default_dir_is_under_hpcbatch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCBATCH_HOME", str(tmp_path / "hb home"))
    runner = CliRunner()
    r = runner.invoke(cluster_cli, ["status"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: no cluster in {tmp_path / 'hb home' / 'cluster'} (no cluster.json); start "
        f"one with 'hpcbatch cluster up -n 3 --dir {tmp_path / 'hb home' / 'cluster'}'")
    r = runner.invoke(cluster_cli, ["up", "-n", "1"])
    try:
        assert r.exit_code == 0, r.output
        assert (tmp_path / "hb home" / "cluster" / "pool.json").exists()
    finally:
        assert runner.invoke(cluster_cli, ["down"]).exit_code == 0
