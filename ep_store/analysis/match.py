"""Matching two dictionaries: which regions fine-tuning preserved, introduced and dropped.

    ep match gemma-3-270m/base/L6/p1 gemma-3-270m/sft/L6/p1 --store data/store

By vector (equal widths): cosine matrix of the exemplars, one-to-one Hungarian assignment
(scipy); *preserved* = matched with cosine >= cutoff, *introduced* = regions of B not
preserved, *dropped* = regions of A not preserved. Distances are also given in units of
A's theta. By membership (any two dictionaries assigned over one stream): overlaps are a
DuckDB join of the assignments, by (doc_id, pos) when the token streams agree, else by
overlapping character spans (weights are then characters); precision = overlap / |s|,
recall = overlap / |r|, F1 their harmonic mean, for region r of A and s of B. Alone, the
membership method matches one-to-one on F1 (preserved = F1 >= f1_cutoff). Membership (and
``both``) needs both dictionaries' activations harvested from the same documents, else it
exits 2 (``streams.require_same_stream``; issue 18, A3); vector matching needs no shared tokens.

Writes ``matches/<A>__<B>/pairs.lance`` (one row per preserved pair, dropped and introduced
region), ``overlaps.lance`` (every overlapping region pair with best-match flags) and
``meta.json``.
"""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, asdict, dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment

from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask_pair
from ep_store.stages.dictionary import Dictionary
from ep_store.store import MatchFiles, Store
from ep_store.store.snapshot import match_record
from ep_store.store.streams import require_same_stream

METHODS = ("vector", "membership", "both")


@dataclass
class MatchConfig:
    a: str
    """Dictionary key A (the reference, e.g. base)."""
    b: str
    """Dictionary key B (e.g. the fine-tuned checkpoint)."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    method: str = "both"
    """vector, membership or both."""
    cutoff: float = 0.7
    """Vector matches with cosine >= cutoff are preserved."""
    f1_cutoff: float = 0.3
    """Membership-only matches with F1 >= f1_cutoff are preserved."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; use {', '.join(METHODS)}")
        if not -1 <= self.cutoff <= 1 or not 0 <= self.f1_cutoff <= 1:
            raise UsageError("--cutoff must lie in [-1, 1] and --f1-cutoff in [0, 1]")


class VectorMatch(NamedTuple):
    rows_a: np.ndarray  # matched region ids of A
    rows_b: np.ndarray  # their partners in B
    cosine: np.ndarray  # cosine of each matched pair


def vector_match(E_a: np.ndarray, E_b: np.ndarray) -> VectorMatch:
    """One-to-one assignment maximising the total exemplar cosine."""
    cos_AB = E_a.astype(np.float64) @ E_b.astype(np.float64).T
    rows, cols = linear_sum_assignment(cos_AB, maximize=True)
    return VectorMatch(rows, cols, cos_AB[rows, cols])


class Overlaps(NamedTuple):
    region_a: np.ndarray
    region_b: np.ndarray
    overlap: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


def membership_scores(region_a, region_b, overlap) -> Overlaps:
    """Precision, recall and F1 of every overlapping pair; sizes are sums over the shared stream."""
    region_a, region_b, overlap = map(np.asarray, (region_a, region_b, overlap))
    size_a = np.bincount(region_a, weights=overlap)
    size_b = np.bincount(region_b, weights=overlap)
    precision = overlap / size_b[region_b]
    recall = overlap / size_a[region_a]
    f1 = 2 * overlap / (size_a[region_a] + size_b[region_b])
    return Overlaps(region_a, region_b, overlap, precision, recall, f1)


