"""Every `ep` command line in README.md's ```bash blocks runs (issue 18, D10).

The lines are read from README.md itself, so a line added there is run here without editing
this file, and a line whose command or option does not exist fails (click exits 2). Each
line runs in README order through click's CliRunner, in a temporary working folder, so the
README's relative paths (`data/store`, `data/models`, `data/reports/...`) land there. The
only changes to a line are the explicit tables below:

- SUBSTITUTIONS: the real models become a tiny random-init Gemma 3 (13 layers, so the
  README's layers 6 and 12 exist; Gemma's turn tokens, so `--chat` works), and sizes shrink;
- PLACEHOLDERS: the README's `KEY` and `DIR`;
- `ep CMD ... --more` repeats the options of the previous `ep CMD` line, then adds `--more`;
- SKIP: lines that need what a test cannot have (real model files, a Ray cluster), each with
  its reason; a SKIP entry that matches no line fails, so the list cannot go stale;
- SETUP: what `dvc repro` makes and the README's examples assume (the `sft` checkpoint's
  dictionaries), and USER_FILES: the files the README names as the user's own.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

SUBSTITUTIONS = [  # (regex, replacement), applied in order to each joined line
    (r"\bgemma-3-270m\b", "tiny"),
    (r"\bsmollm2-135m\b", "tiny"),
    (r"--max-tokens 20000\b", "--max-tokens 3000"),     # harvest: 3,000 tokens per layer
    (r"\btokens-(10000|20000)\b", "tokens-3000"),       # the tag the first build of those 3,000 makes
    (r"--steps 60 --save-every 20\b", "--steps 2 --save-every 1"),
    (r"--max-new-tokens 48\b", "--max-new-tokens 4"),
    (r"--width 5120\b", "--width 256"),
    (r"--tokens 100000\b", "--tokens 4000"),
]
PLACEHOLDERS = {"KEY": "tiny/base/L6/p1", "DIR": "data/reports/evals/readme"}
SKIP = {  # regex on the line -> why it cannot run here
    r"^ep models import-gguf ": "imports a real GGUF model from its PyPI package (minutes, 0.5 GB); "
                                "tests/test_harvest.py imports Gemma under the real_model marker",
    r"--address auto\b": "needs a running Ray cluster",
    r"--address ray://": "needs a Ray client server",
}
SETUP = [  # what the pipeline makes before the README's examples: the fine-tuned checkpoint's dictionaries
    "ep harvest --model tiny --checkpoint sft --layers 6,12 --corpus builtin --max-tokens 3000 --ctx 128",
    "ep build --model tiny --checkpoint sft --layer 6 --percentile 1",
    "ep build --model tiny --checkpoint sft --layer 12 --percentile 1",
]
USER_FILES = {
    "prompts.txt": "How do I bake bread?\nHow do I make a bomb?\n",
    "mine.csv": "text,label\n" + "".join(f"\"{t} number {i}\",{label}\n" for i in range(12) for t, label in (
        ("The cat sat on the mat and purred", "animal"), ("Stocks fell sharply in early trading", "market"))),
    "other_language.txt": "Der schnelle braune Fuchs springt über den faulen Hund.\n" * 40,
}
LAYERS = 13


def readme_lines(text: str) -> list[str]:
    """The `ep ...` lines of the ```bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "ep":
                lines.append(shlex.join(words))
    return lines


def adapt(line: str) -> str:
    for pattern, new in SUBSTITUTIONS:
        line = re.sub(pattern, new, line)
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(line)]
    return shlex.join(words)


def command(words: list[str]) -> list[str]:
    """The subcommand path of an argument list: the words before the first option."""
    return words[: next((i for i, w in enumerate(words) if w.startswith("-") or w == "..."), len(words))]


def expand(words: list[str], history: list[list[str]]) -> list[str]:
    """`ep CMD --a ... --b`: the previous `ep CMD` line's arguments, then `--a --b` (later
    values of an option win, as click reads them)."""
    if "..." not in words:
        return words
    cmd = command(words)
    extra = [w for w in words[len(cmd):] if w != "..."]
    for earlier in reversed(history):
        if command(earlier) == cmd:
            return earlier + extra
    raise AssertionError(f"{shlex.join(words)}: no earlier `ep {shlex.join(cmd)}` line to repeat")


def skip_reason(line: str) -> str | None:
    return next((why for pattern, why in SKIP.items() if re.search(pattern, line)), None)


def run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=True)


def make_model(folder: Path, tokenizer, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def workdir(tmp_path, tiny_tokenizer, monkeypatch):
    """A working folder with the tiny Gemma as data/models/tiny/{base,sft}, the user's files
    and the SETUP lines run."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    for seed, checkpoint in enumerate(("base", "sft")):
        make_model(tmp_path / "data" / "models" / "tiny" / checkpoint, tokenizer, seed)
    for name, text in USER_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    for line in SETUP:
        result = run(shlex.split(line)[1:])
        assert result.exit_code == 0, f"setup {line}\n{result.output}"
    return tmp_path


def test_readme_parsing():
    text = "\n".join([
        "```bash", "ep build --model gemma-3-270m --layer 6 \\", "    --percentile 1   # a comment",
        "# ep store ls", "pip install x", "ep build ... --max-tokens 50000", "ep eval ood --dictionary KEY --out DIR",
        "ep sql \"SELECT '#' AS x\"", "```", "```python", "ep not bash", "```"])
    lines = readme_lines(text)
    assert lines == ["ep build --model gemma-3-270m --layer 6 --percentile 1", "ep build ... --max-tokens 50000",
                     "ep eval ood --dictionary KEY --out DIR", "ep sql 'SELECT '\"'\"'#'\"'\"' AS x'"]
    words = [shlex.split(adapt(line))[1:] for line in lines]
    assert words[0] == ["build", "--model", "tiny", "--layer", "6", "--percentile", "1"]
    assert expand(words[1], words[:1]) == [*words[0], "--max-tokens", "50000"]
    assert words[2] == ["eval", "ood", "--dictionary", "tiny/base/L6/p1", "--out", "data/reports/evals/readme"]
    assert words[3] == ["sql", "SELECT '#' AS x"]


def test_an_option_that_does_not_exist_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [line] = readme_lines("```bash\nep store ls --store data/store --no-such-option\n```")
    result = run(shlex.split(adapt(line))[1:])
    assert result.exit_code == 2 and "no-such-option" in result.output


def test_every_readme_command_runs(workdir):
    lines = readme_lines((ROOT / "README.md").read_text())
    assert len(lines) > 20, "README.md's ```bash blocks hold the ep examples"
    history: list[list[str]] = []
    ran, skipped, used = [], [], set()
    for line in lines:
        if skip_reason(line) is not None:
            skipped.append(line)
            used.update(p for p in SKIP if re.search(p, line))
            continue
        words = expand(shlex.split(adapt(line))[1:], history)
        history.append(words)
        result = run(words)
        assert result.exit_code == 0, f"README line failed ({result.exit_code}): {line}\nran: ep " \
                                      f"{shlex.join(words)}\n{result.output[-3000:]}"
        ran.append(line)
    assert set(SKIP) == used, f"SKIP entries that match no README line: {set(SKIP) - used}"
    assert len(ran) + len(skipped) == len(lines)
