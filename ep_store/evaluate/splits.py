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
