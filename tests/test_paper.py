"""The paper table (issue 22, item 4): rows and verdicts read from metrics files in the schemas
their writers produce (the writers themselves where cheap), a missing file as a row that says so,
bad JSON as one line and exit 2, and README.md as a Markdown table."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from ep_store import jsonio
from ep_store.analysis.paper import CLAIMS, COLUMNS, PaperConfig, paper_report
from ep_store.analysis.paper_figures import FIGURES, verdict
from ep_store.evaluate.concepts import SERIES, ConceptResult
from ep_store.evaluate.ood import distance_stats
from ep_store.evaluate.output import write_metrics
from ep_store.evaluate.probe import ProbeConfig, _headline, sparse_probe
from ep_store.keys import DictionaryKey
from ep_store.sae.report import summarise_files
from ep_store.stages.build import BuildConfig, build
from ep_store.store.core import Store
from ep_store.studies.refusal import write_outputs
from ep_store.studies.refusal_sweep import recommend
from tests.test_cli_errors import assert_refused, run_cli

MODEL = "gemma-3-270m/base"
KEY = "tiny/base/L1/p10"


# -- the files, as their writers write them -----------------------------------------------------------
def probe_headline(retention: float, ep: float, raw: float, top: float, protocol: str = "ours") -> dict:
    mean = {"k": 1, "tasks": 3, "raw_accuracy": raw, "raw_topk_accuracy": top, "ep_onehot_accuracy": ep,
            "ep_signed_accuracy": 0.11}
    if protocol == "ours":
        mean |= {"retention_onehot": retention, "retention_signed": 0.12}
    return {"all_tasks": {"k1": _headline(mean)}, "text_source": {"k1": _headline(mean)}}


def write_probe(path, protocol="ours", model=MODEL, layers=(6, 12), **by_percentile):
    """``ep eval probe --metrics``: the protocol, then per dictionary its per-task and all-task means."""
    metrics = {f"{model}/L{layer}/{p}": probe_headline(*values, protocol=protocol)
               for p, values in by_percentile.items() for layer in layers}
    write_metrics(path, {"protocol": protocol, **metrics})
    return path


def write_concepts(path, protocol="ours", **by_percentile):
    metrics = {}
    for p, (ep, diffmean) in by_percentile.items():
        res = ConceptResult([], ep, diffmean, mean_auroc_mean=0.3 if protocol == "paper" else None)
        for layer in (6, 12):  # as run_concept_eval
            metrics[f"{MODEL}/L{layer}/{p}"] = {n: round(getattr(res, n), 4) for n in SERIES
                                                if getattr(res, n) is not None}
    write_metrics(path, {"protocol": protocol, **metrics})
    return path


def write_ood(path):
    theta = 0.5
    sets = {"reference": np.full(50, 0.1), "heldout": np.full(50, 0.2), "shuffled": np.r_[np.full(45, 0.3), np.ones(5)],
            "random_tokens": np.r_[np.full(9, 0.4), np.ones(1)]}  # within theta: 1, 1, 0.9, 0.9
    per = {name: distance_stats(d, theta, (0.5,)) for name, d in sets.items()}
    metrics = {f"{MODEL}/L{layer}/p1": {n: {"within_theta_rate": round(v["within_theta_rate"], 4)}
                                        for n, v in per.items()} for layer in (6, 12)}
    metrics[f"{MODEL}/L12/p10"] = {"random_tokens": {"within_theta_rate": 0.1}}
    write_metrics(path, metrics)  # run_ood_eval: no protocol key
    return path


def write_sae(tmp_path, name="topk-8x"):
    compare = tmp_path / "compare" / "metrics.json"
    jsonio.write(compare, {"dictionary": f"{MODEL}/L6/p1", "sae": f"data/store/saes/x/{name}", "compute": None,
                           "ep_to_sae_share_f1_gt_05": 0.22, "sae_to_ep_share_f1_gt_05": 0.61,
                           "hungarian_pairs_f1_gt_05": 40, "eligible": {"ep_regions": 300, "sae_features": 900},
                           "ep_mean_best_f1": 0.3, "sae_mean_best_f1": 0.4, "sql_matches_numpy": True,
                           "heldout_tokens": 4000})
    summarise_files([compare.parent], tmp_path / "sae_compare.json")
    return tmp_path / "sae_compare.json"


def condition(basis, k, harmful, ratio=1.05, direction=None):
    c = {"basis": basis, "k": k, "regions": list(range(k)), "heldout_harmful_refusal": harmful,
         "heldout_benign_refusal": 0.0, "capability_loss": 1.0, "capability_ratio": ratio, "examples": []}
    return c | ({"direction": direction} if direction else {})


def refusal_result(protocol="ours", percentile=4.0, exemplar_k1=0.10, mean_k1=0.95, seeds=(None,)):
    """``ep refusal``'s result: unhooked, one sweep per layer (and seed), the ceiling, best (recommend)."""
    unhooked = {"heldout_harmful_refusal": 1.0, "heldout_benign_refusal": 0.07, "train_harmful_refusal": 1.0,
                "train_benign_refusal": 0.0, "capability_loss": 2.0, "examples": []}
    sweeps = [{"dictionary": f"gemma-3-270m/sft/L{layer}/p{percentile:g}", "seed": seed, "layer": layer,
               "percentile": percentile, "regions": 50, "candidates": [], "null": None, "steering": [],
               "conditions": [condition("exemplar", 1, exemplar_k1, 3.0), condition("exemplar", 2, 0.02, 1.08),
                              condition("mean", 1, mean_k1), condition("null", 1, 0.63, 25.6, "exemplar")]}
              for layer in (6, 12) for seed in seeds]
    ceiling = [{"layer": layer, "norm": 3.0, "heldout_harmful_refusal": 0.0, "heldout_benign_refusal": 0.0,
                "capability_loss": 2.2, "capability_ratio": 1.1, "examples": [],
                "prompt_mean": {"heldout_harmful_refusal": 0.1, "capability_ratio": 1.05}} for layer in (6, 12)]
    config = {"train_harmful": 60, "train_benign": 60, "heldout_harmful": 30, "heldout_benign": 30,
              "max_new_tokens": 8, "seeds": [s for s in seeds if s is not None]}
    return {"model": "gemma-3-270m", "checkpoint": "sft", "protocol": protocol, "unhooked": unhooked,
            "sweeps": sweeps, "ceiling": ceiling, "best": recommend(sweeps, unhooked, 0.1), "match": None,
            "control": None, "config": config}


