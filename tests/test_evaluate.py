"""Evaluations on the tiny model (issue 10): harvest's code path, pooling vs the stored
assignments, AxBench vs plain formats, bad input; OOD ordering on the real Gemma 3 270M."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ep_store.errors import UsageError
from ep_store.evaluate import features
from ep_store.evaluate.concepts import ConceptEvalConfig, run_concept_eval
from ep_store.evaluate.features import TextRun
from ep_store.evaluate.probe import ProbeConfig, ProbeEvalConfig, run_probe_eval
from ep_store.keys import ActivationKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.corpus import iter_documents
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, arrow_to_vectors
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused, run_cli

KEY = "tiny/base/L1/p10"


def test_forward_reproduces_harvested_vectors(tiny_store, models_dir):
    """Texts run through harvest's code path give the stored vectors (float16) of their first context."""
    docs = [d.text for d in list(iter_documents("builtin"))[:2]]  # the tiny store holds their first 64 tokens
    acts = features.token_activations("tiny", "base", [1], docs, models_dir, max_tokens_per_text=64, device="cpu")
    table = Store.dataset(Store(tiny_store).activation_path(ActivationKey("tiny", "base", 1))).to_table(
        columns=["doc_id", "pos", "token_id", "vector"])
    doc, pos = table.column("doc_id").to_numpy(), table.column("pos").to_numpy()
    keep = (doc < 2) & (pos < 64)
    stored = arrow_to_vectors(table.column("vector"))[keep]
    assert acts.x_ND[1].shape == stored.shape
    assert np.array_equal(acts.text_N, doc[keep])
    assert np.array_equal(acts.token_id_N, table.column("token_id").to_numpy()[keep])
    # the store may hold float16 (rounding) or float32 (exact) vectors
    np.testing.assert_allclose(acts.x_ND[1], stored, rtol=1e-3, atol=1e-3)


def test_pooled_features_equal_brute_force_over_stored_assignments(built_store):
    store = Store(built_store)
    d = Dictionary.load(store, KEY)
    acts = Store.dataset(store.activation_path(ActivationKey("tiny", "base", 1))).to_table(columns=["doc_id", "vector"])
    assigned = Store.dataset(store.dictionary_dir(d.key) / "assignments.lance").to_table().to_pylist()
    x = arrow_to_vectors(acts.column("vector"))
    doc = acts.column("doc_id").to_numpy()
    n_docs = int(doc.max()) + 1
    pooled = features.dictionary_features(x, doc, n_docs, d)
    brute = np.zeros((n_docs, len(d)))
    sizes = np.zeros(n_docs)
    for row in assigned:  # plain loop over the stored Voronoi assignments
        brute[row["doc_id"], row["region_id"]] += 1
        sizes[row["doc_id"]] += 1
    brute /= sizes[:, None]
    np.testing.assert_allclose(pooled["ep_onehot"], brute, atol=1e-12)
    for t in range(n_docs):
        rows = x[doc == t].astype(np.float64)
        np.testing.assert_allclose(pooled["raw"][t], rows.mean(0), rtol=1e-9, atol=1e-9)
        signed = np.mean([(r - d.center.numpy()) @ d.exemplars.numpy().T for r in rows], axis=0)
        np.testing.assert_allclose(pooled["ep_signed"][t], signed, rtol=1e-5, atol=1e-5)


def concept_files(tmp_path):
    """The same rows in plain (jsonl) and AxBench (parquet, shared negatives as 'EEEEE') form."""
    docs = [d.text[:300] for d in iter_documents("builtin")]
    plain, axbench = [], []
    for i, concept in enumerate(["alpha", "beta"]):
        for t in docs[i * 40 : i * 40 + 15]:
            plain.append({"concept": concept, "text": t, "label": "positive"})
            axbench.append({"output_concept": concept, "input": "instruction", "output": t, "category": "positive"})
        for t in docs[90 + i * 10 : 90 + i * 10 + 6]:
            plain.append({"concept": concept, "text": t, "label": "hard negative"})
            axbench.append({"output_concept": concept, "input": "x", "output": t, "category": "hard negative"})
    for t in docs[120:135]:
        plain.append({"concept": "", "text": t, "label": "negative"})
        axbench.append({"output_concept": "EEEEE", "input": "x", "output": t, "category": "negative"})
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in plain))
    pq.write_table(pa.Table.from_pylist(axbench), tmp_path / "axbench.parquet")
    return tmp_path / "plain.jsonl", tmp_path / "axbench.parquet"


def test_axbench_and_plain_formats_agree(built_store, models_dir, tmp_path):
    run = TextRun(models_dir, max_tokens_per_text=32, device="cpu")
    results = []
    for i, path in enumerate(concept_files(tmp_path)):
        run_concept_eval(ConceptEvalConfig((KEY,), data=str(path)), Store(built_store), run, tmp_path / f"out{i}")
        results.append(json.loads((tmp_path / f"out{i}" / "metrics.json").read_text()))
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["concepts"] == results[1]["concepts"]
    assert {c["concept"] for c in results[0]["concepts"][KEY]} == {"alpha", "beta"}


