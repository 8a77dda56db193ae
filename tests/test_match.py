"""Matching: planted vector matches, membership F1 from SQL vs brute force, diffs, finetune."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from ep_store.analysis.match import MatchConfig, best_flags, match, membership_scores, vector_match
from ep_store.cli.main import main
from ep_store.keys import DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store.core import Store
from ep_store.studies.finetune import FinetuneConfig, finetune
from tests.conftest import make_tiny_model, train_tokenizer, tree_snapshot
from tests.test_cli_errors import assert_refused


def random_rotation(d: int, angle: float, rng) -> np.ndarray:
    """A rotation by ``angle`` in a random plane."""
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    g = np.eye(d)
    c, s = np.cos(angle), np.sin(angle)
    g += (c - 1) * (np.outer(q[:, 0], q[:, 0]) + np.outer(q[:, 1], q[:, 1])) + s * (np.outer(q[:, 1], q[:, 0]) - np.outer(q[:, 0], q[:, 1]))
    return g


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_vector_matching_recovers_planted_pairs():
    rng = np.random.default_rng(0)
    d, n = 64, 40
    A = unit(rng.standard_normal((n, d)))
    kept = np.arange(0, 30)  # 30 regions survive, slightly rotated; 10 are dropped
    B_kept = unit(A[kept] @ random_rotation(d, 0.2, rng).T + 0.02 * rng.standard_normal((30, d)))
    B_new = unit(rng.standard_normal((12, d)))
    order = rng.permutation(42)
    B = np.concatenate([B_kept, B_new])[order]
    m = vector_match(A, B)
    preserved = {(int(r), int(c)) for r, c, cos in zip(m.rows_a, m.rows_b, m.cosine) if cos >= 0.7}
    position = {int(old): new for new, old in enumerate(order)}
    assert preserved == {(int(k), position[i]) for i, k in enumerate(kept)}
    introduced = set(range(42)) - {c for _, c in preserved}
    assert introduced == {position[i] for i in range(30, 42)}


def brute_scores(labels_a, labels_b, weights=None):
    weights = np.ones(len(labels_a)) if weights is None else weights
    overlap = collections.Counter()
    for r, s, w in zip(labels_a, labels_b, weights):
        overlap[(r, s)] += w
    size_a, size_b = collections.Counter(), collections.Counter()
    for (r, s), o in overlap.items():
        size_a[r] += o
        size_b[s] += o
    return {(r, s): (o / size_b[s], o / size_a[r], 2 * o / (size_a[r] + size_b[s])) for (r, s), o in overlap.items()}


def test_membership_scores_and_best_flags():
    a = np.array([0, 0, 1, 1, 1, 2])
    b = np.array([0, 1, 1, 1, 2, 2])
    pairs = collections.Counter(zip(a, b))
    ra, rb = map(np.array, zip(*pairs))
    o = np.array([pairs[k] for k in zip(ra, rb)], dtype=float)
    scores = membership_scores(ra, rb, o)
    expected = brute_scores(a, b)
    for r, s, p, q, f in zip(scores.region_a, scores.region_b, scores.precision, scores.recall, scores.f1):
        assert (p, q, f) == pytest.approx(expected[(int(r), int(s))])
    flags = best_flags(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.1]))
    assert flags.tolist() == [False, True, True]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, models_dir):
    """tiny/base, tiny/other (same tokenizer) and small/base (another tokenizer) over one stream."""
    root = tmp_path_factory.mktemp("match")
    mdir = root / "models"
    shutil.copytree(models_dir, mdir)
    make_tiny_model(mdir / "small" / "base", seed=2, tokenizer=train_tokenizer(vocab_size=350))
    store = Store(root / "store")
    for model, ckpt in (("tiny", "base"), ("tiny", "other"), ("small", "base")):
        harvest(HarvestConfig(model, ckpt, (1,), corpus="chat,builtin", max_tokens=1500, ctx=64, batch_size=8,
                              device="cpu"), store, mdir, progress=False)
        build(BuildConfig(model, ckpt, 1, 10.0, calibration_tokens=1000, calibration_batch=250, batch_size=256,
                          saturation_window=50, device="cpu"), store, progress=False)
    return store, mdir


def assignments(store, key):
    t = store.read_table(store.dictionary_dir(key) / "assignments.lance")
    return {(d, p): r for d, p, r in zip(t.column("doc_id").to_pylist(), t.column("pos").to_pylist(),
                                         t.column("region_id").to_pylist())}


def overlaps_table(store, a, b):
    return store.read_table(store.matches_dir(f"{a.slug()}__{b.slug()}") / "overlaps.lance").to_pylist()


def test_membership_same_tokenizer_equals_brute_force(two_models):
    store, _ = two_models
    a, b = DictionaryKey("tiny", "base", 1, 10.0), DictionaryKey("tiny", "other", 1, 10.0)
    summary = match(MatchConfig(str(a), str(b), method="both"), store)
    assert summary["membership_by"] == "positions" and summary["method"] == "vector"
    asg_a, asg_b = assignments(store, a), assignments(store, b)
    shared = sorted(set(asg_a) & set(asg_b))
    expected = brute_scores([asg_a[k] for k in shared], [asg_b[k] for k in shared])
    got = {(r["region_a"], r["region_b"]): (r["precision"], r["recall"], r["f1"]) for r in overlaps_table(store, a, b)}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


def test_membership_across_tokenizers_by_character_spans(two_models):
    store, _ = two_models
    a, b = DictionaryKey("tiny", "base", 1, 10.0), DictionaryKey("small", "base", 1, 10.0)
    summary = match(MatchConfig(str(a), str(b), method="membership"), store)
    assert summary["membership_by"] == "character spans"
    # Brute force: spread every character to the region of the token covering it, in each stream.
    chars_a, chars_b = {}, {}
    for key, chars in ((a, chars_a), (b, chars_b)):
        toks = store.read_table(store.activation_path(key.activations), columns=["doc_id", "pos", "char_start", "char_end"])
        regions = assignments(store, key)
        for d, p, s, e in zip(*(toks.column(c).to_pylist() for c in ("doc_id", "pos", "char_start", "char_end"))):
            for ch in range(s, e):
                chars[(d, ch)] = regions[(d, p)]
    shared = sorted(set(chars_a) & set(chars_b))
    expected = brute_scores([chars_a[k] for k in shared], [chars_b[k] for k in shared])
    got = {(r["region_a"], r["region_b"]): (r["precision"], r["recall"], r["f1"]) for r in overlaps_table(store, a, b)}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


def narrow_dictionary(store) -> DictionaryKey:
    """tiny/base/L1's stream with vectors cut to 32 dimensions, built (once per store)."""
    narrow = DictionaryKey("tiny", "narrow", 1, 10.0)
    if (store.dictionary_dir(narrow) / "meta.json").is_file():
        return narrow
    source = store.activation_path(DictionaryKey("tiny", "base", 1, 10.0).activations)
    table = store.read_table(source)
    from ep_store.store import arrow_to_vectors, vectors_to_arrow

    x = arrow_to_vectors(table.column("vector"))[:, :32]
    same_stream = {k: v for k, v in store.info(source).meta.items() if k in ("corpus", "fingerprint")}
    store.append_activations(narrow.activations, table.set_column(table.schema.get_field_index("vector"), "vector",
                                                                   vectors_to_arrow(x)), same_stream)
    build(BuildConfig("tiny", "narrow", 1, 10.0, calibration_tokens=500, batch_size=256, device="cpu"), store, progress=False)
    return narrow


