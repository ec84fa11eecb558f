"""kmer: dense 4**k counters summed over ranks; exact against a serial count."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hpcbatch.kernels import kmer


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_kmer_under_mpiexec_counts_exactly_the_serial_counts(harness, ranks):
    # 301 reads: uneven blocks that cut through the 256-read generation batches
    p = {"k": 3, "sequences": 301, "length": 120, "seed": 5}
    res, ref = harness("kmer", ranks, **p), kmer.reference(ranks, **p)
    counts = res.reduced["counts"]
    assert counts.shape == (4 ** 3,) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, ref["counts"])
    assert np.asarray(res.reduced["total"]).item() == ref["total"] == 301 * (120 - 3 + 1)


def strings(sequences: int, length: int, seed: int) -> list[str]:
    codes = kmer.reads(0, sequences, length, seed)
    return ["".join(kmer.BASES[c] for c in row) for row in codes]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_reference_matches_a_string_counter(k):
    seqs = strings(40, 37, 9)
    expect = Counter(s[i:i + k] for s in seqs for i in range(len(s) - k + 1))
    ref = kmer.reference(1, k=k, sequences=40, length=37, seed=9)
    got = {kmer.decode(code, k): int(n) for code, n in enumerate(ref["counts"]) if n}
    assert got == dict(expect)
    assert ref["total"] == 40 * (37 - k + 1)


def test_reads_do_not_depend_on_how_they_are_split():
    whole = kmer.reads(0, 700, 30, 4)
    assert whole.shape == (700, 30) and whole.max() <= 3
    for lo, hi in [(0, 1), (255, 257), (100, 613), (699, 700), (512, 700), (3, 3)]:
        assert np.array_equal(kmer.reads(lo, hi, 30, 4), whole[lo:hi])
    assert np.array_equal(kmer.count_range(0, 700, 4, 30, 4), kmer.count(whole, 4))
    assert not np.array_equal(whole, kmer.reads(0, 700, 30, 5))
    # bases are close to uniform
    assert np.bincount(whole.ravel(), minlength=4) / whole.size == pytest.approx(
        [0.25] * 4, abs=0.01)


def test_counts_of_k_marginalise_to_counts_of_k_minus_1():
    # every k-mer starts with a (k-1)-mer; the only (k-1)-mers that start no k-mer are
    # the last one of each read
    k, n, length, seed = 4, 50, 64, 2
    big = kmer.reference(1, k=k, sequences=n, length=length, seed=seed)["counts"]
    small = kmer.reference(1, k=k - 1, sequences=n, length=length, seed=seed)["counts"]
    last = kmer.count(kmer.reads(0, n, length, seed)[:, -(k - 1):], k - 1)
    assert np.array_equal(big.reshape(-1, 4).sum(axis=1), small - last)


def test_reads_shorter_than_k_count_nothing():
    ref = kmer.reference(1, k=6, sequences=3, length=5, seed=1)
    assert ref["total"] == 0 and not ref["counts"].any() and ref["counts"].shape == (4 ** 6,)