def write_refusal(path, **kwargs):
    write_outputs(jsonio.clean(refusal_result(**kwargs)), path, None)
    return path


@pytest.fixture()
def files(tmp_path):
    m = tmp_path / "metrics"
    return {
        # p10 is the paper's probe p; the p1 entries would give "no" if they were read
        "probe": write_probe(m / "probe.json", p10=(0.96, 0.70, 0.90, 0.60), p1=(0.50, 0.5, 0.9, 0.6)),
        # mean_auroc 0.87 is within 0.05 of 0.881; difference of means (0.99) is not
        "concepts": write_concepts(m / "concepts.json", p1=(0.87, 0.99), p10=(0.5, 0.99)),
        "ood": write_ood(m / "ood.json"),
        "sae": write_sae(m),
        "refusal": write_refusal(m / "refusal.json"),
    }


def report(tmp_path, **inputs) -> tuple[dict, str]:
    out, metrics = tmp_path / "reports" / "paper", tmp_path / "paper.json"
    paper_report(PaperConfig(out=out, metrics=metrics, **inputs))
    return json.loads(metrics.read_text()), (out / "README.md").read_text()


# -- tests ----------------------------------------------------------------------------------------------
def test_registry_and_claims_agree():
    assert list(CLAIMS) == list(FIGURES)
    assert verdict([(0.9, 0.88), (0.5, 0.88)], 0.05) == "partly"
    assert verdict([], 0.05) == "not measured" and verdict([(1, 1)], None) == "not published"


