"""The default pipeline's definition follows params.yaml (issue 8, item 19): DVC parses it, every
list it expands comes from params, and an edited params file gives the stage set it asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ep_store.studies.finetune import FinetuneConfig
from tests.conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def finetune_checkpoints(params: dict) -> list[str]:
    f = params["finetune"]
    cfg = FinetuneConfig(f["model"], f["from"], f["to"], steps=f["steps"], save_every=f["save_every"],
                         batch_size=f["batch_size"], lr=f["lr"], seed=f["seed"], plant=f["plant"],
                         plant_layers=tuple(int(x) for x in str(f["plant_layers"]).split(",")))
    return [name for _, name in cfg.checkpoints()]


def test_one_list_of_layers():
    """Layers live once in params (blocks.layers); no stage spells a list or a layer by hand."""
    assert "layers" not in PARAMS["harvest"] and "layers" not in PARAMS["build"]
    text = (ROOT / "dvc.yaml").read_text()
    assert "${blocks}" in DVC["stages"]["harvest"]["cmd"]
    assert (ROOT / ".dvc" / "config").read_text().split() == ["[parsing]", "list", "=", "append"]
    for name, stage in DVC["stages"].items():
        for kind in ("matrix", "foreach"):
            values = stage.get(kind, {})
            for value in (values.values() if isinstance(values, dict) else [values]):
                assert isinstance(value, str) and re.fullmatch(r"\$\{[\w.]+\}", value), (name, value)
    assert not re.search(r"step\d|L\d|p\d", re.sub(r"\$\{[^}]*\}", "", text).replace("step<k>", "")), \
        "a checkpoint, layer or percentile spelled by hand in dvc.yaml"


def test_layer_subsets_name_harvested_layers():
    """The SAE and refusal sweeps may take fewer layers than blocks.layers, never others: the
    SAE trains on stored activations, and the refusal study is matched against built layers."""
    layers = set(PARAMS["blocks"]["layers"])
    assert set(PARAMS["sae"]["layers"]) <= layers
    assert {int(x) for x in str(PARAMS["refusal"]["layers"]).split(",")} <= layers
    target = (PARAMS["sae"]["target"]["model"], PARAMS["sae"]["target"]["checkpoint"])
    assert target in {(t["model"], t["checkpoint"]) for t in PARAMS["harvest"]["targets"]}
    assert PARAMS["sae"]["percentile"] in PARAMS["build"]["percentiles"]


def test_finetune_checkpoints_agree_with_targets_and_matches():
    names = finetune_checkpoints(PARAMS)
    assert names == PARAMS["match"]["finetuned"]
    targets = {(t["model"], t["checkpoint"]) for t in PARAMS["harvest"]["targets"]}
    assert {(PARAMS["finetune"]["model"], n) for n in names} <= targets
    assert DVC["stages"]["finetune"]["outs"] == ["${models_dir}/${finetune.model}"]


def test_dvc_parses_the_pipeline():
    out = subprocess.run(["dvc", "stage", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stages = out.stdout
    for name in ("import_models@0", "finetune", "harvest@target0", "build@target0-6-1", "assign@target4-12-10",
                 "report@target0-6-1", "match_finetuned@sft-6-1", "match_cross@pair1-10", "diff_finetuned@sft-12-10"):
        assert name in stages, name


def edited(params: dict) -> dict:
    """A small consistent edit: 2 fine-tuning steps saved every step, one layer, one percentile."""
    p = yaml.safe_load(yaml.safe_dump(params))
    p["finetune"] |= {"steps": 2, "save_every": 1}
    p["blocks"]["layers"] = [3]
    p["build"]["percentiles"] = [2]
    model = p["finetune"]["model"]
    names = finetune_checkpoints(p)
    p["harvest"]["targets"] = [{"model": model, "checkpoint": "base", "max_tokens": 300}] + \
        [{"model": model, "checkpoint": n, "max_tokens": 200} for n in names] + \
        [{"model": "smollm2-135m", "checkpoint": "instruct", "max_tokens": 200}]
    p["match"]["finetuned"] = names
    p["match"]["cross"] = [{"name": "models-L3", "a": {"model": model, "checkpoint": "base", "layer": 3},
                            "b": {"model": "smollm2-135m", "checkpoint": "instruct", "layer": 3}}]
    return p


@pytest.fixture(scope="module")
def edited_repo(tmp_path_factory) -> Path:
    """A git + DVC repository holding this checkout's pipeline with the edited params."""
    repo = tmp_path_factory.mktemp("pipeline")
    for rel in ("dvc.yaml", ".dvc/config", "ep_store/stages/data/chat_train.jsonl", "ep_store/stages/data/chat_heldout.jsonl"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    (repo / "params.yaml").write_text(yaml.safe_dump(edited(PARAMS), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def stages_of(repo: Path) -> dict[str, dict]:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {s.name: {"cmd": s.cmd, "outs": [o.def_path for o in s.outs], "deps": [d.def_path for d in s.deps]}
                for s in r.index.stages}


def test_edited_params_give_the_stage_set_they_ask_for(edited_repo):
    listed = subprocess.run(["dvc", "stage", "list"], cwd=edited_repo, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    stages = stages_of(edited_repo)
    assert set(listed.stdout.split()) >= set(stages)
    ft = stages["finetune"]
    assert ft["outs"][0] == "data/models/gemma-3-270m" and "--steps 2 --save-every 1" in ft["cmd"]
    # harvest: one stage per target, each with the one layer
    harvests = {k: v for k, v in stages.items() if k.startswith("harvest@")}
    assert len(harvests) == 4
    assert all(" --layers 3 " in v["cmd"] and "--layers 6" not in v["cmd"] for v in harvests.values())
    # each target's own token budget (issue 22: the evaluated checkpoints stream more)
    assert sorted(v["cmd"].split("--max-tokens ")[1].split()[0] for v in harvests.values()) == ["200"] * 3 + ["300"]
    assert {d for v in harvests.values() for d in v["deps"] if d.startswith("data/models/gemma")} == \
        {"data/models/gemma-3-270m/base", "data/models/gemma-3-270m/sft-step1", "data/models/gemma-3-270m/sft"}
    # build/assign/report: targets x layers x percentiles
    for kind in ("build", "assign", "report"):
        assert sorted(k for k in stages if k.startswith(f"{kind}@")) == \
            sorted(f"{kind}@target{i}-3-2" for i in range(4))
    assert sorted(k for k in stages if k.startswith("match_finetuned@")) == \
        ["match_finetuned@sft-3-2", "match_finetuned@sft-step1-3-2"]
    assert [k for k in stages if k.startswith("match_cross@")] == ["match_cross@pair0-2"]
    # every stage records its digests as a metric, and depends on the library's code
    for name, stage in stages.items():
        assert "ep store digest" in stage["cmd"], name
        assert any(o.startswith("data/metrics/digests/") for o in stage["outs"]), name
        assert "ep_store" in stage["deps"], name


def test_edited_dag_connects_finetune_to_its_checkpoints(edited_repo):
    dag = subprocess.run(["dvc", "dag", "--dot"], cwd=edited_repo, capture_output=True, text=True, timeout=120)
    assert dag.returncode == 0, dag.stderr
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dag.stdout))
    harvests = stages_of(edited_repo)
    from_finetune = {b for a, b in edges if a == "finetune"}
    expected = {k for k, v in harvests.items() if k.startswith("harvest@") and
                any(d.startswith("data/models/gemma-3-270m/") for d in v["deps"])}
    assert expected and expected <= from_finetune


def test_rerun_shows_no_metrics_diff(tmp_path, models_dir):
    """Item 20 end to end with real DVC: a stage that harvests the tiny model and records its
    digest, committed, then forced to rerun: Lance files are new, `dvc metrics diff` is empty;
    a changed parameter gives a different digest there."""
    import os
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    python = f"PYTHONPATH={ROOT} {sys.executable} -m ep_store"
    (repo / "params.yaml").write_text("max_tokens: 300\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"harvest": {
        "cmd": f"{python} harvest --model tiny --checkpoint base --layers 1 --max-tokens ${{max_tokens}} --ctx 32 "
               f"--batch-size 2 --device cpu --store store --models-dir {models_dir} --no-progress && "
               f"{python} store digest store/activations --metrics digests/harvest.json",
        "params": ["max_tokens"], "outs": ["store"],
        "metrics": [{"digests/harvest.json": {"cache": False}}]}}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args):
        done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr + done.stdout
        return done.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "repro", "-q")
    lance_files = {p.name for p in (repo / "store").rglob("*.lance") if p.is_file()}
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first run")
    run("dvc", "repro", "-q", "--force")
    assert {p.name for p in (repo / "store").rglob("*.lance") if p.is_file()} != lance_files  # new files
    assert run("dvc", "metrics", "diff").strip() == ""
    (repo / "params.yaml").write_text("max_tokens: 200\n")
    run("dvc", "repro", "-q")
    assert "digest" in run("dvc", "metrics", "diff")
