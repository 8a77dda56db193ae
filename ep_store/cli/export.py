"""``ep export``: a dictionary in another tool's own format (ep_store.sae.export)."""

from __future__ import annotations

import click

from ep_store.cli.base import STORE, Registry, emit, user_errors


@click.group("export")
def export_group() -> None:
    """Write a dictionary in another tool's format (SAELens)."""


@export_group.command("saelens")
@click.argument("dictionary_key", metavar="KEY")
@click.option("--out", required=True, help="Folder to write (cfg.json, sae_weights.safetensors, sparsity.safetensors).")
@click.option("--decoder", type=Registry("ep_store.sae.export", "DECODERS"), default="exemplar", show_default=True,
              help="W_dec rows: the exemplar or the unit mean-member direction of each region.")
@click.option("--as-of", default=None, help="Export the build of a Lance tag or version (default: the latest).")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@STORE
@user_errors
def saelens(dictionary_key, out, decoder, as_of, overwrite, store_path) -> None:
    """KEY as a stock SAELens TopK SAE with k = 1: `SAE.load_from_disk(OUT)` encodes each token
    to its region (when its best projection is positive)."""
    from ep_store.sae.export import SAELensExportConfig, export_saelens
    from ep_store.store.core import Store

    cfg = SAELensExportConfig(dictionary=dictionary_key, out=out, decoder=decoder, as_of=as_of, overwrite=overwrite)
    emit(export_saelens(cfg=cfg, store=Store(store_path)))
