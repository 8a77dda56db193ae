"""Calibration of an EP dictionary (DESIGN.md, "EP, precisely"): pure torch, no IO.

From the first ``n_cal`` activations, in batches:
    dir = normalize(mean_i(a_i / |a_i|)),   c = dir * <mean_i a_i, dir>
    u(a) = (a - c) / |a - c|
    theta_p = mean over batches of the p-th percentile (linear interpolation) of the
              within-batch pairwise cosine distances 1 - u_i.u_j, i < j.
The center needs every calibration token before any distance, so callers make two passes
over the calibration prefix (``CenterAccumulator``, then ``batch_percentile`` per batch)
and never hold it all in memory.

Degenerate numbers (issue 8, B): every cosine distance is clamped to [0, 2] (float rounding
puts identical unit directions +-1e-7 apart), so theta >= 0. A row equal to the center has
no direction: ``unit_directions`` gives it a NaN row, and such rows take part in no pair
(``degenerate``). A zero row adds nothing to the spherical mean. Input that cannot define
theta (no batch with two usable rows, or a non-finite result) raises ``UsageError``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ep_store.errors import UsageError


class Calibration(NamedTuple):
    center_D: torch.Tensor  # float32
    theta: float
    percentile: float
    tokens: int
    batches: int
    scale: float | None = None  # median |a - c| over the calibration tokens: steering's unit (issue 9)


class CenterAccumulator:
    """Running sums for the spherical center, in float64."""

    def __init__(self, width: int):
        self.sum_unit_D = torch.zeros(width, dtype=torch.float64)
        self.sum_D = torch.zeros(width, dtype=torch.float64)
        self.count = 0

    def add(self, x_ND: torch.Tensor) -> None:
        x = x_ND.to(torch.float64).cpu()
        norm = x.norm(dim=1, keepdim=True)
        # A zero row has no direction: it adds nothing to the spherical mean (issue 8, item 7).
        self.sum_unit_D += torch.where(norm > 0, x / norm.clamp_min(1e-300), 0.0).sum(0)
        self.sum_D += x.sum(0)
        self.count += x.shape[0]

    def center(self) -> torch.Tensor:
        if self.count == 0 or not torch.isfinite(self.sum_D).all() or self.sum_unit_D.norm() == 0:
            raise UsageError("the calibration rows define no center (none, all zero, or non-finite values)")
        direction = self.sum_unit_D / self.sum_unit_D.norm()
        mean = self.sum_D / self.count
        return (direction * (mean @ direction)).to(torch.float32)


def unit_directions(x_ND: torch.Tensor, center_D: torch.Tensor) -> torch.Tensor:
    """u(a) = (a - c) / |a - c| in float32: the one definition every path uses.

    x_ND: activations (any float dtype), center_D: the dictionary's center. Returns (N, D)
    float32; a row equal to the center, or with NaN/inf, comes back as a NaN row (its
    direction is undefined; see ``degenerate``).
    """
    centered = x_ND.to(torch.float32) - center_D.to(x_ND.device, torch.float32)
    norm = centered.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, centered / norm, torch.nan)


def degenerate(u_ND: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows with no direction (non-finite input or equal to the center)."""
    return ~torch.isfinite(u_ND).all(dim=1)


def median_norm(norms_N: torch.Tensor) -> float:
    """Median (numpy's, the mean of the middle two for even N) of ``|a - c|`` values."""
    return float(torch.quantile(norms_N.to(torch.float64).reshape(-1), 0.5))


def _interpolate(n: int, p: float, kth) -> float:
    """numpy's linear-interpolation percentile of ``n`` values, given ``kth(k)``: their
    k-th smallest (1-based). Two order statistics, no sort (issue 12: a sort of each
    calibration batch's 2.1M pair distances was half of ``ep build`` on CPU)."""
    rank = p / 100.0 * (n - 1)
    lo = int(rank)
    hi = min(lo + 1, n - 1)
    low, high = kth(lo + 1), kth(hi + 1)
    return float(low + (high - low) * (rank - lo))


def linear_percentile(values: torch.Tensor, p: float) -> float:
    """p-th percentile with linear interpolation (numpy's default method)."""
    flat = values.reshape(-1).to(torch.float64)
    return _interpolate(flat.numel(), p, lambda k: flat.kthvalue(k).values)


def batch_percentile(u_BD: torch.Tensor, p: float) -> float | None:
    """p-th percentile of 1 - u_i.u_j, clamped to [0, 2], over pairs i < j of one batch.

    Degenerate rows (NaN directions) take part in no pair; None when fewer than two remain.
    The (B, B) distance matrix holds every pair twice and the diagonal once: with the
    diagonal set to +inf (above every distance), the k-th smallest pair distance is the
    (2k)-th smallest entry of the matrix, so no pair list is gathered.
    """
    u = u_BD[~degenerate(u_BD)].to(torch.float64)
    m = u.shape[0]
    if m < 2:
        return None
    dist_BB = (1.0 - u @ u.T).clamp_(0.0, 2.0)
    dist_BB.fill_diagonal_(math.inf)
    flat = dist_BB.reshape(-1)
    return _interpolate(m * (m - 1) // 2, p, lambda k: flat.kthvalue(2 * k).values)


def mean_theta(thetas: list[float | None], batch_size: int) -> tuple[float, int]:
    """(theta, batches used): the mean of the batch percentiles; refuses an undefined theta.

    Raises UsageError when no batch has two usable rows (e.g. ``--calibration-batch 1``) or
    the result is not finite (issue 8, item 6).
    """
    used = [t for t in thetas if t is not None]
    if not used:
        raise UsageError(f"cannot calibrate: no calibration batch of {batch_size} rows holds two usable rows "
                         "(theta needs pairs); use --calibration-batch >= 2 and at least two distinct tokens")
    theta = sum(used) / len(used)
    if not math.isfinite(theta):
        raise UsageError(f"cannot calibrate: theta is {theta} (non-finite activations?); check the dataset")
    return max(theta, 0.0), len(used)


def calibrate(batches, percentile: float) -> Calibration:
    """Reference calibration over an in-memory list of (N_b, D) batches (tests, small data)."""
    acc = CenterAccumulator(batches[0].shape[1])
    for x in batches:
        acc.add(x)
    center = acc.center()
    theta, used = mean_theta([batch_percentile(unit_directions(x, center), percentile) for x in batches],
                             batches[0].shape[0])
    scale = median_norm(torch.cat([(x.to(torch.float32) - center).norm(dim=1) for x in batches]))
    return Calibration(center, theta, percentile, acc.count, used, scale)
