"""The nearest-exemplar distance as an out-of-distribution score (issue 10; DESIGN.md:
"the distance is a free out-of-distribution score").

The paper reports the within-theta rate and distance quantiles on in-distribution text,
another language and random token ids; we add AUROC (scikit-learn) of the distance at
telling a set's tokens, and its documents (mean distance), from in-distribution ones.

Sets, each ``documents`` texts cut to their first ``max_tokens_per_text`` tokens:
- ``reference``: in-distribution documents of ``--in-corpus`` (label 0 of every AUROC);
- ``heldout``: other in-distribution documents (control: AUROC near 0.5);
- ``shuffled``: the held-out documents with their words shuffled;
- ``random_tokens``: uniformly random non-special token ids, as many as the held-out documents have;
- one set per ``--ood-corpus`` file (.txt/.jsonl/.csv/.parquet/.arrow, as the harvest corpus reads them;
  ``--text-field`` names the field of record files, for the in-corpus's files too: issue 18, B5).
Reference and held-out documents alternate over the *last* 2 x ``documents`` distinct
documents of the in-corpus: the default harvest streams a prefix of ``chat,builtin``, so
these were not in the dictionary's build data. Sets are disjoint by content (issue 18, A4;
``evaluate.splits``): a document repeated in the in-corpus counts once, and an OOD file's
texts that repeat one another or an in-distribution document are dropped.

    ep eval ood --dictionary gemma-3-270m/base/L6/p1 --in-corpus builtin --ood-corpus notes.txt --out DIR
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ep_store.errors import UsageError
from ep_store.evaluate.splits import without_contents

log = logging.getLogger(__name__)

BUILTIN_SETS = ("heldout", "shuffled", "random_tokens")


@dataclass
class OODConfig:
    dictionaries: tuple[str, ...]
    """Dictionary keys of one model: one forward for all."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    in_corpus: str = "builtin"
    """In-distribution corpus spec (as ep harvest --corpus); its last documents are used."""
    ood_corpus: tuple[str, ...] = ()
    """Extra OOD sets: .txt/.jsonl/.csv/.parquet/.arrow files (one set per file)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.csv/.parquet/.arrow rows of the OOD files and the in-corpus's files
    (as ep harvest --text-field; issue 18, B5)."""
    documents: int = 40
    """Documents per set (issue 10 sizes them for the 30-minute default pipeline)."""
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    """Distance quantiles reported per set (the paper reports quantiles and the within-theta rate)."""
    seed: int = 0
    """Seed of the word shuffle and the random token ids."""
    model: str | None = None
    """Model to run the texts through (default: the dictionaries'; another model is bad input)."""
    checkpoint: str | None = None
    """Checkpoint to run the texts through (default: the dictionaries')."""

    def __post_init__(self):
        if self.documents < 2:
            raise UsageError("--documents must be at least 2")
        if not all(0 <= q <= 1 for q in self.quantiles):
            raise UsageError("quantiles must lie in [0, 1]")


@dataclass
class OODResult:
    """Per set: tokens, documents, within-theta rate, quantiles, AUROCs against the reference."""

    sets: dict[str, dict]
    theta: float
    config: dict = field(default_factory=dict)


def distance_stats(distance_N: np.ndarray, theta: float, quantiles) -> dict:
    """Within-theta rate (distance <= theta), mean and quantiles of token distances."""
    return {"tokens": int(len(distance_N)), "within_theta_rate": float(np.mean(distance_N <= theta)),
            "mean_distance": float(np.mean(distance_N)),
            "quantiles": {str(q): float(np.quantile(distance_N, q)) for q in quantiles}}


def ood_auroc(ref_distance_N, ref_doc_N, set_distance_N, set_doc_N) -> dict:
    """AUROC of the distance (higher = more OOD) on tokens and on per-document mean distances."""
    def doc_means(d, doc):
        _, inv = np.unique(doc, return_inverse=True)
        return np.bincount(inv, weights=d) / np.bincount(inv)

    y_tok = np.r_[np.zeros(len(ref_distance_N)), np.ones(len(set_distance_N))]
    ref_docs, set_docs = doc_means(ref_distance_N, ref_doc_N), doc_means(set_distance_N, set_doc_N)
    y_doc = np.r_[np.zeros(len(ref_docs)), np.ones(len(set_docs))]
    return {"auroc_tokens": float(roc_auc_score(y_tok, np.r_[ref_distance_N, set_distance_N])),
            "auroc_documents": float(roc_auc_score(y_doc, np.r_[ref_docs, set_docs])),
            "documents": int(len(set_docs))}


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def in_distribution(spec: str, documents: int, text_field: str = "text") -> tuple[list[str], list[str]]:
    """(reference, heldout): alternating documents among the last 2 x ``documents`` distinct
    documents of ``spec`` (each content once, the first copy kept: no copy on both sides).
    ``text_field``: the text's field in the spec's record files. UsageError for too few documents
    or a file the reader refuses."""
    from ep_store.stages.corpus import iter_documents

    texts = without_contents((d.text for d in iter_documents(spec, text_field=text_field)), ())
    if len(texts) < 2 * documents:
        raise UsageError(f"in-corpus {spec!r} has {len(texts)} documents; it needs {2 * documents} "
                         "(pass a bigger corpus or fewer --documents)")
    tail = texts[-2 * documents:]
    return tail[0::2], tail[1::2]


