"""DuckDB SQL over the store. This is the only module that imports duckdb.

Views are discovered from the store layout when a connection opens; adding a dictionary
needs no registration. Every view carries the key columns ``model, checkpoint, layer``
(and ``percentile`` where it applies), so any two can be joined:

    dictionaries       one row per dictionary: key, theta, regions, tokens, calibration, stop reason, version, tags
    exemplars          key, region_id, member_count, coherence, first doc_id/pos/token (no vectors)
    exemplar_vectors   key, region_id, exemplar and mean_direction as FLOAT[d] (FLOAT[] when widths differ;
                       exemplar_vectors_d<d> always holds FLOAT[d])
    assignments        key, doc_id, pos, region_id, distance (each dictionary over its own stream)
    tokens             activation metadata without vectors
    saturation         key, batch, new_regions, regions, tokens
    matches            cross-dictionary region pairs with status (ep match)
    match_overlaps     every overlapping region pair of a membership match, best-match flags
    searches           saved `ep search --save NAME` results: search, key, query, rank, doc_id, pos,
                       token, similarity, region_id, context (issue 14)

Lance datasets reach DuckDB as Arrow objects with only the columns a view needs (DuckDB
cannot read float16 vectors, and never reads vectors unless a query asks for them). The
connection is locked read-only: no external access (files, ATTACH, INSTALL), no
configuration changes, and only SELECT-like statements run.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.questions import questions
from ep_store.store import Store

log = logging.getLogger(__name__)

READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
TOKEN_COLUMNS = ["doc_id", "pos", "token_id", "token", "char_start", "char_end"]
EXEMPLAR_COLUMNS = ["region_id", "member_count", "coherence", "source_row", "doc_id", "pos", "token"]


def _dict_cols(key: DictionaryKey) -> str:
    return (f"'{_q(key.model)}' AS model, '{_q(key.checkpoint)}' AS checkpoint, {key.layer} AS layer, "
            f"{float(key.percentile)}::DOUBLE AS percentile")


def _q(text: str) -> str:
    return text.replace("'", "''")


def _union(parts: list[str], empty: str) -> str:
    return " UNION ALL ".join(parts) if parts else empty


class StoreDB:
    """A read-only DuckDB connection with the store's views."""

    def __init__(self, store: Store | str | Path, as_of: str | None = None):
        self.store = store if isinstance(store, Store) else Store(store)
        if not self.store.root.is_dir():
            raise UsageError(f"no store at {self.store.root}; harvest and build first (or pass --store)")
        self.as_of = _version_or_tag(as_of)
        self.con = duckdb.connect()
        self._n = 0
        self.keys = self._register_views()
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    # -- registration ------------------------------------------------------------------------
    def _relation(self, obj) -> str:
        name = f"_src{self._n}"
        self._n += 1
        self.con.register(name, obj)
        return name

    def _register_views(self) -> list[DictionaryKey]:
        store = self.store
        dict_rows, ex_parts, vec_parts, asg_parts, sat_rows = [], [], [], [], []
        vec_by_width: dict[int, list[str]] = {}
        keys = []
        for key in store.list_dictionaries():
            folder = store.dictionary_dir(key)
            meta = store.read_json(folder / "meta.json")
            version = self.as_of
            if version is not None and version not in meta["tags"] and version not in _versions(meta):
                log.info("%s has no version %s; left out", key, version)
                continue
            keys.append(key)
            ds = store.dataset(folder / "exemplars.lance", version)
            state = _state_at(meta, ds.version)
            dict_rows.append({
                "model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
                "percentile": float(key.percentile), "key": str(key), "theta": meta["theta"],
                "regions": ds.count_rows(), "tokens": state["tokens"], "width": meta["width"],
                "calibration_tokens": meta["calibration"]["tokens"], "stop_reason": state["stop_reason"],
                "lance_version": ds.version, "tags": ",".join(sorted(meta["tags"])),
            })
            ex = self._relation(ds.scanner(columns=EXEMPLAR_COLUMNS))
            ex_parts.append(f"SELECT {_dict_cols(key)}, * FROM {ex}")
            vec = self._relation(ds)
            select = f"SELECT {_dict_cols(key)}, region_id, exemplar, mean_direction FROM {vec}"
            vec_parts.append((meta["width"], select))
            vec_by_width.setdefault(meta["width"], []).append(select)
            if store.exists(folder / "assignments.lance"):
                asg = self._relation(store.dataset(folder / "assignments.lance"))
                asg_parts.append(f"SELECT {_dict_cols(key)}, doc_id, pos, region_id, distance FROM {asg}")
            regions = 0
            for batch, new in enumerate(meta["saturation_curve"][: state["batches"]]):
                regions += new
                sat_rows.append({"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
                                 "percentile": float(key.percentile), "batch": batch, "new_regions": new,
                                 "regions": regions, "tokens": (batch + 1) * meta["build"]["batch_size"]})
        if self.as_of is not None and not keys:
            raise UsageError(f"no dictionary has version or tag {self.as_of!r}; see: ep store ls")

        con = self.con
        con.register("_dictionaries", pa.Table.from_pylist(dict_rows, schema=DICTIONARY_SCHEMA))
        con.execute("CREATE VIEW dictionaries AS SELECT * FROM _dictionaries")
        con.register("_saturation", pa.Table.from_pylist(sat_rows, schema=SATURATION_SCHEMA))
        con.execute("CREATE VIEW saturation AS SELECT * FROM _saturation")
        key_empty = "SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, NULL::DOUBLE AS percentile"
        con.execute("CREATE VIEW exemplars AS " + _union(ex_parts, f"{key_empty}, NULL::INTEGER AS region_id, "
                    "NULL::BIGINT AS member_count, NULL::FLOAT AS coherence, NULL::BIGINT AS source_row, "
                    "NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::VARCHAR AS token LIMIT 0"))
        mixed = len(vec_by_width) > 1
        vec_sql = [s.replace("exemplar, mean_direction", "exemplar::FLOAT[] AS exemplar, mean_direction::FLOAT[] AS "
                             "mean_direction") if mixed else s for _, s in vec_parts]
        con.execute("CREATE VIEW exemplar_vectors AS " + _union(
            vec_sql, f"{key_empty}, NULL::INTEGER AS region_id, NULL::FLOAT[] AS exemplar, "
                     "NULL::FLOAT[] AS mean_direction LIMIT 0"))
        for width, parts in vec_by_width.items():
            con.execute(f"CREATE VIEW exemplar_vectors_d{width} AS " + " UNION ALL ".join(parts))
        con.execute("CREATE VIEW assignments AS " + _union(asg_parts, f"{key_empty}, NULL::BIGINT AS doc_id, "
                    "NULL::INTEGER AS pos, NULL::INTEGER AS region_id, NULL::FLOAT AS distance LIMIT 0"))
        tok_parts = []
        for akey in store.list_activations():
            rel = self._relation(store.dataset(store.activation_path(akey)).scanner(columns=TOKEN_COLUMNS))
            tok_parts.append(f"SELECT '{_q(akey.model)}' AS model, '{_q(akey.checkpoint)}' AS checkpoint, "
                             f"{akey.layer} AS layer, * FROM {rel}")
        con.execute("CREATE VIEW tokens AS " + _union(tok_parts, "SELECT NULL::VARCHAR AS model, "
                    "NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, "
                    "NULL::INTEGER AS token_id, NULL::VARCHAR AS token, NULL::INTEGER AS char_start, "
                    "NULL::INTEGER AS char_end LIMIT 0"))
        self._register_matches()
        self._register_searches()
        return keys

    def _register_matches(self):
        pairs, overlaps = [], []
        for path in sorted((self.store.root / "matches").glob("*/pairs.lance")):
            pairs.append(f"SELECT * FROM {self._relation(self.store.dataset(path))}")
            if self.store.exists(path.parent / "overlaps.lance"):
                overlaps.append(f"SELECT * FROM {self._relation(self.store.dataset(path.parent / 'overlaps.lance'))}")
        self.con.execute("CREATE VIEW matches AS " + _union(pairs, MATCHES_EMPTY))
        self.con.execute("CREATE VIEW match_overlaps AS " + _union(overlaps, OVERLAPS_EMPTY))

    def _register_searches(self):
        parts = [f"SELECT * FROM {self._relation(self.store.dataset(path))}"
                 for path in sorted((self.store.root / "searches").glob("*.lance")) if self.store.exists(path)]
        self.con.execute("CREATE VIEW searches AS " + _union(parts, SEARCHES_EMPTY))

    def register_table(self, name: str, table: pa.Table) -> None:
        """Expose an in-memory Arrow table (e.g. span labels) as a view for this connection."""
        self.con.register(name, table)

    # -- queries -----------------------------------------------------------------------------
    def query(self, sql: str, params: dict | None = None) -> pa.Table:
        """Run one read-only statement; DuckDB's own message on error."""
        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as err:
            raise UsageError(_one_line(err)) from None
        if len(statements) != 1:
            raise UsageError("pass exactly one SQL statement")
        if statements[0].type not in READ_STATEMENTS:
            raise UsageError(f"ep sql is read-only: {statements[0].type.name} statements are refused; use SELECT")
        try:
            return self.con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as err:
            raise UsageError(_one_line(err)) from None

    def require(self, key: DictionaryKey | str) -> DictionaryKey:
        key = key if isinstance(key, DictionaryKey) else DictionaryKey.parse(key)
        if key not in self.keys:
            known = ", ".join(str(k) for k in self.keys) or "none"
            raise UsageError(f"unknown dictionary {key} (known: {known})")
        return key


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _version_or_tag(as_of: str | None):
    if as_of is None:
        return None
    return int(as_of) if str(as_of).isdigit() else str(as_of)


