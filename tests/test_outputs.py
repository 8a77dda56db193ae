"""Every output is exactly what it claims to be (issue 8, part C, items 9-13).

stdout carries only data, result columns keep their own names and values, JSON is strict,
canned questions run from the command that lists them, and `ep sql` accepts every read-only
statement DuckDB parses while refusing every write.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ep_store import jsonio
from ep_store.analysis.match import MatchConfig, match
from ep_store.cli.main import main
from ep_store.sql.db import StoreDB, statement_parameters
from ep_store.sql.questions import questions
from ep_store.stages.build import BuildConfig, build
from ep_store.store.core import Store
from tests.conftest import ROOT, tree_snapshot

A, B = "tiny/base/L1/p5", "tiny/base/L2/p5"
DUP_QUERY = ("SELECT a.region_id, b.region_id FROM exemplars a JOIN exemplars b ON a.model = b.model "
             "AND a.layer = b.layer AND a.percentile = b.percentile WHERE a.region_id = 0 AND b.region_id IN (5, 6) "
             "AND a.layer = 2 ORDER BY b.region_id DESC")


@pytest.fixture(scope="module")
def paired(tiny_store, tmp_path_factory):
    """tiny/base L1/p5 and L2/p5 (same stream, assigned) and their match."""
    root = tmp_path_factory.mktemp("outputs") / "store"
    shutil.copytree(tiny_store, root)
    store = Store(root)
    common = dict(calibration_tokens=1000, calibration_batch=250, batch_size=256, saturation_window=50, device="cpu")
    for layer in (1, 2):
        build(BuildConfig("tiny", "base", layer, 5.0, **common), store, progress=False)
    match(MatchConfig(A, B, method="both"), store)
    return root


def cli(args):
    return CliRunner().invoke(main, args)


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as strict readers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def summary_of(result) -> dict:
    lines = result.stderr.strip().splitlines()
    return strict_loads(lines[-1])


# -- item 9: stdout is only data -------------------------------------------------------------------
def test_csv_and_json_on_stdout_are_exactly_the_rows(paired):
    query = "SELECT model, layer, region_id, member_count, token FROM exemplars ORDER BY layer, region_id"
    expected = StoreDB(paired).query(query).to_pylist()
    result = cli(["sql", query, "--store", str(paired), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(expected) > 10
    assert [(r["region_id"], r["token"]) for r in rows] == [(str(e["region_id"]), e["token"]) for e in expected]
    assert summary_of(result)["rows"] == len(expected)

    result = cli(["sql", query, "--store", str(paired), "--format", "json"])
    parsed = [strict_loads(line) for line in result.stdout.splitlines()]
    assert parsed == expected
    assert summary_of(result)["rows"] == len(expected)


def test_shell_redirect_gives_a_clean_csv(paired, tmp_path):
    """The real streams, not CliRunner's: `ep sql ... --format csv > f.csv`."""
    out = tmp_path / "f.csv"
    with out.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "ep_store", "sql", "SELECT region_id FROM exemplars WHERE layer = 2",
                               "--format", "csv", "--store", str(paired)], stdout=f, stderr=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(out.open()))
    n = StoreDB(paired).query("SELECT count(*) AS n FROM exemplars WHERE layer = 2").column("n")[0].as_py()
    assert rows[0] == ["region_id"] and len(rows) == n + 1
    assert all(r[0].isdigit() for r in rows[1:])
    assert strict_loads(done.stderr.strip().splitlines()[-1])["rows"] == n


@pytest.mark.parametrize("args", [
    ["store", "ls"], ["stats", B], ["stats", B, "top_tokens", "--format", "json"], ["sql", "SELECT 1 AS x"],
    ["models", "ls", "--models-dir", "{models}"],
])
def test_every_data_command_keeps_its_summary_off_stdout(paired, models_dir, args):
    args = [a.replace("{models}", str(models_dir)) for a in args]
    result = cli([*args] + (["--store", str(paired)] if args[0] != "models" else []))
    assert result.exit_code == 0, result.output
    assert isinstance(summary_of(result), dict)
    for line in result.stdout.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        assert not isinstance(value, dict) or not {"rows", "datasets", "local"} & set(value), line


