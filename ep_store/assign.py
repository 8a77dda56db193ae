"""Voronoi assignment to exemplars: pure torch, no IO.

region(a) = argmax_k u(a).e_k and distance = 1 - max, clamped to [0, 2]; the distance is a
free out-of-distribution score (DESIGN.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Assignment(NamedTuple):
    region_N: torch.Tensor  # int64 region ids
    distance_N: torch.Tensor  # float32 cosine distance to that region's exemplar


def nearest_exemplar(u_ND: torch.Tensor, exemplars_KD: torch.Tensor, chunk: int = 4096) -> Assignment:
    """Nearest exemplar of each unit direction, in float32, ``chunk`` rows at a time."""
    regions, distances = [], []
    E = exemplars_KD.to(u_ND.device, torch.float32)
    for start in range(0, u_ND.shape[0], chunk):
        sim = u_ND[start : start + chunk].to(torch.float32) @ E.T
        best, region = sim.max(dim=1)
        regions.append(region)
        distances.append((1.0 - best).clamp(0.0, 2.0))
    if not regions:
        return Assignment(torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return Assignment(torch.cat(regions), torch.cat(distances))
