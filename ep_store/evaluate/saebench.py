"""SAEBench sparse probing as published (``--protocol paper``; issue 22, item 1).

What differs from ours (``ep_store.evaluate.probe``), each from SAEBench's
``evals/sparse_probing`` (``probe_training.prepare_probe_data``, ``train_sklearn_probe``,
``eval_config``) and the EP paper's table:

- each class's texts are split train/test first; within each split a one-vs-rest task takes
  the positives and as many negatives, spread evenly over the other classes (``even_split``);
- the logistic regression is plain L2 (C = 1) on the k chosen features, no scaler
  (``probe.fit_probe`` with ``protocols.PROBE["paper"]``);
- EP top-k is set beside the raw residual's top-k (SAEBench's identity SAE: top-k raw dimensions
  by |mean_pos - mean_neg|) and all regions beside all raw dimensions; no retention ratio;
- both one-hot bases: the nearest exemplar (``ep_onehot``) and the nearest mean-member
  direction (``ep_onehot_mean``, ``mean_basis_onehot``);
- texts of 128 tokens, 4,000 train / 1,000 test texts per task (the run and ``ProbeConfig``).

    ep eval probe --dictionary gemma-3-270m/base/all --protocol paper --out DIR
"""

from __future__ import annotations

import numpy as np

from ep_store.errors import UsageError


def even_quota(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` negatives each class gives: as even as the class sizes allow.

    Each class gives the same share (one more for a random few when ``n`` does not divide);
    a class smaller than its share gives all it has and the rest is shared among the others.
    UsageError when the classes hold fewer than ``n`` texts together.
    """
    sizes = np.asarray(sizes, np.int64)
    if n > sizes.sum():
        raise UsageError(f"{n} negatives asked from classes holding {int(sizes.sum())} texts")
    quota = np.zeros(len(sizes), np.int64)
    left = n
    while left > 0:
        open_ = np.flatnonzero(quota < sizes)
        share = left // len(open_)
        if share == 0:  # fewer left than open classes: one more each for a random few
            quota[rng.choice(open_, left, replace=False)] += 1
            break
        add = np.minimum(share, sizes[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    return quota


def one_vs_rest(pools: dict[str, np.ndarray], positive: str, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of one split's task: up to ``cap`` positives and as many negatives, evenly spread.

    ``pools`` maps each class to its rows in this split. As SAEBench, the positives set the
    size (here also capped by ``cap`` and by the negatives there are)."""
    others = [c for c in pools if c != positive]
    sizes = np.array([len(pools[c]) for c in others])
    n = int(min(len(pools[positive]), cap, sizes.sum()))
    quota = even_quota(sizes, n, rng)
    parts = [rng.choice(pools[positive], n, replace=False)]
    parts += [rng.choice(pools[c], q, replace=False) for c, q in zip(others, quota)]
    return np.sort(np.concatenate(parts))


def even_split(labels: np.ndarray, positive: str, test_fraction: float, max_train: int, max_test: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of SAEBench's one-vs-rest task for class ``positive``.

    Each class's rows are shuffled and split (``test_fraction`` of them, at least one, held
    out; at least one kept for training); each split is then a balanced task whose negatives
    are spread evenly over the other classes (``one_vs_rest``), at most ``max_train`` /
    ``max_test`` rows (SAEBench: 4,000 / 1,000)."""
    rng = np.random.default_rng(seed)
    train_pools, test_pools = {}, {}
    for c in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(1, round(len(rows) * test_fraction)), len(rows) - 1)
        test_pools[c], train_pools[c] = rows[:n_test], rows[n_test:]
    return (one_vs_rest(train_pools, positive, max_train // 2, rng),
            one_vs_rest(test_pools, positive, max_test // 2, rng))


def mean_basis_onehot(x_ND: np.ndarray, text_N: np.ndarray, n_texts: int, dictionary):
    """(pooled one-hot (n_texts, K), region_N) for the nearest mean-member direction of each token,
    the paper's "mean" basis; None when the dictionary stores no mean directions.

    A token's region here is argmax_k u.m_k with m_k the normalised mean-member direction (ties
    to the lowest id, as ``assign``); pooled it is the share of a text's tokens in each region."""
    import torch

    from ep_store.evaluate.features import occupancy_per_text
    from ep_store.evaluate.protocols import mean_basis
    from ep_store.kernels.assign import nearest_exemplar

    means_KD = mean_basis(dictionary)
    if means_KD is None:
        return None
    x = torch.from_numpy(np.asarray(x_ND, np.float32))
    region_N = nearest_exemplar(dictionary.unit(x), means_KD).region_N.numpy()
    return occupancy_per_text(region_N, text_N, n_texts, len(dictionary)), region_N
