"""Counts behind issue 20: how much of the leader rule's work a PCA bound could prove
irrelevant, and what that bound costs on this machine (used by ``pipelines.bench_build``).

The bound: with an orthonormal basis V (D x d'), u = V V^T u + r_u, so
u.e <= (V^T u).(V^T e) + |r_u||r_e|: the dot product of the (d'+1)-dimensional vectors
[V^T u, |r_u|] and [V^T e, |r_e|]. Where it is below 1 - theta (less a rounding margin) no
exemplar can cover the token. Counts are of pairs (token, exemplar existing at its
arrival); no timing in them. ``screen_costs`` then times, on the same shapes, the full
product with the row max the builder needs against the reduced product with the cheapest
reduction there is, so the counts can be read against what skipping pairs costs.
"""

from __future__ import annotations

import time

import torch

BOUND_MARGIN = 2e-3  # float32 arithmetic of the reduced vectors and their product: far above its ~1e-5


def principal_basis(u_ND: torch.Tensor, dims: int) -> tuple[torch.Tensor, float]:
    """(V_Dd float32 orthonormal, energy share): top principal directions of the rows'
    second moment (uncentred: the bound wants u ~ V V^T u), computed in float64."""
    u = u_ND.to(torch.float64)
    values, vectors = torch.linalg.eigh(u.T @ u)
    values, vectors = values.flip(0), vectors.flip(1)
    return vectors[:, :dims].to(torch.float32).contiguous(), float(values[:dims].sum() / values.sum())


def reduced(u_ND: torch.Tensor, V_Dd: torch.Tensor) -> torch.Tensor:
    """(N, d'+1) float32 rows [V^T u, |u - V V^T u|]: their dot products bound u.e from above."""
    p = u_ND @ V_Dd
    return torch.cat([p, (u_ND - p @ V_Dd.T).norm(dim=1, keepdim=True)], dim=1)


def bound_counts(u_ND: torch.Tensor, theta: float, exemplar_rows: list[int], tokens: int,
                 dims: tuple[int, ...] = (16, 32, 64, 128), chunk: int = 2048) -> dict:
    """The issue's table for one dictionary built on ``u_ND[:tokens]``.

    Returns theta, regions, the new-exemplar share, ``sequential_pairs`` (sum over tokens of
    the exemplars existing at arrival: the one-token rule's dot products), the PCA energy
    at each of ``dims``, and per d' the share of those pairs the bound excludes, split into
    tokens that became exemplars and member tokens.
    """
    u = u_ND[:tokens].to(torch.float32)
    rows = torch.tensor(exemplar_rows, dtype=torch.long)
    E = u[rows]
    arrival_N = torch.searchsorted(rows, torch.arange(tokens))  # exemplars strictly before each token
    is_new = torch.zeros(tokens, dtype=torch.bool)
    is_new[rows] = True
    result = {"theta": round(theta, 4), "regions": len(exemplar_rows), "tokens": tokens,
              "new_exemplar_share": round(len(exemplar_rows) / tokens, 4),
              "sequential_pairs": int(arrival_N.sum()), "pca_energy": {}, "excluded_share": {}}
    cut = 1.0 - theta - BOUND_MARGIN
    for d in dims:
        V, energy = principal_basis(u, d)
        result["pca_energy"][d] = round(energy, 4)
        z, zE = reduced(u, V), reduced(E, V)
        excluded = {True: 0, False: 0}
        pairs = {True: 0, False: 0}
        for start in range(0, tokens, chunk):
            stop = min(start + chunk, tokens)
            k = int(arrival_N[stop - 1])
            if k == 0:
                continue
            live_BK = torch.arange(k)[None, :] < arrival_N[start:stop, None]
            out_BK = (z[start:stop] @ zE[:k].T < cut) & live_BK
            for new in (True, False):
                pick = is_new[start:stop] == new
                excluded[new] += int(out_BK[pick].sum())
                pairs[new] += int(live_BK[pick].sum())
        result["excluded_share"][d] = {"new_exemplar_tokens": round(excluded[True] / max(pairs[True], 1), 4),
                                       "member_tokens": round(excluded[False] / max(pairs[False], 1), 4)}
    return result


def screen_costs(u_BD: torch.Tensor, E_KD: torch.Tensor, dims: tuple[int, ...] = (16, 64), repeats: int = 5) -> dict:
    """Seconds per (token, exemplar) pair, on this machine, of the full float32 product with
    the row max and argmax the builder needs, and of the reduced product (d'+1 columns)
    with only a row max (``amax``, the cheapest reduction torch has) for each d'."""
    def per_pair(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats / (u_BD.shape[0] * E_KD.shape[0])

    costs = {"full_ns": round(per_pair(lambda: (u_BD @ E_KD.T).max(dim=1)) * 1e9, 3)}
    for d in dims:
        V, _ = principal_basis(u_BD, d)
        z, zE = reduced(u_BD, V), reduced(E_KD, V)
        costs[f"reduced_d{d}_ns"] = round(per_pair(lambda z=z, zE=zE: (z @ zE.T).amax(dim=1)) * 1e9, 3)
    return costs
