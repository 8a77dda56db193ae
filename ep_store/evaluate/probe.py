"""SAEBench sparse probing over pooled feature matrices (issue 10; reused by issue 11).

Protocol (SAEBench sparse probing, Karvonen et al. 2025; as the EP paper ran it): texts are
mean-pooled per feature set; for each class a *balanced* one-vs-rest task (negatives
subsampled to the positives' count, seeded); a stratified train/test split; on the train
split the top-k features by |mean_pos - mean_neg|; an L2 logistic regression (C = 1) on
those k features, standardised on the train split; accuracy on the test split. The
baseline is the same probe on all D raw dimensions. ``ProbeConfig(protocol="paper")`` runs
SAEBench as published instead (``ep_store.evaluate.saebench``: negatives spread evenly over
the other classes, no scaler, raw top-k beside EP top-k, no retention).

    from ep_store.evaluate.probe import ProbeConfig, sparse_probe
    result = sparse_probe({"raw": raw_TD, "ep_onehot": occ_TK, "sae": sae_TF}, labels_T, ProbeConfig())
    result.records()   # one dict per (task, k): raw_accuracy, <name>_accuracy, retention_<name>, ...
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ep_store.errors import UsageError
from ep_store.evaluate import protocols, saebench
from ep_store.evaluate.splits import first_by_content

log = logging.getLogger(__name__)

ALL = "all"  # k meaning every feature of the set


@dataclass(kw_only=True)
class ProbeConfig:
    ks: tuple[int | str, ...] = (1, 2, 5, 20, ALL)
    """Feature counts k of the sparse probes; "all" = every feature. SAEBench uses {1, 2, 5}
    (the EP paper too); 20 and all are added by issue 10."""
    test_fraction: float = 0.2
    """Share of each balanced task held out for testing (SAEBench: 4,000 train / 1,000 test)."""
    max_train: int = 4000
    """Cap on train texts per task (SAEBench's 4,000)."""
    max_test: int = 1000
    """Cap on test texts per task (SAEBench's 1,000)."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (EP paper: L2, C = 1)."""
    max_iter: int = 1000
    """lbfgs iterations of the logistic regression."""
    min_per_class: int = 10
    """Fewest texts a class may have (issue 10: fewer is bad input)."""
    seed: int = 0
    """Seed of the negative subsampling and the split."""
    baseline: str = "raw"
    """Feature set whose all-feature probe is the baseline of the retention ratios."""
    protocol: str = "ours"
    """``ours`` or ``paper`` (SAEBench as published); what each implies: ``protocols.PROBE``."""

    def __post_init__(self):
        protocols.check(self.protocol)
        self.ks = tuple(ALL if str(k) == ALL else int(k) for k in self.ks)
        if not self.ks or any(k != ALL and k < 1 for k in self.ks):
            raise UsageError(f"probe ks must be positive integers or 'all', got {self.ks}")
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if self.C <= 0 or self.min_per_class < 2:
            raise UsageError("probe C must be positive and min_per_class at least 2")


@dataclass
class ProbeRow:
    """One (task, k): test accuracy and AUROC per feature set, and the features chosen."""

    task: str
    positive: str
    k: int | str
    n_train: int
    n_test: int
    accuracy: dict[str, float]
    auroc: dict[str, float]
    chosen: dict[str, list[int]]
    baseline_accuracy: float


@dataclass
class ProbeResult:
    """All rows of one ``sparse_probe`` call; ``records()`` gives the JSON field names."""

    rows: list[ProbeRow]
    names: list[str]
    baseline: str
    config: dict = field(default_factory=dict)
    retention: bool = True
    """Add retention_<short> to the records (protocol ``ours``; SAEBench computes none)."""

    def records(self) -> list[dict]:
        """Flat dicts: task, k, raw_accuracy (the all-D baseline), raw_topk_accuracy,
        <name>_accuracy, <name>_auroc and retention_<short> (= <name>_accuracy / raw_accuracy,
        short = name without "ep_"; when ``retention``) for every other feature set, and the
        chosen features."""
        out = []
        for r in self.rows:
            rec = {"task": r.task, "positive": r.positive, "k": r.k, "n_train": r.n_train, "n_test": r.n_test,
                   f"{self.baseline}_accuracy": r.baseline_accuracy}
            for name in self.names:
                label = f"{name}_topk" if name == self.baseline else name
                rec[f"{label}_accuracy"] = r.accuracy[name]
                rec[f"{label}_auroc"] = r.auroc[name]
                if name != self.baseline and self.retention:
                    rec[f"retention_{name.removeprefix('ep_')}"] = r.accuracy[name] / max(r.baseline_accuracy, 1e-12)
            rec["chosen"] = r.chosen
            out.append(rec)
        return out

    def mean_by_k(self) -> list[dict]:
        """Mean over tasks of every numeric field, per k."""
        by_k: dict = {}
        for rec in self.records():
            by_k.setdefault(rec["k"], []).append(rec)
        out = []
        for k, recs in by_k.items():
            keys = [key for key, v in recs[0].items() if isinstance(v, float)]
            out.append({"k": k, "tasks": len(recs), **{key: float(np.mean([r[key] for r in recs])) for key in keys}})
        return out


def binary_tasks(labels: Sequence) -> list[str]:
    """Positive class of each one-vs-rest task: one task for two classes, else one per class."""
    classes = sorted({str(v) for v in labels})
    return classes[1:] if len(classes) == 2 else classes


def check_labels(labels: Sequence, min_per_class: int) -> None:
    """UsageError unless there are two or more classes of at least ``min_per_class`` texts."""
    values, counts = np.unique(np.asarray([str(v) for v in labels]), return_counts=True)
    if len(values) < 2:
        raise UsageError(f"the labels hold one class only ({values[0] if len(values) else 'none'}); "
                         "probing needs two or more classes")
    small = [f"{v} ({c})" for v, c in zip(values, counts) if c < min_per_class]
    if small:
        raise UsageError(f"fewer than {min_per_class} texts in class {', '.join(small)}; add texts or drop the class")


def balanced_split(y: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of a balanced, stratified split of the binary labels y."""
    rng = np.random.default_rng(cfg.seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n = min(len(pos), len(neg), (cfg.max_train + cfg.max_test) // 2)
    rows = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    n_test = min(max(2, round(2 * n * cfg.test_fraction)), cfg.max_test)
    train, test = train_test_split(rows, test_size=n_test, stratify=y[rows], random_state=cfg.seed)
    return np.sort(train[: cfg.max_train]), np.sort(test)


def top_k_features(X_TF: np.ndarray, y_T: np.ndarray, k: int | str) -> np.ndarray:
    """Indices of the k features with the largest |mean_pos - mean_neg| (SAEBench's selection)."""
    gap = np.abs(X_TF[y_T].mean(0) - X_TF[~y_T].mean(0))
    if k == ALL or k >= X_TF.shape[1]:
        return np.arange(X_TF.shape[1])
    return np.argsort(-gap, kind="stable")[:k]


def split_task(labels: np.ndarray, positive: str, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows of the one-vs-rest task of class ``positive``, as ``cfg.protocol`` draws
    its negatives: at random from all others (``balanced_split``) or evenly (``saebench.even_split``)."""
    if protocols.PROBE[cfg.protocol].negatives == "even":
        return saebench.even_split(labels, positive, cfg.test_fraction, cfg.max_train, cfg.max_test, cfg.seed)
    return balanced_split(labels == positive, cfg)


def fit_probe(X_train, y_train, X_test, y_test, cfg: ProbeConfig) -> tuple[float, float]:
    """(accuracy, AUROC) on the test split of an L2 logistic regression, standardised on the
    train split where the protocol says so (ours; SAEBench's ``train_sklearn_probe`` has no scaler)."""
    probe = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
    if protocols.PROBE[cfg.protocol].scaler:
        probe = make_pipeline(StandardScaler(), probe)
    probe.fit(X_train, y_train)
    score = probe.decision_function(X_test)
    return float(accuracy_score(y_test, probe.predict(X_test))), float(roc_auc_score(y_test, score))


def sparse_probe(features: Mapping[str, np.ndarray], labels: Sequence, cfg: ProbeConfig | None = None,
                 task: str = "task", texts: Sequence[str] | None = None) -> ProbeResult:
    """SAEBench sparse probing of several pooled feature sets on the same texts.

    Contract: ``features`` maps a name to a pooled matrix (N_texts, F_name), every matrix
    with the same N_texts rows in the same text order as ``labels`` (N_texts,) (any
    hashable labels, compared as strings). ``cfg.baseline`` (default "raw") must be one of
    the names: its all-feature probe is the denominator of every retention. Each task
    (one-vs-rest per class; one task for two classes) uses the same balanced split for
    every feature set, so the sets are compared on the same test texts. Pool with
    ``ep_store.evaluate.features.pool_per_text``. ``texts`` (N_texts,), the rows' texts: rows
    are then kept once per content (``splits.first_by_content``, the first copy and its
    label) before anything is split, so no text is on both sides (issue 18, A4). Raises
    UsageError for one class, classes under ``cfg.min_per_class`` texts, or mismatched shapes.
    """
    cfg = cfg or ProbeConfig()
    labels = np.asarray([str(v) for v in labels])
    if cfg.baseline not in features:
        raise UsageError(f"feature sets {sorted(features)} lack the baseline {cfg.baseline!r}")
    for name, X in features.items():
        if np.ndim(X) != 2 or len(X) != len(labels):
            raise UsageError(f"feature set {name!r} has shape {np.shape(X)}; expected ({len(labels)}, F)")
    if texts is not None:
        if len(texts) != len(labels):
            raise UsageError(f"{len(texts)} texts for {len(labels)} labels; pass one text per row")
        keep = first_by_content(texts)
        labels, features = labels[keep], {name: np.asarray(X)[keep] for name, X in features.items()}
    check_labels(labels, cfg.min_per_class)
    names = list(features)
    rows = []
    for positive in binary_tasks(labels):
        y = labels == positive
        train, test = split_task(labels, positive, cfg)
        base_X = np.asarray(features[cfg.baseline], np.float64)
        baseline, _ = fit_probe(base_X[train], y[train], base_X[test], y[test], cfg)
        for k in cfg.ks:
            acc, auc, chosen = {}, {}, {}
            for name in names:
                X = np.asarray(features[name], np.float64)
                cols = top_k_features(X[train], y[train], k)
                acc[name], auc[name] = fit_probe(X[train][:, cols], y[train], X[test][:, cols], y[test], cfg)
                chosen[name] = cols.tolist() if k != ALL else []
            rows.append(ProbeRow(f"{task}/{positive}" if task else positive, positive, k, len(train), len(test),
                                 acc, auc, chosen, baseline))
    return ProbeResult(rows, names, cfg.baseline, asdict(cfg), protocols.PROBE[cfg.protocol].retention)


# -- the `ep eval probe` stage --------------------------------------------------------------------
@dataclass
class ProbeEvalConfig:
    dictionaries: tuple[str, ...]
    """Dictionary keys of one model (layers and percentiles may differ): one forward for all."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    data: str = "builtin"
    """builtin, built-in task names (comma-separated, see ep_store.evaluate.tasks), or a .jsonl/.csv/.parquet/.arrow file."""
    text_field: str = "text"
    """Field of a data file holding the text."""
    label_field: str = "label"
    """Field of a data file holding the class label."""
    model: str | None = None
    """Model to run the texts through (default: the dictionaries'; another model is bad input)."""
    checkpoint: str | None = None
    """Checkpoint to run the texts through (default: the dictionaries')."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """The SAEBench protocol constants (and which protocol: ``probe.protocol``)."""
    top_tokens_k: int = 5
    """Report the regions chosen at this k with their top tokens."""


def _plot_by_k(records_by_dict: dict[str, list[dict]], out) -> dict[str, str]:
    from ep_store import plots

    images = {}
    for key, means in records_by_dict.items():
        ks = [str(m["k"]) for m in means]
        series = {name: [m[name] for m in means] for name in ACCURACIES if name in means[0]}
        slug = key.replace("/", "~")
        images[key] = plots.lines(ks, series, out / f"accuracy_by_k~{slug}.png", f"{key}: sparse probing",
                                  "k (features)", "mean test accuracy")
    return images


def run_probe_eval(cfg: ProbeEvalConfig, store, run, out, metrics_path=None, plots_dir=None) -> dict:
    """``ep eval probe``: sparse probing of raw vs EP one-hot vs EP signed for each dictionary.

    Writes ``out``/metrics.json (per task and k, means per k, the protocol and its settings;
    the DVC metrics file gets the protocol's name beside the headline), accuracy_by_k~<key>.png,
    chosen_regions.json (regions chosen at ``top_tokens_k`` with their top tokens); returns
    the one-line summary. All input checks run before the model is loaded or anything written.
    """
    from ep_store.evaluate import features, tasks
    from ep_store.evaluate.output import dumps
    from ep_store.evaluate.run import evaluation_output, open_evaluation, write_record

    dicts, model, checkpoint = open_evaluation(cfg, store, out, metrics_path, plots_dir)
    task_list = tasks.probe_tasks(cfg.data, cfg.text_field, cfg.label_field)
    check_tasks(task_list, cfg.probe.min_per_class)
    texts = list(dict.fromkeys(text for t in task_list for text in t.texts))
    index = {text: i for i, text in enumerate(texts)}
    acts = features.run_texts(dicts, model, checkpoint, texts, run)
    records, means, chosen, metrics = {}, {}, {}, {}
    for d in dicts:
        key = str(d.key)
        records[key], metrics[key], chosen[key], means[key] = probe_dictionary(d, acts, task_list, index, cfg)
    proto = protocols.record(protocols.PROBE, cfg.probe.protocol, max_tokens_per_text=run.max_tokens_per_text)
    with evaluation_output(out, metrics_path, plots_dir, {"protocol": cfg.probe.protocol, **metrics}) as tmp:
        images = _plot_by_k(means, tmp)
        write_record(tmp, f"Sparse probing ({cfg.probe.protocol} protocol): {model}/{checkpoint}", {
            "records": records, "mean_by_k": means, "metrics": metrics, **proto, "model": model,
            "checkpoint": checkpoint, "texts": len(texts), "tokens": int(len(acts.text_N)),
            "tasks": {t.name: len(t.texts) for t in task_list}},
            cfg, run, images, headline={k: v["all_tasks"] for k, v in metrics.items()})
        (tmp / "chosen_regions.json").write_text(dumps(chosen))
    return {"dictionaries": [str(d.key) for d in dicts], "model": f"{model}/{checkpoint}",
            "protocol": cfg.probe.protocol, "texts": len(texts),
            "tokens": int(len(acts.text_N)), "tasks": len(records[str(dicts[0].key)]) // len(cfg.probe.ks),
            "out": str(out),
            "retention_onehot_k1": {k: v["all_tasks"].get("k1", {}).get("retention_onehot") for k, v in metrics.items()}}


def check_tasks(task_list: list, min_per_class: int) -> None:
    """Refuse (UsageError naming the task) a task whose labels, as probed (first text of each
    content), have fewer than ``min_per_class`` texts in a class."""
    for t in task_list:
        try:
            check_labels([t.labels[i] for i in first_by_content(t.texts)], min_per_class)  # as probed
        except UsageError as err:
            raise UsageError(f"task {t.name}: {err}") from None


def probe_dictionary(d, acts, task_list: list, index: dict[str, int], cfg: ProbeEvalConfig):
    """Every task probed on one dictionary's pooled features: (records, metrics per task and
    all tasks, regions chosen at ``top_tokens_k`` with their top tokens, means per k). The
    paper protocol adds the mean-basis one-hot (``saebench.mean_basis_onehot``) where stored."""
    from ep_store.evaluate import features

    x = acts.x_ND[d.key.layer]
    pooled = features.dictionary_features(x, acts.text_N, acts.n_texts, d)
    region_N, _ = d.assign(x)
    regions = {"ep_onehot": region_N, "ep_signed": region_N}  # whose tokens name a chosen region
    mean = saebench.mean_basis_onehot(x, acts.text_N, acts.n_texts, d) \
        if protocols.PROBE[cfg.probe.protocol].mean_basis else None
    if mean is not None:
        pooled["ep_onehot_mean"], regions["ep_onehot_mean"] = mean
    records, metrics, chosen, results = [], {}, {}, []
    for t in task_list:
        rows = np.array([index[text] for text in t.texts])
        result = sparse_probe({n: X[rows] for n, X in pooled.items()}, t.labels, cfg.probe, task=t.name,
                              texts=t.texts)
        results.append(result)
        records += result.records()
        metrics[t.name] = {f"k{m['k']}": _headline(m) for m in result.mean_by_k()}
        for r in result.rows:
            if r.k == cfg.top_tokens_k:
                chosen[r.task] = {name: [{"region_id": k, "top_tokens": features.top_tokens(
                    region, acts.token_id_N, acts.token_text, k)} for k in r.chosen[name]]
                    for name, region in regions.items()}
    means = ProbeResult([r for res in results for r in res.rows], results[0].names, cfg.probe.baseline,
                        retention=results[0].retention).mean_by_k()
    metrics["all_tasks"] = {f"k{m['k']}": _headline(m) for m in means}
    return records, metrics, chosen, means


ACCURACIES = ("raw_accuracy", "raw_topk_accuracy", "ep_onehot_accuracy", "ep_signed_accuracy",
              "ep_onehot_mean_accuracy")
HEADLINE = (*ACCURACIES, "retention_onehot", "retention_signed")


def _headline(mean: dict) -> dict:
    return {name: round(mean[name], 4) for name in HEADLINE if name in mean}