def test_probe_headline_keys_are_those_the_writer_writes():
    """The keys measure_probe reads exist in sparse_probe's means under each protocol."""
    rng = np.random.default_rng(0)
    labels = ["a"] * 30 + ["b"] * 30
    feats = {"raw": rng.normal(size=(60, 4)), "ep_onehot": rng.random((60, 5))}
    for protocol, retention in (("ours", True), ("paper", False)):
        res = sparse_probe(feats, labels, ProbeConfig(ks=(1,), protocol=protocol), task="t")
        head = _headline(res.mean_by_k()[0])
        assert {"raw_accuracy", "raw_topk_accuracy", "ep_onehot_accuracy"} <= set(head)
        assert ("retention_onehot" in head) == retention


def test_rows_and_verdicts_from_the_pipelines_files(tmp_path, files):
    metrics, readme = report(tmp_path, **files)
    claims = metrics["claims"]
    assert {c: v["verdict"] for c, v in claims.items()} == {
        "refusal_baseline": "yes", "refusal_k1": "partly", "refusal_best": "not published",
        "concepts": "yes", "probe": "yes", "sae": "yes", "ood": "yes"}
    assert claims["concepts"]["verdict_on"] == "ours"
    assert claims["concepts"]["ours"] == {f"{MODEL}/L{x}/p1": {"mean_auroc": 0.87, "mean_auroc_mean": None,
                                                               "mean_auroc_diffmean": 0.99} for x in (6, 12)}
    assert set(claims["probe"]["ours"]) == {f"{MODEL}/L6/p10", f"{MODEL}/L12/p10"}
    assert claims["probe"]["ours"][f"{MODEL}/L6/p10"]["retention_onehot"] == 0.96
    assert claims["ood"]["ours"][f"{MODEL}/L6/p1"]["within_theta_rate"]["random_tokens"] == 0.9
    assert claims["sae"]["ours"][f"{MODEL}/L6/p1~topk-8x"]["ep_to_sae_share_f1_gt_05"] == 0.22
    # K=1 change: exemplar 0.10 - 1.00 (no: paper 0.00), mean 0.95 - 1.00 (yes: paper -0.04)
    assert claims["refusal_k1"]["ours"]["L6/p4"] == pytest.approx({"exemplar": -0.9, "mean": -0.05})
    best = claims["refusal_best"]["ours"]
    assert (best["best"]["k"], best["best"]["basis"]) == (2, "exemplar")  # within the capability budget
    assert best["null"]["heldout_harmful_refusal"] == 0.63
    assert ("diff-of-means ceiling: L6 centered 0.00 (x1.10) / prompt mean 0.10 (x1.05), "
            "L12 centered 0.00 (x1.10) / prompt mean 0.10 (x1.05)") in readme
    assert "p4 (nearest run) vs p8" in claims["refusal_k1"]["differences"]
    assert "model gemma-3-270m vs gemma-2-2b-it" in claims["refusal_baseline"]["differences"]
    assert not any(d.startswith(("layer", "p4")) for d in claims["refusal_baseline"]["differences"])  # unhooked
    assert "not run in the default pipeline" in readme and "ep refusal --protocol paper" in readme
    assert metrics["verdicts"] == {"yes": 5, "partly": 1, "not published": 1}


def test_published_protocol_decides_the_verdict(tmp_path, files):
    """Ours retains 0.50 (no); the paper protocol's EP top-1 over raw all-D and top-1 is ~0.98 (yes)."""
    files["probe"] = write_probe(tmp_path / "probe.json", p10=(0.50, 0.5, 0.9, 0.6))
    paper = write_probe(tmp_path / "probe_paper.json", "paper", p10=(None, 0.80, 0.82, 0.81))
    metrics, readme = report(tmp_path, probe_paper=paper, refusal_paper=write_refusal(
        tmp_path / "refusal_paper.json", protocol="paper", percentile=8.0, exemplar_k1=1.0, mean_k1=0.96,
        seeds=(0, 1)), **files)
    probe = metrics["claims"]["probe"]
    assert (probe["verdict"], probe["verdict_on"]) == ("yes", "published protocol")
    assert probe["published_protocol"][f"{MODEL}/L6/p10"]["ep_over_raw"] == pytest.approx(0.8 / 0.82)
    k1 = metrics["claims"]["refusal_k1"]
    assert (k1["verdict"], k1["verdict_on"]) == ("yes", "published protocol")
    assert k1["published_protocol"]["L12/p8"] == pytest.approx({"exemplar": 0.0, "mean": -0.04})
    assert "L12/p8 (2 seeds)" in readme
    assert "ep eval concepts --protocol paper --dictionary gemma-3-270m/base/all" in readme
    # Why a verdict is on ours is said only where it is: not for a claim with no published
    # number (refusal_best), whose published-protocol run did happen.
    said = "the published protocol did not run: the verdict is on ours"
    assert said not in metrics["claims"]["refusal_best"]["differences"]
    assert said not in metrics["claims"]["refusal_k1"]["differences"]
    assert said in metrics["claims"]["concepts"]["differences"]  # no concepts_paper given: on ours


