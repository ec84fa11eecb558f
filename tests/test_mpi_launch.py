"""The MPI launch layer: how each flavour's mpiexec is spelled (pure), and a real dry run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcbatch.launch import mpi

OMPI5 = "mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/"
HYDRA = "HYDRA build details:\n    Version: 4.2.0\n    Release Date: ..."
INTEL = "Intel(R) MPI Library for Linux* OS, Version 2021.10"


@pytest.mark.parametrize("text,flavour", [(OMPI5, "openmpi"), (HYDRA, "mpich"),
                                          (INTEL, "intel"), ("something else", "unknown")])
def test_flavour_from_version(text, flavour):
    assert mpi.flavour_from_version(text) == flavour


def test_open_mpi_spelling(tmp_path):
    cmd, env = mpi.mpiexec_command(
        4, ["python", "k.py"], mpiexec="mpiexec", flavour="openmpi", oversubscribe=True,
        hostfile=tmp_path / "hf", ssh_config=tmp_path / "cfg", ranks_per_node=2,
        env={"PATH": "/bin", "SLURM_JOB_ID": "7", "PMIX_RANK": "0", "OMPI_MCA_btl": "tcp,self",
             "OMPI_COMM_WORLD_RANK": "3"}, forward=("HPCBATCH_JOB_ID",))
    assert cmd == ["mpiexec", "--oversubscribe", "--hostfile", str(tmp_path / "hf"),
                   "--map-by", "ppr:2:node", "--mca", "plm_rsh_args", f"-F {tmp_path / 'cfg'}",
                   "-x", "HPCBATCH_JOB_ID", "-n", "4", "python", "k.py"]
    assert "SLURM_JOB_ID" not in env and "PMIX_RANK" not in env
    assert "OMPI_COMM_WORLD_RANK" not in env
    assert env["OMPI_MCA_btl"] == "tcp,self"  # the user's own MCA setting is kept
    assert env["OMPI_MCA_mtl"] == "^ofi"


def test_mpich_spelling(tmp_path):
    cmd, env = mpi.mpiexec_command(2, ["a.out"], mpiexec="mpiexec", flavour="mpich",
                                   hostfile=tmp_path / "hf", ssh_config=tmp_path / "my cfg",
                                   ranks_per_node=1, env={"PMI_RANK": "1"},
                                   forward=("HPCBATCH_JOB_ID", "HPCBATCH_TASK_ID"))
    wrapper = tmp_path / "hpcbatch-ssh"
    assert cmd == ["mpiexec", "-f", str(tmp_path / "hf"), "-ppn", "1", "-launcher", "ssh",
                   "-launcher-exec", str(wrapper), "-genvlist",
                   "HPCBATCH_JOB_ID,HPCBATCH_TASK_ID", "-n", "2", "a.out"]
    assert wrapper.read_text() == f"#!/bin/sh\nexec ssh -F '{tmp_path / 'my cfg'}' \"$@\"\n"
    assert os.access(wrapper, os.X_OK)
    assert "PMI_RANK" not in env and "OMPI_MCA_btl" not in env


def test_hostfiles_round_trip(tmp_path):
    hosts = [("node1", 2), ("node2", 1)]
    for flavour, text in (("openmpi", "node1 slots=2\nnode2 slots=1\n"),
                          ("mpich", "node1:2\nnode2:1\n")):
        assert mpi.hostfile_for(flavour, hosts) == text
        path = tmp_path / flavour
        path.write_text(text + "# comment\n\n")
        assert mpi.read_hostfile(path) == hosts


def test_dry_run_inside_a_multi_instance_task(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=4\nnode2 slots=4\n")
    env = dict(os.environ, HPCBATCH_HOSTFILE=str(hostfile), HPCBATCH_SSH_CONFIG="/x/cfg",
               HPCBATCH_TASK_SHARED_DIR=str(tmp_path / "shared"), HPCBATCH_JOB_ID="j")
    r = subprocess.run([sys.executable, "-m", "hpcbatch.launch.mpi", "--ranks-per-node", "1",
                        "--dry-run", "--", "python", "-c", "pass"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    flavour = mpi.detect_flavour(mpi.default_mpiexec())
    written = (tmp_path / "shared" / f"hostfile.{flavour}").read_text()
    assert written == mpi.hostfile_for(flavour, [("node1", 1), ("node2", 1)])
    # 'python' is the pool's python: the one running hpcbatch-mpiexec
    assert f" -n 2 {sys.executable} -c pass" in r.stdout
    assert "HPCBATCH_JOB_ID" in r.stdout  # forwarded to remote ranks


def test_outside_a_task_it_says_so():
    env = {k: v for k, v in os.environ.items() if k != "HPCBATCH_HOSTFILE"}
    r = subprocess.run([sys.executable, "-m", "hpcbatch.launch.mpi", "--", "true"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "run this inside a multi-instance task" in r.stderr


def test_open_mpi_refuses_an_ssh_config_path_with_whitespace(tmp_path):
    # PRRTE splits plm_ssh_args on whitespace (quotes do not help): say so, up front
    with pytest.raises(ValueError, match="Open MPI splits its ssh arguments on whitespace, so "
                       "it cannot use the ssh_config '.*/my cfg'; give the pool a node root "
                       "and ssh_config path without spaces"):
        mpi.mpiexec_command(2, ["a.out"], mpiexec="mpiexec", flavour="openmpi",
                            ssh_config=tmp_path / "my cfg")


@pytest.mark.parametrize("version,config,want", [
    (OMPI5, "/x/cfg", "--mca plm_rsh_args '-F /x/cfg'"),
    (OMPI5, "/x y/cfg", None),
    (HYDRA, "/x y/cfg", "-launcher ssh -launcher-exec"),
])
def test_task_mpiexec_per_flavour_and_its_one_line_error(tmp_path, version, config, want):
    fake = tmp_path / "mpiexec"  # only answers --version: the flavour is all that is read
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version}\nEOF\n")
    fake.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    env = dict(os.environ, HPCBATCH_HOSTFILE=str(hostfile), HPCBATCH_SSH_CONFIG=config,
               HPCBATCH_TASK_SHARED_DIR=str(tmp_path / "shared"))
    r = subprocess.run([sys.executable, "-m", "hpcbatch.launch.mpi", "--mpiexec", str(fake),
                        "--dry-run", "--", "a.out"], env=env, capture_output=True, text=True)
    if want is None:
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.startswith("hpcbatch-mpiexec: error: Open MPI splits its ssh "
                                   "arguments on whitespace") and r.stderr.count("\n") == 1
    else:
        assert r.returncode == 0, r.stderr
        assert want in r.stdout and r.stdout.startswith(str(fake))
