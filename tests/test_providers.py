"""The provider seam: typed configs, node roots, agents, fencing and node files.

Local providers run real agents and processes on this machine; SSH ones use the
session's sshd test cluster (skipped where sshd is missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import pid_alive, poll

from hpcbatch import env as E
from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.models import PoolSpec
from hpcbatch.providers import home_id, provider_class, provider_for, validate_config
from hpcbatch.providers.base import NodeDesc
from hpcbatch.timings import Timings


def test_pool_paths_given_on_the_command_line_are_relative_to_where_it_runs(tmp_path,
                                                                          monkeypatch):
    from hpcbatch.providers import ssh_pool_config
    specdir, here = tmp_path / "spec", tmp_path / "here"
    specdir.mkdir()
    here.mkdir()
    (specdir / "kh").write_text("")
    (here / "kh").write_text("")
    (specdir / "pool.json").write_text('{"hosts": ["n1"], "known_hosts": "kh"}')
    monkeypatch.chdir(here)
    assert ssh_pool_config(spec=str(specdir / "pool.json"))["known_hosts"] == \
        str(specdir / "kh")  # the spec's own relative paths: the spec's folder
    assert ssh_pool_config(spec=str(specdir / "pool.json"), known_hosts="kh")[
        "known_hosts"] == str(here / "kh")  # an option's: the current folder


# ---------------------------------------------------------------- configs and names

def _ssh_spec(tmp_path: Path, pool: str = "p", **extra) -> PoolSpec:
    from hpcbatch.providers import ssh_pool_config
    (tmp_path / "kh").write_text("")
    cfg = ssh_pool_config(hostlist="n[1-2]", known_hosts=str(tmp_path / "kh"), **extra)
    return PoolSpec(pool, "ssh", target_nodes=2, provider_config=cfg,
                    inter_node_communication=True)


def test_stored_configs_come_back_typed_and_round_trip(tmp_path):
    from hpcbatch.providers.local import LocalConfig
    from hpcbatch.providers.ssh import SSHConfig
    assert validate_config("local", {}) == LocalConfig()
    spec = _ssh_spec(tmp_path, python="/opt/py/bin/python3")
    cfg = validate_config("ssh", spec.provider_config)
    assert isinstance(cfg, SSHConfig) and cfg.python == "/opt/py/bin/python3"
    assert [h.name for h in cfg.hosts] == ["n1", "n2"]
    assert SSHConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("name,raw,needle", [
    ("local", {"hosts": []}, "takes no provider config"),
    ("ssh", {"hosts": []}, "provider_config.hosts"),
    ("ssh", {"hosts": [{"name": "a", "hostname": "a"}], "colour": 1}, "unknown field(s) colour"),
    ("ssh", {"hosts": [{"name": "a", "hostname": "a"}], "connect_timeout_s": -1},
     "connect_timeout_s"),
    ("slurm-ish", {}, "is not one of local, ssh"),
])
def test_bad_stored_configs_name_the_field(name, raw, needle):
    with pytest.raises(ValidationError) as exc:
        validate_config(name, raw)
    assert needle in str(exc.value)


def test_make_spec_validates_options_per_provider(tmp_path):
    local = provider_class("local").make_spec("loc", target_nodes=3)
    assert (local.provider, local.target_nodes, local.provider_config) == ("local", 3, {})
    with pytest.raises(ValidationError, match="hostlist are not options of local pools"):
        provider_class("local").make_spec("loc", hostlist="n1")
    (tmp_path / "kh").write_text("")
    ssh = provider_class("ssh").make_spec("far", hostlist="n[1-3]",
                                          known_hosts=str(tmp_path / "kh"))
    assert ssh.target_nodes == 3 and ssh.inter_node_communication is True
    off = provider_class("ssh").make_spec("far", hostlist="n1", known_hosts=str(tmp_path / "kh"),
                                          inter_node_communication=False)
    assert off.inter_node_communication is False


def test_fixed_pools_cannot_grow_or_shrink(tmp_path):
    for spec in (PoolSpec("loc"), _ssh_spec(tmp_path)):
        provider = provider_for(spec, tmp_path / "home")
        with pytest.raises(NotImplementedError, match="fixed set of nodes"):
            provider.grow(1)
        with pytest.raises(NotImplementedError, match="fixed set of nodes"):
            provider.shrink([provider.fixed_nodes()[0].node_id])


def test_node_roots_local_under_the_home_and_remote_unique_per_home(tmp_path):
    a, b = tmp_path / "home a", tmp_path / "home b"
    local = provider_for(PoolSpec("loc", target_nodes=2), a)
    assert [n.node_id for n in local.fixed_nodes()] == ["local-1", "local-2"]
    assert local.node_root("local-2") == str(a / "nodes" / "loc" / "local-2")
    spec = _ssh_spec(tmp_path, "same", node_root="/scratch/hpc")
    root_a = provider_for(spec, a).node_root("n1")
    root_b = provider_for(spec, b).node_root("n1")
    assert root_a != root_b  # two homes, one login, a pool of the same name
    assert root_a == f"/scratch/hpc/{home_id(a)}/same/n1"
    assert provider_for(spec, a).node_root("n1") == root_a  # stable
    assert oct((a / "home-id").stat().st_mode & 0o777) == "0o600"
    default = provider_for(_ssh_spec(tmp_path, "d"), a).node_root("n2")
    assert default == f"~/.hpcbatch-node/{home_id(a)}/d/n2"


def test_inter_node_env_follows_the_pool(tmp_path):
    spec = _ssh_spec(tmp_path)
    on = provider_for(spec, tmp_path / "h")
    assert on.inter_node_env("n1", "/r/n1") == {E.SSH_CONFIG: "/r/n1/ssh/config"}
    cfg = dict(spec.provider_config, node_ssh_config="/etc/hpc/ssh_config")
    off = provider_for(PoolSpec("p", "ssh", target_nodes=2, provider_config=cfg),
                       tmp_path / "h")
    assert off.inter_node_env("n1", "/r/n1") == {E.SSH_CONFIG: "/etc/hpc/ssh_config"}
    assert provider_for(PoolSpec("loc"), tmp_path / "h").inter_node_env("local-1", "/r") == {}


# ---------------------------------------------------------------- local nodes

@pytest.fixture
def local(tmp_path):
    return provider_for(PoolSpec("loc", target_nodes=1, task_slots_per_node=2),
                        tmp_path / "home")


def _hello(chan, timeout_s: float = 15.0):
    """The agent's first message (a protocol.Hello)."""
    got: list = []
    chan.listen(got.append)
    poll(lambda: got, timeout_s=timeout_s, what="the agent's hello")
    assert got[0] is not None, f"the agent's channel closed first: {chan.last_words()}"
    return got[0]


