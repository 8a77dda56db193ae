"""No example on both sides of a split (issue 18, A4).

Every evaluation split (probe train/test, concept train/test, OOD reference/held-out/OOD
sets, SAE training/held-out rows) must be disjoint by content whatever its input holds:
a user file with the same document twice must not put one copy in train and the other in
test. Splits therefore run over *distinct contents*: texts are compared by ``content_key``
(Unicode NFKC, case folded, runs of whitespace made one space, ends stripped), so copies
that differ only in case, spacing or Unicode form count as one text, and only the first
of each is kept (``first_by_content``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

_SPACE = re.compile(r"\s+")


def content_key(text: str) -> str:
    """What two texts must share to count as the same example: NFKC, casefold, one space per run."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def first_by_content(texts: Sequence[str]) -> np.ndarray:
    """Indices (int64, ascending) of the first text of each distinct content in ``texts``."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(texts):
        key = content_key(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def without_contents(texts: Iterable[str], taken: Iterable[str]) -> list[str]:
    """``texts`` without those whose content is in ``taken``, and each content once (first kept)."""
    seen = {content_key(t) for t in taken}
    out = []
    for text in texts:
        key = content_key(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


class HeldOutRows(NamedTuple):
    """Which rows of a stream's tail may be held out (``heldout_rows``)."""

    keep_M: np.ndarray
    """bool (M,), M = N - start: row ``start + i`` may be held out."""
    straddling: int
    """Tail rows dropped because their document also has rows before ``start``."""
    copies: int
    """Tail rows dropped because their document's content equals a training document's."""


def document_texts(doc_id_N: np.ndarray, pos_N: np.ndarray, token_N: Sequence[str]) -> dict[int, str]:
    """Each document's text: its stored ``token`` strings (document slices) joined in ``pos`` order."""
    parts: dict[int, list[tuple[int, str]]] = {}
    for d, p, t in zip(doc_id_N.tolist(), pos_N.tolist(), token_N):
        parts.setdefault(d, []).append((p, t))
    return {d: "".join(t for _, t in sorted(rows)) for d, rows in parts.items()}


def heldout_rows(doc_id_N: np.ndarray, pos_N: np.ndarray, token_N: Sequence[str], start: int) -> HeldOutRows:
    """Rows at or after ``start`` of a token stream that share no example with the rows before it.

    The rows before ``start`` are the training side (SAE training and the EP build of
    ``ep sae compare``; issue 18, A4). A tail row is kept only if its document has no row
    before ``start`` (a document straddling the boundary is dropped whole from the tail) and
    its document's text (``document_texts``) matches no training document's by
    ``content_key`` (copies of a training document are dropped). The stream's last document
    may have been cut by the token budget, so it is also dropped when its content is the
    start of a training document's. Copies within the tail stay: they are all on one side.
    """
    doc_id_N = np.asarray(doc_id_N)
    texts = document_texts(doc_id_N, np.asarray(pos_N), token_N)
    train_docs = set(np.unique(doc_id_N[:start]).tolist())
    taken = {content_key(texts[d]) for d in train_docs}
    tail = doc_id_N[start:]
    last = int(doc_id_N[-1]) if len(doc_id_N) else None
    keep_docs, straddling_docs = [], []
    for d in np.unique(tail).tolist():
        key = content_key(texts[d])
        if d in train_docs:
            straddling_docs.append(d)
        elif key not in taken and not (d == last and any(t.startswith(key) for t in taken)):
            keep_docs.append(d)
    keep = np.isin(tail, keep_docs)
    straddling = int(np.isin(tail, straddling_docs).sum())
    return HeldOutRows(keep, straddling, int((~keep).sum()) - straddling)