def _versions(meta: dict) -> set[int]:
    return {h["version"] for h in meta.get("history", [])}


def _state_at(meta: dict, version: int) -> dict:
    """tokens / stop reason / closed batches of the build that wrote ``version``."""
    for entry in meta.get("history", []):
        if entry["version"] == version:
            return entry
    return {"tokens": meta["tokens"], "stop_reason": meta["stop_reason"], "batches": len(meta["saturation_curve"])}


DICTIONARY_SCHEMA = pa.schema([
    ("model", pa.string()), ("checkpoint", pa.string()), ("layer", pa.int32()), ("percentile", pa.float64()),
    ("key", pa.string()), ("theta", pa.float64()), ("regions", pa.int64()), ("tokens", pa.int64()),
    ("width", pa.int32()), ("calibration_tokens", pa.int64()), ("stop_reason", pa.string()),
    ("lance_version", pa.int64()), ("tags", pa.string()),
])
SATURATION_SCHEMA = pa.schema([
    ("model", pa.string()), ("checkpoint", pa.string()), ("layer", pa.int32()), ("percentile", pa.float64()),
    ("batch", pa.int32()), ("new_regions", pa.int64()), ("regions", pa.int64()), ("tokens", pa.int64()),
])
MATCHES_EMPTY = (
    "SELECT NULL::VARCHAR AS a, NULL::VARCHAR AS b, NULL::INTEGER AS region_a, NULL::INTEGER AS region_b, "
    "NULL::DOUBLE AS cosine, NULL::DOUBLE AS distance_theta, NULL::DOUBLE AS precision, NULL::DOUBLE AS recall, "
    "NULL::DOUBLE AS f1, NULL::VARCHAR AS status LIMIT 0"
)

