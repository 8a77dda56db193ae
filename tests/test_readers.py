"""One way to read an input file (issue 18, B5) and tokenization bounded by the token budget
(B6): ep_store.stages.readers by kind of hazard, the commands that use it, and piecewise tokenization."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.errors import UsageError
from ep_store.evaluate.tasks import concept_rows_from_file, file_task
from ep_store.keys import ActivationKey
from ep_store.stages import readers
from ep_store.stages.corpus import (
    PIECE_CHARS,
    Document,
    encode,
    iter_contexts,
    iter_documents,
    piece_bounds,
)
from ep_store.stages.plan import HarvestConfig, take_tokens
from ep_store.store.core import Store
from ep_store.studies.generate import read_prompts
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused

SEPARATORS = "\u2028\u2029\u0085"


def jsonl(path: Path, rows: list[dict], bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


# -- Unicode line separators ----------------------------------------------------------------------
def test_unicode_separators_stay_inside_a_prompt(tmp_path):
    text = f"one{SEPARATORS}still one"
    assert read_prompts(jsonl(tmp_path / "p.jsonl", [{"prompt": text}])) == [text]  # was refused
    txt = tmp_path / "p.txt"
    txt.write_text(f"{text}\nsecond\n", encoding="utf-8")
    assert read_prompts(txt) == [text, "second"]  # was four prompts (str.splitlines)


def test_unicode_separators_stay_inside_a_jsonl_record(tmp_path):
    raw = tmp_path / "raw.jsonl"  # the separators unescaped inside the JSON string: legal JSON
    raw.write_bytes(('{"text": "a' + SEPARATORS + 'b"}\n').encode())
    assert [d.text for d in iter_documents(str(raw))] == [f"a{SEPARATORS}b"]


# -- CRLF and BOM: offsets index the same text in every format ----------------------------------
def test_crlf_and_bom_give_the_same_document_in_every_format(tmp_path):
    text = "first line\r\nsecond line\r\n"
    txt = tmp_path / "doc.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + text.encode())
    csv = tmp_path / "doc.csv"
    csv.write_bytes(b"\xef\xbb\xbftext\r\n\"" + text.encode() + b"\"\r\n")
    pq.write_table(pa.table({"text": [text]}), tmp_path / "doc.parquet")
    sources = [txt, jsonl(tmp_path / "doc.jsonl", [{"text": text}], bom=True), csv, tmp_path / "doc.parquet"]
    for path in sources:
        assert [d.text for d in iter_documents(str(path))] == [text], path  # .txt lost \r and kept the BOM


def test_crlf_offsets_are_offsets_into_the_file_text(tmp_path, tiny_tokenizer):
    text = "alpha beta\r\ngamma delta\r\n"
    txt = tmp_path / "doc.txt"
    txt.write_bytes(text.encode())
    docs = {p: list(iter_documents(str(p))) for p in (txt, jsonl(tmp_path / "doc.jsonl", [{"text": text}]))}
    spans = [[c.offsets for c in iter_contexts(d, tiny_tokenizer, 4)] for d in docs.values()]
    assert spans[0] == spans[1]
    assert spans[0][-1][-1][1] <= len(text) and spans[0][0][0][0] == 0


def test_prompt_lines_drop_only_the_cr_of_crlf(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\rpart\n")
    assert read_prompts(txt) == ["first", "second\rpart"]  # BOM stripped; a lone \r is no line break


# -- NUL, invalid UTF-8, lone surrogates ----------------------------------------------------------
def test_nul_is_refused_with_its_place(tmp_path):
    txt = tmp_path / "nul.txt"
    txt.write_bytes("é\x00x".encode())
    with pytest.raises(UsageError, match=r"NUL byte at byte offset 2"):
        list(iter_documents(str(txt)))
    with pytest.raises(UsageError, match=r"row 1: field 'text' holds a NUL"):
        list(iter_documents(str(jsonl(tmp_path / "nul.jsonl", [{"text": "ok"}, {"text": "a\x00b"}]))))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    head = {".txt": b"hello ", ".jsonl": b'{"text": "hello ', ".csv": b"text\nhello "}[suffix]
    path.write_bytes(head + b"\xff tail" + (b'"}\n' if suffix == ".jsonl" else b"\n"))
    with pytest.raises(UsageError, match=rf"{path.name} is not UTF-8 text: invalid byte 0xff at byte offset "
                                         rf"{len(head)}"):
        read_prompts(path, "text") if suffix != ".txt" else list(iter_documents(str(path)))


def test_lone_surrogate_is_refused(tmp_path):
    with pytest.raises(UsageError, match="lone surrogate"):
        read_prompts(jsonl(tmp_path / "s.jsonl", [{"prompt": "a \ud83d b"}]))


# -- empty rows, missing fields -------------------------------------------------------------------
def test_empty_and_whitespace_rows_are_skipped_and_counted_in_every_format(tmp_path, caplog):
    texts = ["one", "", " \t ", "two", None]
    pq.write_table(pa.table({"text": texts}), tmp_path / "e.parquet")
    (tmp_path / "e.csv").write_text("text\none\n\"\"\n\" \t \"\ntwo\n", encoding="utf-8")
    (tmp_path / "e.txt").write_text("one\n\n \t \ntwo\n", encoding="utf-8")
    rows = [{"text": t} for t in texts]
    for path in (tmp_path / "e.parquet", tmp_path / "e.csv", jsonl(tmp_path / "e.jsonl", rows), tmp_path / "e.txt"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ep_store.stages.readers"):
            got = [r.text for r in readers.read_texts(path, txt="lines")]
        assert got == ["one", "two"], path
        assert "skipped" in caplog.text and f"of {4 if path.suffix in ('.csv', '.txt') else 5}" in caplog.text


def test_non_text_value_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"row 0: field 'text' holds int"):
        list(iter_documents(str(jsonl(tmp_path / "n.jsonl", [{"text": 7}]))))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_missing_text_field_names_columns_and_option(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"body": ["some text"], "id": [1]}), path)
    elif suffix == ".csv":
        path.write_text("body,id\nsome text,1\n", encoding="utf-8")
    else:
        jsonl(path, [{"body": "some text", "id": 1}])
    with pytest.raises(UsageError, match=r"has no field 'text' \(its fields: body, id\); pass --text-field"):
        list(iter_documents(str(path)))
    assert [d.text for d in iter_documents(str(path), "body")] == ["some text"]


def test_eval_data_uses_the_reader(tmp_path):
    csv = tmp_path / "task.csv"
    csv.write_bytes(b"\xef\xbb\xbftext,label\r\n\"a\r\nb\",1\r\n  ,0\r\nc,0\r\n")
    task = file_task(csv)  # BOM stripped from the header, CRLF inside a quoted field kept, blank text skipped
    assert task.texts == ["a\r\nb", "c"] and task.labels == ["1", "0"]
    bad = jsonl(tmp_path / "c.jsonl", [{"concept": "x", "text": "a\x00", "label": "positive"}])
    with pytest.raises(UsageError, match="NUL"):
        concept_rows_from_file(bad)


# -- the commands: --text-field, one-line refusals ------------------------------------------------
def harvest_args(store: Path, corpus: Path, *extra: str) -> list[str]:
    return ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1", "--corpus", str(corpus),
            "--max-tokens", "40", "--ctx", "8", "--device", "cpu", "--store", str(store), "--no-progress", *extra]


def test_harvest_text_field(models_dir, tmp_path):
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["the quick brown fox jumps over the lazy dog " * 4]}), corpus)
    store = tmp_path / "store"
    store.mkdir()
    before = tree_snapshot(store)
    runner = CliRunner()
    assert_refused(runner.invoke(main, harvest_args(store, corpus, "--models-dir", str(models_dir))),
                   "has no field 'text' (its fields: body); pass --text-field")
    assert tree_snapshot(store) == before
    ok = runner.invoke(main, harvest_args(store, corpus, "--models-dir", str(models_dir), "--text-field", "body"))
    assert ok.exit_code == 0, ok.output
    meta = Store(store).info(Store(store).activation_path(ActivationKey("tiny", "base", 1))).meta
    assert meta["text_field"] == "body"
    assert "text_field" not in HarvestConfig("tiny", "base", (1,)).stream_meta(1, [])  # old datasets still resume


def test_generate_text_field(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("id,question\n1,What is a cat?\n2,\n", encoding="utf-8")
    assert read_prompts(csv, "question") == ["What is a cat?"]
    with pytest.raises(UsageError, match=r"has no field 'prompt or instruction' \(its fields: id, question\)"):
        read_prompts(csv)


def test_eval_ood_text_field(tiny_store, models_dir, tmp_path):
    """ep eval ood --text-field (issue 18, B5): before, an OOD file's rows were read as 'text' only."""
    import shutil

    from ep_store.stages.build import BuildConfig, build

    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    build(BuildConfig("tiny", "base", 1, 10, calibration_tokens=500, calibration_batch=250, batch_size=256,
                      device="cpu"), Store(root), assign=False, progress=False)
    ood = jsonl(tmp_path / "notes.jsonl", [{"body": f"an unusual note number {i} about tides"} for i in range(3)])
    args = ["eval", "ood", "--dictionary", "tiny/base/L1/p10", "--ood-corpus", str(ood), "--documents", "2",
            "--max-tokens-per-text", "8", "--device", "cpu", "--store", str(root), "--models-dir", str(models_dir),
            "--no-progress"]
    before = tree_snapshot(root)
    runner = CliRunner()
    assert_refused(runner.invoke(main, [*args, "--out", str(tmp_path / "bad")]),
                   "has no field 'text' (its fields: body); pass --text-field")
    assert tree_snapshot(root) == before and not (tmp_path / "bad").exists()
    ok = runner.invoke(main, [*args, "--out", str(tmp_path / "out"), "--text-field", "body"])
    assert ok.exit_code == 0, ok.output
    sets = json.loads((tmp_path / "out" / "metrics.json").read_text())["sets"]["tiny/base/L1/p10"]
    assert sets["notes"]["documents"] == 2


