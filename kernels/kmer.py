"""k-mer counting over DNA reads (genetic sequence analysis).

``sequences`` reads of ``length`` bases are generated from the seed in fixed
batches of ``BATCH`` reads, batch ``i`` from ``default_rng([seed, i])``, so any
rank can generate exactly the reads it owns and the data set does not depend on
the rank count. Reads are split over the ranks in blocks; each rank counts the
k-mers of its reads into a dense array of ``4**k`` counts (index = the k-mer as a
base-4 number, A=0 C=1 G=2 T=3) and the arrays are summed (``sum`` reduce).
Counts are integers, so the result equals the serial reference exactly.
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "k-mer counts of generated DNA reads, merged with a sum reduce"
PARAMS = {
    "k": Param(int, 4, "k-mer length (4**k counters)", min=1, max=12),
    "sequences": Param(int, 2000, "reads", min=1),
    "length": Param(int, 1000, "bases per read", min=1),
    "seed": Param(int, 7, "reads are generated from this seed", min=0),
}
OUTPUTS = {
    "counts": Output("sum", description="occurrences of each k-mer, index = base-4 code",
                     units="1"),
    "total": Output("sum", description="k-mers counted: sequences * (length - k + 1)"),
}
BASES = "ACGT"
BATCH = 256  # reads generated from one stream


def reads(lo: int, hi: int, length: int, seed: int) -> np.ndarray:
    """Reads ``lo .. hi-1`` as codes 0..3 (uint8), shape (hi - lo, length)."""
    out = np.empty((max(hi - lo, 0), length), dtype=np.uint8)
    if hi <= lo:
        return out
    for b in range(lo // BATCH, (hi + BATCH - 1) // BATCH):
        start = b * BATCH
        batch = np.random.default_rng([seed, b]).integers(0, 4, (BATCH, length),
                                                          dtype=np.uint8)
        a, z = max(lo, start), min(hi, start + BATCH)
        out[a - lo:z - lo] = batch[a - start:z - start]
    return out


def decode(code: int, k: int) -> str:
    """The k-mer string of a count index (``decode(6, 2) == "CG"``)."""
    return "".join(BASES[(code >> 2 * (k - 1 - i)) & 3] for i in range(k))


def count(batch: np.ndarray, k: int) -> np.ndarray:
    """Counts (int64, length ``4**k``) of the k-mers of every read in ``batch``."""
    n, length = batch.shape
    if n == 0 or length < k:
        return np.zeros(4 ** k, dtype=np.int64)
    width = length - k + 1
    codes = np.zeros((n, width), dtype=np.int64)
    for i in range(k):  # rolling base-4 code of the window starting at each position
        codes <<= 2
        codes |= batch[:, i:i + width]
    return np.bincount(codes.ravel(), minlength=4 ** k).astype(np.int64)


def count_range(lo: int, hi: int, k: int, length: int, seed: int) -> np.ndarray:
    counts = np.zeros(4 ** k, dtype=np.int64)
    step = max(1, (1 << 22) // max(length, 1))  # bound the memory of the code array
    for a in range(lo, hi, step):
        counts += count(reads(a, min(hi, a + step), length, seed), k)
    return counts


def run(comm, k: int, sequences: int, length: int, seed: int) -> dict:
    lo, hi = block(sequences, comm.size, comm.rank)
    counts = count_range(lo, hi, k, length, seed)
    return {"counts": counts, "total": np.int64(counts.sum())}


def reference(ranks: int, k: int, sequences: int, length: int, seed: int) -> dict:
    counts = count(reads(0, sequences, length, seed), k)
    return {"counts": counts, "total": np.int64(counts.sum())}
