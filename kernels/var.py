"""Monte Carlo value-at-risk of a portfolio (financial risk modelling).

Correlated daily returns come from a fixed covariance (Cholesky factor) and
per-rank streams of ``SeedSequence(seed).spawn(ranks)``; losses are gathered in
rank order and VaR / expected shortfall computed on rank 0.
"""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels._decomp import block
from hpcbatch.kernels.api import Output, Param

DESCRIPTION = "Monte Carlo portfolio value-at-risk and expected shortfall"
PARAMS = {
    "assets": Param(int, 16, "assets in the portfolio", min=1),
    "scenarios": Param(int, 200_000, "simulated days over all ranks", min=1),
    "confidence": Param(float, 0.99, "VaR confidence level", min=0.5, max=0.9999),
    "value": Param(float, 1e6, "portfolio value", min=0.0),
    "seed": Param(int, 2024, "root seed of the per-rank streams", min=0),
}
OUTPUTS = {"losses": Output("concat", description="simulated losses, rank order")}


def cholesky(assets: int) -> np.ndarray:
    vol = 0.01 + 0.002 * np.arange(assets)  # daily volatilities
    corr = np.full((assets, assets), 0.3)
    np.fill_diagonal(corr, 1.0)
    return np.linalg.cholesky(corr * np.outer(vol, vol))


def losses(rng: np.random.Generator, m: int, assets: int, value: float) -> np.ndarray:
    z = rng.standard_normal((m, assets))
    returns = z @ cholesky(assets).T
    return -value * returns.mean(axis=1)  # equal weights


def run(comm, assets: int, scenarios: int, confidence: float, value: float, seed: int) -> dict:
    lo, hi = block(scenarios, comm.size, comm.rank)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(comm.size)[comm.rank])
    return {"losses": losses(rng, hi - lo, assets, value)}


def finalize(reduced: dict, params: dict) -> dict:
    loss = reduced["losses"]
    var = float(np.quantile(loss, params["confidence"]))
    return {"var": var, "expected_shortfall": float(loss[loss >= var].mean()),
            "mean_loss": float(loss.mean())}


def reference(ranks: int, assets: int, scenarios: int, confidence: float, value: float,
              seed: int) -> dict:
    streams = np.random.SeedSequence(seed).spawn(ranks)
    parts = [losses(np.random.default_rng(streams[r]), block(scenarios, ranks, r)[1]
                    - block(scenarios, ranks, r)[0], assets, value) for r in range(ranks)]
    red = {"losses": np.concatenate(parts)}
    return dict(red, **finalize(red, {"confidence": confidence}))
