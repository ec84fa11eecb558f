"""var: Monte Carlo VaR; the same (ranks, seed) must give exactly the same numbers."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from hpcbatch.kernels import var

STATS = ("var", "expected_shortfall", "mean_loss")


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_var_under_mpiexec_reproduces_the_reference_exactly(harness, ranks):
    p = {"assets": 5, "scenarios": 20_001, "confidence": 0.99, "value": 1e6, "seed": 11}
    res, ref = harness("var", ranks, **p), var.reference(ranks, **p)
    losses = res.reduced["losses"]
    assert losses.shape == (20_001,)
    np.testing.assert_array_equal(losses, ref["losses"])
    got = {key: np.asarray(res.reduced[key]).item() for key in STATS}
    for key in STATS:
        assert got[key] == ref[key], key
    assert got["expected_shortfall"] >= got["var"] > got["mean_loss"]


def portfolio(assets: int, value: float) -> tuple[float, float]:
    """(mean, standard deviation) of the loss, from the model's definition."""
    w, mu, cov = var.market(assets)
    return -value * float(w @ mu), value * float(np.sqrt(w @ cov @ w))


def test_losses_are_minus_value_times_the_weighted_correlated_returns():
    assets, m, value, seed = 6, 1000, 2.5e5, 3
    ref = var.reference(1, assets=assets, scenarios=m, confidence=0.95, value=value, seed=seed)
    w, mu, cov = var.market(assets)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    returns = mu + rng.standard_normal((m, assets)) @ np.linalg.cholesky(cov).T
    np.testing.assert_allclose(ref["losses"], -value * (returns @ w), rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(np.corrcoef(returns.T)[np.triu_indices(assets, 1)],
                               var.CORRELATION, atol=0.1)


def test_statistics_agree_with_the_normal_model():
    # the portfolio loss is normal: VaR = m + s z_q, ES = m + s phi(z_q) / (1 - q)
    p = {"assets": 8, "scenarios": 200_000, "confidence": 0.99, "value": 1e6, "seed": 5}
    ref = var.reference(3, **p)
    mean, sd = portfolio(p["assets"], p["value"])
    zq = NormalDist().inv_cdf(p["confidence"])
    assert ref["mean_loss"] == pytest.approx(mean, abs=5 * sd / np.sqrt(p["scenarios"]))
    assert ref["losses"].std() == pytest.approx(sd, rel=0.01)
    assert ref["var"] == pytest.approx(mean + sd * zq, rel=0.02)
    es = mean + sd * NormalDist().pdf(zq) / (1 - p["confidence"])
    assert ref["expected_shortfall"] == pytest.approx(es, rel=0.03)
    tail = ref["losses"][ref["losses"] >= ref["var"]]
    assert len(tail) == pytest.approx(0.01 * p["scenarios"], abs=2)


def test_reference_is_reproducible_and_depends_on_ranks_and_seed():
    p = {"assets": 4, "scenarios": 5_001, "confidence": 0.99, "value": 1e6}
    a = var.reference(2, seed=1, **p)
    b = var.reference(2, seed=1, **p)
    assert np.array_equal(a["losses"], b["losses"]) and all(a[k] == b[k] for k in STATS)
    assert not np.array_equal(a["losses"], var.reference(3, seed=1, **p)["losses"])
    assert not np.array_equal(a["losses"], var.reference(2, seed=2, **p)["losses"])
    # rank 0's block of 2 ranks is the first half of its own stream
    one = var.losses(np.random.default_rng(np.random.SeedSequence(1).spawn(2)[0]), 2_501,
                     p["assets"], p["value"])
    assert np.array_equal(a["losses"][:2_501], one)


def test_finalize_on_a_known_distribution():
    out = var.finalize({"losses": np.arange(1.0, 101.0)}, {"confidence": 0.9})
    assert out["var"] == pytest.approx(90.1)
    assert out["expected_shortfall"] == pytest.approx(np.mean(np.arange(91.0, 101.0)))
    assert out["mean_loss"] == pytest.approx(50.5)