# -- item 10: duplicate column names --------------------------------------------------------------
def test_duplicate_column_names_keep_their_values(paired, tmp_path):
    expected = [(0, 6), (0, 5)]
    table = StoreDB(paired).query(DUP_QUERY)
    assert table.column_names == ["region_id", "region_id_1"]
    assert list(zip(*[table.column(i).to_pylist() for i in range(2)])) == expected

    csv_out = cli(["sql", DUP_QUERY, "--store", str(paired), "--format", "csv"])
    assert list(csv.reader(io.StringIO(csv_out.stdout))) == [["region_id", "region_id_1"], ["0", "6"], ["0", "5"]]
    json_out = cli(["sql", DUP_QUERY, "--store", str(paired), "--format", "json"])
    assert [strict_loads(line) for line in json_out.stdout.splitlines()] == [
        {"region_id": 0, "region_id_1": 6}, {"region_id": 0, "region_id_1": 5}]
    text = cli(["sql", DUP_QUERY, "--store", str(paired)]).stdout.splitlines()
    assert text[0].split() == ["region_id", "region_id_1"] and [r.split() for r in text[2:]] == [["0", "6"], ["0", "5"]]
    for suffix in ("parquet", "csv", "json"):
        path = tmp_path / f"x.{suffix}"
        assert cli(["sql", DUP_QUERY, "--store", str(paired), "--output", str(path)]).exit_code == 0
        if suffix == "parquet":
            back = pq.read_table(path)
            assert back.column_names == ["region_id", "region_id_1"]
            assert back.to_pylist() == [{"region_id": 0, "region_id_1": 6}, {"region_id": 0, "region_id_1": 5}]
        elif suffix == "csv":
            assert list(csv.reader(path.open()))[1:] == [["0", "6"], ["0", "5"]]
        else:
            assert [strict_loads(x)["region_id_1"] for x in path.read_text().splitlines()] == [6, 5]


def test_renaming_follows_duckdb(paired):
    """Names our renaming makes equal the ones DuckDB makes for a subquery's columns."""
    db = StoreDB(paired)
    inner = "SELECT 1 AS a, 2 AS a, 3 AS a_1, 4 AS a, 5 AS b"
    ours = db.query(inner).column_names
    duck = db.query(f"SELECT * FROM ({inner})").column_names
    assert ours == duck and len(set(ours)) == 5


