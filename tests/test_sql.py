"""SQL over the store: views, read-only lock, time travel, canned questions vs brute force, the browser."""

from __future__ import annotations

import collections
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ep_store.analysis.report import dictionary_report
from ep_store.cli.main import main
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask
from ep_store.stages.build import BuildConfig, build
from ep_store.store.core import Store
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused

KEY = DictionaryKey("tiny", "base", 2, 5.0)


@pytest.fixture(scope="module")
def built(tiny_store, tmp_path_factory):
    """The tiny store with tiny/base/L2/p5 grown in two builds and L1/p5 built once."""
    root = tmp_path_factory.mktemp("sql") / "store"
    shutil.copytree(tiny_store, root)
    store = Store(root)
    common = dict(calibration_tokens=1000, calibration_batch=250, batch_size=256, saturation_window=50, device="cpu")
    build(BuildConfig("tiny", "base", 2, 5.0, max_tokens=1000, **common), store, progress=False)
    build(BuildConfig("tiny", "base", 2, 5.0, **common), store, progress=False)
    build(BuildConfig("tiny", "base", 1, 5.0, **common), store, progress=False)
    return root


def cli(args):
    return CliRunner().invoke(main, args)


def test_exact_form_csv(built):
    result = cli(["sql", "SELECT model, checkpoint, layer, percentile, regions, tokens FROM dictionaries ORDER BY 1,2,3,4",
                  "--store", str(built), "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "model,checkpoint,layer,percentile,regions,tokens"
    meta = Store(built).read_json(Store(built).dictionary_dir(KEY) / "meta.json")
    assert lines[2] == f"tiny,base,2,5.0,{meta['regions']},3000"
    assert len(lines) == 3  # data only: the summary is on stderr
    assert json.loads(result.stderr.strip().splitlines()[-1])["rows"] == 2


def test_views_join_on_keys(built):
    db = StoreDB(built)
    for view in ("dictionaries", "exemplars", "exemplar_vectors", "assignments", "tokens", "saturation", "matches"):
        cols = db.query(f"SELECT * FROM {view} LIMIT 0").column_names
        assert {"model", "checkpoint", "layer"} <= set(cols) or view == "matches", view
    joined = db.query("""SELECT count(*) AS n FROM assignments a JOIN tokens t USING (model, checkpoint, layer, doc_id, pos)
                         WHERE a.layer = 2""").column("n")[0].as_py()
    assert joined == 3000
    sims = db.query("SELECT array_cosine_similarity(exemplar, exemplar) AS s FROM exemplar_vectors").column("s")
    assert np.allclose(sims.to_numpy(), 1.0, atol=1e-5)


def test_output_parquet_and_json(built, tmp_path):
    out = tmp_path / "r.parquet"
    result = cli(["sql", "SELECT region_id, member_count FROM exemplars WHERE layer = 2", "--store", str(built),
                  "--format", "json", "--output", str(out)])
    assert result.exit_code == 0
    table = pq.read_table(out)
    assert table.num_rows == len(result.stdout.strip().splitlines())
    assert json.loads(result.stdout.splitlines()[0]).keys() == {"region_id", "member_count"}


@pytest.mark.parametrize(("query", "needle"), [
    ("CREATE TABLE x AS SELECT 1", "read-only"),
    ("COPY (SELECT 1) TO 'out.csv'", "read-only"),
    ("ATTACH 'other.db'", "read-only"),
    ("INSTALL lance", "read-only"),
    ("SET enable_external_access = true", "read-only"),
    ("SELECT * FROM read_csv('/etc/hostname')", "Permission Error"),
    ("SELEC 1", "Parser Error"),
    ("SELECT * FROM no_such_view", "Catalog Error"),
    ("SELECT 1; SELECT 2", "exactly one"),
])
def test_refusals(built, query, needle):
    before = tree_snapshot(built)
    assert_refused(cli(["sql", query, "--store", str(built)]), needle)
    assert tree_snapshot(built) == before


def test_time_travel(built):
    now = StoreDB(built).query("SELECT regions, tokens FROM dictionaries WHERE layer = 2").to_pylist()[0]
    then = StoreDB(built, "tokens-1000").query("SELECT regions, tokens, lance_version FROM dictionaries").to_pylist()
    assert then[0]["tokens"] == 1000 and then[0]["lance_version"] == 1
    assert then[0]["regions"] < now["regions"]
    count = StoreDB(built, "1").query("SELECT count(*) AS n FROM exemplars WHERE layer = 2").column("n")[0].as_py()
    assert count == then[0]["regions"]
    assert_refused(cli(["sql", "SELECT 1", "--as-of", "tokens-77", "--store", str(built)]), "no dictionary has version")


def brute(built):
    store = Store(built)
    folder = store.dictionary_dir(KEY)
    asg = store.read_table(folder / "assignments.lance").to_pylist()
    toks = {(r["doc_id"], r["pos"]): r["token"] for r in
            store.read_table(store.activation_path(KEY.activations), columns=["doc_id", "pos", "token"]).to_pylist()}
    return store, asg, toks


def test_questions_match_brute_force(built):
    db = StoreDB(built)
    store, asg, toks = brute(built)
    sizes = collections.Counter(r["region_id"] for r in asg)
    # region sizes: buckets add up to every region and token
    buckets = ask(db, KEY, "region_sizes").to_pylist()
    assert sum(b["regions"] for b in buckets) == len(sizes)
    assert sum(int(b["tokens"]) for b in buckets) == len(asg)
    for b in buckets:
        assert b["regions"] == sum(1 for s in sizes.values() if b["size_from"] <= s <= b["size_to"])
    # top tokens: purity and entropy
    by_region = collections.defaultdict(collections.Counter)
    for r in asg:
        by_region[r["region_id"]][toks[(r["doc_id"], r["pos"])]] += 1
    for row in ask(db, KEY, "top_tokens", limit=10).to_pylist():
        counts = by_region[row["region_id"]]
        n = sum(counts.values())
        assert row["assigned_tokens"] == n
        assert row["purity"] == pytest.approx(max(counts.values()) / n, abs=1e-4)
        entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
        assert row["entropy_bits"] == pytest.approx(entropy, abs=1e-3)
        assert row["top_counts"][0] == max(counts.values())
    # top contexts: nearest members, with the member token in the middle
    contexts = ask(db, KEY, "top_contexts", limit=5, per_region=2, context=3).to_pylist()
    for c in contexts:
        members = sorted(r["distance"] for r in asg if r["region_id"] == c["region_id"])
        assert c["distance"] == pytest.approx(members[c["rank"] - 1], abs=1e-4)
        assert c["token"] == toks[(c["doc_id"], c["pos"])]
        left = "".join(toks.get((c["doc_id"], p), "") for p in range(c["pos"] - 3, c["pos"]))
        assert c["left_text"] == left
    # dead / singleton regions, saturation, distances
    dead = {r["region_id"] for r in ask(db, KEY, "dead_regions").to_pylist()}
    regions = store.read_json(store.dictionary_dir(KEY) / "meta.json")["regions"]
    assert dead == {k for k in range(regions) if sizes.get(k, 0) <= 1}
    sat = ask(db, KEY, "saturation").column("new_regions").to_pylist()
    assert sat == store.read_json(store.dictionary_dir(KEY) / "meta.json")["saturation_curve"]
    hist = ask(db, KEY, "distances").to_pylist()
    assert sum(h["tokens"] for h in hist) == len(asg)


def test_stats_cli_and_unknown_key(built):
    result = cli(["stats", str(KEY), "top_tokens", "--store", str(built), "--limit", "3"])
    assert result.exit_code == 0 and json.loads(result.stderr.splitlines()[-1])["rows"] == 3
    assert len(result.stdout.strip().splitlines()) == 2 + 3  # header, rule, rows
    assert_refused(cli(["stats", "tiny/base/L2/p9", "--store", str(built)]), "known: tiny/base/L1/p5, tiny/base/L2/p5")
    assert_refused(cli(["stats", str(KEY), "nonsense", "--store", str(built)]), "unknown question")


def test_report_writes_cards_and_plots(built, tmp_path):
    summary = dictionary_report(built, KEY, tmp_path / "rep")
    html = (tmp_path / "rep" / "index.html").read_text()
    regions = Store(built).read_json(Store(built).dictionary_dir(KEY) / "meta.json")["regions"]
    assert summary["regions"] == regions
    assert html.count('class="card"') == regions
    for png in ("saturation.png", "sizes.png", "distances.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no headless chromium installed (apt-get install chromium)")
def test_report_renders_in_browser(built, tmp_path):
    out = tmp_path / "rep"
    dictionary_report(built, KEY, out)
    url = (out / "index.html").as_uri()
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    regions = Store(built).read_json(Store(built).dictionary_dir(KEY) / "meta.json")["regions"]
    assert dom.count('class="card"') == regions
    assert re.search(r'data-plots-loaded="3"', dom), "plots did not load in the browser"
    shot = out / "screenshot.png"
    subprocess.run([*common, "--window-size=1280,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def _top_level(sql: str) -> str:
    """The SQL outside every parenthesis, comments removed: the clauses of the outermost SELECT."""
    depth, kept = 0, []
    for ch in re.sub(r"--[^\n]*", "", sql):
        depth += ch == "("
        if depth == 0:
            kept.append(ch)
        depth -= ch == ")"
    return " ".join("".join(kept).split()).upper()


def test_every_question_orders_its_rows():
    """DuckDB returns a GROUP BY in any order from run to run (parallel hash aggregation): every
    canned question must end in an ORDER BY so its rows, and anything written from them (match's
    overlaps.lance, the diff report) are byte-identical across runs. same_tokens is exempt: it
    returns one row (counts over a join, no GROUP BY)."""
    from ep_store.sql.questions import questions

    for name, question in questions().items():
        outer = _top_level(question.sql)
        if name == "same_tokens":
            assert "GROUP BY" not in outer
        else:
            assert "ORDER BY" in outer.rsplit("SELECT ", 1)[-1], name


def test_membership_overlap_rows_come_sorted(built):
    from ep_store.sql.db import ask_pair

    a, b = DictionaryKey("tiny", "base", 1, 5.0), KEY
    runs = [ask_pair(StoreDB(built), a, b, "membership_overlap").to_pylist() for _ in range(2)]
    pairs = [(r["region_a"], r["region_b"]) for r in runs[0]]
    assert len(pairs) > 10 and pairs == sorted(pairs)
    assert runs[0] == runs[1]
