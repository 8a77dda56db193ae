"""Greedy generation with optional interventions (issue 9): ``ep generate``.

    ep generate --model gemma-3-270m --checkpoint sft --prompts prompts.txt --chat \\
        --max-new-tokens 48 --ablate gemma-3-270m/sft/L6/p1:12,40 --out gen.jsonl

Prompts come from a ``.txt`` file (one per line, split on ``\\n`` only) or a ``.jsonl``,
``.csv`` or ``.parquet`` file (a ``prompt`` or ``instruction`` field, or ``--text-field``),
read by ep_store.stages.readers. ``--chat`` wraps each in the model's chat template with the
generation prompt; a tokenizer without a template but with Gemma's turn tokens (our
fine-tuned Gemma, whose tokenizer comes from the GGUF base and carries no template) gets
the Gemma turn format the fine-tune trained on (ep_store.stages.prompts). Decoding is greedy, in
left-padded batches, and stops at EOS or an end-of-turn token. ``--ablate KEY:IDS`` and
``--steer KEY:REGION=ALPHA`` (repeatable) hook the output of the dictionary's layer
(ep_store.studies.intervene). The output is one JSON line per prompt: prompt, completion, refused
(ep_store.stages.refusal_classifier), written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ep_store import jsonio
from ep_store.errors import UsageError, check_output_file
from ep_store.stages import models, prompts, readers
from ep_store.stages.corpus import encode, encode_turn, special_prefix
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.refusal_classifier import is_refusal
from ep_store.store.core import Store
from ep_store.studies.intervene import (
    BASES,
    Edit,
    ablation,
    check_edits,
    intervene,
    steering,
    steering_scale,
)

log = logging.getLogger(__name__)

@dataclass
class GenerateConfig:
    model: str
    """Model name (local folder under the models dir, or a hub id)."""
    checkpoint: str
    """Checkpoint (local sub-folder or hub revision)."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    prompts: Path
    """A .txt file (one prompt per line) or a .jsonl/.csv/.parquet file (one prompt per row)."""
    out: Path
    """Output .jsonl: one line per prompt with prompt, completion, refused."""
    chat: bool = False
    """Wrap prompts in the model's chat template (Gemma turn format for our Gemma checkpoints)."""
    text_field: str | None = None
    """Field holding the prompt in .jsonl/.csv/.parquet rows; None: ``prompt``, else ``instruction``."""
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
def read_prompts(path: Path, text_field: str | None = None) -> list[str]:
    """Prompts of a file, read by ep_store.stages.readers (issue 18, B5): a .txt file holds one prompt
    per line (split on ``\\n`` only: U+2028/U+2029/U+0085 stay inside a prompt); a .jsonl, .csv
    or .parquet row holds one in ``text_field`` (default: its ``prompt`` field, else
    ``instruction``). Empty and whitespace-only prompts are skipped (counted in a warning).
    UsageError when the file is unreadable, lacks the field, or holds no prompt."""
    fields = (text_field,) if text_field else ("prompt", "instruction")
    found = [row.text for row in readers.read_texts(path, fields, txt="lines", what="prompts file")]
    if not found:
        raise UsageError(f"prompts file {path} holds no prompts")
    return found


def prompt_ids(tokenizer, texts: list[str], chat: bool) -> list[list[int]]:
    """Model input ids of each prompt: the tokenizer's BOS convention and the text, or with
    ``chat`` the chat format around it. The prompt is text either way: special-token strings
    a user typed (``<bos>``, ``<start_of_turn>``, ``<|im_start|>``) stay characters, as in
    a harvest (ep_store.stages.corpus)."""
    if not chat:
        prefix = special_prefix(tokenizer)
        return [prefix + encode(tokenizer, t)[0] for t in texts]
    before, after = prompts.chat_frame(tokenizer)
    return [encode_turn(tokenizer, before, t, after) for t in texts]


def stop_ids(tokenizer, net) -> list[int]:
    """EOS ids of the model plus any end-of-turn token in its vocabulary."""
    ids = net.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in prompts.STOP_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


# -- generation -----------------------------------------------------------------------------------
def check_positions(net, inputs: list[list[int]], max_new_tokens: int) -> None:
    """Refuse (UsageError) a longest prompt plus ``max_new_tokens`` beyond the model's position
    table, before generating: past it a model errors or degrades, and a huge value would run
    for hours (the model limits of issue 8, as ``ep harvest --ctx``)."""
    positions = models.max_positions(net.config)
    if positions is None or not inputs:
        return
    longest = max(len(ids) for ids in inputs)
    if longest >= positions:
        raise UsageError(f"a prompt has {longest} tokens and the model {positions} positions: shorten the prompt "
                         "(nothing would be left to generate)")
    if longest + max_new_tokens > positions:
        raise UsageError(f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt has {longest} tokens and "
                         f"the model {positions} positions, so at most --max-new-tokens {max(positions - longest, 0)}")


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T): ``rows`` right-aligned, padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def greedy_tokens(net, tokenizer, inputs: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                  progress: bool = False, desc: str = "generate") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of greedy decoding of each prompt's ids (prompt_ids) in
    left-padded batches; the completion ends before the first stop token (EOS or end of turn)."""
    check_positions(net, inputs, max_new_tokens)
    stops = stop_ids(tokenizer, net)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(net.parameters()).device
    out: list[tuple[list[int], list[int]]] = []
    with tqdm(total=len(inputs), unit="prompt", desc=desc, disable=not progress) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            ids, mask = left_padded(chunk, pad)
            new = net.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad, eos_token_id=stops, top_p=None, top_k=None,
                               temperature=None)
            for prompt, row in zip(chunk, new[:, ids.shape[1]:].tolist()):
                cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
                out.append((list(prompt), row[:cut]))
            bar.update(len(chunk))
    return out


def greedy(net, tokenizer, inputs: list[list[int]], max_new_tokens: int, batch_size: int = 16,
           progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy completions of ``inputs`` (prompt ids) as text (see ``greedy_tokens``)."""
    pairs = greedy_tokens(net, tokenizer, inputs, max_new_tokens, batch_size, progress, desc)
    return [tokenizer.decode(completion, skip_special_tokens=True) for _, completion in pairs]


def generate(cfg: GenerateConfig, store: Store, models_dir: Path, progress: bool = True) -> dict:
    """Generate for every prompt of ``cfg.prompts`` under the edits; write ``cfg.out``; the summary."""
    texts = read_prompts(cfg.prompts, cfg.text_field)
    edits = build_edits(cfg, store)
    config = models.load_config(cfg.model, cfg.checkpoint, models_dir)
    check_edits(config, edits)  # layer and width checks before loading weights
    models.resolve_device(cfg.device)
    net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
    inputs = prompt_ids(tokenizer, texts, cfg.chat)
    start = time.perf_counter()
    with intervene(net, edits):
        completions = greedy(net, tokenizer, inputs, cfg.max_new_tokens, cfg.batch_size, progress)
    seconds = time.perf_counter() - start
    rows = [{"prompt": p, "completion": c, "refused": is_refusal(c)} for p, c in zip(texts, completions)]
    jsonio.write_lines(cfg.out, rows)
    refused = sum(r["refused"] for r in rows)
    return {"out": str(cfg.out), "prompts": len(rows), "refused": refused,
            "refusal_rate": round(refused / len(rows), 4), "edits": [e.label for e in edits],
            "seconds": round(seconds, 3),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
