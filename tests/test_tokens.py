"""Tokens are the text, and unusual models get support or a clear refusal (issue 8, parts D
and E): special-token strings, BOS policy, emoji/CJK slices, position limits, nested text
models across architecture families."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.stages import models, prompts
from ep_store.stages.corpus import (
    encode,
    iter_contexts,
    iter_documents,
    special_prefix,
    tiling_spans,
)
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import Store, arrow_to_vectors
from tests.conftest import ROOT, tree_snapshot
from tests.test_harvest import check_against_hidden_states

SPECIAL_TEXT = "Write <bos> here, then <eos> and <pad>; also <start_of_turn>user and <|im_start|>system <|endoftext|>."
UNICODE_TEXT = "Thumbs up 👍🏽 for 漢字 and ひらがな, café, naïve, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \u200d👩\u200d💻 emoji 🎉!"


@pytest.fixture(scope="module")
def every_tokenizer(tiny_tokenizer, real_tokenizers) -> list:
    """(name, tokenizer) of the tiny BPE and the two offline models."""
    return [("tiny", tiny_tokenizer), *real_tokenizers.items()]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def stored(store: Store, key: ActivationKey):
    path = store.activation_path(key)
    return store.read_table(path), store.info(path).meta


# -- item 14: special-token strings are text ------------------------------------------------------
def test_special_token_strings_are_text_every_tokenizer(every_tokenizer):
    for name, tok in every_tokenizer:
        ids, offsets = encode(tok, SPECIAL_TEXT)
        assert not set(ids) & set(tok.all_special_ids), name
        spans = tiling_spans(offsets)
        assert "".join(SPECIAL_TEXT[a:b] for a, b in spans) == SPECIAL_TEXT[spans[0][0]:], name


def test_chat_source_keeps_turn_markers_only(every_tokenizer):
    text = prompts.chat_text("say <bos> twice <bos>", "no")
    for name, tok in every_tokenizer:
        ids, _ = encode(tok, text, chat=True)
        assert tok.bos_token_id not in ids, name
        added = tok.get_added_vocab()
        if "<start_of_turn>" in added:  # Gemma: markers are control ids, one per marker
            assert ids.count(added["<start_of_turn>"]) == 2 and ids.count(added["<end_of_turn>"]) == 2
    assert next(d for d in iter_documents("chat,builtin")).chat
    assert not [d for d in iter_documents("builtin")][0].chat


def test_harvest_never_stores_special_ids(models_dir, tmp_path, tiny_tokenizer):
    corpus = write_jsonl(tmp_path / "special.jsonl", [SPECIAL_TEXT, UNICODE_TEXT])
    store = Store(tmp_path / "store")
    harvest(HarvestConfig("tiny", "base", (1,), corpus=str(corpus), max_tokens=500, ctx=16, batch_size=2,
                          device="cpu"), store, models_dir, progress=False)
    table, _ = stored(store, ActivationKey("tiny", "base", 1))
    control = set(tiny_tokenizer.all_special_ids) - {tiny_tokenizer.unk_token_id}  # <unk> marks unknown glyphs
    assert not set(table.column("token_id").to_pylist()) & control


# -- item 15: BOS policy -------------------------------------------------------------------------
def test_bos_prefix_follows_each_tokenizer(every_tokenizer):
    expected = {"tiny": [], "smollm2-135m": [], "gemma-3-270m": [2]}  # tiny BPE and SmolLM2 add none; Gemma adds <bos>
    for name, tok in every_tokenizer:
        assert special_prefix(tok) == expected[name], name
        assert special_prefix(tok) == tok("x")["input_ids"][: len(special_prefix(tok))]


@pytest.mark.parametrize(("bos", "prefix"), [("auto", []), ("never", []), ("always", [1])])
def test_bos_option_is_recorded_and_used(models_dir, tmp_path, bos, prefix):
    store = Store(tmp_path / "store")
    harvest(HarvestConfig("tiny", "base", (1,), max_tokens=150, ctx=64, batch_size=2, device="cpu", bos=bos),
            store, models_dir, progress=False)
    table, meta = stored(store, ActivationKey("tiny", "base", 1))
    assert meta["bos"] == bos and meta["prefix_ids"] == prefix
    net = AutoModelForCausalLM.from_pretrained(models_dir / "tiny" / "base").eval()
    ids = table.column("token_id").to_pylist()[:64]
    with torch.no_grad():
        hidden = net(torch.tensor([prefix + ids]), output_hidden_states=True).hidden_states[2][0, len(prefix):]
    x = arrow_to_vectors(table.column("vector"))[:64]
    np.testing.assert_allclose(x, hidden.numpy(), rtol=1e-4, atol=1e-4 * float(hidden.abs().max()))
    # A resume with another BOS policy is another stream: refused.
    other = "always" if bos != "always" else "never"
    with pytest.raises(UsageError, match="other options"):
        harvest(HarvestConfig("tiny", "base", (1,), max_tokens=300, ctx=64, batch_size=2, device="cpu", bos=other),
                store, models_dir, progress=False)


@pytest.mark.real_model
def test_smollm2_vectors_equal_transformers_defaults(smollm2_models_dir, tmp_path):
    models_dir = smollm2_models_dir
    store = tmp_path / "store"
    harvest(HarvestConfig("smollm2-135m", "instruct", (3,), max_tokens=200, ctx=64, batch_size=2, device="cpu"),
            Store(store), models_dir, progress=False)
    check_against_hidden_states(models_dir, "smollm2-135m", "instruct", store, [3], n_contexts=1)


# -- item 16: token text is the document slice ----------------------------------------------------
def test_unicode_tokens_are_exact_slices_every_tokenizer(every_tokenizer):
    for name, tok in every_tokenizer:
        docs = [d for d in iter_documents(str(write_jsonl(Path(f"/tmp/ep_unicode_{os.getpid()}.jsonl"),
                                                          [UNICODE_TEXT])))]
        contexts = list(iter_contexts(docs, tok, ctx=7))
        tokens = [t for c in contexts for t in c.tokens]
        assert "\ufffd" not in "".join(tokens), name
        first = contexts[0].offsets[0][0]
        assert "".join(tokens) == UNICODE_TEXT[first:], name
        for c in contexts:  # each context's tokens give its text back
            assert "".join(c.tokens) == UNICODE_TEXT[c.offsets[0][0] : c.offsets[-1][1]]
            assert all(UNICODE_TEXT[a:b] == t for (a, b), t in zip(c.offsets, c.tokens, strict=True))


def test_harvested_token_column_gives_text_back(models_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "uni.jsonl", [UNICODE_TEXT, SPECIAL_TEXT])
    store = Store(tmp_path / "store")
    harvest(HarvestConfig("tiny", "base", (1,), corpus=str(corpus), max_tokens=500, ctx=8, batch_size=3,
                          device="cpu"), store, models_dir, progress=False)
    table, _ = stored(store, ActivationKey("tiny", "base", 1))
    rows = table.select(["doc_id", "token", "char_start", "char_end"]).to_pylist()
    for doc_id, text in enumerate([UNICODE_TEXT, SPECIAL_TEXT]):
        mine = [r for r in rows if r["doc_id"] == doc_id]
        assert "".join(r["token"] for r in mine) == text[mine[0]["char_start"] : mine[-1]["char_end"]]
        assert all(text[r["char_start"] : r["char_end"]] == r["token"] for r in mine)
        assert all(a["char_end"] == b["char_start"] for a, b in zip(mine, mine[1:], strict=False))


# -- item 17: position limits ---------------------------------------------------------------------
def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ep_store", *args], capture_output=True, text=True, env=env)


def test_ctx_beyond_position_table_is_refused(models_dir, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(UsageError, match="at most --ctx 512"):  # tiny: 512 positions, no BOS by default
        harvest(HarvestConfig("tiny", "base", (1,), ctx=513, device="cpu"), store, models_dir, progress=False)
    with pytest.raises(UsageError, match="at most --ctx 511"):
        harvest(HarvestConfig("tiny", "base", (1,), ctx=512, device="cpu", bos="always"), store, models_dir,
                progress=False)
    assert tree_snapshot(store.root) == {}
    r = run_cli("harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1", "--ctx", "600",
                "--models-dir", str(models_dir), "--store", str(store.root), "--no-progress")
    assert r.returncode == 2 and "at most --ctx 512" in r.stderr and "Traceback" not in r.stderr
    # The largest valid value works.
    harvest(HarvestConfig("tiny", "base", (1,), ctx=512, max_tokens=600, batch_size=1, device="cpu"), store,
            models_dir, progress=False)


# -- item 18: nested text models and architecture families ------------------------------------------
def tiny_configs(tok):
    from transformers import (
        Gemma3Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        SiglipVisionConfig,
    )

    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=32,
                            **common)
    # The vision tower has as many blocks as the text model: the text blocks must still be found.
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return {
        "gemma3-mm": Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                  image_token_index=len(tok) - 1, **{k: v for k, v in common.items() if k != "vocab_size"}),
        "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=256, **common),
        "gpt2": GPT2Config(n_embd=64, n_layer=3, n_head=2, n_positions=256, **common),
        "gpt-neox": GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                  max_position_embeddings=256, **common),
    }


@pytest.fixture(scope="module")
def arch_models_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("archs")
    for name, config in tiny_configs(tiny_tokenizer).items():
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(config)
        net.save_pretrained(root / name / "base")
        tiny_tokenizer.save_pretrained(root / name / "base")
    return root


EXPECTED_BLOCKS = {"gemma3-mm": "model.language_model.layers", "llama": "model.layers", "gpt2": "transformer.h",
                   "gpt-neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", list(EXPECTED_BLOCKS))
def test_architectures_find_text_blocks_and_harvest(arch_models_dir, tmp_path, arch):
    folder = arch_models_dir / arch / "base"
    net = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert models.block_count(net.config) == 3 and models.max_positions(net.config) == 256
    assert models.hidden_size(net.config) == 64
    assert models.decoder_layers(net) is net.get_submodule(EXPECTED_BLOCKS[arch])
    store = Store(tmp_path / "store")
    harvest(HarvestConfig(arch, "base", (1,), max_tokens=100, ctx=50, batch_size=2, device="cpu"), store,
            arch_models_dir, progress=False)
    table, meta = stored(store, ActivationKey(arch, "base", 1))
    ids = table.column("token_id").to_pylist()[:50]
    with torch.no_grad():
        hidden = net(torch.tensor([meta["prefix_ids"] + ids]), output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(arrow_to_vectors(table.column("vector"))[:50], hidden.numpy(), rtol=1e-4,
                               atol=1e-4 * float(hidden.abs().max()))
    with pytest.raises(UsageError, match="at most --ctx 256"):
        harvest(HarvestConfig(arch, "base", (1,), ctx=257, device="cpu"), store, arch_models_dir, progress=False)


def test_blocks_not_found_names_the_model_class(arch_models_dir):
    net = AutoModelForCausalLM.from_pretrained(arch_models_dir / "gpt2" / "base")
    net.config.n_layer = 7
    with pytest.raises(UsageError, match="GPT2LMHeadModel"):
        models.decoder_layers(net)
    from transformers import PretrainedConfig

    with pytest.raises(UsageError, match=type(PretrainedConfig()).__name__):
        models.block_count(PretrainedConfig())


def test_model_without_causal_lm_names_its_class(tmp_path, tiny_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path / "models" / "t5" / "base"
    T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                        d_kv=16)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(UsageError, match="T5Config"):
        harvest(HarvestConfig("t5", "base", (1,), max_tokens=50, device="cpu"), Store(tmp_path / "store"),
                tmp_path / "models", progress=False)