def test_a_local_agent_starts_in_the_node_root_and_says_hello(local):
    node = local.fixed_nodes()[0]
    chan = local.start_agent(node, token="t0k3n", timings=Timings())
    try:
        hello = _hello(chan)
        assert (hello.node_id, hello.token, hello.slots) == ("local-1", "t0k3n", 2)
        assert Path(hello.root) == Path(local.node_root("local-1"))
        assert Path(local.node_root("local-1")).is_dir()
    finally:
        chan.close()
        assert chan.wait_closed(15), "the agent did not stop"


def _spawn_in_session(token: str) -> subprocess.Popen:
    """A 'task' as an agent starts it: its own session, the agent token in its env,
    with a child that outlives it unless its session is killed."""
    env = dict(os.environ, **{E.AGENT_TOKEN: token})
    return subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


def test_local_fence_kills_the_sessions_and_token_holders(local):
    proc = _spawn_in_session("fence-me")
    child = int(proc.stdout.readline())
    try:
        assert local.fence(local.fixed_nodes()[0], "fence-me", [proc.pid])
        proc.wait(timeout=5)
        poll(lambda: not pid_alive(child), timeout_s=5, what="the task's child killed")
    finally:
        proc.kill()
        proc.wait()


def test_reap_orphans_kills_what_an_earlier_agent_of_the_pool_left(local, tmp_path):
    proc = _spawn_in_session("old-agent")
    other = _spawn_in_session("other-pool")
    try:
        records = [{"pool_id": "loc", "node_id": "local-1", "token": "old-agent",
                    "pid": 999_999_999, "root": "/nowhere"},
                   {"pool_id": "elsewhere", "node_id": "local-1", "token": "other-pool",
                    "pid": other.pid, "root": "/x"}]
        assert local.reap_orphans(records) == []
        proc.wait(timeout=5)
        assert other.poll() is None  # another pool's records are not this provider's
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


