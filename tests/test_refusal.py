"""The refusal study (issue 9): region scoring and null selection on hand-made tables, and the
whole study end to end on tiny random-init models (metrics, report, bad input)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from ep_store.errors import UsageError
from ep_store.stages.build import BuildConfig, build
from ep_store.store.core import Store
from ep_store.studies.refusal import RefusalConfig, refusal_study
from ep_store.studies.refusal_sweep import (
    RegionScore,
    candidates,
    null_region,
    recommend,
    score_regions,
)

TEMPLATE = "{% for m in messages %}<bos>user: {{ m['content'] }}\nanswer:{% endfor %}"


def test_scoring_and_null_on_a_hand_made_table():
    # region: (members, refused)
    table = {0: (10, 9), 1: (6, 2), 2: (20, 5), 3: (4, 4), 4: (12, 0), 5: (9, 0), 6: (30, 1), 7: (5, 0)}
    region_N, refused_N = [], []
    for r, (n, k) in table.items():
        region_N += [r] * n
        refused_N += [True] * k + [False] * (n - k)
    region_N += [-1, -1]  # unassigned prompts are left out
    refused_N += [True, True]
    coherence = {0: 0.5, 1: 0.2, 2: 0.3, 3: 0.9, 4: 0.45, 5: 0.5, 6: 0.5, 7: 0.5}
    scores = score_regions(region_N, refused_N, coherence)
    assert [s.region_id for s in scores][:3] == [0, 2, 3]  # score = rate x members = refused count
    assert scores[0] == RegionScore(0, 10, 9, 0.9, 0.5, 9)
    cands = candidates(scores, min_members=5, min_rate=0.3)
    assert [c.region_id for c in cands] == [0, 1]  # 2: rate 0.25; 3: only 4 members
    # 2 at rate >= 0.25, with 20 members: score 5 ranks it above 1 (score 2)
    assert [c.region_id for c in candidates(scores, 5, 0.25)] == [0, 2, 1]
    # null: rate <= 0.05, >= 5 members, nearest region 0 in (log10 members, coherence):
    # 4: (log10 12 - 1, -0.05) -> 0.094; 5: (log10 9 - 1, 0) -> 0.046; 6: rate 1/30 = 0.033, log10 3 = 0.477;
    # 7: log10 0.5 -> 0.301
    top = cands[0]
    assert null_region(scores, top, 5, 0.05).region_id == 5
    assert null_region(scores, top, 5, 0.05, exclude={5}).region_id == 4
    assert null_region(scores, top, 50, 0.05) is None


def test_scoring_matches_brute_force():
    rng = np.random.default_rng(0)
    region_N = rng.integers(-1, 12, 400)
    refused_N = rng.random(400) < 0.4
    coherence = {r: float(rng.random()) for r in range(12)}
    scores = score_regions(region_N, refused_N, coherence)
    for s in scores:
        members = [f for r, f in zip(region_N, refused_N) if r == s.region_id]
        assert s.members == len(members) and s.refused == sum(members)
        assert s.refusal_rate == pytest.approx(sum(members) / len(members))
    assert sum(s.members for s in scores) == int((region_N >= 0).sum())
    top = candidates(scores, 5, 0.3)[0]
    pool = [s for s in scores if s.members >= 5 and s.refusal_rate <= 0.45 and s.region_id != top.region_id]
    want = min(pool, key=lambda s: math.hypot(math.log10(s.members / top.members), s.coherence - top.coherence))
    assert null_region(scores, top, 5, 0.45).region_id == want.region_id


def test_recommend_prefers_low_refusal_within_capability_budget():
    cond = [{"basis": "exemplar", "k": 1, "regions": [3], "heldout_harmful_refusal": 0.5, "heldout_benign_refusal": 0,
             "capability_ratio": 1.01},
            {"basis": "mean", "k": 2, "regions": [3, 4], "heldout_harmful_refusal": 0.1, "heldout_benign_refusal": 0,
             "capability_ratio": 1.05},
            {"basis": "exemplar", "k": 3, "regions": [3, 4, 5], "heldout_harmful_refusal": 0.0,
             "heldout_benign_refusal": 0, "capability_ratio": 1.8},
            {"basis": "null", "k": 1, "regions": [9], "heldout_harmful_refusal": 0.0, "heldout_benign_refusal": 0,
             "capability_ratio": 1.0}]
    unhooked = {"heldout_harmful_refusal": 1.0, "heldout_benign_refusal": 0.0}
    best = recommend([{"dictionary": "m/c/L1/p8", "conditions": cond}], unhooked, 0.10)
    assert (best["basis"], best["k"], best["within_capability_budget"]) == ("mean", 2, True)
    best = recommend([{"dictionary": "m/c/L1/p8", "conditions": cond}], unhooked, 1.0)
    assert (best["basis"], best["k"]) == ("exemplar", 3)


@pytest.fixture(scope="module")
def chat_models(models_dir, tmp_path_factory):
    """The tiny models with a chat template (the study formats every prompt as chat)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat_models")
    shutil.copytree(models_dir, root, dirs_exist_ok=True)
    for checkpoint in ("base", "other"):
        tok = AutoTokenizer.from_pretrained(root / "tiny" / checkpoint)
        tok.chat_template = TEMPLATE
        tok.save_pretrained(root / "tiny" / checkpoint)
    return root


