"""DuckDB SQL over the store: ``StoreDB``, a read-only connection, and the question runners.
Only ep_store.sql imports duckdb.

The views (registered by ep_store.sql.views when a connection opens; adding a dictionary
needs no registration). Every view carries the key columns ``model, checkpoint, layer, hook``
(``hook``: the hook point, ``resid_post`` unless harvested elsewhere; issue 21, item 4) and
``percentile`` where it applies, so any two can be joined:

    dictionaries       one row per dictionary: key, theta, regions, tokens, calibration, stop reason, version, tags
    exemplars          key, region_id, build_members (= member_count: members the build passed, not the
                       final assignment count; issue 18, D13), coherence, first doc_id/pos/token (no vectors)
    exemplar_vectors   key, region_id, exemplar and mean_direction as FLOAT[d] (FLOAT[] when widths differ;
                       exemplar_vectors_d<d> always holds FLOAT[d])
    assignments        key, doc_id, pos, region_id, distance (each dictionary over its own stream)
    foreign_assignments  key, activations_model/_checkpoint/_layer/_hook, doc_id, pos, region_id, distance: a
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

The canned questions (``queries/*.sql``, registry in ep_store.sql.questions) run through
``ask`` (one dictionary), ``ask_pair`` (two) and ``ask_any`` (``ep stats``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa

from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.sql.questions import DEFAULTS, questions
from ep_store.sql.views import Views
from ep_store.store.core import Store
from ep_store.store.snapshot import DictionarySnapshot, stale_match
from ep_store.tables import unique_columns

log = logging.getLogger(__name__)

# Statement types that only read, or whose side effects the connection's locks refuse.
READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.PRAGMA, duckdb.StatementType.CALL}
# EXPLAIN [ANALYZE] after any leading whitespace and comments (DuckDB keeps them in the text).
_EXPLAIN = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*EXPLAIN(?:\s+ANALY[SZ]E)?\b", re.IGNORECASE | re.DOTALL)
_LOCKED = ("configuration has been locked", "Permission Error", "disabled by configuration")


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
        self.registered: set[str] = set()
        views = Views(self.con, self.store, self.as_of)
        self.keys = views.register()
        self.snapshots: dict[DictionaryKey, DictionarySnapshot] = views.snapshots
        """The snapshot each view reads, by dictionary (issue 18, A1)."""
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

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
                  f"{prefix}_layer": key.layer, f"{prefix}_hook": key.hook,
                  f"{prefix}_percentile": float(key.percentile)}
    if "same_stream" in question.needs:  # it pairs A's tokens with B's (issue 18, A3)
        from ep_store.store.streams import require_same_stream

        require_same_stream(db.store, a.activations, b.activations, f"{name} of {a} and {b}")
    match_files = db.store.match_files(a, b)
    if "match" in question.needs and match_files.finished:  # not one of other builds (issue 18, A1)
        db.require_current_match(db.store.read_json(match_files.meta))
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
    bound = {"model": key.model, "checkpoint": key.checkpoint, "layer": key.layer, "hook": key.hook,
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
