"""Pre-tokenized corpora (issue 21, item 5): a field of token-id lists (``input_ids``, as
SAELens caches and tokenized ``datasets`` hold them) is harvested as it is, with the same rows
as the text it came from; bad ids are refused in one line and nothing is written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey
from ep_store.stages.corpus import Document, iter_documents, token_texts
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import arrow_to_vectors
from ep_store.store.core import Store
from ep_store.store.streams import corpus_fingerprint
from tests.conftest import tree_snapshot

TEXTS = ["The interpreter reads each statement in turn and runs it.",
         "A module is a file of definitions; importing it runs them once.",
         "The interpreter reads each statement in turn and runs it."]  # a duplicate document on purpose


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _rows(store_root, key):
    store = Store(store_root)
    table = store.dataset(store.activation_path(key)).to_table()
    return table, arrow_to_vectors(table.column("vector"))


def _harvest(models_dir, corpus, store_root, text_field="text"):
    harvest(HarvestConfig("tiny", "base", (1,), corpus=str(corpus), text_field=text_field, max_tokens=2000, ctx=16,
                          device="cpu"), Store(store_root), models_dir, progress=False)
    return _rows(store_root, ActivationKey("tiny", "base", 1))


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_token_ids_harvest_like_their_text(models_dir, tiny_tokenizer, tmp_path, kind):
    ids = [_ids(tiny_tokenizer, t) for t in TEXTS]
    text_corpus = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": TEXTS}), text_corpus)
    if kind == "parquet":
        corpus = tmp_path / "ids.parquet"
        pq.write_table(pa.table({"input_ids": ids}), corpus)
    else:
        import datasets

        corpus = tmp_path / "ids_ds"
        datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(corpus), num_shards=2)
    want, want_x = _harvest(models_dir, text_corpus, tmp_path / "a")
    got, got_x = _harvest(models_dir, corpus, tmp_path / "b", text_field="input_ids")
    for column in ("doc_id", "pos", "token_id"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist()
    np.testing.assert_array_equal(got_x, want_x)
    # token texts tile each document: char_start of a token is char_end of the one before
    starts, ends = got.column("char_start").to_pylist(), got.column("char_end").to_pylist()
    docs = got.column("doc_id").to_pylist()
    assert all(starts[i] == (ends[i - 1] if docs[i] == docs[i - 1] else 0) for i in range(1, len(docs)))
    assert starts[0] == 0 and sum(map(len, got.column("token").to_pylist())) == ends[-1] + sum(
        ends[i - 1] for i in range(1, len(docs)) if docs[i] != docs[i - 1])


def test_fingerprint_tells_ids_apart():
    a = corpus_fingerprint([Document(0, "x", "", token_ids=(5, 6, 7))])
    b = corpus_fingerprint([Document(0, "x", "", token_ids=(5, 6, 8))])
    empty = corpus_fingerprint([Document(0, "x", "")])
    assert len({a["corpus_fingerprint"], b["corpus_fingerprint"], empty["corpus_fingerprint"]}) == 3


def test_rows_without_ids_are_skipped(tmp_path):
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text('{"input_ids": [4, 5]}\n{"input_ids": []}\n{"input_ids": null}\n{"input_ids": [6]}\n',
                      encoding="utf-8")
    docs = list(iter_documents(str(corpus), "input_ids"))
    assert [d.token_ids for d in docs] == [(4, 5), (6,)] and [d.doc_id for d in docs] == [0, 1]


@pytest.mark.parametrize(("rows", "kind", "message"), [
    ([[3, 4], [10**6]], pa.int64(), "beyond the tokenizer's vocabulary"),
    ([[3, 4], [3, -1]], pa.int64(), "not a list of token ids"),
    ([[3, 4], [3, 2.5]], pa.float64(), "not a list of token ids"),
])
def test_bad_ids_exit_2_and_write_nothing(models_dir, tmp_path, rows, kind, message):
    corpus = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(kind))}), corpus)
    store_root = tmp_path / "store"
    Store(store_root)
    before = tree_snapshot(store_root)
    result = CliRunner().invoke(main, ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1",
                                       "--corpus", str(corpus), "--text-field", "input_ids", "--store", str(store_root),
                                       "--models-dir", str(models_dir), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert tree_snapshot(store_root) == before


def test_byte_pieces_of_one_character(real_tokenizers):
    """A byte-level tokenizer splits an emoji over several ids: the first piece holds it."""
    tokenizer = real_tokenizers["smollm2-135m"]
    text = "fox 🦊 and 𝔘 done"
    ids = _ids(tokenizer, text)
    pieces = token_texts(tokenizer, tuple(ids), "test")
    assert "".join(pieces) == text
    assert "" in pieces and all("\ufffd" not in p for p in pieces)


def test_hf_stream_reads_only_what_the_budget_needs(models_dir, tiny_tokenizer, tmp_path):
    """``hf:FOLDER`` streams a local data folder through ``datasets`` (no hub here): the rows equal
    the same file's harvest, and the stream stops once the rows' tokens cover the token budget."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    texts = [f"Document {i} says the interpreter runs statement {i} in turn." for i in range(200)]
    pq.write_table(pa.table({"text": texts}), folder / "train.parquet")
    budget = 300
    for spec, root in ((str(folder / "train.parquet"), "file"), (f"hf:{folder}", "hub")):
        harvest(HarvestConfig("tiny", "base", (1,), corpus=spec, max_tokens=budget, ctx=16, device="cpu"),
                Store(tmp_path / root), models_dir, progress=False)
    (file_rows, file_x), (hub_rows, hub_x) = (_rows(tmp_path / r, ActivationKey("tiny", "base", 1))
                                              for r in ("file", "hub"))
    assert hub_rows.column("token").to_pylist() == file_rows.column("token").to_pylist()
    np.testing.assert_array_equal(hub_x, file_x)
    store = Store(tmp_path / "hub")
    read = store.info(store.activation_path(ActivationKey("tiny", "base", 1))).meta["fingerprint"]["corpus_documents"]
    tokens = [len(_ids(tiny_tokenizer, t)) for t in texts]
    assert sum(tokens[:read - 1]) < budget <= sum(tokens[:read])
    assert read < len(texts)


def test_hf_stream_that_cannot_open_exits_2(models_dir, tmp_path):
    result = CliRunner().invoke(main, ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1",
                                       "--corpus", f"hf:{tmp_path / 'nothing-here'}", "--store", str(tmp_path / "s"),
                                       "--models-dir", str(models_dir), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "cannot stream" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s" / "activations").exists()