def test_local_node_files_never_follow_a_link(local, tmp_path):
    task_dir = Path(local.node_root("local-1")) / "jobs" / "j" / "t"
    task_dir.mkdir(parents=True)
    (task_dir / "stdout.txt").write_text("mine\n")
    assert local.read_node_file("local-1", str(task_dir / "stdout.txt")) == b"mine\n"
    secret = tmp_path / "secret"
    secret.write_text("not yours\n")
    (task_dir / "stderr.txt").symlink_to(secret)
    with pytest.raises(HpcBatchError, match="stderr.txt is a symbolic link"):
        local.read_node_file("local-1", str(task_dir / "stderr.txt"))
    # a directory on the way replaced by a link
    elsewhere = tmp_path / "elsewhere" / "t"
    elsewhere.mkdir(parents=True)
    (elsewhere / "stdout.txt").write_text("planted\n")
    os.rename(task_dir.parent, tmp_path / "moved")
    task_dir.parent.symlink_to(elsewhere.parent)
    with pytest.raises(HpcBatchError, match="j is a symbolic link"):
        local.read_node_file("local-1", str(task_dir / "stdout.txt"))
    with pytest.raises(HpcBatchError, match="not inside the node root"):
        local.read_node_file("local-1", str(secret))
    fifo = Path(local.node_root("local-1")) / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(HpcBatchError, match="not a regular file"):
        local.read_node_file("local-1", str(fifo))  # and it does not block
    with pytest.raises(FileNotFoundError):
        local.read_node_file("local-1", str(Path(local.node_root("local-1")) / "none"))


def test_local_remove_tree_stays_inside_the_node_root(local, tmp_path):
    root = Path(local.node_root("local-1"))
    (root / "jobs" / "j" / "t").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (root / "jobs" / "k").symlink_to(outside)
    assert local.remove_trees(["local-1"], "jobs/j") == {}
    assert not (root / "jobs" / "j").exists()
    problems = local.remove_trees(["local-1"], "jobs/k/keep")
    assert "symbolic link" in problems["local-1"] and (outside / "keep").is_dir()
    local.remove_tree("local-1", "jobs/never-made")  # missing is fine
    with pytest.raises(ValidationError, match="not a path inside a node root"):
        local.remove_tree("local-1", "../../x")


def test_local_cleanup_removes_the_pools_own_directories(local):
    local.key_dir.mkdir(parents=True)
    Path(local.node_root("local-1")).mkdir(parents=True)
    assert local.cleanup_pool() == []
    assert not local.key_dir.exists()
    assert not Path(local.node_root("local-1")).exists()


# ---------------------------------------------------------------- SSH nodes

@pytest.fixture
def ssh_provider(ssh_cluster, tmp_path):
    spec = json.loads(ssh_cluster.pool_json.read_text())
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node roots")
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(spec))
    pool = provider_class("ssh").make_spec("far", spec=str(path), task_slots_per_node=2)
    return provider_for(pool, tmp_path / "home")


def test_ssh_preflight_and_an_agent_over_ssh(ssh_provider, tmp_path):
    assert ssh_provider.preflight().ok
    node = ssh_provider.fixed_nodes()[0]
    assert (node.node_id, node.host, node.slots) == ("node1", "node1", 2)
    chan = ssh_provider.start_agent(node, token="ssh-token", timings=Timings())
    try:
        hello = _hello(chan, 30)
        assert (hello.node_id, hello.token) == ("node1", "ssh-token")
        assert hello.root == ssh_provider.node_root("node1")
        assert hello.root.startswith(str(tmp_path / "node roots" / home_id(
            tmp_path / "home") / "far"))
        # inter-node trust was installed under the node root
        assert (Path(hello.root) / "ssh" / "config").is_file()
    finally:
        chan.close()
        assert chan.wait_closed(15), "the agent did not stop"
    assert ssh_provider.cleanup_pool() == []
    assert not ssh_provider.key_dir.exists()
    # the node root went too: no copy of the pool's private key is left on the node
    assert not Path(hello.root).exists()


