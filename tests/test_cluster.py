"""The test-cluster tool (hpcbatch.launch.cluster) and its CLI, with real sshd processes."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
from click.testing import CliRunner
from helpers import poll, unavailable

from hpcbatch.cli_cluster import cluster as cluster_cli
from hpcbatch.launch import cluster as ct
from hpcbatch.ssh import Unreachable, connect, exec_channel, run, targets_from_spec

# sshd and ssh-keygen (skipped with the reason where they are missing: tests/conftest.py)
pytestmark = pytest.mark.ssh


@pytest.fixture
def up(make_cluster):
    """up(n, name="c", **kw): cluster_up in tmp_path/name, always taken down after the
    test, checking that no sshd, session or network object of it survived."""
    return make_cluster


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
        "known_hosts": str(d / "known_hosts"), "ssh_config": str(d / "ssh_config"),
        "authorized_keys": str(d / "authorized_keys"),  # the nodes' own, not ~/.ssh's
        "python": sys.executable}  # the nodes are this machine: this python is theirs

    # state file: the sshd PIDs, each really an sshd with its config in this folder
    state = json.loads((d / ct.STATE_FILE).read_text())
    assert [n["pid"] for n in state["nodes"]] == info.pids
    for nd in info.nodes:
        cmd = Path(f"/proc/{nd.pid}/cmdline").read_bytes()
        assert b"sshd" in cmd and str(d / nd.name / "sshd_config").encode() in cmd
        assert int((d / nd.name / "sshd.pid").read_text()) == nd.pid
        assert "Server listening" in (d / nd.name / "sshd.log").read_text()
        conf = (d / nd.name / "sshd_config").read_text().splitlines()
        root_env = " OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
        for want in ("UsePAM no", "StrictModes no", "MaxStartups 100:30:200", "MaxSessions 100",
                     f"SetEnv HPCBATCH_NODE={nd.name}" + (root_env if os.geteuid() == 0
                                                         else ""),
                     "PasswordAuthentication no", "ListenAddress 127.0.0.1", f"Port {nd.port}"):
            assert want in conf
    assert state.get("bridge") is None and all(n["netns"] is None for n in state["nodes"])
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
        # it comes back as the same node: same port, same host key (strict known_hosts)
        back = ct.start_node(info.directory, "node2")
        assert back.port == info.nodes[1].port and back.pid != info.nodes[1].pid
        assert [nd.alive for nd in ct.cluster_status(info.directory).nodes] == [True, True]
        with pytest.raises(ct.ClusterError, match="node2 .* is running"):
            ct.start_node(info.directory, "node2")
        c = connect(targets[1])
        assert run(c, ["printenv", "HPCBATCH_NODE"], timeout_s=30)[1] == "node2\n"
        c.close()
        assert ct.cluster_down(info.directory) == ["node1", "node2"]
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


# ---------------------------------------------------------------- netns mode (root)

NO_NETNS = unavailable(ct.check_netns)
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"netns mode: {NO_NETNS}")


def ssh(info: ct.ClusterInfo, node: str, command: str) -> str:
    """Run command on node with OpenSSH and the cluster's own ssh_config."""
    r = subprocess.run(["ssh", "-F", str(info.ssh_config), node, command], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def escaped_sleeper(info: ct.ClusterInfo, node: str) -> int:
    """A process on node that left the sshd's process tree (setsid, parent gone)."""
    pid = int(ssh(info, node, "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!"))
    assert ct.pid_alive(pid)
    assert all(pid not in ct._descendants(nd.pid) for nd in info.nodes)
    return pid


def ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def processes_in(inodes: set[int]) -> list[int]:
    """Live processes, anywhere, whose network namespace is one of inodes."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if ns_inode(int(entry.name)) in inodes and ct.pid_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def names_with(prefix: str) -> list[str]:
    """Links, namespaces and /etc/netns entries here whose name starts with prefix."""
    links = [line.split(":")[1].strip().split("@")[0] for line in subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout.splitlines()]
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout.split()
    etc = os.listdir(ct.NETNS_ETC) if ct.NETNS_ETC.exists() else []
    return [n for n in links + spaces + etc if n.startswith(prefix)]


def assert_gone(info: ct.ClusterInfo, inodes: set[int]) -> None:
    assert not ct.network_leftovers(info)
    assert not names_with(info.bridge[:8]), "a link, namespace or /etc/netns entry survived"
    assert not ct.sshd_pids_under(info.directory)
    assert not processes_in(inodes), "a process survived in a deleted namespace"


@pytest.mark.slow
@needs_netns
def test_netns_nodes_are_hosts_of_their_own_and_down_leaves_nothing(up, tmp_path):
    before = home_ssh_state()
    t0 = time.monotonic()
    info = up(3, name="net ns", netns=True)
    assert time.monotonic() - t0 < 10 and info.netns and info.running
    d = info.directory
    net = ipaddress.ip_network(f"{info.nodes[0].hostname}/24", strict=False)
    assert net.subnet_of(ct.NETNS_NET)
    assert [(nd.hostname, nd.port) for nd in info.nodes] == [
        (str(net[10 + i]), 22) for i in (1, 2, 3)]
    tag = info.bridge[:8]
    assert info.bridge == f"{tag}br" and all(len(nd.veth) <= 15 for nd in info.nodes)
    assert [(nd.netns, nd.veth) for nd in info.nodes] == [
        (f"{tag}-node{i}", f"{tag}v{i}") for i in (1, 2, 3)]
    addrs = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", info.bridge],
                           capture_output=True, text=True, check=True).stdout
    assert f"inet {net[1]}/24" in addrs

    # strict client files with the namespaces' addresses on port 22
    assert (d / "known_hosts").read_text().splitlines() == [
        f"{nd.hostname} {nd.host_key}" for nd in info.nodes]
    spec = json.loads(info.pool_json.read_text())
    assert [(h["name"], h["hostname"], h["port"]) for h in spec["hosts"]] == [
        (nd.name, nd.hostname, 22) for nd in info.nodes]
    state = json.loads((d / ct.STATE_FILE).read_text())
    assert state["bridge"] == info.bridge
    assert [(n["netns"], n["veth"]) for n in state["nodes"]] == [
        (nd.netns, nd.veth) for nd in info.nodes]

    # each node: its own hostname, address and interfaces; sshd sets the node and root env
    inodes = set()
    for nd in info.nodes:
        out = ssh(info, nd.name, 'echo "$HPCBATCH_NODE $(hostname) $SSH_CONNECTION '
                  '$OMPI_ALLOW_RUN_AS_ROOT$OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"; '
                  "ip -4 -o addr show | awk '{print $2, $4}'").splitlines()
        name, host, client_ip, _, server_ip, port, root_env = out[0].split()
        assert (name, host, client_ip, server_ip, port) == (nd.name, nd.name, str(net[1]),
                                                           nd.hostname, "22")
        assert root_env == ("11" if os.geteuid() == 0 else "")
        assert out[1:] == ["lo 127.0.0.1/8", f"eth0 {nd.hostname}/24"]
        cmd = Path(f"/proc/{nd.pid}/cmdline").read_bytes()
        assert ct.SSHD.encode() in cmd and str(d / nd.name / "sshd_config").encode() in cmd
        inodes.add(ns_inode(nd.pid))
    assert len(inodes) == 3 and ns_inode(os.getpid()) not in inodes
    # nodes reach each other by name (what MPI on the primary does)
    assert ssh(info, "node1", "getent hosts node3").split() == [info.nodes[2].hostname,
                                                                "node3"]
    assert ssh(info, "node1", f"ssh -F '{info.ssh_config}' node3 hostname") == "node3\n"

    stray = escaped_sleeper(info, "node2")
    assert ct.cluster_down(d) == ["node1", "node2", "node3"]
    assert not ct.pid_alive(stray), "a process that left sshd's tree survived cluster_down"
    assert_gone(info, inodes)
    assert ct.cluster_down(d) == []  # idempotent
    assert home_ssh_state() == before


@needs_netns
def test_two_netns_clusters_at_once_and_down_removes_only_its_own(up):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:  # at the same time: subnet and names must differ
        a, b = pool.map(lambda name: up(2, name=name, netns=True), ["a", "b"])
    assert a.nodes[0].hostname.rsplit(".", 1)[0] != b.nodes[0].hostname.rsplit(".", 1)[0]
    assert a.bridge != b.bridge
    inodes = {ns_inode(nd.pid) for nd in a.nodes}
    assert ct.cluster_down(a.directory) == ["node1", "node2"]
    assert_gone(a, inodes)
    assert ct.cluster_status(b.directory).running
    assert ct.network_leftovers(b) == (  # all of b's network is still there
        [f"namespace {nd.netns}" for nd in b.nodes] + [f"link {nd.veth}" for nd in b.nodes]
        + [f"link {b.bridge}"] + [str(ct.NETNS_ETC / nd.netns) for nd in b.nodes])
    assert ssh(b, "node2", "hostname") == "node2\n"


@needs_netns
def test_netns_kill_node_kills_everything_in_its_namespace(up):
    info = up(2, netns=True)
    client, sleeper = session_sleeper(info, "node2")
    stray = escaped_sleeper(info, "node2")
    try:
        assert ct.kill_node(info.directory, "node2") is True
        assert not any(ct.pid_alive(p) for p in (info.nodes[1].pid, sleeper, stray))
        assert ct._netns_pids(info.nodes[1].netns) == []
        assert ct.pid_alive(info.nodes[0].pid)
        assert [nd.alive for nd in ct.cluster_status(info.directory).nodes] == [True, False]
        assert ct.kill_node(info.directory, "node2") is False
        targets = targets_from_spec(json.loads(info.pool_json.read_text()))
        with pytest.raises(Unreachable, match=f"node2 .*{info.nodes[1].hostname}"):
            connect(targets[1])
        assert ssh(info, "node1", "hostname") == "node1\n"
    finally:
        client.close()


@needs_netns
def test_netns_set_link_cuts_a_node_off_and_back(up):
    info = up(2, netns=True)
    client, sleeper = session_sleeper(info, "node2")
    client.close()
    addr = (info.nodes[1].hostname, 22)
    try:
        ct.set_link(info.directory, "node2", up=False)
        assert [nd.link_up for nd in ct.cluster_status(info.directory).nodes] == [True, False]
        with pytest.raises(OSError):
            socket.create_connection(addr, timeout=1).close()
        assert ct.pid_alive(sleeper) and ct.pid_alive(info.nodes[1].pid)  # processes live on
    finally:
        ct.set_link(info.directory, "node2", up=True)
    assert ct.cluster_status(info.directory).nodes[1].link_up is True

    def reachable():
        try:
            socket.create_connection(addr, timeout=1).close()
            return True
        except OSError:
            return False
    poll(reachable, timeout_s=10, what="node2 reachable again")
    loop = up(1, name="loop")
    with pytest.raises(ct.ClusterError, match="on loopback; cutting a link needs a cluster "
                       "made with 'cluster up --netns'"):
        ct.set_link(loop.directory, "node1", up=False)


def _fail_on_second_node(real):
    def make(nd, *args):
        if nd.name == "node2":
            raise ct.ClusterError("injected failure making node2's network")
        return real(nd, *args)
    return make


@needs_netns
@pytest.mark.parametrize("break_it,match", [
    (lambda mp: mp.setattr(ct, "_make_node_network", _fail_on_second_node(
        ct._make_node_network)), "injected failure making node2's network"),
    (lambda mp: mp.setattr(ct, "SSHD", "/bin/false"), "sshd for node1 did not start"),
])
def test_netns_failure_midway_tears_down_what_was_made(tmp_path, monkeypatch, break_it, match):
    break_it(monkeypatch)
    d = tmp_path / "broken"
    with pytest.raises(ct.ClusterError, match=match) as exc:
        ct.cluster_up(3, d, netns=True)
    assert "\n" not in str(exc.value)
    state = ct.cluster_status(d)  # recorded before anything was made
    assert state.bridge and not state.running
    assert_gone(state, set())
    monkeypatch.undo()
    again = ct.cluster_up(1, d, netns=True)  # the folder is usable again
    try:
        assert again.running and again.bridge != state.bridge
    finally:
        ct.cluster_down(d)
    assert_gone(again, set())


def test_netns_without_root_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(ct.os, "geteuid", lambda: 1000)
    d = tmp_path / "c"
    with pytest.raises(ct.ClusterError) as exc:
        ct.cluster_up(2, d, netns=True)
    assert str(exc.value) == (
        "--netns needs root (it makes network namespaces, veths and a bridge); without "
        "--netns, loopback nodes work for MPICH and every SSH test, but not for Open MPI")
    r = CliRunner().invoke(cluster_cli, ["up", "--netns", "--dir", str(d)])
    assert r.exit_code == 1 and r.output == f"Error: {exc.value}\n"
    assert not d.exists()


@pytest.mark.skipif(ct._sbin_which("ip") is None, reason="needs iproute2")
def test_netns_without_the_capabilities_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(ct.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ct, "_effective_caps", lambda: 1 << 12)  # CAP_NET_ADMIN only
    with pytest.raises(ct.ClusterError, match="^--netns needs CAP_SYS_ADMIN, which this root "
                       "process lacks .*loopback nodes work for MPICH") as exc:
        ct.cluster_up(2, tmp_path / "c", netns=True)
    assert "\n" not in str(exc.value) and not (tmp_path / "c").exists()


def test_a_state_file_naming_foreign_links_is_refused(up):
    info = up(1)
    ct.cluster_down(info.directory)
    state = json.loads((info.directory / ct.STATE_FILE).read_text())
    state["bridge"] = "eth0"
    (info.directory / ct.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ct.ClusterError, match="names 'eth0', which is not a name"):
        ct.cluster_down(info.directory)
    (info.directory / ct.STATE_FILE).unlink()


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
        k = runner.invoke(cluster_cli, ["kill", "node2", "--dir", str(d)])
        assert k.exit_code == 0 and "node2: killed" in k.output
        assert not ct.pid_alive(pids[1])
        st = runner.invoke(cluster_cli, ["start", "node2", "--dir", str(d)])
        assert st.exit_code == 0 and "node2: sshd running again" in st.output, st.output
        pids[1] = ct.cluster_status(d).nodes[1].pid
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


@needs_netns
def test_cli_netns_up_status_link_down(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    d = tmp_path / "cli"
    runner = CliRunner()
    r = runner.invoke(cluster_cli, ["up", "-n", "2", "--netns", "--dir", str(d)])
    info = ct.cluster_status(d)
    try:
        assert r.exit_code == 0, r.output
        assert f"(network namespaces, bridge {info.bridge})" in r.output
        for nd in info.nodes:
            assert f"{nd.hostname}:22" in r.output and nd.netns in r.output
        assert runner.invoke(cluster_cli, ["link", "node2", "down", "--dir", str(d)]
                             ).output == "link of node2: down\n"
        s = runner.invoke(cluster_cli, ["status", "--dir", str(d)])
        assert s.exit_code == 0 and "up, link cut" in s.output and "2 of 2" in s.output
        assert runner.invoke(cluster_cli, ["link", "node2", "up", "--dir", str(d)]
                             ).exit_code == 0
        assert "link cut" not in runner.invoke(cluster_cli, ["status", "--dir", str(d)]).output
    finally:
        down = runner.invoke(cluster_cli, ["down", "--dir", str(d)])
    assert down.output == ("stopped 2 sshd node(s): node1, node2; removed its namespaces, "
                           f"veths and bridge {info.bridge}\n")
    assert not ct.network_leftovers(info)
