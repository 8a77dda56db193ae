"""Nearest-neighbour search over the store in EP's geometry (issue 14).

"Where else does the model think like this?" Every stored token of a dictionary's activation
dataset is compared with a query direction by the cosine of centered directions,

    u(a) = (a - c) / |a - c|        (c: the dictionary's center, DESIGN.md "EP, precisely")
    similarity(a, q) = u(a) . q     (q: a unit direction in the same geometry)

where the query is a region's exemplar (``--region``), a stored token (``--token DOC_ID:POS``)
or a token of new text run through the dictionary's model (``--text``, ``--position``).
``--exclude-members`` keeps only tokens assigned to other regions: the region's boundary.

    ep search --dictionary gemma-3-270m/base/L6/p1 --region 42 --k 20 --store data/store
    ep index build --dictionary gemma-3-270m/base/L6/p1 --store data/store

Two ways to find candidates, one way to rank them:
- exact scan: stream the activations, float32 similarities, keep the best ``k + EXACT_MARGIN``;
- index: a Lance vector index over the stored ``u`` (``ep index build``, ep_store.store.index
  "vector search indexes"), ``k * candidates`` approximate neighbours.
Either way the candidates' activations are read back and re-scored in float64
(``rescore``), so both paths give identical similarities for the same token and the indexed
answer differs from the exact one only by the items the index missed.

The index records the activation dataset's version and row count, the dictionary's center and
the exemplars/assignments versions it saw; a search refuses a stale index (exit 2) and
``ep index build`` rebuilds it (ep_store.analysis.search_index).

The similarity and ranking kernels are ep_store.kernels.scan (numpy/torch only); the Lance
reads are ep_store.store.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from ep_store.analysis.search_index import SCAN_ROWS, index_state, load_regions, stale_reasons
from ep_store.errors import INT32_MAX, INT64_MAX, UsageError, check_range
from ep_store.kernels.assign import nearest_exemplar
from ep_store.kernels.scan import order, rescore, scan_candidates, unit64
from ep_store.keys import DictionaryKey, to_segment
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, arrow_to_tensor, arrow_to_vectors
from ep_store.store import index as st

log = logging.getLogger(__name__)

EXACT_MARGIN = 64  # extra float32 candidates the exact scan re-scores in float64 (covers rounding ties)
INDEX_MODES = ("auto", "always", "never")
MAX_K = 10_000
MAX_CANDIDATES = 1_000  # k * candidates <= 10**7 approximate neighbours: past that an exact scan is cheaper
MAX_CONTEXT = 4_096  # tokens either side of a result: more than any context a harvest stores

RESULT_SCHEMA = pa.schema([
    ("rank", pa.int32()), ("doc_id", pa.int64()), ("pos", pa.int32()), ("token", pa.string()),
    ("similarity", pa.float64()), ("region_id", pa.int32()), ("context", pa.string()),
])


# -- configs ------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    """One ``ep search``: a query direction, how many neighbours, and how to find them."""

    dictionary: str
    """Dictionary key <model>/<checkpoint>/L<layer>/p<percentile>: its center defines the geometry."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    region: int | None = None
    """Query with this region's exemplar (0 <= region < regions)."""
    token: str | None = None
    """Query with a stored token, ``DOC_ID:POS`` of the dictionary's activation dataset."""
    text: str | None = None
    """Query with a token of this text, run through the dictionary's model at its layer."""
    position: int = -1
    """Token of ``text`` to use (Python indexing: -1 is the last token)."""
    k: int = 20
    """Neighbours to return."""
    exclude_members: bool = False
    """Only tokens outside the query's region (the region's boundary); needs assignments."""
    index: str = "auto"
    """auto: use the index when present (refuse a stale one); always: require it; never: exact scan."""
    nprobes: int | None = None
    """IVF partitions to probe (None: the value recorded with the index)."""
    candidates: int = 4
    """The index returns k * candidates approximate neighbours, all re-ranked exactly."""
    context: int = 8
    """Tokens of context either side of each result."""
    models_dir: Path = Path("data/models")
    """Where the dictionary's model lives (for --text)."""
    save: str | None = None
    """Also save the result in the store as searches/<save>.lance (SQL view ``searches``)."""

    def __post_init__(self):
        given = [name for name in ("region", "token", "text") if getattr(self, name) is not None]
        if len(given) != 1:
            raise UsageError("give exactly one query: --region N, --token DOC_ID:POS or --text TEXT")
        if not 1 <= self.k <= MAX_K:
            raise UsageError(f"--k must lie in 1..{MAX_K}, got {self.k}")
        # Lance takes k * candidates, nprobes as 32-bit integers; the context loop is per token (issue 18, C7)
        check_range(self.candidates, "--candidates", 1, MAX_CANDIDATES)
        check_range(self.context, "--context", 0, MAX_CONTEXT)
        if self.index not in INDEX_MODES:
            raise UsageError(f"unknown index mode {self.index!r}; use one of {', '.join(INDEX_MODES)}")
        check_range(self.nprobes, "--nprobes", 1, INT32_MAX)
        if self.token is not None:
            parse_token(self.token)
        if self.save is not None:
            to_segment(self.save)

    @property
    def key(self) -> DictionaryKey:
        return DictionaryKey.parse(self.dictionary)


