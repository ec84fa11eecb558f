"""A real Slurm test cluster (a pytest plugin module, loaded by tests/conftest.py).

* ``slurm_cluster`` (session) three Slurm nodes sn1..sn3 (``hpcbatch.launch.slurmcluster``:
  one slurmctld, one slurmd per network namespace) in a tmp folder; ``SLURM_CONF`` is set
  for the session while it runs. Torn down at the end, checking nothing of it is left.
  Skipped, with the reason, without root or without Slurm's packages (scripts/test.sh
  installs them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import unavailable

from hpcbatch.launch import slurmcluster as SC


def skip_without_slurm() -> None:
    reason = unavailable(SC.check_slurm)
    if reason:
        pytest.skip(f"{reason} (scripts/test.sh installs them; the Slurm tests run as root)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SC.SlurmCluster]:
    skip_without_slurm()
    d = tmp_path_factory.mktemp("slurm") / "cluster"
    cl = SC.slurm_up(3, d)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cl.conf)
    try:
        yield cl
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        SC.slurm_down(d)
        left = SC.leftovers(cl)
        assert not left, f"left after slurm cluster down: {left}"
