"""Mandelbrot image (rendering): rows interleaved over ranks for load balance."""

from __future__ import annotations

import numpy as np

from hpcbatch.kernels.api import Derived, Output, Param

DESCRIPTION = "Mandelbrot escape-time image, row interleaving, gathered image"
PARAMS = {
    "width": Param(int, 640, "pixels", min=1),
    "height": Param(int, 480, "pixels", min=1),
    "max_iter": Param(int, 200, "iteration cap", min=1),
}
# the gathered rows only feed finalize(): the file holds the image once, not twice
OUTPUTS = {
    "rows": Output("concat", description="rendered rows, rank by rank", keep=False),
    "row_index": Output("concat", description="which image row each one is", keep=False),
}
DERIVED = {"image": Derived(
    "escape-time iterations per pixel (capped at max_iter); image[i, j] is the point "
    "x = -2.2 + 3.2 j / (width - 1), y = -1.2 + 2.4 i / (height - 1)", units="1")}


def render(rows: np.ndarray, width: int, height: int, max_iter: int) -> np.ndarray:
    x = np.linspace(-2.2, 1.0, width)
    y = np.linspace(-1.2, 1.2, height)[rows]
    c = x[None, :] + 1j * y[:, None]
    z = np.zeros_like(c)
    count = np.zeros(c.shape, dtype=np.int32)
    for _ in range(max_iter):
        live = np.abs(z) <= 2.0
        if not live.any():
            break
        z[live] = z[live] * z[live] + c[live]
        count[live] += 1
    return count


def run(comm, width: int, height: int, max_iter: int) -> dict:
    rows = np.arange(comm.rank, height, comm.size)  # row i on rank i % size
    return {"rows": render(rows, width, height, max_iter).reshape(-1, width),
            "row_index": rows.astype(np.int64)}


def finalize(reduced: dict, params: dict) -> dict:
    image = np.empty((params["height"], params["width"]), dtype=np.int32)
    image[reduced["row_index"]] = reduced["rows"]
    return {"image": image}


def reference(ranks: int, width: int, height: int, max_iter: int) -> dict:
    return {"image": render(np.arange(height), width, height, max_iter)}
