"""Vector search indexes (issue 14) and row lookups for ``ep search``.

An index is a Lance dataset of its own, inside the store:
    indexes/<model>/<checkpoint>/L<layer>/p<percentile>.lance
        row (position in the activation dataset), doc_id, pos, region_id, u fixed_size_list<float16>[d]
with a Lance vector index on ``u`` (the centered unit directions of the dictionary's geometry) and
schema metadata recording what it was built from, so a reader can tell when it is stale.
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
from ep_store.store.layout import INDEXES_DIR, LANCE, META_KEY, SEARCHES_DIR

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
    tmp = path.with_name(path.name + ".tmp")
    store.remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    schema = schema.with_metadata({META_KEY: jsonio.dumps(meta, sort_keys=True).encode()})
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    ds = lance.write_dataset(reader, str(tmp), schema=schema, mode="create")
    if ds.count_rows() == 0:
        store.remove(tmp)
        raise UsageError(f"no finite activation rows to index for {path.stem}")
    ds = ds.create_index(INDEX_COLUMN, index_type, metric=metric, **params)
    version = ds.version
    old = path.with_name(path.name + ".old")
    store.remove(old)
    if path.exists():
        path.replace(old)
    tmp.replace(path)
    store.remove(old)
    return version


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

    ``exclude_region`` drops rows of that region before the search (Lance prefilter on
    ``region_id``). Uses ``LanceDataset.to_table(nearest=...)`` with the vector index.
    """
    ds = lance.dataset(str(path))
    nearest = {"column": INDEX_COLUMN, "q": np.asarray(q_D, dtype=np.float32), "k": int(k),
               "minimum_nprobes": int(nprobes), "maximum_nprobes": int(nprobes), "use_index": True}
    if refine_factor:
        nearest["refine_factor"] = int(refine_factor)
    table = ds.to_table(columns=["row"], nearest=nearest, prefilter=exclude_region is not None,
                        filter=None if exclude_region is None else f"region_id != {int(exclude_region)}",
                        disable_scoring_autoprojection=True)
    return table.column("row").to_numpy()


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