def best_flags(keys: np.ndarray, score: np.ndarray) -> np.ndarray:
    """True where ``score`` is the highest among rows with the same key (first on ties)."""
    order = np.lexsort((-score, keys))
    first = np.ones(len(order), dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    flags = np.zeros(len(keys), dtype=bool)
    flags[order[first]] = True
    return flags


def overlaps_in_sql(db: StoreDB, a: DictionaryKey, b: DictionaryKey) -> tuple[Overlaps, str]:
    same = ask_pair(db, a, b, "same_tokens").to_pylist()[0]
    if same["shared"] and not same["differing"]:
        by, table = "positions", ask_pair(db, a, b, "membership_overlap")
    else:
        by, table = "character spans", ask_pair(db, a, b, "membership_overlap_spans")
    if table.num_rows == 0:
        raise UsageError(f"{a} and {b} share no stream positions: they were assigned over different "
                         "streams (harvest both from the same corpus and assign them)")
    cols = table.to_pydict()
    return membership_scores(np.array(cols["region_a"], dtype=np.int64), np.array(cols["region_b"], dtype=np.int64),
                             np.array(cols["overlap"])), by


PAIR_SCHEMA = pa.schema([
    ("a", pa.string()), ("b", pa.string()), ("region_a", pa.int32()), ("region_b", pa.int32()),
    ("cosine", pa.float64()), ("distance_theta", pa.float64()), ("precision", pa.float64()),
    ("recall", pa.float64()), ("f1", pa.float64()), ("status", pa.string()),
])


def match(cfg: MatchConfig, store: Store) -> dict:
    """Match A to B and write ``matches/<A>__<B>/``; returns the run summary.

    Holds the pair's writer lock (a second ``ep match`` of the pair exits 2). meta.json is
    removed first and written last, naming the Lance versions of pairs and overlaps, so a
    killed run never leaves a meta.json that describes tables it did not finish.
    """
    a, b = DictionaryKey.parse(cfg.a), DictionaryKey.parse(cfg.b)
    files = store.match_files(a, b)
    with store.lock(files.folder, f"match {a} -> {b}"):
        return _match_locked(cfg, store, a, b, files)


def _match_locked(cfg: MatchConfig, store: Store, a: DictionaryKey, b: DictionaryKey,
                  files: MatchFiles) -> dict:
    start = time.perf_counter()
    da, db_ = Dictionary.load(store, a), Dictionary.load(store, b)
    if cfg.method == "vector" and da.width != db_.width:
        raise UsageError(f"{a} has width {da.width} and {b} width {db_.width}: vector matching needs equal "
                         "widths; use --method membership")
    use_vector = cfg.method != "membership" and da.width == db_.width
    # --method both across widths runs membership alone: say so (issue 18, D12)
    skipped = {} if use_vector or cfg.method == "membership" else {
        "vector_skipped": f"widths differ ({da.width} vs {db_.width})"}
    overlaps, by, sql = None, None, None
    if cfg.method in ("membership", "both"):
        overlaps, by, sql = _membership(store, a, b, da, db_)
    scores, pairs, preserved = _pair_regions(cfg, da, db_, use_vector, overlaps)
    rows = _status_rows(a, b, da, db_, pairs, preserved, scores)
    versions = _write_tables(store, files, a, b, rows, overlaps)
    # What the match was computed from, so readers can tell it from a match of other builds (issue 18, A1).
    snaps = (sql.snapshots[a], sql.snapshots[b]) if overlaps is not None else (da.snapshot, db_.snapshot)
    versions["snapshots"] = match_record(*snaps, membership=overlaps is not None)
    counts = {status: sum(1 for row in rows if row["status"] == status)
              for status in ("preserved", "introduced", "dropped")}
    methods_run = [m for m, ran in (("vector", use_vector), ("membership", overlaps is not None)) if ran]
    summary = {"a": str(a), "b": str(b), "method": "vector" if use_vector else "membership",
               "methods_run": methods_run, **skipped, "membership_by": by, **counts, "regions_a": len(da), "regions_b": len(db_),
               "matched_cosines": [round(c, 4) for _, _, c in pairs if c is not None],
               "seconds": round(time.perf_counter() - start, 3), "config": asdict(cfg), **versions,
               ENVIRONMENT_KEY: environment()}  # issue 18, E14.1; digests skip it
    store.write_json(files.meta, summary)
    return {k: v for k, v in summary.items() if k not in ("matched_cosines", "config", ENVIRONMENT_KEY)} \
        | {"out": str(files.folder)}


def _membership(store: Store, a: DictionaryKey, b: DictionaryKey, da: Dictionary, db_: Dictionary):
    """(overlaps, what they were counted by, the StoreDB they came from) of A's and B's
    assignments over the same tokens; UsageError when the streams differ (issue 18, A3) or a
    build was published meanwhile (issue 18, A1)."""
    require_same_stream(store, a.activations, b.activations, f"membership match of {a} and {b}",
                        f"or match by vector only: ep match {a} {b} --method vector" if da.width == db_.width else "")
    sql = StoreDB(store)
    sql.require(a)
    sql.require(b)
    overlaps, by = overlaps_in_sql(sql, a, b)
    _read_together(sql, da, db_)
    return overlaps, by, sql


def _pair_regions(cfg: MatchConfig, da: Dictionary, db_: Dictionary, use_vector: bool, overlaps):
    """(membership scores by region pair, every paired (region_a, region_b, cosine), the pairs
    preserved): by exemplar cosine when ``use_vector``, else by F1 of the overlaps."""
    scores = {}
    if overlaps is not None:
        scores = {(int(r), int(s)): (p, q, f) for r, s, p, q, f in
                  zip(overlaps.region_a, overlaps.region_b, overlaps.precision, overlaps.recall, overlaps.f1)}
    if use_vector:
        m = vector_match(da.exemplars.numpy(), db_.exemplars.numpy())
        pairs = [(int(r), int(s), float(c)) for r, s, c in zip(m.rows_a, m.rows_b, m.cosine)]
        preserved = [(r, s, c) for r, s, c in pairs if c >= cfg.cutoff]
    else:
        ra, rb = _f1_assignment(overlaps, len(da), len(db_))
        pairs = [(int(r), int(s), None) for r, s in zip(ra, rb)]
        preserved = [(r, s, c) for r, s, c in pairs if scores.get((r, s), (0, 0, 0))[2] >= cfg.f1_cutoff]
    return scores, pairs, preserved


def _status_rows(a: DictionaryKey, b: DictionaryKey, da: Dictionary, db_: Dictionary, pairs: list, preserved: list,
                 scores: dict) -> list[dict]:
    """One row per preserved pair, then per dropped region of A, then per introduced region of B."""
    kept_a = {r for r, _, _ in preserved}
    kept_b = {s for _, s, _ in preserved}
    partner_cos = {r: c for r, _, c in pairs}
    rows = []
    for r, s, c in preserved:
        rows.append(_row(a, b, r, s, c, da.theta, scores.get((r, s)), "preserved"))
    for r in range(len(da)):
        if r not in kept_a:
            rows.append(_row(a, b, r, None, partner_cos.get(r), da.theta, None, "dropped"))
    for s in range(len(db_)):
        if s not in kept_b:
            rows.append(_row(a, b, None, s, None, da.theta, None, "introduced"))
    return rows


def _write_tables(store: Store, files: MatchFiles, a: DictionaryKey, b: DictionaryKey, rows: list[dict],
                  overlaps) -> dict:
    """Unpublish the old match (its meta.json goes first), write the pairs and overlaps tables;
    return their versions."""
    store.remove(files.meta)
    versions = {"pairs_version": store.write_table(files.pairs, pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))}
    if overlaps is None:
        store.remove(files.overlaps)  # a stale table of an earlier membership match
    else:
        versions["overlaps_version"] = store.write_table(files.overlaps, pa.table({
            "a": [str(a)] * len(overlaps.region_a), "b": [str(b)] * len(overlaps.region_a),
            "region_a": overlaps.region_a.astype(np.int32), "region_b": overlaps.region_b.astype(np.int32),
            "overlap": overlaps.overlap, "precision": overlaps.precision, "recall": overlaps.recall,
            "f1": overlaps.f1, "best_for_a": best_flags(overlaps.region_a, overlaps.f1),
            "best_for_b": best_flags(overlaps.region_b, overlaps.f1),
        }))
    return versions


