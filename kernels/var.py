"""Monte Carlo value-at-risk of a portfolio (financial risk modelling).

Daily asset returns are multivariate normal with a fixed drift and covariance
(volatilities 1.0 %, 1.2 %, ... and pairwise correlation 0.3), correlated as
``mu + L z`` with ``L`` the Cholesky factor and ``z`` independent normals. The
portfolio's loss on a scenario is ``-value * w . returns`` (weights ``w``
proportional to 1, 2, ..., assets).

The ``scenarios`` are split over the ranks in blocks; rank ``r`` draws its block
from stream ``SeedSequence(seed).spawn(ranks)[r]``. Losses are gathered in rank
order (``concat``) and ``finalize`` computes, on rank 0, the VaR (the
``confidence`` quantile of the loss), the expected shortfall (mean loss at or
beyond the VaR) and the mean loss. The per-scenario arithmetic avoids BLAS (a
fixed-order sum over assets) so :func:`reference` reproduces every loss, and so
every statistic, bit for bit for the same (ranks, seed).
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block
from hpcbatch.kernels.api import Derived, Output, Param

DESCRIPTION = "Monte Carlo portfolio value-at-risk and expected shortfall (losses gathered)"
PARAMS = {
    "assets": Param(int, 16, "assets in the portfolio", min=1, max=2000),
    "scenarios": Param(int, 200_000, "simulated days over all ranks", min=1),
    "confidence": Param(float, 0.99, "VaR confidence level", min=0.5, max=0.9999),
    "value": Param(float, 1e6, "portfolio value", min=0.0),
    "seed": Param(int, 2024, "root seed of the per-rank streams", min=0),
}
OUTPUTS = {"losses": Output("concat", description="simulated one-day portfolio losses "
                            "(in the currency of value), rank blocks in order")}
DERIVED = {
    "var": Derived("value-at-risk: the confidence quantile of the losses"),
    "expected_shortfall": Derived("mean loss at or beyond the value-at-risk"),
    "mean_loss": Derived("mean of the simulated losses"),
}
DRIFT = 2e-4  # daily expected return of every asset
CORRELATION = 0.3
CHUNK = 1 << 20  # normals drawn at a time


def market(assets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, drift, covariance) of the portfolio's assets."""
    weights = np.arange(1, assets + 1, dtype=float)
    weights /= weights.sum()
    vol = 0.010 + 0.002 * np.arange(assets)
    corr = np.full((assets, assets), CORRELATION)
    np.fill_diagonal(corr, 1.0)
    return weights, np.full(assets, DRIFT), corr * np.outer(vol, vol)


def losses(rng: np.random.Generator, m: int, assets: int, value: float) -> np.ndarray:
    """Losses of ``m`` scenarios drawn from ``rng``.

    returns = drift + L z, so loss = -value * (w . drift) - sum_j e_j z_j with the
    factor exposures e = value * L^T w; summed over j in a fixed order (no BLAS).
    """
    weights, drift, cov = market(assets)
    exposure = value * (np.linalg.cholesky(cov).T @ weights)
    loss = np.full(m, -value * float(weights @ drift))
    rows = max(1, CHUNK // assets)  # drawing in row chunks consumes the stream in order
    for at in range(0, m, rows):
        z = rng.standard_normal((min(rows, m - at), assets))
        part = loss[at:at + len(z)]
        for j in range(assets):
            part -= exposure[j] * z[:, j]
    return loss


def finalize(reduced: dict, params: dict) -> dict:
    loss = np.asarray(reduced["losses"], dtype=float)
    var = np.float64(np.quantile(loss, params["confidence"]))
    return {"var": var, "expected_shortfall": np.float64(loss[loss >= var].mean()),
            "mean_loss": np.float64(loss.mean())}


def reference(ranks: int, assets: int, scenarios: int, confidence: float, value: float,
              seed: int) -> dict:
    streams = np.random.SeedSequence(seed).spawn(ranks)
    parts = []
    for r in range(ranks):
        lo, hi = block(scenarios, ranks, r)
        parts.append(losses(np.random.default_rng(streams[r]), hi - lo, assets, value))
    reduced = {"losses": np.concatenate(parts)}
    return dict(reduced, **finalize(reduced, {"confidence": confidence}))


def run(comm, assets: int, scenarios: int, confidence: float, value: float, seed: int) -> dict:
    lo, hi = block(scenarios, comm.size, comm.rank)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(comm.size)[comm.rank])
    return {"losses": losses(rng, hi - lo, assets, value)}
