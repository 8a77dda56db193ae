"""AxBench latent concept detection with an EP dictionary (issue 10).

Protocol (AxBench, Wu et al. 2025, latent detection; as the EP paper ran it at p1): per
concept, its texts are positives and negatives (its hard negatives plus the negatives
shared by every concept), split train/test with a seed. On the train split each region
k scores mean_{positive tokens} u.e_k - mean_{negative tokens} u.e_k, with u the centered
unit direction (a cosine; linear in u, so it is computed from mean directions); the best
region scores each held-out text by the max over its tokens of u.e_best; AUROC
(scikit-learn) against the labels. Baseline: the difference-of-means direction
w = mean_{pos tokens} x - mean_{neg tokens} x (AxBench's DiffMean), scoring a text by
max over tokens of x.w.

    ep eval concepts --dictionary gemma-3-270m/base/L6/p1 --data builtin --out DIR
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, asdict, dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from ep_store.errors import UsageError
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

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")


@dataclass
class ConceptResult:
    """Per-concept AUROC of the best region and of difference of means, and their means."""

    concepts: list[dict]
    mean_auroc: float
    mean_auroc_diffmean: float
    config: dict = field(default_factory=dict)


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


def max_per_text(score_N: np.ndarray, text_N: np.ndarray, n_texts: int) -> np.ndarray:
    """Max of a token score over each text's tokens, (n_texts,); -inf for a text without tokens."""
    out = np.full(n_texts, -np.inf)
    np.maximum.at(out, text_N, score_N)
    return out


def detect_concept(u_ND: np.ndarray, x_ND: np.ndarray, text_N: np.ndarray, texts_T: np.ndarray, y_T: np.ndarray,
                   exemplars_KD: np.ndarray, cfg: ConceptConfig) -> dict:
    """One concept: best region, AUROC of it and of difference of means on held-out texts.

    ``u_ND`` centered unit directions and ``x_ND`` raw activations of all tokens;
    ``text_N`` each token's text index; ``texts_T`` the concept's text indices with labels ``y_T``.
    """
    train, test = train_test_split(np.arange(len(texts_T)), test_size=cfg.test_fraction, stratify=y_T,
                                   random_state=cfg.seed)
    pos_tok = np.isin(text_N, texts_T[train][y_T[train]])
    neg_tok = np.isin(text_N, texts_T[train][~y_T[train]])
    if not pos_tok.any() or not neg_tok.any():
        raise UsageError("a concept's train texts have no tokens; give longer texts")
    region_score_K = (u_ND[pos_tok].mean(0) - u_ND[neg_tok].mean(0)).astype(np.float64) @ exemplars_KD.T
    best = int(np.argmax(region_score_K))
    w_D = x_ND[pos_tok].astype(np.float64).mean(0) - x_ND[neg_tok].astype(np.float64).mean(0)
    test_tok = np.isin(text_N, texts_T[test])
    n = int(text_N.max()) + 1 if len(text_N) else 0
    ep_T = max_per_text(u_ND[test_tok].astype(np.float64) @ exemplars_KD[best], text_N[test_tok], n)[texts_T[test]]
    dm_T = max_per_text(x_ND[test_tok].astype(np.float64) @ w_D, text_N[test_tok], n)[texts_T[test]]
    y = y_T[test]
    return {"region_id": best, "region_score": float(region_score_K[best]),
            "auroc": float(roc_auc_score(y, np.nan_to_num(ep_T, neginf=-1e300))),
            "auroc_diffmean": float(roc_auc_score(y, np.nan_to_num(dm_T, neginf=-1e300))),
            "n_train": int(len(train)), "n_test": int(len(test)), "positives_test": int(y.sum())}


def concept_detection(u_ND, x_ND, text_N, text_index: dict[str, int], rows: list[ConceptRow], exemplars_KD,
                      cfg: ConceptConfig | None = None) -> ConceptResult:
    """Every concept of ``rows`` (AxBench latent detection); ``text_index`` maps text -> index in text_N."""
    cfg = cfg or ConceptConfig()
    per = []
    for concept, (texts, y) in concept_texts(rows, cfg.min_per_class).items():
        idx = np.array([text_index[t] for t in texts])
        per.append({"concept": concept, **detect_concept(u_ND, x_ND, text_N, idx, y, np.asarray(exemplars_KD,
                                                                                                 np.float64), cfg)})
    return ConceptResult(per, float(np.mean([p["auroc"] for p in per])),
                         float(np.mean([p["auroc_diffmean"] for p in per])), asdict(cfg))


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


def run_concept_eval(cfg: ConceptEvalConfig, store, run, out, metrics_path=None, plots_dir=None) -> dict:
    """``ep eval concepts``: writes ``out``/metrics.json (per concept and mean AUROC, EP vs
    difference of means) and auroc.png; returns the one-line summary."""
    import torch

    from ep_store import plots
    from ep_store.evaluate import features, tasks
    from ep_store.evaluate.run import evaluation_output, open_evaluation, write_record

    dicts, model, checkpoint = open_evaluation(cfg, store, out, metrics_path, plots_dir)
    rows = tasks.concept_rows(cfg.data)
    concept_texts(rows, cfg.concepts.min_per_class)  # validate before the forward
    texts = list(dict.fromkeys(r.text for r in rows))
    index = {t: i for i, t in enumerate(texts)}
    acts = features.run_texts(dicts, model, checkpoint, texts, run)
    results, metrics = {}, {}
    for d in dicts:
        x = acts.x_ND[d.key.layer]
        u = d.unit(torch.from_numpy(x)).numpy()
        res = concept_detection(u, x, acts.text_N, index, rows, d.exemplars.numpy(), cfg.concepts)
        region_N, _ = d.assign(x)
        for p in res.concepts:
            p["top_tokens"] = features.top_tokens(region_N, acts.token_id_N, acts.token_text, p["region_id"])
        results[str(d.key)] = res
        metrics[str(d.key)] = {"mean_auroc": round(res.mean_auroc, 4),
                               "mean_auroc_diffmean": round(res.mean_auroc_diffmean, 4)}
    with evaluation_output(out, metrics_path, plots_dir, metrics) as tmp:
        image = plots.lines(list(metrics), {"EP best region": [m["mean_auroc"] for m in metrics.values()],
                                            "difference of means": [m["mean_auroc_diffmean"] for m in metrics.values()]},
                            tmp / "mean_auroc.png", f"{model}/{checkpoint}: concept detection", "dictionary",
                            "mean AUROC")
        write_record(tmp, f"Concept detection: {model}/{checkpoint}", {
            "metrics": metrics, "concepts": {k: r.concepts for k, r in results.items()}, "model": model,
            "checkpoint": checkpoint, "texts": len(texts), "tokens": int(len(acts.text_N))}, cfg, run, [image])
    return {"dictionaries": list(metrics), "model": f"{model}/{checkpoint}", "concepts": len(results[str(dicts[0].key)].concepts),
            "texts": len(texts), "out": str(out), "metrics": metrics}
