import math

import numpy as np
import pytest

from hpcbatch.kernels import pi


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_pi_matches_its_serial_reference_exactly(harness, ranks):
    params = {"samples": 200_003, "seed": 7}
    res = harness("pi", ranks, **params)
    ref = pi.reference(ranks, **params)
    assert res.reduced["hits"] == ref["hits"]
    assert res.reduced["samples"] == 200_003
    assert res.reduced["pi"] == ref["pi"]
    assert abs(res.reduced["pi"] - math.pi) < 0.01
    assert res.attrs["ranks"] == ranks and len(res.attrs["node_ids"]) == ranks


def test_reference_is_reproducible_and_rank_dependent():
    a = pi.reference(2, samples=10_000, seed=1)
    assert a == pi.reference(2, samples=10_000, seed=1)
    assert a["samples"] == 10_000
    assert np.isclose(a["pi"], 4 * a["hits"] / 10_000)
