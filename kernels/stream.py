"""STREAM triad (a = b + s*c) on every rank: the node's memory bandwidth."""

from __future__ import annotations

import time

import numpy as np

from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "STREAM triad per rank: GB/s per rank (concat) and total (sum)"
PARAMS = {
    "n": Param(int, 5_000_000, "elements per array per rank", min=1),
    "repeats": Param(int, 5, "timed repeats; the best is reported", min=1),
    "scalar": Param(float, 3.0, "s in a = b + s*c"),
}
OUTPUTS = {
    "gbps": Output("concat", description="best triad bandwidth of each rank, in rank order",
                   units="GB/s"),
    "total_gbps": Output("sum", description="triad bandwidth summed over ranks",
                         units="GB/s"),
    "checksum": Output("sum", description="sum of a over all ranks"),
}
B, C = 1.0, 2.0


def triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float, repeats: int) -> float:
    """Best GB/s of ``a = b + s*c`` (24 bytes moved per element, as STREAM counts)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.multiply(c, s, out=a)
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t0)
    return 3 * a.itemsize * a.size / best / 1e9


def run(comm, n: int, repeats: int, scalar: float) -> dict:
    a = np.empty(n)
    b = np.full(n, B)
    c = np.full(n, C)
    comm.Barrier()
    gbps = triad(a, b, c, scalar, repeats)
    return {"gbps": np.array([gbps]), "total_gbps": gbps, "checksum": float(a.sum())}


def reference(ranks: int, n: int, repeats: int, scalar: float) -> dict:
    return {"checksum": float(ranks * n * (B + scalar * C))}
