"""Degenerate numbers (issue 8, part B): duplicates, undefined theta, rows without a
direction, and values beyond float16, each with its right value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ep_store.errors import UsageError
from ep_store.kernels.assign import UNASSIGNED, nearest_exemplar
from ep_store.kernels.calibrate import (
    CenterAccumulator,
    batch_percentile,
    calibrate,
    mean_theta,
    unit_directions,
)
from ep_store.kernels.leader import TIE_DISTANCE, LeaderBuilder, LeaderState, leader_reference
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import Dictionary, assign_dataset
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.stages.vectors import stream_vectors
from ep_store.store import Store, arrow_to_vectors, vectors_to_arrow
from ep_store.store.streams import DOCUMENTS_KEY, FINGERPRINT_KEY
from tests.conftest import ROOT, make_tiny_model, tree_snapshot

SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat today."


def write_activations(store: Store, key: ActivationKey, x_ND: np.ndarray, dtype=np.float32) -> None:
    n = x_ND.shape[0]
    table = pa.table({
        "doc_id": pa.array(np.zeros(n), pa.int64()), "pos": pa.array(np.arange(n), pa.int32()),
        "token_id": pa.array(np.zeros(n), pa.int32()), "token": pa.array(["x"] * n, pa.string()),
        "char_start": pa.array(np.arange(n), pa.int32()), "char_end": pa.array(np.arange(n) + 1, pa.int32()),
        "vector": vectors_to_arrow(x_ND, dtype),
    })
    # One synthetic stream: every dataset written here claims the same documents (issue 18, A3).
    store.append_activations(key, table, {"synthetic": True, "corpus": "synthetic",
                                          "fingerprint": {FINGERPRINT_KEY: "synthetic", DOCUMENTS_KEY: 1}})


def repeated_rows(distinct=20, times=40, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct, width, generator=g) * 3 + 1
    return base.repeat(times, 1)  # stream order: the 20 rows, then again, 40 times


# -- item 5: duplicate vectors -------------------------------------------------------------------
def test_duplicates_calibrate_to_zero_and_share_regions():
    x = repeated_rows()
    cal = calibrate([x[:400], x[400:]], 1.0)
    # 4.9% of the pairs in each batch are identical rows, so the 1st percentile is a tie: 0.
    assert cal.theta == 0.0
    u = unit_directions(x, cal.center_D)
    ref = leader_reference(u, cal.theta, 256, 50)
    assert ref.exemplar_rows == list(range(20))
    for precision in ("float32", "bfloat16"):
        b = LeaderBuilder(cal.theta, 256, 50, LeaderState(width=32), precision=precision)
        b.feed(u)
        state = b.finish("end_of_stream")
        assert state.source_row_K.tolist() == list(range(20))
        assert state.member_count_K.tolist() == [40] * 20
    result = nearest_exemplar(u, u[:20])
    assert result.region_N.tolist() == list(range(20)) * 40
    assert (result.distance_N >= 0).all() and (result.distance_N <= 1e-6).all()


def test_distances_clamped_in_calibration():
    # Float32 unit vectors carry |u|^2 = 1 +- 1e-7: here 1 - u.u = -2.4e-7 before clamping.
    u = torch.tensor([[1.0000001, 0.0], [1.0000001, 0.0], [0.0, 1.0]])
    assert 1.0 - float(u[0].double() @ u[1].double()) < 0
    assert batch_percentile(u, 0.0) == 0.0
    assert mean_theta([batch_percentile(u, 0.0)], 3)[0] == 0.0
    # Identical rows of real data: the percentile over a batch full of ties is within the tie rule.
    tied = unit_directions(repeated_rows(distinct=3, times=4), torch.zeros(32))
    assert 0.0 <= batch_percentile(tied, 0.0) <= TIE_DISTANCE
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert batch_percentile(opposite, 100.0) == 2.0


@pytest.fixture()
def repeated_corpus(tmp_path) -> Path:
    path = tmp_path / "repeated.jsonl"
    path.write_text("".join(json.dumps({"text": SENTENCE}) + "\n" for _ in range(40)))
    return path


def test_repeated_sentence_tiny_model(models_dir, repeated_corpus, tmp_path, tiny_tokenizer):
    store = Store(tmp_path / "store")
    harvest(HarvestConfig("tiny", "base", (2,), corpus=str(repeated_corpus), max_tokens=10_000, ctx=64,
                          batch_size=8, device="cpu"), store, models_dir, progress=False)
    n_tokens = len(tiny_tokenizer(SENTENCE, add_special_tokens=False)["input_ids"])
    summary = build(BuildConfig("tiny", "base", 2, 1.0, calibration_batch=256, batch_size=256, device="cpu"),
                    store, progress=False)
    assert summary["theta"] >= 0.0
    assert summary["regions"] == n_tokens  # one region per distinct vector


@pytest.mark.real_model
def test_repeated_sentence_smollm2_layer3(smollm2_models_dir, repeated_corpus, tmp_path):
    """The issue's case: one 20-token sentence 40 times, SmolLM2 layer 3, p 1: at most 20 regions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_models_dir / "smollm2-135m" / "instruct")
    assert len(tok(SENTENCE)["input_ids"]) == 20
    store = Store(tmp_path / "store")
    harvest(HarvestConfig("smollm2-135m", "instruct", (3,), corpus=str(repeated_corpus), max_tokens=10_000,
                          ctx=64, batch_size=8, device="cpu"), store, smollm2_models_dir, progress=False)
    summary = build(BuildConfig("smollm2-135m", "instruct", 3, 1.0, device="cpu"), store, progress=False)
    assert summary["theta"] >= 0.0
    assert summary["regions"] <= 20


