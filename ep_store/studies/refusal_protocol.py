"""The refusal study's protocol options (issue 22, item 1; ep_store.studies.refusal runs the study):
the prompt stream's order per seed, the build's prompt-sized batches, the directions an ablation
removes (exemplar, mean, re-anchored exemplar) and the difference-of-means ceiling.

What the EP paper did, from the authors' scripts/exp_behavioral.py and ep/discovery/pipeline.py:

- **stream order**: a seed shuffles the list of (harmful + benign) training prompts with
  ``numpy.random.default_rng(seed)`` before calibration and the build; which prompts are used
  stays fixed. ``stream_order`` gives that permutation (``rng.permutation(n)`` draws the same
  shuffle as ``rng.shuffle`` of the list);
- **batches** of 16 prompts' tokens for calibration and the saturation rule. Our build cuts
  fixed-size row batches, so ``refusal_prompts.prompt_batch_rows`` sizes them as 16 prompts of
  mean length;
- **re-anchored exemplar**: of a region's members, the one whose direction is nearest (cosine)
  the region's mean-member direction replaces the first-arrival exemplar. The authors pick from
  a reservoir sample of build-time members; ``reanchored_directions`` picks from every harvested
  token the stored dictionary assigns to the region (its Voronoi members), exactly;
- **difference-of-means ceiling** (Arditi et al. 2024): the mean of the harmful training
  prompts' last-position activations minus the benign ones' at a layer, ablated around the
  origin, is the one-direction baseline any region's direction is measured against.

Shapes: N prompts or rows, D width, K directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, arrow_to_tensor
from ep_store.studies.intervene import BASES, Edit, directions_ablation, region_directions
from ep_store.studies.refusal_prompts import Prompts

STUDY_BASES = (*BASES, "reanchored")
"""Directions a refusal-study ablation removes: exemplar, mean, or the re-anchored exemplar."""

SCAN_ROWS = 8192  # rows per read of an activation dataset


# -- the stream -----------------------------------------------------------------------------------
def stream_order(n: int, seed: int | None) -> np.ndarray:
    """The order the ``n`` training prompts are streamed in: file order for ``None``, else the
    authors' seeded shuffle (``numpy.random.default_rng(seed).permutation(n)``)."""
    if seed is None:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)


def reorder(prompts: Prompts, order: Sequence[int]) -> Prompts:
    """``prompts`` in ``order`` (the harvest's doc_id i is prompt ``order[i]``)."""
    return Prompts([prompts.texts[i] for i in order], [prompts.inputs[i] for i in order],
                   [prompts.harmful[i] for i in order])



# -- directions -----------------------------------------------------------------------------------
def basis_directions(store: Store, dictionary: Dictionary, regions: Sequence[int], basis: str) -> torch.Tensor:
    """V_KD of the regions in ``basis``: exemplar and mean as ``intervene.region_directions``,
    ``reanchored`` from the dictionary's own activations (``reanchored_directions``)."""
    if basis not in STUDY_BASES:
        raise UsageError(f"unknown basis {basis!r}; use {', '.join(STUDY_BASES)}")
    if basis == "reanchored":
        region_directions(dictionary, regions)  # the same range check
        return reanchored_directions(store, dictionary, regions)
    return region_directions(dictionary, regions, basis)


def region_ablation(store: Store, dictionary: Dictionary, regions: Sequence[int], basis: str) -> Edit:
    """Ablate the regions' ``basis`` directions around the dictionary's center."""
    label = f"ablate {dictionary.key}:{','.join(map(str, regions))} ({basis})"
    V = basis_directions(store, dictionary, regions, basis)
    return directions_ablation(dictionary.key.layer, V, dictionary.center.clone(), label)


def reanchored_directions(store: Store, dictionary: Dictionary, regions: Sequence[int]) -> torch.Tensor:
    """V_KD: per region, the centered unit direction of the member nearest (largest cosine) the
    region's mean-member direction, members being the tokens of the dictionary's activation
    dataset that it assigns to the region (ties: the first in stored order). A region with no
    member keeps its exemplar (as the authors' code does for an empty reservoir)."""
    wanted = torch.as_tensor([int(r) for r in regions], dtype=torch.long)
    mean_KD = torch.nn.functional.normalize(dictionary.mean_directions[wanted], dim=1)
    best_K = torch.full((len(wanted),), -torch.inf)
    V_KD = dictionary.exemplars[wanted].clone()
    path = store.activation_path(dictionary.key.activations)
    for batch in store.scan(path, columns=["vector"], batch_size=SCAN_ROWS):
        x = arrow_to_tensor(batch.column("vector"))
        region_N = dictionary.assign(x).region_N
        u_ND = dictionary.unit(x)
        for k, r in enumerate(wanted.tolist()):
            rows = torch.nonzero(region_N == r).flatten()
            if len(rows) == 0:
                continue
            cos = u_ND[rows] @ mean_KD[k]
            i = int(cos.argmax())
            if cos[i] > best_K[k]:
                best_K[k], V_KD[k] = cos[i], u_ND[rows[i]]
    return V_KD


# -- the difference-of-means ceiling ---------------------------------------------------------------
def last_positions(store: Store, activations: ActivationKey, n_docs: int) -> torch.Tensor:
    """x_ND: each document's last stored position (its largest ``pos``) of an activation dataset
    whose doc_ids are 0..n_docs-1; UsageError if a document has no row."""
    best = np.full(n_docs, -1)
    x_ND = None
    for batch in store.scan(store.activation_path(activations), columns=["doc_id", "pos", "vector"],
                            batch_size=SCAN_ROWS):
        doc = batch.column("doc_id").to_numpy()
        pos = batch.column("pos").to_numpy()
        x = arrow_to_tensor(batch.column("vector"))
        x_ND = torch.zeros(n_docs, x.shape[1]) if x_ND is None else x_ND
        order = np.lexsort((pos, doc))  # by document, then position: each document's last row
        last = order[np.r_[doc[order][1:] != doc[order][:-1], True]]
        take = last[pos[last] > best[doc[last]]]
        best[doc[take]] = pos[take]
        x_ND[torch.from_numpy(doc[take])] = x[torch.from_numpy(take)]
    if x_ND is None or (best < 0).any():
        raise UsageError(f"{activations}: {int((best < 0).sum())} of {n_docs} prompts have no stored position")
    return x_ND


def diff_of_means(x_ND: torch.Tensor, harmful_N: Sequence[bool]) -> torch.Tensor:
    """d_D = mean of the harmful rows - mean of the benign rows (float64 sums, float32 result)."""
    mask = torch.as_tensor(list(harmful_N), dtype=torch.bool)
    if not mask.any() or mask.all():
        raise UsageError("the difference of means needs harmful and benign prompts")
    x = x_ND.double()
    return (x[mask].mean(dim=0) - x[~mask].mean(dim=0)).float()


def ceiling_edit(layer: int, direction_D: torch.Tensor, center_D: torch.Tensor | None = None) -> Edit:
    """Ablate the difference-of-means direction at ``layer``: around ``center_D`` (EP's own
    centered form, ``ablate``: the component along the direction set to the center's), or around
    the origin when None (Arditi et al.: the component removed, massive activations included)."""
    where = "centered" if center_D is not None else "around the origin"
    return directions_ablation(layer, direction_D[None, :], center_D, f"ablate L{layer} diff-of-means ({where})")
