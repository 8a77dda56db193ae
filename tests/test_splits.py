"""No example on both sides of a split (issue 18, A4): inputs with duplicate documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ep_store.evaluate.concepts import concept_texts
from ep_store.evaluate.ood import in_distribution, ood_files
from ep_store.evaluate.probe import ProbeConfig, balanced_split, sparse_probe
from ep_store.evaluate.splits import content_key, first_by_content, without_contents
from ep_store.evaluate.tasks import NEGATIVE, POSITIVE, ConceptRow


def test_content_key_ignores_case_spacing_and_unicode_form():
    assert content_key("  The  cat\n sat ") == content_key("the cat sat") == content_key("THE\tCAT SAT")
    assert content_key("ﬁne") == content_key("fine")  # NFKC ligature
    assert content_key("the cat") != content_key("the cats")
    assert first_by_content(["a b", "c", "A  b", "c ", "d"]).tolist() == [0, 1, 4]
    assert without_contents(["x", "Y", "x ", "z"], ["y"]) == ["x", "z"]


def probe_inputs(copies: int, distinct: int = 40, seed: int = 0):
    """``distinct`` texts, each ``copies`` times (spacing varied), labels alternating, features per text."""
    rng = np.random.default_rng(seed)
    base = [f"document number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(distinct)]
    texts = [t if c == 0 else f" {t.upper()}  " for c in range(copies) for t in base]
    labels = [("cat" if i % 2 else "dog") for _ in range(copies) for i in range(distinct)]
    X = np.tile(rng.standard_normal((distinct, 6)), (copies, 1))
    return texts, labels, X


def test_sparse_probe_splits_each_content_once():
    """Before: the 3 copies of each text were 3 rows, split independently, so most test texts
    had a copy in train (the probe saw its test set)."""
    texts, labels, X = probe_inputs(copies=3)
    cfg = ProbeConfig(ks=(1,), min_per_class=5)
    row = sparse_probe({"raw": X}, labels, cfg, texts=texts).rows[0]
    assert row.n_train + row.n_test == 40
    unique = sparse_probe({"raw": X[:40]}, labels[:40], cfg).rows[0]
    assert (row.n_train, row.n_test) == (unique.n_train, unique.n_test)  # the same as without the copies


def test_deduplicated_split_has_no_shared_content():
    texts, labels, _ = probe_inputs(copies=2)
    keep = first_by_content(texts)
    y = np.array(labels)[keep] == "cat"
    train, test = balanced_split(y, ProbeConfig(ks=(1,)))
    kept = [texts[i] for i in keep]
    assert not {content_key(kept[i]) for i in train} & {content_key(kept[i]) for i in test}


def test_concept_texts_keep_each_content_once_positive_first():
    pos = [f"positive text {i}" for i in range(12)]
    rows = [ConceptRow("c", t, POSITIVE) for t in pos + [pos[0].upper(), pos[1] + "  "]]  # copies
    rows += [ConceptRow("c", f"negative text {i}", NEGATIVE) for i in range(12)]
    rows += [ConceptRow("c", pos[2], NEGATIVE), ConceptRow("", "negative text 0", NEGATIVE)]  # conflict, shared copy
    texts, y = concept_texts(rows, min_per_class=10)["c"]
    keys = [content_key(t) for t in texts]
    assert len(keys) == len(set(keys)) == 24
    assert y[texts.index(pos[2])]  # a text listed both ways stays positive
    assert int(y.sum()) == 12


def test_ood_sets_are_disjoint_by_content(tmp_path):
    docs = [f"in-distribution document {i} " * 3 for i in range(8)]
    corpus = tmp_path / "in.jsonl"
    # the tail repeats documents (one with other spacing): before, copies alternated into both sets
    rows = docs + [docs[7].replace(" ", "  "), docs[6]]  # old tail: 4 5 6 7 7' 6 -> reference 4 6 7', heldout 5 7 6
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    reference, heldout = in_distribution(str(corpus), 3)
    assert not {content_key(t) for t in reference} & {content_key(t) for t in heldout}
    assert len({content_key(t) for t in reference + heldout}) == 6
    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["other text", "OTHER text", reference[0], "more"]))
    assert ood_files((str(ood),), 5, reference + heldout) == {"ood": ["other text", "more"]}


def test_probe_refuses_texts_of_another_length():
    texts, labels, X = probe_inputs(copies=1)
    with pytest.raises(Exception, match="texts for"):
        sparse_probe({"raw": X}, labels, ProbeConfig(ks=(1,), min_per_class=5), texts=texts[:-1])


def write_stream(store, key, docs):
    """An activation dataset of ``docs`` (lists of token strings) in order, one row per token, width 4."""
    import pyarrow as pa

    from ep_store.keys import ActivationKey
    from ep_store.store import vectors_to_arrow

    doc_id = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    pos = np.concatenate([np.arange(len(d)) for d in docs])
    n = len(doc_id)
    store.append_activations(ActivationKey.parse(key), pa.table({
        "doc_id": pa.array(doc_id, pa.int64()), "pos": pa.array(pos, pa.int32()),
        "token_id": pa.array(np.zeros(n), pa.int32()), "token": [t for d in docs for t in d],
        "char_start": pa.array(np.zeros(n), pa.int32()), "char_end": pa.array(np.ones(n), pa.int32()),
        "vector": vectors_to_arrow(np.ones((n, 4), np.float32))}), {})


def test_sae_heldout_rows_share_no_document_with_training(tmp_path):
    """ep sae compare's held-out rows (issue 18, A4). Before: the last rows by index, so the tail of a
    document straddling the boundary and copies of training documents were compared on."""
    from ep_store.keys import DictionaryKey
    from ep_store.sae.compare import SAECompareConfig, heldout_selection
    from ep_store.store.core import Store

    words = lambda text: [w + " " for w in text.split()]  # noqa: E731 - document slices, spaces kept
    docs = [words("the cat sat on the mat " * 3),                 # 0: training
            words("a dog ran in the park today " * 3),            # 1: training
            words("this one straddles the split point " * 4),     # 2: 10 rows before the split, 14 after
            words("THE CAT  sat on the MAT " * 3),                # 3: a copy of 0 (case, spacing)
            words("fresh text never seen before " * 3),           # 4: held out
            words("fresh text never seen before " * 3),           # 5: a copy of 4, also held out: kept
            words("a dog ran in the park")]                       # 6: the last, cut short: the start of 1
    store = Store(tmp_path / "store")
    write_stream(store, "toy/base/L1", docs)
    start = sum(map(len, docs[:2])) + 10
    rows = sum(map(len, docs))
    cfg = SAECompareConfig("toy/base/L1/p10", "s", str(tmp_path / "out"), heldout_tokens=rows - start, top_n=5,
                           min_positives=1)
    held = heldout_selection(store, DictionaryKey.parse(cfg.dictionary), start, cfg)
    doc_id = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    kept = doc_id[start:][held.keep_M]
    assert sorted(set(kept.tolist())) == [4, 5] and len(kept) == len(docs[4]) + len(docs[5])
    train = {content_key("".join(docs[d])) for d in set(doc_id[:start].tolist())}
    assert not {content_key("".join(docs[d])) for d in kept.tolist()} & train
    assert (held.straddling, held.copies) == (len(docs[2]) - 10, len(docs[3]) + len(docs[6]))
    with pytest.raises(Exception, match="too few held-out tokens"):  # top-n more than what is left
        heldout_selection(store, DictionaryKey.parse(cfg.dictionary), start,
                          SAECompareConfig(cfg.dictionary, "s", cfg.out, heldout_tokens=rows - start, top_n=40))
