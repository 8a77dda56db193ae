"""The refusal study's data (issue 9; ep_store.studies.refusal runs the study): the training-side
and held-out prompt sets, chat-formatted for the model, and the study's dictionaries, harvested
from the training prompts and built with the library's own harvest and build in the work store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.stages import prompts
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.corpus import encode
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store.core import Store
from ep_store.studies.generate import prompt_ids

if TYPE_CHECKING:
    from ep_store.studies.refusal import RefusalConfig


@dataclass
class Prompts:
    """Chat-formatted model inputs of one prompt set, with the harmful flag of each."""

    texts: list[str]
    inputs: list[list[int]]
    """Model input ids (generate.prompt_ids with chat)."""
    harmful: list[bool]


def select(rows: list[dict], n_harmful: int, n_benign: int, name: str) -> list[dict]:
    """The first n harmful and first n benign rows, in file order."""
    harmful = [r for r in rows if r["harmful"]]
    benign = [r for r in rows if not r["harmful"]]
    if n_harmful > len(harmful) or n_benign > len(benign):
        raise UsageError(f"{name} has {len(harmful)} harmful and {len(benign)} benign prompts; "
                         f"asked for {n_harmful} and {n_benign}")
    return harmful[:n_harmful] + benign[:n_benign]


def prompt_sets(cfg: RefusalConfig, tokenizer) -> tuple[Prompts, Prompts]:
    """(training-side prompts, held-out prompts), chat-formatted for the model."""
    sets = []
    for name, nh, nb in (("train", cfg.train_harmful, cfg.train_benign),
                         ("heldout", cfg.heldout_harmful, cfg.heldout_benign)):
        rows = select(prompts.load(name), nh, nb, f"ep_store/stages/data/chat_{name}.jsonl")
        texts = [r["prompt"] for r in rows]
        sets.append(Prompts(texts, prompt_ids(tokenizer, texts, chat=True), [bool(r["harmful"]) for r in rows]))
    return sets[0], sets[1]


class StudyCorpus(NamedTuple):
    """How the study harvests its training prompts."""

    documents: list[str]
    """The prompts in the model's chat format, less the template's BOS (doc_id = prompt index)."""
    bos: str
    """The harvest's BOS policy: always where the template starts with the BOS, else never."""
    chat: bool
    """Harvest as a ``chat:`` corpus (Gemma's turn markers as control tokens)."""


def harvest_documents(tokenizer, train: Prompts) -> StudyCorpus:
    """The training prompts as documents whose harvest stores the very tokens generation
    starts from (checked prompt by prompt), the template's BOS left to the harvester. A
    Gemma-format tokenizer's documents are a ``chat:`` corpus; another template's must encode
    as plain text. UsageError if a prompt would be harvested otherwise than generated."""
    before, after = prompts.chat_frame(tokenizer)
    chat = prompts.has_gemma_turns(tokenizer)
    bos = tokenizer.bos_token
    policy, prefix = "never", []
    if bos and before.startswith(bos):
        policy, prefix, before = "always", [tokenizer.bos_token_id], before[len(bos):]
    docs = [before + t + after for t in train.texts]
    for doc, ids in zip(docs, train.inputs):
        if prefix + encode(tokenizer, doc, chat=chat)[0] != ids:
            raise UsageError(f"prompt {doc!r} of {tokenizer.name_or_path} does not harvest as the tokens generation "
                             "sees (a typed turn marker, or a chat format other than Gemma's turns); remove the "
                             "marker or run the study on a Gemma-format model")
    return StudyCorpus(docs, policy, chat)


def prompt_batch_rows(lengths: list[int], prompts_per_batch: int) -> int:
    """Rows in a batch of ``prompts_per_batch`` prompts of mean length (at least 2: theta is a
    percentile of pairs within a batch). Our build cuts batches by rows, the authors' by prompts."""
    return max(2, round(prompts_per_batch * sum(lengths) / len(lengths)))


def build_dictionaries(cfg: RefusalConfig, work: Store, train: Prompts, tokenizer, models_dir: Path,
                       progress: bool) -> list[DictionaryKey]:
    """Harvest the training prompts (all positions, chat-formatted, BOS left out as always) and
    build one dictionary per (layer, percentile) on them, with the library's own functions."""
    corpus = work.root / "prompts" / "train.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    study = harvest_documents(tokenizer, train)
    jsonio.write_lines(corpus, [{"text": d} for d in study.documents])
    lengths = [len(ids) - (study.bos == "always") for ids in train.inputs]
    spec = f"chat:{corpus}" if study.chat else str(corpus)
    harvest(HarvestConfig(cfg.model, cfg.checkpoint, cfg.layers, corpus=spec, max_tokens=sum(lengths), ctx=max(lengths),
                          batch_size=32, device=cfg.device, dtype=cfg.dtype, overwrite=True, bos=study.bos),
            work, models_dir, progress)
    sizes = {"calibration_batch": cfg.calibration_batch}  # and the build's 2,048-row batches (ours)
    if cfg.batch_prompts is not None:  # the paper's: batches of 16 prompts' tokens (issue 22)
        rows = prompt_batch_rows(lengths, cfg.batch_prompts)
        sizes = {"calibration_batch": rows, "batch_size": rows}
    keys = []
    for layer in cfg.layers:
        for p in cfg.percentiles:
            build(BuildConfig(cfg.model, cfg.checkpoint, layer, p, **sizes, saturation_window=cfg.saturation_window or 10**9,
                              skip_nonfinite=True, overwrite=True, device=cfg.device),
                  work, assign=True, progress=progress)
            keys.append(DictionaryKey(cfg.model, cfg.checkpoint, layer, p))
    return keys