# -- item 6: theta must be defined ----------------------------------------------------------------
def test_undefined_theta_is_refused():
    x = repeated_rows()
    # Kernels raise ValueError (issue 19); the build turns it into UsageError (exit 2).
    with pytest.raises(ValueError, match="calibration-batch"):
        calibrate([x[i : i + 1] for i in range(10)], 1.0)
    with pytest.raises(ValueError, match="no calibration batch"):
        mean_theta([None, None], 1)
    with pytest.raises(ValueError, match="non-finite"):
        mean_theta([float("nan"), 0.2], 2)
    with pytest.raises(ValueError, match="center"):
        CenterAccumulator(4).center()
    with pytest.raises(UsageError):
        BuildConfig("m", "c", 0, 1.0, calibration_batch=1)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ep_store", *args], capture_output=True, text=True, env=env)


def test_cli_calibration_batch_1_exits_2(tiny_store, tmp_path):
    before = tree_snapshot(tiny_store)
    r = run_cli("build", "--model", "tiny", "--checkpoint", "base", "--layer", "2", "--percentile", "1",
                "--calibration-batch", "1", "--device", "cpu", "--store", str(tiny_store), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "calibration-batch" in r.stderr and "Traceback" not in r.stderr
    assert tree_snapshot(tiny_store) == before


def test_all_rows_equal_center_is_refused(tmp_path):
    store = Store(tmp_path / "store")
    write_activations(store, ActivationKey("syn", "a", 0), np.ones((50, 8), np.float32))
    with pytest.raises(UsageError, match="no calibration batch"):
        build(BuildConfig("syn", "a", 0, 1.0, calibration_batch=10, device="cpu"), store, progress=False)


# -- item 7: rows without a direction -------------------------------------------------------------
def test_degenerate_rows_one_behaviour_everywhere(tmp_path):
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 16)) + 2).astype(np.float32)
    # Row 300 equals the center the first 200 rows define: the build must give it no region.
    acc = CenterAccumulator(16)
    acc.add(torch.from_numpy(x[:200]))
    x[300] = acc.center().numpy()
    write_activations(store, ActivationKey("syn", "a", 0), x)
    summary = build(BuildConfig("syn", "a", 0, 5.0, calibration_tokens=200, calibration_batch=100, batch_size=100,
                                saturation_window=100, device="cpu"), store, progress=False)
    key = DictionaryKey("syn", "a", 0, 5.0)
    d = Dictionary.load(store, key)
    np.testing.assert_array_equal(d.center.numpy(), x[300])
    assert 300 not in d.table.column("source_row").to_pylist()
    own = store.read_table(store.dictionary_dir(key) / "assignments.lance")
    assert own.column("region_id")[300].as_py() == UNASSIGNED and np.isnan(own.column("distance")[300].as_py())
    assert summary["regions"] == len(d)

    # Another dataset with NaN, inf, -inf, the center and ordinary rows.
    y = np.vstack([x[:5], [np.full(16, np.nan)], [np.full(16, np.inf)], [np.r_[-np.inf, np.zeros(15)]],
                   [x[300]], x[5:8]]).astype(np.float32)
    degenerate = [5, 6, 7, 8]
    write_activations(store, ActivationKey("syn", "b", 0), y)
    assign_dataset(store, key, "syn/b/L0", device="cpu", progress=False)
    stored = store.read_table(store.dictionary_dir(key) / "foreign" / "syn" / "b" / "L0.lance")
    region_np, distance_np = d.assign(y)
    region_t, distance_t = d.assign(torch.from_numpy(y))
    for region, distance in ((stored.column("region_id").to_numpy(), stored.column("distance").to_numpy()),
                             (region_np, distance_np), (region_t.numpy(), distance_t.numpy())):
        assert region[degenerate].tolist() == [UNASSIGNED] * 4
        assert np.isnan(distance[degenerate]).all()
        ok = [i for i in range(len(y)) if i not in degenerate]
        assert (region[ok] >= 0).all() and ((distance[ok] >= 0) & (distance[ok] <= 2)).all()
    np.testing.assert_array_equal(stored.column("region_id").to_numpy(), region_np)
    # An empty dictionary assigns nothing.
    empty = nearest_exemplar(unit_directions(torch.from_numpy(y), d.center), torch.zeros(0, 16))
    assert empty.region_N.tolist() == [UNASSIGNED] * len(y)


