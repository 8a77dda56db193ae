"""``ep export saelens``: an EP dictionary as a stock SAELens TopK SAE with k = 1 (issue 21, item 1).

    ep export saelens gemma-3-270m/base/L6/p1 --out exported/L6p1

No custom class: SAEBench, SAEDashboard and Neuronpedia's SAELens path load the folder with
``sae_lens.SAE.load_from_disk`` as it is. The mapping (DESIGN.md, "EP, precisely"):

- ``b_dec`` = the center c, ``apply_b_dec_to_input`` = True, so the SAE sees x - c;
- ``W_enc`` = E^T (the unit exemplar directions as columns), ``b_enc`` = 0, no decoder-norm
  rescaling: feature k's pre-activation is (x - c).e_k = |x - c| u(x).e_k;
- ``k`` = 1: |x - c| is the same for every feature, so the top-1 pre-activation is the nearest
  exemplar, the token's EP region, whenever that best projection is positive. SAELens's TopK
  applies a ReLU after the top-k: a token whose best projection is <= 0 (cosine distance >= 1
  from every exemplar) encodes to an all-zero row, where ``ep assign`` still names a region;
- ``W_dec`` = the exemplars (``--decoder exemplar``) or the unit mean-member directions
  (``--decoder mean``), so decode(encode(x)) = c + |x - c| cos * direction;
- ``sparsity.safetensors``: log10 of each region's member share (SAELens's feature density file);
- metadata: model, hook (``blocks.<L>.hook_resid_post`` for a block-output harvest), and the
  dictionary's provenance (key, theta, tokens, exemplars version).

Floats near a tie: SAELens's float32 top-1 may pick the other of two exemplars whose
projections agree to float32 rounding, where ``ep assign`` decides in float64.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ep_store import keys
from ep_store.errors import UsageError, require
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store
from ep_store.store.bundle import make_public
from ep_store.store.layout import check_replaceable

DECODERS = ("exemplar", "mean")


@dataclass
class SAELensExportConfig:
    dictionary: str
    """Dictionary key <model>/<checkpoint>/L<layer>/p<p>."""
    out: str
    """Folder to write (cfg.json, sae_weights.safetensors, sparsity.safetensors)."""
    decoder: str = "exemplar"
    """W_dec rows: exemplar (the region's exemplar) or mean (its unit mean-member direction)."""
    as_of: str | None = None
    """Export the build of this tag or Lance version (default: the latest)."""
    overwrite: bool = False
    """Replace an existing export folder."""

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise UsageError(f"unknown --decoder {self.decoder!r}; use {' or '.join(DECODERS)}")


def hook_name(meta: dict) -> str:
    """TransformerLens hook name of the dictionary's activations (block output unless recorded)."""
    return keys.hook_name(meta["layer"], meta.get("hook", keys.DEFAULT_HOOK))


def saelens_sae(d: Dictionary, decoder: str = "exemplar"):
    """The dictionary as an in-memory ``sae_lens.TopKSAE`` (k = 1, float32, CPU)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    K, D = d.exemplars.shape
    meta = d.meta
    metadata = SAEMetadata(model_name=meta["model"], hook_name=hook_name(meta), model_from_pretrained_kwargs={},
                           ep_store={"dictionary": str(d.key), "checkpoint": meta["checkpoint"], "theta": meta["theta"],
                                     "percentile": meta["percentile"], "tokens": meta["tokens"],
                                     "exemplars_version": d.snapshot.exemplars_version if d.snapshot else None,
                                     "decoder": decoder})
    cfg = TopKSAEConfig(d_in=D, d_sae=K, k=1, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                        rescale_acts_by_decoder_norm=False, metadata=metadata)
    sae = TopKSAE(cfg)
    W_dec = d.exemplars if decoder == "exemplar" else torch.nn.functional.normalize(d.mean_directions, dim=1)
    with torch.no_grad():
        sae.W_enc.copy_(d.exemplars.T)
        sae.b_enc.zero_()
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(d.center)
    return sae


EXPORT_FILES = {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}


def check_out(out: Path, store: Store, overwrite: bool) -> Path:
    """``out`` if it is safe to write: UsageError for the store itself or a folder holding it,
    the working folder or one above it, a file, or an existing folder without ``overwrite``
    or that is not an earlier export (``--overwrite`` replaces only those)."""
    check_replaceable(out, "--out")
    target, store_root = out.resolve(), store.root.resolve()
    if target == store_root or target in store_root.parents or store_root in target.parents:
        raise UsageError(f"--out {out} is the store, or holds or lies inside it; "
                         "choose a new folder, e.g. --out exported/NAME")
    if out.is_file():
        raise UsageError(f"--out {out} is a file; choose a folder")
    if out.exists():
        if not overwrite:
            raise UsageError(f"{out} exists; pass --overwrite to replace it or choose another --out")
        if {p.name for p in out.iterdir()} - EXPORT_FILES:
            raise UsageError(f"{out} holds files an export does not write; --overwrite replaces only an earlier "
                             "ep export saelens folder, choose another --out")
    return out


def export_saelens(cfg: SAELensExportConfig, store: Store) -> dict:
    """Write the SAELens folder; returns the summary. The folder appears whole or not at all
    (written beside it, then renamed). Raises UsageError for an unknown dictionary, an empty
    one, or an existing folder without ``overwrite``."""
    require("sae_lens", "sae", "ep export saelens")  # EnvError with the install hint when missing
    out = check_out(Path(cfg.out), store, cfg.overwrite)
    d = Dictionary.load(store, cfg.dictionary, as_of=cfg.as_of)
    if len(d) == 0:
        raise UsageError(f"{d.key} has no regions: nothing to export")
    from sae_lens.constants import SPARSITY_FILENAME
    from safetensors.torch import save_file

    sae = saelens_sae(d, cfg.decoder)
    counts = torch.tensor(d.table.column("member_count").to_numpy(), dtype=torch.float64)
    log_density = torch.log10((counts / max(float(counts.sum()), 1.0)).clamp_min(1e-10)).float()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sae.save_model(staging)
        save_file({"sparsity": log_density}, str(staging / SPARSITY_FILENAME))
        make_public(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"dictionary": str(d.key), "out": str(out), "d_in": d.width, "d_sae": len(d), "k": 1,
            "hook_name": hook_name(d.meta), "decoder": cfg.decoder,
            "dead_regions": int((counts == 0).sum()), "log10_density_mean": round(float(log_density.mean()), 4)
            if math.isfinite(float(log_density.mean())) else None}
