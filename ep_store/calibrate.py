"""Calibration of an EP dictionary (DESIGN.md, "EP, precisely"): pure torch, no IO.

From the first ``n_cal`` activations, in batches:
    dir = normalize(mean_i(a_i / |a_i|)),   c = dir * <mean_i a_i, dir>
    u(a) = (a - c) / |a - c|
    theta_p = mean over batches of the p-th percentile (linear interpolation) of the
              within-batch pairwise cosine distances 1 - u_i.u_j, i < j.
The center needs every calibration token before any distance, so callers make two passes
over the calibration prefix (``CenterAccumulator``, then ``batch_percentile`` per batch)
and never hold it all in memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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
        self.sum_unit_D += (x / x.norm(dim=1, keepdim=True)).sum(0)
        self.sum_D += x.sum(0)
        self.count += x.shape[0]

    def center(self) -> torch.Tensor:
        direction = self.sum_unit_D / self.sum_unit_D.norm()
        mean = self.sum_D / self.count
        return (direction * (mean @ direction)).to(torch.float32)


def unit_directions(x_ND: torch.Tensor, center_D: torch.Tensor) -> torch.Tensor:
    """u(a) = (a - c) / |a - c| in float32: the one definition every path uses."""
    centered = x_ND.to(torch.float32) - center_D.to(x_ND.device, torch.float32)
    return centered / centered.norm(dim=1, keepdim=True)


def median_norm(norms_N: torch.Tensor) -> float:
    """Median (numpy's, the mean of the middle two for even N) of ``|a - c|`` values."""
    return float(torch.quantile(norms_N.to(torch.float64).reshape(-1), 0.5))


def linear_percentile(values: torch.Tensor, p: float) -> float:
    """p-th percentile with linear interpolation (numpy's default method)."""
    ordered = values.reshape(-1).to(torch.float64).sort().values
    rank = p / 100.0 * (ordered.numel() - 1)
    lo = int(rank)
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))


def batch_percentile(u_BD: torch.Tensor, p: float) -> float:
    """p-th percentile of 1 - u_i.u_j over pairs i < j of one batch."""
    u = u_BD.to(torch.float64)
    dist_BB = 1.0 - u @ u.T
    i, j = torch.triu_indices(u.shape[0], u.shape[0], offset=1, device=u.device)
    return linear_percentile(dist_BB[i, j], p)


def calibrate(batches, percentile: float) -> Calibration:
    """Reference calibration over an in-memory list of (N_b, D) batches (tests, small data)."""
    acc = CenterAccumulator(batches[0].shape[1])
    for x in batches:
        acc.add(x)
    center = acc.center()
    thetas = [batch_percentile(unit_directions(x, center), percentile) for x in batches if x.shape[0] >= 2]
    scale = median_norm(torch.cat([(x.to(torch.float32) - center).norm(dim=1) for x in batches]))
    return Calibration(center, sum(thetas) / len(thetas), percentile, acc.count, len(thetas), scale)