# -- pure ranking -------------------------------------------------------------------------------
def parse_token(text: str) -> tuple[int, int]:
    """'DOC_ID:POS' -> (doc_id, pos)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--token {text!r} must look like DOC_ID:POS with non-negative integers, e.g. 12:40")
    doc_id, pos = int(m.group(1)), int(m.group(2))
    # doc_id is an int64 column, pos an int32 one: larger numbers fail inside Lance (issue 18, C7)
    check_range(doc_id, f"--token {text.strip()}: DOC_ID", 0, INT64_MAX)
    check_range(pos, f"--token {text.strip()}: POS", 0, INT32_MAX)
    return doc_id, pos


# -- the query ------------------------------------------------------------------------------------
class Query(NamedTuple):
    q_D: np.ndarray  # float64 unit direction in the dictionary's centered geometry
    label: str
    region: int  # the region the query lies in (for --exclude-members)


def make_query(cfg: SearchConfig, store: Store, d: Dictionary) -> Query:
    center = d.center.numpy()
    if cfg.region is not None:
        if not 0 <= cfg.region < len(d):
            raise UsageError(f"region {cfg.region} is out of range: {d.key} has regions 0..{len(d) - 1}")
        e = d.exemplars[cfg.region].numpy().astype(np.float64)
        return Query(e / np.linalg.norm(e), f"region {cfg.region}", cfg.region)
    if cfg.token is not None:
        doc_id, pos = parse_token(cfg.token)
        table = st.find_token(store.activation_path(d.key.activations), doc_id, pos, ["token", "vector"])
        if table.num_rows == 0:
            raise UsageError(f"no token {doc_id}:{pos} in {d.key.activations}; see: ep sql \"SELECT * FROM tokens\"")
        x, label = arrow_to_vectors(table.column("vector")), f"token {doc_id}:{pos} {table.column('token')[0].as_py()!r}"
    else:
        x, token = text_activation(cfg, store, d)
        label = f"text position {cfg.position} {token!r}"
    u = unit64(x, center)[0]
    if not np.all(np.isfinite(u)):
        raise UsageError(f"the query activation ({label}) is not finite; pick another token")
    region = int(nearest_exemplar(torch.from_numpy(u[None].astype(np.float32)), d.exemplars).region_N[0])
    return Query(u, label, region)


def text_activation(cfg: SearchConfig, store: Store, d: Dictionary) -> tuple[np.ndarray, str]:
    """(x_1D, token text): the dictionary's model run on ``cfg.text`` through harvest's code path.

    Contexts of the dataset's ``ctx`` (ep_store.stages.corpus.iter_contexts), its BOS prefix, compute
    and storage dtypes, and the harvest's own BatchRunner (ep_store.stages.capture: hook, storage
    rounding), so the text of a stored document gives exactly its stored rows.
    """
    from ep_store.stages import models
    from ep_store.stages.capture import BatchRunner
    from ep_store.stages.corpus import Document, iter_contexts
    from ep_store.stages.plan import HarvestConfig

    meta = Store.info(store.activation_path(d.key.activations)).meta
    key = d.key
    hcfg = HarvestConfig(key.model, key.checkpoint, (key.layer,), hook=key.hook, ctx=int(meta.get("ctx", 128)),
                         device="cpu", dtype=meta.get("dtype", "float32"),
                         storage_dtype=meta.get("storage_dtype", "float32"), bos=meta.get("bos", "auto"))
    tokenizer = models.load_tokenizer(key.model, key.checkpoint, cfg.models_dir)
    contexts = list(iter_contexts([Document(0, "query", cfg.text)], tokenizer, hcfg.ctx))
    n = sum(len(c.token_ids) for c in contexts)
    if n == 0:
        raise UsageError("--text tokenizes to nothing; pass text with at least one token")
    if not -n <= cfg.position < n:
        raise UsageError(f"--position {cfg.position} is out of range: the text has {n} tokens (-{n}..{n - 1})")
    index = cfg.position % n
    context = contexts[index // hcfg.ctx]
    prefix = meta["prefix_ids"] if "prefix_ids" in meta else hcfg.prefix_ids(tokenizer)
    runner = BatchRunner(hcfg, cfg.models_dir, prefix)
    try:
        table = runner.tables([context], [key.layer])[key.layer]
    finally:
        runner.close()
    row = table.slice(index % hcfg.ctx, 1)
    return arrow_to_vectors(row.column("vector")), row.column("token")[0].as_py()


# -- search -------------------------------------------------------------------------------------
def _scan_batches(store: Store, path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    row = 0
    for batch in store.scan(path, columns=["vector"], batch_size=SCAN_ROWS):
        x = arrow_to_tensor(batch.column("vector"))
        yield np.arange(row, row + x.shape[0]), x
        row += x.shape[0]


def choose_index(cfg: SearchConfig, store: Store, d: Dictionary) -> dict | None:
    """The fresh index's metadata, None for an exact scan; refuses a stale or missing-but-required one."""
    path = st.index_path(store, d.key)
    if cfg.index == "never":
        return None
    if not store.exists(path):
        if cfg.index == "always":
            raise UsageError(f"{d.key} has no search index; run: ep index build --dictionary {d.key}")
        return None
    meta = st.index_meta(path)
    reasons = stale_reasons(meta, index_state(store, d))
    if reasons:
        raise UsageError(f"the search index of {d.key} is stale ({'; '.join(reasons)}); rebuild it with "
                         f"ep index build --dictionary {d.key}, or pass --index never for an exact scan")
    if cfg.exclude_members and not meta.get("regions_indexed"):
        raise UsageError(f"the search index of {d.key} was built without assignments; run ep assign and "
                         "ep index build again, or pass --index never")
    return meta


