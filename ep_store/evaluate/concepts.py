"""AxBench latent concept detection with an EP dictionary (issue 10).

Protocol (AxBench, Wu et al. 2025, latent detection; as the EP paper ran it at p1): per
concept, its texts are positives and negatives (its hard negatives plus the negatives
shared by every concept), split train/test with a seed. On the train split each region
k scores mean_{positive tokens} u.e_k - mean_{negative tokens} u.e_k, with u the centered
unit direction (a cosine; linear in u, so it is computed from mean directions); the best
region scores each held-out text by the max over its tokens of u.e_best; AUROC
(scikit-learn) against the labels. Baseline: the difference-of-means direction
w = mean_{pos tokens} x - mean_{neg tokens} x (AxBench's DiffMean), scoring a text by
max over tokens of x.w. ``ConceptConfig(protocol="paper")`` runs AxBench as published
instead (``ep_store.evaluate.axbench``: chat-formatted texts less the template's prefix, raw
projection x.e of the exemplar and of the mean-member direction).

    ep eval concepts --dictionary gemma-3-270m/base/L6/p1 --data builtin --out DIR
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from ep_store.errors import UsageError
from ep_store.evaluate import protocols
from ep_store.evaluate.axbench import max_per_text, paper_scores
from ep_store.evaluate.splits import first_by_content
from ep_store.evaluate.tasks import HARD, NEGATIVE, POSITIVE, ConceptRow

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ConceptConfig:
    test_fraction: float = 0.5
    """Share of each concept's texts held out for the AUROC (AxBench scores held-out texts)."""
    min_per_class: int = 10
    """Fewest positive and negative texts a concept may have (issue 10)."""
    seed: int = 0
    """Seed of the split."""
    protocol: str = "ours"
    """``ours`` or ``paper`` (AxBench as published); what each implies: ``protocols.CONCEPT``."""
    chat: str | None = None
    """none, user or model: each text as that turn of the model's chat template, the template's
    prefix tokens left out of selection and scoring (AxBench's prefix_length); None: the
    protocol's (ours none, paper model)."""

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        protocols.check(self.protocol)
        self.chat = protocols.check_chat(protocols.CONCEPT[self.protocol].chat if self.chat is None else self.chat)


@dataclass
class ConceptResult:
    """Per-concept AUROC of the best region and of difference of means, and their means
    (the paper protocol adds the best mean-member direction's: ``mean_auroc_mean``)."""

    concepts: list[dict]
    mean_auroc: float
    mean_auroc_diffmean: float
    config: dict = field(default_factory=dict)
    mean_auroc_mean: float | None = None


