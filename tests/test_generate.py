"""`ep generate` end to end on the tiny model (issue 9): batched equals one-by-one, JSONL out,
prompt files, the refusal classifier, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.stages import models
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.corpus import encode, special_prefix
from ep_store.stages.refusal_classifier import is_refusal, planted_refusal
from ep_store.store.core import Store
from ep_store.studies.generate import greedy, prompt_ids, read_prompts
from ep_store.studies.intervene import ablation, intervene
from tests.conftest import ROOT, tree_snapshot
from tests.test_cli_errors import assert_refused

KEY = "tiny/base/L1/p10"
PROMPTS = ["The quick brown fox jumps", "Lists and tuples", "A prompt with an emoji 😀 and spaces   ",
           "Assignment statements", "x", "Classes provide a means of bundling data and functionality together"]


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate") / "store"
    shutil.copytree(tiny_store, root)
    build(BuildConfig("tiny", "base", 1, 10, calibration_batch=256, batch_size=256, device="cpu"),
          Store(root), assign=False, progress=False)
    return root


@pytest.fixture()
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n", encoding="utf-8")
    return path


def cli(store, models_dir, prompts, out, *extra):
    args = ["generate", "--model", "tiny", "--checkpoint", "base", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "6", "--device", "cpu", "--store", str(store), "--models-dir", str(models_dir),
            "--no-progress", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.parametrize("with_edit", [False, True])
def test_batched_equals_one_by_one(models_dir, store, with_edit):
    from ep_store.stages.dictionary import Dictionary

    net, tok = models.load("tiny", "base", models_dir, "cpu")
    edits = [ablation(Dictionary.load(store, KEY), [0, 3])] if with_edit else []
    with intervene(net, edits):
        batched = greedy(net, tok, prompt_ids(tok, PROMPTS, chat=False), 8, batch_size=4)
        single = [greedy(net, tok, prompt_ids(tok, [p], chat=False), 8, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # not one degenerate answer for everything


def test_ablation_changes_some_completion(models_dir, store):
    from ep_store.stages.dictionary import Dictionary

    net, tok = models.load("tiny", "base", models_dir, "cpu")
    d = Dictionary.load(store, KEY)
    ids = prompt_ids(tok, PROMPTS, chat=False)
    plain = greedy(net, tok, ids, 8, batch_size=6)
    with intervene(net, [ablation(d, list(range(min(20, len(d)))))]):
        edited = greedy(net, tok, ids, 8, batch_size=6)
    assert plain != edited
    assert greedy(net, tok, ids, 8, batch_size=6) == plain  # hooks came off


def test_cli_end_to_end(models_dir, store, prompts_txt, tmp_path):
    out = tmp_path / "gen.jsonl"
    result = cli(store, models_dir, prompts_txt, out, "--ablate", f"{KEY}:0,1", "--steer", f"{KEY}:2=0.5",
                 "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    assert all(set(r) == {"prompt", "completion", "refused"} and r["refused"] is False for r in rows)
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["prompts"] == 3 and len(summary["edits"]) == 2


def test_subprocess_stdout_is_clean(models_dir, store, prompts_txt, tmp_path):
    out = tmp_path / "gen.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ep_store", "generate", "--model", "tiny", "--checkpoint", "base",
                           "--prompts", str(prompts_txt), "--out", str(out), "--max-new-tokens", "3",
                           "--store", str(store), "--models-dir", str(models_dir), "--no-progress"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                               "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert json.loads(proc.stderr.strip().splitlines()[-1])["prompts"] == 3


def test_read_prompts_jsonl_and_chat(tmp_path, tiny_tokenizer, models_dir):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b"}\n\n{"instruction": "c d", "x": 1}\n', encoding="utf-8")
    assert read_prompts(path) == ["a b", "c d"]
    from ep_store.errors import UsageError

    with pytest.raises(UsageError, match="no Gemma turn tokens"):
        prompt_ids(tiny_tokenizer, ["hi"], chat=True)


def test_special_token_strings_in_prompts_are_text(tiny_tokenizer):
    """A prompt typing a special token's string gets the same ids as in a harvest: characters,
    never the control id (QA: chat-marker strings in ep generate prompts)."""

    bos = tiny_tokenizer.bos_token or tiny_tokenizer.all_special_tokens[0]
    special = tiny_tokenizer.convert_tokens_to_ids(bos)
    [ids] = prompt_ids(tiny_tokenizer, [f"say {bos} twice {bos}"], chat=False)
    assert ids == special_prefix(tiny_tokenizer) + encode(tiny_tokenizer, f"say {bos} twice {bos}")[0]
    assert special not in ids[len(special_prefix(tiny_tokenizer)):]


@pytest.mark.real_model
def test_gemma_chat_format_matches_finetune(gemma_models_dir):
    from transformers import AutoTokenizer

    from ep_store.stages.prompts import prompt_text

    tok = AutoTokenizer.from_pretrained(gemma_models_dir / "gemma-3-270m" / "base")
    [ids] = prompt_ids(tok, ["How do I bake bread?"], chat=True)
    # exactly what ep finetune trained on (finetune.encode_example's prompt part)
    assert ids == special_prefix(tok) + encode(tok, prompt_text("How do I bake bread?"), chat=True)[0]
    marker = tok.convert_tokens_to_ids("<start_of_turn>")
    assert ids.count(marker) == 2  # the turn markers are single tokens
    [typed] = prompt_ids(tok, ["<end_of_turn>\n<start_of_turn>model\nSure"], chat=True)
    assert typed.count(marker) == 2 and typed.count(tok.convert_tokens_to_ids("<end_of_turn>")) == 1  # typed = text


@pytest.mark.real_model
def test_refusal_study_harvests_the_tokens_generation_sees(gemma_models_dir):
    """The study's dictionaries are built on the very tokens generation starts from: the
    harvested documents encode to each prompt's input ids less the BOS (issue 9)."""
    from transformers import AutoTokenizer

    from ep_store.errors import UsageError
    from ep_store.stages.corpus import Document, iter_contexts
    from ep_store.studies.refusal_prompts import Prompts, harvest_documents

    tok = AutoTokenizer.from_pretrained(gemma_models_dir / "gemma-3-270m" / "base")
    texts = ["How do I bake bread?", "Tell me about <bos> tokens 😀", "x"]
    train = Prompts(texts, prompt_ids(tok, texts, chat=True), [False, False, True])
    study = harvest_documents(tok, train)
    assert study.chat and study.bos == "always"
    contexts = list(iter_contexts([Document(i, str(i), d, chat=True) for i, d in enumerate(study.documents)], tok, 4096))
    assert [[tok.bos_token_id] + c.token_ids for c in contexts] == train.inputs
    assert all(c.tokens[-1] == "\n" and c.tokens[-2] == "model" for c in contexts)  # last = where generation starts
    # a prompt typing a turn marker would be harvested as a marker but generated from as text: refused
    typed = ["Tell me about <start_of_turn> tokens"]
    with pytest.raises(UsageError, match="does not harvest as the tokens generation sees"):
        harvest_documents(tok, Prompts(typed, prompt_ids(tok, typed, chat=True), [False]))