def test_ssh_node_files_and_trees(ssh_provider):
    root = Path(ssh_provider.node_root("node2"))
    task_dir = root / "jobs" / "j" / "t"
    task_dir.mkdir(parents=True)
    (task_dir / "stdout.txt").write_text("remote\n")
    assert ssh_provider.read_node_file("node2", str(task_dir / "stdout.txt")) == b"remote\n"
    (task_dir / "stderr.txt").symlink_to("/etc/hostname")
    with pytest.raises(HpcBatchError, match="is a symbolic link on node2"):
        ssh_provider.read_node_file("node2", str(task_dir / "stderr.txt"))
    with pytest.raises(FileNotFoundError):
        ssh_provider.read_node_file("node2", str(task_dir / "none.txt"))
    assert ssh_provider.read_node_file("node2", str(task_dir / "stdout.txt"), offset=2,
                                       length=3) == b"mot"
    (task_dir / "out").mkdir()
    (task_dir / "out" / "r.bin").write_bytes(b"12345")
    (task_dir / "up").symlink_to(root)  # a linked directory: listed, never followed
    listed = {(f.name, f.kind, f.size) for f in ssh_provider.list_node_dir("node2",
                                                                           str(task_dir))}
    assert listed == {("out", "dir", 0), ("out/r.bin", "file", 5), ("stdout.txt", "file", 7),
                      ("stderr.txt", "link", 0), ("up", "link", 0)}
    with pytest.raises(HpcBatchError, match="up is a symbolic link on node2"):
        ssh_provider.read_node_file("node2", str(task_dir / "up" / "jobs" / "j" / "t" /
                                                 "stdout.txt"))
    with pytest.raises(HpcBatchError, match="not inside the node root"):
        ssh_provider.read_node_file("node2", "/etc/hostname")
    assert ssh_provider.remove_trees(["node2"], "jobs/j") == {}
    assert not (root / "jobs" / "j").exists()


def test_ssh_fence_reaches_the_node_and_kills_the_tasks(ssh_provider):
    proc = _spawn_in_session("remote-token")  # loopback 'nodes': this machine's processes
    child = int(proc.stdout.readline())
    try:
        assert ssh_provider.fence(ssh_provider.fixed_nodes()[0], "remote-token", [proc.pid])
        proc.wait(timeout=5)
        poll(lambda: not pid_alive(child), timeout_s=5, what="the task's child killed")
    finally:
        proc.kill()
        proc.wait()


def test_ssh_fence_is_not_sure_of_an_unreachable_node(tmp_path):
    from hpcbatch.providers import ssh_pool_config
    (tmp_path / "kh").write_text("")
    cfg = ssh_pool_config(hostlist="127.0.0.1", port=1, known_hosts=str(tmp_path / "kh"))
    cfg["connect_timeout_s"] = 2
    provider = provider_for(PoolSpec("gone", "ssh", provider_config=cfg), tmp_path / "h")
    t0 = time.monotonic()
    assert provider.fence(provider.fixed_nodes()[0], "tok", [12345]) is False
    assert time.monotonic() - t0 < 20
    problems = provider.reap_orphans([{"pool_id": "gone", "node_id": "127.0.0.1",
                                       "token": "tok", "pid": 1, "root": "/r"}])
    assert len(problems) == 1 and problems[0].startswith("127.0.0.1: what an earlier agent")


def test_an_unknown_node_is_named(tmp_path):
    provider = provider_for(_ssh_spec(tmp_path), tmp_path / "h")
    with pytest.raises(ValidationError, match="'n9' is not a node of pool 'p'"):
        provider.read_node_file("n9", "/x")
    assert isinstance(provider.fixed_nodes()[0], NodeDesc)


def test_the_provider_of_a_set_of_options():
    from hpcbatch.providers import provider_of_options
    assert provider_of_options([]) == "local"
    assert provider_of_options(["spec", "user", "node_root"]) == "ssh"
    with pytest.raises(ValidationError, match="do not belong to one provider"):
        provider_of_options(["hostlist", "colour"])
