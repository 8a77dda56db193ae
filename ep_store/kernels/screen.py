"""Screened similarity products and their exact decisions: pure torch, no IO.

A screen multiplies unit directions by exemplars in float32 or bfloat16; every decision it
makes near a boundary is re-taken in float64, so results never depend on the screening
dtype, the device or the block sizes (DESIGN.md, "EP, precisely"; issues 8, 12 and 20):

- membership: ``covered`` (the rule's comparison) and ``screen_decisions`` (sure / undecided);
- the nearest exemplar: ``top2`` keeps each row's best and second-best screened value, and
  ``exact_nearest`` re-takes, in float64, every row whose two best lie within twice the
  screening margin (ties go to the lowest index, as a float64 argmax would give them);
- the screening dtype: ``choose_precision`` picks bfloat16 only where the hardware multiplies
  it natively (issue 20, item 5).
"""

from __future__ import annotations

import torch

# Bounds on |screened - exact| similarity of two unit vectors. bfloat16 rounds each
# input to 8 significant bits (relative error 2^-8), so by Cauchy-Schwarz the dot product
# moves by at most (2 * 2^-8 + 2^-16) |u||e| ~ 0.0079, and rounding the result to bfloat16
# adds 2^-9 * |sim| <= 0.002; float32 accumulation over D <= 16k terms adds < 1e-3.
SCREEN_MARGIN = {torch.float32: 1e-3, torch.bfloat16: 1.6e-2}
# |float64 matmul - exact_similarity| of unit vectors: each way of adding D products errs by
# at most ~D * 2^-53 (Cauchy-Schwarz bounds the sum of |u_i e_i| by 1); 1e-9 holds to D ~ 4e6.
FLOAT64_MARGIN = 1e-9
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISION_CHOICES = ("auto", *PRECISIONS)
"""What ``ep build --precision`` accepts; "auto" is resolved by ``choose_precision``."""

# Tie rule (issue 8, item 5): float32 unit directions have |u|^2 = 1 +- ~1e-7, so identical
# rows sit up to ~1e-7 apart; distances at or below TIE_DISTANCE count as equal, so identical
# vectors always share one region, even when theta is 0. Thetas above it are unaffected.
TIE_DISTANCE = 1e-6


def covered(sim64: torch.Tensor, theta: float) -> torch.Tensor:
    """The rule's comparison: an exemplar covers u iff clamp(1 - u.e, 0, 2) <= max(theta, TIE_DISTANCE)."""
    return (1.0 - sim64).clamp(0.0, 2.0) <= max(theta, TIE_DISTANCE)


