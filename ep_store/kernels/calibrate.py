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
theta (no batch with two usable rows, or a non-finite result) raises ``ValueError`` (the build turns it into a one-line usage error).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ep_store.kernels.screen import exact_similarity


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
            raise ValueError("the calibration rows define no center (none, all zero, or non-finite values)")
        direction = self.sum_unit_D / self.sum_unit_D.norm()
        mean = self.sum_D / self.count
        return (direction * (mean @ direction)).to(torch.float32)


# Below this float32 norm, squares of the entries may have underflowed: redo in float64.
NORM_FLOOR = 1e-15


def unit_directions(x_ND: torch.Tensor, center_D: torch.Tensor) -> torch.Tensor:
    """u(a) = (a - c) / |a - c| in float32: the one definition every path uses.

    x_ND: activations (any float dtype), center_D: the dictionary's center. Returns a new
    (N, D) float32 tensor; a row with no direction (equal to the center, NaN/inf values, or
    a norm beyond float32's range) comes back as a NaN row (see ``degenerate``).
    """
    return unit_directions_(x_ND.to(torch.float32, copy=True), center_D)


def unit_directions_(x_ND: torch.Tensor, center_D: torch.Tensor) -> torch.Tensor:
    """``unit_directions`` in place on a float32 ``x_ND`` (returned): no (N, D) temporaries,
    which on CPU cost more than the arithmetic (issue 12: fresh pages, not FLOPs).

    The float32 norm squares each entry: beyond ~1.8e19 that overflows, below ~1e-19 it
    underflows. Rows whose float32 norm is not finite or under ``NORM_FLOOR`` are normalised
    again in float64, so every row whose direction float32 can hold gets it; the rest
    (zero, NaN/inf, or a difference a - c beyond float32) are NaN rows.
    """
    if x_ND.dtype != torch.float32:
        raise TypeError(f"unit_directions_ works in place on float32, got {x_ND.dtype}")
    x_ND.sub_(center_D.to(x_ND.device, torch.float32))
    norm_N1 = x_ND.norm(dim=1, keepdim=True)
    redo_N = ~(torch.isfinite(norm_N1) & (norm_N1 > NORM_FLOOR)).squeeze(1)
    redo = bool(redo_N.any())
    if redo:
        wide_RD = x_ND[redo_N].to(torch.float64)
        wide_norm_R1 = wide_RD.norm(dim=1, keepdim=True)
        defined_R1 = torch.isfinite(wide_norm_R1) & (wide_norm_R1 > 0)
        fixed_RD = torch.where(defined_R1, wide_RD / wide_norm_R1, torch.nan).to(torch.float32)
    x_ND.div_(norm_N1)
    if redo:
        x_ND[redo_N] = fixed_RD
    return x_ND


def centered_norms(x_ND: torch.Tensor, center_D: torch.Tensor) -> torch.Tensor:
    """(N,) float64 |a - c|, the difference taken in float32 as ``unit_directions`` takes it,
    the norm in float64 (no overflow or underflow of the squares)."""
    centered = x_ND.to(torch.float32) - center_D.to(x_ND.device, torch.float32)
    return torch.linalg.vector_norm(centered, dim=1, dtype=torch.float64)


