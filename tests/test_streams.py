"""Joins across streams (issue 18, A3): a corpus fingerprint recorded at harvest, and every
operation that pairs the tokens of two activation datasets refusing datasets of other documents."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.errors import UsageError
from ep_store.keys import ActivationKey, DictionaryKey, SAEKey
from ep_store.sae.compare import check_trained_stream
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.corpus import Document, builtin_texts, iter_documents
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store.core import Store
from ep_store.store.streams import (
    FINGERPRINT_KEY,
    corpus_fingerprint,
    require_same_stream,
    stream_identity,
)
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused, harvest_args

A = "tiny/base/L1/p10"  # corpus A, 400 tokens
B_OTHER = "tiny/other/L1/p10"  # corpus B: other documents
B_SAME = "tiny/other/L2/p10"  # corpus A again, another budget, ctx and batch size


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def texts():
    return [t for _, t in list(builtin_texts())[:14]]


@pytest.fixture(scope="module")
def streams(tmp_path_factory, models_dir, texts):
    root = tmp_path_factory.mktemp("streams")
    corpus_a = write_corpus(root / "a.jsonl", texts[:6])
    corpus_b = write_corpus(root / "b.jsonl", texts[6:12])
    store = Store(root / "store")
    for ckpt, layer, corpus, tokens, ctx, batch in (("base", 1, corpus_a, 400, 64, 4),
                                                    ("other", 1, corpus_b, 400, 64, 4),
                                                    ("other", 2, corpus_a, 300, 32, 3)):
        harvest(HarvestConfig("tiny", ckpt, (layer,), corpus=str(corpus), max_tokens=tokens, ctx=ctx,
                              batch_size=batch, device="cpu"), store, models_dir, progress=False)
        build(BuildConfig("tiny", ckpt, layer, 10.0, calibration_tokens=200, calibration_batch=100, batch_size=128,
                          saturation_window=50, device="cpu"), store, progress=False)
    return store, models_dir, corpus_a, corpus_b


def cli(*args):
    return CliRunner().invoke(main, [*args])


# -- the fingerprint ---------------------------------------------------------------------------------
def test_fingerprint_is_length_prefixed_and_ordered():
    one = corpus_fingerprint([Document(0, "x", "ab"), Document(1, "y", "c")])
    assert one == corpus_fingerprint([Document(0, "other name", "ab"), Document(1, "z", "c")])  # texts, not names
    assert one[FINGERPRINT_KEY] != corpus_fingerprint([Document(0, "x", "a"), Document(1, "y", "bc")])[FINGERPRINT_KEY]
    assert one[FINGERPRINT_KEY] != corpus_fingerprint([Document(0, "x", "c"), Document(1, "y", "ab")])[FINGERPRINT_KEY]
    assert one["corpus_documents"] == 2


def test_harvest_records_the_whole_document_list_whatever_budget_ctx_batch(streams):
    store, _, corpus_a, corpus_b = streams
    whole_a = corpus_fingerprint(iter_documents(str(corpus_a)))
    a, same = stream_identity(store, ActivationKey("tiny", "base", 1)), stream_identity(store, ActivationKey("tiny", "other", 2))
    assert a[FINGERPRINT_KEY] == same[FINGERPRINT_KEY] == whole_a[FINGERPRINT_KEY]
    assert a["corpus_documents"] == 6  # every document, though 400 tokens reach only the first ones
    rows = store.read_table(store.activation_path(ActivationKey("tiny", "base", 1)), columns=["doc_id"])
    assert max(rows.column("doc_id").to_pylist()) < 5
    assert stream_identity(store, ActivationKey("tiny", "other", 1))[FINGERPRINT_KEY] != whole_a[FINGERPRINT_KEY]


def test_resume_keeps_the_fingerprint(streams, tmp_path):
    _, models_dir, corpus_a, _ = streams
    store = Store(tmp_path / "store")
    for tokens in (120, 260):
        harvest(HarvestConfig("tiny", "base", (1,), corpus=str(corpus_a), max_tokens=tokens, ctx=64, batch_size=4,
                              device="cpu"), store, models_dir, progress=False)
    assert store.info(store.activation_path(ActivationKey("tiny", "base", 1))).rows == 260
    assert stream_identity(store, ActivationKey("tiny", "base", 1)) == {
        "corpus": str(corpus_a), **corpus_fingerprint(iter_documents(str(corpus_a)))}


def test_resume_refuses_a_corpus_changed_beyond_the_stored_rows(models_dir, tmp_path, texts):
    """Before: the stored rows were still the stream's prefix, so the resume went on and the
    dataset held rows of two document lists under the first one's name."""
    corpus = write_corpus(tmp_path / "c.jsonl", texts[:6])
    store = tmp_path / "store"
    assert cli(*harvest_args(store, models_dir, **{"--corpus": str(corpus), "--max-tokens": "100"})).exit_code == 0
    write_corpus(corpus, [*texts[:5], texts[5].replace("the", "a", 1)])  # the last document, never reached
    before = tree_snapshot(store)
    result = cli(*harvest_args(store, models_dir, **{"--corpus": str(corpus), "--max-tokens": "200"}))
    assert_refused(result, "text changed")
    assert "--overwrite" in result.output
    assert tree_snapshot(store) == before


