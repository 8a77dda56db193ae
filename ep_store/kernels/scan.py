"""The pure kernels of nearest-neighbour search in EP's geometry (issue 14): numpy and torch only.

    u(a) = (a - c) / |a - c|        (c: the dictionary's center)
    similarity(a, q) = u(a) . q     (q: a unit direction in the same geometry)

The exact scan keeps a running float32 top-n over streamed batches (``scan_candidates``,
``scan_similarities``, ``TopK``); every candidate, from the scan or an index, is then re-scored
in float64 (``rescore``) and ordered (``order``). ep_store.analysis.search reads the store and
calls these. Bad arguments raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ep_store.kernels.screen import tree_sum


def unit64(x_ND: np.ndarray, center_D: np.ndarray) -> np.ndarray:
    """u = (a - c) / |a - c| in float64 (rows with |a - c| = 0 or non-finite become NaN)."""
    centered = np.asarray(x_ND, np.float64) - np.asarray(center_D, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return centered / np.linalg.norm(centered, axis=1, keepdims=True)


def rescore(x_ND: np.ndarray, center_D: np.ndarray, q_D: np.ndarray) -> np.ndarray:
    """Exact similarities u(x_n).q in float64, shape (N,); NaN for non-finite rows.

    Each row's bits depend on that row alone (``screen.tree_sum``'s fixed order), so a token
    scores the same among the scan's candidates as among the index's: a matrix-vector
    product's bits change with the number of rows (found beside issue 22's tie fault)."""
    products_ND = unit64(x_ND, center_D) * np.asarray(q_D, np.float64)
    return tree_sum(torch.from_numpy(products_ND)).numpy()


def order(rows_N: np.ndarray, sim_N: np.ndarray) -> np.ndarray:
    """Indices sorting by similarity, highest first, ties by row; NaN similarities dropped."""
    keep = np.flatnonzero(np.isfinite(sim_N))
    return keep[np.lexsort((rows_N[keep], -sim_N[keep]))]


class TopK:
    """Running top-n of float32 similarities over streamed batches (rows are dataset positions)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"TopK keeps at least one row, got n={n}")
        self.n = n
        self.sim = torch.empty(0)
        self.rows = torch.empty(0, dtype=torch.long)

    def add(self, sim_B: torch.Tensor, rows_B: torch.Tensor) -> None:
        sim = torch.cat([self.sim, sim_B])
        rows = torch.cat([self.rows, rows_B])
        top = torch.topk(sim, min(self.n, sim.numel())).indices
        self.sim, self.rows = sim[top], rows[top]

    def result(self) -> np.ndarray:
        keep = torch.isfinite(self.sim)
        return self.rows[keep].numpy()


def scan_similarities(x_BD: torch.Tensor, center_D: torch.Tensor, q_D: torch.Tensor) -> torch.Tensor:
    """u(x).q in float32 without materialising u: (x.q - c.q) / sqrt(|x|^2 - 2 x.c + |c|^2).

    Rounding is far below the float64 re-scoring margin (search.EXACT_MARGIN); non-finite rows
    give NaN.
    """
    xqc = x_BD @ torch.stack([q_D, center_D], dim=1)  # (B, 2)
    sq = torch.linalg.vector_norm(x_BD, dim=1) ** 2 - 2 * xqc[:, 1] + center_D @ center_D
    return (xqc[:, 0] - center_D @ q_D) / sq.clamp_min(1e-30).sqrt()


def scan_candidates(batches: Iterator[tuple[np.ndarray, torch.Tensor]], center_D: torch.Tensor, q_D: np.ndarray,
                    n: int, regions_N: np.ndarray | None = None, exclude_region: int | None = None) -> np.ndarray:
    """Rows of the ``n`` best float32 similarities over (rows_B, x_BD) batches: the exact scan."""
    if np.shape(q_D) != tuple(center_D.shape):
        raise ValueError(f"q_D has shape {np.shape(q_D)} but center_D has shape {tuple(center_D.shape)}")
    top = TopK(n)
    q = torch.from_numpy(np.asarray(q_D, np.float32))
    c = center_D.to(torch.float32)
    for rows, x in batches:
        sim = torch.nan_to_num(scan_similarities(x, c, q), nan=-math.inf)  # non-finite rows never match
        if exclude_region is not None:
            sim[torch.from_numpy(regions_N[rows] == exclude_region)] = -math.inf
        top.add(sim, torch.from_numpy(rows))
    return top.result()
