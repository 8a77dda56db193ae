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

The study in modules: this one holds the config, the run (``refusal_study``), the match join
and the control checkpoint; ``refusal_prompts`` the prompt sets and the study's dictionaries;
``refusal_sweep`` region scoring, the ablation and steering sweep and the recommendation;
``refusal_report`` the HTML report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ep_store import jsonio
from ep_store.errors import UsageError, check_output_file, check_output_folder
from ep_store.keys import DictionaryKey
from ep_store.stages import models
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.refusal_classifier import is_refusal
from ep_store.store.core import Store
from ep_store.studies.generate import prompt_ids
from ep_store.studies.intervene import ablation
from ep_store.studies.refusal_prompts import Prompts, build_dictionaries, prompt_sets
from ep_store.studies.refusal_sweep import ALL, Runner, examples, rates_of, recommend, sweep

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


def match_status(cfg: RefusalConfig, main: Store, work: Store, best: dict) -> dict:
    """Where the refusal regions' exemplars sit in the pipeline's base-vs-fine-tuned match: the
    nearest exemplar (cosine) in the pipeline's dictionary of that checkpoint and layer, and
    its status (preserved/introduced) by a join over the ``matches`` view."""
    from ep_store.sql.db import StoreDB, ask

    study = Dictionary.load(work, best["dictionary"])
    key = DictionaryKey(cfg.model, cfg.checkpoint, study.key.layer, cfg.match_percentile)
    if not main.dictionary_files(key).finished:
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
    check_inputs(cfg, work_store, models_dir, metrics, report)
    net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
    train, heldout = prompt_sets(cfg, tokenizer)
    runner = Runner(net, tokenizer, cfg, progress)
    refused_N, benign_reference, unhooked = label_and_unhooked(runner, train, heldout)
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
    write_outputs(jsonio.clean(result), metrics, report)
    return {"metrics": str(metrics), "best": best, "unhooked_harmful_refusal": unhooked["heldout_harmful_refusal"],
            "seconds": round(seconds, 1)}


def check_inputs(cfg: RefusalConfig, work_store: Path, models_dir: Path, metrics: Path, report: Path | None) -> None:
    """Refuse (UsageError) unwritable outputs, unknown checkpoints, layers out of range and an
    unusable device before any model is loaded."""
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


def label_and_unhooked(runner: Runner, train: Prompts, heldout: Prompts) -> tuple[list[bool], list, dict]:
    """Label each training prompt by whether the unhooked model refuses it, and measure the
    unhooked model on the held-out prompts: (refused_N, the benign (prompt, completion) pairs
    the capability loss is measured on, the unhooked rates and loss)."""
    train_answers = runner.text(runner.complete(train.inputs, "label training prompts"))
    refused_N = [is_refusal(a) for a in train_answers]
    plain = runner.complete(heldout.inputs, "held-out unhooked")
    benign_reference = [pc for pc, h in zip(plain, heldout.harmful) if not h]
    unhooked = {**rates_of(runner.text(plain), heldout.harmful),
                "train_harmful_refusal": float(np.mean([r for r, h in zip(refused_N, train.harmful) if h])),
                "train_benign_refusal": float(np.mean([r for r, h in zip(refused_N, train.harmful) if not h])),
                "capability_loss": runner.loss(benign_reference),
                "examples": examples(heldout, runner.text(plain))}
    return refused_N, benign_reference, unhooked


def write_outputs(result: dict, metrics: Path, report: Path | None) -> None:
    """The metrics JSON, and the HTML report when ``report`` is given."""
    metrics.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(metrics, result)
    if report is not None:
        from ep_store.studies.refusal_report import refusal_report

        refusal_report(result, report)
