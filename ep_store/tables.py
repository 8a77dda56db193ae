"""Printing and saving query results (Arrow tables) for people and for other tools."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa

from ep_store import jsonio
from ep_store.errors import UsageError, check_output_file

MAX_CELL = 60


def _cell(value) -> str:
    text = "NULL" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def unique_columns(table: pa.Table) -> pa.Table:
    """``table`` with repeated column names renamed the way DuckDB does (issue 8, item 10).

    The second ``region_id`` becomes ``region_id_1``, a third ``region_id_2``; a candidate
    already used by an earlier column gets the next number (DuckDB: ``SELECT * FROM (SELECT
    1 AS a, 2 AS a)`` gives ``a, a_1``). Columns keep their order and values; a table
    without repeats is returned as it is.
    """
    names = table.column_names
    if len(set(names)) == len(names):
        return table
    used: set[str] = set()
    out = []
    for name in names:
        new, k = name, 0
        while new in used:
            k += 1
            new = f"{name}_{k}"
        used.add(new)
        out.append(new)
    return table.rename_columns(out)


def _rows(table: pa.Table) -> list[list]:
    """Rows as lists, column by column position (never by name, so no column is lost)."""
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return [list(row) for row in zip(*columns)] if columns else []


FORMATS = ("table", "csv", "json")  # what render prints (ep sql/stats/search --format)


def render(table: pa.Table, fmt: str) -> str:
    """The whole result as text: ``table`` (aligned), ``csv`` (header + rows, RFC 4180 quoting)
    or ``json`` (one strict-JSON object per line, NaN/inf as null). Nothing else is printed."""
    table = unique_columns(table)
    names, rows = table.column_names, _rows(table)
    if fmt == "json":
        return "\n".join(jsonio.dumps(dict(zip(names, r))) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([[jsonio.dumps(v) if isinstance(v, (list, dict)) else v for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "table":
        cells = [[_cell(v) for v in r] for r in rows]
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
    check_output_file(path, "--output")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = unique_columns(table)
    tmp = path.with_name(f".{path.name}.tmp")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
    else:
        text = render(table, "csv" if suffix == ".csv" else "json")
        tmp.write_text(text + "\n" if text else "", encoding="utf-8")
    tmp.replace(path)