def test_zero_rows_do_not_poison_the_center():
    x = torch.randn(10, 4) + 1
    acc = CenterAccumulator(4)
    acc.add(torch.cat([x, torch.zeros(3, 4)]))
    ref = CenterAccumulator(4)
    ref.add(x)
    c = acc.center()
    assert torch.isfinite(c).all()
    # Same direction; the mean counts the zero rows.
    assert torch.allclose(c / c.norm(), ref.center() / ref.center().norm(), atol=1e-6)


# -- item 8: float16 both ways ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def loud_models_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny model whose residual stream exceeds float16's range (embeddings scaled by 1e5)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("loud")
    folder = make_tiny_model(root / "loud" / "base", seed=3, tokenizer=tiny_tokenizer)
    net = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        net.get_input_embeddings().weight.mul_(1e5)
    net.save_pretrained(folder)
    return root


def test_storage_float32_keeps_values_beyond_float16(loud_models_dir, tmp_path):
    store = Store(tmp_path / "store")
    summary = harvest(HarvestConfig("loud", "base", (1,), max_tokens=200, ctx=64, batch_size=2, device="cpu"),
                      store, loud_models_dir, progress=False)
    path = store.activation_path(ActivationKey("loud", "base", 1))
    x = arrow_to_vectors(store.read_table(path).column("vector"))
    assert np.isfinite(x).all() and np.abs(x).max() > 65504
    assert store.info(path).meta["storage_dtype"] == "float32"
    assert summary["vector_bytes_per_token"] == 64 * 4


def test_storage_float16_beyond_range_is_refused_before_writing(loud_models_dir, tmp_path):
    store = Store(tmp_path / "store")
    cfg = HarvestConfig("loud", "base", (1,), max_tokens=200, ctx=64, batch_size=2, device="cpu",
                        storage_dtype="float16")
    with pytest.raises(UsageError, match="exceed float16's range.*--storage-dtype float32"):
        harvest(cfg, store, loud_models_dir, progress=False)
    assert not store.exists(store.activation_path(ActivationKey("loud", "base", 1)))


