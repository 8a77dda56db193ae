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
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ep_store.errors import UsageError
from ep_store.keys import DEFAULT_HOOK
from ep_store.stages import models
from ep_store.stages.capture import LayerCapture, batch_inputs, batched
from ep_store.stages.corpus import Context, Document, iter_contexts

log = logging.getLogger(__name__)


@dataclass
class TokenActivations:
    """Activations of every real token of a list of texts, in text order.

    ``x_ND[layer]`` float32 (N tokens, D); ``text_N`` index of each token's text;
    ``token_id_N`` its token id; ``token_text`` id -> decoded text; ``n_texts`` texts in
    all (a text may have no tokens).
    """

    x_ND: dict[int, np.ndarray]
    text_N: np.ndarray
    token_id_N: np.ndarray
    n_texts: int
    token_text: dict[int, str] = field(default_factory=dict)

    def tokens_of(self, texts: np.ndarray) -> np.ndarray:
        """Boolean mask (N,) of the tokens that belong to the given text indices."""
        return np.isin(self.text_N, texts)


def token_activations(model: str, checkpoint: str, layers: Sequence[int], texts: Sequence[str],
                      models_dir: Path, max_tokens_per_text: int = 64, batch_size: int = 16,
                      device: str = "auto", dtype: str = "float32", progress: bool = False,
                      hook: str = DEFAULT_HOOK) -> TokenActivations:
    """Run ``model``/``checkpoint`` over ``texts`` and keep hook point ``hook`` (default: the
    output) of blocks ``layers``.

    Each text is tokenised without special tokens and cut to its first
    ``max_tokens_per_text`` tokens (one context; harvest's code path); a text may also be
    a list of token ids. Raises UsageError
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
    prefix = context_prefix(tokenizer)
    contexts = first_contexts(texts, tokenizer, max_tokens_per_text)
    capture = LayerCapture(models.decoder_layers(net), layers, hook)
    parts: dict[int, list[np.ndarray]] = {L: [] for L in layers}
    text_ids, token_ids = [], []
    try:
        for batch in tqdm(list(batched(contexts, batch_size)), desc=f"forward {model}/{checkpoint}",
                          unit="batch", disable=not progress):
            ids, mask, first = batch_inputs(batch, prefix, pad_id)
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
    token_text = {int(t): tokenizer.decode([int(t)]) for t in set(token_ids)}
    return TokenActivations(x, np.asarray(text_ids, np.int64), np.asarray(token_ids, np.int64), len(texts), token_text)


def context_prefix(tokenizer):
    """What harvest puts before each context: since issue 8 (``corpus.special_prefix``) the
    tokenizer's own BOS convention as a list of ids; before it, the BOS id (or None)."""
    try:
        from ep_store.stages.corpus import special_prefix
    except ImportError:
        return tokenizer.bos_token_id
    return special_prefix(tokenizer)


def _id_context(doc_id: int, ids: list[int]) -> Context:
    """A context of given token ids (no text: empty offsets and token strings)."""
    extra = [[""] * len(ids)] if "tokens" in Context.__dataclass_fields__ else []  # issue 8 adds token strings
    return Context(doc_id, 0, ids, [(0, 0)] * len(ids), *extra)


def first_contexts(texts: Sequence, tokenizer, max_tokens: int) -> list[Context]:
    """One context per text: its first ``max_tokens`` tokens (tokenised as harvest does).

    A text given as a list of token ids (e.g. uniformly random ids for the OOD check) is
    used as is; empty texts yield no context.
    """
    contexts, strings = [], []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            strings.append(Document(i, f"text:{i}", t))
        elif len(t):
            ids = [int(v) for v in t[:max_tokens]]
            contexts.append(_id_context(i, ids))
    # iter_contexts yields each document's contexts in order, the one at position 0 first
    contexts += [c for c in iter_contexts(strings, tokenizer, max_tokens) if c.start_pos == 0]
    return sorted(contexts, key=lambda c: c.doc_id)


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

    ``dictionary`` is an ``ep_store.stages.dictionary.Dictionary`` of width D. Returns float64
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


ALL_OF = "/all"  # <model>/<checkpoint>/all: every dictionary of that checkpoint in the store


