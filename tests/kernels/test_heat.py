"""heat: halo exchange over row blocks must give the serial field bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from hpcbatch.kernels import heat


@pytest.mark.parametrize("ranks,nx,ny,steps", [
    (1, 37, 29, 60), (2, 37, 29, 60), (4, 37, 29, 60),  # 37 rows: uneven blocks
    (4, 5, 7, 20),  # blocks of 2, 1, 1, 1 rows: every rank's halo rows feed its neighbours
    (4, 3, 6, 5),   # more ranks than rows: rank 3 owns nothing
])
def test_heat_under_mpiexec_equals_the_serial_stencil(harness, ranks, nx, ny, steps):
    p = {"nx": nx, "ny": ny, "steps": steps, "alpha": 0.2}
    res, ref = harness("heat", ranks, **p), heat.reference(ranks, **p)
    field = res.reduced["field"]
    assert field.shape == (nx, ny)
    np.testing.assert_array_equal(field, ref["field"])
    total = np.asarray(res.reduced["total_heat"]).item()
    assert total == pytest.approx(ref["total_heat"], rel=1e-12, abs=1e-15)
    assert total == pytest.approx(field.sum(), rel=1e-12, abs=1e-15)


def naive(nx: int, ny: int, steps: int, alpha: float) -> np.ndarray:
    """The same physics, cell by cell, written independently of the kernel."""
    u = [[0.0] * ny for _ in range(nx)]
    for i in range(1, nx - 1):
        for j in range(1, ny - 1):
            if nx // 4 <= i < 3 * nx // 4 and ny // 4 <= j < 3 * ny // 4:
                u[i][j] = 1.0
    for _ in range(steps):
        new = [row[:] for row in u]
        for i in range(1, nx - 1):
            for j in range(1, ny - 1):
                new[i][j] = u[i][j] + alpha * (u[i - 1][j] + u[i + 1][j] + u[i][j - 1]
                                               + u[i][j + 1] - 4.0 * u[i][j])
        u = new
    return np.array(u)


def test_reference_matches_a_cell_by_cell_stencil():
    ref = heat.reference(1, nx=9, ny=8, steps=12, alpha=0.23)
    np.testing.assert_allclose(ref["field"], naive(9, 8, 12, 0.23), rtol=0, atol=1e-14)
    assert np.array_equal(heat.reference(1, nx=9, ny=8, steps=0, alpha=0.2)["field"],
                          heat.initial(9, 8))


def test_heat_lost_per_step_is_the_flux_into_the_cold_boundary():
    # sum over the interior of the Laplacian = -(sum of u over boundary-adjacent cells,
    # once per boundary neighbour), so H(t+1) - H(t) = -alpha * that sum
    nx, ny, alpha = 12, 10, 0.25
    weight = np.zeros((nx, ny))
    weight[1, 1:-1] += 1
    weight[-2, 1:-1] += 1
    weight[1:-1, 1] += 1
    weight[1:-1, -2] += 1
    prev = heat.reference(1, nx=nx, ny=ny, steps=0, alpha=alpha)
    assert prev["total_heat"] == pytest.approx(6 * 5)  # the hot square: rows 3..8, cols 2..6
    for steps in range(1, 25):
        cur = heat.reference(1, nx=nx, ny=ny, steps=steps, alpha=alpha)
        flux = alpha * float((weight * prev["field"]).sum())
        assert cur["total_heat"] - prev["total_heat"] == pytest.approx(-flux, abs=1e-12)
        assert cur["total_heat"] <= prev["total_heat"]
        # maximum principle: a stable explicit step never leaves [0, 1]
        assert cur["field"].min() >= 0.0 and cur["field"].max() <= 1.0
        assert (cur["field"][[0, -1], :] == 0).all() and (cur["field"][:, [0, -1]] == 0).all()
        prev = cur


def test_symmetric_start_stays_symmetric():
    ref = heat.reference(1, nx=16, ny=12, steps=30, alpha=0.2)
    u = ref["field"]
    np.testing.assert_allclose(u, u[::-1, :], atol=1e-14)
    np.testing.assert_allclose(u, u[:, ::-1], atol=1e-14)