def degenerate(u_ND: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows with no direction (non-finite input or equal to the center).

    For unit directions (entries in [-1, 1], or NaN rows) a row sum is finite iff every
    entry is, so one reduction decides it without an (N, D) temporary.
    """
    return ~torch.isfinite(u_ND.sum(dim=1))


def median_norm(norms_N: torch.Tensor) -> float:
    """Median (numpy's, the mean of the middle two for even N) of ``|a - c|`` values."""
    return float(torch.quantile(norms_N.to(torch.float64).reshape(-1), 0.5))


def _interpolate(n: int, p: float, kth) -> float:
    """numpy's linear-interpolation percentile of ``n`` values, given ``kth(k)``: their
    k-th smallest (1-based). Two order statistics, no sort (issue 12: a sort of each
    calibration batch's 2.1M pair distances was half of ``ep build`` on CPU)."""
    low_k, high_k, t = percentile_ranks(n, p)
    return lerp(float(kth(low_k)), float(kth(high_k)), t)


def percentile_ranks(n: int, p: float) -> tuple[int, int, float]:
    """numpy's linear percentile of ``n`` values interpolates, by ``t``, between their
    ``low_k``-th and ``high_k``-th smallest (1-based): (low_k, high_k, t)."""
    rank = p / 100.0 * (n - 1)
    lo = int(rank)
    return lo + 1, min(lo + 1, n - 1) + 1, rank - lo


def lerp(low: float, high: float, t: float) -> float:
    """numpy's interpolation between two order statistics, to the bit: numpy 2 computes
    ``high - (high - low) * (1 - t)`` once t >= 0.5 (the two forms differ in the last bits)."""
    if t >= 0.5:
        return float(high - (high - low) * (1.0 - t))
    return float(low + (high - low) * t)


def linear_percentile(values: torch.Tensor, p: float) -> float:
    """p-th percentile with linear interpolation (numpy's default method)."""
    flat = values.reshape(-1).to(torch.float64)
    return _interpolate(flat.numel(), p, lambda k: flat.kthvalue(k).values)


# |float32 - float64| of a dot product of two float32 unit vectors (accumulation only: the
# inputs are float32 already); the builder's float32 screening bound (leader.SCREEN_MARGIN).
SIM_MARGIN = 1e-3
HISTOGRAM_BINS = 8192


def batch_percentile(u_BD: torch.Tensor, p: float) -> float | None:
    """p-th percentile of 1 - u_i.u_j, clamped to [0, 2], over pairs i < j of one batch,
    the dot products by ``screen.exact_similarity`` (the rule's own arithmetic, so a pair at
    distance theta is a tie to the bit in the builder too), interpolated linearly as numpy does.

    Degenerate rows (NaN directions) take part in no pair; None when fewer than two remain.
    Exact, without a float64 product of every pair or a selection over them (issue 12):
    the similarities are screened in float32 (within ``SIM_MARGIN`` of float64), a
    histogram of them brackets the two order statistics needed, and only pairs that may
    fall inside the bracket are computed in float64 (see ``_kth_largest_similarities``).
    """
    u = u_BD[~degenerate(u_BD)].to(torch.float32)
    m = u.shape[0]
    if m < 2:
        return None
    sim_BB = u @ u.T
    low_k, high_k, t = percentile_ranks(m * (m - 1) // 2, p)
    # The k-th smallest distance is 1 - (the k-th largest similarity), clamped: both maps
    # are monotone, so they commute with order statistics.
    sims = _kth_largest_similarities(sim_BB, u.to(torch.float64), (low_k, high_k))
    low, high = (min(max(1.0 - s, 0.0), 2.0) for s in sims)
    return lerp(low, high, t)


def _kth_largest_similarities(sim_BB: torch.Tensor, u64_BD: torch.Tensor, ks: tuple[int, ...],
                              hist: torch.Tensor | None = None) -> list[float]:
    """The k-th largest float64 similarities u_i.u_j over pairs i < j, for each k of ``ks``.

    ``sim_BB``: every pair's similarity screened in float32 (within SIM_MARGIN of its
    float64 value); ``hist``: counts of the pairs' screened values in HISTOGRAM_BINS bins,
    highest first (default: computed). The histogram brackets the answers in [a, b]. Pairs
    screened above b + margin are surely above b, pairs below a - margin surely below a;
    the rest are computed in float64. If each answer, read off those, lies in [a, b], it
    is exact (everything surely above is larger, everything surely below smaller);
    otherwise, which takes a misleading histogram, the bracket widens (64 bins more each
    side, then every pair).
    """
    hist = _similarity_histogram(sim_BB) if hist is None else hist
    width = (2.0 + 2 * SIM_MARGIN) / HISTOGRAM_BINS
    top = 1.0 + SIM_MARGIN
    cumulative = hist.cumsum(0)
    bins = torch.searchsorted(cumulative, torch.tensor([float(k) for k in ks], dtype=cumulative.dtype,
                                                       device=cumulative.device))
    first, last = int(bins.min()), min(int(bins.max()), HISTOGRAM_BINS - 1)
    # Bin i (highest first) spans [top - (i + 1) * width, top - i * width]; one bin more each
    # side absorbs histc's own rounding at the edges.
    brackets = [(top - (last + 1 + extra) * width, top - (first - extra) * width) for extra in (1, 64)]
    for lower, upper in brackets + [(-math.inf, math.inf)]:
        exact = _pairs_between(sim_BB, u64_BD, lower - SIM_MARGIN, upper + SIM_MARGIN)
        above = int(torch.count_nonzero(torch.triu(sim_BB > upper + SIM_MARGIN, diagonal=1)))
        ranks = [k - above for k in ks]
        if min(ranks) >= 1 and max(ranks) <= exact.numel():
            ordered = exact.topk(max(ranks)).values
            values = [float(ordered[r - 1]) for r in ranks]
            if all(lower <= v <= upper for v in values):
                return values
    raise AssertionError("unreachable: the full bracket holds every pair")


def _similarity_histogram(sim_BB: torch.Tensor) -> torch.Tensor:
    """Counts of the screened similarities of pairs i < j in ``HISTOGRAM_BINS`` bins over
    [-1 - SIM_MARGIN, 1 + SIM_MARGIN], highest bin first (the full matrix holds every pair
    twice and the diagonal once)."""
    lo, hi = -1.0 - SIM_MARGIN, 1.0 + SIM_MARGIN
    # histc counts in the input's dtype: float32 counts are exact up to 2^24, so count a
    # block of rows at a time and add the blocks in float64.
    rows = max(1, (1 << 24) // sim_BB.shape[1])
    counts = sum(torch.histc(sim_BB[r : r + rows], HISTOGRAM_BINS, lo, hi).to(torch.float64)
                 for r in range(0, sim_BB.shape[0], rows))
    counts = counts - torch.histc(sim_BB.diagonal(), HISTOGRAM_BINS, lo, hi).to(torch.float64)
    return (counts / 2).flip(0)


def _pairs_between(sim_BB: torch.Tensor, u64_BD: torch.Tensor, low: float, high: float,
                   chunk: int = 8192) -> torch.Tensor:
    """Float64 similarities of the pairs i < j whose screened similarity lies in [low, high]."""
    window = torch.triu((sim_BB >= low) & (sim_BB <= high), diagonal=1)
    i, j = window.nonzero(as_tuple=True)
    return torch.cat([exact_similarity(u64_BD[i[s : s + chunk]], u64_BD[j[s : s + chunk]])
                      for s in range(0, i.numel(), chunk)] or [u64_BD.new_zeros(0)])


def mean_theta(thetas: list[float | None], batch_size: int) -> tuple[float, int]:
    """(theta, batches used): the mean of the batch percentiles; refuses an undefined theta.

    Raises ValueError when no batch has two usable rows (e.g. ``--calibration-batch 1``) or
    the result is not finite (issue 8, item 6).
    """
    used = [t for t in thetas if t is not None]
    if not used:
        raise ValueError(f"cannot calibrate: no calibration batch of {batch_size} rows holds two usable rows "
                         "(theta needs pairs); use --calibration-batch >= 2 and at least two distinct tokens")
    theta = sum(used) / len(used)
    if not math.isfinite(theta):
        raise ValueError(f"cannot calibrate: theta is {theta} (non-finite activations?); check the dataset")
    return max(theta, 0.0), len(used)


def calibrate(batches, percentile: float) -> Calibration:
    """Reference calibration over an in-memory list of (N_b, D) batches (tests, small data)."""
    acc = CenterAccumulator(batches[0].shape[1])
    for x in batches:
        acc.add(x)
    center = acc.center()
    theta, used = mean_theta([batch_percentile(unit_directions(x, center), percentile) for x in batches],
                             batches[0].shape[0])
    scale = median_norm(torch.cat([centered_norms(x, center) for x in batches]))
    return Calibration(center, theta, percentile, acc.count, used, scale)
