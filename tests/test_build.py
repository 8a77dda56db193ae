"""Dictionaries in the store: build, growth as Lance versions, assign, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.errors import UsageError
from ep_store.kernels.calibrate import unit_directions
from ep_store.kernels.leader import leader_reference
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.vectors import stream_vectors
from ep_store.store import Store, arrow_to_vectors, vectors_to_arrow
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused


@pytest.fixture()
def store(tiny_store, tmp_path):
    shutil.copytree(tiny_store, tmp_path / "store")
    return Store(tmp_path / "store")


def cfg(**over):
    base = dict(model="tiny", checkpoint="base", layer=2, percentile=5.0, calibration_tokens=1000,
                calibration_batch=250, batch_size=256, saturation_window=3, device="cpu")
    base.update(over)
    return BuildConfig(**base)


def exemplar_rows(store, key, version=None):
    table = store.read_table(store.dictionary_dir(key) / "exemplars.lance", version=version)
    return table.column("source_row").to_pylist(), arrow_to_vectors(table.column("exemplar"))


def test_build_matches_reference_and_writes_layout(store):
    summary = build(cfg(), store, progress=False)
    key = DictionaryKey("tiny", "base", 2, 5.0)
    folder = store.dictionary_dir(key)
    assert folder.name == "p5" and (folder / "exemplars.lance").is_dir() and (folder / "assignments.lance").is_dir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["regions"] == summary["regions"] > 1
    for field in ("center", "theta", "percentile", "calibration", "tokens", "saturation_curve", "stop_reason",
                  "tags", "ep_store_version"):
        assert field in meta
    # The stored exemplar list equals the sequential rule on the same stream.
    x = torch.cat([b for b, _ in stream_vectors(store, store.activation_path(key.activations), 999)])
    u = unit_directions(x, torch.tensor(meta["center"]))
    ref = leader_reference(u, meta["theta"], 256, 3)
    rows, vectors = exemplar_rows(store, key)
    assert rows == ref.exemplar_rows
    np.testing.assert_array_equal(vectors, u[rows].numpy())
    assert meta["stop_reason"] == ref.stop_reason
    # Assignments cover every token and agree with the Python API.
    assigned = store.read_table(folder / "assignments.lance")
    assert assigned.num_rows == x.shape[0]
    d = Dictionary.load(store, str(key))
    regions, distances = d.assign(x.numpy())
    np.testing.assert_array_equal(assigned.column("region_id").to_numpy(), regions)
    assert (distances >= 0).all() and (distances <= 2).all()
    # Exemplars are assigned to themselves at distance ~0.
    np.testing.assert_array_equal(regions[rows], np.arange(len(rows)))


def test_disjoint_calibration_prefix_is_the_sequential_rule_after_it(store):
    """--calibration-prefix disjoint (issue 22, the authors' protocol): theta and the center come
    from the first rows, the build is the sequential rule on the rows after them, and the option
    is recorded with the build parameters; shared (the default) records nothing new."""
    build(cfg(calibration_prefix="disjoint", percentile=5.0), store, progress=False)
    key = DictionaryKey("tiny", "base", 2, 5.0)
    meta = json.loads((store.dictionary_dir(key) / "meta.json").read_text())
    assert meta["build"]["calibration_prefix"] == "disjoint" and meta["calibration"]["tokens"] == 1000
    x = torch.cat([b for b, _ in stream_vectors(store, store.activation_path(key.activations), 999)])
    u = unit_directions(x[1000:], torch.tensor(meta["center"]))
    ref = leader_reference(u, meta["theta"], 256, 3)
    rows, _ = exemplar_rows(store, key)
    assert rows == [r + 1000 for r in ref.exemplar_rows] and min(rows) >= 1000
    assert meta["stop_reason"] == ref.stop_reason and meta["saturation_curve"] == ref.new_per_batch
    assert int(ref.member_count_K.sum()) == meta["tokens"]
    shared = build(cfg(percentile=7.0), store, progress=False)
    shared_meta = json.loads((store.dictionary_dir(DictionaryKey("tiny", "base", 2, 7.0)) / "meta.json").read_text())
    assert "calibration_prefix" not in shared_meta["build"] and shared["regions"] > 0
    with pytest.raises(UsageError, match="all in the calibration prefix"):
        build(cfg(calibration_prefix="disjoint", calibration_tokens=10_000, percentile=9.0), store, progress=False)


def test_precisions_give_one_exemplar_table_to_the_bit(store, tmp_path):
    """bf16 and fp32 screening, and auto, store the same table (statistics included: the
    nearest exemplar at arrival is decided in float64, issue 20); the summary and meta.json
    record the precision used and the CPU."""
    tables, summaries = {}, {}
    for precision in ("float32", "bfloat16", "auto"):
        summaries[precision] = build(cfg(precision=precision, overwrite=True), store, progress=False)
        key = DictionaryKey("tiny", "base", 2, 5.0)
        tables[precision] = store.read_table(store.dictionary_dir(key) / "exemplars.lance")
        meta = json.loads((store.dictionary_dir(key) / "meta.json").read_text())
        assert meta["environment"]["dtype"] == summaries[precision]["precision"]
        assert "cpu_native_bf16" in meta["environment"] and summaries[precision]["cpu_capability"]
    assert tables["float32"].equals(tables["bfloat16"]) and tables["float32"].equals(tables["auto"])
    assert summaries["bfloat16"]["precision"] == "bfloat16" and summaries["float32"]["precision"] == "float32"
    assert summaries["auto"]["precision"] in ("float32", "bfloat16") and summaries["auto"]["precision_requested"] == "auto"
    # The statistics are the float64 nearest-at-arrival of the sequential rule.
    meta = json.loads((store.dictionary_dir(DictionaryKey("tiny", "base", 2, 5.0)) / "meta.json").read_text())
    x = torch.cat([b for b, _ in stream_vectors(store, store.activation_path(ActivationKey("tiny", "base", 2)), 999)])
    ref = leader_reference(unit_directions(x, torch.tensor(meta["center"])), meta["theta"], 256, 3)
    assert tables["auto"].column("member_count").to_pylist() == ref.member_count_K.tolist()
    np.testing.assert_array_equal(arrow_to_vectors(tables["auto"].column("direction_sum"), np.float64),
                                  ref.direction_sum_KD.numpy())


def test_growth_equals_one_build(store, tmp_path):
    key = DictionaryKey("tiny", "base", 2, 5.0)
    big = cfg(max_tokens=2000, saturation_window=50)
    build(cfg(max_tokens=1000, saturation_window=50), store, progress=False)
    small_rows, _ = exemplar_rows(store, key)
    summary = build(big, store, progress=False)
    assert summary["version"] == 2 and summary["tag"] == "tokens-2000"
    grown_rows, grown_vecs = exemplar_rows(store, key)

    other = Store(tmp_path / "other")
    shutil.copytree(store.root / "activations", other.root / "activations")
    build(big, other, progress=False)
    once_rows, once_vecs = exemplar_rows(other, key)
    assert grown_rows == once_rows and len(once_rows) > len(small_rows)
    np.testing.assert_array_equal(grown_vecs, once_vecs)
    grown = store.read_table(store.dictionary_dir(key) / "exemplars.lance").sort_by("region_id")
    once = other.read_table(other.dictionary_dir(key) / "exemplars.lance").sort_by("region_id")
    # Every statistic to the bit (QA: direction sums once came back from float32 mean
    # directions, off by ~1e-7 after a continued build).
    for column in ("member_count", "direction_sum", "direction_norm", "mean_direction", "coherence"):
        assert grown.column(column).equals(once.column(column)), column
    # Time travel: the tag of the first build still shows the smaller dictionary.
    assert exemplar_rows(store, key, version="tokens-1000")[0] == small_rows
    assert store.read_json(store.dictionary_dir(key) / "meta.json")["tags"] == {"tokens-1000": 1, "tokens-2000": 2}


def test_assign_other_dataset_and_width_refusal(store, tmp_path):
    build(cfg(layer=1), store, assign=False, progress=False)
    runner = CliRunner()
    ok = runner.invoke(main, ["assign", "--dictionary", "tiny/base/L1/p5", "--activations", "tiny/base/L2",
                              "--store", str(store.root), "--device", "cpu", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["tokens"] == 3000
    foreign = store.dictionary_dir(DictionaryKey("tiny", "base", 1, 5.0)) / "foreign" / "tiny" / "base" / "L2.lance"
    assert store.exists(foreign)
    # A dataset of another width is refused.
    narrow = ActivationKey("small", "base", 1)
    table = store.read_table(store.activation_path(ActivationKey("tiny", "base", 1))).slice(0, 10)
    table = table.set_column(table.schema.get_field_index("vector"), "vector",
                             vectors_to_arrow(np.ones((10, 16))))
    store.append_activations(narrow, table, {})
    before = tree_snapshot(store.root)
    result = runner.invoke(main, ["assign", "--dictionary", "tiny/base/L1/p5", "--activations", "small/base/L1",
                                  "--store", str(store.root), "--no-progress"])
    assert_refused(result, "width 16 but tiny/base/L1/p5 has width 64")
    assert tree_snapshot(store.root) == before


def build_args(store, **over):
    opts = {"--model": "tiny", "--checkpoint": "base", "--layer": "2", "--percentile": "5", "--batch-size": "256",
            "--calibration-batch": "250", "--device": "cpu", "--store": str(store.root)}
    opts.update(over)
    return ["build", "--no-progress", *[x for kv in opts.items() for x in kv]]


@pytest.mark.parametrize(("over", "needle"), [
    ({"--percentile": "0"}, "(0, 100)"),
    ({"--percentile": "100"}, "(0, 100)"),
    ({"--layer": "3"}, "no activations tiny/base/L3"),
    ({"--calibration-tokens": "1"}, "fewer than two calibration tokens"),
])
def test_build_refuses(store, over, needle):
    before = tree_snapshot(store.root)
    assert_refused(CliRunner().invoke(main, build_args(store, **over)), needle)
    assert tree_snapshot(store.root) == before


def test_build_refuses_other_parameters_unless_overwrite(store):
    runner = CliRunner()
    assert runner.invoke(main, build_args(store, **{"--max-tokens": "500"})).exit_code == 0
    before = tree_snapshot(store.root)
    assert_refused(runner.invoke(main, build_args(store, **{"--batch-size": "128"})), "--overwrite")
    assert tree_snapshot(store.root) == before
    result = runner.invoke(main, [*build_args(store, **{"--batch-size": "128"}), "--overwrite"])
    assert result.exit_code == 0
    summary = json.loads(result.output.strip().splitlines()[-1])
    for field in ("dictionary", "regions", "tokens", "theta", "seconds", "tokens_per_s", "stop_reason"):
        assert field in summary


def test_nonfinite_refused_or_skipped(store):
    key = ActivationKey("tiny", "nan", 2)
    table = store.read_table(store.activation_path(ActivationKey("tiny", "base", 2))).slice(0, 600)
    x = arrow_to_vectors(table.column("vector"))
    x[[5, 300]] = np.inf
    table = table.set_column(table.schema.get_field_index("vector"), "vector", vectors_to_arrow(x))
    store.append_activations(key, table, {})
    before = tree_snapshot(store.root)
    result = CliRunner().invoke(main, build_args(store, **{"--checkpoint": "nan"}))
    assert_refused(result, "non-finite or missing (null) vectors")
    assert "[5, 300]" in result.output
    assert tree_snapshot(store.root) == before
    ok = CliRunner().invoke(main, [*build_args(store, **{"--checkpoint": "nan"}), "--skip-nonfinite"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["tokens"] == 598
    assigned = store.read_table(store.dictionary_dir(DictionaryKey("tiny", "nan", 2, 5.0)) / "assignments.lance")
    assert assigned.column("region_id").to_pylist()[5] == -1


def test_unknown_dictionary_lists_known(store):
    build(cfg(), store, assign=False, progress=False)
    result = CliRunner().invoke(main, ["assign", "--dictionary", "tiny/base/L2/p7", "--store", str(store.root)])
    assert_refused(result, "known: tiny/base/L2/p5")
