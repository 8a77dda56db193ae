"""The paper's EP-vs-SAE binarisation and F1 overlaps, in plain numpy/torch (no IO).

Each feature (an SAE latent, or an EP region scored by its signed projection
``(x - c).e_k``) becomes the set of its top ``top_n`` tokens among those with activation
> 0, ties broken by (doc_id, pos); it is *eligible* with at least ``min_positives``
positive tokens (paper, EP vs SAE: top-100, >= 20 positives). Two sets S, T score
F1 = 2 |S & T| / (|S| + |T|). This module is the reference the SQL path
(``ep_store/sql/queries/sae_f1.sql``) is checked against.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment


class Sparse(NamedTuple):
    """Feature activations as rows (feature, doc_id, pos, value), the layout of the Lance tables."""

    feature: np.ndarray  # int
    doc_id: np.ndarray  # int64
    pos: np.ndarray  # int32
    value: np.ndarray  # float32


class Binarised(NamedTuple):
    """Eligible features, each with its token set as (doc_id, pos) rows."""

    feature: np.ndarray  # eligible feature id of each member row
    doc_id: np.ndarray
    pos: np.ndarray
    positives: dict[int, int]  # every feature with a positive token -> its positive count


def binarise(rows: Sparse, top_n: int = 100, min_positives: int = 20) -> Binarised:
    """Top ``top_n`` positive tokens of every feature with >= ``min_positives`` of them."""
    keep = rows.value > 0
    f, d, p, v = (a[keep] for a in rows)
    order = np.lexsort((p, d, -v.astype(np.float64), f))  # by feature, value desc, doc_id, pos
    f, d, p = f[order], d[order], p[order]
    features, starts, counts = np.unique(f, return_index=True, return_counts=True)
    rank = np.arange(len(f)) - np.repeat(starts, counts)
    eligible = np.repeat(counts >= min_positives, counts)
    take = eligible & (rank < top_n)
    return Binarised(f[take], d[take], p[take], {int(a): int(b) for a, b in zip(features, counts)})


class Overlaps(NamedTuple):
    a: np.ndarray  # feature of side A
    b: np.ndarray  # feature of side B
    overlap: np.ndarray  # shared tokens
    size_a: np.ndarray
    size_b: np.ndarray
    f1: np.ndarray


def overlaps(a: Binarised, b: Binarised) -> Overlaps:
    """Every pair of eligible features (one per side) sharing at least one token."""
    tokens = np.concatenate([a.doc_id, b.doc_id]).astype(np.int64), np.concatenate([a.pos, b.pos]).astype(np.int64)
    _, token_ix = np.unique(np.stack(tokens, 1), axis=0, return_inverse=True)
    token_ix = token_ix.reshape(-1)
    ta, tb = token_ix[: len(a.doc_id)], token_ix[len(a.doc_id):]
    n = int(token_ix.max()) + 1 if len(token_ix) else 0
    ida, fa = np.unique(a.feature, return_inverse=True)
    idb, fb = np.unique(b.feature, return_inverse=True)
    A = sparse.csr_matrix((np.ones(len(ta)), (fa.reshape(-1), ta)), shape=(len(ida), n))
    B = sparse.csr_matrix((np.ones(len(tb)), (fb.reshape(-1), tb)), shape=(len(idb), n))
    o = (A @ B.T).tocoo()
    size_a, size_b = np.asarray(A.sum(1)).ravel(), np.asarray(B.sum(1)).ravel()
    sa, sb = size_a[o.row], size_b[o.col]
    return Overlaps(ida[o.row], idb[o.col], o.data, sa, sb, 2 * o.data / (sa + sb))


def best_f1(features: np.ndarray, pair_features: np.ndarray, pair_f1: np.ndarray) -> np.ndarray:
    """Best F1 of each of ``features`` over its pairs (0 where it overlaps nothing)."""
    best = np.zeros(len(features))
    if len(pair_f1):
        ix = np.searchsorted(features, pair_features)
        np.maximum.at(best, ix, pair_f1)
    return best


def best_partner(features: np.ndarray, pair_features: np.ndarray, partners: np.ndarray,
                 pair_f1: np.ndarray) -> np.ndarray:
    """The partner achieving each feature's best F1 (-1 where none; lowest id on ties)."""
    out = np.full(len(features), -1, dtype=np.int64)
    if len(pair_f1):
        order = np.lexsort((partners, -pair_f1, pair_features))
        first = np.ones(len(order), dtype=bool)
        first[1:] = pair_features[order][1:] != pair_features[order][:-1]
        out[np.searchsorted(features, pair_features[order][first])] = partners[order][first]
    return out


def hungarian(ov: Overlaps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one assignment maximising total F1 (scipy), over features with any overlap.

    Features without overlap would only be matched at F1 0, so they are left out.
    Returns (feature A, feature B, F1) of the matched pairs with F1 > 0.
    """
    if not len(ov.f1):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    ida, ra = np.unique(ov.a, return_inverse=True)
    idb, rb = np.unique(ov.b, return_inverse=True)
    f1 = np.zeros((len(ida), len(idb)))
    f1[ra.reshape(-1), rb.reshape(-1)] = ov.f1
    rows, cols = linear_sum_assignment(f1, maximize=True)
    keep = f1[rows, cols] > 0
    return ida[rows[keep]], idb[cols[keep]], f1[rows[keep], cols[keep]]


class TopPositive:
    """Running top ``n`` values per column of dense (N, K) blocks streamed in order, plus counts of values > 0.

    Used for the EP side, whose projections ``(x - c) @ E.T`` are dense: only each region's
    ``n`` best positive tokens are ever kept (bounded memory), which is all the binarisation reads.
    """

    def __init__(self, columns: int, n: int):
        self.n = n
        self.value_nK = torch.full((0, columns), -torch.inf)
        self.row_nK = torch.zeros((0, columns), dtype=torch.long)
        self.positives_K = torch.zeros(columns, dtype=torch.long)

    def add(self, v_NK: torch.Tensor, first_row: int) -> None:
        v = v_NK.float().cpu()
        self.positives_K += (v > 0).sum(0)
        rows = torch.arange(first_row, first_row + v.shape[0])[:, None].expand_as(v)
        value = torch.cat([self.value_nK, v])
        row = torch.cat([self.row_nK, rows])
        top, ix = value.topk(min(self.n, value.shape[0]), dim=0)
        self.value_nK, self.row_nK = top, row.gather(0, ix)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(column, stream row, value) of every kept positive entry."""
        keep = self.value_nK > 0
        col = torch.arange(self.value_nK.shape[1])[None, :].expand_as(self.value_nK)
        return col[keep].numpy(), self.row_nK[keep].numpy(), self.value_nK[keep].numpy()
