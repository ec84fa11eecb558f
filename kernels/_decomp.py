"""Helpers shared by kernels: block decomposition and halo exchange."""

from __future__ import annotations

import numpy as np


def block(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` owned by ``rank`` in a block decomposition (uneven ok)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def exchange_halos(comm, u: np.ndarray) -> None:
    """``u`` has one ghost row above and below its owned rows; fill them from the
    neighbours (rows of ranks with nothing to send are left as they are)."""
    from mpi4py import MPI
    up = comm.rank - 1 if comm.rank > 0 else MPI.PROC_NULL
    down = comm.rank + 1 if comm.rank < comm.size - 1 else MPI.PROC_NULL
    comm.Sendrecv(u[1], dest=up, recvbuf=u[-1], source=down)
    comm.Sendrecv(u[-2], dest=down, recvbuf=u[0], source=up)
