"""AxBench latent concept detection as published (``--protocol paper``; issue 22, item 1).

What differs from ours (``ep_store.evaluate.concepts``), from AxBench (``scripts/inference.py``
``prepare_df``, ``utils/model_utils.get_prefix_length``, ``models/mean.py`` ``DiffMean`` and
``LogisticRegressionModel``) and the EP paper's ``ep/_axbench_ep.py``:

- texts are chat-formatted (``chat_ids``: the tokenizer's template, the text as the model's
  turn by default or as the user's) and the template's prefix tokens are dropped before
  anything is selected or scored (``without_prefix``; AxBench's ``prefix_length``);
- the chosen region is still the one with the largest mean centered cosine on positive minus
  negative tokens, for each basis (exemplar, and mean-member direction where stored);
- a text scores the max over its tokens of the RAW projection x.e (AxBench's probe with the
  chosen unit direction and bias 0: uncentred, magnitude-weighted), ``paper_scores``; the
  difference-of-means direction is scored the same way; hard negatives count as negatives.

    ep eval concepts --dictionary gemma-3-270m/base/all --protocol paper --out DIR
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class ChatTexts(NamedTuple):
    """Texts framed as chat turns, as token ids, and how many template tokens start each."""

    ids: list[list[int]]
    """Model input ids of each text, less the BOS the harvester puts first (``corpus.special_prefix``)."""
    prefix_T: np.ndarray
    """Template tokens before each text's own (int64): excluded from selection and scoring."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_ids(tokenizer, texts: Sequence[str], role: str, max_tokens: int) -> ChatTexts:
    """Each text as the ``role`` ("user" or "model") turn of the tokenizer's chat template.

    ``user``: the template up to the user's content, then the text; ``model``: an empty user
    turn and the generation prompt (``prompts.chat_frame``), then the text as the answer. As
    AxBench, nothing follows the text (its end-of-turn suffix is cut). The text is text:
    special-token strings in it stay characters (``corpus.encode_turn``). Its first
    ``max_tokens`` tokens are kept; the template's come on top. A template token that merges
    with the text's first characters counts as the text's. UsageError if the tokenizer has
    no chat format.
    """
    from ep_store.stages.corpus import encode_turn, special_prefix
    from ep_store.stages.prompts import chat_frame

    before, after = chat_frame(tokenizer)
    head = before if role == "user" else before + after
    frame = encode_turn(tokenizer, head, "", "")
    bos = special_prefix(tokenizer)
    out, prefix = [], []
    for text in texts:
        ids = encode_turn(tokenizer, head, text, "")
        n = common_prefix(ids, frame)
        ids = ids[: n + max_tokens]
        if bos and ids[: len(bos)] == bos:  # the harvester's own BOS goes first (features.context_prefix)
            ids, n = ids[len(bos):], n - len(bos)
        out.append(ids)
        prefix.append(n)
    return ChatTexts(out, np.asarray(prefix, np.int64))


def token_positions(text_N: np.ndarray) -> np.ndarray:
    """Position of each token within its text; tokens come text by text, in order
    (``features.TokenActivations``: one context per text). ValueError otherwise."""
    text_N = np.asarray(text_N)
    if np.any(np.diff(text_N) < 0):
        raise ValueError("tokens are not grouped text by text")
    return np.arange(len(text_N)) - np.searchsorted(text_N, text_N, side="left")


def without_prefix(acts, prefix_T: np.ndarray):
    """``acts`` (``features.TokenActivations``) less each text's first ``prefix_T[text]`` tokens."""
    keep = token_positions(acts.text_N) >= np.asarray(prefix_T)[acts.text_N]
    return dataclasses.replace(acts, x_ND={L: x[keep] for L, x in acts.x_ND.items()}, text_N=acts.text_N[keep],
                               token_id_N=acts.token_id_N[keep])


def concept_activations(dicts, model: str, checkpoint: str, texts: list[str], run, chat: str):
    """Token activations of ``texts`` at every dictionary's layer, framed as ``chat`` turns
    (``chat_ids``) with the template's tokens dropped; plain texts for ``chat="none"``."""
    from ep_store.evaluate import features
    from ep_store.stages import models

    if chat == "none":
        return features.run_texts(dicts, model, checkpoint, texts, run)
    framed = chat_ids(models.load_tokenizer(model, checkpoint, run.models_dir), texts, chat, run.max_tokens_per_text)
    longest = max([len(ids) for ids in framed.ids] + [1])
    acts = features.run_texts(dicts, model, checkpoint, framed.ids,
                              dataclasses.replace(run, max_tokens_per_text=longest))
    return without_prefix(acts, framed.prefix_T)


def max_per_text(score_N: np.ndarray, text_N: np.ndarray, n_texts: int) -> np.ndarray:
    """Max of a token score over each text's tokens, (n_texts,); -inf for a text without tokens."""
    out = np.full(n_texts, -np.inf)
    np.maximum.at(out, text_N, score_N)
    return out


def paper_scores(gap_D: np.ndarray, x_ND: np.ndarray, text_N: np.ndarray, n_texts: int,
                 bases: dict[str, np.ndarray]) -> dict[str, tuple[int, float, np.ndarray]]:
    """Per basis: (best region, its selection score, each text's score (n_texts,)).

    ``gap_D`` = mean u on positive minus negative train tokens; the best region of a basis
    ``B_KD`` maximises gap.b_k (mean cosine contrast); a text scores max over its tokens
    ``x_ND`` (raw, uncentred) of x.b_best."""
    out = {}
    for name, B_KD in bases.items():
        select_K = gap_D @ np.asarray(B_KD, np.float64).T
        best = int(np.argmax(select_K))
        score = np.asarray(x_ND, np.float64) @ np.asarray(B_KD[best], np.float64)
        out[name] = (best, float(select_K[best]), max_per_text(score, text_N, n_texts))
    return out
