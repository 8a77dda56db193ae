"""Interventions along EP regions: ablation and steering at the output of decoder block L
(issue 9; DESIGN.md "Intervention"; paper section on refusal).

An intervention is a pure edit plus a hook. The edit is pure torch arithmetic in
ep_store.kernels.edits (shapes: B batch, T positions, D width, K directions):

    ablate(x_BTD, Q_DK, c_D) = (x - c) - ((x - c) Q) Q^T + c       Q: orthonormal columns (QR)
    steer(x_BTD, d_D, alpha, scale) = x + alpha * scale * d         d: unit direction

This module binds edits to a dictionary's regions and a layer (``ablation``, ``steering``), and
``intervene(net, edits)`` is a context manager that registers one hook per edit at the point
its dictionary was harvested: decoder block ``edit.layer``'s output (TransformerLens
``blocks.L.hook_resid_post``) or another hook point (``edit.hook``: resid_pre, attn_out,
mlp_out; ep_store.stages.hookpoints.rewrite; resid_mid is refused), so the edit applies at every position and every generation
step, and removes every handle in ``finally``. Edits compose: several dictionaries and
layers at once; edits on one block apply in the order given. Edits run in the model's own
dtype and on its device.

    from ep_store.studies.intervene import ablation, steering, intervene
    d = Dictionary.load("data/store", "gemma-3-270m/sft/L6/p1")
    with intervene(net, [ablation(d, [12, 40])]):
        net.generate(...)

The steering scale ``s`` is the median ``|a - c|`` over the dictionary's calibration tokens,
stored in meta.json at build time (``scale``); dictionaries built before that field existed
get it computed from their activations' calibration prefix on first use (``steering_scale``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ep_store.errors import UsageError
from ep_store.kernels.calibrate import centered_norms, median_norm
from ep_store.kernels.edits import ablate, orthonormal_basis, steer
from ep_store.keys import DEFAULT_HOOK
from ep_store.stages import hookpoints
from ep_store.stages.models import decoder_layers

log = logging.getLogger(__name__)

BASES = ("exemplar", "mean")
"""Region directions: the exemplar (default) or the region's mean-member direction."""


