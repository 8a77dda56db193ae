"""EP against an SAE (issue 11): SQL F1 vs brute force, a planted SAE in SAELens's own format,
reloading through SAELens's loader, and bad input. SAELens is an optional extra: skipped without it."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey, DictionaryKey, SAEKey
from ep_store.sae import binarise as B
from ep_store.sql.db import StoreDB
from ep_store.sql.questions import questions
from ep_store.stages.build import BuildConfig, build
from ep_store.store import Store, arrow_to_vectors, vectors_to_arrow
from ep_store.store.streams import DOCUMENTS_KEY, FINGERPRINT_KEY
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e .[sae])")

ROWS, WIDTH, HELDOUT = 2400, 24, 400
# What a harvest records about its corpus (issue 18, A3): ep sae compare checks the SAE trained on these documents.
TOY_STREAM = {"corpus": "toy", "fingerprint": {FINGERPRINT_KEY: "toy-documents", DOCUMENTS_KEY: ROWS // 50}}


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Tokens around 40 random directions, so both EP and an SAE find structure."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, d)) * 4
    return (centers[rng.integers(0, 40, n)] + rng.standard_normal((n, d)) + 2).astype(np.float32)


def write_activations(store: Store, key: str, x: np.ndarray) -> None:
    n = len(x)
    tokens = [["é", "🙂", "<bos>", "a b", "x"][i % 5] + str(i) for i in range(n)]  # no two documents alike (A4)
    store.append_activations(ActivationKey.parse(key), pa.table({
        "doc_id": pa.array(np.arange(n) // 50, pa.int64()), "pos": pa.array(np.arange(n) % 50, pa.int32()),
        "token_id": pa.array(np.arange(n) % 7, pa.int32()), "token": tokens,
        "char_start": pa.array(np.zeros(n), pa.int32()), "char_end": pa.array(np.ones(n), pa.int32()),
        "vector": vectors_to_arrow(x)}), TOY_STREAM)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """toy/base/L1 (width 24) with an EP dictionary p10 and a small trained SAE t1; L2 (width 16) with p10."""
    from ep_store.sae.train import SAETrainConfig, train_sae

    root = tmp_path_factory.mktemp("sae") / "store"
    store = Store(root)
    write_activations(store, "toy/base/L1", clustered(ROWS, WIDTH, 0))
    write_activations(store, "toy/base/L2", clustered(ROWS, 16, 1))
    for layer in (1, 2):
        build(BuildConfig("toy", "base", layer, 10, calibration_tokens=1000, calibration_batch=256, batch_size=256,
                          device="cpu"), store, assign=False, progress=False)
    train_sae(SAETrainConfig("toy/base/L1", "t1", width=96, k=4, tokens=6000, heldout_tokens=HELDOUT, batch_size=128,
                             shuffle_rows=512, monitor_tokens=256, log_every=5, device="cpu"), store, progress=False)
    return root


def copy_of(root, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(root, dst)
    return dst


# -- SQL path against brute force -------------------------------------------------------------------
def brute_force_f1(ep_rows, sae_rows, top_n, min_positives):
    """Plain Python sets: top-n positive tokens by (value desc, doc_id, pos), eligible with >= min_positives."""
    def sets(rows):
        by = {}
        for f, d, p, v in rows:
            if v > 0:
                by.setdefault(f, []).append((-v, d, p))
        return {f: {(d, p) for _, d, p in sorted(r)[:top_n]} for f, r in by.items() if len(r) >= min_positives}
    ep, sae = sets(ep_rows), sets(sae_rows)
    return {(r, f): 2 * len(a & b) / (len(a) + len(b)) for r, a in ep.items() for f, b in sae.items() if a & b}


def test_sql_f1_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    store = Store(tmp_path / "store")
    key = DictionaryKey("toy", "base", 1, 10.0)
    folder = store.sae_compare_dir(key, "s")
    n = 300
    doc, pos = np.arange(n) // 30, np.arange(n) % 30
    # Values on a coarse grid force ties, which must break by (doc_id, pos) on both paths.
    ep = [(r, int(doc[i]), int(pos[i]), float(np.round(rng.normal(), 1))) for r in range(12) for i in rng.choice(n, 60, replace=False)]
    sae = [(f, int(doc[i]), int(pos[i]), float(np.round(abs(rng.normal()), 1))) for f in range(15)
           for i in rng.choice(n, int(rng.integers(5, 40)), replace=False)]
    sae.append((99, 0, 0, 1e30))  # a huge value: one token only, never eligible
    for name, rows, col, val in (("ep_projections", ep, "region_id", "projection"), ("sae_activations", sae, "feature_id", "activation")):
        f, d, p, v = map(np.array, zip(*rows))
        store.write_table(folder / f"{name}.lance", pa.table({"doc_id": pa.array(d, pa.int64()), "pos": pa.array(p, pa.int32()),
                                                             col: pa.array(f, pa.int32()), val: pa.array(v, pa.float32())}))
    store.write_json(folder / "meta.json", {})
    db = StoreDB(store)
    for top_n, min_pos in ((10, 5), (100, 20)):
        params = {"model": "toy", "checkpoint": "base", "layer": 1, "hook": "resid_post", "percentile": 10.0, "top_n": top_n, "min_positives": min_pos}
        got = db.query(questions()["sae_f1"].sql, params).to_pylist()
        sql = {(r["region_id"], r["feature_id"]): r["f1"] for r in got}
        f32 = lambda rows: [(f, d, p, float(np.float32(v))) for f, d, p, v in rows]  # noqa: E731 - as stored
        expected = brute_force_f1(f32(ep), f32(sae), top_n, min_pos)
        assert expected and sql.keys() == expected.keys()
        assert all(sql[k] == pytest.approx(expected[k], abs=1e-12) for k in expected)
        ref = B.overlaps(B.binarise(B.Sparse(*map(np.array, zip(*f32(ep)))), top_n, min_pos),
                         B.binarise(B.Sparse(*map(np.array, zip(*f32(sae)))), top_n, min_pos))
        assert {(int(a), int(b)): f for a, b, f in zip(ref.a, ref.b, ref.f1)} == pytest.approx(expected)
    features = db.query("SELECT count(*) AS n FROM sae_features WHERE sae = 's'").to_pylist()[0]["n"]
    assert features == len({f for f, _, _, v in sae if v > 0})


def test_hungarian_and_best_partner_are_consistent():
    # F1 rows a = 0, 1, 2 against b = 5, 6, 7: [[.9, .2, 0], [.8, 0, 0], [0, 0, .4]]; the best total is 1.4.
    ov = B.Overlaps(np.array([0, 0, 1, 2]), np.array([5, 6, 5, 7]), np.ones(4), np.ones(4), np.ones(4),
                    np.array([0.9, 0.2, 0.8, 0.4]))
    a, b, f = B.hungarian(ov)
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 6), (1, 5), (2, 7)]
    assert f.sum() == pytest.approx(1.4)
    assert B.best_partner(np.array([0, 1, 2]), ov.a, ov.b, ov.f1).tolist() == [5, 5, 7]
    assert B.best_f1(np.array([0, 1, 2, 3]), ov.a, ov.f1).tolist() == [0.9, 0.8, 0.4, 0.0]


# -- planted SAE in SAELens's own format ----------------------------------------------------------------
def test_planted_sae_matches_its_regions_at_f1_one(toy_store, tmp_path):
    from sae_lens import SAE, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from ep_store.sae.compare import SAECompareConfig, build_on_prefix, compare

    store = Store(copy_of(toy_store, tmp_path))
    key = DictionaryKey("toy", "base", 1, 10.0)
    dmeta = store.read_json(store.dictionary_dir(key) / "meta.json")
    ep = build_on_prefix(store, key, dmeta, ROWS - HELDOUT, torch.device("cpu"))
    planted = [0, 3, 5, 8]
    E = ep["state"].exemplars_KD[planted]
    sae = TopKSAE(TopKSAEConfig(d_in=WIDTH, d_sae=len(planted), k=len(planted), rescale_acts_by_decoder_norm=False,
                                metadata=SAEMetadata(model_name="toy", hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.copy_(E.T)
        sae.W_dec.copy_(E)
        sae.b_dec.copy_(ep["center_D"])
        sae.b_enc.zero_()
    folder = store.sae_dir(SAEKey("toy", "base", 1, "planted"))
    sae.save_model(str(folder))  # SAELens's own on-disk format, written by SAELens
    assert isinstance(SAE.load_from_disk(str(folder)), TopKSAE)
    store.write_json(folder / "meta.json", {"library": "sae_lens", "library_version": sae_lens.__version__,
                                            "architecture": "topk", "d_in": WIDTH, "width": len(planted), "k": len(planted),
                                            "activations": {"train_rows": [0, ROWS - HELDOUT],
                                                            FINGERPRINT_KEY: "toy-documents"}, "tokens": 0,
                                            "seconds": 0.0, "flops": 0.0})
    out = tmp_path / "out"
    m = compare(SAECompareConfig(str(key), "planted", str(out), heldout_tokens=HELDOUT, device="cpu"), store, progress=False)
    assert m["sql_matches_numpy"]
    rows = {(r["side"], int(r["feature"])): r for r in csv.DictReader((out / "pairs.csv").open())}
    for feature, region in enumerate(planted):
        assert float(rows[("ep", region)]["best_f1"]) == 1.0
        assert int(rows[("ep", region)]["best_partner"]) == feature
        assert int(rows[("ep", region)]["hungarian_partner"]) == feature
        assert float(rows[("sae", feature)]["best_f1"]) == 1.0
    assert m["sae_to_ep_share_f1_gt_05"] == 1.0
    others = [float(r["best_f1"]) for (side, f), r in rows.items() if side == "ep" and f not in planted]
    assert max(others) < 1.0  # only the planted regions match perfectly
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ep_dictionary"]["stored_saw_heldout"] is False  # saturated within the prefix: the rebuild equals it
    assert metrics["ep_dictionary"]["regions"] == dmeta["regions"]


# -- the trained SAE reopens in SAELens -----------------------------------------------------------------
def test_trained_sae_reloads_through_saelens_with_identical_encodings(toy_store, tmp_path):
    from sae_lens import SAE, TopKSAE

    from ep_store.sae.compare import SAECompareConfig, compare

    store = Store(copy_of(toy_store, tmp_path))
    folder = store.sae_dir(SAEKey("toy", "base", 1, "t1"))
    meta = store.read_json(folder / "meta.json")
    assert meta["library"] == "sae_lens" and meta["tokens"] >= 6000 and meta["flops"] > 0
    assert meta["activations"]["train_rows"] == [0, ROWS - HELDOUT]
    assert [p["step"] for p in meta["curves"]][:2] == [0, 5]
    assert meta["curves"][-1]["explained_variance"] > meta["curves"][0]["explained_variance"]
    sae = SAE.load_from_disk(str(folder))
    assert isinstance(sae, TopKSAE) and sae.cfg.d_sae == 96 and sae.cfg.k == 4
    x = torch.from_numpy(arrow_to_vectors(store.read_table(store.activation_path(ActivationKey.parse("toy/base/L1")),
                                                           ["vector"]).column("vector")))
    with torch.no_grad():
        acts = sae.encode(x)
        again = SAE.load_from_disk(str(folder)).encode(x)
    assert torch.equal(acts, again)
    assert ((acts > 0).sum(1) <= 4).all()
    # The recorded final explained variance (measured on the in-memory SAE) is reproduced by the reloaded one.
    final = meta["curves"][-1]
    from ep_store.sae.train import training_batches

    # The monitor rows are the first 256 training rows, shuffled with the seed: the same set.
    monitor = next(training_batches(store, store.activation_path(ActivationKey.parse("toy/base/L1")), 256, 256, 256, 0))
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(monitor))
    ev = 1 - (x_hat - monitor).pow(2).sum(-1).mean() / (monitor - monitor.mean(0)).pow(2).sum(-1).mean()
    assert float(ev) == pytest.approx(final["explained_variance"], abs=1e-4)
    # What compare stores in sae_activations is exactly SAELens's encoding of the held-out rows.
    compare(SAECompareConfig("toy/base/L1/p10", "t1", str(tmp_path / "out"), heldout_tokens=HELDOUT, device="cpu"),
            store, progress=False)
    table = store.read_table(store.sae_compare_dir(DictionaryKey.parse("toy/base/L1/p10"), "t1") / "sae_activations.lance")
    held = acts[ROWS - HELDOUT:]
    r, f = held.nonzero(as_tuple=True)
    assert np.array_equal(table.column("feature_id").to_numpy(), f.numpy())
    assert np.array_equal(table.column("activation").to_numpy(), held[r, f].numpy())
    assert np.array_equal(table.column("doc_id").to_numpy(), (r.numpy() + ROWS - HELDOUT) // 50)


# -- CLI and bad input ----------------------------------------------------------------------------------
def test_cli_compare_and_summary(toy_store, tmp_path):
    root = copy_of(toy_store, tmp_path)
    runner = CliRunner()
    out = tmp_path / "reports" / "L1"
    result = runner.invoke(main, ["sae", "compare", "--dictionary", "toy/base/L1/p10", "--sae", "t1", "--store", str(root),
                                  "--out", str(out), "--heldout-tokens", str(HELDOUT), "--device", "cpu", "--no-probe",
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["ep_to_sae_share_f1_gt_05"] == metrics["ep_to_sae_share_f1_gt_05"]
    assert 0 <= metrics["ep_to_sae_share_f1_gt_05"] <= 1 and metrics["compute"]["flops_ratio_sae_over_ep"] > 0
    assert (out / "f1_distribution.png").stat().st_size > 0 and "| region | feature |" in (out / "README.md").read_text()
    from ep_store.store.digest import digest

    first = digest(out)
    again = runner.invoke(main, ["sae", "compare", "--dictionary", "toy/base/L1/p10", "--sae", "t1", "--store", str(root),
                                 "--out", str(out), "--heldout-tokens", str(HELDOUT), "--device", "cpu", "--no-probe",
                                 "--no-progress"])  # a rerun replaces the comparison
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["ep_to_sae_share_f1_gt_05"] == metrics["ep_to_sae_share_f1_gt_05"]
    assert digest(out) == first  # the same report, byte for byte, run times aside (they live in metrics.json)
    result = runner.invoke(main, ["sae", "summary", str(out.parent), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert list(json.loads((tmp_path / "m.json").read_text())) == ["toy/base/L1/p10~t1"]
    got = runner.invoke(main, ["sql", "SELECT count(*) AS n FROM sae_activations", "--format", "csv", "--store", str(root)])
    assert got.exit_code == 0 and int(got.output.splitlines()[1]) > 0


@pytest.mark.parametrize("args, needle", [
    (["--dictionary", "toy/base/L2/p10", "--sae", "t1"], "an SAE of that name exists for toy/base/L1/t1"),
    (["--dictionary", "toy/base/L1/p10", "--sae", "nope"], "no SAE toy/base/L1/nope"),
    (["--dictionary", "toy/base/L1/p10", "--sae", "t1", "--heldout-tokens", "50"], "too few"),
    (["--dictionary", "toy/base/L1/p10", "--sae", "t1", "--heldout-tokens", "900"], "too few held-out tokens"),
    (["--dictionary", "toy/base/L1/p10", "--sae", "t1", "--min-positives", "500"], "cannot exceed"),
    (["--dictionary", "other/base/L1/p10", "--sae", "t1"], "unknown dictionary"),
])
def test_compare_refuses_bad_input(toy_store, tmp_path, args, needle):
    root = copy_of(toy_store, tmp_path)
    before = tree_snapshot(root)
    result = CliRunner().invoke(main, ["sae", "compare", *args, "--store", str(root), "--out", str(tmp_path / "o"),
                                       "--no-probe", "--device", "cpu"])
    assert_refused(result, needle)
    assert tree_snapshot(root) == before and not (tmp_path / "o").exists()


def test_compare_refuses_an_sae_of_another_width(toy_store, tmp_path):
    root = copy_of(toy_store, tmp_path)
    store = Store(root)
    shutil.copytree(store.sae_dir(SAEKey("toy", "base", 1, "t1")), store.sae_dir(SAEKey("toy", "base", 2, "t1")))
    before = tree_snapshot(root)
    result = CliRunner().invoke(main, ["sae", "compare", "--dictionary", "toy/base/L2/p10", "--sae", "t1", "--store",
                                       str(root), "--out", str(tmp_path / "o"), "--heldout-tokens", str(HELDOUT)])
    assert_refused(result, "width mismatch")
    assert tree_snapshot(root) == before


@pytest.mark.parametrize("args, needle", [
    (["--activations", "toy/base/L1", "--name", "t1"], "exists"),
    (["--activations", "toy/base/L1", "--name", "x", "--heldout-tokens", "2390"], "fewer than one batch"),
    (["--activations", "toy/base/L9", "--name", "x"], "no activations toy/base/L9"),
    (["--activations", "toy/base/L1", "--name", "..", "--heldout-tokens", "10"], "invalid name"),
    (["--activations", "toy/base/L1", "--name", "x", "--width", "8", "--k", "16"], "at least --k"),
])
def test_train_refuses_bad_input(toy_store, tmp_path, args, needle):
    root = copy_of(toy_store, tmp_path)
    before = tree_snapshot(root)
    result = CliRunner().invoke(main, ["sae", "train", *args, "--store", str(root), "--device", "cpu", "--no-progress"])
    assert_refused(result, needle)
    assert tree_snapshot(root) == before


# -- sparse probing beside EP and raw (issue 10's probe) --------------------------------------------------
def test_sae_pooling_in_chunks_equals_pooling_whole(toy_store):
    from ep_store.evaluate.features import pool_per_text
    from ep_store.sae.probe import TEXTS_PER_CHUNK, sae_pooled
    from ep_store.sae.train import load_sae

    sae, _ = load_sae(Store(toy_store), SAEKey("toy", "base", 1, "t1"))
    rng = np.random.default_rng(0)
    n_texts = 2 * TEXTS_PER_CHUNK + 7
    text_N = np.sort(rng.integers(0, n_texts - 1, 900))  # the last text has no tokens
    x = clustered(900, WIDTH, 5)
    with torch.no_grad():
        whole = pool_per_text(sae.encode(torch.from_numpy(x)).numpy(), text_N, n_texts)
    np.testing.assert_allclose(sae_pooled(sae, x, text_N, n_texts), whole, rtol=1e-6, atol=1e-7)


def test_compare_with_probe_on_a_tiny_model(tiny_store, models_dir, tmp_path):
    from ep_store.sae.compare import SAECompareConfig, compare
    from ep_store.sae.train import SAETrainConfig, train_sae

    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    store = Store(root)
    build(BuildConfig("tiny", "base", 1, 10, calibration_tokens=1000, calibration_batch=256, batch_size=256,
                      device="cpu"), store, assign=False, progress=False)
    # Hold out the last document whole: held-out rows of a document that also has training rows
    # are not compared on (issue 18, A4), and tiny_store holds two documents.
    doc_id = store.read_table(store.activation_path(ActivationKey.parse("tiny/base/L1")), ["doc_id"]).column("doc_id")
    heldout = int((doc_id.to_numpy() == doc_id[-1].as_py()).sum())
    train_sae(SAETrainConfig("tiny/base/L1", "s", width=128, k=8, tokens=4000, heldout_tokens=heldout, batch_size=128,
                             shuffle_rows=512, monitor_tokens=256, device="cpu"), store, progress=False)
    from ep_store.stages.corpus import builtin_texts

    # A small two-class task from real text keeps the test fast; the built-in tasks run in the pipeline.
    texts = [text[:300] for _, text in list(builtin_texts())[:40]]
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n" for i, t in enumerate(texts)))
    m = compare(SAECompareConfig("tiny/base/L1/p10", "s", str(tmp_path / "out"), heldout_tokens=heldout, device="cpu",
                                 probe=True, models_dir=str(models_dir), probe_data=str(data)), store, progress=False)
    by_k = {row["k"]: row for row in m["probe"]["mean_by_k"]}
    assert sorted(by_k) == [1, 5]
    for row in by_k.values():
        for name in ("raw_accuracy", "raw_topk_accuracy", "ep_onehot_accuracy", "ep_signed_accuracy", "sae_accuracy"):
            assert 0 <= row[name] <= 1
    assert "| k | raw (all D) |" in (tmp_path / "out" / "README.md").read_text()


def test_training_batches_are_full_shuffled_epochs(toy_store):
    from itertools import islice

    from ep_store.sae.train import training_batches

    store = Store(toy_store)
    path = store.activation_path(ActivationKey.parse("toy/base/L1"))
    x = arrow_to_vectors(store.read_table(path, ["vector"]).column("vector"))
    rows = 1000  # 7 full batches of 128 and a remainder of 104, padded from its own rows
    batches = list(islice(training_batches(store, path, rows, 128, 256, 0), 16))
    assert all(b.shape == (128, WIDTH) for b in batches)
    epoch = torch.cat(batches[:8]).numpy()
    seen = {r.tobytes() for r in epoch}
    assert seen == {r.tobytes() for r in x[:rows]}  # every training row, none of the held-out ones
    assert not np.array_equal(epoch[:128], x[:128])  # shuffled


def test_compare_against_any_saelens_folder(toy_store, tmp_path):
    """``--sae-path`` (issue 21, item 1): any SAELens folder, here the dictionary's own export
    (ep export saelens). Its k = 1 feature k fires on region k's cell only, so every eligible
    feature's best EP partner is the region with its own id (F1 stays well below 1: the EP
    side is binarised as the region's top tokens by projection, over every cell); an SAE of
    another width or a folder SAELens cannot load is refused in one line and writes nothing."""
    root = copy_of(toy_store, tmp_path)
    runner = CliRunner()
    for layer in (1, 2):
        done = runner.invoke(main, ["export", "saelens", f"toy/base/L{layer}/p10", "--out", str(tmp_path / f"sae{layer}"),
                                    "--store", str(root)])
        assert done.exit_code == 0, done.output
    out = tmp_path / "cmp"
    args = ["sae", "compare", "--dictionary", "toy/base/L1/p10", "--store", str(root), "--heldout-tokens", str(HELDOUT),
            "--device", "cpu", "--no-probe", "--no-progress"]
    result = runner.invoke(main, [*args, "--sae-path", str(tmp_path / "sae1"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sae"] == str(tmp_path / "sae1") and metrics["compute"] is None and metrics["sql_matches_numpy"]
    rows = [r for r in csv.DictReader((out / "pairs.csv").open()) if r["side"] == "sae" and r["best_partner"] != ""]
    assert len(rows) >= 5 and all(int(r["feature"]) == int(r["best_partner"]) for r in rows)
    shutil.copytree(tmp_path / "sae1", tmp_path / "cut")
    weights = tmp_path / "cut" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: SAELens's loader fails
    before = tree_snapshot(root)
    for extra, needle in ((["--sae-path", str(tmp_path / "sae2")], "width 16"),
                          (["--sae-path", str(tmp_path / "cut")], "not a loadable SAELens SAE folder"),
                          (["--sae-path", str(tmp_path)], "not a loadable SAELens SAE folder"),
                          (["--sae-path", str(tmp_path / "sae1"), "--sae", "t1"], "give one of --sae")):
        assert_refused(runner.invoke(main, [*args, *extra, "--out", str(tmp_path / "o")]), needle)
    assert tree_snapshot(root) == before and not (tmp_path / "o").exists()
