"""cg: distributed conjugate gradient on the 2-D Poisson system."""

from __future__ import annotations

import numpy as np
import pytest

from hpcbatch.kernels import cg


def item(value):
    """A scalar output as a Python number (whether it reads back 0-d or as shape (1,))."""
    return np.asarray(value).item()


@pytest.mark.parametrize("ranks,n", [(1, 24), (2, 24), (4, 24), (4, 3)])
def test_cg_under_mpiexec_matches_the_serial_cg(harness, ranks, n):
    # 24 rows on 4 ranks: even; n=3 on 4 ranks: the last rank owns no rows
    p = {"n": n, "tol": 1e-10, "max_iter": 500}
    res, ref = harness("cg", ranks, **p), cg.reference(ranks, **p)
    x = res.reduced["x"]
    assert x.shape == (n, n)
    np.testing.assert_allclose(x, ref["x"], rtol=1e-8, atol=1e-12)
    assert item(res.reduced["iterations"]) == ref["iterations"]
    assert item(res.reduced["residual"]) <= 1e-10
    # the gathered solution really solves the system
    b = cg.load(0, n, n).ravel()
    true_res = np.linalg.norm(b - cg.poisson_matrix(n) @ x.ravel()) / np.linalg.norm(b)
    assert true_res <= 1e-9


def test_cg_with_uneven_blocks_under_mpiexec(harness):
    p = {"n": 19, "tol": 1e-9, "max_iter": 500}  # 19 rows on 4 ranks: 5, 5, 5, 4
    res, ref = harness("cg", 4, **p), cg.reference(4, **p)
    np.testing.assert_allclose(res.reduced["x"], ref["x"], rtol=1e-8, atol=1e-12)
    assert item(res.reduced["iterations"]) == ref["iterations"]


@pytest.mark.parametrize("n", [2, 5, 10])
def test_reference_agrees_with_a_dense_solve(n):
    ref = cg.reference(1, n=n, tol=1e-12, max_iter=1000)
    a, b = cg.poisson_matrix(n), cg.load(0, n, n).ravel()
    exact = np.linalg.solve(a, b)
    np.testing.assert_allclose(ref["x"].ravel(), exact, rtol=1e-8)
    assert np.linalg.norm(b - a @ ref["x"].ravel()) / np.linalg.norm(b) <= 1e-10
    assert ref["residual"] <= 1e-12
    assert 1 <= ref["iterations"] <= n * n  # CG terminates in at most n*n steps


def test_the_stencil_is_the_dense_matrix():
    n = 6
    v = np.random.default_rng(0).standard_normal((n, n))
    p = np.zeros((n + 2, n))
    p[1:-1] = v
    np.testing.assert_allclose(cg.apply(None, p).ravel(), cg.poisson_matrix(n) @ v.ravel(),
                               rtol=1e-14, atol=1e-14)
    a = cg.poisson_matrix(n)
    assert np.array_equal(a, a.T) and np.linalg.eigvalsh(a).min() > 0


def test_max_iter_caps_the_iterations():
    ref = cg.reference(1, n=16, tol=1e-12, max_iter=3)
    assert ref["iterations"] == 3 and ref["residual"] > 1e-3
    assert cg.reference(1, n=16, tol=1.0, max_iter=50)["iterations"] == 0
