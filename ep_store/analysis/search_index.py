"""Search indexes (issue 14): ``ep index build``, a Lance vector index over the centered unit
directions of a dictionary's activations, and the state that tells a search whether it is fresh.

    ep index build --dictionary gemma-3-270m/base/L6/p1 --store data/store

The index records the activation dataset's version and row count, the dictionary's center and
the exemplars/assignments versions it saw (``index_state``); a search (ep_store.analysis.search)
refuses a stale index (exit 2) and ``ep index build`` rebuilds it. The Lance IO is
ep_store.store.index.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import pyarrow as pa
import torch

import ep_store
from ep_store.errors import INT32_MAX, UsageError, check_range
from ep_store.kernels.calibrate import unit_directions
from ep_store.keys import DictionaryKey
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, arrow_to_tensor, vectors_to_arrow
from ep_store.store import index as st

log = logging.getLogger(__name__)

SCAN_ROWS = 32768  # activation rows per read in the exact scan and the index build
INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ", "IVF_SQ", "IVF_FLAT")
MAX_REFINE = 1_000  # refine_factor * k stays a 32-bit count for Lance
# Lance metric of the index. The indexed u and the queries are unit vectors, so |u - q|^2 = 2 - 2 u.q
# ranks exactly like the cosine; L2 also matches the Euclidean k-means that trains the IVF cells,
# and gave recall@20 0.82 against 0.75 for "dot" on the same synthetic index (IVF_SQ, 4 of 24 probes).
INDEX_METRIC = "L2"
INDEX_SCHEMA_FIELDS = [("row", pa.int64()), ("doc_id", pa.int64()), ("pos", pa.int32()), ("region_id", pa.int32())]


@dataclass
class IndexConfig:
    """One ``ep index build``: a Lance vector index over a dictionary's centered unit directions."""

    dictionary: str
    """Dictionary key whose activations (and center) are indexed."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    index_type: str = "IVF_SQ"
    """Lance vector index type (see index_params for why IVF_SQ is the default on CPUs)."""
    num_partitions: int | None = None
    """IVF partitions (None: rows / 4096, within 1..1024)."""
    num_sub_vectors: int | None = None
    """PQ sub-vectors (None: width / 16, i.e. 16 dimensions per 8-bit code)."""
    nprobes: int | None = None
    """Default partitions probed per query, stored with the index (None: partitions / 8, at least 4)."""
    refine_factor: int = 4
    """Lance re-reads refine_factor * k stored vectors to re-rank quantised distances (PQ/SQ only)."""
    sample_rate: int = 64
    """Training rows per IVF partition / PQ centroid (Lance's default is 256; 64 trains 4x faster
    and the exact re-ranking absorbs the coarser codebooks)."""
    overwrite: bool = False
    """Rebuild even when the index is up to date."""
    extra: dict = field(default_factory=dict)
    """Further create_index parameters (e.g. m, ef_construction for IVF_HNSW_*)."""

    def __post_init__(self):
        if self.index_type not in INDEX_TYPES:
            raise UsageError(f"unknown index type {self.index_type!r}; use one of {', '.join(INDEX_TYPES)}")
        for name, option in (("num_partitions", "--partitions"), ("num_sub_vectors", "--sub-vectors"),
                             ("nprobes", "--nprobes"), ("sample_rate", "--sample-rate")):
            check_range(getattr(self, name), option, 1, INT32_MAX)  # Lance's 32-bit parameters (issue 18, C7)
        check_range(self.refine_factor, "--refine-factor", 0, MAX_REFINE)

    @property
    def key(self) -> DictionaryKey:
        return DictionaryKey.parse(self.dictionary)


def center_sha(center_D) -> str:
    """Fingerprint of a dictionary's center (float32 bytes): an index is only valid for this one."""
    return hashlib.sha256(np.asarray(center_D, np.float32).tobytes()).hexdigest()[:16]


# -- assignments, index freshness -----------------------------------------------------------------
def load_regions(store: Store, d: Dictionary, rows: int, version: int) -> tuple[np.ndarray | None, str]:
    """Region of every activation row from the assignments written from ``d``'s exemplars
    (its snapshot's, issue 18 A1: never another build's), or (None, why not)."""
    snap = d.snapshot
    if snap.assignments_version is None:
        return None, snap.assignments_missing
    path, at = snap.assignments_path, snap.assignments_version
    table = store.read_table(path, columns=["region_id"], version=at)
    if table.num_rows != rows or store.dataset_meta(path, at).get("activations_version", version) != version:
        return None, f"the assignments of {d.key} are stale (activations changed); run: ep assign --dictionary {d.key}"
    return table.column("region_id").to_numpy(), ""


def index_state(store: Store, d: Dictionary) -> dict:
    """What an index of ``d`` must record to be fresh (compared key by key with its metadata)."""
    source = store.activation_path(d.key.activations)
    info = store.info(source)
    return {
        "dictionary": str(d.key), "activations": str(d.key.activations),
        "activations_version": info.version, "activations_rows": info.rows, "width": info.width,
        "center_sha256": center_sha(d.center), "exemplars_version": d.meta.get("exemplars_version"),
        "assignments_version": d.snapshot.assignments_version,
    }


def stale_reasons(recorded: dict, current: dict) -> list[str]:
    """Why an index built with ``recorded`` state no longer matches ``current`` (empty: fresh)."""
    return [f"{name} {recorded.get(name)} -> {value}" for name, value in current.items()
            if recorded.get(name) != value]


