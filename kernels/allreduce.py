"""Allreduce latency and bandwidth over a sweep of message sizes (checked results)."""

from __future__ import annotations

import time

import numpy as np

from hpcbatch.kernels.api import Derived, Output, Param

DESCRIPTION = "Allreduce sweep: latency (max over ranks) and bandwidth per message size"
PARAMS = {
    "min_bytes": Param(int, 8, "smallest message", min=8),
    "max_bytes": Param(int, 1 << 22, "largest message (powers of two in between)", min=8),
    "iterations": Param(int, 20, "timed Allreduce calls per size", min=1),
}
OUTPUTS = {
    "sizes_bytes": Output("max", description="message size of each point of the sweep",
                          units="byte"),
    "latency_us": Output("max", description="mean time per Allreduce, slowest rank",
                         units="us"),
    "correct": Output("min", description="1 when every result was right on every rank",
                      units="1"),
}
DERIVED = {"bandwidth_GBps": Derived("message size / latency at each point of the sweep",
                                     units="GB/s")}


def sizes(min_bytes: int, max_bytes: int) -> np.ndarray:
    out, s = [], max(8, min_bytes)
    while s <= max_bytes:
        out.append(s)
        s *= 2
    return np.array(out, dtype=np.int64)


def sweep(comm, min_bytes: int, max_bytes: int, iterations: int) -> tuple:
    from mpi4py import MPI
    expect = comm.size * (comm.size + 1) / 2
    lat, ok = [], True
    for nbytes in sizes(min_bytes, max_bytes):
        send = np.full(nbytes // 8, comm.rank + 1.0)
        recv = np.empty_like(send)
        comm.Allreduce(send, recv, op=MPI.SUM)  # warm-up
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iterations):
            comm.Allreduce(send, recv, op=MPI.SUM)
        lat.append((time.perf_counter() - t0) / iterations * 1e6)
        ok = ok and bool(np.all(recv == expect))
    return np.array(lat), ok


def run(comm, min_bytes: int, max_bytes: int, iterations: int) -> dict:
    lat, ok = sweep(comm, min_bytes, max_bytes, iterations)
    return {"sizes_bytes": sizes(min_bytes, max_bytes), "latency_us": lat,
            "correct": np.int64(ok)}


def finalize(reduced: dict, params: dict) -> dict:
    return {"bandwidth_GBps": reduced["sizes_bytes"] / (reduced["latency_us"] * 1e-6) / 1e9}


def reference(ranks: int, min_bytes: int, max_bytes: int, iterations: int) -> dict:
    return {"sizes_bytes": sizes(min_bytes, max_bytes), "correct": np.int64(1)}
