"""Sparse-probe accuracy of the SAE beside EP and the raw residual (issue 11, reusing issue 10's probe).

The built-in probe tasks' texts run through the dictionary's model once
(``ep_store.evaluate.features.token_activations``, harvest's code path); per text the
features are mean-pooled over its tokens (SAEBench): raw residual, EP one-hot occupancy and
EP signed projection (issue 10's ``dictionary_features``, here for the EP dictionary of the
comparison) and SAE latents (``pool_per_text`` of SAELens encodings, a few texts at a time so
the dense (tokens, width) matrix never exists whole). ``sparse_probe`` then picks the top-k
features by |mean_pos - mean_neg| and fits sklearn's logistic regression, for k = 1 and 5.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ep_store.keys import DictionaryKey
from ep_store.stages.dictionary import Dictionary
from ep_store.store import vectors_to_arrow

log = logging.getLogger(__name__)

KS = (1, 5)  # SAEBench / the EP paper report k in {1, 2, 5}; the issue asks for 1 and 5
TEXTS_PER_CHUNK = 64
NAMES = {"raw_accuracy": "raw (all D)", "raw_topk_accuracy": "raw top-k", "ep_onehot_accuracy": "EP one-hot",
         "ep_signed_accuracy": "EP signed", "sae_accuracy": "SAE"}


def sae_pooled(sae, x_ND: np.ndarray, text_N: np.ndarray, n_texts: int) -> np.ndarray:
    """(n_texts, width) mean SAE activation per text; tokens must be in text order."""
    from ep_store.evaluate.features import pool_per_text
    from ep_store.sae.train import encode

    out = np.zeros((n_texts, sae.cfg.d_sae))
    bounds = np.searchsorted(text_N, np.arange(0, n_texts + TEXTS_PER_CHUNK, TEXTS_PER_CHUNK))
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        first = i * TEXTS_PER_CHUNK
        n = min(TEXTS_PER_CHUNK, n_texts - first)
        if n <= 0:
            break
        values = encode(sae, torch.from_numpy(np.ascontiguousarray(x_ND[lo:hi], np.float32))).cpu().numpy()
        out[first:first + n] = pool_per_text(values, text_N[lo:hi] - first, n)
    return out


def probe_comparison(key: DictionaryKey, center_D: torch.Tensor, theta: float, exemplars_KD: torch.Tensor, sae,
                     models_dir: Path, device: str, data: str = "builtin", progress: bool = False) -> dict:
    """Mean accuracy per k over the probe tasks (``data``: builtin or files) for raw, EP and SAE features.

    Raises UsageError (from issue 10's code) when the model cannot be found or widths disagree.
    """
    from ep_store.evaluate import features, tasks
    from ep_store.evaluate.probe import ProbeConfig, ProbeResult, sparse_probe

    task_list = tasks.probe_tasks(data)
    texts = list(dict.fromkeys(text for t in task_list for text in t.texts))
    index = {text: i for i, text in enumerate(texts)}
    run = features.TextRun(models_dir=Path(models_dir), device=device, progress=progress)
    acts = features.token_activations(key.model, key.checkpoint, [key.layer], texts, run.models_dir,
                                      run.max_tokens_per_text, run.batch_size, run.device, progress=progress,
                                      hook=key.hook)
    x = np.nan_to_num(acts.x_ND[key.layer].astype(np.float32))
    ep = Dictionary(key, {"center": center_D.tolist(), "theta": theta},
                    pa.table({"exemplar": vectors_to_arrow(exemplars_KD.numpy(), np.float32)}))
    pooled = features.dictionary_features(x, acts.text_N, acts.n_texts, ep)
    pooled["sae"] = sae_pooled(sae, x, acts.text_N, acts.n_texts)
    cfg = ProbeConfig(ks=KS)
    rows, per_task = [], {}
    for t in task_list:
        ix = np.array([index[text] for text in t.texts])
        result = sparse_probe({n: X[ix] for n, X in pooled.items()}, t.labels, cfg, task=t.name, texts=t.texts)
        rows += result.rows
        per_task[t.name] = result.mean_by_k()
    mean = ProbeResult(rows, list(pooled), cfg.baseline).mean_by_k()
    return {"mean_by_k": mean, "per_task": per_task, "texts": len(texts), "tokens": int(len(acts.text_N)),
            "tasks": {t.name: len(t.texts) for t in task_list}, "ks": list(KS),
            "table_markdown": table(mean)}


def table(mean_by_k: list[dict]) -> str:
    """Markdown: one row per k, mean test accuracy of each feature set."""
    cols = [c for c in NAMES if any(c in m for m in mean_by_k)]
    lines = ["| k | " + " | ".join(NAMES[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in mean_by_k:
        lines.append(f"| {m['k']} | " + " | ".join(f"{m[c]:.3f}" if c in m else "" for c in cols) + " |")
    return "\n".join(lines)
