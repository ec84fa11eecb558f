"""Every catalogue kernel under real mpiexec at 1, 2 and 4 ranks, against its serial reference."""

from __future__ import annotations

import numpy as np
import pytest

from hpcbatch.kernels import allreduce, cg, heat, kmer, mandelbrot, matmul, stream, var

RANKS = [1, 2, 4]


@pytest.mark.parametrize("ranks", RANKS)
def test_matmul(harness, ranks):
    p = {"n": 67, "seed": 3}  # 67 rows: uneven blocks
    res, ref = harness("matmul", ranks, **p), matmul.reference(ranks, **p)
    np.testing.assert_allclose(res.reduced["C"], ref["C"], rtol=1e-10, atol=1e-10)
    assert res.reduced["checksum"] == pytest.approx(ref["checksum"], rel=1e-9)


@pytest.mark.parametrize("ranks", RANKS)
def test_heat(harness, ranks):
    p = {"nx": 37, "ny": 29, "steps": 60, "alpha": 0.2}
    res, ref = harness("heat", ranks, **p), heat.reference(ranks, **p)
    # the halo exchange is right only if the field is identical whatever the rank count
    np.testing.assert_array_equal(res.reduced["field"], ref["field"])
    assert res.reduced["total_heat"] == pytest.approx(ref["total_heat"], rel=1e-12)


@pytest.mark.parametrize("ranks", RANKS)
def test_var(harness, ranks):
    p = {"assets": 5, "scenarios": 20_001, "confidence": 0.99, "value": 1e6, "seed": 11}
    res, ref = harness("var", ranks, **p), var.reference(ranks, **p)
    np.testing.assert_array_equal(res.reduced["losses"], ref["losses"])
    for key in ("var", "expected_shortfall", "mean_loss"):
        assert res.reduced[key] == ref[key]
    assert res.reduced["expected_shortfall"] >= res.reduced["var"] > res.reduced["mean_loss"]


@pytest.mark.parametrize("ranks", RANKS)
def test_mandelbrot(harness, ranks):
    p = {"width": 64, "height": 47, "max_iter": 50}
    res, ref = harness("mandelbrot", ranks, **p), mandelbrot.reference(ranks, **p)
    np.testing.assert_array_equal(res.reduced["image"], ref["image"])
    assert res.reduced["image"].max() == 50 and res.reduced["image"].min() >= 1


@pytest.mark.parametrize("ranks", RANKS)
def test_kmer(harness, ranks):
    p = {"k": 3, "sequences": 101, "length": 200, "seed": 5}
    res, ref = harness("kmer", ranks, **p), kmer.reference(ranks, **p)
    np.testing.assert_array_equal(res.reduced["counts"], ref["counts"])
    assert res.reduced["total"] == 101 * (200 - 3 + 1)


@pytest.mark.parametrize("ranks", RANKS)
def test_cg(harness, ranks):
    p = {"n": 24, "tol": 1e-10, "max_iter": 500}
    res, ref = harness("cg", ranks, **p), cg.reference(ranks, **p)
    np.testing.assert_allclose(res.reduced["x"], ref["x"], rtol=1e-8, atol=1e-10)
    assert abs(int(res.reduced["iterations"]) - int(ref["iterations"])) <= 1
    assert res.reduced["residual"] <= 1e-10


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


def test_references_agree_with_independent_checks():
    c = cg.reference(1, n=6, tol=1e-12, max_iter=500)
    a = cg.poisson_matrix(6)
    np.testing.assert_allclose(a @ c["x"].ravel(), np.ones(36), atol=1e-9)
    m = matmul.reference(1, n=8, seed=1)
    a, b = matmul.matrices(8, 1)
    np.testing.assert_allclose(m["C"], a @ b)
    h = heat.reference(1, nx=20, ny=20, steps=0, alpha=0.2)
    assert h["total_heat"] == 100.0  # the hot 10x10 square
    k = kmer.count(np.array([[0, 1, 2, 3]], dtype=np.uint8), 2)
    assert k.sum() == 3 and k[0 * 4 + 1] == 1 and k[1 * 4 + 2] == 1 and k[2 * 4 + 3] == 1
    v = var.reference(1, assets=3, scenarios=1000, confidence=0.95, value=1.0, seed=1)
    assert np.mean(v["losses"] >= v["var"]) == pytest.approx(0.05, abs=0.002)