def search(cfg: SearchConfig, store: Store) -> tuple[pa.Table, dict]:
    """(result table, summary): the ``cfg.k`` stored tokens most similar to the query.

    Result columns (RESULT_SCHEMA): rank, doc_id, pos, token, similarity (float64 cosine of
    centered directions), region_id, context. Raises UsageError for bad input (unknown
    dictionary, region out of range, unknown token, empty text, stale index).
    """
    d = Dictionary.load(store, cfg.key)
    source = store.require_activations(d.key.activations)
    info = store.info(source)
    index_meta = choose_index(cfg, store, d)  # before the (maybe slow) query: a stale index fails fast
    query = make_query(cfg, store, d)
    regions = None
    if cfg.exclude_members:
        regions, why = load_regions(store, d, info.rows, info.version)
        if regions is None:
            raise UsageError(f"--exclude-members needs region assignments: {why}")
    exclude = query.region if cfg.exclude_members else None
    start = time.perf_counter()
    if index_meta is None:
        rows = scan_candidates(_scan_batches(store, source), d.center, query.q_D, cfg.k + EXACT_MARGIN,
                               regions, exclude)
        method = "exact"
    else:
        nprobes = cfg.nprobes or index_meta["nprobes"]
        if cfg.exclude_members and cfg.nprobes is None:
            # A region's nearest non-members lie across its boundary, mostly in other IVF cells.
            nprobes = min(2 * nprobes, index_meta["params"]["num_partitions"])
        refine = index_meta["refine_factor"] if index_meta["index_type"] != "IVF_FLAT" else None
        rows = st.index_candidates(st.index_path(store, d.key), query.q_D, cfg.k * cfg.candidates, nprobes,
                                   refine, exclude)
        method = f"index {index_meta['index_type']} nprobes={nprobes}"
    table = finish(store, source, d, query, rows, cfg, regions)
    seconds = time.perf_counter() - start
    summary = {"dictionary": str(d.key), "query": query.label, "query_region": query.region, "method": method,
               "candidates": int(len(rows)), "rows": table.num_rows, "seconds": round(seconds, 4)}
    if cfg.save is not None:
        summary["saved"] = save_result(store, cfg, d.key, query, table)
    return table, summary