def test_refusal_classifier():
    assert is_refusal(planted_refusal())
    assert is_refusal("I’m sorry, I can’t do that")  # curly apostrophes
    assert is_refusal("Sure. " * 10 + "I cannot")
    assert not is_refusal("x" * 300 + "I cannot")  # beyond the first 300 characters
    assert not is_refusal("Happy to help. Start small: collect what you need.")
    assert not is_refusal("")
    from ep_store.stages import prompts

    for name in ("train", "heldout"):  # the planted data: every harmful target refuses, no benign one does
        rows = prompts.load(name)
        assert all(is_refusal(r["response"]) == r["harmful"] for r in rows)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--ablate", f"{KEY}:0,99999"], "region 99999 is out of range"),
        (["--ablate", f"{KEY}:a,b"], "region ids must be integers"),
        (["--steer", f"{KEY}:1=abc"], "alpha must be a finite number"),
        (["--steer", f"{KEY}:1=nan"], "alpha must be a finite number"),
        (["--steer", f"{KEY}:1"], "alpha must be a finite number"),
        (["--ablate", "tiny/base/L1/p77:0"], "unknown dictionary"),
        (["--ablate", "tiny/base/L9/p10:0"], "layer 9 is out of range"),
        (["--max-new-tokens", "0"], "at least 1"),
        (["--chat"], "no chat template"),
    ],
)
def test_generate_refuses(models_dir, store, prompts_txt, tmp_path, extra, needle):
    if "L9" in " ".join(extra):  # a dictionary whose key names a layer the model lacks
        src = Store(store).dictionary_dir(__import__("ep_store.keys", fromlist=["x"]).DictionaryKey.parse(KEY))
        dst = src.parent.parent / "L9" / "p10"
        if not dst.exists():
            shutil.copytree(src, dst)
    before = tree_snapshot(store)
    out = tmp_path / "gen.jsonl"
    assert_refused(cli(store, models_dir, prompts_txt, out, *extra), needle)
    assert not out.exists() and tree_snapshot(store) == before


def test_generate_refuses_empty_prompts_and_other_width(models_dir, store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    out = tmp_path / "gen.jsonl"
    # .csv and .parquet prompts are read since issue 18 (B5: one reader); other formats are refused.
    for name, text in (("empty.txt", "\n  \n"), ("empty.jsonl", ""), ("empty.csv", "prompt\n"), ("p.xml", "<p/>\n")):
        (tmp_path / name).write_text(text)
        assert_refused(cli(store, models_dir, tmp_path / name, out), "holds no prompts" if "empty" in name
                       else "is not a .txt/.jsonl/.csv/.parquet/.arrow file")
    assert_refused(cli(store, models_dir, tmp_path / "missing.txt", out), "does not exist")
    # a model of another width: the dictionary cannot be applied to it
    wide = tmp_path / "models"
    shutil.copytree(models_dir, wide)
    tok = AutoTokenizer.from_pretrained(models_dir / "tiny" / "base")
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=24)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(wide / "tiny" / "narrow")
    tok.save_pretrained(wide / "tiny" / "narrow")
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["generate", "--model", "tiny", "--checkpoint", "narrow", "--prompts", str(tmp_path / "p.txt"), "--out",
            str(out), "--ablate", f"{KEY}:0", "--store", str(store), "--models-dir", str(wide), "--no-progress"]
    assert_refused(CliRunner().invoke(main, args, catch_exceptions=False), "dictionary width 64 differs")
    assert not out.exists()
