"""``ep sae``: train a TopK SAE with SAELens on stored activations, compare it with an EP
dictionary and collect the comparisons (ep_store.sae)."""

from __future__ import annotations

from pathlib import Path

import click

from ep_store.cli.base import DEVICE, DICTIONARY, MODELS, PROGRESS, STORE, emit, user_errors


@click.group()
def sae() -> None:
    """Train a TopK SAE (SAELens) on stored activations and compare it with an EP dictionary."""


@sae.command("train")
@click.option("--activations", required=True, help="<model>/<checkpoint>/L<layer> to train on.")
@click.option("--name", required=True, help="Name of the SAE, e.g. topk-8x.")
@click.option("--width", type=int, default=None, help="SAE features (default: 8 x d_model).")
@click.option("--k", type=int, default=32, show_default=True, help="Active features per token (TopK).")
@click.option("--tokens", type=int, default=200_000, show_default=True, help="Training samples, repeats included.")
@click.option("--heldout-tokens", type=int, default=4000, show_default=True,
              help="Last rows of the dataset never trained on (ep sae compare uses them).")
@click.option("--batch-size", type=int, default=512, show_default=True, help="Activations per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--curves", type=click.Path(path_type=Path), default=None, help="Also write the training curves (CSV).")
@click.option("--overwrite", is_flag=True, help="Replace an SAE of the same name.")
@DEVICE
@STORE
@PROGRESS
@user_errors
def sae_train(activations, name, width, k, tokens, heldout_tokens, batch_size, lr, seed, curves, overwrite, device,
              store_path, progress) -> None:
    """Train a TopK SAE with SAELens, streaming batches from the store; saved in SAELens's format."""
    from ep_store.sae.train import SAETrainConfig, train_sae
    from ep_store.store.core import Store

    cfg = SAETrainConfig(activations=activations, name=name, width=width, k=k, tokens=tokens,
                         heldout_tokens=heldout_tokens, batch_size=batch_size, lr=lr, seed=seed, device=device,
                         overwrite=overwrite)
    emit(train_sae(cfg=cfg, store=Store(store_path), progress=progress, curves_path=curves))


@sae.command("compare")
@DICTIONARY
@click.option("--sae", "sae_name", default=None, help="SAE name trained on the same activations (ep sae train).")
@click.option("--sae-path", default=None, help="Or any SAELens SAE folder (a release, ep export saelens).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for metrics.json and the report.")
@click.option("--heldout-tokens", type=int, default=4000, show_default=True, help="Compare on the last rows.")
@click.option("--top-n", type=int, default=100, show_default=True, help="Top positive tokens per feature.")
@click.option("--min-positives", type=int, default=20, show_default=True, help="Positive tokens to be eligible.")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Also sparse-probe SAE, EP and raw features on the probe tasks.")
@click.option("--probe-data", default="builtin", show_default=True,
              help="Probe tasks: builtin, built-in task names, or a .jsonl/.csv/.parquet file with text and label.")
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def sae_compare(dictionary_key, sae_name, sae_path, out, heldout_tokens, top_n, min_positives, probe, probe_data, device,
                store_path, models_dir, progress) -> None:
    """Shared features of EP and an SAE (F1 > 0.5 shares), probe accuracy and build compute."""
    from ep_store.sae.compare import SAECompareConfig, compare
    from ep_store.sae.report import summary_line
    from ep_store.store.core import Store

    cfg = SAECompareConfig(dictionary=dictionary_key, sae=sae_name, sae_path=sae_path, out=str(out),
                           heldout_tokens=heldout_tokens,
                           top_n=top_n, min_positives=min_positives, device=device, probe=probe,
                           models_dir=str(models_dir), probe_data=probe_data)
    emit(summary_line(compare(cfg=cfg, store=Store(store_path), progress=progress)))


@sae.command("summary")
@click.argument("metrics_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON file to write.")
@user_errors
def sae_summary(metrics_files, out) -> None:
    """Collect the headline figures of several `ep sae compare` metrics.json files into one JSON."""
    from ep_store.sae.report import summarise_files

    emit(summarise_files(paths=list(metrics_files), out=out))
