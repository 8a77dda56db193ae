"""The refusal study's sweep (issue 9; ep_store.studies.refusal runs the study): score the regions
of the training prompts' last positions (pure), pick candidates and the null region, ablate and
steer them with the model loaded (``Runner``), measure the difference-of-means ceiling of a layer
(issue 22), and recommend one condition.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.refusal_classifier import is_refusal
from ep_store.store.core import Store
from ep_store.studies.finetune import response_loss
from ep_store.studies.generate import greedy_tokens
from ep_store.studies.intervene import (
    Edit,
    directions_ablation,
    intervene,
    steering,
    steering_scale,
)
from ep_store.studies.refusal_prompts import Prompts
from ep_store.studies.refusal_protocol import (
    basis_directions,
    ceiling_edit,
    diff_of_means,
    last_positions,
)

if TYPE_CHECKING:
    from ep_store.studies.refusal import RefusalConfig

log = logging.getLogger(__name__)
ALL = 2**31 - 1  # "every row" for a question's --limit
NULL_SIZES = ("prompts", "tokens")
"""What the null region is matched on beside coherence: log10 of its last-position members
(prompts, ours) or of its build members over all positions (tokens, the paper)."""


# -- region scoring (pure) ------------------------------------------------------------------------
class RegionScore(NamedTuple):
    region_id: int
    members: int  # training prompts whose last position lies in the region
    refused: int
    refusal_rate: float
    coherence: float
    score: float  # refusal_rate x members
    tokens: int = 0  # the region's build members over all positions (0: not known)


def score_regions(region_N, refused_N, coherence: dict[int, float],
                  tokens: dict[int, int] | None = None) -> list[RegionScore]:
    """Per region of the prompts' last positions: members, refusal rate, coherence, rate x members,
    and the region's member tokens (all positions) from ``tokens``.

    ``region_N`` holds each training prompt's region (-1 = unassigned, left out), ``refused_N``
    its label. Sorted by score, then members, then region id.
    """
    region_N, refused_N = np.asarray(region_N), np.asarray(refused_N, dtype=bool)
    scores = []
    for r in np.unique(region_N[region_N >= 0]):
        mask = region_N == r
        n, k = int(mask.sum()), int(refused_N[mask].sum())
        scores.append(RegionScore(int(r), n, k, k / n, float(coherence.get(int(r), float("nan"))), k,
                                  int((tokens or {}).get(int(r), 0))))
    return sorted(scores, key=lambda s: (-s.score, -s.members, s.region_id))


def candidates(scores: list[RegionScore], min_members: int = 5, min_rate: float = 0.3) -> list[RegionScore]:
    """Regions with >= min_members prompts and refusal rate >= min_rate, best first (paper)."""
    return [s for s in scores if s.members >= min_members and s.refusal_rate >= min_rate]


def null_region(scores: list[RegionScore], top: RegionScore, min_members: int = 5,
                max_rate: float = 0.05, exclude: set[int] = frozenset(), size: str = "prompts") -> RegionScore | None:
    """The control region: rate <= max_rate, >= min_members, not excluded, nearest ``top`` in
    (log10 size, coherence) (Euclidean; ties by region id), size being the last-position
    ``members`` (``size="prompts"``) or the region's ``tokens`` over all positions (``"tokens"``,
    the paper's, at least 1 as in the authors' code). None when no region qualifies."""
    if size not in NULL_SIZES:
        raise ValueError(f"unknown null size {size!r}; use {' or '.join(NULL_SIZES)}")
    pool = [s for s in scores if s.members >= min_members and s.refusal_rate <= max_rate
            and s.region_id not in exclude and s.region_id != top.region_id]
    if not pool:
        return None

    def log_size(s: RegionScore) -> float:
        return math.log10(s.members if size == "prompts" else max(s.tokens, 1))

    def distance(s: RegionScore) -> float:
        return math.hypot(log_size(s) - log_size(top), np.nan_to_num(s.coherence - top.coherence, nan=0.0))

    return min(pool, key=lambda s: (distance(s), s.region_id))


# -- measuring a condition ------------------------------------------------------------------------
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
        rates = rates_of(answers, heldout.harmful, self.cfg.classifier)
        return {**rates, "capability_loss": loss, "examples": examples(heldout, answers)}


def rates_of(answers: list[str], harmful: list[bool], rules: str = "ours") -> dict:
    refused = [is_refusal(a, rules) for a in answers]
    h = [r for r, x in zip(refused, harmful) if x]
    b = [r for r, x in zip(refused, harmful) if not x]
    return {"heldout_harmful_refusal": sum(h) / len(h) if h else None,
            "heldout_benign_refusal": sum(b) / len(b) if b else None}


def examples(p: Prompts, answers: list[str], n: int = 2) -> list[dict]:
    """A few (prompt, answer) pairs of each kind, for the report."""
    picked = [i for i, x in enumerate(p.harmful) if x][:n] + [i for i, x in enumerate(p.harmful) if not x][:n]
    return [{"prompt": p.texts[i], "answer": answers[i], "harmful": p.harmful[i]} for i in picked]


# -- one dictionary ----------------------------------------------------------------------------------
def last_position_regions(work: Store, key: DictionaryKey, n: int) -> tuple[np.ndarray, dict[int, float], dict[int, int]]:
    """(region of each training prompt's last position, -1 if none; coherence per region; build
    members per region, all positions)."""
    from ep_store.sql.db import StoreDB, ask

    rows = ask(StoreDB(work), key, "last_token_regions", limit=ALL).to_pylist()
    region_N = np.full(n, -1)
    coherence, tokens = {}, {}
    for r in rows:
        region_N[r["doc_id"]] = r["region_id"]
        coherence[r["region_id"]] = r["coherence"]
        tokens[r["region_id"]] = r["member_count"]
    return region_N, coherence, tokens


def sweep(cfg: RefusalConfig, runner: Runner, work: Store, key: DictionaryKey, refused_N: list[bool],
          heldout: Prompts, benign_reference, unhooked_loss: float, seed: int | None = None,
          direction_D: torch.Tensor | None = None) -> dict:
    """Candidates, null region, ablations k = 1..k_max in each of ``cfg.bases``, the null region in
    each of ``cfg.null_bases``, steering: one dictionary (of the stream order of ``seed``).
    ``direction_D``, the layer's difference of means, gives each candidate's exemplar cosine to it."""
    d = Dictionary.load(work, key)
    region_N, coherence, tokens = last_position_regions(work, key, len(refused_N))
    scores = score_regions(region_N, refused_N, coherence, tokens)
    cands = candidates(scores, cfg.min_members, cfg.min_rate)
    result = {"dictionary": str(key), "seed": seed, "layer": key.layer, "percentile": key.percentile,
              "regions": len(d), "theta": d.theta, "scale": steering_scale(work, d),
              "batch_rows": d.meta.get("build", {}).get("batch_size"), "stop_reason": d.meta.get("stop_reason"),
              "last_positions": int((region_N >= 0).sum()), "occupied_regions": len(scores),
              "candidates": [s._asdict() for s in cands[: cfg.k_max]], "null": None, "conditions": [], "steering": []}
    if not cands:
        log.warning("%s: no candidate region (>= %d members, rate >= %.2f)", key, cfg.min_members, cfg.min_rate)
        return result
    if direction_D is not None:
        unit = direction_D / direction_D.norm().clamp_min(1e-12)
        for c in result["candidates"]:
            c["diff_of_means_cosine"] = float(d.exemplars[c["region_id"]] @ unit)
    null = null_region(scores, cands[0], cfg.min_members, cfg.null_max_rate, {c.region_id for c in cands},
                       cfg.null_size)
    result["null"] = null._asdict() if null else None
    top = [c.region_id for c in cands[: cfg.k_max]]
    measured = [("", basis, top) for basis in cfg.bases] + [("null", basis, [null.region_id])
                                                            for basis in (cfg.null_bases if null else ())]
    for kind, basis, ids in measured:
        V = basis_directions(work, d, ids, basis)
        for k in range(1, len(ids) + 1):
            name = kind or basis
            label = f"{key} {name}{f' ({basis})' if kind else ''} k={k}"
            edit = directions_ablation(key.layer, V[:k], d.center.clone(), label)
            m = runner.measure(heldout, [edit], benign_reference, label)
            m["capability_ratio"] = m["capability_loss"] / unhooked_loss if unhooked_loss else None
            extra = {"direction": basis} if kind else {}
            result["conditions"].append({"basis": name, "k": k, "regions": ids[:k], **extra, **m})
    result["steering"] = steer(cfg, runner, d, cands[0].region_id, result["scale"], heldout, str(key))
    return result


def steer(cfg: RefusalConfig, runner: Runner, d: Dictionary, region: int, scale: float, heldout: Prompts,
          name: str) -> list[dict]:
    """Add the region's exemplar direction at each of ``cfg.alphas`` on the held-out benign prompts."""
    benign = Prompts(*[[x for x, h in zip(col, heldout.harmful) if not h]
                       for col in (heldout.texts, heldout.inputs, heldout.harmful)])
    out = []
    for alpha in cfg.alphas:
        with intervene(runner.net, [steering(d, region, alpha, scale)]):
            answers = runner.text(runner.complete(benign.inputs, f"{name} steer {alpha:g}"))
        rate = rates_of(answers, benign.harmful, cfg.classifier)["heldout_benign_refusal"]
        out.append({"region_id": region, "alpha": alpha, "heldout_benign_refusal": rate,
                    "examples": examples(benign, answers)})
    return out