# -- B6: tokenization bounded by the tokens kept --------------------------------------------------
class CountingTokenizer:
    """Delegates to a tokenizer and counts the characters it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self.tokenizer(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def check_tiling(text: str, contexts) -> None:
    offsets = [o for c in contexts for o in c.offsets]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert all(a <= b for a, b in offsets)  # monotone, exact slices
    assert all(text[a:b] == t for c in contexts for (a, b), t in zip(c.offsets, c.tokens, strict=True))


def test_big_document_tokenizes_only_what_the_budget_keeps(tiny_tokenizer):
    words = "Exemplar partitioning reads a stream of activations, one token at a time. "
    text = words * (3_000_000 // len(words))  # about 3 MB, one document
    counting = CountingTokenizer(tiny_tokenizer)
    kept = list(take_tokens(iter_contexts([Document(0, "big", text)], counting, 16), 500))
    assert sum(len(c.token_ids) for c in kept) == 500
    assert counting.chars <= PIECE_CHARS  # one piece of 64K characters, not 3 MB
    check_tiling(text, kept)
    whole_ids, _ = encode(tiny_tokenizer, text[:PIECE_CHARS])
    assert [i for c in kept for i in c.token_ids] == whole_ids[:500]


def test_pieces_give_the_whole_documents_ids_and_exact_offsets(tiny_tokenizer):
    text = ("Résumé of naïve café, 👍🏽 emoji;\n  indented\tcode(x) = y  and  double  spaces.\r\n" * 40)
    doc = Document(0, "d", text)
    whole = list(iter_contexts([doc], tiny_tokenizer, 7, piece_chars=10**9))
    for piece_chars in (64, 101, 500):
        assert len(list(piece_bounds(text, piece_chars))) > 1
        pieces = list(iter_contexts([doc], tiny_tokenizer, 7, piece_chars=piece_chars))
        assert [(c.start_pos, c.token_ids, c.offsets) for c in pieces] == \
            [(c.start_pos, c.token_ids, c.offsets) for c in whole]
        check_tiling(text, pieces)


def test_text_without_spaces_is_cut_at_the_limit_with_exact_offsets(tiny_tokenizer):
    text = "x" * 1000 + "e\u0301" * 300  # no space at all; a combining accent never starts a piece
    bounds = list(piece_bounds(text, 128))
    assert bounds[0] == (0, 128) and all(b - a <= 128 for a, b in bounds)
    assert all(not text[a].startswith("\u0301") for a, _ in bounds)
    check_tiling(text, list(iter_contexts([Document(0, "d", text)], tiny_tokenizer, 5, piece_chars=128)))


def test_span_labels_read_the_corpus_with_its_text_field(tmp_path):
    from ep_store.stages.corpus import span_labels
    from ep_store.stages.prompts import chat_text

    corpus = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"body": [chat_text("hi", "hello")]}), corpus)
    labels = span_labels(str(corpus), "body").to_pylist()  # ep diff / ep sql read what the harvest read
    assert {r["label"] for r in labels} == {"marker"} and len(labels) == 4


def test_a_datasets_folder_and_arrow_shards_are_corpora(tmp_path, models_dir):
    """A folder Hugging Face ``datasets`` wrote (``save_to_disk``, two shards) and a bare
    ``.arrow`` shard read like a .jsonl of the same rows: same documents in the same order
    (so doc ids are deterministic), ``--text-field``, emoji and empty rows alike; a harvest
    from the folder stores the same tokens as one from the .jsonl (issue 21, item 5)."""
    datasets = pytest.importorskip("datasets")
    texts = ["The first document. 🦊", "", "Second: 数据 and more text.", "Third\r\nwith CRLF.", "Fourth one."]
    rows = [{"body": t, "label": i % 2} for i, t in enumerate(texts)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    want = [r.text for r in readers.read_texts(jsonl(tmp_path / "c.jsonl", rows), "body")]
    assert [r.text for r in readers.read_texts(tmp_path / "hf", "body")] == want == [t for t in texts if t]
    shard = sorted((tmp_path / "hf").glob("*.arrow"))[0]
    assert [r.text for r in readers.read_texts(shard, "body")] == [t for t in texts[:3] if t]
    docs = [d.text for d in iter_documents(f"{tmp_path / 'hf'},builtin", "body")]
    assert docs[:4] == want
    for source in (tmp_path / "hf", shard):  # the fields are named, as for Parquet
        with pytest.raises(UsageError, match=r"no field 'text' \(its fields: body, label\)"):
            readers.read_texts(source)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UsageError, match="several splits"):
        readers.read_texts(tmp_path / "dd", "body")
    summaries = []
    for name, corpus in (("a", tmp_path / "hf"), ("b", tmp_path / "c.jsonl")):
        store = tmp_path / f"store_{name}"
        done = CliRunner().invoke(main, ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1",
                                         "--corpus", str(corpus), "--text-field", "body", "--store", str(store),
                                         "--models-dir", str(models_dir), "--device", "cpu", "--no-progress"])
        assert done.exit_code == 0, done.output
        table = Store(store).read_table(Store(store).activation_path(ActivationKey("tiny", "base", 1)),
                                        columns=["doc_id", "pos", "token"])
        summaries.append(table.to_pylist())
    assert summaries[0] == summaries[1] and len(summaries[0]) > 10


def test_stdlib_source_takes_each_package_in_turn():
    """The ``stdlib`` corpus source (issue 22): the evaluation packages' source, one file of each
    package in turn, so a token budget's prefix covers every package; test folders left out."""
    from ep_store.stages.corpus import STDLIB_PACKAGES, iter_documents

    docs = list(iter_documents("chat,stdlib"))
    source = [d for d in docs if d.name.startswith("source:")]
    first = [d.name.split(":", 1)[1].split("/")[0] for d in source[: len(STDLIB_PACKAGES)]]
    assert first == list(STDLIB_PACKAGES)
    assert all(d.name.split(":", 1)[1].split("/")[0] in STDLIB_PACKAGES for d in source)
    assert not any("/test/" in d.name or "/tests/" in d.name for d in source)
    assert [d.doc_id for d in docs] == list(range(len(docs))) and len(source) > 50
