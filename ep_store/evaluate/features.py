"""Per-token activations of texts and per-text pooled features (issue 10).

``token_activations`` runs a model over texts exactly the way ``ep harvest`` does (its
``LayerCapture``, ``batch_inputs``, tokenisation through ``corpus.iter_contexts``; BOS and
padding rows dropped), so an evaluation sees the activations a dictionary was built from.

Pooling (SAEBench sparse probing: mean over a text's non-special tokens):
    raw        mean residual vector                      (N_texts, D)
    ep_onehot  region occupancy: share of a text's tokens whose nearest exemplar is k (l0 = 1 per token)
    ep_signed  mean signed projection (x - c).e_k; linear, so it equals (mean x - c) @ E.T
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ep_store import models
from ep_store.corpus import Document, iter_contexts
from ep_store.errors import UsageError
from ep_store.harvest import LayerCapture, batch_inputs, batched

log = logging.getLogger(__name__)


@dataclass
class TokenActivations:
    """Activations of every real token of a list of texts, in text order.

    ``x_ND[layer]`` float32 (N tokens, D); ``text_N`` index of each token's text;
    ``token_id_N`` its token id; ``n_texts`` texts in all (a text may have no tokens).
    """

    x_ND: dict[int, np.ndarray]
    text_N: np.ndarray
    token_id_N: np.ndarray
    n_texts: int

    def tokens_of(self, texts: np.ndarray) -> np.ndarray:
        """Boolean mask (N,) of the tokens that belong to the given text indices."""
        return np.isin(self.text_N, texts)


def token_activations(model: str, checkpoint: str, layers: Sequence[int], texts: Sequence[str],
                      models_dir: Path, max_tokens_per_text: int = 64, batch_size: int = 16,
                      device: str = "auto", dtype: str = "float32", progress: bool = False) -> TokenActivations:
    """Run ``model``/``checkpoint`` over ``texts`` and keep blocks ``layers``' outputs.

    Each text is tokenised without special tokens and cut to its first
    ``max_tokens_per_text`` tokens (one context; harvest's code path). Raises UsageError
    when a layer is out of range or the model cannot be found.
    """
    config = models.load_config(model, checkpoint, models_dir)
    bad = [L for L in layers if not 0 <= L < config.num_hidden_layers]
    if bad:
        raise UsageError(f"layer {bad[0]} is out of range: {model} has blocks 0..{config.num_hidden_layers - 1}")
    models.resolve_device(device)
    net, tokenizer = models.load(model, checkpoint, models_dir, device, dtype)
    dev = next(net.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    documents = [Document(i, f"text:{i}", t) for i, t in enumerate(texts)]
    # One context per text: its first max_tokens_per_text tokens (iter_contexts yields start 0 first).
    contexts = [c for c in iter_contexts(documents, tokenizer, max_tokens_per_text) if c.start_pos == 0]
    capture = LayerCapture(models.decoder_layers(net), layers)
    parts: dict[int, list[np.ndarray]] = {L: [] for L in layers}
    text_ids, token_ids = [], []
    try:
        for batch in tqdm(list(batched(contexts, batch_size)), desc=f"forward {model}/{checkpoint}",
                          unit="batch", disable=not progress):
            ids, mask, first = batch_inputs(batch, tokenizer.bos_token_id, pad_id)
            with torch.inference_mode():
                hidden = capture.run(net, ids.to(dev), mask.to(dev))
            keep = mask[:, first:].bool().reshape(-1).to(dev)  # real tokens only, in row order
            for L in layers:
                h = hidden[L][:, first:].reshape(-1, hidden[L].shape[-1])[keep]
                parts[L].append(h.to(torch.float32).cpu().numpy())
            for c in batch:
                text_ids += [c.doc_id] * len(c.token_ids)
                token_ids += c.token_ids
    finally:
        capture.remove()
    width = config.hidden_size
    x = {L: np.concatenate(p) if p else np.zeros((0, width), np.float32) for L, p in parts.items()}
    return TokenActivations(x, np.asarray(text_ids, np.int64), np.asarray(token_ids, np.int64), len(texts))


def pool_per_text(values_NF: np.ndarray, text_N: np.ndarray, n_texts: int) -> np.ndarray:
    """Mean of each text's token rows: (N, F) -> (n_texts, F), float64; a text with no tokens gets 0.

    The pooling of SAEBench sparse probing (mean over non-special tokens). Reused by issue 11
    for SAE latents: pass their (N, F) activations and the same ``text_N``.
    """
    values_NF = np.asarray(values_NF, dtype=np.float64)
    if values_NF.ndim != 2 or values_NF.shape[0] != len(text_N):
        raise ValueError(f"values {values_NF.shape} and text_N {np.shape(text_N)} disagree")
    sums = np.zeros((n_texts, values_NF.shape[1]))
    np.add.at(sums, text_N, values_NF)
    counts = np.bincount(text_N, minlength=n_texts)[:, None]
    return sums / np.maximum(counts, 1)


def occupancy_per_text(region_N: np.ndarray, text_N: np.ndarray, n_texts: int, n_regions: int) -> np.ndarray:
    """EP one-hot pooled: (n_texts, K) share of each text's tokens assigned to region k.

    Equals ``pool_per_text(one_hot(region_N), ...)`` without building the (N, K) one-hot.
    Tokens with region -1 (non-finite activations) count in the denominator only.
    """
    region_N, text_N = np.asarray(region_N), np.asarray(text_N)
    counts = np.bincount(text_N, minlength=n_texts)[:, None]
    occ = np.zeros((n_texts, n_regions))
    ok = region_N >= 0
    np.add.at(occ, (text_N[ok], region_N[ok]), 1.0)
    return occ / np.maximum(counts, 1)


def signed_per_text(raw_TD: np.ndarray, center_D: np.ndarray, exemplars_KD: np.ndarray) -> np.ndarray:
    """EP signed readout pooled: mean over tokens of (x - c).e_k = (mean x - c) @ E.T, (n_texts, K)."""
    return (np.asarray(raw_TD, np.float64) - np.asarray(center_D, np.float64)) @ np.asarray(exemplars_KD, np.float64).T


def dictionary_features(x_ND: np.ndarray, text_N: np.ndarray, n_texts: int, dictionary) -> dict[str, np.ndarray]:
    """The three pooled feature sets of issue 10 for one dictionary: raw, ep_onehot, ep_signed.

    ``dictionary`` is an ``ep_store.dictionary.Dictionary`` of width D. Returns float64
    matrices (n_texts, D), (n_texts, K), (n_texts, K).
    """
    x_ND = np.asarray(x_ND, np.float32)
    if x_ND.shape[1] != dictionary.width:
        raise UsageError(f"activations of width {x_ND.shape[1]} cannot be read with {dictionary.key} "
                         f"(width {dictionary.width}); run the texts through the dictionary's own model")
    region_N, _ = dictionary.assign(x_ND) if len(x_ND) else (np.zeros(0, np.int64), None)
    raw = pool_per_text(x_ND, text_N, n_texts)
    return {
        "raw": raw,
        "ep_onehot": occupancy_per_text(region_N, text_N, n_texts, len(dictionary)),
        "ep_signed": signed_per_text(raw, dictionary.center.numpy(), dictionary.exemplars.numpy()),
    }