def small(**over) -> RefusalConfig:
    opts = dict(model="tiny", checkpoint="base", control="other", layers=(1, 2), percentiles=(10.0,),
                train_harmful=8, train_benign=8, heldout_harmful=3, heldout_benign=3, max_new_tokens=3, batch_size=8,
                k_max=2, min_members=1, min_rate=0.0, alphas=(1.0,), match_percentile=10.0, calibration_batch=64,
                device="cpu")
    return RefusalConfig(**{**opts, **over})


def test_study_end_to_end_on_tiny_models(chat_models, tiny_store, tmp_path):
    main = tmp_path / "main"
    shutil.copytree(tiny_store, main)
    build(BuildConfig("tiny", "base", 1, 10, calibration_batch=256, batch_size=256, device="cpu"), Store(main),
          progress=False)
    metrics, report = tmp_path / "m" / "refusal.json", tmp_path / "report"
    summary = refusal_study(small(), tmp_path / "work", main, chat_models, metrics, report, progress=False)
    result = json.loads(metrics.read_text())  # strict JSON (no NaN)
    assert summary["best"] == result["best"] and result["best"] is not None
    assert [s["dictionary"] for s in result["sweeps"]] == ["tiny/base/L1/p10", "tiny/base/L2/p10"]
    for s in result["sweeps"]:
        assert s["last_positions"] == 16 and s["scale"] > 0
        kinds = sorted({(c["basis"], c["k"]) for c in s["conditions"]})
        assert kinds == [("exemplar", 1), ("exemplar", 2), ("mean", 1), ("mean", 2)]
        assert len(s["steering"]) == 1
    u = result["unhooked"]
    assert u["heldout_harmful_refusal"] == 0.0 and u["capability_loss"] > 0  # a random model never refuses
    # the pipeline store has tiny/base/L1/p10 only: the join runs when the best layer is 1
    assert result["match"]["available"] == result["best"]["dictionary"].startswith("tiny/base/L1/")
    assert result["control"]["checkpoint"] == "other"
    # the study's store holds its own activations and dictionaries; the main store is untouched by them
    assert (tmp_path / "work" / "activations" / "tiny" / "base" / "L1.lance").is_dir()
    assert not (main / "dictionaries" / "tiny" / "base" / "L2").exists()
    html = (report / "index.html").read_text()
    assert "held-out harmful refusal" in html and (report / "README.md").is_file()
    assert list(report.glob("*.png"))
    # the report holds no run-time measurement: another run's timings give the same bytes
    # (second fresh-clone dvc repro: the refusal report's digest differed by its wall time)
    from ep_store.store.digest import digest
    from ep_store.studies.refusal_report import refusal_report

    slower = {**result, "seconds": {k: v * 3 + 1 for k, v in result["seconds"].items()}}
    refusal_report(slower, tmp_path / "again")
    assert digest(tmp_path / "again") == digest(report)


@pytest.mark.parametrize(("over", "needle"), [
    ({"layers": (9,)}, "layer 9 is out of range"),
    ({"train_harmful": 10_000}, "asked for 10000"),
    ({"alphas": (float("nan"),)}, "finite"),
    ({"control": "base"}, "must differ"),
])
def test_study_refuses(chat_models, tmp_path, over, needle):
    metrics = tmp_path / "refusal.json"
    with pytest.raises(UsageError, match=needle):
        refusal_study(small(**over), tmp_path / "work", tmp_path / "main", chat_models, metrics, None, progress=False)
    assert not metrics.exists() and not (tmp_path / "work").exists()


def test_params_mirror_the_config_and_the_stage_passes_them():
    import dataclasses

    import yaml

    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["refusal"]
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["refusal"]["cmd"]
    fields = {f.name: f.default for f in dataclasses.fields(RefusalConfig)}
    for name, value in params.items():
        assert f"${{refusal.{name}}}" in cmd, name
        if name == "work_store":
            continue
        default = fields[name]  # every param is a config field
        if isinstance(default, tuple):
            value = tuple(type(default[0])(x) for x in str(value).split(","))
        assert value == default, name  # and the defaults agree
