"""k-mer counting over DNA sequences (genetic sequence analysis); counts summed."""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "k-mer counts over generated DNA reads, merged with a sum reduce"
PARAMS = {
    "k": Param(int, 4, "k-mer length", min=1, max=12),
    "sequences": Param(int, 2000, "reads", min=1),
    "length": Param(int, 1000, "bases per read", min=1),
    "seed": Param(int, 7, "reads are generated from this seed", min=0),
}
OUTPUTS = {
    "counts": Output("sum", description="count of each k-mer, index = base-4 code (ACGT)"),
    "total": Output("sum"),
}


def reads(sequences: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, (sequences, length), dtype=np.uint8)


def count(batch: np.ndarray, k: int) -> np.ndarray:
    counts = np.zeros(4 ** k, dtype=np.int64)
    if batch.shape[1] < k or not len(batch):
        return counts
    codes = np.zeros((batch.shape[0], batch.shape[1] - k + 1), dtype=np.int64)
    for i in range(k):
        codes = codes * 4 + batch[:, i:batch.shape[1] - k + 1 + i]
    return counts + np.bincount(codes.ravel(), minlength=4 ** k)


def run(comm, k: int, sequences: int, length: int, seed: int) -> dict:
    mine = reads(sequences, length, seed)[comm.rank::comm.size]
    counts = count(mine, k)
    return {"counts": counts, "total": np.int64(counts.sum())}


def reference(ranks: int, k: int, sequences: int, length: int, seed: int) -> dict:
    counts = count(reads(sequences, length, seed), k)
    return {"counts": counts, "total": np.int64(counts.sum())}