SEARCHES_EMPTY = (
    "SELECT NULL::VARCHAR AS search, NULL::VARCHAR AS model, NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, "
    "NULL::DOUBLE AS percentile, NULL::VARCHAR AS query, NULL::INTEGER AS query_region, NULL::INTEGER AS rank, "
    "NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::VARCHAR AS token, NULL::DOUBLE AS similarity, "
    "NULL::INTEGER AS region_id, NULL::VARCHAR AS context LIMIT 0"
)


OVERLAPS_EMPTY = (
    "SELECT NULL::VARCHAR AS a, NULL::VARCHAR AS b, NULL::INTEGER AS region_a, NULL::INTEGER AS region_b, "
    "NULL::DOUBLE AS overlap, NULL::DOUBLE AS precision, NULL::DOUBLE AS recall, NULL::DOUBLE AS f1, "
    "NULL::BOOLEAN AS best_for_a, NULL::BOOLEAN AS best_for_b LIMIT 0"
)


# -- canned questions ------------------------------------------------------------------------------
def ask_pair(db: StoreDB, a: DictionaryKey, b: DictionaryKey, name: str, **params) -> pa.Table:
    """Run a canned two-dictionary question ($a_*, $b_* parameters, $a and $b keys)."""
    sql = questions()[name].sql
    bound = {"a": str(a), "b": str(b), **DEFAULTS, **params}
    for prefix, key in (("a", a), ("b", b)):
        bound |= {f"{prefix}_model": key.model, f"{prefix}_checkpoint": key.checkpoint,
                  f"{prefix}_layer": key.layer, f"{prefix}_percentile": float(key.percentile)}
    return db.query(sql, _used(sql, bound))


def _used(sql: str, params: dict) -> dict:
    """The parameters a statement names ($limit, not the $b inside $b_model)."""
    return {k: v for k, v in params.items() if re.search(rf"\${k}\b", sql)}


def ask(db: StoreDB, key: DictionaryKey | str, name: str, **params) -> pa.Table:
    """Run a canned question for one dictionary."""
    registry = questions()
    if name not in registry:
        raise UsageError(f"unknown question {name!r}; choose one of: {', '.join(registry)}")
    key = db.require(key)
    bound = {"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
             "percentile": float(key.percentile), **DEFAULTS, **params}
    sql = registry[name].sql
    return db.query(sql, _used(sql, bound))


DEFAULTS = {"limit": 20, "context": 8, "per_region": 3, "top": 5}