def ood_files(paths: tuple[str, ...], documents: int, in_distribution: list[str] = (), *,
              text_field: str = "text") -> dict[str, list[str]]:
    """name -> the first ``documents`` texts of each OOD file, each content once and none that is
    an ``in_distribution`` text (issue 18, A4). ``text_field``: the text's field in .jsonl/.csv/.parquet/.arrow
    rows. UsageError for a file left with no text, or one the reader refuses (a missing field is
    named with the fields the file has)."""
    from ep_store.stages.corpus import file_texts

    sets = {}
    for p in paths:
        texts = without_contents((t for _, t in file_texts(Path(p), text_field=text_field)
                                  if isinstance(t, str) and t.strip()),
                                 in_distribution)
        if not texts:
            raise UsageError(f"OOD corpus {p} holds no text that is not also in-distribution text")
        name = Path(p).stem
        if name in sets or name in BUILTIN_SETS or name == "reference":
            raise UsageError(f"two OOD sets would be named {name!r}; rename one file")
        sets[name] = texts[:documents]
    return sets


def random_token_docs(model: str, checkpoint: str, models_dir: Path, like: list[str], max_tokens: int,
                      seed: int) -> list[list[int]]:
    """Uniformly random non-special token ids: one list per text of ``like``, as long as its
    first ``max_tokens`` tokens."""
    from ep_store.stages import models
    from ep_store.stages.corpus import encode

    tokenizer = models.load_tokenizer(model, checkpoint, models_dir)
    vocab = min(len(tokenizer), models.load_config(model, checkpoint, models_dir).vocab_size)
    allowed = np.setdiff1d(np.arange(vocab), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    lengths = [min(len(encode(tokenizer, text)[0]), max_tokens) for text in like]  # as the texts harvest
    rng = np.random.default_rng(seed)
    return [rng.choice(allowed, n).tolist() for n in lengths if n]


def _histograms(per_set: dict[str, np.ndarray], theta: float, path: Path, title: str) -> str:
    from ep_store import plots

    fig, ax = plots.plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, max(1e-6, max(float(d.max()) for d in per_set.values() if len(d))), 40)
    for name, d in per_set.items():
        ax.hist(d, bins=bins, histtype="step", density=True, label=name)
    ax.axvline(theta, color="k", ls="--", label=f"theta {theta:.3g}")
    ax.legend(fontsize=7)
    ax.set_xlabel("distance to nearest exemplar")
    ax.set_ylabel("density")
    ax.set_title(title)
    return plots._save(fig, path)


def run_ood_eval(cfg: OODConfig, store, run, out, metrics_path=None, plots_dir=None) -> dict:
    """``ep eval ood``: writes ``out``/metrics.json (per dictionary and set) and one overlaid
    histogram per dictionary; returns the one-line summary."""
    from ep_store.evaluate import features
    from ep_store.evaluate.run import evaluation_output, open_evaluation, write_record

    dicts, model, checkpoint = open_evaluation(cfg, store, out, metrics_path, plots_dir)
    reference, heldout = in_distribution(cfg.in_corpus, cfg.documents, text_field=cfg.text_field)
    extra = ood_files(cfg.ood_corpus, cfg.documents, reference + heldout, text_field=cfg.text_field)
    rng = np.random.default_rng(cfg.seed)
    sets: dict[str, list] = {"reference": reference, "heldout": heldout,
                             "shuffled": [shuffle_words(t, rng) for t in heldout], **extra}
    sets["random_tokens"] = random_token_docs(model, checkpoint, run.models_dir, heldout, run.max_tokens_per_text,
                                              cfg.seed)
    acts = features.run_texts(dicts, model, checkpoint, [t for v in sets.values() for t in v], run)
    bounds, start = {}, 0
    for name, v in sets.items():
        bounds[name] = (start, start + len(v))
        start += len(v)
    results, metrics = {}, {}
    with evaluation_output(out, metrics_path, plots_dir, metrics) as tmp:
        images = []
        for d in dicts:
            key = str(d.key)
            dist = {}
            _, all_d = d.assign(acts.x_ND[d.key.layer])
            for name, (a, b) in bounds.items():
                m = (acts.text_N >= a) & (acts.text_N < b)
                dist[name] = (all_d[m].astype(np.float64), acts.text_N[m])
            ref_d, ref_doc = dist["reference"]
            per = {"reference": distance_stats(ref_d, d.theta, cfg.quantiles)}
            for name, (dd, doc) in dist.items():
                if name != "reference":
                    per[name] = {**distance_stats(dd, d.theta, cfg.quantiles), **ood_auroc(ref_d, ref_doc, dd, doc)}
            results[key] = OODResult(per, d.theta, asdict(cfg))
            metrics[key] = {name: {k: round(v[k], 4) for k in ("auroc_tokens", "auroc_documents", "within_theta_rate")
                                   if k in v} for name, v in per.items()}
            images.append(_histograms({n: v[0] for n, v in dist.items()}, d.theta,
                                      tmp / f"distances~{key.replace('/', '~')}.png", f"{key}: OOD distances"))
        write_record(tmp, f"OOD distance: {model}/{checkpoint}", {
            "metrics": metrics, "sets": {k: r.sets for k, r in results.items()},
            "theta": {k: r.theta for k, r in results.items()}, "model": model, "checkpoint": checkpoint},
            cfg, run, images)
    return {"dictionaries": list(metrics), "model": f"{model}/{checkpoint}", "sets": list(dist), "out": str(out),
            "auroc_tokens": {k: {n: v.get("auroc_tokens") for n, v in m.items() if n != "reference"}
                             for k, m in metrics.items()}}
