"""Vector search indexes (issue 14) and row lookups for ``ep search``.

An index is a Lance dataset of its own, inside the store:
    indexes/<model>/<checkpoint>/L<layer>/p<percentile>.lance
        row (position in the activation dataset), doc_id, pos, region_id, u fixed_size_list<float16>[d]
with a vector index on ``u`` (the centered unit directions of the dictionary's geometry) and
schema metadata recording what it was built from, so a reader can tell when it is stale.

The vector index is built and queried through LanceDB (issue 21, item 3): the index folder's
parent is a LanceDB database (``lancedb.connect``) and the dataset its table ``p<percentile>``;
``create_index`` with LanceDB's index configs (IvfPq, IvfSq, IvfFlat, HnswSq) and its query
builder (distance type, nprobes, refine factor, prefilter). The exact float64 re-ranking of
the candidates stays in ep_store.analysis.search.
Saved search results live in ``searches/<name>.lance`` (``search_path``), exposed to SQL as ``searches``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import lance
import numpy as np
import pyarrow as pa

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey, check_inside, to_segment
from ep_store.store.layout import (
    BUILDING,
    INDEXES_DIR,
    LANCE,
    META_KEY,
    SEARCHES_DIR,
    STORAGE_VERSION,
)

if TYPE_CHECKING:
    from ep_store.store.core import Store

INDEX_COLUMN = "u"


def index_path(store: Store, key: DictionaryKey) -> Path:
    """Where the search index of dictionary ``key`` lives (it need not exist)."""
    rel = key.relpath()
    return check_inside(store.root, store.root / INDEXES_DIR / rel.parent / f"{rel.name}{LANCE}")


def searches_dir(store: Store) -> Path:
    """Folder of saved search results (one Lance dataset per name), exposed to SQL as ``searches``."""
    return check_inside(store.root, store.root / SEARCHES_DIR)


def write_index(store: Store, path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], meta: dict,
                index_type: str, params: dict, metric: str = "L2") -> int:
    """Write the index table as one commit, then add the Lance vector index on ``u``.

    The table is written to a sibling temp folder and renamed into place only once the vector
    index exists, so a reader never sees a half-built index and a failed build leaves the old one.
    ``index_type`` is a Lance vector index type (IVF_PQ, IVF_HNSW_SQ, ...); ``params`` go to
    ``LanceDataset.create_index`` (num_partitions, num_sub_vectors, m, ef_construction, ...);
    ``metric`` is Lance's distance (L2, cosine, dot).
    Returns the Lance version of the finished index dataset.
    """
    check_inside(store.root, path)
    tmp = path.with_name(path.name.removesuffix(LANCE) + BUILDING + LANCE)  # a LanceDB table name of its own
    store.remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    schema = schema.with_metadata({META_KEY: jsonio.dumps(meta, sort_keys=True).encode()})
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    ds = lance.write_dataset(reader, str(tmp), schema=schema, mode="create", data_storage_version=STORAGE_VERSION)
    if ds.count_rows() == 0:
        store.remove(tmp)
        raise UsageError(f"no finite activation rows to index for {path.stem}")
    table = lancedb_table(tmp)
    table.create_index(INDEX_COLUMN, config=_index_config(index_type, metric, params), replace=True)
    version = table.version
    old = path.with_name(path.name + ".old")
    store.remove(old)
    if path.exists():
        path.replace(old)
    tmp.replace(path)
    store.remove(old)
    return version


def lancedb_table(path: Path):
    """The Lance dataset folder ``path`` (``<name>.lance``) as a LanceDB table: its parent
    folder is the database, the folder's stem the table name."""
    import lancedb

    return lancedb.connect(str(path.parent)).open_table(path.name.removesuffix(LANCE))


def _index_config(index_type: str, metric: str, params: dict):
    """LanceDB's index config for one of ``analysis.search_index.INDEX_TYPES``."""
    from lancedb import index

    kinds = {"IVF_PQ": index.IvfPq, "IVF_SQ": index.IvfSq, "IVF_FLAT": index.IvfFlat, "IVF_HNSW_SQ": index.HnswSq}
    try:
        return kinds[index_type](distance_type=metric.lower(), **params)
    except TypeError as err:  # an --index-param this index type does not take
        raise UsageError(f"{index_type} does not take the parameters {sorted(params)}: {err}") from None


def index_meta(path: Path) -> dict:
    """The build record of an index dataset (what it indexes, which versions, parameters)."""
    ds = lance.dataset(str(path))
    meta = json.loads((ds.schema.metadata or {}).get(META_KEY, b"{}"))
    meta["lance_version"] = ds.version
    described = [d for d in ds.describe_indices() if INDEX_COLUMN in d.field_names]
    meta["indexed_rows"] = sum(d.num_rows_indexed for d in described)
    meta["index_bytes"] = sum(d.total_size_bytes or 0 for d in described)
    meta["table_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return meta


def index_candidates(path: Path, q_D: np.ndarray, k: int, nprobes: int, refine_factor: int | None,
                     exclude_region: int | None = None) -> np.ndarray:
    """Activation rows of the ``k`` approximate nearest ``u`` to ``q_D`` (the index's metric), best first.

    ``exclude_region`` drops rows of that region before the search (a prefilter on
    ``region_id``). LanceDB's query builder over the vector index, in the index's metric.
    """
    table = lancedb_table(path)
    metric = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}")).get("metric", "L2").lower()
    query = (table.search(np.asarray(q_D, dtype=np.float32), vector_column_name=INDEX_COLUMN)
             .distance_type(metric).nprobes(int(nprobes)).select(["row"]).limit(int(k)))
    if refine_factor:
        query = query.refine_factor(int(refine_factor))
    if exclude_region is not None:
        query = query.where(f"region_id != {int(exclude_region)}", prefilter=True)
    return query.to_arrow().column("row").to_numpy()


def take_rows(path: Path, rows: np.ndarray | list[int], columns: list[str]) -> pa.Table:
    """Rows of a dataset by position, in the order given (``LanceDataset.take``)."""
    rows = [int(r) for r in rows]
    if not rows:
        return lance.dataset(str(path)).schema.empty_table().select(columns)
    return lance.dataset(str(path)).take(rows, columns=columns)


def find_token(path: Path, doc_id: int, pos: int, columns: list[str]) -> pa.Table:
    """The rows of an activation dataset at (doc_id, pos): zero or one row."""
    return lance.dataset(str(path)).to_table(columns=columns, filter=f"doc_id = {int(doc_id)} AND pos = {int(pos)}")


def search_path(store: Store, name: str) -> Path:
    """Where the saved search results ``name`` live (``ep search --save NAME``)."""
    return check_inside(store.root, searches_dir(store) / f"{to_segment(name)}{LANCE}")


def list_searches(store: Store) -> list[Path]:
    """Every saved search results dataset, sorted by path."""
    return [path for path in sorted(searches_dir(store).glob(f"*{LANCE}")) if store.exists(path)]
