"""The store's views on one DuckDB connection (``StoreDB`` opens it; see ep_store.sql.db for
the list of views and what each holds).

Views are discovered from the store layout when a connection opens; adding a dictionary
needs no registration. Each dictionary is read as one snapshot (``Store.dictionary_snapshot``,
issue 18 A1). Lance datasets reach DuckDB as Arrow objects with only the columns a view needs
(DuckDB cannot read float16 vectors, and never reads vectors unless a query asks for them).
An empty view still has its columns (the ``*_EMPTY`` statements), so queries parse on an
empty store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.store.core import Store
from ep_store.store.index import list_searches
from ep_store.store.snapshot import DictionarySnapshot, assignments_version, stale_match

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ["doc_id", "pos", "token_id", "token", "char_start", "char_end"]
EXEMPLAR_COLUMNS = ["region_id", "member_count", "coherence", "source_row", "doc_id", "pos", "token"]


def _dict_cols(key: DictionaryKey) -> str:
    return (f"{_activation_cols(key)}, {float(key.percentile)}::DOUBLE AS percentile")


def _activation_cols(key) -> str:
    """The key columns of an activation dataset (or a dictionary's, percentile aside)."""
    return (f"'{_q(key.model)}' AS model, '{_q(key.checkpoint)}' AS checkpoint, {key.layer} AS layer, "
            f"'{key.hook}' AS hook")


def _q(text: str) -> str:
    return text.replace("'", "''")


def _union(parts: list[str], empty: str) -> str:
    return " UNION ALL ".join(parts) if parts else empty



@dataclass
class _DictionaryParts:
    """What the dictionary views collect, one dictionary (snapshot) at a time."""

    rows: list[dict] = field(default_factory=list)
    exemplars: list[str] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)
    vectors_by_width: dict[int, list[str]] = field(default_factory=dict)
    assignments: list[str] = field(default_factory=list)
    saturation: list[dict] = field(default_factory=list)


