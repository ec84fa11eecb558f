"""Conjugate gradient on the 2-D Poisson system (engineering stress / FEA pattern).

Solves ``A x = b`` for the 5-point Laplacian on an ``n`` x ``n`` grid (zero
Dirichlet boundary), ``n*n`` unknowns; the load ``b`` (see :func:`load`) has no
symmetry, so CG needs its generic O(n) iterations. Grid rows are split
into blocks over the ranks (uneven allowed; ranks beyond ``n`` own nothing).
Every iteration does one matrix-vector product, which swaps one halo row with
each neighbour (``Sendrecv``), and two dot products, each an ``Allreduce`` of
the ranks' partial sums. The iteration stops when ``||r|| <= tol * ||b||`` or at
``max_iter``. Outputs: the solution (row blocks gathered in order), the
iteration count and the final relative residual of the CG recurrence.

Dot products sum in another order than the serial reference, so ``x`` matches
it to rounding (1e-8 relative is a safe bound), not bit for bit.
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block, exchange_halos
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "Conjugate gradient, 5-point Poisson, halo exchange + Allreduce per iteration"
PARAMS = {
    "n": Param(int, 64, "grid side (n*n unknowns)", min=2),
    "tol": Param(float, 1e-10, "stop when ||r|| <= tol * ||b||", min=0.0),
    "max_iter": Param(int, 2000, "iteration cap", min=1),
}
OUTPUTS = {
    "x": Output("concat", description="the solution, grid rows in order"),
    "iterations": Output("max", description="CG iterations done", units="1"),
    "residual": Output("max", description="final ||r|| / ||b|| of the recurrence",
                       units="1"),
}


def apply(comm, p: np.ndarray) -> np.ndarray:
    """``A p`` for the owned rows of ``p``; ``p`` has ghost rows 0 and -1, which hold
    the neighbours' rows after the halo exchange (zero beyond the grid)."""
    if comm is not None:
        exchange_halos(comm, p)
    q = 4.0 * p[1:-1]
    q -= p[:-2]
    q -= p[2:]
    q[:, 1:] -= p[1:-1, :-1]
    q[:, :-1] -= p[1:-1, 1:]
    return q


def load(lo: int, hi: int, n: int) -> np.ndarray:
    """Rows ``lo .. hi-1`` of the right-hand side: 1 + ((7 i + 3 j) mod 5) / 5."""
    i = np.arange(lo, hi)[:, None]
    j = np.arange(n)[None, :]
    return 1.0 + ((7 * i + 3 * j) % 5) / 5.0


def solve(comm, n: int, tol: float, max_iter: int, lo: int, hi: int
          ) -> tuple[np.ndarray, int, float]:
    """CG for grid rows ``lo .. hi-1`` (of ``n`` columns): the whole grid when
    ``comm`` is None (serial), else this rank's block. Returns (x, iterations,
    residual)."""
    if comm is not None:
        from mpi4py import MPI
        buf = np.zeros(1)

        def dot(a: np.ndarray, b: np.ndarray) -> float:
            buf[0] = np.vdot(a, b)
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return float(buf[0])
    else:
        def dot(a: np.ndarray, b: np.ndarray) -> float:
            return float(np.vdot(a, b))

    b = load(lo, hi, n)
    x = np.zeros_like(b)
    r = b.copy()
    p = np.zeros((hi - lo + 2, n))  # search direction with ghost rows
    p[1:-1] = r
    rr = dot(r, r)
    bnorm = np.sqrt(dot(b, b))
    it = 0
    while it < max_iter and np.sqrt(rr) > tol * bnorm:
        q = apply(comm, p)
        alpha = rr / dot(p[1:-1], q)
        x += alpha * p[1:-1]
        r -= alpha * q
        rr_new = dot(r, r)
        p[1:-1] = r + (rr_new / rr) * p[1:-1]
        rr = rr_new
        it += 1
    return x, it, float(np.sqrt(rr) / bnorm)


def run(comm, n: int, tol: float, max_iter: int) -> dict:
    lo, hi = block(n, comm.size, comm.rank)
    x, it, res = solve(comm, n, tol, max_iter, lo, hi)
    return {"x": x, "iterations": np.int64(it), "residual": np.float64(res)}


def reference(ranks: int, n: int, tol: float, max_iter: int) -> dict:
    x, it, res = solve(None, n, tol, max_iter, 0, n)
    return {"x": x, "iterations": np.int64(it), "residual": np.float64(res)}


def poisson_matrix(n: int) -> np.ndarray:
    """The dense ``n*n`` x ``n*n`` matrix (row-major grid order), for small checks."""
    t = 4 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    return np.kron(np.eye(n), t) - np.kron(np.eye(n, k=1) + np.eye(n, k=-1), np.eye(n))