def layer_center(cfg: RefusalConfig, work: Store, layer: int) -> torch.Tensor:
    """c_D: the EP center of the layer's dictionaries in the work store (one calibration per layer)."""
    key = DictionaryKey(cfg.model, cfg.checkpoint, layer, cfg.percentiles[0])
    return torch.tensor(work.dictionary_snapshot(key).meta["center"], dtype=torch.float32)


def layer_direction(cfg: RefusalConfig, work: Store, layer: int,
                    harmful_N: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's difference of means over the training prompts' last positions (``harmful_N`` in
    the work store's doc_id order), and the mean of those last positions (both classes)."""
    x_ND = last_positions(work, ActivationKey(cfg.model, cfg.checkpoint, layer), len(harmful_N))
    return diff_of_means(x_ND, harmful_N), x_ND.double().mean(dim=0).float()


CEILING_FORMS = ("centered", "uncentered", "prompt_mean")
"""Where a ceiling ablation sets the direction's component: to the layer's EP center's (EP's own
form), to zero (around the origin, Arditi et al.), or to the training prompts' last-position
mean's (a mean ablation at the positions the direction was measured on)."""


def ceiling(runner: Runner, layer: int, direction_D: torch.Tensor, centers: dict[str, torch.Tensor | None],
            heldout: Prompts, benign_reference, unhooked_loss: float) -> dict:
    """The difference-of-means ceiling at ``layer``: held-out refusal and capability with the
    direction ablated (every position and step) in each of ``CEILING_FORMS`` (``centers``: form ->
    center, None around the origin). The ``centered`` form's figures sit at the top level, the
    others under their names. Around the origin the ablation also removes the direction's share
    of the stream's large constant components and so can break the model where a centered
    ablation does not; the EP center is an all-token mean, far from the last positions."""
    out = {"layer": layer, "norm": float(direction_D.norm())}
    for name, center in centers.items():
        m = runner.measure(heldout, [ceiling_edit(layer, direction_D, center)], benign_reference,
                           f"L{layer} diff-of-means {name}")
        m["capability_ratio"] = m["capability_loss"] / unhooked_loss if unhooked_loss else None
        if name == "centered":
            out.update(m)
        else:
            out[name] = m
    return out


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
    return {"dictionary": s["dictionary"], "seed": s.get("seed"), "regions": c["regions"], "basis": c["basis"],
            "k": c["k"],
            "heldout_harmful_refusal": c["heldout_harmful_refusal"],
            "heldout_benign_refusal": c["heldout_benign_refusal"], "capability_ratio": c["capability_ratio"],
            "unhooked_harmful_refusal": unhooked["heldout_harmful_refusal"],
            "unhooked_benign_refusal": unhooked["heldout_benign_refusal"], "within_capability_budget": bool(within)}
