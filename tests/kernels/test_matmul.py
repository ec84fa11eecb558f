"""matmul: row blocks scattered, B broadcast, C gathered; against A @ B to rtol 1e-10."""

from __future__ import annotations

import numpy as np
import pytest

from hpcbatch.kernels import matmul


@pytest.mark.parametrize("ranks,n", [(1, 67), (2, 67), (4, 67), (4, 3)])
def test_matmul_under_mpiexec_matches_the_serial_product(harness, ranks, n):
    # 67 rows: uneven blocks; n=3 on 4 ranks: the last rank owns no rows at all
    p = {"n": n, "seed": 3}
    res, ref = harness("matmul", ranks, **p), matmul.reference(ranks, **p)
    c = res.reduced["C"]
    assert c.shape == (n, n) and c.dtype == np.float64
    np.testing.assert_allclose(c, ref["C"], rtol=matmul.RTOL, atol=1e-12 * n)
    checksum = np.asarray(res.reduced["checksum"]).item()
    assert checksum == pytest.approx(ref["checksum"], rel=1e-9, abs=1e-9)
    assert checksum == pytest.approx(c.sum(), rel=1e-9, abs=1e-9)
    assert res.attrs["ranks"] == ranks and res.attrs["params"] == p


def test_reference_is_the_product_of_the_seeded_matrices():
    n = 23
    ref = matmul.reference(1, n=n, seed=5)
    a, b = matmul.matrices(n, 5)
    naive = (a[:, :, None] * b[None, :, :]).sum(axis=1)  # no BLAS
    np.testing.assert_allclose(ref["C"], naive, rtol=1e-10, atol=1e-12)
    assert ref["checksum"] == pytest.approx(naive.sum(), rel=1e-12)
    # rows of a row block of A times B are the same rows of C
    np.testing.assert_allclose(a[7:15] @ b, ref["C"][7:15], rtol=1e-12, atol=1e-13)


def test_matrices_are_deterministic_in_the_seed():
    a1, b1 = matmul.matrices(8, 1)
    a2, b2 = matmul.matrices(8, 1)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert not np.array_equal(a1, b1)
    assert not np.array_equal(a1, matmul.matrices(8, 2)[0])
    # the reference does not depend on the rank count
    assert np.array_equal(matmul.reference(1, n=8, seed=1)["C"],
                          matmul.reference(4, n=8, seed=1)["C"])
