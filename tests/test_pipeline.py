"""The default pipeline's definition: DVC parses it, and hand-kept lists in params agree."""

from __future__ import annotations

import subprocess

import yaml

from ep_store.finetune import FinetuneConfig
from tests.conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_layers_agree():
    assert [int(x) for x in PARAMS["harvest"]["layers"].split(",")] == PARAMS["build"]["layers"]


def test_finetune_checkpoints_agree_with_matches_and_outputs():
    f = PARAMS["finetune"]
    cfg = FinetuneConfig(f["model"], f["from"], f["to"], f["steps"], f["save_every"], f["batch_size"], f["lr"], f["seed"])
    names = [name for _, name in cfg.checkpoints()]
    assert names == PARAMS["match"]["finetuned"]
    targets = {(t["model"], t["checkpoint"]) for t in PARAMS["harvest"]["targets"]}
    assert {(f["model"], n) for n in names} <= targets
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = [o.split("/")[-1] for o in dvc["stages"]["finetune"]["outs"]]
    assert sorted(o.replace("${finetune.to}", f["to"]) for o in outs) == sorted(names)


def test_dvc_parses_the_pipeline():
    out = subprocess.run(["dvc", "stage", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stages = out.stdout
    for name in ("import_models@0", "finetune", "harvest@target0", "build@target0-6-1", "assign@target4-12-10",
                 "report@target0-6-1", "match_finetuned@sft-6-1", "match_cross@pair1-10", "diff_finetuned@sft-12-10"):
        assert name in stages, name
