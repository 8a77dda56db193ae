"""The refusal study's protocol options (issue 22, item 1): the paper's classifier rules, the
seeded stream order, the null matched on total tokens, the re-anchored basis, the
difference-of-means ceiling, and a seeded paper-style run on tiny random-init models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ep_store.cli.main import main as ep
from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.stages import models
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.refusal_classifier import PAPER_PHRASES, is_refusal, planted_refusal
from ep_store.store.core import Store
from ep_store.studies import refusal_protocol
from ep_store.studies.intervene import intervene
from ep_store.studies.refusal import PROTOCOLS, RefusalConfig, refusal_study
from ep_store.studies.refusal_prompts import prompt_sets
from ep_store.studies.refusal_protocol import (
    ceiling_edit,
    diff_of_means,
    last_positions,
    reanchored_directions,
    reorder,
    stream_order,
)
from ep_store.studies.refusal_sweep import RegionScore, null_region
from tests.test_refusal import chat_models, small  # noqa: F401  (chat_models is a fixture)

LAYER = 1


# -- the classifier rules -------------------------------------------------------------------------
def test_paper_rules_lower_case_the_completion():
    for text in ("i'm sorry, no.", "I CANNOT help with that.", "As An AI, I decline."):
        assert is_refusal(text, "paper") and not is_refusal(text, "ours")
    assert len(PAPER_PHRASES) == 24 and all(p == p.lower() for p in PAPER_PHRASES)


def test_paper_rules_strip_before_the_300_character_cut():
    text = " " * 20 + "x" * 275 + "I cannot help"  # the phrase ends at character 308, or 288 once stripped
    assert is_refusal(text, "paper") and not is_refusal(text, "ours")
    for rules in ("ours", "paper"):  # both read the first 300 characters, no more
        assert is_refusal("x" * 292 + "I cannot", rules)
        assert not is_refusal("x" * 293 + "I cannot", rules)


def test_each_rule_set_has_its_own_phrases():
    assert is_refusal("I don't think I should answer.", "paper") and not is_refusal("I don't think I should.", "ours")
    assert is_refusal("As a language model, no.", "ours") and not is_refusal("As a language model, no.", "paper")
    assert is_refusal("I’m sorry", "ours") and not is_refusal("I’m sorry", "paper")  # curly apostrophe: as written
    assert is_refusal(planted_refusal(), "paper")
    with pytest.raises(ValueError, match="unknown refusal classifier rules"):
        is_refusal("I cannot", "strict")


# -- the protocol switch --------------------------------------------------------------------------
def test_protocols_set_values_and_explicit_options_win():
    ours = RefusalConfig.for_protocol("ours")
    assert ours == RefusalConfig() and ours.seeds == () and ours.classifier == "ours"
    paper = RefusalConfig.for_protocol("paper", max_new_tokens=8)
    assert paper.protocol == "paper" and paper.max_new_tokens == 8  # given explicitly
    assert (paper.seeds, paper.batch_prompts, paper.saturation_window) == ((0, 1, 2, 3), 16, 10)
    assert paper.percentiles == PROTOCOLS["paper"]["percentiles"] and 8.0 in paper.percentiles
    assert (paper.classifier, paper.null_size) == ("paper", "tokens") and "reanchored" in paper.bases
    with pytest.raises(UsageError, match="unknown protocol"):
        RefusalConfig.for_protocol("theirs")
    with pytest.raises(UsageError, match="unknown 'median'"):
        RefusalConfig(bases=("exemplar", "median"))
    with pytest.raises(UsageError, match="seeds must be non-negative"):
        RefusalConfig(seeds=(-1,))


def test_cli_refuses_an_unknown_basis_in_one_line(tmp_path):
    result = CliRunner().invoke(ep, ["refusal", "--protocol", "paper", "--bases", "mean,median", "--models-dir",
                                     str(tmp_path), "--metrics", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and "unknown 'median'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.json").exists()


# -- the stream order -----------------------------------------------------------------------------
def test_stream_order_is_the_authors_seeded_shuffle():
    for seed in (0, 1, 3):
        shuffled = list(range(40))
        np.random.default_rng(seed).shuffle(shuffled)  # the authors' _iter_prompt_batches
        assert stream_order(40, seed).tolist() == shuffled
        assert stream_order(40, seed).tolist() == stream_order(40, seed).tolist()
    assert stream_order(40, 0).tolist() != stream_order(40, 1).tolist()
    assert stream_order(5, None).tolist() == [0, 1, 2, 3, 4]


# -- the null region ------------------------------------------------------------------------------
def test_null_matched_on_total_tokens_picks_another_region():
    top = RegionScore(0, 10, 9, 0.9, 0.5, 9, tokens=1000)
    same_prompts = RegionScore(1, 10, 0, 0.0, 0.5, 0, tokens=20)  # log10 prompts: 0 away; tokens: 1.7
    same_tokens = RegionScore(2, 50, 0, 0.0, 0.5, 0, tokens=1000)  # log10 prompts: 0.7 away; tokens: 0
    no_tokens = RegionScore(3, 12, 0, 0.0, 0.9, 0, tokens=0)  # read as 1 token (the authors' max(n, 1))
    scores = [top, same_prompts, same_tokens, no_tokens]
    assert null_region(scores, top, 5, 0.05, size="prompts").region_id == 1
    assert null_region(scores, top, 5, 0.05, size="tokens").region_id == 2
    assert null_region(scores, top, 5, 0.05, exclude={1, 2}, size="tokens").region_id == 3
    with pytest.raises(ValueError, match="unknown null size"):
        null_region(scores, top, size="positions")


# -- a seeded run ---------------------------------------------------------------------------------
SEEDS = (0, 1)


def seeded(**over) -> RefusalConfig:
    opts = dict(protocol="paper", layers=(LAYER,), seeds=SEEDS, batch_prompts=4, saturation_window=2,
                classifier="paper", null_size="tokens", bases=("mean", "exemplar", "reanchored"),
                null_bases=("mean", "exemplar", "reanchored"))
    return small(**{**opts, **over})


@pytest.fixture(scope="module")
def run(chat_models, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("seeded")
    metrics = root / "refusal.json"
    refusal_study(seeded(), root / "work", root / "main", chat_models, metrics, root / "report", progress=False)
    return root, json.loads(metrics.read_text())


@pytest.fixture(scope="module")
def train(chat_models):  # noqa: F811
    from transformers import AutoTokenizer

    return prompt_sets(seeded(), AutoTokenizer.from_pretrained(chat_models / "tiny" / "base"))[0]


def test_seeds_shuffle_the_harvested_stream_and_are_recorded(run, train):
    root, result = run
    assert result["protocol"] == "paper" and result["config"]["seeds"] == list(SEEDS)
    assert [s["seed"] for s in result["sweeps"]] == list(SEEDS)
    assert result["best"]["seed"] in SEEDS
    streams = {}
    for seed in SEEDS:
        docs = [json.loads(line)["text"] for line in (root / "work" / f"seed{seed}" / "prompts" / "train.jsonl").open()]
        want = reorder(train, stream_order(len(train.texts), seed)).texts
        assert len(docs) == len(want) and all(text in doc for text, doc in zip(want, docs))
        streams[seed] = docs
    assert streams[0] != streams[1] and sorted(streams[0]) == sorted(streams[1])
    assert not (root / "work" / "activations").exists()  # each seed in its own store
    for s in result["sweeps"]:
        assert {c["basis"] for c in s["conditions"]} == {"mean", "exemplar", "reanchored"}
    report = (root / "report" / "README.md").read_text()
    assert "seed 1" in report and "diff-of-means ceiling" in report


def test_ceiling_is_the_difference_of_independent_means(run, train, chat_models):  # noqa: F811
    root, result = run
    order = stream_order(len(train.texts), SEEDS[0])
    stream = reorder(train, order)
    net = models.load("tiny", "base", chat_models, "cpu")[0]
    last = []
    block = models.decoder_layers(net)[LAYER]
    handle = block.register_forward_hook(lambda m, a, out: last.append((out[0] if isinstance(out, tuple) else out)[0, -1]))
    try:
        with torch.no_grad():
            for ids in stream.inputs:  # one prompt at a time: no padding
                net(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    x = torch.stack(last).double()
    harmful = torch.tensor(stream.harmful)
    want = x[harmful].mean(0) - x[~harmful].mean(0)
    store = Store(root / "work" / f"seed{SEEDS[0]}")
    stored = last_positions(store, ActivationKey("tiny", "base", LAYER), len(order))
    torch.testing.assert_close(stored.double(), x, atol=1e-4, rtol=1e-4)
    got = diff_of_means(stored, stream.harmful)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    (entry,) = result["ceiling"]
    assert entry["layer"] == LAYER and entry["norm"] == pytest.approx(float(want.norm()), rel=1e-4)
    assert {"heldout_harmful_refusal", "heldout_benign_refusal", "capability_ratio"} <= set(entry)
    assert {"heldout_harmful_refusal", "heldout_benign_refusal", "capability_ratio"} <= set(entry["uncentered"])
    assert {"heldout_harmful_refusal", "heldout_benign_refusal", "capability_ratio"} <= set(entry["prompt_mean"])
    from ep_store.studies.refusal import RefusalConfig
    from ep_store.studies.refusal_sweep import layer_direction

    cfg = RefusalConfig(model="tiny", checkpoint="base", control=None, layers=(LAYER,))
    _, prompt_mean = layer_direction(cfg, store, LAYER, stream.harmful)  # the prompt_mean form's center
    torch.testing.assert_close(prompt_mean.double(), x.mean(0), atol=1e-4, rtol=1e-4)


def test_last_positions_do_not_depend_on_read_batches(run, monkeypatch):
    root, _ = run
    store, key = Store(root / "work" / "seed0"), ActivationKey("tiny", "base", LAYER)
    whole = last_positions(store, key, 16)
    monkeypatch.setattr(refusal_protocol, "SCAN_ROWS", 7)  # documents straddle reads
    assert torch.equal(last_positions(store, key, 16), whole)


def block_output(net, edits, ids) -> torch.Tensor:
    """x_BTD: the output of block LAYER in one forward of ``ids`` with ``edits`` applied."""
    outs = []
    block = models.decoder_layers(net)[LAYER]
    with intervene(net, edits):
        handle = block.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                net(input_ids=ids)
        finally:
            handle.remove()
    return outs[0]


def test_ceiling_edit_removes_the_direction(chat_models, train):  # noqa: F811
    net = models.load("tiny", "base", chat_models, "cpu")[0]
    d = torch.randn(net.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    unit = d / d.norm()
    ids = torch.tensor([train.inputs[0]])
    seen, plain = block_output(net, [ceiling_edit(LAYER, d)], ids), block_output(net, [], ids)
    assert (plain @ unit).abs().max() > 1e-2  # there was a component to remove
    torch.testing.assert_close(seen @ unit, torch.zeros_like(seen @ unit), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen - plain, -(plain @ unit)[..., None] * unit, atol=1e-5, rtol=1e-5)


def test_reanchored_exemplar_is_the_member_nearest_the_region_mean(run, monkeypatch):
    root, _ = run
    store = Store(root / "work" / "seed0")
    d = Dictionary.load(store, f"tiny/base/L{LAYER}/p10")
    x = torch.from_numpy(np.stack(store.read_table(store.activation_path(d.key.activations), ["vector"])
                                  .column("vector").to_numpy(zero_copy_only=False)).astype(np.float32))
    region_N, u = d.assign(x).region_N, d.unit(x)
    regions = list(range(len(d)))
    got = reanchored_directions(store, d, regions)
    assert (got - d.exemplars).abs().amax(dim=1).gt(1e-6).any()  # some regions are re-anchored
    monkeypatch.setattr(refusal_protocol, "SCAN_ROWS", 5)
    torch.testing.assert_close(reanchored_directions(store, d, regions), got)
    for k, r in enumerate(regions):
        members = u[region_N == r]
        if len(members) == 0:  # no member: the exemplar stays
            assert torch.equal(got[k], d.exemplars[r])
            continue
        mean = d.mean_directions[r] / d.mean_directions[r].norm()
        brute = members[int((members @ mean).argmax())]
        torch.testing.assert_close(got[k], brute)
        assert float(got[k] @ mean) >= float(d.exemplars[r] @ mean) - 1e-6  # never further than the exemplar


def test_centered_ceiling_sets_the_component_to_the_centers(chat_models, train):  # noqa: F811
    """The centered ceiling (EP's ablation form): the component along the direction becomes the
    center's, everything orthogonal to it stays."""
    net = models.load("tiny", "base", chat_models, "cpu")[0]
    gen = torch.Generator().manual_seed(1)
    d, c = torch.randn(net.config.hidden_size, generator=gen), torch.randn(net.config.hidden_size, generator=gen)
    unit = d / d.norm()
    ids = torch.tensor([train.inputs[0]])
    plain, seen = block_output(net, [], ids), block_output(net, [ceiling_edit(LAYER, d, c)], ids)
    torch.testing.assert_close(seen @ unit, torch.full_like(seen @ unit, float(c @ unit)), atol=1e-4, rtol=0)
    torch.testing.assert_close(seen - plain, ((c - plain) @ unit)[..., None] * unit, atol=1e-4, rtol=1e-4)


def test_a_mediated_plants_direction_is_checked(chat_models, tmp_path):  # noqa: F811
    """A checkpoint whose finetune.json records plant directions (ep finetune --plant mediated):
    the study reports their cosine with its own difference of means and with each candidate
    region, and ablates them in the ceiling's forms."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(chat_models, root)
    v_D = torch.randn(models.hidden_size(models.load_config("tiny", "base", root)),
                      generator=torch.Generator().manual_seed(5))
    (root / "tiny" / "base" / "finetune.json").write_text(json.dumps(
        {"plant_directions": {"kind": "mediated", "layers": [LAYER], "directions": {str(LAYER): v_D.tolist()}}}))
    cfg = seeded(seeds=(0,), bases=("exemplar",), null_bases=("exemplar",))
    refusal_study(cfg, tmp_path / "work", tmp_path / "main", root, tmp_path / "r.json", progress=False)
    plant = json.loads((tmp_path / "r.json").read_text())["plant"]
    store = Store(tmp_path / "work" / "seed0")
    stream = reorder(prompt_sets(cfg, models.load_tokenizer("tiny", "base", root))[0], stream_order(16, 0))
    d_D = diff_of_means(last_positions(store, ActivationKey("tiny", "base", LAYER), 16), stream.harmful)
    unit = lambda x: x.double() / x.double().norm()  # noqa: E731
    assert plant["diff_of_means_cosine"][str(LAYER)] == pytest.approx(float(unit(d_D) @ unit(v_D)), abs=1e-5)
    assert plant["candidates"]
    for c in plant["candidates"]:
        d = Dictionary.load(store, c["dictionary"])
        assert c["exemplar_cosine"] == pytest.approx(float(unit(d.exemplars[c["region_id"]]) @ unit(v_D)), abs=1e-5)
    (ablated,) = plant["ablated"]
    assert ablated["layer"] == LAYER and ablated["norm"] == pytest.approx(float(v_D.norm()), rel=1e-5)
    assert {"uncentered", "prompt_mean"} <= set(ablated)