def _read_together(sql: StoreDB, *dictionaries: Dictionary) -> None:
    """Refuse (UsageError) when a build of a dictionary was published between loading its
    exemplars and opening the SQL views, so a match never pairs two builds (issue 18, A1)."""
    for d in dictionaries:
        if sql.snapshots[d.key].exemplars_version != d.snapshot.exemplars_version:
            raise UsageError(f"{d.key} published a new build (exemplars version "
                             f"{sql.snapshots[d.key].exemplars_version}) while it was being matched; rerun ep match")


def _row(a, b, r, s, cosine, theta, score, status) -> dict:
    p, q, f = score if score is not None else (None, None, None)
    return {"a": str(a), "b": str(b), "region_a": r, "region_b": s, "cosine": cosine,
            # Distances clamped to [0, 2]; theta can be 0 for a corpus of repeats (issue 8, item 5).
            "distance_theta": None if cosine is None or theta <= 0 else min(max(1.0 - cosine, 0.0), 2.0) / theta,
            "precision": p, "recall": q, "f1": f, "status": status}


def _f1_assignment(overlaps: Overlaps, n_a: int, n_b: int):
    f1 = np.zeros((n_a, n_b))
    f1[overlaps.region_a, overlaps.region_b] = overlaps.f1
    return linear_sum_assignment(f1, maximize=True)