def concept_texts(rows: list[ConceptRow], min_per_class: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """concept -> (texts, is_positive) with its hard negatives and the shared negatives.

    Each content once per concept (``splits.first_by_content``, positives first: a text that
    is also listed as a negative stays a positive), so no text can land in both the train
    and the test split (issue 18, A4)."""
    shared = [r.text for r in rows if r.label == NEGATIVE and r.concept == ""]
    concepts = sorted({r.concept for r in rows if r.label == POSITIVE})
    if not concepts:
        raise UsageError("no positive rows: every concept needs positive texts (label positive)")
    out = {}
    for c in concepts:
        pos = [r.text for r in rows if r.concept == c and r.label == POSITIVE]
        neg = [r.text for r in rows if r.concept == c and r.label in (NEGATIVE, HARD)] + shared
        both = pos + neg
        keep = first_by_content(both)
        pos, neg = [both[i] for i in keep if i < len(pos)], [both[i] for i in keep if i >= len(pos)]
        if len(pos) < min_per_class or len(neg) < min_per_class:
            raise UsageError(f"concept {c!r} has {len(pos)} positive and {len(neg)} negative texts; "
                             f"each needs at least {min_per_class}")
        out[c] = (pos + neg, np.array([True] * len(pos) + [False] * len(neg)))
    return out


class ConceptSplit(NamedTuple):
    """One concept's train/test split (indices into its texts) and the tokens of each part."""

    train: np.ndarray
    test: np.ndarray
    pos_tok: np.ndarray
    """Tokens (mask over N) of the positive train texts."""
    neg_tok: np.ndarray
    test_tok: np.ndarray
    n_texts: int
    """Texts in ``text_N`` (1 + its largest index)."""


def split_concept(text_N: np.ndarray, texts_T: np.ndarray, y_T: np.ndarray, cfg: ConceptConfig) -> ConceptSplit:
    """Stratified, seeded split of a concept's texts; UsageError when a train side has no tokens."""
    train, test = train_test_split(np.arange(len(texts_T)), test_size=cfg.test_fraction, stratify=y_T,
                                   random_state=cfg.seed)
    pos_tok = np.isin(text_N, texts_T[train][y_T[train]])
    neg_tok = np.isin(text_N, texts_T[train][~y_T[train]])
    if not pos_tok.any() or not neg_tok.any():
        raise UsageError("a concept's train texts have no tokens; give longer texts")
    n = int(text_N.max()) + 1 if len(text_N) else 0
    return ConceptSplit(train, test, pos_tok, neg_tok, np.isin(text_N, texts_T[test]), n)


def auroc(y: np.ndarray, score_T: np.ndarray) -> float:
    """AUROC of text scores; a text without tokens (-inf) ranks lowest."""
    return float(roc_auc_score(y, np.nan_to_num(score_T, neginf=-1e300)))


def detect_concept(u_ND: np.ndarray, x_ND: np.ndarray, text_N: np.ndarray, texts_T: np.ndarray, y_T: np.ndarray,
                   exemplars_KD: np.ndarray, cfg: ConceptConfig, means_KD: np.ndarray | None = None) -> dict:
    """One concept: best region, AUROC of it and of difference of means on held-out texts.

    ``u_ND`` centered unit directions and ``x_ND`` raw activations of all tokens;
    ``text_N`` each token's text index; ``texts_T`` the concept's text indices with labels ``y_T``.
    Protocol ``paper`` scores raw projections (``axbench.paper_scores``), also of the best
    mean-member direction ``means_KD`` (region_id_mean, auroc_mean) where given.
    """
    sp = split_concept(text_N, texts_T, y_T, cfg)
    gap_D = (u_ND[sp.pos_tok].mean(0) - u_ND[sp.neg_tok].mean(0)).astype(np.float64)
    w_D = x_ND[sp.pos_tok].astype(np.float64).mean(0) - x_ND[sp.neg_tok].astype(np.float64).mean(0)
    tok_N, texts = text_N[sp.test_tok], texts_T[sp.test]
    y = y_T[sp.test]
    dm_T = max_per_text(x_ND[sp.test_tok].astype(np.float64) @ w_D, tok_N, sp.n_texts)[texts]
    out = {}
    if cfg.protocol == "ours":
        region_score_K = gap_D @ exemplars_KD.T
        best = int(np.argmax(region_score_K))
        ep_T = max_per_text(u_ND[sp.test_tok].astype(np.float64) @ exemplars_KD[best], tok_N, sp.n_texts)[texts]
        out = {"region_id": best, "region_score": float(region_score_K[best]), "auroc": auroc(y, ep_T)}
    else:
        bases = {"": exemplars_KD, **({"_mean": means_KD} if means_KD is not None else {})}
        for suffix, (best, select, score_T) in paper_scores(gap_D, x_ND[sp.test_tok], tok_N, sp.n_texts,
                                                              bases).items():
            out |= {f"region_id{suffix}": best, f"region_score{suffix}": select,
                    f"auroc{suffix}": auroc(y, score_T[texts])}
    return {**out, "auroc_diffmean": auroc(y, dm_T), "n_train": int(len(sp.train)), "n_test": int(len(sp.test)),
            "positives_test": int(y.sum())}


def concept_detection(u_ND, x_ND, text_N, text_index: dict[str, int], rows: list[ConceptRow], exemplars_KD,
                      cfg: ConceptConfig | None = None, means_KD=None) -> ConceptResult:
    """Every concept of ``rows`` (AxBench latent detection); ``text_index`` maps text -> index in
    text_N; ``means_KD`` (protocol paper): the mean-member directions, a second basis."""
    cfg = cfg or ConceptConfig()
    means = np.asarray(means_KD, np.float64) if means_KD is not None and cfg.protocol == "paper" else None
    per = []
    for concept, (texts, y) in concept_texts(rows, cfg.min_per_class).items():
        idx = np.array([text_index[t] for t in texts])
        per.append({"concept": concept, **detect_concept(u_ND, x_ND, text_N, idx, y, np.asarray(exemplars_KD,
                                                                                                 np.float64), cfg, means)})
    mean_of = {name: float(np.mean([p[name] for p in per])) for name in ("auroc", "auroc_diffmean", "auroc_mean")
               if name in per[0]}
    return ConceptResult(per, mean_of["auroc"], mean_of["auroc_diffmean"], asdict(cfg), mean_of.get("auroc_mean"))


# -- the `ep eval concepts` stage -----------------------------------------------------------------
@dataclass
class ConceptEvalConfig:
    dictionaries: tuple[str, ...]
    """Dictionary keys of one model: one forward for all."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    data: str = "builtin"
    """builtin or a .jsonl/.csv/.parquet/.arrow file: concept/text/label or AxBench's output_concept/output/category."""
    model: str | None = None
    """Model to run the texts through (default: the dictionaries'; another model is bad input)."""
    checkpoint: str | None = None
    """Checkpoint to run the texts through (default: the dictionaries')."""
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    """The AxBench protocol constants."""


SERIES = {"mean_auroc": "EP best region", "mean_auroc_mean": "EP best mean direction",
          "mean_auroc_diffmean": "difference of means"}
"""Headline metric -> its label in the plot."""


def dictionary_concepts(d, acts, rows: list[ConceptRow], index: dict[str, int], cfg: ConceptConfig) -> ConceptResult:
    """Concept detection on one dictionary, each chosen region with its top tokens."""
    import torch

    from ep_store.evaluate import features

    x = acts.x_ND[d.key.layer]
    u = d.unit(torch.from_numpy(x)).numpy()
    means = protocols.mean_basis(d) if "mean" in protocols.CONCEPT[cfg.protocol].bases else None
    res = concept_detection(u, x, acts.text_N, index, rows, d.exemplars.numpy(), cfg,
                            None if means is None else means.numpy())
    region_N, _ = d.assign(x)
    for p in res.concepts:
        p["top_tokens"] = features.top_tokens(region_N, acts.token_id_N, acts.token_text, p["region_id"])
    return res


def run_concept_eval(cfg: ConceptEvalConfig, store, run, out, metrics_path=None, plots_dir=None) -> dict:
    """``ep eval concepts``: writes ``out``/metrics.json (per concept and mean AUROC, EP vs
    difference of means, the protocol and its settings; the DVC metrics file gets the protocol's
    name beside the headline) and mean_auroc.png; returns the one-line summary."""
    from ep_store import plots
    from ep_store.evaluate import tasks
    from ep_store.evaluate.axbench import concept_activations
    from ep_store.evaluate.run import evaluation_output, open_evaluation, write_record

    dicts, model, checkpoint = open_evaluation(cfg, store, out, metrics_path, plots_dir)
    rows = tasks.concept_rows(cfg.data)
    concept_texts(rows, cfg.concepts.min_per_class)  # validate before the forward
    texts = list(dict.fromkeys(r.text for r in rows))
    index = {t: i for i, t in enumerate(texts)}
    acts = concept_activations(dicts, model, checkpoint, texts, run, cfg.concepts.chat)
    results, metrics = {}, {}
    for d in dicts:
        res = results[str(d.key)] = dictionary_concepts(d, acts, rows, index, cfg.concepts)
        metrics[str(d.key)] = {name: round(getattr(res, name), 4) for name in SERIES if getattr(res, name) is not None}
    protocol = cfg.concepts.protocol
    proto = protocols.record(protocols.CONCEPT, protocol, chat=cfg.concepts.chat,
                             max_tokens_per_text=run.max_tokens_per_text)
    with evaluation_output(out, metrics_path, plots_dir, {"protocol": protocol, **metrics}) as tmp:
        image = plots.lines(list(metrics), {label: [m[name] for m in metrics.values()] for name, label in SERIES.items()
                                            if name in metrics[str(dicts[0].key)]},
                            tmp / "mean_auroc.png", f"{model}/{checkpoint}: concept detection ({protocol})",
                            "dictionary", "mean AUROC")
        write_record(tmp, f"Concept detection ({protocol} protocol): {model}/{checkpoint}", {
            "metrics": metrics, "concepts": {k: r.concepts for k, r in results.items()}, **proto, "model": model,
            "checkpoint": checkpoint, "texts": len(texts), "tokens": int(len(acts.text_N))}, cfg, run, [image])
    return {"dictionaries": list(metrics), "model": f"{model}/{checkpoint}", "protocol": protocol,
            "concepts": len(results[str(dicts[0].key)].concepts), "texts": len(texts), "out": str(out),
            "metrics": metrics}
