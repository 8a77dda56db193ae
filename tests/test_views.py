"""SQL views name what they hold (issue 18, D11 and D13): foreign assignments are visible, and
the build's member count is told apart from the final assignment count."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.sql.db import StoreDB
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import assignment_path
from ep_store.store.core import Store

KEY = "tiny/base/L1/p10"


def built(tiny_store, tmp_path) -> Store:
    store = Store(tmp_path / "store")
    shutil.copytree(tiny_store, store.root)
    build(BuildConfig("tiny", "base", 1, 10.0, calibration_batch=256, batch_size=256, device="cpu"), store,
          progress=False)
    return store


def test_foreign_assignments_view(tiny_store, tmp_path):
    store = built(tiny_store, tmp_path)
    assert StoreDB(store).query("SELECT count(*) AS n FROM foreign_assignments").column("n")[0].as_py() == 0
    result = CliRunner().invoke(main, ["assign", "--dictionary", KEY, "--activations", "tiny/base/L2",
                                       "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    table = store.read_table(assignment_path(store, DictionaryKey.parse(KEY), ActivationKey.parse("tiny/base/L2")))
    got = StoreDB(store).query(
        "SELECT model, checkpoint, layer, percentile, activations_model, activations_checkpoint, activations_layer, "
        "doc_id, pos, region_id, distance FROM foreign_assignments ORDER BY doc_id, pos")
    assert got.num_rows == table.num_rows > 0
    first = got.to_pylist()[0]
    assert (first["model"], first["checkpoint"], first["layer"], first["percentile"]) == ("tiny", "base", 1, 10.0)
    assert (first["activations_model"], first["activations_checkpoint"], first["activations_layer"]) == (
        "tiny", "base", 2)
    expected = sorted(zip(*(table.column(c).to_pylist() for c in ("doc_id", "pos", "region_id"))))
    assert [(r["doc_id"], r["pos"], r["region_id"]) for r in got.to_pylist()] == expected
    # the dictionary's own assignments stay in `assignments`, untouched by the foreign ones
    own = StoreDB(store).query("SELECT count(*) AS n FROM assignments").column("n")[0].as_py()
    assert own == store.read_table(assignment_path(store, DictionaryKey.parse(KEY))).num_rows


def test_exemplars_name_build_members(tiny_store, tmp_path):
    store = built(tiny_store, tmp_path)
    db = StoreDB(store)
    rows = db.query("SELECT region_id, member_count, build_members FROM exemplars ORDER BY region_id").to_pylist()
    assert rows and all(r["build_members"] == r["member_count"] for r in rows)
    (tmp_path / "empty").mkdir()
    empty = StoreDB(Store(tmp_path / "empty"))  # the views exist, with their columns, in an empty store
    assert "build_members" in empty.query("SELECT * FROM exemplars").column_names
    assert "activations_layer" in empty.query("SELECT * FROM foreign_assignments").column_names


def test_region_browser_labels_both_sizes(tiny_store, tmp_path):
    from ep_store.analysis.report import dictionary_report

    store = built(tiny_store, tmp_path)
    dictionary_report(store.root, KEY, tmp_path / "browser")
    html = (tmp_path / "browser" / "index.html").read_text()
    assert "assigned tokens" in html and "build members" in html