def test_probe_file_formats_agree_and_write_outputs(built_store, models_dir, tmp_path):
    docs = [d.text[:200] for d in iter_documents("builtin")][:60]
    rows = [{"text": t, "y": "topic" if i < 30 else "module"} for i, t in enumerate(docs)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "d.csv")
    run = TextRun(models_dir, max_tokens_per_text=16, device="cpu")
    got = []
    for name in ("d.jsonl", "d.csv"):
        cfg = ProbeEvalConfig((KEY,), data=str(tmp_path / name), label_field="y", probe=ProbeConfig(ks=(1, "all")))
        run_probe_eval(cfg, Store(built_store), run, tmp_path / name.replace(".", "_"), tmp_path / f"{name}.m.json")
        got.append(json.loads((tmp_path / name.replace(".", "_") / "metrics.json").read_text())["records"])
    assert got[0] == got[1]
    rec = got[0][KEY][0]
    assert rec["task"] == "d/topic" and rec["k"] == 1 and 0 <= rec["retention_onehot"]
    assert (tmp_path / "d_jsonl" / f"accuracy_by_k~{KEY.replace('/', '~')}.png").is_file()
    assert (tmp_path / "d_jsonl" / "chosen_regions.json").is_file()


def _eval_args(store, models_dir, out, command="probe", **over):
    opts = {"--dictionary": KEY, "--store": str(store), "--models-dir": str(models_dir), "--out": str(out),
            "--device": "cpu"}
    opts.update(over)
    return ["eval", command, "--no-progress", *[x for kv in opts.items() for x in kv]]


@pytest.mark.parametrize(("rows", "over", "needle"), [
    ([{"text": f"t{i}", "label": "a"} for i in range(30)], {}, "one class"),
    ([{"text": f"t{i}", "label": "a" if i < 25 else "b"} for i in range(30)], {}, "fewer than 10 texts in class b"),
    ([{"body": f"t{i}", "label": "a"} for i in range(30)], {}, "has no field 'text'"),
    ([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(30)], {"--label-field": "y"}, "has no field 'y'"),
    ([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(30)], {"--model": "other-model"}, "was built from tiny"),
    ([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(30)], {"--dictionary": "tiny/base/L3/p10"},
     "unknown dictionary"),
])
def test_probe_bad_input(built_store, models_dir, tmp_path, rows, over, needle):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    before = tree_snapshot(built_store)
    result = run_cli(_eval_args(built_store, models_dir, tmp_path / "out", "probe", **{"--data": str(path), **over}))
    assert_refused(result, needle)
    assert tree_snapshot(built_store) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rows", "needle"), [
    ([{"concept": "c", "text": f"t{i}", "label": "positive"} for i in range(30)], "negative texts"),
    ([{"concept": "c", "text": f"t{i}", "label": "maybe"} for i in range(30)], "is not positive, negative"),
    ([{"idea": "c", "text": "t", "label": "positive"}], "use concept/text/label"),
])
def test_concepts_bad_input(built_store, models_dir, tmp_path, rows, needle):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = run_cli(_eval_args(built_store, models_dir, tmp_path / "out", "concepts", **{"--data": str(path)}))
    assert_refused(result, needle)
    assert not (tmp_path / "out").exists()


def test_ood_bad_input(built_store, models_dir, tmp_path):
    result = run_cli(_eval_args(built_store, models_dir, tmp_path / "out", "ood",
                                **{"--ood-corpus": str(tmp_path / "missing.txt")}))
    assert_refused(result, "does not exist")
    result = run_cli(_eval_args(built_store, models_dir, tmp_path / "out", "ood", **{"--documents": "100000"}))
    assert_refused(result, "documents")


@pytest.mark.real_model
def test_ood_auroc_orders_random_over_shuffled_over_heldout(gemma_models_dir, tmp_path):
    """On Gemma 3 270M layer 6: random token ids are further from the exemplars than
    word-shuffled text, which is further than held-out in-distribution text."""
    from ep_store.evaluate.ood import OODConfig, run_ood_eval
    from ep_store.stages.harvest import HarvestConfig, harvest

    store = Store(tmp_path / "store")
    harvest(HarvestConfig("gemma-3-270m", "base", (6,), max_tokens=6000, ctx=128, batch_size=8, device="cpu"),
            store, gemma_models_dir, progress=False)
    build(BuildConfig("gemma-3-270m", "base", 6, 10, calibration_batch=1024, batch_size=1024, device="cpu"), store,
          assign=False, progress=False)
    key = "gemma-3-270m/base/L6/p10"
    run = TextRun(gemma_models_dir, max_tokens_per_text=48, device="cpu")
    run_ood_eval(OODConfig((key,), documents=24), store, run, tmp_path / "out")
    sets = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"][key]
    assert sets["random_tokens"]["auroc_tokens"] > sets["shuffled"]["auroc_tokens"] > sets["heldout"]["auroc_tokens"]
    assert abs(sets["heldout"]["auroc_tokens"] - 0.5) < 0.15


def test_pipeline_evaluates_checkpoints_the_pipeline_builds(built_store):
    import yaml

    from ep_store.evaluate.features import expand_keys
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    harvested = {(t["model"], t["checkpoint"]) for t in params["harvest"]["targets"]}
    assert {(t["model"], t["checkpoint"]) for t in params["evaluate"]["targets"]} <= harvested
    assert expand_keys(built_store, ["tiny/base/all"]) == [KEY]
    with pytest.raises(UsageError, match="no dictionaries match"):
        expand_keys(built_store, ["tiny/other/all"])


def test_eval_links_from_reports(tmp_path):
    from ep_store.evaluate.output import eval_links
    from ep_store.keys import DictionaryKey

    key = DictionaryKey.parse("gemma-3-270m/base/L6/p1")
    out = tmp_path / "data" / "reports" / "dictionaries" / "gemma-3-270m" / "base" / "L6" / "p1"
    links = dict(eval_links(out, [key]))
    assert links["probe: gemma-3-270m~base"] == "../../../../../evals/probe/gemma-3-270m~base/index.html"
    assert len(links) == 3
    assert eval_links(tmp_path / "elsewhere", [key]) == []
