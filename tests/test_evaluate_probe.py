"""Sparse probing (issue 10): planted region, shuffled labels, pooling vs brute force."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ep_store.errors import UsageError
from ep_store.evaluate.features import dictionary_features, occupancy_per_text, pool_per_text
from ep_store.evaluate.probe import ProbeConfig, sparse_probe
from ep_store.keys import DictionaryKey
from ep_store.stages.dictionary import Dictionary
from ep_store.store import vectors_to_arrow

D, K, PLANTED = 16, 12, 5


def synthetic_dictionary(seed: int = 0, center_scale: float = 0.0) -> Dictionary:
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(K, D))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    center = rng.normal(size=D) * center_scale
    table = pa.table({"region_id": pa.array(np.arange(K), pa.int32()), "exemplar": vectors_to_arrow(E, np.float32)})
    return Dictionary(DictionaryKey.parse("synthetic/base/L0/p1"), {"center": center.tolist(), "theta": 0.1}, table)


def planted_texts(d: Dictionary, n_texts: int = 300, tokens: int = 12, seed: int = 1):
    """Tokens near random exemplars; positive texts also hold tokens near region PLANTED."""
    rng = np.random.default_rng(seed)
    E, c = d.exemplars.numpy().astype(np.float64), d.center.numpy().astype(np.float64)
    labels = np.array(["pos", "neg"] * (n_texts // 2))
    others = [k for k in range(K) if k != PLANTED]
    x, text = [], []
    for t, label in enumerate(labels):
        regions = rng.choice(others, tokens)
        if label == "pos":
            regions[: rng.integers(2, 5)] = PLANTED
        x.append(c + 3.0 * (E[regions] + 0.05 * rng.normal(size=(tokens, D))))
        text += [t] * tokens
    return np.concatenate(x).astype(np.float32), np.array(text), labels


def test_planted_region_is_top_1_with_auroc_1():
    d = synthetic_dictionary(center_scale=0.5)
    x, text, labels = planted_texts(d)
    feats = dictionary_features(x, text, len(labels), d)
    result = sparse_probe(feats, labels, ProbeConfig(ks=(1, 5)), task="planted")
    k1 = next(r for r in result.rows if r.k == 1)
    assert k1.chosen["ep_onehot"] == [PLANTED]
    assert k1.auroc["ep_onehot"] == 1.0
    assert k1.accuracy["ep_onehot"] == 1.0
    rec = result.records()[0]
    assert rec["retention_onehot"] == pytest.approx(rec["ep_onehot_accuracy"] / rec["raw_accuracy"])
    assert {"raw_accuracy", "ep_onehot_accuracy", "ep_signed_accuracy", "retention_signed", "k", "task"} <= set(rec)


def test_shuffled_labels_give_chance():
    d = synthetic_dictionary()
    x, text, labels = planted_texts(d, n_texts=600)
    labels = np.random.default_rng(7).permutation(labels)
    feats = dictionary_features(x, text, len(labels), d)
    result = sparse_probe(feats, labels, ProbeConfig(ks=(1,)))
    acc = result.rows[0].accuracy
    assert abs(acc["ep_onehot"] - 0.5) < 0.12 and abs(result.rows[0].baseline_accuracy - 0.5) < 0.12


def test_pooling_matches_brute_force():
    d = synthetic_dictionary(center_scale=1.0)
    x, text, labels = planted_texts(d, n_texts=20)
    feats = dictionary_features(x, text, len(labels), d)
    region, _ = d.assign(x)
    for t in range(len(labels)):
        rows = x[text == t].astype(np.float64)
        assert np.allclose(feats["raw"][t], rows.mean(0))
        onehot = np.zeros(K)
        for r in region[text == t]:
            onehot[r] += 1 / len(rows)
        assert np.allclose(feats["ep_onehot"][t], onehot)
        signed = ((rows - d.center.numpy()) @ d.exemplars.numpy().T.astype(np.float64)).mean(0)
        assert np.allclose(feats["ep_signed"][t], signed)
    # a text without tokens pools to zeros; occupancy equals pooled one-hot
    assert np.allclose(occupancy_per_text(region, text, 21, K)[20], 0)
    assert np.allclose(occupancy_per_text(region, text, 20, K), pool_per_text(np.eye(K)[region], text, 20))


@pytest.mark.parametrize("labels, match", [
    (["a"] * 40, "one class"),
    (["a"] * 30 + ["b"] * 5, "fewer than 10"),
])
def test_bad_labels(labels, match):
    feats = {"raw": np.zeros((len(labels), 3))}
    with pytest.raises(UsageError, match=match):
        sparse_probe(feats, labels)
