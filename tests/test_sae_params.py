"""The SAE stages' parameters (issue 11) agree with the harvest and build they read from."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_sae_params_point_at_built_data():
    sae, harvest, build = PARAMS["sae"], PARAMS["harvest"], PARAMS["build"]
    harvested = {(t["model"], t["checkpoint"]): t["max_tokens"] for t in harvest["targets"]}
    target = (sae["target"]["model"], sae["target"]["checkpoint"])
    assert target in harvested
    assert set(sae["layers"]) <= set(PARAMS["blocks"]["layers"])  # blocks harvested and built
    assert sae["percentile"] in build["percentiles"]
    # the SAE trains on the first max_tokens - heldout_tokens rows; compare needs top_n held-out tokens
    assert sae["top_n"] <= sae["heldout_tokens"] < harvested[target] - sae["batch_size"]
    assert sae["min_positives"] <= sae["top_n"] and sae["k"] <= sae["width"]


def test_dvc_lists_the_sae_stages():
    out = subprocess.run(["dvc", "stage", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("sae_train@6", "sae_train@12", "sae_compare@6", "sae_compare@12", "sae_metrics"):
        assert name in out.stdout, name