def expand_keys(store, keys: Sequence[str]) -> list[str]:
    """Keys with ``<model>/<checkpoint>/all`` replaced by every such dictionary in the store
    (so a pipeline stage names a checkpoint, and params keep one list of layers)."""
    from ep_store.store.core import Store

    store = store if isinstance(store, Store) else Store(store)
    out = []
    for key in keys:
        if not key.endswith(ALL_OF):
            out.append(key)
            continue
        found = [str(k) for k in store.list_dictionaries() if f"{k.model}/{k.checkpoint}" == key[: -len(ALL_OF)]]
        if not found:
            known = ", ".join(str(k) for k in store.list_dictionaries()) or "none"
            raise UsageError(f"no dictionaries match {key} in {store.root} (known: {known})")
        out += found
    return list(dict.fromkeys(out))


def load_dictionaries(store, keys: Sequence[str], model: str | None = None, checkpoint: str | None = None):
    """Dictionaries ``keys`` and the (model, checkpoint) their texts run through.

    Every dictionary must come from one model; by default the texts run through the
    dictionaries' own checkpoint. ``model``/``checkpoint`` override it (e.g. a base
    dictionary read on a fine-tuned checkpoint's activations); a model other than the
    dictionaries' is a UsageError (issue 10, bad input).
    """
    from ep_store.stages.dictionary import Dictionary

    if not keys:
        raise UsageError("pass at least one --dictionary KEY (<model>/<checkpoint>/L<layer>/p<p>)")
    dicts = [Dictionary.load(store, k) for k in expand_keys(store, keys)]
    sources = {(d.key.model, d.key.checkpoint) for d in dicts}
    if len({m for m, _ in sources}) > 1:
        raise UsageError(f"dictionaries come from several models ({', '.join(sorted(m for m, _ in sources))}); "
                         "evaluate one model per run")
    own_model = dicts[0].key.model
    if model is not None and model != own_model:
        raise UsageError(f"{dicts[0].key} was built from {own_model}, not {model}; run the texts through "
                         f"{own_model} (drop --model) or pick a dictionary of {model}")
    if checkpoint is None and len(sources) > 1:
        raise UsageError("dictionaries come from several checkpoints; pass --checkpoint to run one of them")
    return dicts, own_model, checkpoint or dicts[0].key.checkpoint


@dataclass
class TextRun:
    """What an evaluation needs about how texts become tokens."""

    models_dir: Path = Path("data/models")
    """Folder of local model checkpoints."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    max_tokens_per_text: int = 64
    """Tokens kept per text (its first ones), bounding the cost on 2 CPU cores."""
    batch_size: int = 16
    """Texts per forward pass."""
    device: str = "auto"
    """auto, cpu or cuda."""
    progress: bool = False
    """Show a progress bar over forward batches."""

    def __post_init__(self):
        if self.max_tokens_per_text < 1 or self.batch_size < 1:
            raise UsageError("--max-tokens-per-text and --batch-size must be positive")


def run_texts(dicts, model: str, checkpoint: str, texts: Sequence, run: TextRun) -> TokenActivations:
    """Token activations at every dictionary's layer (one forward for all); width checked.
    UsageError when the dictionaries read different hook points (evaluate them apart)."""
    layers = sorted({d.key.layer for d in dicts})
    hooks = sorted({d.key.hook for d in dicts})
    if len(hooks) > 1:
        raise UsageError(f"the dictionaries read different hook points ({', '.join(hooks)}); evaluate the "
                         "dictionaries of one hook point at a time")
    acts = token_activations(model, checkpoint, layers, texts, run.models_dir, run.max_tokens_per_text,
                             run.batch_size, run.device, progress=run.progress, hook=hooks[0] if hooks else DEFAULT_HOOK)
    for d in dicts:
        if acts.x_ND[d.key.layer].shape[1] != d.width:
            raise UsageError(f"{model}/{checkpoint} layer {d.key.layer} has width "
                             f"{acts.x_ND[d.key.layer].shape[1]} but {d.key} has width {d.width}")
    return acts


def top_tokens(region_N: np.ndarray, token_id_N: np.ndarray, token_text: dict[int, str], region: int,
               n: int = 5) -> list[list]:
    """[[token, count], ...] most frequent tokens assigned to ``region`` among evaluated tokens."""
    ids, counts = np.unique(token_id_N[region_N == region], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n]
    return [[token_text.get(int(ids[i]), str(ids[i])), int(counts[i])] for i in order]