def test_a_file_of_the_other_protocol_is_not_read_as_this_one(tmp_path, files):
    metrics, readme = report(tmp_path, probe_paper=files["probe"], **files)
    assert metrics["claims"]["probe"]["published_protocol"] is None
    assert "records protocol 'ours', not 'paper'" in readme


def test_a_missing_file_gives_a_row_that_says_so(tmp_path, files):
    files["concepts"] = tmp_path / "nowhere.json"
    del files["ood"]
    metrics, readme = report(tmp_path, **files)
    assert metrics["claims"]["concepts"]["verdict"] == "not measured"
    assert metrics["claims"]["ood"]["verdict"] == "not measured"
    assert f"--concepts {tmp_path / 'nowhere.json'} missing; run: dvc repro eval_concepts" in readme
    assert "--ood not given; run: dvc repro eval_ood" in readme
    assert metrics["inputs"]["--concepts"]["status"].endswith("missing")


def test_unreadable_json_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "probe.json"
    bad.write_text("{not json")
    out = tmp_path / "paper"
    assert_refused(run_cli(["report", "paper", "--probe", str(bad), "--out", str(out)]), "--probe")
    assert not out.exists()
    bad.write_text("[1, 2]")
    assert_refused(run_cli(["report", "paper", "--probe", str(bad), "--out", str(out)]), "not a JSON object")


def markdown_table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``text``, cells split on unescaped pipes."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_readme_is_a_markdown_table_with_the_columns(tmp_path, files):
    files["sae"] = write_sae(tmp_path, "top|k")  # a cell with a pipe must stay one cell
    _, readme = report(tmp_path, **files)
    header, separator, *rows = markdown_table(readme)
    assert header == list(COLUMNS)
    assert all(re.fullmatch(r"-{3,}", c) for c in separator)
    assert len(rows) == len(FIGURES) and all(len(r) == len(COLUMNS) for r in rows)
    assert [r[0] for r in rows] == [f.title for f in FIGURES.values()]
    assert "L6/p1 vs top|k: 0.22 of 300 eligible regions" in rows[list(FIGURES).index("sae")][3]


@pytest.fixture(scope="module")
def tiny_dictionary(tiny_store, tmp_path_factory):
    """A copy of the tiny store with dictionary KEY built."""
    root = tmp_path_factory.mktemp("paper") / "store"
    shutil.copytree(tiny_store, root)
    build(BuildConfig("tiny", "base", 1, 10, calibration_batch=512, batch_size=512, device="cpu"), Store(root),
          progress=False)
    return root


def test_cli_writes_the_report_and_token_counts(tmp_path, tiny_dictionary):
    """Token counts come from the store's published build of each dictionary the row reads."""
    built_store = tiny_dictionary
    tokens = Store(built_store).dictionary_snapshot(DictionaryKey.parse(KEY)).meta["tokens"]
    probe = write_probe(tmp_path / "probe.json", model="tiny/base", layers=(1,), p10=(0.96, 0.7, 0.9, 0.6))
    out, metrics = tmp_path / "paper", tmp_path / "paper.json"
    result = run_cli(["report", "paper", "--probe", str(probe), "--store", str(built_store), "--out", str(out),
                      "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    row = next(r for r in markdown_table((out / "README.md").read_text())[2:] if r[0] == FIGURES["probe"].title)
    assert f"ours: tiny/base L1 p10, {tokens:,} tokens per dictionary" in row[4]
    assert json.loads(metrics.read_text())["claims"]["probe"]["verdict"] == "yes"