class Views:
    """Registers every view of the store on ``con`` (``register``), reading each dictionary at
    ``as_of`` (a version or tag; None: the build its meta.json publishes)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, store: Store, as_of: int | str | None):
        self.con, self.store, self.as_of = con, store, as_of
        self._n = 0
        self.snapshots: dict[DictionaryKey, DictionarySnapshot] = {}
        """The snapshot each view reads, by dictionary (issue 18, A1)."""

    def register(self) -> list[DictionaryKey]:
        """Create every view; return the keys of the dictionaries they hold."""
        keys = self._register_dictionaries()
        self._register_tokens()
        self._register_matches()
        self._register_saes()
        self._register_searches()
        self._register_foreign(keys)
        return keys

    def _relation(self, obj) -> str:
        name = f"_src{self._n}"
        self._n += 1
        self.con.register(name, obj)
        return name

    def _register_dictionaries(self) -> list[DictionaryKey]:
        """The views dictionaries, saturation, exemplars, exemplar_vectors(_d<width>), assignments."""
        parts = _DictionaryParts()
        keys = []
        for key in self.store.list_dictionaries():
            # One snapshot per dictionary: exemplars, assignments and meta of one published build
            # (issue 18, A1); without --as-of the build meta.json publishes.
            snap = self.store.dictionary_snapshot(key, self.as_of, missing_ok=True)
            if snap is None:
                log.info("%s has no version %s; left out", key, self.as_of)
                continue
            keys.append(key)
            self.snapshots[key] = snap
            self._add_dictionary(key, snap, parts)
        if self.as_of is not None and not keys:
            raise UsageError(f"no dictionary has version or tag {self.as_of!r}; see: ep store ls")
        self._create_dictionary_views(parts)
        return keys

    def _add_dictionary(self, key: DictionaryKey, snap: DictionarySnapshot, parts: _DictionaryParts) -> None:
        store, meta = self.store, snap.meta
        ds = store.dataset(snap.exemplars_path, snap.exemplars_version)
        parts.rows.append({
            "model": key.model, "checkpoint": key.checkpoint, "layer": key.layer, "hook": key.hook,
            "percentile": float(key.percentile), "key": str(key), "theta": meta["theta"],
            "regions": ds.count_rows(), "tokens": meta["tokens"], "width": meta["width"],
            "calibration_tokens": meta["calibration"]["tokens"], "stop_reason": meta["stop_reason"],
            "lance_version": ds.version, "tags": ",".join(sorted(meta["tags"])),
        })
        ex = self._relation(ds.scanner(columns=EXEMPLAR_COLUMNS))
        parts.exemplars.append(f"SELECT {_dict_cols(key)}, *, member_count AS build_members FROM {ex}")
        vec = self._relation(ds)
        select = f"SELECT {_dict_cols(key)}, region_id, exemplar, mean_direction FROM {vec}"
        parts.vectors.append(select)
        parts.vectors_by_width.setdefault(meta["width"], []).append(select)
        if snap.assignments_version is not None:
            asg = self._relation(store.dataset(snap.assignments_path, snap.assignments_version))
            parts.assignments.append(f"SELECT {_dict_cols(key)}, doc_id, pos, region_id, distance FROM {asg}")
        elif store.exists(snap.assignments_path):
            # Assignments exist but none belong to this build: a query that reads this
            # dictionary's assignments fails in one line instead of mixing builds (issue 18,
            # A1); queries about other dictionaries never evaluate this part.
            # Every column raises too, so no filter on them can fold the part away.
            fail = f"error('{_q(snap.assignments_missing)}')"
            parts.assignments.append(f"SELECT {_dict_cols(key)}, {fail}::BIGINT AS doc_id, {fail}::INTEGER AS pos, "
                                     f"{fail}::INTEGER AS region_id, {fail}::FLOAT AS distance FROM range(1) "
                                     f"WHERE {fail} IS NULL")
        regions = 0
        size = meta["build"]["batch_size"]
        for batch, new in enumerate(meta["saturation_curve"]):
            regions += new
            # The last batch may be partial: tokens never exceed those the build streamed.
            parts.saturation.append({"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
                                     "hook": key.hook, "percentile": float(key.percentile), "batch": batch, "new_regions": new,
                                     "regions": regions, "tokens": min((batch + 1) * size, meta["tokens"])})

    def _create_dictionary_views(self, parts: _DictionaryParts) -> None:
        con = self.con
        con.register("_dictionaries", pa.Table.from_pylist(parts.rows, schema=DICTIONARY_SCHEMA))
        con.execute("CREATE VIEW dictionaries AS SELECT * FROM _dictionaries")
        con.register("_saturation", pa.Table.from_pylist(parts.saturation, schema=SATURATION_SCHEMA))
        con.execute("CREATE VIEW saturation AS SELECT * FROM _saturation")
        con.execute("CREATE VIEW exemplars AS " + _union(parts.exemplars, EXEMPLARS_EMPTY))
        mixed = len(parts.vectors_by_width) > 1
        vec_sql = [s.replace("exemplar, mean_direction", "exemplar::FLOAT[] AS exemplar, mean_direction::FLOAT[] AS "
                             "mean_direction") if mixed else s for s in parts.vectors]
        con.execute("CREATE VIEW exemplar_vectors AS " + _union(vec_sql, VECTORS_EMPTY))
        for width, selects in parts.vectors_by_width.items():
            con.execute(f"CREATE VIEW exemplar_vectors_d{width} AS " + " UNION ALL ".join(selects))
        con.execute("CREATE VIEW assignments AS " + _union(parts.assignments, ASSIGNMENTS_EMPTY))

    def _register_tokens(self) -> None:
        store, tok_parts = self.store, []
        for akey in store.list_activations():
            rel = self._relation(store.dataset(store.activation_path(akey)).scanner(columns=TOKEN_COLUMNS))
            tok_parts.append(f"SELECT {_activation_cols(akey)}, * FROM {rel}")
        self.con.execute("CREATE VIEW tokens AS " + _union(tok_parts, TOKENS_EMPTY))

    def _register_foreign(self, keys: list[DictionaryKey]) -> None:
        """The view ``foreign_assignments``: each dictionary's assignments over other activation
        datasets (``dictionaries/<key>/foreign/<model>/<checkpoint>/L<layer>.lance``, the latest
        version written from the snapshot's exemplars: issue 18, A1), keyed by the dictionary and
        by the activations (issue 18, D11). One written from other exemplars fails in one line
        when a query reads it."""
        parts = []
        for key in keys:
            snap = self.snapshots[key]
            for over, path in self.store.dictionary_files(key).foreign_paths():
                cols = (f"{_dict_cols(key)}, '{_q(over.model)}' AS activations_model, '{_q(over.checkpoint)}' "
                        f"AS activations_checkpoint, {over.layer} AS activations_layer, '{over.hook}' AS activations_hook")
                version, why = assignments_version(self.store, key, path, snap.exemplars_version, snap.label)
                if version is None:
                    fail = f"error('{_q(f'{why} (over {path.parent.parent.name}/{path.parent.name}/{path.stem})')}')"
                    parts.append(f"SELECT {cols}, {fail}::BIGINT AS doc_id, {fail}::INTEGER AS pos, {fail}::INTEGER "
                                 f"AS region_id, {fail}::FLOAT AS distance FROM range(1) WHERE {fail} IS NULL")
                    continue
                rel = self._relation(self.store.dataset(path, version).scanner(
                    columns=["doc_id", "pos", "region_id", "distance"]))
                parts.append(f"SELECT {cols}, doc_id, pos, region_id, distance FROM {rel}")
        self.con.execute("CREATE VIEW foreign_assignments AS " + _union(parts, FOREIGN_EMPTY))

    def _register_matches(self):
        """Every finished ``ep match``: a folder whose meta.json (written last) names the Lance
        versions of its tables, read at those versions. A match killed before its meta.json
        (tables half created, or newer than published) is not seen (crash test, issue 8 G).
        A match computed from other builds than the snapshots read here (a dictionary grew, or
        ``--as-of``) fails in one line when a query reads it; one of a dictionary left out by
        ``--as-of`` is left out too (issue 18, A1)."""
        pairs, overlaps = [], []
        for files in self.store.list_matches():
            meta = self.store.read_json(files.meta)
            if any(DictionaryKey.parse(meta[side]) not in self.snapshots for side in ("a", "b")):
                continue
            stale = stale_match(meta, self.snapshots)
            if stale:
                pairs.append(_failing_part(meta, stale, MATCH_COLUMNS))
                if meta.get("overlaps_version") is not None:
                    overlaps.append(_failing_part(meta, stale, OVERLAP_COLUMNS))
                continue
            pairs.append(f"SELECT * FROM {self._relation(self.store.dataset(files.pairs, meta['pairs_version']))}")
            if meta.get("overlaps_version") is not None:
                overlaps.append("SELECT * FROM " + self._relation(
                    self.store.dataset(files.overlaps, meta["overlaps_version"])))
        self.con.execute("CREATE VIEW matches AS " + _union(pairs, MATCHES_EMPTY))
        self.con.execute("CREATE VIEW match_overlaps AS " + _union(overlaps, OVERLAPS_EMPTY))

    def _register_saes(self):
        """SAE views (issue 11): trained SAEs and the held-out tables of ep sae compare."""
        rows = []
        for key in self.store.list_saes():
            meta = self.store.read_json(self.store.sae_files(key).meta)
            rows.append({"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer, "hook": key.hook,
                         "name": key.name,
                         "library": meta["library"], "library_version": meta["library_version"],
                         "architecture": meta["architecture"], "width": meta["width"], "k": meta["k"],
                         "tokens": meta["tokens"], "seconds": meta["seconds"], "flops": meta["flops"]})
        self.con.register("_saes", pa.Table.from_pylist(rows, schema=SAES_SCHEMA))
        self.con.execute("CREATE VIEW saes AS SELECT * FROM _saes")
        acts, projections = [], []
        for key, name, files in self.store.list_sae_comparisons():
            cols = f"{_dict_cols(key)}, '{_q(name)}' AS sae"
            acts.append(f"SELECT {cols}, doc_id, pos, feature_id, activation FROM "
                        f"{self._relation(self.store.dataset(files.sae_activations))}")
            projections.append(f"SELECT {cols}, doc_id, pos, region_id, projection FROM "
                               f"{self._relation(self.store.dataset(files.ep_projections))}")
        key_empty = f"{KEY_EMPTY}, NULL::VARCHAR AS sae, NULL::BIGINT AS doc_id, NULL::INTEGER AS pos"
        self.con.execute("CREATE VIEW sae_activations AS " + _union(
            acts, f"{key_empty}, NULL::INTEGER AS feature_id, NULL::FLOAT AS activation LIMIT 0"))
        self.con.execute("CREATE VIEW ep_projections AS " + _union(
            projections, f"{key_empty}, NULL::INTEGER AS region_id, NULL::FLOAT AS projection LIMIT 0"))
        self.con.execute(SAE_FEATURES_VIEW)

    def _register_searches(self):
        parts = []
        for path in list_searches(self.store):
            ds = self.store.dataset(path)
            # searches saved before hook points (issue 21, item 4) read the block output
            hook, skip = ("hook", ", hook") if "hook" in ds.schema.names else ("'resid_post'", "")
            parts.append(f"SELECT search, model, checkpoint, layer, {hook} AS hook, "
                         f"* EXCLUDE (search, model, checkpoint, layer{skip}) FROM {self._relation(ds)}")
        self.con.execute("CREATE VIEW searches AS " + _union(parts, SEARCHES_EMPTY))



# Each view's columns when the store holds nothing for it.
ACTIVATION_KEY_EMPTY = ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, "
                        "NULL::VARCHAR AS hook")
KEY_EMPTY = f"{ACTIVATION_KEY_EMPTY}, NULL::DOUBLE AS percentile"
EXEMPLARS_EMPTY = (f"{KEY_EMPTY}, NULL::INTEGER AS region_id, NULL::BIGINT AS member_count, NULL::FLOAT AS coherence, "
                   "NULL::BIGINT AS source_row, NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::VARCHAR AS token, "
                   "NULL::BIGINT AS build_members LIMIT 0")
VECTORS_EMPTY = (f"{KEY_EMPTY}, NULL::INTEGER AS region_id, NULL::FLOAT[] AS exemplar, "
                 "NULL::FLOAT[] AS mean_direction LIMIT 0")
ASSIGNMENTS_EMPTY = (f"{KEY_EMPTY}, NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::INTEGER AS region_id, "
                     "NULL::FLOAT AS distance LIMIT 0")
TOKENS_EMPTY = (f"{ACTIVATION_KEY_EMPTY}, NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::INTEGER AS token_id, NULL::VARCHAR AS token, "
                "NULL::INTEGER AS char_start, NULL::INTEGER AS char_end LIMIT 0")
KEY_FIELDS = [("model", pa.string()), ("checkpoint", pa.string()), ("layer", pa.int32()), ("hook", pa.string()),
              ("percentile", pa.float64())]
DICTIONARY_SCHEMA = pa.schema([
    *KEY_FIELDS, ("key", pa.string()), ("theta", pa.float64()), ("regions", pa.int64()), ("tokens", pa.int64()),
    ("width", pa.int32()), ("calibration_tokens", pa.int64()), ("stop_reason", pa.string()),
    ("lance_version", pa.int64()), ("tags", pa.string()),
])
SATURATION_SCHEMA = pa.schema([
    *KEY_FIELDS, ("batch", pa.int32()), ("new_regions", pa.int64()), ("regions", pa.int64()), ("tokens", pa.int64()),
])
SAES_SCHEMA = pa.schema([
    ("model", pa.string()), ("checkpoint", pa.string()), ("layer", pa.int32()), ("hook", pa.string()),
    ("name", pa.string()),
    ("library", pa.string()), ("library_version", pa.string()), ("architecture", pa.string()),
    ("width", pa.int64()), ("k", pa.int64()), ("tokens", pa.int64()), ("seconds", pa.float64()),
    ("flops", pa.float64()),
])
FOREIGN_EMPTY = (f"{KEY_EMPTY}, NULL::VARCHAR AS activations_model, NULL::VARCHAR AS "
                 "activations_checkpoint, NULL::INTEGER AS activations_layer, NULL::VARCHAR AS activations_hook, "
                 "NULL::BIGINT AS doc_id, "
                 "NULL::INTEGER AS pos, NULL::INTEGER AS region_id, NULL::FLOAT AS distance LIMIT 0")

SAE_FEATURES_VIEW = """
CREATE VIEW sae_features AS
SELECT model, checkpoint, layer, hook, percentile, sae, feature_id, count(*) AS active_tokens,
       max(activation) AS max_activation, avg(activation) AS mean_activation
FROM sae_activations WHERE activation > 0
GROUP BY ALL
"""
# Columns of the matches and match_overlaps views, in the order of ep_store.analysis.match's tables.
MATCH_COLUMNS = (("a", "VARCHAR"), ("b", "VARCHAR"), ("region_a", "INTEGER"), ("region_b", "INTEGER"),
                 ("cosine", "DOUBLE"), ("distance_theta", "DOUBLE"), ("precision", "DOUBLE"), ("recall", "DOUBLE"),
                 ("f1", "DOUBLE"), ("status", "VARCHAR"))
OVERLAP_COLUMNS = (("a", "VARCHAR"), ("b", "VARCHAR"), ("region_a", "INTEGER"), ("region_b", "INTEGER"),
                   ("overlap", "DOUBLE"), ("precision", "DOUBLE"), ("recall", "DOUBLE"), ("f1", "DOUBLE"),
                   ("best_for_a", "BOOLEAN"), ("best_for_b", "BOOLEAN"))
MATCHES_EMPTY = "SELECT " + ", ".join(f"NULL::{kind} AS {name}" for name, kind in MATCH_COLUMNS) + " LIMIT 0"
OVERLAPS_EMPTY = "SELECT " + ", ".join(f"NULL::{kind} AS {name}" for name, kind in OVERLAP_COLUMNS) + " LIMIT 0"


def _failing_part(meta: dict, why: str, columns: tuple) -> str:
    """A view part standing for a stale match (issue 18, A1): ``a`` and ``b`` are constants, so
    queries about other pairs prune it; every other column raises ``why``, so any query that
    reads this pair fails in one line instead of pairing the match with other builds."""
    fail = f"error('{_q(why)}')"
    cols = [f"'{_q(meta['a'])}' AS a", f"'{_q(meta['b'])}' AS b"]
    cols += [f"{fail}::{kind} AS {name}" for name, kind in columns[2:]]
    return f"SELECT {', '.join(cols)} FROM range(1) WHERE {fail} IS NULL"


SEARCHES_EMPTY = (
    "SELECT NULL::VARCHAR AS search, NULL::VARCHAR AS model, NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, "
    "NULL::VARCHAR AS hook, "
    "NULL::DOUBLE AS percentile, NULL::VARCHAR AS query, NULL::INTEGER AS query_region, NULL::INTEGER AS rank, "
    "NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::VARCHAR AS token, NULL::DOUBLE AS similarity, "
    "NULL::INTEGER AS region_id, NULL::VARCHAR AS context LIMIT 0"
)
