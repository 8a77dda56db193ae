"""Logical digests (issue 8, item 20): content, not files, fragments or time."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pyarrow as pa
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import Store, logical_digest, vectors_to_arrow
from ep_store.store.digest import digest


def rows(n: int = 500, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "doc_id": pa.array(np.arange(n) // 50, pa.int64()),
        "pos": pa.array(np.arange(n) % 50, pa.int32()),
        "token": pa.array([None if i % 17 == 0 else "tok😀"[: i % 5] for i in range(n)]),
        "vector": vectors_to_arrow(rng.standard_normal((n, 16)).astype(np.float32), np.float32),
    })


def write(store: Store, name: str, table: pa.Table, cuts: list[int], meta: dict | None = None) -> ActivationKey:
    """``table`` appended as one commit per slice between ``cuts``: one fragment or many."""
    key = ActivationKey("m", name, 1)
    for part in np.split(np.arange(table.num_rows), cuts):
        store.append_activations(key, table.take(part), meta or {"name": name})
    return key


def test_fragment_layout_and_time_do_not_count(tmp_path):
    store, table = Store(tmp_path / "store"), rows()
    one = write(store, "one", table, [])
    many = write(store, "many", table, [1, 2, 60, 61, 250, 499])
    time.sleep(1.1)
    later = write(store, "later", table, [100, 300], meta={"written": time.time()})
    assert len(store.dataset(store.activation_path(many)).get_fragments()) == 7
    digests = {k.checkpoint: logical_digest(store.activation_path(k)) for k in (one, many, later)}
    assert digests["one"] == digests["many"] == digests["later"]
    assert digests["one"]["rows"] == 500


def test_any_changed_value_changes_the_digest(tmp_path):
    store, table = Store(tmp_path / "store"), rows()
    base = logical_digest(store.activation_path(write(store, "base", table, [])))["digest"]
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().copy()
    vectors[7 * 16 + 3] = np.nextafter(vectors[7 * 16 + 3], np.float32(np.inf))
    changed = {
        "one float ulp": table.set_column(3, "vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors), 16)),
        "a token": table.set_column(2, "token", pa.array(["x" if i == 3 else t for i, t in
                                                          enumerate(table.column("token").to_pylist())])),
        "null vs empty": table.set_column(2, "token", pa.array(["" if t is None else t for t in
                                                                table.column("token").to_pylist()])),
        "row order": table.take(np.r_[1, 0, 2:500]),
        "a dropped row": table.slice(0, 499),
    }
    tokens = table.column("token").to_pylist()  # tokens 1, 2 are "t", "to": move a byte across
    changed["a byte moved between tokens"] = table.set_column(2, "token", pa.array([tokens[0], "tt", "o", *tokens[3:]]))
    assert tokens[1:3] == ["t", "to"]
    for name, other in changed.items():
        assert logical_digest(store.activation_path(write(store, name.replace(" ", "-"), other, [10])))["digest"] \
            != base, name


def test_stages_run_twice_give_the_same_digests(models_dir, tmp_path):
    """Determinism on CPU, as README states: harvest, build, assign, match and the dictionary
    report of the tiny model, run twice into the same paths (as dvc repro does)."""
    from ep_store.analysis.diff import diff_report
    from ep_store.analysis.match import MatchConfig, match
    from ep_store.analysis.report import dictionary_report

    root, found = tmp_path / "run", []
    a, b = "tiny/base/L1/p10", "tiny/base/L2/p10"
    for _ in range(2):
        shutil.rmtree(root, ignore_errors=True)
        store = Store(root / "store")
        harvest(HarvestConfig("tiny", "base", (1, 2), max_tokens=600, ctx=32, batch_size=8, device="cpu"),
                store, models_dir, progress=False)
        for layer in (1, 2):
            build(BuildConfig("tiny", "base", layer, 10.0, calibration_tokens=300, calibration_batch=100,
                              batch_size=128, saturation_window=50, device="cpu"), store, progress=False)
        match(MatchConfig(a, b, method="both"), store)
        dictionary_report(store.root, b, root / "report")
        diff_report(store.root, a, b, root / "diff", models_dir)
        folder = store.dictionary_dir(store.list_dictionaries()[1])
        found.append({name: digest(path) for name, path in {
            "harvest": store.root / "activations", "build": folder / "exemplars.lance", "meta": folder / "meta.json",
            "assign": folder / "assignments.lance", "match": store.root / "matches", "report": root / "report",
            "diff": root / "diff"}.items()})
        time.sleep(1.1)
    assert found[0]["harvest"]["rows"] == 1200 and found[0]["harvest"]["parts"] == 2
    assert found[0] == found[1]


def test_cli_digest_and_metrics(tmp_path):
    store, table = Store(tmp_path / "store"), rows()
    key = write(store, "one", table, [5])
    folder = store.activation_path(key).parent
    (folder / "notes.json").write_text(json.dumps({"rows": 3, "seconds": 1.25, "nested": {"tokens_per_s": 9.0},
                                                       "input_wait_share": 0.1, "model_idle_share": 0.2,
                                                       "seconds_ratio_sae_over_ep": 7.67, "cpu_seconds": 4.05}))
    metrics = tmp_path / "metrics" / "d.json"
    result = CliRunner().invoke(main, ["store", "digest", str(folder), str(store.activation_path(key)),
                                       "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    written = json.loads(metrics.read_text())
    assert written[str(store.activation_path(key))] == {"kind": "lance", **logical_digest(store.activation_path(key))}
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [d["digest"] for d in written.values()]
    before = written[str(folder)]["digest"]
    (folder / "notes.json").write_text(json.dumps({"rows": 3, "seconds": 9.5, "nested": {"tokens_per_s": 1.0},
                                                       "input_wait_share": 0.6, "model_idle_share": 0.0,
                                                       "seconds_ratio_sae_over_ep": 8.72, "cpu_seconds": 3.82}))
    assert digest(folder)["digest"] == before  # run-time measurements do not count
    (folder / "notes.json").write_text(json.dumps({"rows": 4, "seconds": 9.5}))
    assert digest(folder)["digest"] != before
    bad = CliRunner().invoke(main, ["store", "digest", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