# -- every pairing refuses other documents ----------------------------------------------------------------
def test_membership_match_refuses_other_documents(streams):
    """Before: exit 0, unrelated documents aligned by (doc_id, pos) and 'preserved' regions reported."""
    store, *_ = streams
    before = tree_snapshot(store.root)
    result = cli("match", A, B_OTHER, "--method", "membership", "--store", str(store.root))
    assert_refused(result, "hold different documents")
    assert "tiny/base/L1" in result.output and "tiny/other/L1" in result.output
    assert tree_snapshot(store.root) == before
    result = cli("match", A, B_OTHER, "--store", str(store.root))  # both: membership too
    assert_refused(result, "--method vector")
    assert tree_snapshot(store.root) == before


def test_membership_match_of_one_corpus_with_other_budgets_runs(streams, tmp_path):
    store, *_ = streams
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    result = cli("match", A, B_SAME, "--method", "membership", "--store", str(root))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("question", ["same_tokens", "membership_overlap", "membership_overlap_spans", "transitions",
                                      "transition_summary"])
def test_pair_questions_refuse_other_documents(streams, question):
    store, *_ = streams
    result = cli("stats", A, question, "--against", B_OTHER, "--store", str(store.root))
    assert_refused(result, "hold different documents")


def test_same_tokens_runs_for_one_corpus(streams):
    store, *_ = streams
    result = cli("stats", A, "same_tokens", "--against", B_SAME, "--store", str(store.root), "--format", "csv")
    assert result.exit_code == 0, result.output


def test_diff_refuses_other_documents(streams, tmp_path):
    store, *_ = streams
    before = tree_snapshot(store.root)
    result = cli("diff", A, B_OTHER, "--out", str(tmp_path / "diff"), "--store", str(store.root))
    assert_refused(result, "hold different documents")
    assert tree_snapshot(store.root) == before and not (tmp_path / "diff").exists()


def test_assign_over_other_documents_refused(streams, tmp_path):
    store, *_ = streams
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    before = tree_snapshot(root)
    result = cli("assign", "--dictionary", A, "--activations", "tiny/other/L1", "--device", "cpu", "--store", str(root),
                 "--no-progress")
    assert_refused(result, "hold different documents")
    assert tree_snapshot(root) == before
    result = cli("assign", "--dictionary", A, "--activations", "tiny/other/L2", "--device", "cpu", "--store", str(root),
                 "--no-progress")
    assert result.exit_code == 0, result.output  # same documents


def test_library_assign_over_other_documents_refused(streams, tmp_path):
    """Before: only the CLI's engine checked the streams, so ``assign_dataset`` (and the
    ``AssignJob`` both engines open) wrote foreign assignments keyed by unrelated tokens."""
    from ep_store.stages.dictionary import AssignJob, assign_dataset

    store, *_ = streams
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    copy = Store(root)
    before = tree_snapshot(root)
    with pytest.raises(UsageError, match="hold different documents"):
        assign_dataset(copy, A, "tiny/other/L1", "cpu", progress=False)
    with pytest.raises(UsageError, match="hold different documents"):
        AssignJob.open(copy, A, ActivationKey("tiny", "other", 1), "cpu")
    assert tree_snapshot(root) == before
    assert assign_dataset(copy, A, "tiny/other/L2", "cpu", progress=False)["tokens"] > 0  # same documents


def test_datasets_from_before_fingerprints_are_refused(streams, tmp_path):
    store, *_ = streams
    old = Store(tmp_path / "store")
    table = store.read_table(store.activation_path(ActivationKey("tiny", "base", 1)))
    meta = dict(store.info(store.activation_path(ActivationKey("tiny", "base", 1))).meta)
    meta["fingerprint"] = {k: v for k, v in meta["fingerprint"].items() if k not in (FINGERPRINT_KEY, "corpus_documents")}
    old.append_activations(ActivationKey("tiny", "base", 1), table, meta)
    old.append_activations(ActivationKey("tiny", "other", 1), table, meta)
    with pytest.raises(UsageError, match="before corpus fingerprints were recorded.*re-harvest.*--overwrite"):
        require_same_stream(old, ActivationKey("tiny", "base", 1), ActivationKey("tiny", "other", 1), "test")
    require_same_stream(old, ActivationKey("tiny", "base", 1), ActivationKey("tiny", "base", 1), "test")  # itself


def test_sae_compare_refuses_an_sae_trained_on_other_documents(streams):
    store, *_ = streams
    key, skey = DictionaryKey.parse(A), SAEKey("tiny", "base", 1, "sae")
    now = stream_identity(store, key.activations)
    check_trained_stream(store, key, skey, {"activations": {**now}})
    with pytest.raises(UsageError, match="trained on other documents"):
        check_trained_stream(store, key, skey, {"activations": {**now, FINGERPRINT_KEY: "0" * 64}})
    with pytest.raises(UsageError, match="trained before corpus fingerprints"):
        check_trained_stream(store, key, skey, {"activations": {"key": str(key.activations)}})