# -- item 11: strict JSON -------------------------------------------------------------------------
def test_non_finite_values_become_null(paired, tmp_path):
    query = "SELECT 'nan'::DOUBLE AS x, 'inf'::DOUBLE AS y, '-inf'::FLOAT AS z, 1.5 AS w, [1.0, 'nan'::DOUBLE] AS v"
    result = cli(["sql", query, "--store", str(paired), "--format", "json", "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    want = {"x": None, "y": None, "z": None, "w": 1.5, "v": [1.0, None]}
    assert strict_loads(result.stdout) == want
    assert strict_loads((tmp_path / "r.json").read_text()) == want
    import numpy as np

    assert strict_loads(jsonio.dumps({"a": float("nan"), "b": np.float32("inf"), "c": [np.nan, 2], "d": np.int64(3)})) \
        == {"a": None, "b": None, "c": [None, 2], "d": 3}
    # keys as JSON has them, numpy scalar keys included (a region id from np.unique), sortable when mixed
    assert strict_loads(jsonio.dumps({np.int64(7): 1, 3: np.float64("nan"), "k": 2}, sort_keys=True)) \
        == {"7": 1, "3": None, "k": 2}


def test_no_json_written_around_the_strict_helper():
    """The kind: every json.dump/dumps in the code goes through ep_store.jsonio."""
    offenders = []
    for path in [*(ROOT / "ep_store").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]:
        if path.name == "jsonio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("dump", "dumps") and \
                    isinstance(node.value, ast.Name) and node.value.id == "json":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_written_metadata_is_strict_json(paired):
    for path in paired.rglob("*.json"):
        strict_loads(path.read_text())


def test_views_named_in_help_are_the_views(paired):
    """The same kind as item 12: what help lists exists, and what exists is listed."""
    import re

    help_text = " ".join(cli(["sql", "--help"]).output.split())
    named = set(re.search(r"Views: ([^.]*)\.", help_text).group(1).replace(" ", "").split(","))
    views = {r["view_name"] for r in StoreDB(paired).query(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal").to_pylist() if not r["view_name"].startswith("_")}
    views = {re.sub(r"_d\d+$", "_d<width>", v) for v in views}
    assert named == views


# -- item 12: questions run where they are listed ------------------------------------------------
def test_declared_parameters_are_duckdbs():
    for q in questions().values():
        assert set(q.params) == statement_parameters(q.sql), q.name
        assert len(set(q.params)) == len(q.params)


def test_every_listed_question_runs_from_its_command(paired):
    help_text = cli(["stats", "--help"]).output
    listing = cli(["stats", A, "--store", str(paired), "--format", "json"])
    listed = {strict_loads(line)["question"]: strict_loads(line) for line in listing.stdout.splitlines()}
    assert set(listed) == set(questions())
    for q in questions().values():
        assert q.usage().split(":")[0] in help_text, q.name
        args = ["stats", A, q.name, "--store", str(paired), "--format", "json"]
        args += ["--against", B] if q.pair else []
        for option in q.options:  # every declared option is accepted
            args += [f"--{option.replace('_', '-')}", "2"]
        result = cli(args)
        assert result.exit_code == 0, (q.name, result.output)
        assert summary_of(result)["question"] == q.name
        assert listed[q.name]["pair"] == q.pair


def test_pair_question_answers_and_refusals(paired):
    result = cli(["stats", A, "same_tokens", "--against", B, "--store", str(paired), "--format", "json"])
    assert strict_loads(result.stdout) == {"shared": 3000, "differing": 0}
    overlap = cli(["stats", A, "membership_overlap", "--against", B, "--store", str(paired), "--format", "json"])
    assert sum(strict_loads(x)["overlap"] for x in overlap.stdout.splitlines()) == 3000
    from tests.test_cli_errors import assert_refused

    assert_refused(cli(["stats", A, "transitions", "--store", str(paired)]), "--against")
    assert_refused(cli(["stats", A, "top_tokens", "--against", B, "--store", str(paired)]), "drop --against")
    assert_refused(cli(["stats", A, "saturation", "--limit", "3", "--store", str(paired)]), "takes no --limit")


# -- item 13: read-only by DuckDB's statement types and locks -----------------------------------
READS = [
    "SELECT 1 AS x",
    "WITH r AS (SELECT region_id FROM exemplars) SELECT count(*) FROM r",
    "VALUES (1, 'a'), (2, 'b')",
    "FROM dictionaries SELECT key",
    "PIVOT tokens ON layer USING count(*)",
    "PIVOT (SELECT layer, model FROM tokens) ON layer USING count(*) GROUP BY model",
    "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v",
    "SUMMARIZE dictionaries",
    "DESCRIBE exemplars",
    "DESCRIBE SELECT 1 AS x",
    "SHOW TABLES",
    "SHOW exemplars",
    "EXPLAIN SELECT * FROM exemplars",
    "EXPLAIN ANALYZE SELECT count(*) FROM assignments",
    "/* lead */ -- comments\n explain  analyse SELECT 1",
    "PRAGMA show_tables",
    "PRAGMA table_info('exemplars')",
    "CALL pragma_version()",
    "SELECT 1 AS x -- a trailing comment",
]
WRITES = [
    ("CREATE TABLE x AS SELECT 1", "CREATE"),
    ("CREATE TEMP TABLE x AS SELECT 1", "CREATE"),
    ("CREATE VIEW exemplars2 AS SELECT 1", "CREATE"),
    ("CREATE OR REPLACE VIEW exemplars AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(a) AS a", "CREATE"),
    ("CREATE TABLE p AS PIVOT tokens ON layer USING count(*)", "MULTI"),
    ("INSERT INTO exemplars SELECT * FROM exemplars", "INSERT"),
    ("UPDATE exemplars SET region_id = 0", "UPDATE"),
    ("DELETE FROM exemplars", "DELETE"),
    ("DROP VIEW exemplars", "DROP"),
    ("ALTER VIEW exemplars RENAME TO e", "ALTER"),
    ("COPY (SELECT 1) TO 'out.csv'", "COPY"),
    ("EXPORT DATABASE 'dump'", "EXPORT"),
    ("ATTACH 'other.db'", "ATTACH"),
    ("DETACH memory", "DETACH"),
    ("USE memory", "SET"),
    ("SET enable_external_access = true", "SET"),
    ("SET VARIABLE v = 1", "SET"),
    ("RESET threads", "SET"),
    ("PRAGMA threads = 1", "SET"),
    ("PRAGMA enable_profiling", "locked"),
    ("CALL enable_logging()", "locked"),
    ("INSTALL lance", "LOAD"),
    ("LOAD json", "LOAD"),
    ("BEGIN TRANSACTION", "TRANSACTION"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("VACUUM", "VACUUM"),
    ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", "EXPLAIN of a write"),
    ("EXPLAIN INSERT INTO exemplars SELECT * FROM exemplars", "EXPLAIN of a write"),
    ("/* c */ EXPLAIN ANALYZE -- x\n CREATE TABLE x AS SELECT 1", "EXPLAIN of a write"),
    ("SELECT * FROM read_csv('/etc/hostname')", "Permission Error"),
]


def test_read_only_statements_run(paired):
    db = StoreDB(paired)
    for statement in READS:
        assert db.query(statement).num_rows >= 1, statement
    pivot = db.query("PIVOT (SELECT layer, model FROM tokens) ON layer USING count(*) GROUP BY model").to_pylist()
    counts = db.query("SELECT layer, count(*) AS n FROM tokens GROUP BY layer").to_pylist()
    assert pivot == [{"model": "tiny", **{str(c["layer"]): c["n"] for c in counts}}]
    assert cli(["sql", "PIVOT tokens ON layer USING count(*)", "--store", str(paired)]).exit_code == 0


def test_writes_are_refused_and_change_nothing(paired):
    from ep_store.errors import UsageError
    from tests.test_cli_errors import assert_refused

    db = StoreDB(paired)
    catalog = "SELECT count(*) AS n FROM duckdb_views() WHERE NOT internal"
    views, regions = db.query(catalog).to_pylist(), db.query("SELECT count(*) AS n FROM exemplars").to_pylist()
    before = tree_snapshot(paired)
    for statement, needle in WRITES:
        with pytest.raises(UsageError) as err:
            db.query(statement)
        assert "read-only" in str(err.value) and needle in str(err.value), (statement, str(err.value))
    assert db.query(catalog).to_pylist() == views
    assert db.query("SELECT count(*) AS n FROM exemplars").to_pylist() == regions
    assert db.query("SELECT current_setting('enable_external_access') AS v").column("v")[0].as_py() is False
    assert_refused(cli(["sql", "CREATE TABLE p AS PIVOT tokens ON layer USING count(*)", "--store", str(paired)]),
                   "read-only")
    assert tree_snapshot(paired) == before


def test_a_replaced_output_folder_is_never_the_store_or_the_working_folder(tiny_store, tmp_path, monkeypatch):
    """The same kind of fault as ``ep export saelens --overwrite`` deleting its --out: every
    command that replaces an output folder whole (evaluations, plots, exports) goes through
    ``store.layout.check_replaceable``, so a store, a folder holding one, the working folder or one
    above it is refused before any work, and nothing is touched."""
    from ep_store.errors import UsageError
    from ep_store.evaluate.output import output_folder

    monkeypatch.chdir(tmp_path)
    before = tree_snapshot(tiny_store)
    for out, needle in ((tiny_store, "Lance datasets"), (tiny_store.parent, "Lance datasets"),
                        (tiny_store / "activations" / "tiny" / "base" / "L1.lance", "Lance datasets"),
                        (tmp_path, "working folder"), (tmp_path.parent, "working folder"), (".", "working folder")):
        with pytest.raises(UsageError, match=needle), output_folder(out):
            raise AssertionError("the body must not run")
    assert tree_snapshot(tiny_store) == before
    with output_folder(tmp_path / "fresh") as tmp:  # a new folder is fine
        (tmp / "x.txt").write_text("ok")
    assert (tmp_path / "fresh" / "x.txt").read_text() == "ok"
