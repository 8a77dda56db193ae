"""DuckDB SQL over the store. This is the only module that imports duckdb.

Views are discovered from the store layout when a connection opens; adding a dictionary
needs no registration. Every view carries the key columns ``model, checkpoint, layer``
(and ``percentile`` where it applies), so any two can be joined:

    dictionaries       one row per dictionary: key, theta, regions, tokens, calibration, stop reason, version, tags
    exemplars          key, region_id, build_members (= member_count: members the build passed, not the
                       final assignment count; issue 18, D13), coherence, first doc_id/pos/token (no vectors)
    exemplar_vectors   key, region_id, exemplar and mean_direction as FLOAT[d] (FLOAT[] when widths differ;
                       exemplar_vectors_d<d> always holds FLOAT[d])
    assignments        key, doc_id, pos, region_id, distance (each dictionary over its own stream)
    foreign_assignments  key, activations_model/_checkpoint/_layer, doc_id, pos, region_id, distance: a
                       dictionary over another activation dataset (``ep assign --activations``; issue 18, D11)
    tokens             activation metadata without vectors
    saturation         key, batch, new_regions, regions, tokens
    matches            cross-dictionary region pairs with status (ep match)
    match_overlaps     every overlapping region pair of a membership match, best-match flags
    saes               one row per trained SAE (ep sae train): key, name, library, width, k, tokens, seconds, flops
    sae_activations    dictionary key, sae, doc_id, pos, feature_id, activation: every non-zero SAE activation on
                       the held-out tokens of an ``ep sae compare`` (keyed like assignments)
    ep_projections     dictionary key, sae, doc_id, pos, region_id, projection: each region's top positive
                       signed projections (x - c).e_k on the same held-out tokens
    sae_features       one row per SAE feature and comparison: active tokens, max and mean activation
    searches           saved `ep search --save NAME` results: search, key, query, rank, doc_id, pos,
                       token, similarity, region_id, context (issue 14)

Each dictionary is one snapshot (``Store.dictionary_snapshot``, issue 18 A1): with ``--as-of TAG``
its exemplars, assignments, saturation curve, tokens and stop reason are those the build of that
tag published; dictionaries without that tag are left out. A query that reads the assignments of
a dictionary whose build has none (assigned only later, or not since it grew) fails in one line,
and so does a query that reads a match (``matches``, ``match_overlaps``, match questions) computed
from other builds than those snapshots: the match names the versions it used (rerun ep match).

Lance datasets reach DuckDB as Arrow objects with only the columns a view needs (DuckDB
cannot read float16 vectors, and never reads vectors unless a query asks for them).

Read-only (issue 8, item 13), by DuckDB's own means rather than by matching text: the
statement type from ``extract_statements`` admits queries (SELECT and everything DuckDB
parses as one: WITH, VALUES, FROM-first, SUMMARIZE, DESCRIBE, SHOW, UNPIVOT), PIVOT (a
MULTI statement, admitted when DuckDB also parses it as a subquery, which no write is),
EXPLAIN of an admitted statement, and PRAGMA/CALL, whose side effects the connection's
locks stop: ``enable_external_access = false`` (no files, ATTACH, INSTALL, LOAD, COPY) and
``lock_configuration = true`` (no SET, no configuration PRAGMA). Every other type (INSERT,
CREATE, COPY, ATTACH, SET, LOAD, ...) is refused, and each statement runs inside a
transaction that is rolled back, so even an admitted statement leaves the catalog as it was.
Result columns with repeated names are renamed the way DuckDB renames them (``region_id_1``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa

from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey, from_segment
from ep_store.sql.questions import DEFAULTS, questions
from ep_store.store.core import Store
from ep_store.store.snapshot import DictionarySnapshot, assignments_version, stale_match
from ep_store.tables import unique_columns

log = logging.getLogger(__name__)

# Statement types that only read, or whose side effects the connection's locks refuse.
READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.PRAGMA, duckdb.StatementType.CALL}
# EXPLAIN [ANALYZE] after any leading whitespace and comments (DuckDB keeps them in the text).
_EXPLAIN = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*EXPLAIN(?:\s+ANALY[SZ]E)?\b", re.IGNORECASE | re.DOTALL)
_LOCKED = ("configuration has been locked", "Permission Error", "disabled by configuration")
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

    def __init__(self, store: Store | str | Path, as_of: str | None = None,
                 span_labels: Callable[[dict], pa.Table] | None = None):
        """``span_labels`` maps an activation dataset's metadata to its corpus's labelled spans
        (doc_id, char_start, char_end, label), for questions that ``-- needs: span_labels``;
        the layers above pass ``ep_store.stages.corpus.dataset_span_labels`` (SQL reads no corpus)."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.span_labels = span_labels
        if not self.store.root.is_dir():
            raise UsageError(f"no store at {self.store.root}; harvest and build first (or pass --store)")
        self.as_of = _version_or_tag(as_of)
        self.con = duckdb.connect()
        self._n = 0
        self.registered: set[str] = set()
        self.snapshots: dict[DictionaryKey, DictionarySnapshot] = {}
        """The snapshot each view reads, by dictionary (issue 18, A1)."""
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
            # One snapshot per dictionary: exemplars, assignments and meta of one published build
            # (issue 18, A1); without --as-of the build meta.json publishes.
            snap = store.dictionary_snapshot(key, self.as_of, missing_ok=True)
            if snap is None:
                log.info("%s has no version %s; left out", key, self.as_of)
                continue
            keys.append(key)
            self.snapshots[key] = snap
            meta = snap.meta
            ds = store.dataset(snap.exemplars_path, snap.exemplars_version)
            dict_rows.append({
                "model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
                "percentile": float(key.percentile), "key": str(key), "theta": meta["theta"],
                "regions": ds.count_rows(), "tokens": meta["tokens"], "width": meta["width"],
                "calibration_tokens": meta["calibration"]["tokens"], "stop_reason": meta["stop_reason"],
                "lance_version": ds.version, "tags": ",".join(sorted(meta["tags"])),
            })
            ex = self._relation(ds.scanner(columns=EXEMPLAR_COLUMNS))
            ex_parts.append(f"SELECT {_dict_cols(key)}, *, member_count AS build_members FROM {ex}")
            vec = self._relation(ds)
            select = f"SELECT {_dict_cols(key)}, region_id, exemplar, mean_direction FROM {vec}"
            vec_parts.append((meta["width"], select))
            vec_by_width.setdefault(meta["width"], []).append(select)
            if snap.assignments_version is not None:
                asg = self._relation(store.dataset(snap.assignments_path, snap.assignments_version))
                asg_parts.append(f"SELECT {_dict_cols(key)}, doc_id, pos, region_id, distance FROM {asg}")
            elif store.exists(snap.assignments_path):
                # Assignments exist but none belong to this build: a query that reads this
                # dictionary's assignments fails in one line instead of mixing builds (issue 18,
                # A1); queries about other dictionaries never evaluate this part.
                # Every column raises too, so no filter on them can fold the part away.
                fail = f"error('{_q(snap.assignments_missing)}')"
                asg_parts.append(f"SELECT {_dict_cols(key)}, {fail}::BIGINT AS doc_id, {fail}::INTEGER AS pos, "
                                 f"{fail}::INTEGER AS region_id, {fail}::FLOAT AS distance FROM range(1) "
                                 f"WHERE {fail} IS NULL")
            regions = 0
            size = meta["build"]["batch_size"]
            for batch, new in enumerate(meta["saturation_curve"]):
                regions += new
                # The last batch may be partial: tokens never exceed those the build streamed.
                sat_rows.append({"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
                                 "percentile": float(key.percentile), "batch": batch, "new_regions": new,
                                 "regions": regions, "tokens": min((batch + 1) * size, meta["tokens"])})
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
                    "NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::VARCHAR AS token, "
                    "NULL::BIGINT AS build_members LIMIT 0"))
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
        self._register_saes()
        self._register_searches()
        self._register_foreign(keys)
        return keys

    def _register_foreign(self, keys: list[DictionaryKey]) -> None:
        """The view ``foreign_assignments``: each dictionary's assignments over other activation
        datasets (``dictionaries/<key>/foreign/<model>/<checkpoint>/L<layer>.lance``, the latest
        version written from the snapshot's exemplars: issue 18, A1), keyed by the dictionary and
        by the activations (issue 18, D11). One written from other exemplars fails in one line
        when a query reads it."""
        parts = []
        for key in keys:
            snap = self.snapshots[key]
            for path in sorted((self.store.dictionary_dir(key) / "foreign").glob("*/*/L*.lance")):
                model, checkpoint = from_segment(path.parent.parent.name), from_segment(path.parent.name)
                cols = (f"{_dict_cols(key)}, '{_q(model)}' AS activations_model, '{_q(checkpoint)}' "
                        f"AS activations_checkpoint, {int(path.stem[1:])} AS activations_layer")
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
        for meta_path in sorted((self.store.root / "matches").glob("*/meta.json")):
            folder, meta = meta_path.parent, self.store.read_json(meta_path)
            if any(DictionaryKey.parse(meta[side]) not in self.snapshots for side in ("a", "b")):
                continue
            stale = stale_match(meta, self.snapshots)
            if stale:
                pairs.append(_failing_part(meta, stale, MATCH_COLUMNS))
                if meta.get("overlaps_version") is not None:
                    overlaps.append(_failing_part(meta, stale, OVERLAP_COLUMNS))
                continue
            pairs.append(f"SELECT * FROM {self._relation(self.store.dataset(folder / 'pairs.lance', meta['pairs_version']))}")
            if meta.get("overlaps_version") is not None:
                overlaps.append("SELECT * FROM " + self._relation(
                    self.store.dataset(folder / "overlaps.lance", meta["overlaps_version"])))
        self.con.execute("CREATE VIEW matches AS " + _union(pairs, MATCHES_EMPTY))
        self.con.execute("CREATE VIEW match_overlaps AS " + _union(overlaps, OVERLAPS_EMPTY))

    def _register_saes(self):
        """SAE views (issue 11): trained SAEs and the held-out tables of ep sae compare."""
        rows = []
        for key in self.store.list_saes():
            meta = self.store.read_json(self.store.sae_dir(key) / "meta.json")
            rows.append({"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer, "name": key.name,
                         "library": meta["library"], "library_version": meta["library_version"],
                         "architecture": meta["architecture"], "width": meta["width"], "k": meta["k"],
                         "tokens": meta["tokens"], "seconds": meta["seconds"], "flops": meta["flops"]})
        self.con.register("_saes", pa.Table.from_pylist(rows, schema=SAES_SCHEMA))
        self.con.execute("CREATE VIEW saes AS SELECT * FROM _saes")
        acts, projections = [], []
        for key, name, folder in self.store.list_sae_comparisons():
            cols = f"{_dict_cols(key)}, '{_q(name)}' AS sae"
            acts.append(f"SELECT {cols}, doc_id, pos, feature_id, activation FROM "
                        f"{self._relation(self.store.dataset(folder / 'sae_activations.lance'))}")
            projections.append(f"SELECT {cols}, doc_id, pos, region_id, projection FROM "
                               f"{self._relation(self.store.dataset(folder / 'ep_projections.lance'))}")
        key_empty = ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, "
                     "NULL::DOUBLE AS percentile, NULL::VARCHAR AS sae, NULL::BIGINT AS doc_id, NULL::INTEGER AS pos")
        self.con.execute("CREATE VIEW sae_activations AS " + _union(
            acts, f"{key_empty}, NULL::INTEGER AS feature_id, NULL::FLOAT AS activation LIMIT 0"))
        self.con.execute("CREATE VIEW ep_projections AS " + _union(
            projections, f"{key_empty}, NULL::INTEGER AS region_id, NULL::FLOAT AS projection LIMIT 0"))
        self.con.execute(SAE_FEATURES_VIEW)

    def _register_searches(self):
        parts = [f"SELECT * FROM {self._relation(self.store.dataset(path))}"
                 for path in sorted((self.store.root / "searches").glob("*.lance")) if self.store.exists(path)]
        self.con.execute("CREATE VIEW searches AS " + _union(parts, SEARCHES_EMPTY))

    def register_table(self, name: str, table: pa.Table) -> None:
        """Expose an in-memory Arrow table (e.g. span labels) as a view for this connection."""
        self.con.register(name, table)
        self.registered.add(name)

    # -- queries -----------------------------------------------------------------------------
    def query(self, sql: str, params: dict | None = None) -> pa.Table:
        """Run one read-only statement; DuckDB's own message on error.

        Returns the whole result as an Arrow table whose column names are unique.
        Raises UsageError for parse errors, more than one statement, a statement that would
        write (see the module docstring), and any error DuckDB reports.
        """
        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as err:
            raise UsageError(_one_line(err)) from None
        if len(statements) != 1:
            raise UsageError("pass exactly one SQL statement")
        refused = self.refusal(statements[0])
        if refused:
            raise UsageError(f"ep sql is read-only: {refused}; use a query (SELECT, WITH, PIVOT, SUMMARIZE, ...)")
        self.con.execute("BEGIN TRANSACTION")
        try:
            return unique_columns(self.con.sql(sql, params=params or None).to_arrow_table())
        except duckdb.Error as err:
            message = _one_line(err)
            if any(lock in message for lock in _LOCKED):
                message = f"ep sql is read-only: {message}"
            raise UsageError(message) from None
        finally:
            self.con.execute("ROLLBACK")

    def refusal(self, statement) -> str | None:
        """Why DuckDB's parsed ``statement`` may not run here, or None if it only reads."""
        kind = statement.type
        if kind in READ_STATEMENTS:
            return None
        if kind == duckdb.StatementType.MULTI and self._is_subquery(statement.query):
            return None  # PIVOT: DuckDB rewrites it into an enum type plus a SELECT
        if kind == duckdb.StatementType.EXPLAIN:
            inner, found = _EXPLAIN.subn("", statement.query, count=1)
            if not found:
                return "EXPLAIN in a form not understood is refused"
            try:
                parsed = self.con.extract_statements(inner)
            except duckdb.Error:
                return "EXPLAIN of an unparsed statement is refused"
            reason = self.refusal(parsed[0]) if len(parsed) == 1 else "EXPLAIN of several statements"
            return f"EXPLAIN of a write ({reason})" if reason else None
        return f"{kind.name} statements are refused"

    def _is_subquery(self, sql: str) -> bool:
        """Does DuckDB parse ``sql`` as a table expression (something that can only be read)?"""
        try:
            return len(self.con.extract_statements(f"SELECT * FROM (\n{sql}\n)")) == 1
        except duckdb.Error:
            return False

    def require_current_match(self, meta: dict) -> None:
        """Refuse (UsageError, one line naming the rerun) a stored match, given by its meta.json,
        that was computed from other builds than the snapshots this connection reads (issue 18, A1).
        Raises UsageError for a dictionary of it that is not among ``keys`` too."""
        self.require(meta["a"])
        self.require(meta["b"])
        stale = stale_match(meta, self.snapshots)
        if stale:
            raise UsageError(stale)

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
SAES_SCHEMA = pa.schema([
    ("model", pa.string()), ("checkpoint", pa.string()), ("layer", pa.int32()), ("name", pa.string()),
    ("library", pa.string()), ("library_version", pa.string()), ("architecture", pa.string()),
    ("width", pa.int64()), ("k", pa.int64()), ("tokens", pa.int64()), ("seconds", pa.float64()),
    ("flops", pa.float64()),
])
FOREIGN_EMPTY = ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS checkpoint, NULL::INTEGER AS layer, "
                 "NULL::DOUBLE AS percentile, NULL::VARCHAR AS activations_model, NULL::VARCHAR AS "
                 "activations_checkpoint, NULL::INTEGER AS activations_layer, NULL::BIGINT AS doc_id, "
                 "NULL::INTEGER AS pos, NULL::INTEGER AS region_id, NULL::FLOAT AS distance LIMIT 0")

