"""Conjugate gradient on the 2-D Poisson system (engineering stress analysis pattern).

The n x n grid's rows are split into blocks; each matrix-vector product exchanges
one halo row with each neighbour, and every dot product is an Allreduce.
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block, exchange_halos
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "Conjugate gradient, 5-point Poisson, halo exchange + Allreduce per iteration"
PARAMS = {
    "n": Param(int, 64, "grid side (n*n unknowns)", min=2),
    "tol": Param(float, 1e-10, "relative residual target", min=0.0),
    "max_iter": Param(int, 2000, "iteration cap", min=1),
}
OUTPUTS = {
    "x": Output("concat", description="the solution, grid rows in order"),
    "iterations": Output("max"),
    "residual": Output("max", description="final ||b - Ax|| / ||b||"),
}


def apply(comm, p: np.ndarray) -> np.ndarray:
    """A p for the owned rows of p (p has ghost rows 0 and -1, zero beyond the grid)."""
    if comm is not None:
        exchange_halos(comm, p)
    q = 4.0 * p[1:-1].copy()
    q -= p[:-2] + p[2:]
    q[:, 1:] -= p[1:-1, :-1]
    q[:, :-1] -= p[1:-1, 1:]
    return q


def solve(comm, n: int, tol: float, max_iter: int, rows: int):
    from mpi4py import MPI

    def dot(a, b):
        local = float(np.vdot(a, b))
        return comm.allreduce(local, op=MPI.SUM) if comm is not None else local

    b = np.ones((rows, n))
    x = np.zeros((rows, n))
    r = b.copy()
    p = np.zeros((rows + 2, n))
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
    return x, it, np.sqrt(rr) / bnorm


def run(comm, n: int, tol: float, max_iter: int) -> dict:
    lo, hi = block(n, comm.size, comm.rank)
    x, it, res = solve(comm, n, tol, max_iter, hi - lo)
    return {"x": x, "iterations": np.int64(it), "residual": float(res)}


def reference(ranks: int, n: int, tol: float, max_iter: int) -> dict:
    x, it, res = solve(None, n, tol, max_iter, n)
    return {"x": x, "iterations": np.int64(it), "residual": float(res)}


def poisson_matrix(n: int) -> np.ndarray:
    """The dense matrix, for checking small cases."""
    t = 4 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    return np.kron(np.eye(n), t) - np.kron(np.eye(n, k=1) + np.eye(n, k=-1), np.eye(n))
