"""Leader clustering under a cosine-distance threshold: the sequential rule and a fast,
exact batched implementation. Pure torch, no IO.

The rule (DESIGN.md): in stream order, a unit direction u becomes a new exemplar iff
1 - u.e > theta for every exemplar e already chosen. The rule's arithmetic is float64 dot
products of the float32 unit directions added in one fixed order (``exact_similarity``) and
``covered``'s comparison. The batched builder screens with one matmul per batch in float32
or bfloat16 and re-checks exactly every decision whose screened similarity lies within a
rounding bound of the threshold, so its exemplar list equals ``leader_reference`` exactly,
for any batch size, device and precision, ties at theta included.

Stopping: after ``saturation_window`` consecutive batches with no new exemplar
("saturated"), at the token budget ("max_tokens") or at the end of the stream
("end_of_stream"). Batches are aligned to absolute stream positions, so a build that
stops on its budget mid-batch and is continued later equals one longer build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ep_store.kernels.screen import (
    FLOAT64_MARGIN,
    PRECISIONS,
    SCREEN_MARGIN,
    TIE_DISTANCE,
    ambiguous,
    choose_precision,
    covered,
    exact_nearest,
    exact_similarity,
    merge_top2,
    screen_decisions,
    top2,
)

__all__ = ["PRECISIONS", "SCREEN_MARGIN", "TIE_DISTANCE", "covered", "screen_decisions", "LeaderBuilder",
           "LeaderState", "leader_reference", "first_independent", "ReferenceResult"]

# Screening shapes (issue 12): exemplar rows are padded to a multiple of ALIGN, so the
# matrix units see aligned operands (on an H200 an unaligned bf16 product ran 8x slower);
# CPU_BLOCK / GPU_BLOCK exemplars per product block.
ALIGN = 128
CPU_BLOCK = 2048
GPU_BLOCK = 1 << 30


class ReferenceResult(NamedTuple):
    exemplar_rows: list[int]
    new_per_batch: list[int]
    stop_reason: str
    member_count_K: torch.Tensor  # int64: tokens whose nearest exemplar at arrival is k
    direction_sum_KD: torch.Tensor  # float64: the sum of those tokens' unit directions


def leader_reference(
    u_ND: torch.Tensor, theta: float, batch_size: int, saturation_window: int = 1, statistics: bool = True
) -> ReferenceResult:
    """The plain sequential rule, one token at a time: the oracle for the fast builder.

    Statistics (issue 20, item 2): each consumed token joins its nearest exemplar at arrival
    (a new exemplar is its own), by float64 similarity, ties to the lowest region id.
    ``statistics=False`` skips them (zero counts and sums): the rule alone, as benchmarks time it.
    """
    u = u_ND.to(torch.float64).cpu()
    E = torch.empty_like(u)  # exemplars so far are E[:len(rows)]
    rows: list[int] = []
    new_per_batch: list[int] = []
    count, dsum = torch.zeros(u.shape[0], dtype=torch.long), torch.zeros_like(u)
    quiet, reason = 0, "end_of_stream"
    for start in range(0, u.shape[0], batch_size):
        new = 0
        for i in range(start, min(start + batch_size, u.shape[0])):
            if not _covered_by_any(u[i], E[: len(rows)], theta):
                E[len(rows)] = u[i]
                rows.append(i)
                new += 1
            if statistics:
                nearest = int(exact_similarity(u[i].expand(len(rows), -1), E[: len(rows)]).argmax())  # first maximum
                count[nearest] += 1
                dsum[nearest] += u[i]
        new_per_batch.append(new)
        quiet = quiet + 1 if new == 0 else 0
        if quiet >= saturation_window:
            reason = "saturated"
            break
    k = len(rows)
    return ReferenceResult(rows, new_per_batch, reason, count[:k], dsum[:k])


def _covered_by_any(u_D: torch.Tensor, E_KD: torch.Tensor, theta: float) -> bool:
    """Whether any exemplar covers u, by ``exact_similarity``: a float64 matrix-vector product
    decides every exemplar beyond ``FLOAT64_MARGIN`` of the threshold, the exact sum the rest."""
    sure, unsure = screen_decisions(E_KD @ u_D, theta, FLOAT64_MARGIN)
    if bool(sure.any()):
        return True
    close = unsure.nonzero().squeeze(1)
    return bool(close.numel()) and bool(covered(exact_similarity(u_D, E_KD[close]), theta).any())


@dataclass
class LeaderState:
    """Everything a build needs to continue later; saved with the dictionary."""

    width: int
    exemplars_KD: torch.Tensor = None  # float32 unit directions of the exemplars
    source_row_K: torch.Tensor = None  # source-dataset row where each exemplar was first seen
    member_count_K: torch.Tensor = None  # tokens whose nearest exemplar (at arrival) is k
    direction_sum_KD: torch.Tensor = None  # sum of those tokens' unit directions (float64)
    tokens: int = 0  # stream rows consumed
    new_in_open_batch: int = 0  # new exemplars in the batch not yet complete
    quiet_batches: int = 0
    new_per_batch: list[int] = field(default_factory=list)
    stop_reason: str | None = None

    def __post_init__(self):
        if self.exemplars_KD is None:
            self.exemplars_KD = torch.zeros(0, self.width)
            self.source_row_K = torch.zeros(0, dtype=torch.long)
            self.member_count_K = torch.zeros(0, dtype=torch.long)
            self.direction_sum_KD = torch.zeros(0, self.width, dtype=torch.float64)

    @property
    def regions(self) -> int:
        return self.exemplars_KD.shape[0]


class LeaderBuilder:
    """Exact batched leader clustering on any torch device.

    Screening is shaped for the matrix units (issue 12): the exemplar buffer's capacity and
    the slice screened against it are multiples of ``ALIGN`` rows (the padding rows are
    zero and are masked out of the row max), and the product and row max run one block of
    ``block`` exemplars at a time, in the screening dtype, so the (B, K) similarity matrix
    never has to exist. Host round trips per batch are a few, whatever the batch size.
    """

    def __init__(self, theta: float, batch_size: int, saturation_window: int, state: LeaderState,
                 device: torch.device | str = "cpu", precision: str = "auto", block: int | None = None):
        self.theta, self.batch_size, self.window = theta, batch_size, saturation_window
        self.device = torch.device(device)
        self.precision = choose_precision(precision, self.device)  # "auto": bf16 only where native
        self.dtype = PRECISIONS[self.precision]
        self.margin = SCREEN_MARGIN[self.dtype]
        # Exemplars per product block: on CPU a block keeps the product in cache while the
        # row max reads it; a GPU prefers one large product.
        default_block = CPU_BLOCK if self.device.type == "cpu" else GPU_BLOCK
        self.block = _round_up(block or default_block, ALIGN)
        self.state = state
        # Exemplars live on the device in a buffer that doubles when full, with a copy in
        # the screening dtype (the same tensor in float32), so appending is amortised O(1).
        k = state.regions
        cap = _round_up(max(1024, 2 * k), ALIGN)
        self._E = torch.zeros(cap, state.width, device=self.device)
        self._E[:k] = state.exemplars_KD.to(self.device)
        self._E_screen = self._E if self.dtype == torch.float32 else self._E.to(self.dtype)
        # Statistics stay on the host (float64 sums in one order on every device).
        self._count = torch.zeros(cap, dtype=torch.long)
        self._count[:k] = state.member_count_K
        self._dsum = torch.zeros(cap, state.width, dtype=torch.float64)
        self._dsum[:k] = state.direction_sum_KD
        self._source = state.source_row_K.tolist()
        self._k = k
        self.screen_flops = 0.0
        self.rechecked = 0

    # -- public ------------------------------------------------------------------------------
    def feed(self, u_ND: torch.Tensor, rows_N: torch.Tensor | None = None) -> int:
        """Consume rows of the stream (already unit directions); returns how many were used.

        ``rows_N`` names each row's place in the source dataset (default: its stream
        position). Rows are split at absolute batch boundaries; after each complete batch
        the stop rule is applied, and once stopped no more rows are taken.
        """
        if rows_N is None:
            rows_N = torch.arange(self.state.tokens, self.state.tokens + u_ND.shape[0])
        used = 0
        while used < u_ND.shape[0] and self.state.stop_reason is None:
            room = self.batch_size - self.state.tokens % self.batch_size
            chunk = u_ND[used : used + room].to(self.device, torch.float32)
            self.state.new_in_open_batch += self._add(chunk, rows_N[used : used + room])
            self.state.tokens += chunk.shape[0]
            used += chunk.shape[0]
            if self.state.tokens % self.batch_size == 0:
                self._close_batch()
        return used

    def finish(self, reason: str) -> LeaderState:
        """End of stream or budget: close a partial batch only at the true end of the stream."""
        if self.state.stop_reason is None:
            if reason == "end_of_stream" and self.state.tokens % self.batch_size:
                self._close_batch()
            self.state.stop_reason = self.state.stop_reason or reason
        return self.snapshot()

    def snapshot(self) -> LeaderState:
        k = self._k
        s = self.state
        s.exemplars_KD = self._E[:k].cpu().clone()
        s.source_row_K = torch.tensor(self._source, dtype=torch.long)
        s.member_count_K = self._count[:k].cpu().clone()
        s.direction_sum_KD = self._dsum[:k].cpu().clone()
        return s

    # -- internals ---------------------------------------------------------------------------
    def _close_batch(self):
        s = self.state
        s.new_per_batch.append(s.new_in_open_batch)
        s.quiet_batches = s.quiet_batches + 1 if s.new_in_open_batch == 0 else 0
        s.new_in_open_batch = 0
        if s.quiet_batches >= self.window:
            s.stop_reason = "saturated"

    def screen(self, u_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Screened top two similarities of each row over the exemplars: (best_B, second_B
        float32, argbest_B int64).

        The product runs over ALIGN-padded blocks of the exemplar buffer in the screening
        dtype; the zero padding rows beyond the K exemplars are sliced off before the max.
        """
        B, k = u_BD.shape[0], self._k
        u = u_BD.to(self.dtype)
        result = None
        for start in range(0, k, self.block):
            stop = min(start + self.block, _round_up(k, ALIGN))
            sim_BC = u @ self._E_screen[start:stop].T
            block = top2(sim_BC[:, : min(stop, k) - start])
            result = block if result is None else merge_top2(result, block, start)
        self.screen_flops += 2.0 * B * k * u_BD.shape[1]
        best_B, second_B, arg_B = result
        return best_B.float(), second_B.float(), arg_B

    def _add(self, u_BD: torch.Tensor, rows_B: torch.Tensor) -> int:
        """One batch (or the rest of one): new exemplars in stream order, then every row's
        nearest exemplar at arrival, decided exactly (issue 20, item 2), into the statistics."""
        B, k = u_BD.shape[0], self._k
        best_B = torch.full((B,), -1, dtype=torch.long, device=self.device)
        best64_B = torch.full((B,), float("nan"), dtype=torch.float64, device=self.device)  # NaN: not computed
        best_sim_B = torch.full((B,), float("-inf"), device=self.device)
        candidates = torch.arange(B, device=self.device)
        if k:
            best_sim_B, second_B, best_B = self.screen(u_BD)
            sure, unsure = screen_decisions(best_sim_B, self.theta, self.margin)
            # Undecided membership, or an argmax the screen cannot tell apart: float64 decides.
            redo = (unsure | ambiguous(best_sim_B, second_B, self.margin)).nonzero().squeeze(1)
            if redo.numel():
                self.rechecked += redo.numel()
                best_B[redo], best64_B[redo] = exact_nearest(u_BD[redo], self._E[:k], self._E_screen[:k])
                sure[redo] = covered(best64_B[redo], self.theta)
            candidates = (~sure).nonzero().squeeze(1)
        new_rows = self._accept_in_order(u_BD, candidates)
        if new_rows.numel():
            self._append(u_BD[new_rows], rows_B[new_rows.cpu()].tolist())
            best_B = self._nearest_with_new(u_BD, new_rows, k, best_B, best_sim_B, best64_B)
        # Statistics on the host in float64, so every device sums in the same order.
        # index_put_ with accumulate: on CPU about 10x faster than index_add_ here.
        best_host = best_B.cpu()
        self._count.index_put_((best_host,), torch.ones_like(best_host), accumulate=True)
        self._dsum.index_put_((best_host,), u_BD.cpu().to(torch.float64), accumulate=True)
        return new_rows.numel()

    def _nearest_with_new(self, u_BD: torch.Tensor, new_rows: torch.Tensor, k: int, best_B: torch.Tensor,
                          best_sim_B: torch.Tensor, best64_B: torch.Tensor) -> torch.Tensor:
        """Nearest at arrival once this batch's new exemplars (ids k, k + 1, ...) exist: a row
        sees those at or before it in the stream. ``best_B``/``best_sim_B``/``best64_B``: the
        nearest old exemplar, its screened and (where known, else NaN) float64 similarity."""
        B, n, m = u_BD.shape[0], new_rows.numel(), self.margin
        E_new, screen_new = self._E[k : k + n], self._E_screen[k : k + n]
        available_BN = torch.arange(B, device=self.device)[:, None] >= new_rows[None, :]
        sim_BN = (u_BD.to(self.dtype) @ screen_new.T).float().masked_fill_(~available_BN, float("-inf"))
        new_sim_B, second_B, new_B = top2(sim_BN)
        new64_B = torch.full_like(best64_B, float("nan"))
        has_new = new_sim_B > float("-inf")
        redo = (has_new & ambiguous(new_sim_B, second_B, m)).nonzero().squeeze(1)
        if redo.numel():
            new_B[redo], new64_B[redo] = exact_nearest(u_BD[redo], E_new, screen_new, available_BN[redo])
        take = has_new & (new_sim_B > best_sim_B + 2 * m)
        close = (has_new & ~take & (new_sim_B >= best_sim_B - 2 * m)).nonzero().squeeze(1)
        if close.numel():  # old and new within the margin: float64, ties to the old (lower) id
            old64 = _fill_exact(best64_B[close], u_BD[close], self._E[best_B[close]])
            new64 = _fill_exact(new64_B[close], u_BD[close], E_new[new_B[close]])
            take[close] = new64 > old64
        return torch.where(take, new_B + k, best_B)

    def _covers(self, a_RD: torch.Tensor, b_CD: torch.Tensor, b_screen_CD: torch.Tensor) -> torch.Tensor:
        """(R, C) bool ``covered`` of every pair, exact: screened in ``b_screen_CD``'s dtype,
        pairs within that dtype's margin of the threshold re-checked in float64."""
        dtype = b_screen_CD.dtype
        sim_RC = a_RD.to(dtype) @ b_screen_CD.T
        sure, unsure = screen_decisions(sim_RC, self.theta, SCREEN_MARGIN[dtype])
        r, c = unsure.nonzero(as_tuple=True)
        if r.numel():
            sure[r, c] = covered(exact_similarity(a_RD[r], b_CD[c]), self.theta)
        return sure

    def _accept_in_order(self, u_BD: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Sequential rule among this batch's candidates (rows no old exemplar covers)."""
        C = candidates.numel()
        if C == 0:
            return candidates
        c = u_BD[candidates]
        # earlier_CC[i, j]: candidate j comes before i and covers it.
        # float32: many of a first batch's candidate pairs lie near theta (a bfloat16 screen
        # would send most rows to the float32 re-screen anyway); later batches have few.
        earlier_CC = self._covers(c, c, c).tril_(diagonal=-1)
        return candidates[first_independent(earlier_CC)]

    def _append(self, new_ND: torch.Tensor, source_rows: list[int]):
        k, n = self._k, new_ND.shape[0]
        if k + n > self._E.shape[0]:
            cap = _round_up(max(2 * self._E.shape[0], k + n), ALIGN)
            self._E = _grow(self._E, cap)
            self._count = _grow(self._count, cap)
            self._dsum = _grow(self._dsum, cap)
            self._E_screen = self._E if self.dtype == torch.float32 else _grow(self._E_screen, cap)
        self._E[k : k + n] = new_ND
        if self._E_screen is not self._E:
            self._E_screen[k : k + n] = new_ND.to(self.dtype)
        self._source += source_rows
        self._k = k + n


def first_independent(earlier_CC: torch.Tensor, max_rounds: int = 32, rounds: bool | None = None) -> torch.Tensor:
    """Indices the sequential rule accepts, given earlier_CC[i, j] = "j < i covers i".

    Candidate i is accepted iff no accepted j < i covers it (the lexicographically first
    maximal independent set). Rounds decide it in parallel on the device, one host sync
    per round: i is rejected once an accepted earlier candidate covers it, accepted once
    every earlier candidate covering it is rejected; the first undecided candidate is
    decided each round. Chains longer than ``max_rounds`` finish with a plain loop on the
    host (one copy). ``rounds``: use the rounds (default: off the CPU only).
    """
    C = earlier_CC.shape[0]
    accepted = torch.zeros(C, dtype=torch.bool, device=earlier_CC.device)
    rejected = torch.zeros_like(accepted)
    if rounds if rounds is not None else earlier_CC.device.type != "cpu":  # CPU: no round trips to save
        adj = earlier_CC.to(torch.float32)
        for _ in range(max_rounds):
            rejected |= _any_of(adj, accepted)
            accepted |= ~rejected & ~_any_of(adj, ~rejected)
            if bool((accepted | rejected).all()):
                return accepted.nonzero().squeeze(1)
    # The plain sequential loop over what is left: kill every later candidate an accepted
    # one covers (columns of earlier_CC).
    covers_later = earlier_CC.T.contiguous().cpu().numpy()
    acc = accepted.cpu().numpy().copy()
    alive = ~(acc | rejected.cpu().numpy())
    for j in acc.nonzero()[0]:
        alive &= ~covers_later[j]
    for i in range(C):
        if alive[i]:
            acc[i] = True
            alive &= ~covers_later[i]
    return torch.from_numpy(acc).nonzero().squeeze(1).to(earlier_CC.device)


def _any_of(adj_CC: torch.Tensor, mask_C: torch.Tensor) -> torch.Tensor:
    """out[i] = any_j adj[i, j] and mask[j] (adj as 0/1 floats: one matrix-vector product)."""
    return (adj_CC @ mask_C.to(adj_CC.dtype)) > 0


def _fill_exact(sim64_R: torch.Tensor, u_RD: torch.Tensor, e_RD: torch.Tensor) -> torch.Tensor:
    """``sim64_R`` with its NaN (not yet computed) entries replaced by the exact u.e."""
    missing = sim64_R.isnan()
    if bool(missing.any()):
        sim64_R = sim64_R.clone()
        sim64_R[missing] = exact_similarity(u_RD[missing], e_RD[missing])
    return sim64_R


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