SAE_FEATURES_VIEW = """
CREATE VIEW sae_features AS
SELECT model, checkpoint, layer, percentile, sae, feature_id, count(*) AS active_tokens,
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
    "NULL::DOUBLE AS percentile, NULL::VARCHAR AS query, NULL::INTEGER AS query_region, NULL::INTEGER AS rank, "
    "NULL::BIGINT AS doc_id, NULL::INTEGER AS pos, NULL::VARCHAR AS token, NULL::DOUBLE AS similarity, "
    "NULL::INTEGER AS region_id, NULL::VARCHAR AS context LIMIT 0"
)


# -- canned questions ------------------------------------------------------------------------------
def ask_pair(db: StoreDB, a: DictionaryKey, b: DictionaryKey, name: str, **params) -> pa.Table:
    """Run a canned two-dictionary question ($a_*, $b_* parameters, $a and $b keys).

    Raises UsageError for an unknown question or one that asks about a single dictionary, for
    a ``same_stream`` question over activations of different documents (issue 18, A3), and for
    a ``match`` question whose stored match was computed from other builds (issue 18, A1).
    """
    question = _question(name, pair=True)
    check_options(params)
    bound = {"a": str(a), "b": str(b), **DEFAULTS, **params}
    for prefix, key in (("a", a), ("b", b)):
        bound |= {f"{prefix}_model": key.model, f"{prefix}_checkpoint": key.checkpoint,
                  f"{prefix}_layer": key.layer, f"{prefix}_percentile": float(key.percentile)}
    if "same_stream" in question.needs:  # it pairs A's tokens with B's (issue 18, A3)
        from ep_store.store.streams import require_same_stream

        require_same_stream(db.store, a.activations, b.activations, f"{name} of {a} and {b}")
    match_meta = db.store.matches_dir(f"{a.slug()}__{b.slug()}") / "meta.json"
    if "match" in question.needs and match_meta.is_file():  # not one of other builds (issue 18, A1)
        db.require_current_match(db.store.read_json(match_meta))
    if "span_labels" in question.needs and "span_labels" not in db.registered:
        if db.span_labels is None:
            raise UsageError(f"{name} needs the span labels of {b}'s corpus: open the StoreDB with span_labels= "
                             "(ep_store.stages.corpus.dataset_span_labels)")
        meta = db.store.info(db.store.activation_path(b.activations)).meta
        db.register_table("span_labels", db.span_labels(meta))  # B's chat markers and refusals
    return db.query(question.sql, {k: bound[k] for k in question.params})


OPTION_MAX = 2**31 - 1  # questions do arithmetic on positions (pos +- context) in DuckDB integers


def check_options(params: dict) -> None:
    """Refuse question options out of range (UsageError): ``--context`` below 0, the others below 1,
    any beyond ``OPTION_MAX`` (DuckDB would overflow on ``pos + context``)."""
    for name, value in params.items():
        if name not in DEFAULTS or value is None:
            continue
        low = 0 if name == "context" else 1
        if not low <= value <= OPTION_MAX:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [{low}, {OPTION_MAX}], got {value}")


def ask(db: StoreDB, key: DictionaryKey | str, name: str, **params) -> pa.Table:
    """Run a canned question for one dictionary.

    Raises UsageError for an unknown question, an unknown dictionary, or a pair question.
    """
    question = _question(name, pair=False)
    check_options(params)
    key = db.require(key)
    bound = {"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
             "percentile": float(key.percentile), "key": str(key), **DEFAULTS, **params}
    return db.query(question.sql, {k: bound[k] for k in question.params})


def ask_any(db: StoreDB, key: str, name: str, against: str | None = None, **params) -> pa.Table:
    """``ep stats``: a one-dictionary question for KEY, or a pair question for KEY against B."""
    question = _question(name, pair=None)
    if question.pair and against is None:
        raise UsageError(f"{name} compares two dictionaries: pass --against B (ep stats A {name} --against B)")
    if not question.pair and against is not None:
        raise UsageError(f"{name} asks about one dictionary; drop --against")
    unused = sorted(k for k, v in params.items() if v is not None and k not in question.params)
    if unused:
        raise UsageError(f"{name} takes no --{unused[0].replace('_', '-')}; its options: "
                         f"{', '.join(question.options) or 'none'}")
    params = {k: v for k, v in params.items() if v is not None}
    if question.pair:
        return ask_pair(db, db.require(key), db.require(against), name, **params)
    return ask(db, key, name, **params)


def question_table() -> pa.Table:
    """Every canned question: name, whether it is a pair question, options, needs, description."""
    rows = [{"question": q.name, "pair": q.pair, "options": ",".join(q.options), "needs": ",".join(q.needs),
             "description": q.description} for q in questions().values()]
    return pa.Table.from_pylist(rows)


def statement_parameters(sql: str) -> set[str]:
    """The named parameters DuckDB finds in one statement (checks question headers)."""
    return set(duckdb.connect().extract_statements(sql)[0].named_parameters)


def _question(name: str, pair: bool | None):
    registry = questions()
    if name not in registry:
        raise UsageError(f"unknown question {name!r}; choose one of: {', '.join(registry)}")
    question = registry[name]
    if pair is not None and question.pair != pair:
        raise UsageError(f"{name} is a {'pair' if question.pair else 'one-dictionary'} question")
    return question