# -- edits bound to a layer -----------------------------------------------------------------------
@dataclass
class Edit:
    """One intervention at hook point ``hook`` of decoder block ``layer`` (the block output
    unless the dictionary was harvested elsewhere: ep_store.stages.hookpoints; issue 21).

    ``kind`` is "ablate" (uses ``Q_DK`` and ``c_D``) or "steer" (``d_D``, ``alpha``, ``scale``).
    """

    layer: int
    kind: str
    width: int
    Q_DK: torch.Tensor | None = None
    c_D: torch.Tensor | None = None
    d_D: torch.Tensor | None = None
    alpha: float = 0.0
    scale: float = 1.0
    label: str = ""
    hook: str = DEFAULT_HOOK
    _cast: dict = field(default_factory=dict, repr=False)

    def tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The edit's tensors on ``like``'s device and in its dtype (cached per pair)."""
        slot = (like.device, like.dtype)
        if slot not in self._cast:
            parts = (self.Q_DK, self.c_D) if self.kind == "ablate" else (self.d_D,)
            self._cast[slot] = tuple(t.to(like.device, like.dtype) for t in parts)
        return self._cast[slot]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ablate" and self.Q_DK.shape[1] == 0:
            return x  # nothing to remove: the identity, bit for bit (not (x - c) + c)
        if self.kind == "ablate":
            Q, c = self.tensors(x)
            return ablate(x, Q, c)
        (d,) = self.tensors(x)
        return steer(x, d, self.alpha, self.scale)


def region_directions(dictionary, regions: Sequence[int], basis: str = "exemplar") -> torch.Tensor:
    """V_KD: the exemplar or mean-member direction of each region (float32).

    Raises UsageError for an unknown basis or a region id outside 0..K-1.
    """
    if basis not in BASES:
        raise UsageError(f"unknown basis {basis!r}; use {' or '.join(BASES)}")
    n = len(dictionary)
    bad = [r for r in regions if not 0 <= int(r) < n]
    if bad:
        raise UsageError(f"region {bad[0]} is out of range: {dictionary.key} has regions 0..{n - 1}")
    vectors = dictionary.exemplars if basis == "exemplar" else dictionary.mean_directions
    # The exemplar table is written in region order (region_id = row), which Dictionary keeps.
    return vectors[torch.as_tensor([int(r) for r in regions], dtype=torch.long)]


def ablation(dictionary, regions: Sequence[int], basis: str = "exemplar") -> Edit:
    """Ablate the span of the regions' directions (QR) around the dictionary's center."""
    V = region_directions(dictionary, regions, basis)
    label = f"ablate {dictionary.key}:{','.join(map(str, regions))} ({basis})"
    return directions_ablation(dictionary.key.layer, V, dictionary.center.clone(), label, dictionary.key.hook)


def directions_ablation(layer: int, V_KD: torch.Tensor, c_D: torch.Tensor | None = None, label: str = "",
                        hook: str = DEFAULT_HOOK) -> Edit:
    """Ablate the span of any directions V_KD (QR) at block ``layer``'s output, around ``c_D``
    (None: around the origin, ``x - (x Q) Q^T``: Arditi et al.'s directional ablation, which the
    refusal study's difference-of-means ceiling uses; issue 22)."""
    V_KD = V_KD.float()
    c_D = torch.zeros(V_KD.shape[1]) if c_D is None else c_D.float()
    return Edit(layer, "ablate", V_KD.shape[1], Q_DK=orthonormal_basis(V_KD), c_D=c_D, label=label or "ablate",
                hook=hook)


def steering(dictionary, region: int, alpha: float, scale: float, basis: str = "exemplar") -> Edit:
    """Add ``alpha * scale * d`` with ``d`` the region's unit direction."""
    alpha = float(alpha)
    if not np.isfinite(alpha):
        raise UsageError(f"steering alpha must be a finite number, got {alpha}")
    shift = abs(alpha) * float(scale)
    if not shift <= float(np.finfo(np.float32).max):  # also NaN: the hooked activations would be inf/NaN
        raise UsageError(f"steering alpha {alpha:g} x scale {float(scale):g} is beyond float32's range; "
                         "pass a smaller alpha")
    d = region_directions(dictionary, [region], basis)[0]
    d = d / d.norm().clamp_min(1e-12)
    return Edit(dictionary.key.layer, "steer", dictionary.width, d_D=d, alpha=alpha, scale=float(scale),
                label=f"steer {dictionary.key}:{region}={alpha:g} ({basis})", hook=dictionary.key.hook)


def steering_scale(store, dictionary) -> float:
    """The typical ``|a - c|`` of the dictionary's layer: median over its calibration tokens.

    Read from meta.json (``scale``, written at build time); for dictionaries built before
    that field existed, computed from the first ``calibration.tokens`` rows of its
    activation dataset (the same prefix calibration read), non-finite rows left out.
    """
    if dictionary.meta.get("scale") is not None:
        return float(dictionary.meta["scale"])
    from ep_store.stages.vectors import stream_vectors

    path = store.activation_path(dictionary.key.activations)
    if not store.exists(path):
        raise UsageError(f"{dictionary.key} has no stored scale and its activations {dictionary.key.activations} "
                         "are gone; rebuild the dictionary")
    norms = [centered_norms(x, dictionary.center)
             for x, _ in stream_vectors(store, path, 16384, dictionary.meta["calibration"]["tokens"], True)]
    log.info("%s: scale computed from the calibration prefix (built before scale was stored)", dictionary.key)
    return median_norm(torch.cat(norms))


# -- the hook plumbing ----------------------------------------------------------------------------
def check_edits(config, edits: Sequence[Edit]) -> None:
    """UsageError unless every edit's layer exists in the model (its ``transformers`` config)
    and its width is the model's (checkable before the weights are loaded)."""
    n, width = config.num_hidden_layers, config.hidden_size
    for edit in edits:
        if not 0 <= edit.layer < n:
            raise UsageError(f"layer {edit.layer} is out of range: the model has blocks 0..{n - 1}")
        if edit.width != width:
            raise UsageError(f"{edit.label or edit.kind}: dictionary width {edit.width} differs from the "
                             f"model's width {width} at layer {edit.layer}")


@contextlib.contextmanager
def intervene(net: torch.nn.Module, edits: Sequence[Edit]) -> Iterator[torch.nn.Module]:
    """Apply ``edits`` to ``net`` inside the block; every hook comes off on exit, also on error."""
    check_edits(net.config, edits)
    blocks = decoder_layers(net)
    handles = []
    try:
        for edit in edits:
            handles.append(hookpoints.rewrite(blocks[edit.layer], edit.hook, edit.apply))
        yield net
    finally:
        for handle in handles:
            handle.remove()