def finish(store: Store, source: Path, d: Dictionary, query: Query, rows: np.ndarray, cfg: SearchConfig,
           regions: np.ndarray | None) -> pa.Table:
    """Re-score candidate rows exactly (float64), keep the best k, add region ids and contexts."""
    rows = np.unique(np.asarray(rows, np.int64))
    got = st.take_rows(source, rows, ["doc_id", "pos", "token", "vector"])
    sim = rescore(arrow_to_vectors(got.column("vector")), d.center.numpy(), query.q_D)
    if cfg.exclude_members:
        sim[regions[rows] == query.region] = np.nan
    best = order(rows, sim)[: cfg.k]
    rows, sim, got = rows[best], sim[best], got.take(pa.array(best, pa.int64()))
    if regions is not None:
        region = regions[rows]
    else:
        x = arrow_to_tensor(got.column("vector"))
        region = nearest_exemplar(d.unit(x), d.exemplars).region_N.numpy() if len(rows) else np.zeros(0)
    return pa.table({
        "rank": pa.array(np.arange(1, len(rows) + 1), pa.int32()),
        "doc_id": got.column("doc_id"), "pos": got.column("pos"), "token": got.column("token"),
        "similarity": pa.array(sim, pa.float64()), "region_id": pa.array(region, pa.int32()),
        "context": pa.array(contexts(store, source, rows, cfg.context), pa.string()),
    }, schema=RESULT_SCHEMA)


def contexts(store: Store, source: Path, rows: np.ndarray, width: int) -> list[str]:
    """'left«token»right' around each row: stored neighbours of the same document, +-width tokens."""
    if len(rows) == 0:
        return []
    total = store.info(source).rows
    near = sorted({r for row in rows for r in range(max(0, row - width), min(total, row + width + 1))})
    table = st.take_rows(source, near, ["doc_id", "pos", "token"])
    by_row = dict(zip(near, zip(table.column("doc_id").to_pylist(), table.column("pos").to_pylist(),
                                table.column("token").to_pylist())))
    out = []
    for row in rows:
        doc, pos, token = by_row[int(row)]
        left = "".join(by_row[r][2] for r in range(row - width, row)
                       if r in by_row and by_row[r][0] == doc and pos - width <= by_row[r][1] < pos)
        right = "".join(by_row[r][2] for r in range(row + 1, row + width + 1)
                        if r in by_row and by_row[r][0] == doc and pos < by_row[r][1] <= pos + width)
        out.append(f"{left}«{token}»{right}")
    return out


def save_result(store: Store, cfg: SearchConfig, key: DictionaryKey, query: Query, table: pa.Table) -> str:
    """Write a result as searches/<name>.lance with its key columns, for the SQL view ``searches``."""
    n = table.num_rows
    keyed = pa.table({
        "search": pa.array([cfg.save] * n, pa.string()), "model": pa.array([key.model] * n, pa.string()),
        "checkpoint": pa.array([key.checkpoint] * n, pa.string()), "layer": pa.array([key.layer] * n, pa.int32()),
        "hook": pa.array([key.hook] * n, pa.string()), "percentile": pa.array([float(key.percentile)] * n, pa.float64()),
        "query": pa.array([query.label] * n, pa.string()), "query_region": pa.array([query.region] * n, pa.int32()),
        **{name: table.column(name) for name in table.column_names},
    })
    path = st.search_path(store, cfg.save)
    store.write_table(path, keyed)
    return str(path)
