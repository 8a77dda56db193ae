"""Issue 18, A1 leftovers: a stored match names the builds it was computed from, and every reader
of it (ep diff, the matches views, match questions) refuses it once a dictionary has moved on;
ep store ls, ep store verify and ep sae compare read the published snapshot."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from ep_store.analysis.match import MatchConfig, match
from ep_store.analysis.verify import VerifyConfig, verify
from ep_store.cli.main import main
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask, ask_pair
from ep_store.stages.build import BuildConfig, build
from ep_store.store.catalog import catalog
from ep_store.store.core import Store
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused

A = DictionaryKey("tiny", "base", 2, 5.0)
B = DictionaryKey("tiny", "base", 1, 5.0)


@pytest.fixture()
def store(tiny_store, tmp_path):
    shutil.copytree(tiny_store, tmp_path / "store")
    return Store(tmp_path / "store")


def cfg(key, **over):
    base = dict(calibration_tokens=1000, calibration_batch=250, batch_size=256, saturation_window=50, device="cpu")
    return BuildConfig(key.model, key.checkpoint, key.layer, key.percentile, **{**base, **over})


def cli(*args):
    return CliRunner().invoke(main, [*args])


def matched_then_grown(store) -> dict:
    """A built on its first 1000 tokens, B whole, ``ep match A B``, then A grown to the whole stream."""
    build(cfg(A, max_tokens=1000), store, progress=False)
    build(cfg(B), store, progress=False)
    summary = match(MatchConfig(str(A), str(B), method="both"), store)
    build(cfg(A), store, progress=False)
    assert store.dictionary_snapshot(A).exemplars_version == 2
    return summary


def test_match_records_the_builds_it_was_computed_from(store):
    summary = matched_then_grown(store)
    recorded = summary["snapshots"]
    assert recorded["a"] == {"key": str(A), "exemplars_version": 1, "assignments_version": 1}
    assert recorded["b"]["key"] == str(B) and recorded["b"]["exemplars_version"] == 1
    vector = match(MatchConfig(str(B), str(A), method="vector"), store)
    assert vector["snapshots"]["b"] == {"key": str(A), "exemplars_version": 2, "assignments_version": None}


def test_diff_refuses_a_match_of_an_earlier_build_and_a_rerun_works(store, tmp_path, models_dir):
    matched_then_grown(store)
    root, out = str(store.root), tmp_path / "diff"
    before = tree_snapshot(store.root)
    # Old code: the report paired the match of A's 1000-token build with A's grown exemplars.
    result = cli("diff", str(A), str(B), "--out", str(out), "--store", root, "--models-dir", str(models_dir))
    assert_refused(result, f"match {A} {B} was computed from {A} at exemplars version 1 (assignments version 1), "
                           f"but its published build is exemplars version 2")
    assert f"rerun: ep match {A} {B}" in result.output
    assert not out.exists() and tree_snapshot(store.root) == before
    # The match questions and the views refuse it too; other pairs still read.
    assert_refused(cli("stats", str(A), "transitions", "--against", str(B), "--store", root),
                   "was computed from tiny/base/L2/p5 at exemplars version 1")
    with pytest.raises(UsageError, match="rerun: ep match"):
        StoreDB(store).query("SELECT count(*) FROM matches WHERE a = $a AND b = $b", {"a": str(A), "b": str(B)})
    with pytest.raises(UsageError, match="rerun: ep match"):
        StoreDB(store).query("SELECT count(*) FROM match_overlaps")
    match(MatchConfig(str(B), str(A), method="vector"), store)
    fresh = StoreDB(store).query("SELECT count(*) AS n FROM matches WHERE a = $a AND b = $b", {"a": str(B), "b": str(A)})
    assert fresh.column("n")[0].as_py() > 0
    # Rerunning ep match recomputes from the published builds; then the diff works.
    assert cli("match", str(A), str(B), "--store", root).exit_code == 0
    result = cli("diff", str(A), str(B), "--out", str(out), "--store", root, "--models-dir", str(models_dir))
    assert result.exit_code == 0, result.output
    meta = store.read_json(store.matches_dir(f"{A.slug()}__{B.slug()}") / "meta.json")
    assert meta["snapshots"]["a"]["exemplars_version"] == 2
    regions = ask(StoreDB(store), A, "region_members").num_rows
    assert meta["regions_a"] == regions


def test_as_of_reads_only_matches_of_those_builds(store):
    matched_then_grown(store)
    # Version 1 of both: the builds the match was computed from.
    assert ask_pair(StoreDB(store, "1"), A, B, "transitions").num_rows > 0
    match(MatchConfig(str(A), str(B), method="both"), store)
    # Now the match is of A's latest build: reading it at A's earlier version is refused, without it works.
    with pytest.raises(UsageError, match=f"but {A} at 1 is exemplars version 1 .*; query the match without --as-of"):
        ask_pair(StoreDB(store, "1"), A, B, "transitions")
    assert ask_pair(StoreDB(store), A, B, "transitions").num_rows > 0


def test_match_without_recorded_builds_is_refused(store):
    build(cfg(A), store, progress=False)
    build(cfg(B), store, progress=False)
    match(MatchConfig(str(A), str(B), method="vector"), store)
    path = store.matches_dir(f"{A.slug()}__{B.slug()}") / "meta.json"
    meta = store.read_json(path)
    del meta["snapshots"]  # a match written before issue 18
    store.write_json(path, meta)
    with pytest.raises(UsageError, match="does not record which versions"):
        StoreDB(store).query("SELECT * FROM matches")


def unpublished_exemplars(store, key) -> None:
    """A Lance version of exemplars.lance that meta.json does not publish (a build killed before it)."""
    path = store.dictionary_dir(key) / "exemplars.lance"
    table = store.read_table(path)
    store.write_table(path, table.slice(0, 1).replace_schema_metadata(store.dataset(path).schema.metadata))


def test_store_ls_shows_the_published_build(store):
    build(cfg(A, max_tokens=1000), store, progress=False)
    build(cfg(A), store, progress=False)
    published = store.read_json(store.dictionary_dir(A) / "meta.json")
    unpublished_exemplars(store, A)
    row = next(r for r in catalog(store.root) if r["kind"] == "dictionary")
    # Old code: the latest Lance version (3) and its single row.
    assert (row["version"], row["rows"]) == (2, published["regions"])
    assert row["tags"] == {"tokens-1000": 1, f"tokens-{published['tokens']}": 2}
    listed = cli("store", "ls", "--store", str(store.root))
    line = next(x for x in listed.stdout.splitlines() if x.startswith("dictionary\t"))
    assert line.split("\t")[2:5] == [str(published["regions"]), "64", "2"]
    assert json.loads(line.split("\t")[5]) == row["tags"]


def test_verify_compares_the_published_assignments(store, tmp_path):
    build(cfg(A), store, progress=False)
    copy = Store(tmp_path / "copy")
    shutil.copytree(store.root, copy.root)
    # An assignments version not written from the published exemplars (a stale or foreign write).
    path = copy.dictionary_dir(A) / "assignments.lance"
    table = copy.read_table(path)
    copy.write_table(path, table.slice(0, 10).replace_schema_metadata({}))
    found = {r.path: r for r in verify(VerifyConfig(copy.root, store.root))}
    asg = found["dictionaries/tiny/base/L2/p5/assignments.lance"]
    # Old code: compared the 10-row latest version with the reference and called it different.
    assert asg.verdict == "identical", asg
    unpublished_exemplars(copy, A)  # old code: digest of the latest version, then "equivalent"
    again = {r.path: r.verdict for r in verify(VerifyConfig(copy.root, store.root))}
    assert again["dictionaries/tiny/base/L2/p5"] == "identical"


def test_foreign_assignments_view_reads_those_of_the_snapshot(store):
    """Same kind of fault in the foreign_assignments view: it read the latest version."""
    build(cfg(A, max_tokens=1000), store, progress=False)
    args = ["assign", "--dictionary", str(A), "--activations", "tiny/base/L1", "--store", str(store.root)]
    assert cli(*args).exit_code == 0
    count = "SELECT count(*) AS n, max(region_id) AS top FROM foreign_assignments"
    small = StoreDB(store).query(count).to_pylist()[0]
    build(cfg(A), store, progress=False)  # grown: the foreign assignments are of the earlier build
    with pytest.raises(UsageError, match="written from exemplars version 1, not the published 2"):
        StoreDB(store).query(count)
    assert StoreDB(store, "tokens-1000").query(count).to_pylist()[0] == small
    assert cli(*args).exit_code == 0
    assert StoreDB(store).query(count).to_pylist()[0]["n"] == small["n"]
    assert StoreDB(store, "tokens-1000").query(count).to_pylist()[0] == small  # its version is kept


def test_a_stale_match_fails_only_the_questions_that_read_it(store):
    """region_match_status joined every match to the dictionaries view, so one stale match in the
    store made the question fail for every dictionary; it now filters on the key and reads only
    the matches where the dictionary is B."""
    matched_then_grown(store)  # A -> B is stale
    match(MatchConfig(str(B), str(A), method="vector"), store)  # B -> A is current
    db = StoreDB(store)
    rows = ask(db, A, "region_match_status", limit=10**6).to_pylist()
    assert rows and {r["a"] for r in rows} == {str(B)}
    with pytest.raises(UsageError, match=f"rerun: ep match {A} {B}"):
        ask(db, B, "region_match_status")
