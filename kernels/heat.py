"""2-D heat diffusion: explicit 5-point stencil, row-block domain decomposition.

The climate / hydrology modelling pattern. The ``nx`` x ``ny`` grid starts cold
with a hot square (1.0) in the middle; its outer rows and columns are held at 0
(Dirichlet), so heat leaks out through them and ``total_heat`` falls with time.
Each step::

    u[i, j] += alpha * (u[i-1, j] + u[i+1, j] + u[i, j-1] + u[i, j+1] - 4 u[i, j])

Rows are split into blocks (uneven when ``nx`` is not divisible by the ranks;
ranks beyond ``nx`` own nothing); before every step each rank swaps one ghost row
with each neighbour (``Sendrecv``). Each cell sees exactly the same operations
as in the serial reference, so the gathered field is bit-for-bit the serial one
whatever the rank count.
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block, exchange_halos
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "2-D diffusion stencil, halo exchange between row blocks, final field gathered"
PARAMS = {
    "nx": Param(int, 256, "grid rows (split over the ranks)", min=3),
    "ny": Param(int, 256, "grid columns", min=3),
    "steps": Param(int, 200, "time steps", min=0),
    "alpha": Param(float, 0.2, "diffusion number D*dt/dx^2 (stable up to 0.25)",
                   min=0.0, max=0.25),
}
OUTPUTS = {
    "field": Output("concat", description="the final field, row blocks gathered in order"),
    "total_heat": Output("sum", description="sum of the final field"),
}


def initial(nx: int, ny: int) -> np.ndarray:
    """Zero everywhere but a hot square (1.0) over the middle half of each axis."""
    u = np.zeros((nx, ny))
    u[nx // 4: 3 * nx // 4, ny // 4: 3 * ny // 4] = 1.0
    u[0, :] = u[-1, :] = u[:, 0] = u[:, -1] = 0.0
    return u


def step(u: np.ndarray, alpha: float, first: int, last: int) -> None:
    """Update rows ``first .. last-1`` of ``u`` in place (interior columns only);
    rows ``first-1`` and ``last`` must exist (neighbours or ghost rows)."""
    if last <= first:
        return
    c = u[first:last, 1:-1]
    lap = (u[first - 1:last - 1, 1:-1] + u[first + 1:last + 1, 1:-1]
           + u[first:last, :-2] + u[first:last, 2:] - 4.0 * c)
    u[first:last, 1:-1] = c + alpha * lap


def run(comm, nx: int, ny: int, steps: int, alpha: float) -> dict:
    lo, hi = block(nx, comm.size, comm.rank)
    u = np.zeros((hi - lo + 2, ny))  # ghost row 0 above, ghost row -1 below
    u[1:-1] = initial(nx, ny)[lo:hi]
    # global rows 0 and nx-1 are the fixed boundary: update only the interior rows we own
    first = 1 + (1 if lo == 0 else 0)
    last = (hi - lo + 1) - (1 if hi == nx else 0)
    for _ in range(steps):
        exchange_halos(comm, u)
        step(u, alpha, first, last)
    mine = np.ascontiguousarray(u[1:-1])
    return {"field": mine, "total_heat": np.float64(mine.sum())}


def reference(ranks: int, nx: int, ny: int, steps: int, alpha: float) -> dict:
    u = initial(nx, ny)
    for _ in range(steps):
        step(u, alpha, 1, nx - 1)
    return {"field": u, "total_heat": np.float64(u.sum())}
