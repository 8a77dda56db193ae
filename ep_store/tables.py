"""Printing and saving query results (Arrow tables) for people and for other tools."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa

from ep_store.errors import UsageError

MAX_CELL = 60


def _cell(value) -> str:
    text = "NULL" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _plain(value):
    """Decimals (DuckDB's HUGEINT sums) become ints or floats so JSON stays numeric."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def render(table: pa.Table, fmt: str) -> str:
    rows = [{k: _plain(v) for k, v in r.items()} for r in table.to_pylist()]
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([[r[c] for c in table.column_names] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "table":
        cells = [[_cell(r[c]) for c in table.column_names] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(table.column_names)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(table.column_names, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)
    raise UsageError(f"unknown format {fmt!r}; use table, csv or json")


def save(table: pa.Table, path: Path) -> None:
    """Write a result to .parquet, .csv or .json (one object per line), by suffix."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".json", ".jsonl"):
        raise UsageError(f"--output {path}: use a .parquet, .csv or .json file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        path.write_text(render(table, "csv" if suffix == ".csv" else "json") + "\n")
