"""Catalogue kernels without a test module of their own (mandelbrot, stream, allreduce)
under real mpiexec at 1, 2 and 4 ranks, against their serial references.

pi, matmul, heat, var, kmer and cg are tested in test_<kernel>.py."""

from __future__ import annotations

import numpy as np
import pytest

from hpcbatch.kernels import allreduce, mandelbrot, stream

RANKS = [1, 2, 4]


@pytest.mark.parametrize("ranks", RANKS)
def test_mandelbrot(harness, ranks):
    p = {"width": 64, "height": 47, "max_iter": 50}
    res, ref = harness("mandelbrot", ranks, **p), mandelbrot.reference(ranks, **p)
    np.testing.assert_array_equal(res.reduced["image"], ref["image"])
    assert res.reduced["image"].max() == 50 and res.reduced["image"].min() >= 1


@pytest.mark.parametrize("ranks", RANKS)
def test_stream(harness, ranks):
    p = {"n": 200_000, "repeats": 2, "scalar": 3.0}
    res = harness("stream", ranks, **p)
    assert res.reduced["checksum"] == stream.reference(ranks, **p)["checksum"]
    per_rank = res.reduced["gbps"]
    assert per_rank.shape == (ranks,) and (per_rank > 0).all()
    assert res.reduced["total_gbps"] == pytest.approx(per_rank.sum())


@pytest.mark.parametrize("ranks", RANKS)
def test_allreduce(harness, ranks):
    p = {"min_bytes": 8, "max_bytes": 1 << 16, "iterations": 3}
    res, ref = harness("allreduce", ranks, **p), allreduce.reference(ranks, **p)
    np.testing.assert_array_equal(res.reduced["sizes_bytes"], ref["sizes_bytes"])
    assert res.reduced["correct"] == 1
    assert (res.reduced["latency_us"] > 0).all() and (res.reduced["bandwidth_GBps"] > 0).all()
