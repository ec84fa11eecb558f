"""`hpcbatch cluster up --slurm` / status / down: a real Slurm cluster, and nothing of it
left afterwards (daemons by PID, namespaces, veths, bridge, files)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest_slurm import skip_without_slurm
from helpers import run_cli

from hpcbatch.launch import slurmcluster as SC


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_cluster_up_status_down_leaves_nothing(tmp_path):
    skip_without_slurm()
    d = tmp_path / "sc"
    r = run_cli(tmp_path / "home", "cluster", "up", "--slurm", "-n", "3", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    assert "export SLURM_CONF=" in r.stdout
    cl = SC.slurm_status(d)
    assert [nd.state for nd in cl.nodes] == ["idle"] * 3 and cl.ctld_alive
    env = {**os.environ, "SLURM_CONF": str(cl.conf)}
    out = subprocess.run(["srun", "-N3", "-n3", "printenv", "SLURMD_NODENAME"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert sorted(out.stdout.split()) == ["sn1", "sn2", "sn3"], out.stderr
    r = run_cli(tmp_path / "home", "cluster", "status", "--dir", str(d))
    assert r.returncode == 0 and "3 of 3 slurmd running" in r.stdout, r.stdout + r.stderr
    # a second cluster at the same time gets its own names, subnet and ports
    other = SC.slurm_up(1, tmp_path / "sc2")
    try:
        assert other.name != cl.name and other.bridge != cl.bridge
        assert other.ctld_port not in (cl.ctld_port, cl.slurmd_port)
        assert other.controller_addr.rsplit(".", 1)[0] != cl.controller_addr.rsplit(".", 1)[0]
    finally:
        SC.slurm_down(tmp_path / "sc2")
    r = run_cli(tmp_path / "home", "cluster", "down", "--dir", str(d))
    assert r.returncode == 0 and "slurmctld" in r.stdout, r.stdout + r.stderr
    assert SC.leftovers(cl) == []
    pids = [cl.ctld_pid, *(nd.pid for nd in cl.nodes)]
    assert not any(os.path.exists(f"/proc/{p}") and SC._ours(p, s) for p, s in
                   zip(pids, [cl.ctld_start, *(nd.start_time for nd in cl.nodes)]))
    assert cl.name not in _ip("netns", "list") and cl.name not in _ip("-o", "link", "show")
    assert not d.exists()
    r = run_cli(tmp_path / "home", "cluster", "status", "--dir", str(d))
    assert r.returncode != 0 and "no cluster" in (r.stdout + r.stderr).lower()


def test_slurm_cluster_refused_without_root_or_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(SC, "missing_commands", lambda: ["slurmctld"])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(SC.ClusterError, match="apt-get install slurmctld slurmd slurm-client"):
        SC.slurm_up(3, tmp_path / "x")
