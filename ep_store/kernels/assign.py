"""Voronoi assignment to exemplars: pure torch, no IO.

region(a) = argmax_k u(a).e_k (float64, ties to the lowest id) and distance = 1 - max,
clamped to [0, 2]; the distance is a free out-of-distribution score (DESIGN.md).

Degenerate rows (issue 8, item 7), one behaviour for every caller (``Dictionary.assign``,
``ep assign``, ``ep build``'s own assignment): a row with NaN/inf values, or equal to the
center (its direction u(a) is undefined), gets region ``UNASSIGNED`` (-1) and distance NaN.
An empty dictionary assigns every row that way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ep_store.kernels.calibrate import degenerate
from ep_store.kernels.screen import SCREEN_MARGIN, ambiguous, exact_nearest, top2

UNASSIGNED = -1  # region id of a row with no direction (non-finite, or equal to the center)


class Assignment(NamedTuple):
    region_N: torch.Tensor  # int64 region ids, UNASSIGNED for degenerate rows
    distance_N: torch.Tensor  # float32 cosine distance to that region's exemplar, in [0, 2]; NaN if UNASSIGNED


def nearest_exemplar(u_ND: torch.Tensor, exemplars_KD: torch.Tensor, chunk: int = 4096) -> Assignment:
    """Exact nearest exemplar of each unit direction, ``chunk`` rows at a time (issue 20, item 3).

    u_ND: unit directions from ``calibrate.unit_directions`` (NaN rows for degenerate input);
    exemplars_KD: unit exemplar directions. The region is the float64 argmax of u.e, ties to
    the lowest region id (a float32 screen; rows whose two best lie within its margin are
    re-taken in float64, as the builder takes them); the distance is 1 - the similarity
    (float32 screen, within ~1e-6 of float64; float64 for re-taken rows), clamped to [0, 2],
    as float32. Degenerate rows get (UNASSIGNED, NaN).
    """
    n = u_ND.shape[0]
    region = torch.full((n,), UNASSIGNED, dtype=torch.long, device=u_ND.device)
    distance = torch.full((n,), float("nan"), dtype=torch.float32, device=u_ND.device)
    if exemplars_KD.shape[0] == 0 or n == 0:
        return Assignment(region, distance)
    E = exemplars_KD.to(u_ND.device, torch.float32)
    for start in range(0, n, chunk):
        u = u_ND[start : start + chunk].to(torch.float32)
        best, second, nearest = top2(u @ E.T)
        best = best.to(torch.float64)
        redo = ambiguous(best, second, SCREEN_MARGIN[torch.float32]).nonzero().squeeze(1)
        if redo.numel():
            nearest[redo], best[redo] = exact_nearest(u[redo], E, E)
        region[start : start + chunk] = nearest
        distance[start : start + chunk] = (1.0 - best).clamp(0.0, 2.0).float()
    bad = degenerate(u_ND)
    region[bad], distance[bad] = UNASSIGNED, float("nan")
    return Assignment(region, distance)
