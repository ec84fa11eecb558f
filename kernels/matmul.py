"""Distributed dense matrix product C = A B, row blocks of A and C per rank."""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "Dense C = A*B, row-block decomposition, B broadcast from rank 0"
PARAMS = {
    "n": Param(int, 512, "matrix side", min=1),
    "seed": Param(int, 42, "random matrices from this seed", min=0),
}
OUTPUTS = {
    "C": Output("concat", description="the product, gathered in row order"),
    "checksum": Output("sum", description="sum of all entries of C"),
}


def matrices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


def run(comm, n: int, seed: int) -> dict:
    lo, hi = block(n, comm.size, comm.rank)
    if comm.rank == 0:
        a, b = matrices(n, seed)
        counts = [(block(n, comm.size, r)[1] - block(n, comm.size, r)[0]) * n
                  for r in range(comm.size)]
    else:
        a, b, counts = None, np.empty((n, n)), None
    mine = np.empty((hi - lo, n))
    comm.Scatterv([a, counts] if comm.rank == 0 else None, mine, root=0)
    comm.Bcast(b, root=0)
    c = mine @ b
    return {"C": c, "checksum": float(c.sum())}


def reference(ranks: int, n: int, seed: int) -> dict:
    a, b = matrices(n, seed)
    c = a @ b
    return {"C": c, "checksum": float(c.sum())}
