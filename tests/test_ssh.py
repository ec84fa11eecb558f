"""The paramiko SSH layer against real OpenSSH sshd nodes (fixtures in tests/conftest_ssh.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import poll

from hpcbatch.errors import ValidationError
from hpcbatch.launch import cluster as ct
from hpcbatch.ssh import (
    AuthFailed,
    CommandTimeout,
    HostKeyMismatch,
    HostTimeout,
    SSHError,
    SSHTarget,
    UnknownHostKey,
    Unreachable,
    connect,
    exec_channel,
    fingerprint,
    parallel,
    run,
    targets_from_spec,
    targets_from_ssh_config,
    upload,
)

ECHO_AGENT = textwrap.dedent('''
    import json, os, sys
    while True:
        line = sys.stdin.readline()
        if not line:
            sys.exit(3)  # stdin closed before "exit"
        msg = json.loads(line)
        if msg.get("op") == "exit":
            sys.exit(0)
        reply = {"echo": msg, "node": os.environ.get("HPCBATCH_NODE"), "pid": os.getpid()}
        sys.stdout.write(json.dumps(reply) + "\\n")
        sys.stdout.flush()
''')


def keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def ssh_keygen_fingerprint(pub: Path) -> str:
    """OpenSSH's own fingerprint of a public key file, to check ours against."""
    return subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True,
                          capture_output=True, text=True).stdout.split()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says anything (a hung host)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


# ---------------------------------------------------------------- connect, run

