"""Greedy generation with optional interventions (issue 9): ``ep generate``.

    ep generate --model gemma-3-270m --checkpoint sft --prompts prompts.txt --chat \\
        --max-new-tokens 48 --ablate gemma-3-270m/sft/L6/p1:12,40 --out gen.jsonl

Prompts come from a ``.txt`` file (one per line) or ``.jsonl`` (a ``prompt`` or
``instruction`` field). ``--chat`` wraps each in the model's chat template with the
generation prompt; a tokenizer without a template but with Gemma's turn tokens (our
fine-tuned Gemma, whose tokenizer comes from the GGUF base and carries no template) gets
the Gemma turn format the fine-tune trained on (ep_store.prompts). Decoding is greedy, in
left-padded batches, and stops at EOS or an end-of-turn token. ``--ablate KEY:IDS`` and
``--steer KEY:REGION=ALPHA`` (repeatable) hook the output of the dictionary's layer
(ep_store.intervene). The output is one JSON line per prompt: prompt, completion, refused
(ep_store.refusal_classifier), written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ep_store import jsonio, models, prompts
from ep_store.dictionary import Dictionary
from ep_store.errors import UsageError, check_output_file
from ep_store.intervene import (
    BASES,
    Edit,
    ablation,
    check_edits,
    intervene,
    steering,
    steering_scale,
)
from ep_store.refusal_classifier import is_refusal
from ep_store.store import Store

log = logging.getLogger(__name__)

STOP_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")
"""End-of-turn tokens that end a completion besides the model's EOS, where the vocabulary has them."""


@dataclass
class GenerateConfig:
    model: str
    """Model name (local folder under the models dir, or a hub id)."""
    checkpoint: str
    """Checkpoint (local sub-folder or hub revision)."""
    prompts: Path
    """A .txt file (one prompt per line) or .jsonl file (a prompt or instruction field)."""
    out: Path
    """Output .jsonl: one line per prompt with prompt, completion, refused."""
    chat: bool = False
    """Wrap prompts in the model's chat template (Gemma turn format for our Gemma checkpoints)."""
    max_new_tokens: int = 48
    """Tokens generated per prompt at most (greedy)."""
    batch_size: int = 16
    """Prompts per generate call (left-padded)."""
    ablate: tuple[str, ...] = ()
    """Ablations, each KEY:ID[,ID...] with KEY a dictionary key (one edit per spec)."""
    steer: tuple[str, ...] = ()
    """Steering edits, each KEY:REGION=ALPHA, alpha in units of the layer's median |a - c|."""
    basis: str = "exemplar"
    """Region direction: exemplar or mean (the region's mean-member direction)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "float32"
    """Compute dtype of the model (edits run in it too)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UsageError("--max-new-tokens and --batch-size must be at least 1")
        if self.basis not in BASES:
            raise UsageError(f"unknown basis {self.basis!r}; use {' or '.join(BASES)}")
        if self.dtype not in models.DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(models.DTYPES)}")
        check_output_file(self.out, "--out")
        self.ablate = tuple(self.ablate)
        self.steer = tuple(self.steer)
        for spec in self.ablate:
            parse_ablate(spec)
        for spec in self.steer:
            parse_steer(spec)


# -- option parsing -------------------------------------------------------------------------------
def _split_spec(spec: str, option: str, form: str) -> tuple[str, str]:
    key, sep, rest = spec.rpartition(":")
    if not sep or not key or not rest:
        raise UsageError(f"{option} {spec!r}: expected {form}")
    return key, rest


def parse_ablate(spec: str) -> tuple[str, list[int]]:
    """'KEY:12,40' -> (KEY, [12, 40])."""
    key, ids = _split_spec(spec, "--ablate", "KEY:ID[,ID...], e.g. gemma-3-270m/sft/L6/p1:12,40")
    try:
        return key, [int(x) for x in ids.split(",")]
    except ValueError:
        raise UsageError(f"--ablate {spec!r}: region ids must be integers, e.g. {key}:12,40") from None


def parse_steer(spec: str) -> tuple[str, int, float]:
    """'KEY:12=4' -> (KEY, 12, 4.0)."""
    key, rest = _split_spec(spec, "--steer", "KEY:REGION=ALPHA, e.g. gemma-3-270m/sft/L6/p1:12=4")
    region, sep, alpha = rest.partition("=")
    try:
        region_id = int(region)
    except ValueError:
        raise UsageError(f"--steer {spec!r}: the region id must be an integer") from None
    try:
        value = float(alpha) if sep else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"--steer {spec!r}: alpha must be a finite number, e.g. {key}:{region_id}=4")
    return key, region_id, value


def build_edits(cfg: GenerateConfig, store: Store) -> list[Edit]:
    """The Edit of every --ablate and --steer spec (dictionaries loaded once each)."""
    loaded: dict[str, Dictionary] = {}

    def get(key: str) -> Dictionary:
        if key not in loaded:
            loaded[key] = Dictionary.load(store, key)
        return loaded[key]

    edits = [ablation(get(key), ids, cfg.basis) for key, ids in map(parse_ablate, cfg.ablate)]
    for key, region, alpha in map(parse_steer, cfg.steer):
        d = get(key)
        edits.append(steering(d, region, alpha, steering_scale(store, d), cfg.basis))
    return edits


