"""Hook points (issue 21, item 4): ``ep harvest --hook`` stores the same vectors as an
independent ``transformers`` forward with a hook on the named submodule, for the Gemma 3,
Llama and GPT-2 block layouts; the hook is part of the key (not for resid_post) and of every
SQL view, and a block layout without the point is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ep_store.cli.main import main as cli
from ep_store.errors import UsageError
from ep_store.keys import HOOKS, ActivationKey, DictionaryKey
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import arrow_to_vectors
from ep_store.store.core import Store
from tests.conftest import make_tiny_model

TEXT = "The quick brown fox jumps over the lazy dog, and the model reads every token of it."


def _save(folder, config_cls, tokenizer, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = config_cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def layouts_dir(tmp_path_factory, tiny_tokenizer):
    """Tiny random-init models of three block layouts and a parallel-residual one."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    root = tmp_path_factory.mktemp("layouts")
    make_tiny_model(root / "gemma" / "base", seed=2, tokenizer=tiny_tokenizer)
    _save(root / "llama" / "base", LlamaConfig, tiny_tokenizer, hidden_size=64, intermediate_size=128,
          num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    _save(root / "gpt2" / "base", GPT2Config, tiny_tokenizer, n_embd=64, n_layer=3, n_head=2, n_positions=256)
    _save(root / "neox" / "base", GPTNeoXConfig, tiny_tokenizer, hidden_size=64, intermediate_size=128,
          num_hidden_layers=2, num_attention_heads=2, use_parallel_residual=True, max_position_embeddings=256)
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return root


# The submodule each hook point reads in each layout, named here by hand (not by ep_store's
# lookup): (attribute of the block, "input" or "output"); resid_pre/post read the block itself.
SITES = {
    "gemma": {"resid_mid": ("pre_feedforward_layernorm", "input"), "attn_out": ("post_attention_layernorm", "output"),
              "mlp_out": ("post_feedforward_layernorm", "output")},
    "llama": {"resid_mid": ("post_attention_layernorm", "input"), "attn_out": ("self_attn", "output"),
              "mlp_out": ("mlp", "output")},
    "gpt2": {"resid_mid": ("ln_2", "input"), "attn_out": ("attn", "output"), "mlp_out": ("mlp", "output")},
}


def _blocks(net, family):
    return net.transformer.h if family == "gpt2" else net.model.layers


def _reference(root, family, layer, hook, ids):
    """The hook point's vectors for one sequence, by a plain transformers forward and a hook
    placed by hand."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(root / family / "base").eval()
    block = _blocks(net, family)[layer]
    kept = {}
    if hook in ("resid_pre", "resid_post"):
        module, side = block, "input" if hook == "resid_pre" else "output"
    else:
        name, side = SITES[family][hook]
        module = getattr(block, name)
    def on_input(_module, args, kwargs):
        kept["x"] = args[0] if args else kwargs["hidden_states"]

    def on_output(_module, _args, out):
        kept["x"] = out[0] if isinstance(out, tuple) else out

    if side == "input":
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    else:
        handle = module.register_forward_hook(on_output)
    try:
        with torch.no_grad():
            net(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return kept["x"][0].float().numpy()


@pytest.mark.parametrize("family", sorted(SITES))
@pytest.mark.parametrize("hook", HOOKS)
def test_harvest_equals_hooked_transformers_forward(layouts_dir, tmp_path, family, hook):
    store = Store(tmp_path / "store")
    harvest(HarvestConfig(family, "base", (1,), corpus=str(layouts_dir / "corpus.txt"), max_tokens=500, ctx=200,
                          device="cpu", hook=hook), store, layouts_dir, progress=False)
    key = ActivationKey(family, "base", 1, hook)
    table = store.dataset(store.activation_path(key)).to_table()
    meta = store.info(store.activation_path(key)).meta
    ids = table.column("token_id").to_pylist()
    prefix = meta["prefix_ids"]
    want = _reference(layouts_dir, family, 1, hook, prefix + ids)[len(prefix):]
    got = arrow_to_vectors(table.column("vector"))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert meta.get("hook", "resid_post") == hook


def test_hook_points_differ_and_resid_post_keeps_old_paths(layouts_dir, tmp_path):
    """Each hook point is its own dataset with its own vectors; resid_post keeps ``L1.lance``."""
    store = Store(tmp_path / "store")
    vectors = {}
    for hook in HOOKS:
        harvest(HarvestConfig("llama", "base", (1,), corpus=str(layouts_dir / "corpus.txt"), max_tokens=500,
                              ctx=200, device="cpu", hook=hook), store, layouts_dir, progress=False)
        path = store.activation_path(ActivationKey("llama", "base", 1, hook))
        vectors[hook] = arrow_to_vectors(store.dataset(path).to_table().column("vector"))
    names = sorted(p.name for p in (tmp_path / "store" / "activations" / "llama" / "base").iterdir())
    assert names == sorted(["L1.lance"] + [f"L1.{h}.lance" for h in HOOKS if h != "resid_post"])
    assert sorted(str(k) for k in store.list_activations()) == sorted(
        ["llama/base/L1"] + [f"llama/base/L1.{h}" for h in HOOKS if h != "resid_post"])
    # the stream adds up: resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out (Llama)
    np.testing.assert_allclose(vectors["resid_mid"], vectors["resid_pre"] + vectors["attn_out"], atol=1e-5)
    np.testing.assert_allclose(vectors["resid_post"], vectors["resid_mid"] + vectors["mlp_out"], atol=1e-5)
    assert not np.allclose(vectors["attn_out"], vectors["mlp_out"])


def test_parallel_residual_has_no_resid_mid(layouts_dir, tmp_path):
    store_root = tmp_path / "store"
    result = CliRunner().invoke(cli, ["harvest", "--model", "neox", "--checkpoint", "base", "--layers", "1",
                                      "--hook", "resid_mid", "--corpus", str(layouts_dir / "corpus.txt"),
                                      "--store", str(store_root), "--models-dir", str(layouts_dir), "--device", "cpu",
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "no resid_mid" in result.output and "Traceback" not in result.output
    assert not list(store_root.rglob("*.lance"))


def test_keys_name_the_hook():
    key = DictionaryKey.parse("org/model/base/L6.attn_out/p2.5")
    assert (key.model, key.layer, key.hook, key.percentile) == ("org/model", 6, "attn_out", 2.5)
    assert str(key) == "org/model/base/L6.attn_out/p2.5" and str(key.activations) == "org/model/base/L6.attn_out"
    assert DictionaryKey.parse("m/base/L6/p1").hook == "resid_post"
    assert str(DictionaryKey("m", "base", 6, 1.0, "resid_post")) == "m/base/L6/p1"
    for bad in ("m/base/L6.hook_attn_out/p1", "m/base/L6.attn/p1", "m/base/L6./p1"):
        with pytest.raises(UsageError):
            DictionaryKey.parse(bad)
    with pytest.raises(UsageError, match="unknown hook point"):
        ActivationKey("m", "base", 6, "resid")


def test_build_sql_and_export_at_a_hook_point(layouts_dir, tmp_path):
    """A dictionary of attn_out vectors builds, answers ep stats and ep sql with its hook, and
    exports with TransformerLens's hook name."""
    store_root, run = tmp_path / "store", CliRunner()
    common = ["--store", str(store_root)]
    for hook in ("resid_post", "attn_out"):
        harvest(HarvestConfig("gemma", "base", (1,), max_tokens=1500, ctx=64, device="cpu", hook=hook),
                Store(store_root), layouts_dir, progress=False)
        built = run.invoke(cli, ["build", "--model", "gemma", "--checkpoint", "base", "--layer", "1", "--hook", hook,
                                 "--percentile", "10", "--device", "cpu", "--no-progress", *common])
        assert built.exit_code == 0, built.output
    sql = run.invoke(cli, ["sql", "SELECT hook, count(*) AS n FROM assignments GROUP BY hook ORDER BY hook",
                           "--format", "json", *common])
    assert sql.exit_code == 0, sql.output
    rows = [json.loads(line) for line in sql.stdout.splitlines()]
    assert [r["hook"] for r in rows] == ["attn_out", "resid_post"] and all(r["n"] == 1500 for r in rows)
    stats = {}
    for key in ("gemma/base/L1/p10", "gemma/base/L1.attn_out/p10"):
        out = run.invoke(cli, ["stats", key, "region_members", "--format", "json", *common])
        assert out.exit_code == 0, out.output
        stats[key] = [json.loads(line) for line in out.stdout.splitlines()]
        assert sum(r["assigned_tokens"] for r in stats[key]) <= 1500
    assert stats["gemma/base/L1/p10"] != stats["gemma/base/L1.attn_out/p10"]
    _steering_edits_the_hook_point(layouts_dir, Store(store_root))
    exported = run.invoke(cli, ["export", "saelens", "gemma/base/L1.attn_out/p10", "--out", str(tmp_path / "sae"),
                                *common])
    assert exported.exit_code == 0, exported.output
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_attn_out"


def _steering_edits_the_hook_point(layouts_dir, store):
    """Steering along a region of an attn_out dictionary shifts the attention output (what the
    block adds to the stream) by alpha * scale * d at every position, and nothing before it."""
    from transformers import AutoModelForCausalLM

    from ep_store.stages.dictionary import Dictionary
    from ep_store.studies.intervene import intervene, steering

    d = Dictionary.load(store, "gemma/base/L1.attn_out/p10")
    edit = steering(d, 0, alpha=2.0, scale=3.0)
    assert edit.hook == "attn_out"
    net = AutoModelForCausalLM.from_pretrained(layouts_dir / "gemma" / "base").eval()
    block = net.model.layers[1]
    seen = []
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        for steer_on in (False, True):
            if steer_on:
                with intervene(net, [edit]):
                    handle = block.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
                    net(input_ids=ids)
            else:
                handle = block.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
                net(input_ids=ids)
            handle.remove()
    shift = (seen[1] - seen[0])[0]
    want = 6.0 * d.exemplars[0] / d.exemplars[0].norm()
    torch.testing.assert_close(shift, want.expand_as(shift), rtol=1e-4, atol=1e-4)


def test_rewrite_replaces_the_block_input_and_refuses_resid_mid(layouts_dir):
    from transformers import AutoModelForCausalLM

    from ep_store.stages import hookpoints

    net = AutoModelForCausalLM.from_pretrained(layouts_dir / "llama" / "base").eval()
    block = net.model.layers[1]
    seen = {}
    handles = [hookpoints.rewrite(block, "resid_pre", lambda x: torch.full_like(x, 0.5)),
               hookpoints.attach(block, "resid_pre", lambda x: seen.setdefault("pre", x)),
               hookpoints.attach(block, "resid_post", lambda x: seen.setdefault("post", x))]
    try:
        with torch.no_grad():
            net(input_ids=torch.tensor([[5, 17, 42]]))
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["pre"], torch.full_like(seen["pre"], 0.5))
    assert not torch.equal(seen["post"], seen["pre"])
    with pytest.raises(UsageError, match="resid_mid"):
        hookpoints.rewrite(block, "resid_mid", lambda x: x)