def screen_decisions(sim: torch.Tensor, theta: float, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(surely covered, undecided) from screened similarities; undecided ones need float64.

    The threshold is the one ``covered`` applies (kept beside it: change them together); a
    screened value beyond ``margin`` of it decides the same way as the exact one.
    """
    if theta >= 2.0:  # covered's clamp: every distance is at most 2, so every number is covered
        return ~sim.isnan(), torch.zeros_like(sim, dtype=torch.bool)
    threshold = 1.0 - max(theta, TIE_DISTANCE)
    sure = sim >= threshold + margin
    unsure = ~sure & (sim >= threshold - margin)
    return sure, unsure


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: any CUDA device, or a CPU with
    AVX512_BF16 or AMX tiles. Without them a CPU emulates bf16 products, several times
    slower than float32 (issue 20: 0.8 against 38 GFLOP/s on an AVX2 machine)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    # torch.backends.cpu.get_cpu_capability() names only the vector width (e.g. "AVX512");
    # these two probes are torch's own (private, hence the getattr).
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def choose_precision(precision: str, device: torch.device | str) -> str:
    """The screening precision to use: ``precision`` itself, or for "auto" bfloat16 where
    ``native_bf16(device)`` and float32 elsewhere. Raises ValueError for an unknown name."""
    if precision == "auto":
        return "bfloat16" if native_bf16(torch.device(device)) else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISION_CHOICES)}")
    return precision


def top2(sim_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best_B, second_B, argbest_B) of each row, overwriting the argbest entries of
    ``sim_BC`` (a temporary the caller owns). Equal best values give second == best."""
    best_B, arg_B = sim_BC.max(dim=1)
    sim_BC.scatter_(1, arg_B[:, None], float("-inf"))
    return best_B, sim_BC.amax(dim=1), arg_B


def merge_top2(a: tuple, b: tuple, offset: int) -> tuple:
    """Top-2 of two column blocks' ``top2`` results (``b``'s indices shifted by ``offset``);
    ties keep ``a``'s index, as one max over all columns would."""
    best_a, second_a, arg_a = a
    best_b, second_b, arg_b = b
    take = best_b > best_a
    best = torch.where(take, best_b, best_a)
    second = torch.maximum(torch.minimum(best_a, best_b), torch.maximum(second_a, second_b))
    return best, second, torch.where(take, arg_b + offset, arg_a)


def ambiguous(best_B: torch.Tensor, second_B: torch.Tensor, margin: float) -> torch.Tensor:
    """(B,) bool: rows whose screened argmax may not be the exact one (the two best lie within
    twice the screening margin)."""
    return second_B >= best_B - 2 * margin


def exact_nearest(u_RD: torch.Tensor, E_CD: torch.Tensor, E_screen_CD: torch.Tensor,
                  available_RC: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest exemplar of each row: (index_R int64, similarity_R float64).

    The rows are screened against every column in ``E_screen_CD``'s dtype; pairs within twice
    that dtype's margin of their row's best are computed in float64 (products of float32
    values are exact there) and the float64 maximum wins, ties to the lowest index.
    ``available_RC`` (bool) restricts each row to some columns; a row with none gets index -1
    and similarity -inf.
    """
    R, C = u_RD.shape[0], E_CD.shape[0]
    margin = SCREEN_MARGIN[E_screen_CD.dtype]
    sim_RC = (u_RD.to(E_screen_CD.dtype) @ E_screen_CD.T).float()
    if available_RC is not None:
        sim_RC.masked_fill_(~available_RC, float("-inf"))
    best_R = sim_RC.amax(dim=1) if C else sim_RC.new_full((R,), float("-inf"))
    near_RC = sim_RC >= (best_R - 2 * margin)[:, None]
    if available_RC is not None:  # a row with nothing available has best -inf: near everywhere
        near_RC &= available_RC
    r, c = near_RC.nonzero(as_tuple=True)
    sim64 = exact_similarity(u_RD[r], E_CD[c])
    best64_R = sim64.new_full((R,), float("-inf")).scatter_reduce(0, r, sim64, "amax")
    win = sim64 == best64_R[r]
    none = torch.iinfo(torch.int64).max
    index_R = torch.full((R,), none, dtype=torch.int64, device=u_RD.device).scatter_reduce(0, r[win], c[win], "amin")
    return index_R.masked_fill_(index_R == none, -1), best64_R


def exact_similarity(u_RD: torch.Tensor, E_RD: torch.Tensor) -> torch.Tensor:
    """(R,) float64 dot products of paired rows (broadcast like ``*``): the rule's arithmetic.

    Every exact decision (the leader rule, theta's pair distances, nearest exemplars) takes
    its similarity from here, so they agree to the bit. The products of float32 values are
    exact in float64; they are added in a fixed pairwise tree of elementwise float64 adds
    (``tree_sum``), each rounded by IEEE 754 alone, so the bits do not depend on the device,
    the CPU's vector width, the memory layout or the rows beside a row. A reduction such as
    ``sum`` or ``@`` adds in an order of its own choosing: at a tie (a distance equal to
    theta, which happens when theta is a pair distance of the stream's own first tokens)
    it decided membership differently from the reference (issue 22's fault of 2026-12-07).
    """
    return tree_sum(u_RD.to(torch.float64) * E_RD.to(torch.float64))


def tree_sum(x_RD: torch.Tensor) -> torch.Tensor:
    """(R,) sums of the rows of ``x_RD`` in one fixed order: zero-padded to a power of two
    columns, then the right half added to the left half until one column is left."""
    width = x_RD.shape[-1]
    x = torch.nn.functional.pad(x_RD, (0, (1 << max(width - 1, 0).bit_length()) - width))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]