# -- index build ----------------------------------------------------------------------------------
def index_params(cfg: IndexConfig, rows: int, width: int) -> tuple[dict, int]:
    """(create_index parameters, default nprobes) for ``rows`` vectors of ``width``.

    Measured on the shared 2-core CPU (pipelines/bench/bench_search.py, real Gemma 3 270M L6):
    - type: IVF_SQ (8-bit scalar codes, width bytes per row) is the default: it trained 7x
      faster than IVF_PQ on the same 20k real rows (7 s vs 53 s; 13 s vs 70 s on 100k synthetic)
      at the same recall, because every candidate is re-ranked exactly anyway; IVF_HNSW_SQ did
      not finish 100k rows in 200 s. IVF_PQ stays available (10x smaller index, cheaper probes
      on very large tables where its build time is paid once).
    - IVF: rows / 4096 partitions (244 at 1M rows), so a probe reads ~4k codes; k-means cost
      grows with partitions squared (Lance samples ``sample_rate`` rows per partition), which
      keeps a 1M-row build in minutes on 2 cores. Probing 1/8 of the partitions (>= 4).
    - PQ: width / 16 sub-vectors of 8 bits (640 -> 40, 576 -> 36 bytes per row, 1/32 of the
      float16 row): 16-dimensional sub-spaces keep Lance's SIMD path (a multiple of 8) and the
      error small enough that refine_factor plus the exact re-ranking recover the true order.
    - HNSW (IVF_HNSW_SQ): m = 20 edges, ef_construction = 150 (Lance's defaults, ~1M rows).
    """
    partitions = cfg.num_partitions or max(1, min(1024, rows // 4096))
    partitions = min(partitions, rows)
    params: dict = {"num_partitions": partitions, "sample_rate": cfg.sample_rate, **cfg.extra}
    if cfg.index_type == "IVF_PQ":
        sub = cfg.num_sub_vectors or max(1, width // 16)
        if width % sub:
            raise UsageError(f"--num-sub-vectors {sub} must divide the width {width}")
        if rows < 256:
            raise UsageError(f"IVF_PQ needs at least 256 rows to train its codebooks; {rows} given: use --index-type IVF_FLAT")
        params["num_sub_vectors"] = sub
    elif cfg.index_type == "IVF_HNSW_SQ":
        params.setdefault("m", 20)
        params.setdefault("ef_construction", 150)
    nprobes = cfg.nprobes or max(4, math.ceil(partitions / 8))
    return params, min(nprobes, partitions)


def _index_batches(store: Store, d: Dictionary, regions: np.ndarray | None) -> Iterator[pa.RecordBatch]:
    source = store.activation_path(d.key.activations)
    row = 0
    for batch in store.scan(source, columns=["doc_id", "pos", "vector"], batch_size=SCAN_ROWS):
        x = arrow_to_tensor(batch.column("vector"))
        rows = np.arange(row, row + x.shape[0])
        row += x.shape[0]
        u = unit_directions(x, d.center)
        finite = torch.isfinite(u).all(dim=1).numpy()  # non-finite activations are not indexed
        n = int(finite.sum())
        region = pa.array(regions[rows][finite], pa.int32()) if regions is not None else pa.nulls(n, pa.int32())
        keep = pa.array(finite)
        yield pa.record_batch([
            pa.array(rows[finite], pa.int64()), batch.column("doc_id").filter(keep), batch.column("pos").filter(keep),
            region, vectors_to_arrow(u[torch.from_numpy(finite)].numpy(), np.float16),
        ], schema=_index_schema(d.width))


def _index_schema(width: int) -> pa.Schema:
    return pa.schema(INDEX_SCHEMA_FIELDS + [(st.INDEX_COLUMN, pa.list_(pa.float16(), width))])


def build_index(cfg: IndexConfig, store: Store) -> dict:
    """Index the centered unit directions of ``cfg.dictionary``'s activations; returns the summary.

    Skips the work when an index with the same build state exists (unless ``overwrite``).
    Raises UsageError for an unknown dictionary or missing activations.
    """
    d = Dictionary.load(store, cfg.key)
    store.require_activations(d.key.activations)
    state = index_state(store, d)
    path = st.index_path(store, d.key)
    params, nprobes = index_params(cfg, state["activations_rows"], state["width"])
    wanted = {"index_type": cfg.index_type, "metric": INDEX_METRIC, "params": params, "nprobes": nprobes,
              "refine_factor": cfg.refine_factor}
    if store.exists(path) and not cfg.overwrite:
        old = st.index_meta(path)
        if not stale_reasons(old, state) and all(old.get(k) == v for k, v in wanted.items()):
            return {"dictionary": str(d.key), "index": str(path), "status": "up to date",
                    "rows": old["indexed_rows"], "version": old["lance_version"]}
    regions, why = load_regions(store, d, state["activations_rows"], state["activations_version"])
    if regions is None:
        log.warning("%s; the index cannot serve --exclude-members until rebuilt after assigning", why)
    start = time.perf_counter()
    meta = {**state, **wanted, "regions_indexed": regions is not None, "ep_store_version": ep_store.__version__}
    version = st.write_index(store, path, _index_schema(d.width), _index_batches(store, d, regions), meta,
                             cfg.index_type, params, INDEX_METRIC)
    seconds = time.perf_counter() - start
    built = st.index_meta(path)
    return {"dictionary": str(d.key), "index": str(path), "status": "built", "index_type": cfg.index_type,
            **params, "nprobes": nprobes, "rows": built["indexed_rows"], "seconds": round(seconds, 3),
            "index_bytes": built["index_bytes"], "table_bytes": built["table_bytes"], "version": version}
