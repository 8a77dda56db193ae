"""The paper's protocols beside ours (issue 22, item 1): AxBench's raw-projection scoring of
chat-formatted texts less the template prefix, SAEBench's even negatives and unscaled probes,
and the protocol recorded in every metrics file."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from ep_store.errors import UsageError
from ep_store.evaluate import axbench, saebench
from ep_store.evaluate.concepts import ConceptConfig, concept_detection
from ep_store.evaluate.features import TokenActivations, occupancy_per_text
from ep_store.evaluate.probe import ProbeConfig, balanced_split, fit_probe, sparse_probe
from ep_store.evaluate.tasks import HARD, NEGATIVE, POSITIVE, ConceptRow
from ep_store.keys import DictionaryKey
from ep_store.stages.corpus import encode
from ep_store.stages.dictionary import Dictionary
from ep_store.store import vectors_to_arrow
from tests.test_cli_errors import assert_refused, run_cli
from tests.test_evaluate import concept_files

KEY = "tiny/base/L1/p10"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# -- AxBench: raw projection, both bases, hard negatives --------------------------------------------
def magnitude_concept(n_per_class: int = 20):
    """Positives: three tokens 10*e0 and one e1; negatives: one token e0 and three e1. Every text
    holds a token exactly along e0, so its max cosine with e0 is 1 whatever the class."""
    x, text, rows = [], [], []
    for t in range(2 * n_per_class):
        positive = t < n_per_class
        x += [10.0 * np.eye(8)[0]] * 3 + [np.eye(8)[1]] if positive else [np.eye(8)[0]] + [np.eye(8)[1]] * 3
        text += [t] * 4
        label = POSITIVE if positive else (HARD if t % 2 else NEGATIVE)
        rows.append(ConceptRow("" if label == NEGATIVE else "c", f"text {t}", label))
    x = np.asarray(x, np.float32)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return u, x, np.asarray(text), {r.text: i for i, r in enumerate(rows)}, rows


def test_raw_projection_ranks_magnitude_where_cosine_ties():
    u, x, text, index, rows = magnitude_concept()
    exemplars = np.eye(8)[:4]
    means = exemplars[[2, 0, 3, 1]]  # mean direction of region 1 is e0
    ours = concept_detection(u, x, text, index, rows, exemplars, ConceptConfig()).concepts[0]
    paper = concept_detection(u, x, text, index, rows, exemplars, ConceptConfig(protocol="paper"), means).concepts[0]
    assert ours["region_id"] == paper["region_id"] == 0 and paper["region_id_mean"] == 1
    assert ours["auroc"] == 0.5  # cosine: every text's max is 1
    assert paper["auroc"] == paper["auroc_mean"] == 1.0  # x.e: 10 against 1
    assert ours["auroc_diffmean"] == paper["auroc_diffmean"] == 1.0  # the baseline scores x.w in both
    # hard negatives and shared negatives both count as negatives
    assert paper["n_train"] + paper["n_test"] == 40 and paper["positives_test"] == 10
    assert "auroc_mean" not in ours


def test_concept_config_resolves_chat_per_protocol():
    assert ConceptConfig().chat == "none" and ConceptConfig(protocol="paper").chat == "model"
    assert ConceptConfig(protocol="paper", chat="user").chat == "user"
    with pytest.raises(UsageError, match="unknown chat framing"):
        ConceptConfig(chat="system")
    with pytest.raises(UsageError, match="unknown protocol"):
        ConceptConfig(protocol="axbench")


# -- AxBench: chat framing and the template prefix --------------------------------------------------
def test_template_prefix_never_sets_the_max():
    e = np.eye(4)[0]
    text_N = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    scale = np.array([100, 1, 2, 100, 3, 1, 1, 5, 4], np.float32)  # the prefix tokens are the largest
    acts = TokenActivations({1: (scale[:, None] * e).astype(np.float32)}, text_N, np.arange(9), 3)
    kept = axbench.without_prefix(acts, np.array([1, 1, 0]))
    best = axbench.max_per_text(kept.x_ND[1] @ e, kept.text_N, 3)
    assert best.tolist() == [2.0, 3.0, 5.0]
    assert kept.token_id_N.tolist() == [1, 2, 4, 5, 6, 7, 8]
    assert axbench.token_positions(text_N).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="grouped"):
        axbench.token_positions(np.array([0, 1, 0]))


def test_chat_ids_frame_each_text_after_its_template_prefix(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    texts = ["The quick brown fox jumps over the lazy dog.", "Typed <bos> stays text"]
    user, model = (axbench.chat_ids(tok, texts, role, max_tokens=6) for role in ("user", "model"))
    for framed, marker in ((user, "user"), (model, "assistant")):
        for ids, n, text in zip(framed.ids, framed.prefix_T, texts):
            assert ids[n:] == encode(tok, text)[0][:6]  # the text's own first tokens, typed <bos> as characters
            assert tok.decode(ids[:n]).replace(" ", "").endswith(f"<|{marker}|>")
    assert (model.prefix_T > user.prefix_T).all()  # the model turn follows an (empty) user turn
    with pytest.raises(UsageError, match="no chat template"):
        axbench.chat_ids(tiny_tokenizer, texts, "model", 6)


# -- SAEBench: even negatives, no scaler, mean basis ------------------------------------------------
def test_even_quota_spreads_and_refills():
    rng = np.random.default_rng(0)
    quota = saebench.even_quota(np.array([5, 100, 100]), 20, rng)
    assert quota.sum() == 20 and quota[0] == 5 and abs(int(quota[1]) - int(quota[2])) <= 1
    assert saebench.even_quota(np.array([3, 3]), 6, rng).tolist() == [3, 3]
    with pytest.raises(UsageError, match="negatives asked"):
        saebench.even_quota(np.array([3, 3]), 7, rng)


def test_negatives_are_spread_evenly_over_the_other_classes():
    labels = np.array(["a"] * 60 + ["b"] * 300 + ["c"] * 20 + ["d"] * 20)
    paper = ProbeConfig(protocol="paper", min_per_class=5)
    train, test = saebench.even_split(labels, "a", paper.test_fraction, paper.max_train, paper.max_test, paper.seed)
    assert not set(train) & set(test)
    assert Counter(labels[train]) == {"a": 48, "b": 16, "c": 16, "d": 16}
    assert Counter(labels[test]) == {"a": 12, "b": 4, "c": 4, "d": 4}
    ours_train, _ = balanced_split(labels == "a", ProbeConfig(min_per_class=5))
    ours = Counter(labels[ours_train])
    assert ours["b"] > 2 * ours["c"]  # ours draws from the pooled negatives, mostly b
    row = sparse_probe({"raw": np.random.default_rng(1).normal(size=(len(labels), 3))}, labels, paper).rows[0]
    assert (row.n_train, row.n_test) == (96, 24)


def test_no_scaler_differs_from_scaler_on_badly_scaled_features():
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2 == 0
    strong = (y + 0.1 * rng.normal(size=400)) * 1e-4  # separates the classes, at a tiny scale
    weak = 0.5 * y + rng.normal(size=400)  # barely informative, at unit scale
    X = np.stack([strong, weak], axis=1)
    fit = {p: fit_probe(X[:300], y[:300], X[300:], y[300:], ProbeConfig(protocol=p))[0] for p in ("ours", "paper")}
    assert fit["ours"] > 0.95
    assert fit["paper"] < 0.8  # unscaled, L2 cannot afford the strong feature's weight


def test_paper_records_have_no_retention():
    rng = np.random.default_rng(2)
    labels = np.array(["p", "q", "r"] * 40)
    X = rng.normal(size=(120, 4)) + (labels == "p")[:, None]
    feats = {"raw": X, "ep_onehot": np.abs(X[:, :2])}
    ours = sparse_probe(feats, labels, ProbeConfig(ks=(1,), min_per_class=5)).records()[0]
    paper = sparse_probe(feats, labels, ProbeConfig(ks=(1,), min_per_class=5, protocol="paper")).records()[0]
    assert "retention_onehot" in ours and not any(k.startswith("retention") for k in paper)
    assert {"raw_accuracy", "raw_topk_accuracy", "ep_onehot_accuracy"} <= set(paper)


def dictionary_with_means(exemplars: np.ndarray, means: np.ndarray | None) -> Dictionary:
    columns = {"region_id": pa.array(np.arange(len(exemplars)), pa.int32()),
               "exemplar": vectors_to_arrow(exemplars, np.float32)}
    if means is not None:
        columns["mean_direction"] = vectors_to_arrow(means, np.float32)
    meta = {"center": [0.0] * exemplars.shape[1], "theta": 0.1}
    return Dictionary(DictionaryKey.parse("synthetic/base/L0/p1"), meta, pa.table(columns))


def test_mean_basis_one_hot_follows_the_mean_directions():
    E = np.eye(4)[:3]
    d = dictionary_with_means(E, E[[1, 2, 0]])  # mean direction of region 2 is e0
    x = np.array([[3, 0, 0, 0], [2, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    text = np.zeros(3, np.int64)
    occ, region = saebench.mean_basis_onehot(x, text, 1, d)
    assert region.tolist() == [2, 2, 0]
    np.testing.assert_allclose(occ[0], [1 / 3, 0, 2 / 3])
    np.testing.assert_allclose(occupancy_per_text(d.assign(x)[0], text, 1, 3)[0], [2 / 3, 1 / 3, 0])
    assert saebench.mean_basis_onehot(x, text, 1, dictionary_with_means(E, None)) is None


# -- the CLI on the tiny model: the protocol in every metrics file ----------------------------------
@pytest.fixture(scope="module")
def chat_models_dir(models_dir, tmp_path_factory):
    """The tiny model with a chat template (the same weights and vocabulary)."""
    root = tmp_path_factory.mktemp("chat_models")
    shutil.copytree(models_dir / "tiny" / "base", root / "tiny" / "base")
    (root / "tiny" / "base" / "chat_template.jinja").write_text(TEMPLATE)
    return root


def eval_cli(command: str, store, models_dir, out, *extra):
    return run_cli(["eval", command, "--no-progress", "--dictionary", KEY, "--store", str(store), "--models-dir",
                    str(models_dir), "--out", str(out), "--device", "cpu", "--metrics", str(out) + ".json", *extra])


def test_concepts_paper_protocol_scores_text_tokens_only(built_store, chat_models_dir, tiny_tokenizer, tmp_path):
    plain, _ = concept_files(tmp_path)
    for protocol in ("ours", "paper"):
        result = eval_cli("concepts", built_store, chat_models_dir, tmp_path / protocol, "--data", str(plain),
                          "--protocol", protocol)
        assert result.exit_code == 0, result.output
    ours, paper = (json.loads((tmp_path / p / "metrics.json").read_text()) for p in ("ours", "paper"))
    assert (ours["protocol"], paper["protocol"]) == ("ours", "paper")
    assert paper["protocol_settings"]["score"] == "raw" and paper["protocol_settings"]["chat"] == "model"
    assert paper["protocol_settings"]["max_tokens_per_text"] == 128 and ours["protocol_settings"]["chat"] == "none"
    assert json.loads((tmp_path / "paper.json").read_text())["protocol"] == "paper"
    assert json.loads((tmp_path / "ours.json").read_text())["protocol"] == "ours"
    assert set(paper["metrics"][KEY]) == {"mean_auroc", "mean_auroc_mean", "mean_auroc_diffmean"}
    assert all("region_id_mean" in c for c in paper["concepts"][KEY])
    texts = list(dict.fromkeys(json.loads(line)["text"] for line in plain.read_text().splitlines()))
    assert paper["tokens"] == sum(min(len(encode(tiny_tokenizer, t)[0]), 128) for t in texts)  # no template token


def test_paper_protocol_needs_a_chat_format(built_store, models_dir, tmp_path):
    plain, _ = concept_files(tmp_path)
    result = eval_cli("concepts", built_store, models_dir, tmp_path / "out", "--data", str(plain), "--protocol", "paper")
    assert_refused(result, "no chat template")
    assert not (tmp_path / "out").exists()
    result = eval_cli("concepts", built_store, models_dir, tmp_path / "out", "--data", str(plain), "--protocol", "paper",
                      "--chat", "none", "--max-tokens-per-text", "16")
    assert result.exit_code == 0, result.output


def test_probe_paper_protocol_records_its_settings(built_store, models_dir, tmp_path):
    from ep_store.stages.corpus import iter_documents

    docs = [d.text[:200] for d in iter_documents("builtin")][:60]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": "xyz"[i % 3]})
                                                for i, t in enumerate(docs)))
    result = eval_cli("probe", built_store, models_dir, tmp_path / "out", "--data", str(tmp_path / "d.jsonl"),
                      "--ks", "1,all", "--protocol", "paper", "--max-tokens-per-text", "16")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["protocol"] == "paper" and m["config"]["probe"]["protocol"] == "paper"
    settings = m["protocol_settings"]
    assert (settings["scaler"], settings["negatives"], settings["max_tokens_per_text"]) == (False, "even", 16)
    rec = m["records"][KEY][0]
    assert {"raw_topk_accuracy", "ep_onehot_accuracy", "ep_onehot_mean_accuracy"} <= set(rec)
    assert not any(k.startswith("retention") for k in rec)
    assert json.loads((tmp_path / "out.json").read_text())["protocol"] == "paper"