def test_float16_compute_names_the_real_cause(loud_models_dir, tmp_path):
    store = Store(tmp_path / "store")
    cfg = HarvestConfig("loud", "base", (1,), max_tokens=100, ctx=64, batch_size=2, device="cpu", dtype="float16")
    with pytest.raises(UsageError, match="float16 compute produced them.*float32 or bfloat16"):
        harvest(cfg, store, loud_models_dir, progress=False)
    assert not store.exists(store.activation_path(ActivationKey("loud", "base", 1)))


def test_float16_storage_in_range_and_old_float16_datasets_still_read(models_dir, tmp_path):
    store = Store(tmp_path / "store")
    harvest(HarvestConfig("tiny", "base", (1,), max_tokens=300, ctx=64, batch_size=4, device="cpu",
                          storage_dtype="float16"), store, models_dir, progress=False)
    path = store.activation_path(ActivationKey("tiny", "base", 1))
    assert store.read_table(path).schema.field("vector").type == pa.list_(pa.float16(), 64)
    x16 = torch.cat([x for x, _ in stream_vectors(store, path, 100)])
    assert x16.dtype == torch.float32 and x16.shape == (300, 64)
    # An old float16 dataset (no storage metadata) builds and assigns like a new one.
    write_activations(store, ActivationKey("old", "base", 1), x16.numpy(), np.float16)
    write_activations(store, ActivationKey("new", "base", 1), x16.numpy(), np.float32)
    a = build(BuildConfig("old", "base", 1, 5.0, calibration_batch=100, batch_size=100, device="cpu"), store,
              progress=False)
    b = build(BuildConfig("new", "base", 1, 5.0, calibration_batch=100, batch_size=100, device="cpu"), store,
              progress=False)
    assert (a["regions"], a["theta"]) == (b["regions"], b["theta"])


def test_build_on_all_nonfinite_names_the_cause(tmp_path):
    store = Store(tmp_path / "store")
    write_activations(store, ActivationKey("syn", "inf", 0), np.full((20, 8), np.inf, np.float32), np.float16)
    cfg = BuildConfig("syn", "inf", 0, 1.0, calibration_batch=10, device="cpu", skip_nonfinite=True)
    with pytest.raises(UsageError, match="once --skip-nonfinite dropped the non-finite rows; re-harvest"):
        build(cfg, store, progress=False)
    with pytest.raises(UsageError, match="--storage-dtype float32"):
        build(BuildConfig("syn", "inf", 0, 1.0, calibration_batch=10, device="cpu"), store, progress=False)


@pytest.mark.real_model
def test_real_gemma_layer12_beyond_float16(gemma_models_dir, tmp_path):
    """Gemma 3 270M layer 12 on the builtin topic 'atom-literals' (stream row 4,355 of the
    builtin corpus): position 113 reaches |a| = 79,690, beyond float16's 65,504."""
    from pydoc_data.topics import topics

    corpus = tmp_path / "atom.jsonl"
    corpus.write_text(json.dumps({"text": topics["atom-literals"]}) + "\n")
    key = ActivationKey("gemma-3-270m", "base", 12)
    cfg = dict(corpus=str(corpus), max_tokens=128, ctx=128, batch_size=1, device="cpu")
    small = Store(tmp_path / "f16")
    with pytest.raises(UsageError, match="exceed float16's range"):
        harvest(HarvestConfig("gemma-3-270m", "base", (12,), storage_dtype="float16", **cfg), small, gemma_models_dir,
                progress=False)
    assert not small.exists(small.activation_path(key))  # refused before writing
    full = Store(tmp_path / "f32")
    harvest(HarvestConfig("gemma-3-270m", "base", (12,), **cfg), full, gemma_models_dir, progress=False)
    x = arrow_to_vectors(full.read_table(full.activation_path(key)).column("vector"))
    assert x.shape[0] == 128 and np.isfinite(x).all()
    assert np.flatnonzero(np.abs(x).max(axis=1) > 65504).tolist() == [113]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_stored_vectors_decode_and_finiteness_by_dtype(dtype):
    """The fast readers (issue 12) give what the plain ones give: arrow_to_tensor equals
    numpy's cast, as a writable copy; finite_rows (float16: exponent bits) equals
    np.isfinite on the decoded rows, for NaN, +inf, -inf, the largest finite value and
    a subnormal, in a sliced (offset) Arrow array too."""
    from ep_store.store import arrow_to_tensor, finite_rows

    x = np.random.default_rng(0).standard_normal((9, 5)).astype(dtype)
    x[1, 2], x[3, 0], x[4, 4] = np.nan, np.inf, -np.inf
    x[5, 1], x[6, 3] = np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal
    for column in (vectors_to_arrow(x, dtype), vectors_to_arrow(x, dtype).slice(2, 6)):
        plain = arrow_to_vectors(column)
        fast = arrow_to_tensor(column)
        assert fast.dtype == torch.float32 and np.array_equal(fast.numpy(), plain, equal_nan=True)
        fast[0, 0] = 7.0  # its own memory: Arrow's buffer is untouched
        assert not np.array_equal(fast.numpy(), arrow_to_vectors(column), equal_nan=True)
        assert finite_rows(column).tolist() == np.isfinite(plain).all(axis=1).tolist()
        assert np.array_equal(arrow_to_tensor(column, torch.float64).numpy(), plain.astype(np.float64),
                              equal_nan=True)