def test_connect_and_run_on_each_node(ssh_cluster, ssh_targets, ssh_connect):
    assert [t.name for t in ssh_targets] == ["node1", "node2", "node3"]
    for target in ssh_targets:
        t0 = time.monotonic()
        client = ssh_connect(target)
        assert time.monotonic() - t0 < 2
        rc, out, err = run(client, ["sh", "-c", 'echo "$HPCBATCH_NODE $SSH_CONNECTION"'], 30)
        node, *conn = out.split()
        assert (rc, node, conn[-1]) == (0, target.name, str(target.port)), err
        sock = client.get_transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_run_quotes_every_argument_and_returns_status_and_streams(ssh_targets, ssh_connect):
    client = ssh_connect(ssh_targets[0])
    hostile = ["a b", "$HOME", "$(touch /tmp/hpcbatch-pwned)", "'q'", '"dq"', ";ls", "*",
               "", "line\nbreak", "back\\slash", "`id`", "~", "-n"]
    rc, out, err = run(client, [sys.executable, "-c",
                                "import json, sys; print(json.dumps(sys.argv[1:]))", *hostile])
    assert rc == 0 and json.loads(out) == hostile, err
    assert not os.path.exists("/tmp/hpcbatch-pwned")
    rc, out, err = run(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (rc, out, err) == (3, "out\n", "err\n")
    assert run(client, ["cat"], stdin="fed on stdin\n") == (0, "fed on stdin\n", "")
    assert run(client, ["cat"]) == (0, "", "")  # stdin is closed: never hangs
    big = run(client, [sys.executable, "-c", "print('x' * 3_000_000)"], 30)[1]
    assert len(big) == 3_000_001


def test_run_past_its_timeout_raises_naming_host_and_command(ssh_targets, ssh_connect):
    target = ssh_targets[1]
    client = ssh_connect(target)
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        run(client, ["sleep", "30"], timeout_s=0.5)
    assert time.monotonic() - t0 < 2.5
    assert str(info.value) == (f"{target.label}: 'sleep 30' did not finish within 0.5 s "
                               "(its channel was closed)")
    assert run(client, ["echo", "still usable"], 30)[1] == "still usable\n"


def test_argv_must_be_a_list(ssh_targets, ssh_connect):
    client = ssh_connect(ssh_targets[0])
    with pytest.raises(TypeError, match="argv must be a list of strings"):
        exec_channel(client, "echo hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="argv is empty"):
        run(client, [])


# ---------------------------------------------------------------- upload + a framed protocol

def test_upload_then_speak_json_lines_both_ways_over_one_channel(ssh_targets, ssh_connect,
                                                                 tmp_path):
    target = ssh_targets[2]
    client = ssh_connect(target)
    local = tmp_path / "echo_agent.py"
    local.write_text(ECHO_AGENT)
    remote = str(tmp_path / "remote dir" / "a" / "b" / "echo_agent.py")  # parents made
    assert upload(client, local, remote) == remote
    assert stat.S_IMODE(os.stat(remote).st_mode) == 0o755
    assert Path(remote).read_text() == ECHO_AGENT

    chan = exec_channel(client, [sys.executable, "-u", remote])
    chan.settimeout(30)
    reader = chan.makefile("rb")
    t0 = time.monotonic()
    pids = set()
    for i in range(100):
        msg = {"op": "ping", "i": i, "text": "ünïcode \"quoted\" $HOME"}
        chan.sendall((json.dumps(msg) + "\n").encode())
        reply = json.loads(reader.readline())
        assert reply["echo"] == msg and reply["node"] == target.name
        pids.add(reply["pid"])
    per_message = (time.monotonic() - t0) / 100
    assert len(pids) == 1  # one process served them all, over one channel
    chan.sendall(b'{"op": "exit"}\n')
    assert reader.readline() == b""
    assert chan.recv_exit_status() == 0
    chan.close()
    assert per_message < 0.05, f"{per_message * 1e3:.1f} ms per round trip"


def test_upload_replaces_a_file_whole_and_leaves_no_temporary(ssh_targets, ssh_connect,
                                                              tmp_path):
    client = ssh_connect(ssh_targets[0])
    remote = tmp_path / "dest" / "f.txt"
    for content in ("first version\n", "other version\n"):  # same size, new content
        local = tmp_path / "src.txt"
        local.write_text(content)
        upload(client, local, str(remote), mode=0o600)
        assert remote.read_text() == content
    assert stat.S_IMODE(remote.stat().st_mode) == 0o600
    assert [p.name for p in remote.parent.iterdir()] == ["f.txt"]


def test_upload_errors_name_the_host_and_the_file(ssh_targets, ssh_connect, tmp_path):
    target = ssh_targets[0]
    client = ssh_connect(target)
    with pytest.raises(SSHError, match=f"^{re.escape(target.label)}: cannot upload .*nope"):
        upload(client, tmp_path / "nope", str(tmp_path / "x"))
    (tmp_path / "plain").write_text("")
    (tmp_path / "src").write_text("x")
    with pytest.raises(SSHError, match="plain exists and is not a directory"):
        upload(client, tmp_path / "src", str(tmp_path / "plain" / "sub" / "f"))


# ---------------------------------------------------------------- host keys

def test_unknown_host_key_is_refused_with_its_fingerprint(ssh_cluster, ssh_targets, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    target = dataclasses.replace(ssh_targets[0], known_hosts=str(empty))
    with pytest.raises(UnknownHostKey) as info:
        connect(target)
    fp = ssh_keygen_fingerprint(Path(ssh_cluster.nodes[0].directory,
                                     "ssh_host_ed25519_key.pub"))
    msg = str(info.value)
    assert msg.startswith(f"node1 ({target.user}@127.0.0.1:{target.port}): host key "
                          f"ssh-ed25519 {fp} "
                          f"is not in known_hosts file {empty}")
    assert "--trust-on-first-use" in msg and "\n" not in msg
    assert empty.read_text() == ""  # nothing recorded

    missing = dataclasses.replace(target, known_hosts=str(tmp_path / "absent"))
    with pytest.raises(UnknownHostKey, match="absent does not exist"):
        connect(missing)
    with pytest.raises(UnknownHostKey, match="no known_hosts file given"):
        connect(dataclasses.replace(target, known_hosts=None))


def test_trust_on_first_use_records_the_key_then_checks_it(ssh_cluster, ssh_targets,
                                                           ssh_connect, tmp_path):
    kh = tmp_path / "new dir" / "known_hosts"
    targets = [dataclasses.replace(t, known_hosts=str(kh)) for t in ssh_targets]
    res = parallel(targets, lambda t: connect(t, trust_on_first_use=True).close(), 30)
    assert res.ok, [str(r.error) for r in res.failed]
    assert sorted(kh.read_text().splitlines()) == sorted(
        ssh_cluster.known_hosts.read_text().splitlines())
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    client = ssh_connect(targets[0])  # strict again: the recorded key is checked
    assert run(client, ["true"])[0] == 0
    assert len(kh.read_text().splitlines()) == 3  # nothing added twice


def test_a_changed_host_key_is_a_mismatch_even_with_trust_on_first_use(ssh_cluster,
                                                                       ssh_targets, tmp_path):
    n1, n2 = ssh_cluster.nodes[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{n1.port} {n2.host_key}\n")  # node1 "reinstalled"
    target = dataclasses.replace(ssh_targets[0], known_hosts=str(kh))
    for tofu in (False, True):
        with pytest.raises(HostKeyMismatch) as info:
            connect(target, trust_on_first_use=tofu)
        msg = str(info.value)
        offered = ssh_keygen_fingerprint(Path(n1.directory, "ssh_host_ed25519_key.pub"))
        recorded = ssh_keygen_fingerprint(Path(n2.directory, "ssh_host_ed25519_key.pub"))
        assert msg.startswith(f"node1 ({n1.user}@127.0.0.1:{n1.port}): HOST KEY MISMATCH: "
                              "the host "
                              f"offered ssh-ed25519 {offered} but known_hosts file {kh} "
                              f"records ssh-ed25519 {recorded}")
        assert f"ssh-keygen -R '[127.0.0.1]:{n1.port}' -f {kh}" in msg
    assert kh.read_text() == f"[127.0.0.1]:{n1.port} {n2.host_key}\n"


# ---------------------------------------------------------------- client keys

def test_a_wrong_client_key_is_refused_naming_key_and_user(ssh_targets, tmp_path):
    other = keygen(tmp_path / "other key")
    target = dataclasses.replace(ssh_targets[1], key_file=str(other))
    with pytest.raises(AuthFailed) as info:
        connect(target)
    assert str(info.value).startswith(f"{target.label}: authentication as {target.user} with "
                                      f"key {other} was refused")


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("encrypted", "protected by a passphrase"),
    ("garbage", "is not a private key hpcbatch can read"),
    ("none", "no private key given"),
])
def test_unusable_key_files_are_named(ssh_targets, tmp_path, case, match):
    key = tmp_path / "key"
    if case == "encrypted":
        keygen(key, passphrase="secret words")
    elif case == "garbage":
        key.write_text("not a key\n")
    target = dataclasses.replace(ssh_targets[0], key_file=None if case == "none" else str(key))
    with pytest.raises(AuthFailed, match=match) as info:
        connect(target)
    assert str(info.value).startswith(target.label) and "\n" not in str(info.value)


# ---------------------------------------------------------------- unreachable hosts

def test_a_closed_port_is_unreachable_at_once(ssh_targets):
    port = closed_port()
    target = dataclasses.replace(ssh_targets[0], port=port)
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as info:
        connect(target)
    assert time.monotonic() - t0 < 1
    assert str(info.value) == (f"node1 ({target.user}@127.0.0.1:{port}): cannot connect to "
                               f"127.0.0.1:{port}: connection refused; check that sshd runs "
                               f"there and listens on port {port}")


def test_a_silent_server_times_out(ssh_targets, silent_server):
    target = dataclasses.replace(ssh_targets[0], port=silent_server, connect_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match=f"no SSH server answered on 127.0.0.1:{silent_server} "
                       "within 0.5 s"):
        connect(target)
    assert time.monotonic() - t0 < 3


def test_a_name_that_does_not_resolve_is_unreachable(ssh_targets):
    target = dataclasses.replace(ssh_targets[0], hostname="no-such-host.invalid",
                                 connect_timeout_s=3)
    with pytest.raises(Unreachable, match="'no-such-host.invalid' does not resolve"):
        connect(target)


def test_kill_node_makes_connect_fail(make_cluster, ssh_connect):
    info = make_cluster(2)
    t1, t2 = targets_from_spec(json.loads(info.pool_json.read_text()))
    held = ssh_connect(t2)
    assert run(held, ["printenv", "HPCBATCH_NODE"])[1] == "node2\n"
    assert ct.kill_node(info.directory, "node2")
    with pytest.raises(Unreachable, match=f"^{re.escape(t2.label)}: cannot connect .*refused"):
        connect(t2)
    with pytest.raises(SSHError):  # the connection that was open is gone too
        run(held, ["true"], timeout_s=5)
    c1 = ssh_connect(t1)
    assert run(c1, ["printenv", "HPCBATCH_NODE"])[1] == "node1\n"


# ---------------------------------------------------------------- many hosts

def test_parallel_with_one_unreachable_host(ssh_targets):
    port = closed_port()
    targets = [ssh_targets[0], dataclasses.replace(ssh_targets[1], port=port), ssh_targets[2]]

    def where(t: SSHTarget) -> str:
        client = connect(t)
        try:
            return run(client, ["printenv", "HPCBATCH_NODE"], 30)[1].strip()
        finally:
            client.close()

    t0 = time.monotonic()
    res = parallel(targets, where, timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert [r.name for r in res] == ["node1", "node2", "node3"]  # targets' order
    assert [r.value for r in res.succeeded] == ["node1", "node3"]
    assert res.values == {"node1": "node1", "node3": "node3"}
    assert [r.name for r in res.failed] == ["node2"] and not res.ok
    err = res["node2"].error
    assert isinstance(err, Unreachable) and f"127.0.0.1:{port}" in str(err)
    with pytest.raises(Unreachable, match=f"127.0.0.1:{port}"):
        res.check()


def test_a_hung_host_never_hangs_parallel(ssh_targets, silent_server):
    hung = dataclasses.replace(ssh_targets[1], port=silent_server, connect_timeout_s=60)
    targets = [ssh_targets[0], hung, ssh_targets[2]]
    t0 = time.monotonic()
    res = parallel(targets, lambda t: connect(t), timeout_s=2)
    took = time.monotonic() - t0
    assert 1.9 < took < 4, took
    assert [r.name for r in res.succeeded] == ["node1", "node3"]
    (failed,) = res.failed
    assert isinstance(failed.error, HostTimeout) and isinstance(failed.error, Unreachable)
    assert str(failed.error).startswith(f"{hung.label}: no answer within 2 s")
    for r in res.succeeded:
        r.value.close()


def test_parallel_reports_any_error_per_host_and_closes_late_clients(ssh_targets):
    release = threading.Event()
    late: list = []

    def fn(t: SSHTarget):
        if t.name == "node1":
            raise RuntimeError("boom on node1")
        if t.name == "node2":
            release.wait(10)
            late.append(connect(t))
            return late[-1]
        return t.name

    res = parallel(ssh_targets, fn, timeout_s=0.5)
    assert str(res["node1"].error) == "boom on node1"
    assert isinstance(res["node2"].error, HostTimeout)
    assert res["node3"].value == "node3"
    release.set()
    # closed: nobody can use it any more
    poll(lambda: late and late[0].get_transport() is None, 10, what="the late client closed")
    assert len(parallel([], fn, timeout_s=1)) == 0


# ---------------------------------------------------------------- targets

def test_targets_from_ssh_config_match_the_pool_spec(ssh_cluster, ssh_targets):
    from_cfg = targets_from_ssh_config(ssh_cluster.ssh_config, ["node1", "node2", "node3"])
    assert [dataclasses.replace(t, connect_timeout_s=10.0) for t in from_cfg] == ssh_targets
    assert all(t.connect_timeout_s == 5.0 for t in from_cfg)
    assert targets_from_ssh_config(ssh_cluster.ssh_config, "node[1-3]") == from_cfg
    client = connect(from_cfg[1])
    assert run(client, ["printenv", "HPCBATCH_NODE"])[1] == "node2\n"
    client.close()
    with pytest.raises(ValidationError, match="ssh_config: ssh_config file .*absent does not"):
        targets_from_ssh_config(ssh_cluster.directory / "absent", ["node1"])


def test_targets_from_spec_defaults_and_relative_paths(tmp_path):
    spec = {"hosts": "n[1-2]", "user": "u", "port": 2222, "key": "keys/id",
            "known_hosts": "~/kh"}
    t1, t2 = targets_from_spec(spec, base_dir=tmp_path)
    assert t1 == SSHTarget("n1", "n1", 2222, "u", str(tmp_path / "keys" / "id"),
                           str(Path.home() / "kh"), 10.0)
    assert t2.name == t2.hostname == "n2"
    (t,) = targets_from_spec({"hosts": [{"name": "a", "hostname": "10.0.0.5", "user": "v",
                                         "port": "2201"}], "user": "u", "port": 22})
    assert (t.hostname, t.port, t.user, t.label) == ("10.0.0.5", 2201, "v", "a (v@10.0.0.5:2201)")


@pytest.mark.parametrize("spec,field", [
    ({}, "hosts"),
    ({"hosts": []}, "hosts"),
    ({"hosts": [{"hostname": "x"}]}, "hosts[0].name"),
    ({"hosts": [{"name": "a"}, {"name": "a"}]}, "hosts[1].name"),
    ({"hosts": [{"name": "a", "port": 0}]}, "hosts[0].port"),
    ({"hosts": [{"name": "a", "port": "22; rm"}]}, "hosts[0].port"),
    ({"hosts": [{"name": "a", "port": 70000}]}, "hosts[0].port"),
    ({"hosts": [{"name": "a", "hostname": "-oProxyCommand=x"}]}, "hosts[0].hostname"),
    ({"hosts": [{"name": "a b"}]}, "hosts[0].name"),
    ({"hosts": [{"name": "a", "user": "-l root"}]}, "hosts[0].user"),
    ({"hosts": ["a"], "connect_timeout_s": 0}, "connect_timeout_s"),
    ({"hosts": ["a"], "ssh_config": "/nonexistent/ssh_config"}, "ssh_config"),
    ({"hosts": "n[1-"}, "hostlist"),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValidationError) as info:
        targets_from_spec(spec)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)


def test_fingerprint_is_openssh_spelling(ssh_cluster):
    import paramiko
    nd = ssh_cluster.nodes[0]
    key = paramiko.PKey.from_path(Path(nd.directory, "ssh_host_ed25519_key"))
    assert fingerprint(key) == ssh_keygen_fingerprint(Path(nd.directory,
                                                           "ssh_host_ed25519_key.pub"))