def test_both_across_widths_says_vector_was_skipped(two_models):
    """--method both with other widths runs membership only, and the summary says so (issue 18, D12)."""
    store, _ = two_models
    narrow = narrow_dictionary(store)
    summary = match(MatchConfig("tiny/base/L1/p10", str(narrow), method="both"), store)
    assert summary["methods_run"] == ["membership"] and summary["method"] == "membership"
    assert summary["vector_skipped"] == "widths differ (64 vs 32)"
    same = match(MatchConfig("tiny/base/L1/p10", "tiny/other/L1/p10", method="both"), store)
    assert same["methods_run"] == ["vector", "membership"] and "vector_skipped" not in same


def test_match_refusals(two_models, tmp_path):
    store, _ = two_models
    # Vector matching across widths: refused.
    narrow = narrow_dictionary(store)
    before = tree_snapshot(store.root)
    result = CliRunner().invoke(main, ["match", "tiny/base/L1/p10", str(narrow), "--method", "vector",
                                       "--store", str(store.root)])
    assert_refused(result, "vector matching needs equal widths")
    assert tree_snapshot(store.root) == before
    # Different streams: a dictionary whose assignments share no positions.
    other = Store(tmp_path / "s")
    shutil.copytree(store.root, other.root)
    key = DictionaryKey("tiny", "other", 1, 10.0)
    path = other.dictionary_dir(key) / "assignments.lance"
    t = other.read_table(path)
    shifted = t.set_column(0, "doc_id", pa.array([d + 10**6 for d in t.column("doc_id").to_pylist()], pa.int64()))
    other.write_table(path, shifted)
    before = tree_snapshot(other.root)
    result = CliRunner().invoke(main, ["match", "tiny/base/L1/p10", str(key), "--store", str(other.root)])
    assert_refused(result, "share no stream positions")
    assert tree_snapshot(other.root) == before


