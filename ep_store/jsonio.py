"""Strict JSON for every file and line ep_store writes (issue 8, item 11).

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader
(browsers, ``jq``, DuckDB, Go, Rust) accepts. Every JSON that ep_store writes goes through
:func:`dumps` (or :func:`write`): non-finite floats become ``null``, numpy scalars and arrays
become plain numbers and lists, ``Decimal`` (DuckDB's HUGEINT sums) becomes int or float,
and the encoder runs with ``allow_nan=False``, so a non-finite value that slipped through
raises instead of writing invalid JSON.
"""

from __future__ import annotations

import json
import math
import os
from decimal import Decimal
from pathlib import Path

import numpy as np


def clean(value):
    """``value`` with every non-finite float replaced by None and numpy/Decimal made plain.

    Recurses into dicts, lists and tuples (tuples become lists); dict keys become strings, as
    JSON has them (numpy scalar keys by their value: ``np.int64(3)`` -> ``"3"``).
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_key(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        return clean(value.item())
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _key(key) -> str:
    if isinstance(key, str):
        return key
    return str(key.item() if isinstance(key, np.generic) else key)


def dumps(value, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of ``value`` (NaN/inf -> null; other objects via ``str``, e.g. paths)."""
    return json.dumps(clean(value), indent=indent, sort_keys=sort_keys, allow_nan=False,
                      default=_fallback)


def _fallback(value):
    cleaned = clean(value)
    return cleaned if cleaned is not value else str(value)


def write(path: str | Path, value, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``value`` as strict JSON (plus a newline) atomically: a temp file of this process,
    flushed to disk, then renamed over ``path``."""
    _write_atomically(Path(path), dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def write_lines(path: str | Path, rows) -> None:
    """Write ``rows`` as JSON Lines (one strict-JSON object per line), atomically as ``write``."""
    _write_atomically(Path(path), "".join(dumps(row) + "\n" for row in rows))


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into a temp file of this process (two writers of one path never share one),
    flushed to disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
