"""Arrow <-> numpy/torch conversion of vector columns, and exact batch sizes over any fragment layout.

Vectors are stored as ``fixed_size_list<float16|float32|float64>[d]``; a null vector (a missing
row) reads as a NaN row. ``rebatch`` hands out exactly the batch sizes a caller asks for,
whatever the fragment layout (Lance scanners cut batches at fragment boundaries), so no result
depends on how a dataset was written (issue 8, A).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ep_store.errors import UsageError


def vectors_to_arrow(x_ND: np.ndarray, dtype=np.float32) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<dtype>[D] (float32 by default: float16 cannot hold
    every model's range, issue 8 item 8; callers that choose float16 check the range first)."""
    x_ND = np.ascontiguousarray(x_ND, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(x_ND.reshape(-1)), x_ND.shape[1])


def _stored_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, D) numpy view of a fixed_size_list[D] column in its stored dtype. A null vector
    (a missing row) becomes a NaN row, so it counts as non-finite and keeps its place:
    Arrow's ``flatten`` drops null slots, which shifted every later row (QA)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if column.null_count == 0:
        return flat
    rows = np.full((len(column), width), np.nan, dtype=flat.dtype)
    rows[column.is_valid().to_numpy(zero_copy_only=False)] = flat
    return rows


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """Arrow fixed_size_list[D] -> (N, D) numpy array of ``dtype`` (null vectors: NaN rows)."""
    return _stored_rows(column).astype(dtype)  # a writable copy torch can wrap


def arrow_to_tensor(column: pa.Array | pa.ChunkedArray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Arrow fixed_size_list[D] -> a new (N, D) torch tensor of ``dtype``, converted by torch
    straight from the stored values (issue 12: for float16 about twice numpy's cast);
    null vectors are NaN rows."""
    rows = _stored_rows(column)
    with warnings.catch_warnings():  # read only, and copied below: Arrow's buffers stay untouched
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        stored = torch.from_numpy(rows)
    return stored.to(dtype, copy=True)


def finite_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) bool: rows of a fixed_size_list[D] vector column with no NaN or inf (a null
    vector is not finite), read in the stored dtype (no float32 copy). float16 tests the
    exponent bits: all ones is inf or NaN."""
    rows = _stored_rows(column)
    if rows.dtype == np.float16:
        return ((rows.view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)
    return np.isfinite(rows).all(axis=1)


def rebatch(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Exactly ``batch_rows`` rows per batch (the last may be shorter), rows in order.

    Lance cuts scanner batches at fragment boundaries (harvest writes one fragment per
    commit), so anything that groups rows (calibration, build, assign, statistics) reads
    through this to see the sizes it asks for (issue 8, A1).
    """
    if batch_rows < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_rows}")
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch_rows - count, batch.num_rows)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == batch_rows:
                yield _concat(held)
                held, count = [], 0
    if count:
        yield _concat(held)


def _concat(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def filter_rows(batches, keep, row_index: bool, row: int) -> Iterator[pa.RecordBatch]:
    """Batches with ``_row`` (each row's position, from ``row``) added and rows ``keep`` rejects dropped."""
    for batch in batches:
        n = batch.num_rows
        if row_index:
            batch = batch.append_column("_row", pa.array(np.arange(row, row + n, dtype=np.int64)))
        row += n
        if keep is not None:
            mask = np.asarray(keep(batch), dtype=bool)
            if not mask.all():  # a filter copies every column, even when it keeps every row
                batch = batch.filter(pa.array(mask))
        yield batch


def check_vector_column(schema: pa.Schema, path: Path) -> None:
    """Refuse (UsageError) a dataset whose ``vector`` column is not a fixed-size list of
    floats: every reader decodes vectors as fixed_size_list<float16|float32|float64>[d]."""
    if "vector" not in schema.names:
        return
    kind = schema.field("vector").type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise UsageError(f"{path}: column 'vector' is {kind}, not a fixed-size list of floats; write vectors as "
                         "fixed_size_list<halffloat|float>[d], as ep harvest does")

