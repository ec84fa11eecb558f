"""Distributed dense matrix product C = A B (engineering / rendering linear algebra).

Rank 0 generates A and B from the seed, scatters row blocks of A (``Scatterv``,
uneven blocks allowed) and broadcasts B (``Bcast``); each rank multiplies its
block, and the row blocks of C are gathered in order by the ``concat`` reduce.
Compare with the serial ``A @ B`` to rtol 1e-10 (BLAS may sum in another order
for a block of rows than for the whole matrix, so not bit for bit).
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "Dense C = A*B, row blocks of A scattered, B broadcast from rank 0"
PARAMS = {
    "n": Param(int, 512, "matrix side", min=1),
    "seed": Param(int, 42, "A and B are generated from this seed", min=0),
}
OUTPUTS = {
    "C": Output("concat", description="the product, row blocks gathered in order"),
    "checksum": Output("sum", description="sum of all entries of C"),
}
RTOL = 1e-10  # the stated tolerance against the serial reference


def matrices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A and B, standard normal entries, from one stream of ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


def run(comm, n: int, seed: int) -> dict:
    size, rank = comm.size, comm.rank
    lo, hi = block(n, size, rank)
    if rank == 0:
        a, b = matrices(n, seed)
        counts = [(h - lo_) * n for lo_, h in (block(n, size, r) for r in range(size))]
        send = [a, counts]
    else:
        b, send = np.empty((n, n)), None
    mine = np.empty((hi - lo, n))
    comm.Scatterv(send, mine, root=0)
    comm.Bcast(b, root=0)
    c = mine @ b
    return {"C": c, "checksum": np.float64(c.sum())}


def reference(ranks: int, n: int, seed: int) -> dict:
    a, b = matrices(n, seed)
    c = a @ b
    return {"C": c, "checksum": np.float64(c.sum())}