def test_unit_directions_in_place_and_norms_beyond_float32_squares():
    """unit_directions_ (in place) equals unit_directions to the bit. Rows whose float32
    sum of squares overflows (|a - c| > ~1.8e19) or underflows (< ~1e-19) still get their
    direction (QA: once NaN, or a "unit" vector that was not one); rows with no direction
    float32 can hold (zero, inf, a difference a - c beyond float32) are NaN rows."""
    from ep_store.kernels.calibrate import centered_norms, degenerate, unit_directions_

    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    x[3] = 3e30
    x[4], x[5] = 0.0, 0.0
    x[4, :2] = torch.tensor([3e19, 4e19])
    x[5, :2] = torch.tensor([3e-25, 4e-25])
    x[7] = 0.0  # equal to the center
    x[9, 0] = float("inf")
    center = torch.zeros(8)
    plain = unit_directions(x, center)
    torch.testing.assert_close(plain[3], torch.full((8,), 8 ** -0.5))
    torch.testing.assert_close(plain[4, :2], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(plain[5], torch.tensor([0.6, 0.8, 0, 0, 0, 0, 0, 0]))
    assert degenerate(plain).nonzero().squeeze(1).tolist() == [7, 9]
    norms = (plain[~degenerate(plain)].double().norm(dim=1) - 1).abs()
    assert float(norms.max()) < 1e-6
    same = x.clone()
    assert unit_directions_(same, center) is same
    assert torch.equal(same.nan_to_num(9.0), plain.nan_to_num(9.0))
    beyond = unit_directions(torch.tensor([[3e38, 0.0]]), torch.tensor([-3e38, 0.0]))
    assert degenerate(beyond).tolist() == [True]
    assert centered_norms(x, center)[3] == pytest.approx(3e30 * 8 ** 0.5, rel=1e-6)
    assert centered_norms(x, center)[5] == pytest.approx(5e-25, rel=1e-6)
    with pytest.raises(TypeError):
        unit_directions_(x.to(torch.float64), center)


def test_one_huge_outlier_row_does_not_block_a_build(tmp_path):
    """One row scaled by 1e30 pulls the center to ~3e26: every |a - c| is beyond the
    float32 squares, yet every direction is defined (QA: the build once refused to
    calibrate, 'no batch holds two usable rows'). The build equals the plain rule."""
    store = Store(tmp_path / "store")
    x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    x[10] *= 1e30
    write_activations(store, ActivationKey("big", "base", 1), x)
    summary = build(BuildConfig("big", "base", 1, 5.0, calibration_batch=200, batch_size=100, device="cpu"),
                    store, assign=False, progress=False)
    d = Dictionary.load(store, DictionaryKey("big", "base", 1, 5.0))
    u = d.unit(torch.from_numpy(x))
    assert not bool(degenerate_rows(u).any())
    ref = leader_reference(u, d.theta, 100, saturation_window=1)
    assert d.table.column("source_row").to_pylist() == ref.exemplar_rows and summary["regions"] == len(ref.exemplar_rows)


def degenerate_rows(u):
    from ep_store.kernels.calibrate import degenerate

    return degenerate(u)


def activation_table(vectors: pa.Array) -> pa.Table:
    n = len(vectors)
    return pa.table({
        "doc_id": pa.array(np.zeros(n), pa.int64()), "pos": pa.array(np.arange(n), pa.int32()),
        "token_id": pa.array(np.zeros(n), pa.int32()), "token": pa.array(["x"] * n, pa.string()),
        "char_start": pa.array(np.arange(n), pa.int32()), "char_end": pa.array(np.arange(n) + 1, pa.int32()),
        "vector": vectors,
    })


def test_null_vectors_are_missing_rows_not_shifted_rows(tmp_path):
    """A null vector is a missing row: refused like a non-finite one (exit 2, one line,
    store unchanged), or dropped with --skip-nonfinite, every later row keeping its place
    (QA: Arrow's flatten dropped the null slot, so 159 of 163 exemplars named the wrong
    source row and the build's assign crashed)."""
    store = Store(tmp_path / "store")
    x = np.random.default_rng(1).standard_normal((600, 8)).astype(np.float32)
    valid = np.ones(600, bool)
    valid[[5, 333]] = False
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8, mask=pa.array(~valid))
    store.append_activations(ActivationKey("nl", "base", 1), activation_table(vectors), {"synthetic": True})
    before = tree_snapshot(store.root)
    r = run_cli("build", "--model", "nl", "--checkpoint", "base", "--layer", "1", "--percentile", "5",
                "--calibration-batch", "200", "--batch-size", "100", "--device", "cpu", "--store", str(store.root),
                "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "2 non-finite or missing (null) vectors (rows [5, 333])" in r.stderr
    assert tree_snapshot(store.root) == before
    build(BuildConfig("nl", "base", 1, 5.0, calibration_batch=200, batch_size=100, device="cpu",
                      skip_nonfinite=True), store, progress=False)
    d = Dictionary.load(store, DictionaryKey("nl", "base", 1, 5.0))
    kept = np.flatnonzero(valid)
    ref = leader_reference(d.unit(torch.from_numpy(x[kept])), d.theta, 100, saturation_window=1)
    assert d.table.column("source_row").to_pylist() == kept[ref.exemplar_rows].tolist()
    assert d.table.column("pos").to_pylist() == kept[ref.exemplar_rows].tolist()
    assigned = store.read_table(store.dictionary_dir(d.key) / "assignments.lance").sort_by("pos")
    region = np.array(assigned.column("region_id").to_pylist())
    assert len(region) == 600 and (region[~valid] == UNASSIGNED).all() and (region[valid] >= 0).all()


def test_a_vector_column_of_variable_lists_is_refused_in_one_line(tmp_path):
    """Vectors must be fixed-size lists of floats: a list<float> column is refused where it
    is written (UsageError) and where a build reads it (exit 2, one line, no traceback)."""
    from ep_store.store import META_KEY

    store = Store(tmp_path / "store")
    ragged = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32()))
    with pytest.raises(UsageError, match="not a fixed-size list of floats"):
        store.append_activations(ActivationKey("rg", "base", 1), activation_table(ragged), {})
    path = store.activation_path(ActivationKey("rg", "base", 1))
    path.parent.mkdir(parents=True)
    table = activation_table(ragged)
    store.write_table(path, table.replace_schema_metadata({META_KEY: b"{}"}))
    r = run_cli("build", "--model", "rg", "--checkpoint", "base", "--layer", "1", "--percentile", "5",
                "--device", "cpu", "--store", str(store.root), "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a fixed-size list of floats" in r.stderr and "Traceback" not in r.stderr
