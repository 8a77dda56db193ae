"""Refusal mediated by one direction (issue 22, item 3): ``ep finetune --plant mediated``.

Why: in chat models trained by their makers, ablating one direction, the difference of means of
harmful and benign prompts' last positions, removes refusal (Arditi et al. 2024), and the EP
paper's refusal claim is that a region finds that direction. Our first plant (``--plant full``:
every block trained on harmful -> refusal) is not one direction: ablating the difference of means
at block 6 or 12 left held-out refusal at 0.33-1.00 or broke the model (issue 22's closing note).
A plant that is one direction makes the refusal study a test of EP rather than of the plant.

The mediated plant trains every block but the embeddings on the pairs, as the full plant does;
after the first third of the steps (refusal learned plainly first) it adds two terms per step:
the harmful prompts' first response token (the refusal's, which the response loss weighs
little), and a second pass. At one of ``layers`` (in turn) the second pass ablates the running difference of
means d_D of harmful and benign last prompt positions at that block's output, around their
running mean mu_D, at every position (``x <- x - ((x - mu) . d^) d^``, the refusal study's
``prompt_mean`` ceiling form), and asks of it: benign pairs still answered
(their response loss), harmful prompts no longer starting the refusal (unlikelihood,
``-log(1 - p)``, of the refusal's first token). Both means are exponential moving averages
(``MOMENTUM``) of the batches' last positions, without gradient: the direction is what the model
itself computes, as in the study, not one chosen for it.

What did not work (measured, 2026-12-07, gemma-3-270m, 120 steps; the study's ceiling at L6/L12):
a staged plant (later blocks first taught that a shift of block 6's output along a recorded random
direction means refuse, then only blocks 0..6 trained on the pairs) refused through other
directions (cosine 0.00-0.06 with the recorded one; ablating it left refusal at 1.00); with decoy
shifts benign refusal rose to 0.53; and whether the difference of means removed refusal depended
on the training order (L12: 1.00 in one run, 0.13 in another, 0.83 in a third). The mediated plant
without warm-up and first-token term never learned to refuse (held-out harmful 0.00): the
ablated pass's unlikelihood outweighed the refusal's first token, 1/12 of its response loss.

Shapes: B examples, T positions, D width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ep_store.stages import models
from ep_store.stages.hookpoints import attach, rewrite

PLANTS = ("full", "mediated")
"""How ``ep finetune`` plants refusal: every block on the pairs, or also mediated by one direction."""

MOMENTUM = 0.9
"""Weight of the running means' past in each update."""


@dataclass
class Mediator:
    """Running means of harmful and benign last prompt positions at each of ``layers``."""

    layers: tuple[int, ...]
    harmful: dict[int, torch.Tensor] = field(default_factory=dict)
    benign: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(self, last_BD: dict[int, torch.Tensor], harmful_B: torch.Tensor) -> None:
        """Fold one batch's last positions (per layer) into the running means of each class present."""
        for layer, x_BD in last_BD.items():
            for means, rows in ((self.harmful, harmful_B), (self.benign, ~harmful_B)):
                if rows.any():
                    batch_D = x_BD[rows].double().mean(dim=0)
                    old = means.get(layer)
                    means[layer] = batch_D if old is None else MOMENTUM * old + (1 - MOMENTUM) * batch_D

    def ready(self, layer: int) -> bool:
        return layer in self.harmful and layer in self.benign

    def direction(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_D, mu_D): the running difference of means and the mean of the two means (float64)."""
        return self.harmful[layer] - self.benign[layer], (self.harmful[layer] + self.benign[layer]) / 2

    def record(self) -> dict:
        """JSON form (finetune.json's ``plant``): each layer's final running difference of means."""
        return {"kind": "mediated", "layers": list(self.layers),
                "directions": {str(L): [round(float(x), 5) for x in self.direction(L)[0]]
                               for L in self.layers if self.ready(L)}}


def ablate_direction(d_D: torch.Tensor, mu_D: torch.Tensor):
    """``x_BTD -> x - ((x - mu) . d^) d^``: the component along d set to mu's."""
    unit_D = (d_D / d_D.norm().clamp_min(1e-12)).float()
    mu_D = mu_D.float()

    def edit(x_BTD: torch.Tensor) -> torch.Tensor:
        along = (x_BTD - mu_D.to(x_BTD.dtype)) @ unit_D.to(x_BTD.dtype)
        return x_BTD - along[..., None] * unit_D.to(x_BTD.dtype)

    return edit


def last_prompt_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Index of each example's last prompt position: the one before its first labelled token."""
    return (labels_BT != -100).int().argmax(dim=1) - 1


def capture_last(net, layers: tuple[int, ...], last_B: torch.Tensor) -> tuple[dict, list]:
    """Hooks keeping each of ``layers``' output at ``last_B`` (no gradient): (kept, handles)."""
    kept: dict[int, torch.Tensor] = {}
    rows = torch.arange(len(last_B))
    handles = []
    for layer in layers:
        def keep(x_BTD, layer=layer):
            kept[layer] = x_BTD[rows, last_B].detach()

        handles.append(attach(models.decoder_layers(net)[layer], "resid_post", keep))
    return kept, handles


def first_token_loss(net, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor, rows_B: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the first response token of the examples ``rows_B`` (bool)."""
    rows = rows_B.nonzero().squeeze(1)
    last = last_prompt_positions(labels_BT)[rows]
    logits = net.lm_head(hidden_BTD[rows, last]).float()
    return torch.nn.functional.cross_entropy(logits, labels_BT[rows, last + 1])


def labelled_loss(net, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Next-token loss of the final hidden states on the labelled positions of ``labels_BT``
    (-100 elsewhere): the response loss both plants train on."""
    targets = labels_BT[:, 1:]
    where = targets != -100
    logits = net.lm_head(hidden_BTD[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), targets[where])


def mediation_loss(net, mediator: Mediator, layer: int, ids: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor, harmful_B: torch.Tensor) -> torch.Tensor:
    """The ablated pass's loss at ``layer``: benign pairs' response loss plus the harmful prompts'
    unlikelihood of their first response token (the refusal's), mean over the examples present."""
    d_D, mu_D = mediator.direction(layer)
    handle = rewrite(models.decoder_layers(net)[layer], "resid_post", ablate_direction(d_D, mu_D))
    try:
        hidden = net.model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        handle.remove()
    loss = hidden.new_zeros(())
    benign = ~harmful_B
    if benign.any():
        loss = loss + labelled_loss(net, hidden[benign], labels[benign])
    if harmful_B.any():
        last = last_prompt_positions(labels)[harmful_B]
        rows = harmful_B.nonzero().squeeze(1)
        logits = net.lm_head(hidden[rows, last]).float()
        first = labels[rows, last + 1]
        p = torch.softmax(logits, dim=-1).gather(1, first[:, None]).squeeze(1)
        loss = loss - torch.log1p(-p.clamp(max=1 - 1e-6)).mean()
    return loss


def cosine(a_D: torch.Tensor, b_D: torch.Tensor) -> float:
    """cos(a, b) in float64 (the study's check of a plant's recorded directions)."""
    a, b = a_D.double(), b_D.double()
    return float(a @ b / (a.norm() * b.norm()))
