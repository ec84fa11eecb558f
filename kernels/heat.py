"""2-D heat diffusion (explicit 5-point stencil) with halo exchange between row blocks.

The climate/hydrology pattern: the domain is split into blocks of rows, each step
exchanges one ghost row with each neighbour, edges are held at zero.
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block, exchange_halos
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "2-D diffusion stencil, row-block domain decomposition, final field gathered"
PARAMS = {
    "nx": Param(int, 256, "rows", min=3),
    "ny": Param(int, 256, "columns", min=3),
    "steps": Param(int, 200, "time steps", min=0),
    "alpha": Param(float, 0.2, "diffusion number (stable <= 0.25)", min=0.0, max=0.25),
}
OUTPUTS = {
    "field": Output("concat", description="the final field, rows in order"),
    "total_heat": Output("sum"),
}


def initial(nx: int, ny: int) -> np.ndarray:
    u = np.zeros((nx, ny))
    u[nx // 4: 3 * nx // 4, ny // 4: 3 * ny // 4] = 1.0
    u[0, :] = u[-1, :] = u[:, 0] = u[:, -1] = 0.0
    return u


def _step(u: np.ndarray, alpha: float, first: int, last: int) -> None:
    """Update rows first..last-1 of ``u`` (which has neighbours above and below)."""
    c = u[first:last, 1:-1]
    lap = u[first - 1:last - 1, 1:-1] + u[first + 1:last + 1, 1:-1] + \
        u[first:last, :-2] + u[first:last, 2:] - 4.0 * c
    u[first:last, 1:-1] = c + alpha * lap


def run(comm, nx: int, ny: int, steps: int, alpha: float) -> dict:
    lo, hi = block(nx, comm.size, comm.rank)
    u = np.zeros((hi - lo + 2, ny))  # one ghost row above and below
    u[1:-1] = initial(nx, ny)[lo:hi]
    # global rows 0 and nx-1 are fixed boundaries: update only interior rows we own
    first = 1 + (1 if lo == 0 else 0)
    last = (hi - lo + 1) - (1 if hi == nx else 0)
    for _ in range(steps):
        exchange_halos(comm, u)
        if last > first:
            _step(u, alpha, first, last)
    mine = u[1:-1]
    return {"field": mine, "total_heat": float(mine.sum())}


def reference(ranks: int, nx: int, ny: int, steps: int, alpha: float) -> dict:
    u = initial(nx, ny)
    for _ in range(steps):
        _step(u, alpha, 1, nx - 1)
    return {"field": u, "total_heat": float(u.sum())}