# -- prompts --------------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[str]:
    """Prompts of a .txt (non-blank lines) or .jsonl (prompt or instruction field) file."""
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"prompts file {path} is not UTF-8 text: {err}") from None
    if suffix == ".txt":
        found = [line for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        found = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{i} is not JSON: {err}") from None
            value = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise UsageError(f"{path}:{i} has no string 'prompt' or 'instruction' field")
            found.append(value)
    else:
        raise UsageError(f"prompts file {path} is not .txt or .jsonl")
    if not found:
        raise UsageError(f"prompts file {path} holds no prompts")
    return found


def has_gemma_turns(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return "<start_of_turn>" in vocab and "<end_of_turn>" in vocab


def format_prompts(tokenizer, texts: list[str], chat: bool) -> tuple[list[str], bool]:
    """(model inputs as text, whether the tokenizer should add special tokens itself)."""
    if not chat:
        return texts, True
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in texts], False
    if has_gemma_turns(tokenizer):
        bos = tokenizer.bos_token or ""
        return [bos + prompts.prompt_text(t) for t in texts], False
    raise UsageError("--chat: this tokenizer has no chat template and no Gemma turn tokens; drop --chat")


def stop_ids(tokenizer, net) -> list[int]:
    """EOS ids of the model plus any end-of-turn token in its vocabulary."""
    ids = net.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in STOP_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


# -- generation -----------------------------------------------------------------------------------
@torch.no_grad()
def check_positions(net, tokenizer, inputs: list[str], max_new_tokens: int, add_special_tokens: bool = True) -> None:
    """Refuse (UsageError) a longest prompt plus ``max_new_tokens`` beyond the model's position
    table, before generating: past it a model errors or degrades, and a huge value would run
    for hours (the model limits of issue 8, as ``ep harvest --ctx``)."""
    positions = models.max_positions(net.config)
    if positions is None or not inputs:
        return
    longest = max(len(ids) for ids in tokenizer(inputs, add_special_tokens=add_special_tokens)["input_ids"])
    if longest + max_new_tokens > positions:
        raise UsageError(f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt has {longest} tokens and "
                         f"the model {positions} positions, so at most --max-new-tokens {max(positions - longest, 0)}")


def greedy_tokens(net, tokenizer, inputs: list[str], max_new_tokens: int, batch_size: int = 16,
                  add_special_tokens: bool = True, progress: bool = False,
                  desc: str = "generate") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of greedy decoding in left-padded batches; the completion
    ends before the first stop token (EOS or end of turn)."""
    check_positions(net, tokenizer, inputs, max_new_tokens, add_special_tokens)
    stops = stop_ids(tokenizer, net)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(net.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[tuple[list[int], list[int]]] = []
    bar = tqdm(total=len(inputs), unit="prompt", desc=desc, disable=not progress)
    try:
        for start in range(0, len(inputs), batch_size):
            enc = tokenizer(inputs[start : start + batch_size], add_special_tokens=add_special_tokens,
                            return_tensors="pt", padding=True).to(device)
            new = net.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                               eos_token_id=stops, top_p=None, top_k=None, temperature=None)
            width = enc["input_ids"].shape[1]
            for ids, mask, row in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(),
                                      new[:, width:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                out.append(([t for t, m in zip(ids, mask) if m], row[:cut]))
            bar.update(len(enc["input_ids"]))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return out


def greedy(net, tokenizer, inputs: list[str], max_new_tokens: int, batch_size: int = 16,
           add_special_tokens: bool = True, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy completions of ``inputs`` as text (see ``greedy_tokens``)."""
    pairs = greedy_tokens(net, tokenizer, inputs, max_new_tokens, batch_size, add_special_tokens, progress, desc)
    return [tokenizer.decode(completion, skip_special_tokens=True) for _, completion in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(jsonio.dumps(row) + "\n")
    tmp.replace(path)


def generate(cfg: GenerateConfig, store: Store, models_dir: Path, progress: bool = True) -> dict:
    """Generate for every prompt of ``cfg.prompts`` under the edits; write ``cfg.out``; the summary."""
    texts = read_prompts(cfg.prompts)
    edits = build_edits(cfg, store)
    config = models.load_config(cfg.model, cfg.checkpoint, models_dir)
    check_edits(config, edits)  # layer and width checks before loading weights
    models.resolve_device(cfg.device)
    net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
    inputs, special = format_prompts(tokenizer, texts, cfg.chat)
    start = time.perf_counter()
    with intervene(net, edits):
        completions = greedy(net, tokenizer, inputs, cfg.max_new_tokens, cfg.batch_size, special, progress)
    seconds = time.perf_counter() - start
    rows = [{"prompt": p, "completion": c, "refused": is_refusal(c)} for p, c in zip(texts, completions)]
    write_jsonl(cfg.out, rows)
    refused = sum(r["refused"] for r in rows)
    return {"out": str(cfg.out), "prompts": len(rows), "refused": refused,
            "refusal_rate": round(refused / len(rows), 4), "edits": [e.label for e in edits],
            "seconds": round(seconds, 3),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
