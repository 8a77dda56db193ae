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

8. the difference-of-means ceiling (issue 22): per layer, the mean of the harmful training
   prompts' last positions minus the benign ones', ablated like a region: the best any
   one-direction method can be expected to do there.

Two protocols (``protocol``, issue 22): ``ours`` (the defaults below: file order, harmful
first; 2,048-row batches; 8 tokens; our classifier) and ``paper``, the authors' values
(``PROTOCOLS``: seeds 0-3 shuffling the prompt stream, 16-prompt batches, saturation window
10, 60 tokens, the paper's classifier rules, the null matched on the region's total tokens,
three bases); options given explicitly override either. The metrics JSON records the protocol.

The study's activations and dictionaries live in their own store (``work_store``, default
data/store/refusal; one ``seed<s>`` folder in it per seed when seeds are given): the keys stay
honest (gemma-3-270m/sft/L6/p8 is a dictionary of that model and layer) while the corpus, the
training prompts, differs from the pipeline's, and the pipeline's store and its SQL views never
see them.

The study in modules: this one holds the config, the run (``refusal_study``), the match join
and the control checkpoint; ``refusal_prompts`` the prompt sets and the study's dictionaries;
``refusal_protocol`` the stream order, bases and the difference of means; ``refusal_sweep``
region scoring, the ablation and steering sweep, the ceiling and the recommendation;
``refusal_report`` the HTML report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ep_store import jsonio
from ep_store.errors import UsageError, check_output_file, check_output_folder
from ep_store.keys import DictionaryKey
from ep_store.stages import models
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.refusal_classifier import RULES, is_refusal
from ep_store.store.core import Store
from ep_store.studies.generate import prompt_ids
from ep_store.studies.plant import cosine
from ep_store.studies.refusal_prompts import Prompts, build_dictionaries, prompt_sets
from ep_store.studies.refusal_protocol import STUDY_BASES, region_ablation, reorder, stream_order
from ep_store.studies.refusal_sweep import (
    ALL,
    NULL_SIZES,
    Runner,
    ceiling,
    examples,
    layer_center,
    layer_direction,
    rates_of,
    recommend,
    sweep,
)

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
    protocol: str = "ours"
    """Which protocol's values the other fields started from (``PROTOCOLS``); recorded in the metrics."""
    seeds: tuple[int, ...] = ()
    """Stream-order seeds: each shuffles the training prompts' order before harvest and build
    (numpy default_rng(seed), as the authors) and gets its own dictionaries and sweep; () keeps
    file order, harmful first (paper: 0-3)."""
    batch_prompts: int | None = None
    """Calibration and build batches of this many prompts' tokens (rows: prompts x mean prompt
    length); None: ``calibration_batch`` rows and 2,048-row build batches (paper: 16)."""
    saturation_window: int | None = None
    """Stop a build after this many batches without a new region; None: the whole stream (paper: 10)."""
    classifier: str = "ours"
    """Refusal classifier rules (ep_store.stages.refusal_classifier): ours or paper (lower-cased)."""
    null_size: str = "prompts"
    """Null region matched on log10 of its last-position members (prompts) or of its total
    member tokens, all positions (tokens, the paper's)."""
    bases: tuple[str, ...] = ("exemplar", "mean")
    """Directions the candidates are ablated along (exemplar, mean, reanchored; paper: all three)."""
    null_bases: tuple[str, ...] = ("exemplar",)
    """Directions the null region is ablated along (paper: all three)."""
    ceiling: bool = True
    """Also ablate each layer's difference of means (harmful - benign last positions; issue 22)."""

    @classmethod
    def for_protocol(cls, protocol: str = "ours", **options) -> RefusalConfig:
        """The config of ``protocol``'s values, ``options`` overriding them."""
        if protocol not in PROTOCOLS:
            raise UsageError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
        return cls(protocol=protocol, **{**PROTOCOLS[protocol], **options})

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
        self.check_protocol_fields()

    def check_protocol_fields(self) -> None:
        """The protocol options (issue 22): known names, positive sizes, seeds in order given, once."""
        self.seeds = tuple(dict.fromkeys(int(x) for x in self.seeds))
        self.bases, self.null_bases = tuple(self.bases), tuple(self.null_bases)
        checks = {"protocol": (self.protocol, PROTOCOLS), "classifier": (self.classifier, RULES),
                  "null_size": (self.null_size, NULL_SIZES)}
        checks |= {f"bases {b!r}": (b, STUDY_BASES) for b in (*self.bases, *self.null_bases)}
        for name, (value, known) in checks.items():
            if value not in known:
                raise UsageError(f"--{name.split()[0].replace('_', '-')}: unknown {value!r}; use {', '.join(known)}")
        if not self.bases:
            raise UsageError("--bases needs one or more of " + ", ".join(STUDY_BASES))
        if any(s < 0 for s in self.seeds):
            raise UsageError("--seeds must be non-negative integers")
        for name in ("batch_prompts", "saturation_window"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


PROTOCOLS: dict[str, dict] = {
    "ours": {},
    "paper": {  # the authors' scripts/exp_behavioral.py, make_fig_refusal.py, aggregate_reanchor.py
        "percentiles": (5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0),  # make_fig_refusal.py's sweep (p = 8 default)
        "seeds": (0, 1, 2, 3),  # aggregate_reanchor.py SEEDS
        "train_harmful": 224,  # paper 300 + 300; chat_train.jsonl holds 224 harmful prompts
        "train_benign": 300,
        "heldout_harmful": 50,  # --n-held-out-harmful 50
        "heldout_benign": 50,  # --n-held-out-benign 50 (the steering prompts)
        "max_new_tokens": 60,  # --max-new-tokens 60, greedy
        "batch_prompts": 16,  # --prompt-batch-size 16: calibration and build batches
        "saturation_window": 10,  # discover(saturation_window=10)
        "classifier": "paper",  # _is_refusal: lower-cased, first 300 characters, 24 phrases
        "null_size": "tokens",  # null matched on log10(member_count), all positions
        "bases": ("mean", "exemplar", "reanchored"),  # bases_to_try
        "null_bases": ("mean", "exemplar", "reanchored"),
    },
}
"""Each protocol's values for RefusalConfig fields; ``ours`` is the fields' defaults."""


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
    unhooked = {**rates_of(runner.text(plain), heldout.harmful, cfg.classifier),
                "capability_loss": runner.loss(benign_ref)}
    edit = region_ablation(work, Dictionary.load(work, best["dictionary"]), best["regions"], best["basis"])
    ablated = runner.measure(heldout, [edit], benign_ref, f"{cfg.control} ablated")
    ablated["capability_ratio"] = ablated["capability_loss"] / unhooked["capability_loss"]
    return {"checkpoint": cfg.control, "unhooked": unhooked, "ablated": ablated}


def ceiling_centers(cfg: RefusalConfig, work: Store, layer: int, prompt_mean_D: torch.Tensor) -> dict:
    """The centers of the ceiling's ablation forms (``refusal_sweep.CEILING_FORMS``) at ``layer``."""
    return {"centered": layer_center(cfg, work, layer), "uncentered": None, "prompt_mean": prompt_mean_D}


def planted_check(cfg: RefusalConfig, models_dir: Path, work_store: Path, directions: dict[int, torch.Tensor],
                  sweeps: list[dict]) -> dict | None:
    """The planted ground truth of a checkpoint made by ``ep finetune --plant mediated`` (its
    finetune.json records, per plant layer, the difference of means the plant was trained to be
    mediated by): cosine with it of the study's own difference of means and of each sweep's
    candidate regions (exemplar and mean directions) at that layer. None for any other checkpoint."""
    path = models.model_dir(models_dir, cfg.model, cfg.checkpoint) / "finetune.json"
    record = json.loads(path.read_text()).get("plant_directions") if path.is_file() else None
    if not record:
        return None
    planted = {int(L): torch.tensor(v, dtype=torch.float64) for L, v in record["directions"].items()}
    out = {"layers": sorted(planted), "directions_D": planted, "candidates": [],
           "diff_of_means_cosine": {str(L): cosine(d_D, planted[L]) for L, d_D in directions.items() if L in planted}}
    for s in sweeps:
        if s["layer"] not in planted:
            continue
        d = Dictionary.load(seed_store(work_store, s["seed"]), DictionaryKey.parse(s["dictionary"]))
        for c in s["candidates"]:
            v_D = planted[s["layer"]]
            out["candidates"].append({"dictionary": s["dictionary"], "seed": s["seed"], "region_id": c["region_id"],
                                      "exemplar_cosine": cosine(d.exemplars[c["region_id"]], v_D),
                                      "mean_cosine": cosine(d.mean_directions[c["region_id"]], v_D)})
    return out


def seed_store(work_store: Path, seed: int | None) -> Store:
    """The work store of one stream order: ``work_store`` itself for file order, else ``seed<s>`` in it."""
    return Store(work_store if seed is None else work_store / f"seed{seed}")


def refusal_study(cfg: RefusalConfig, work_store: Path, main_store: Path, models_dir: Path, metrics: Path,
                  report: Path | None = None, progress: bool = True) -> dict:
    """Run the study; write ``metrics`` (JSON) and the report; return the summary."""
    start = time.perf_counter()
    check_inputs(cfg, work_store, models_dir, metrics, report)
    net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
    train, heldout = prompt_sets(cfg, tokenizer)
    runner = Runner(net, tokenizer, cfg, progress)
    refused_N, benign_reference, unhooked = label_and_unhooked(runner, train, heldout, cfg.classifier)
    seconds = {"label_and_unhooked": time.perf_counter() - start, "harvest_and_build": 0.0, "sweeps": 0.0}
    sweeps, ceilings, directions, means = [], [], {}, {}
    for seed in cfg.seeds or (None,):
        tick = time.perf_counter()
        order = stream_order(len(train.texts), seed)
        stream, work = reorder(train, order), seed_store(work_store, seed)
        keys = build_dictionaries(cfg, work, stream, tokenizer, models_dir, progress)
        built = time.perf_counter()
        if cfg.ceiling and not directions:  # one set of prompts: the same means for every order
            means = {L: layer_direction(cfg, work, L, stream.harmful) for L in cfg.layers}
            directions = {L: d_D for L, (d_D, _) in means.items()}
            ceilings = [ceiling(runner, L, directions[L], ceiling_centers(cfg, work, L, means[L][1]), heldout,
                                benign_reference, unhooked["capability_loss"]) for L in cfg.layers]
        sweeps += [sweep(cfg, runner, work, key, [refused_N[i] for i in order], heldout, benign_reference,
                         unhooked["capability_loss"], seed, directions.get(key.layer)) for key in keys]
        seconds["harvest_and_build"] += built - tick
        seconds["sweeps"] += time.perf_counter() - built
    best = recommend(sweeps, unhooked, cfg.max_capability_loss)
    plant = planted_check(cfg, models_dir, work_store, directions, sweeps)
    if plant is not None:
        planted = plant.pop("directions_D")
        work = seed_store(work_store, (cfg.seeds or (None,))[0])
        plant["ablated"] = [ceiling(runner, L, planted[L].float(), ceiling_centers(cfg, work, L, means[L][1]), heldout,
                                    benign_reference, unhooked["capability_loss"])
                            for L in plant["layers"] if cfg.ceiling and L in means]
    swept = time.perf_counter()
    del net, runner
    result = {"model": cfg.model, "checkpoint": cfg.checkpoint, "protocol": cfg.protocol, "unhooked": unhooked,
              "sweeps": sweeps, "ceiling": ceilings, "plant": plant, "best": best, "match": None, "control": None}
    if best is not None:
        work = seed_store(work_store, best["seed"])
        result["match"] = match_status(cfg, Store(main_store), work, best)
        if cfg.control is not None:
            result["control"] = control(cfg, work, best, heldout, models_dir, progress)
    total = time.perf_counter() - start
    result["seconds"] = {"total": total, **seconds, "control": time.perf_counter() - swept}
    result["config"] = asdict(cfg)
    write_outputs(jsonio.clean(result), metrics, report)
    return {"metrics": str(metrics), "protocol": cfg.protocol, "best": best,
            "unhooked_harmful_refusal": unhooked["heldout_harmful_refusal"], "seconds": round(total, 1)}


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


def label_and_unhooked(runner: Runner, train: Prompts, heldout: Prompts,
                       rules: str = "ours") -> tuple[list[bool], list, dict]:
    """Label each training prompt by whether the unhooked model refuses it (classifier ``rules``),
    and measure the unhooked model on the held-out prompts: (refused_N in file order, the benign
    (prompt, completion) pairs the capability loss is measured on, the unhooked rates and loss)."""
    train_answers = runner.text(runner.complete(train.inputs, "label training prompts"))
    refused_N = [is_refusal(a, rules) for a in train_answers]
    plain = runner.complete(heldout.inputs, "held-out unhooked")
    benign_reference = [pc for pc, h in zip(plain, heldout.harmful) if not h]
    unhooked = {**rates_of(runner.text(plain), heldout.harmful, rules),
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
