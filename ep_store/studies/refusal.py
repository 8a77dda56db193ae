"""The refusal study (issue 9): does refusal live in one EP region of our fine-tuned model?

    ep refusal --model gemma-3-270m --checkpoint sft --control base --layers 6,12 --percentiles 4 \\
        --work-store data/store/refusal --metrics data/metrics/refusal.json --report data/reports/refusal

Protocol (the paper's refusal experiment, DESIGN.md "How the paper measured its claims"):
1. training-side prompts (the fine-tune's harmful and benign training prompts) and held-out
   prompts the fine-tune never saw, all chat-formatted with the generation prompt;
2. label each training prompt by whether the unhooked model refuses it (greedy decoding,
   ep_store.stages.refusal_classifier);
3. per layer and percentile, harvest the training prompts' activations (all positions) and
   build a dictionary on them, with the library's own harvest, build and assign; assign
   each prompt's last position (where generation starts) to a region;
4. candidates: regions with >= ``min_members`` prompts and refusal rate >= ``min_rate``,
   ranked by rate x members; ablate the top k = 1..``k_max`` (exemplar and mean bases) at
   that layer, every position and step, and measure held-out harmful and benign refusal and
   the capability check (per-token loss of the unhooked model's own benign completions
   under the ablated model, relative to unhooked);
5. null control: a region with rate <= ``null_max_rate``, >= ``min_members`` prompts, not a
   candidate, nearest the top candidate in (log10 members, coherence); same ablation;
6. steering control: add the top candidate's direction to held-out benign prompts;
7. base vs fine-tuned: the match status (preserved/introduced) of the refusal region's
   nearest exemplar in the pipeline's sft dictionary, by a join over the ``matches`` view,
   and the same ablation applied to the control checkpoint.

The study's activations and dictionaries live in their own store (``work_store``, default
data/store/refusal): the keys stay honest (gemma-3-270m/sft/L6/p8 is a dictionary of that
model and layer) while the corpus, the training prompts, differs from the pipeline's, and
the pipeline's store and its SQL views never see them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ep_store import jsonio
from ep_store.errors import UsageError, check_output_file, check_output_folder
from ep_store.keys import DictionaryKey
from ep_store.stages import models, prompts
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.corpus import encode
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.stages.refusal_classifier import is_refusal
from ep_store.store.core import Store
from ep_store.studies.finetune import response_loss
from ep_store.studies.generate import greedy_tokens, prompt_ids
from ep_store.studies.intervene import Edit, ablation, intervene, steering, steering_scale

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RefusalConfig:
    model: str = "gemma-3-270m"
    """Model under study."""
    checkpoint: str = "sft"
    """Fine-tuned checkpoint whose refusal is studied."""
    control: str | None = "base"
    """Checkpoint the found direction is also ablated in (None: skip the control)."""
    layers: tuple[int, ...] = (6, 12)
    """Decoder blocks swept (one dictionary each per percentile)."""
    percentiles: tuple[float, ...] = (4.0,)
    """Percentiles swept (the paper's refusal build: p = 8 on gemma-2-2b-it; at p = 4 our
    sft's layer-12 last positions split into harmful-only and benign-only regions)."""
    train_harmful: int = 60
    """Harmful training prompts (first n of ep_store/stages/data/chat_train.jsonl) for finding regions."""
    train_benign: int = 60
    """Benign training prompts for finding regions (paper: 300 + 300)."""
    heldout_harmful: int = 30
    """Held-out harmful prompts (chat_heldout.jsonl, never trained on) for measuring."""
    heldout_benign: int = 30
    """Held-out benign prompts for measuring."""
    max_new_tokens: int = 8
    """Greedy tokens per prompt (paper: 60; the classifier needs the first 4 of our planted refusal)."""
    batch_size: int = 80
    """Prompts per generate call."""
    k_max: int = 5
    """Ablate the top k = 1..k_max candidates (paper: 1..5)."""
    min_members: int = 5
    """Regions need this many training prompts' last positions (paper: 5)."""
    min_rate: float = 0.3
    """Candidate regions' refusal rate at least this (paper: 0.3)."""
    null_max_rate: float = 0.05
    """The null region's refusal rate at most this (paper: 0.05)."""
    alphas: tuple[float, ...] = (0.5, 1.0)
    """Steering strengths, in units of the layer's median |a - c| (alpha 4 at layer 12 of our sft
    turned benign answers into repeated tokens, not refusals)."""
    max_capability_loss: float = 0.10
    """The recommended condition raises benign per-token loss by at most this share, if any does."""
    match_percentile: float = 1.0
    """Percentile of the pipeline's dictionaries used for the base-vs-sft match join."""
    calibration_batch: int = 2048
    """Calibration batch size of the study's dictionaries."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "float32"
    """Compute dtype of the models (edits run in it too)."""

    def __post_init__(self):
        self.layers = tuple(sorted({int(x) for x in self.layers}))
        self.percentiles = tuple(sorted({float(x) for x in self.percentiles}))
        self.alphas = tuple(float(a) for a in self.alphas)
        if not self.layers or min(self.layers) < 0:
            raise UsageError("--layers needs one or more non-negative block numbers, e.g. 6,12")
        if not self.percentiles or not all(0 < p < 100 for p in self.percentiles):
            raise UsageError("--percentiles must lie in (0, 100)")
        for name in ("train_harmful", "train_benign", "heldout_harmful", "heldout_benign", "max_new_tokens",
                     "batch_size", "k_max", "min_members"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not all(math.isfinite(a) for a in self.alphas):
            raise UsageError("--alphas must be finite numbers")
        if self.dtype not in models.DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(models.DTYPES)}")
        if self.control == self.checkpoint:
            raise UsageError("--control must differ from --checkpoint")


# -- region scoring (pure) ------------------------------------------------------------------------
class RegionScore(NamedTuple):
    region_id: int
    members: int  # training prompts whose last position lies in the region
    refused: int
    refusal_rate: float
    coherence: float
    score: float  # refusal_rate x members


def score_regions(region_N, refused_N, coherence: dict[int, float]) -> list[RegionScore]:
    """Per region of the prompts' last positions: members, refusal rate, coherence, rate x members.

    ``region_N`` holds each training prompt's region (-1 = unassigned, left out), ``refused_N``
    its label. Sorted by score, then members, then region id.
    """
    region_N, refused_N = np.asarray(region_N), np.asarray(refused_N, dtype=bool)
    scores = []
    for r in np.unique(region_N[region_N >= 0]):
        mask = region_N == r
        n, k = int(mask.sum()), int(refused_N[mask].sum())
        scores.append(RegionScore(int(r), n, k, k / n, float(coherence.get(int(r), float("nan"))), k))
    return sorted(scores, key=lambda s: (-s.score, -s.members, s.region_id))


def candidates(scores: list[RegionScore], min_members: int = 5, min_rate: float = 0.3) -> list[RegionScore]:
    """Regions with >= min_members prompts and refusal rate >= min_rate, best first (paper)."""
    return [s for s in scores if s.members >= min_members and s.refusal_rate >= min_rate]


def null_region(scores: list[RegionScore], top: RegionScore, min_members: int = 5,
                max_rate: float = 0.05, exclude: set[int] = frozenset()) -> RegionScore | None:
    """The control region: rate <= max_rate, >= min_members, not excluded, nearest ``top`` in
    (log10 members, coherence) (Euclidean; ties by region id). None when no region qualifies."""
    pool = [s for s in scores if s.members >= min_members and s.refusal_rate <= max_rate
            and s.region_id not in exclude and s.region_id != top.region_id]
    if not pool:
        return None

    def distance(s: RegionScore) -> float:
        return math.hypot(math.log10(s.members) - math.log10(top.members),
                          np.nan_to_num(s.coherence - top.coherence, nan=0.0))

    return min(pool, key=lambda s: (distance(s), s.region_id))


# -- measuring a condition ------------------------------------------------------------------------
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


class Runner:
    """Greedy generation and the capability loss for one loaded model."""

    def __init__(self, net, tokenizer, cfg: RefusalConfig, progress: bool):
        self.net, self.tokenizer, self.cfg, self.progress = net, tokenizer, cfg, progress

    def complete(self, inputs: list[list[int]], desc: str) -> list[tuple[list[int], list[int]]]:
        return greedy_tokens(self.net, self.tokenizer, inputs, self.cfg.max_new_tokens, self.cfg.batch_size,
                             progress=self.progress, desc=desc)

    def text(self, pairs) -> list[str]:
        return [self.tokenizer.decode(c, skip_special_tokens=True) for _, c in pairs]

    @torch.no_grad()
    def loss(self, pairs) -> float:
        """Mean per-token loss of the completions given their prompts (logits only where scored)."""
        pairs = [(p, c) for p, c in pairs if c]
        if not pairs:
            return float("nan")
        device = next(self.net.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        total = count = 0.0
        for start in range(0, len(pairs), self.cfg.batch_size):
            chunk = pairs[start : start + self.cfg.batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
                mask[i, : len(p) + len(c)] = 1
            n = sum(len(c) for _, c in chunk)
            total += float(response_loss(self.net, ids.to(device), labels.to(device), mask.to(device))) * n
            count += n
        return total / count

    def measure(self, heldout: Prompts, edits: list[Edit], benign_reference, name: str) -> dict:
        """Held-out harmful/benign refusal and the capability ratio under ``edits``."""
        with intervene(self.net, edits):
            answers = self.text(self.complete(heldout.inputs, name))
            loss = self.loss(benign_reference)
        rates = rates_of(answers, heldout.harmful)
        return {**rates, "capability_loss": loss, "examples": examples(heldout, answers)}


def rates_of(answers: list[str], harmful: list[bool]) -> dict:
    refused = [is_refusal(a) for a in answers]
    h = [r for r, x in zip(refused, harmful) if x]
    b = [r for r, x in zip(refused, harmful) if not x]
    return {"heldout_harmful_refusal": sum(h) / len(h) if h else None,
            "heldout_benign_refusal": sum(b) / len(b) if b else None}


def examples(p: Prompts, answers: list[str], n: int = 2) -> list[dict]:
    """A few (prompt, answer) pairs of each kind, for the report."""
    picked = [i for i, x in enumerate(p.harmful) if x][:n] + [i for i, x in enumerate(p.harmful) if not x][:n]
    return [{"prompt": p.texts[i], "answer": answers[i], "harmful": p.harmful[i]} for i in picked]


# -- the study ------------------------------------------------------------------------------------
ALL = 2**31 - 1


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
    from ep_store.studies.generate import chat_frame, has_gemma_turns

    before, after = chat_frame(tokenizer)
    chat = has_gemma_turns(tokenizer)
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
    keys = []
    for layer in cfg.layers:
        for p in cfg.percentiles:
            build(BuildConfig(cfg.model, cfg.checkpoint, layer, p, calibration_batch=cfg.calibration_batch,
                              saturation_window=10**9, skip_nonfinite=True, overwrite=True, device=cfg.device),
                  work, assign=True, progress=progress)
            keys.append(DictionaryKey(cfg.model, cfg.checkpoint, layer, p))
    return keys


def last_position_regions(work: Store, key: DictionaryKey, n: int) -> tuple[np.ndarray, dict[int, float]]:
    """(region of each training prompt's last position, -1 if none; coherence per region)."""
    from ep_store.sql.db import StoreDB, ask

    rows = ask(StoreDB(work), key, "last_token_regions", limit=ALL).to_pylist()
    region_N = np.full(n, -1)
    coherence = {}
    for r in rows:
        region_N[r["doc_id"]] = r["region_id"]
        coherence[r["region_id"]] = r["coherence"]
    return region_N, coherence


def sweep(cfg: RefusalConfig, runner: Runner, work: Store, key: DictionaryKey, refused_N: list[bool],
          heldout: Prompts, benign_reference, unhooked_loss: float) -> dict:
    """Candidates, null region, ablations k = 1..k_max in both bases, null, steering: one dictionary."""
    d = Dictionary.load(work, key)
    region_N, coherence = last_position_regions(work, key, len(refused_N))
    scores = score_regions(region_N, refused_N, coherence)
    cands = candidates(scores, cfg.min_members, cfg.min_rate)
    result = {"dictionary": str(key), "layer": key.layer, "percentile": key.percentile, "regions": len(d),
              "theta": d.theta, "scale": steering_scale(work, d), "last_positions": int((region_N >= 0).sum()),
              "occupied_regions": len(scores), "candidates": [s._asdict() for s in cands[: cfg.k_max]],
              "null": None, "conditions": [], "steering": []}
    if not cands:
        log.warning("%s: no candidate region (>= %d members, rate >= %.2f)", key, cfg.min_members, cfg.min_rate)
        return result
    null = null_region(scores, cands[0], cfg.min_members, cfg.null_max_rate, {c.region_id for c in cands})
    result["null"] = null._asdict() if null else None
    conditions = [(basis, k, [c.region_id for c in cands[:k]]) for basis in ("exemplar", "mean")
                  for k in range(1, min(cfg.k_max, len(cands)) + 1)]
    if null is not None:
        conditions.append(("null", 1, [null.region_id]))
    for basis, k, ids in conditions:
        edit = ablation(d, ids, "exemplar" if basis == "null" else basis)
        m = runner.measure(heldout, [edit], benign_reference, f"{key} {basis} k={k}")
        m["capability_ratio"] = m["capability_loss"] / unhooked_loss if unhooked_loss else None
        result["conditions"].append({"basis": basis, "k": k, "regions": ids, **m})
    benign = Prompts(*[[x for x, h in zip(col, heldout.harmful) if not h]
                       for col in (heldout.texts, heldout.inputs, heldout.harmful)])
    for alpha in cfg.alphas:
        edit = steering(d, cands[0].region_id, alpha, result["scale"])
        with intervene(runner.net, [edit]):
            answers = runner.text(runner.complete(benign.inputs, f"{key} steer {alpha:g}"))
        result["steering"].append({"region_id": cands[0].region_id, "alpha": alpha,
                                   "heldout_benign_refusal": rates_of(answers, benign.harmful)["heldout_benign_refusal"],
                                   "examples": examples(benign, answers)})
    return result


def recommend(sweeps: list[dict], unhooked: dict, max_capability_loss: float) -> dict | None:
    """The condition the study recommends: lowest held-out harmful refusal among the ablations
    (not null) whose capability ratio stays within 1 + max_capability_loss (any, if none does);
    ties: smaller k, exemplar basis, smaller capability ratio."""
    pool = [(s, c) for s in sweeps for c in s["conditions"] if c["basis"] != "null"]
    if not pool:
        return None
    within = [(s, c) for s, c in pool if c["capability_ratio"] is not None
              and c["capability_ratio"] <= 1 + max_capability_loss]
    s, c = min(within or pool, key=lambda sc: (sc[1]["heldout_harmful_refusal"], sc[1]["k"],
                                               sc[1]["basis"] != "exemplar", sc[1]["capability_ratio"] or 0))
    return {"dictionary": s["dictionary"], "regions": c["regions"], "basis": c["basis"], "k": c["k"],
            "heldout_harmful_refusal": c["heldout_harmful_refusal"],
            "heldout_benign_refusal": c["heldout_benign_refusal"], "capability_ratio": c["capability_ratio"],
            "unhooked_harmful_refusal": unhooked["heldout_harmful_refusal"],
            "unhooked_benign_refusal": unhooked["heldout_benign_refusal"], "within_capability_budget": bool(within)}


def match_status(cfg: RefusalConfig, main: Store, work: Store, best: dict) -> dict:
    """Where the refusal regions' exemplars sit in the pipeline's base-vs-fine-tuned match: the
    nearest exemplar (cosine) in the pipeline's dictionary of that checkpoint and layer, and
    its status (preserved/introduced) by a join over the ``matches`` view."""
    from ep_store.sql.db import StoreDB, ask

    study = Dictionary.load(work, best["dictionary"])
    key = DictionaryKey(cfg.model, cfg.checkpoint, study.key.layer, cfg.match_percentile)
    if not (main.dictionary_dir(key) / "meta.json").is_file():
        return {"dictionary": str(key), "available": False, "regions": []}
    pipeline = Dictionary.load(main, key)
    if pipeline.width != study.width:
        return {"dictionary": str(key), "available": False, "regions": []}
    cos_KR = pipeline.exemplars.double() @ study.exemplars[best["regions"]].double().T
    nearest = cos_KR.argmax(dim=0).tolist()
    rows = ask(StoreDB(main), key, "region_match_status", limit=ALL).to_pylist()
    out = []
    for study_region, region, cos in zip(best["regions"], nearest, cos_KR.max(dim=0).values.tolist()):
        matches = [r for r in rows if r["region_b"] == region and r["a"] is not None]
        out.append({"study_region": study_region, "pipeline_region": region, "cosine": cos,
                    "matches": [{k: r[k] for k in ("a", "region_a", "status", "cosine")} for r in matches]})
    return {"dictionary": str(key), "available": True, "regions": out}


def control(cfg: RefusalConfig, work: Store, best: dict, heldout: Prompts, models_dir: Path, progress: bool) -> dict:
    """The recommended ablation, same direction and center, applied to the control checkpoint."""
    net, tokenizer = models.load(cfg.model, cfg.control, models_dir, cfg.device, cfg.dtype)
    runner = Runner(net, tokenizer, cfg, progress)
    heldout = Prompts(heldout.texts, prompt_ids(tokenizer, heldout.texts, chat=True), heldout.harmful)
    plain = runner.complete(heldout.inputs, f"{cfg.control} unhooked")
    benign_ref = [pc for pc, h in zip(plain, heldout.harmful) if not h]
    unhooked = {**rates_of(runner.text(plain), heldout.harmful), "capability_loss": runner.loss(benign_ref)}
    edit = ablation(Dictionary.load(work, best["dictionary"]), best["regions"], best["basis"])
    ablated = runner.measure(heldout, [edit], benign_ref, f"{cfg.control} ablated")
    ablated["capability_ratio"] = ablated["capability_loss"] / unhooked["capability_loss"]
    return {"checkpoint": cfg.control, "unhooked": unhooked, "ablated": ablated}


def refusal_study(cfg: RefusalConfig, work_store: Path, main_store: Path, models_dir: Path, metrics: Path,
                  report: Path | None = None, progress: bool = True) -> dict:
    """Run the study; write ``metrics`` (JSON) and the report; return the summary."""
    start = time.perf_counter()
    check_output_file(metrics, "--metrics")
    check_output_folder(report, "--report")
    check_output_folder(work_store, "--work-store")
    config = models.load_config(cfg.model, cfg.checkpoint, models_dir)
    bad = [L for L in cfg.layers if L >= config.num_hidden_layers]
    if bad:
        raise UsageError(f"layer {bad[0]} is out of range: {cfg.model} has blocks 0..{config.num_hidden_layers - 1}")
    if cfg.control is not None:
        models.load_config(cfg.model, cfg.control, models_dir)
    models.resolve_device(cfg.device)
    net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
    train, heldout = prompt_sets(cfg, tokenizer)
    runner = Runner(net, tokenizer, cfg, progress)
    train_answers = runner.text(runner.complete(train.inputs, "label training prompts"))
    refused_N = [is_refusal(a) for a in train_answers]
    plain = runner.complete(heldout.inputs, "held-out unhooked")
    benign_reference = [pc for pc, h in zip(plain, heldout.harmful) if not h]
    unhooked = {**rates_of(runner.text(plain), heldout.harmful),
                "train_harmful_refusal": float(np.mean([r for r, h in zip(refused_N, train.harmful) if h])),
                "train_benign_refusal": float(np.mean([r for r, h in zip(refused_N, train.harmful) if not h])),
                "capability_loss": runner.loss(benign_reference),
                "examples": examples(heldout, runner.text(plain))}
    labelled = time.perf_counter()
    work = Store(work_store)
    keys = build_dictionaries(cfg, work, train, tokenizer, models_dir, progress)
    built = time.perf_counter()
    sweeps = [sweep(cfg, runner, work, key, refused_N, heldout, benign_reference, unhooked["capability_loss"])
              for key in keys]
    best = recommend(sweeps, unhooked, cfg.max_capability_loss)
    swept = time.perf_counter()
    del net, runner
    result = {"model": cfg.model, "checkpoint": cfg.checkpoint, "unhooked": unhooked, "sweeps": sweeps,
              "best": best, "match": None, "control": None}
    if best is not None:
        result["match"] = match_status(cfg, Store(main_store), work, best)
        if cfg.control is not None:
            result["control"] = control(cfg, work, best, heldout, models_dir, progress)
    seconds = time.perf_counter() - start
    result["seconds"] = {"total": seconds, "label_and_unhooked": labelled - start, "harvest_and_build": built - labelled,
                         "sweeps": swept - built, "control": time.perf_counter() - swept}
    result["config"] = asdict(cfg)
    result = jsonio.clean(result)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(metrics, result)
    if report is not None:
        from ep_store.studies.refusal_report import refusal_report

        refusal_report(result, report)
    return {"metrics": str(metrics), "best": best, "unhooked_harmful_refusal": unhooked["heldout_harmful_refusal"],
            "seconds": round(seconds, 1)}