def test_diff_report_and_sql_view(two_models, tmp_path):
    store, mdir = two_models
    result = CliRunner().invoke(main, ["diff", "tiny/base/L1/p10", "tiny/other/L1/p10", "--out", str(tmp_path / "d"),
                                       "--store", str(store.root), "--models-dir", str(mdir)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    md = (tmp_path / "d" / "README.md").read_text()
    assert f"| {summary['preserved']} | {summary['introduced']} | {summary['dropped']} |" in md
    assert "## The finding" in md and (tmp_path / "d" / "index.html").is_file()
    # The chat prompts are in the stream, so some members lie in markers or refusal text.
    enrichment = json.loads((tmp_path / "d" / "summary.json").read_text())["enrichment"]
    assert sum(e["labelled"] for e in enrichment.values()) > 0
    counted = CliRunner().invoke(main, ["sql", "SELECT status, count(*) AS n FROM matches WHERE b = 'tiny/other/L1/p10' "
                                        "AND a = 'tiny/base/L1/p10' GROUP BY 1 ORDER BY 1", "--format", "json",
                                        "--store", str(store.root)])
    rows = {json.loads(line)["status"]: json.loads(line)["n"] for line in counted.stdout.strip().splitlines()}
    assert rows == {k: summary[k] for k in ("dropped", "introduced", "preserved") if summary[k]}


def test_finetune_tiny_end_to_end(tmp_path, models_dir):
    mdir = tmp_path / "models"
    shutil.copytree(models_dir / "tiny" / "base", mdir / "tiny" / "base")
    summary = finetune(FinetuneConfig("tiny", "base", "sft", steps=3, save_every=2, batch_size=2, max_new_tokens=4),
                       mdir, progress=False)
    assert summary["checkpoints"] == ["sft-step2", "sft"]
    assert 0 <= summary["harmful_refused"] <= 1 and 0 <= summary["benign_refused"] <= 1
    from transformers import AutoModelForCausalLM

    for name in summary["checkpoints"]:
        net = AutoModelForCausalLM.from_pretrained(mdir / "tiny" / name)
        assert net.config.num_hidden_layers == 4
    report = json.loads((mdir / "tiny" / "sft" / "finetune.json").read_text())
    assert len(report["losses"]) == 3 and report["losses"][-1] < report["losses"][0] * 1.5
    # Training changed the weights; the base checkpoint is untouched.
    import torch

    base = AutoModelForCausalLM.from_pretrained(mdir / "tiny" / "base").state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(mdir / "tiny" / "sft").state_dict()
    assert any(not torch.equal(base[k], tuned[k]) for k in base if "embed" not in k)


def test_sql_sees_only_published_matches(two_models, tmp_path):
    """Found by the crash test: `ep match` killed during its first write leaves pairs.lance
    without a version and no meta.json; the next command opening the store failed on it. The
    matches views read finished matches only, at the versions their meta.json names."""
    from ep_store.sql.db import StoreDB

    src, _ = two_models
    store = Store(tmp_path / "store")
    shutil.copytree(src.root, store.root)
    a, b = DictionaryKey("tiny", "base", 1, 10.0), DictionaryKey("tiny", "other", 1, 10.0)
    match(MatchConfig(str(a), str(b), method="both"), store)
    published = StoreDB(store).query("SELECT count(*) AS n FROM matches").column("n")[0].as_py()
    assert published > 0
    killed = store.matches_dir("killed__first-write")  # a half-created dataset, as SIGKILL leaves it
    (killed / "pairs.lance" / "data").mkdir(parents=True)
    folder = store.matches_dir(f"{a.slug()}__{b.slug()}")  # a rerun killed after its write, before meta.json
    store.write_table(folder / "pairs.lance", store.read_table(folder / "pairs.lance").slice(0, 1))
    db = StoreDB(store)
    assert db.query("SELECT count(*) AS n FROM matches").column("n")[0].as_py() == published
    assert db.query("SELECT count(*) AS n FROM match_overlaps").column("n")[0].as_py() > 0
