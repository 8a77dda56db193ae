"""``ep harvest`` (activations into the store, ep_store.stages) and ``ep store``: list, digest,
compact and verify what the store holds (ep_store.store, ep_store.analysis.verify)."""

from __future__ import annotations

from pathlib import Path

import click

from ep_store.cli.base import (
    CHECKPOINT,
    DEVICE,
    DTYPE,
    HOOK,
    MODEL,
    MODELS,
    PROGRESS,
    STORE,
    Listed,
    Registry,
    echo_listing,
    emit,
    engine_options,
    ray_config,
    user_errors,
)


@click.command("harvest")
@MODEL
@CHECKPOINT
@click.option("--layers", type=Listed(int), required=True, multiple=True,
              help="0-based blocks, comma-separated and/or repeated: 6,12 or --layers 6 --layers 12.")
@click.option("--corpus", default="builtin", show_default=True, help="Comma-separated sources: builtin, chat (the held-out chat prompts), stdlib (source of the evaluation packages), hf:NAME[:CONFIG][:SPLIT] (a streamed Hugging Face dataset), .txt/.jsonl/.csv/.parquet/.arrow files, "
              "Hugging Face datasets folders (save_to_disk), "
              "and chat:FILE (a file in Gemma's chat format: its turn markers become control tokens).")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl/.csv/.parquet/.arrow corpus files and datasets folders.")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Tokens to store.")
@click.option("--ctx", type=int, default=128, show_default=True, help="Tokens per context (BOS not counted).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Contexts per forward pass and commit.")
@HOOK
@DTYPE
@click.option("--overwrite", is_flag=True, help="Replace existing datasets instead of resuming.")
@click.option("--storage-dtype", type=Registry("ep_store.stages.capture", "STORAGE_DTYPES"), default="float32",
              show_default=True, help="Stored vector dtype (float16 halves bytes; batches beyond its range are refused).")
@click.option("--bos", type=Registry("ep_store.stages.plan", "BOS_POLICIES"), default="auto", show_default=True,
              help="BOS before each context: auto follows the tokenizer's convention.")
@click.option("--writer-depth", type=int, default=2, show_default=True,
              help="Batches queued for the background Lance writer while the next forward pass runs "
                   "(0..64; 0 writes each batch before the next; local engine only).")
@DEVICE
@STORE
@MODELS
@PROGRESS
@engine_options
@user_errors
def harvest(model, checkpoint, layers, corpus, text_field, max_tokens, ctx, batch_size, hook, dtype, overwrite,
            storage_dtype, bos, writer_depth, device, store_path, models_dir, progress, engine, address, workers, num_gpus) -> None:
    """Harvest residual-stream activations (any hook point) into versioned Lance tables."""
    from ep_store.stages.engines import run_harvest
    from ep_store.stages.harvest import HarvestConfig
    from ep_store.store.core import Store

    cfg = HarvestConfig(model=model, checkpoint=checkpoint, layers=sum(layers, ()), corpus=corpus,
                        text_field=text_field, max_tokens=max_tokens, ctx=ctx, batch_size=batch_size, device=device,
                        dtype=dtype, overwrite=overwrite, storage_dtype=storage_dtype, bos=bos,
                        writer_depth=writer_depth, hook=hook)
    summary = run_harvest(cfg=cfg, store=Store(store_path), models_dir=models_dir,
                          ray_cfg=ray_config(engine, address, workers, num_gpus), progress=progress)
    summary.pop("config", None)
    emit(summary)


@click.group()
def store() -> None:
    """Inspect the store."""


@store.command("ls")
@STORE
@user_errors
def store_ls(store_path: Path) -> None:
    """List activation datasets and dictionaries with rows, width, versions and tags."""
    from ep_store.store.catalog import listing

    echo_listing(*listing(store_path))


@store.command("digest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metrics", type=click.Path(path_type=Path), default=None,
              help="Also write the digests to this JSON file (a DVC metric).")
@user_errors
def store_digest(paths, metrics) -> None:
    """Digest of the logical content of Lance datasets, files or folders: rows and values in
    stored order, independent of file names, fragment layout and timestamps."""
    from ep_store.store.digest import listing

    echo_listing(*listing(list(paths), metrics))


@store.command("compact")
@click.argument("keys", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Compact every dataset of the store.")
@STORE
@user_errors
def store_compact(keys, all_, store_path) -> None:
    """Merge small fragments of KEYS (m/c/L6 or m/c/L6/p1) into few; rows, order, versions and tags kept."""
    from ep_store.store import Store
    from ep_store.store.fragments import compact_keys

    emit({"compacted": compact_keys(Store(store_path), list(keys), every=all_)})


@store.command("verify")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--rtol", type=float, default=1e-3, show_default=True,
              help="Relative tolerance of floats: vectors (row-wise), theta, center, JSON numbers.")
@click.option("--preserved", type=float, default=0.9, show_default=True,
              help="Share of the larger dictionary's regions (and of assigned tokens) that must match.")
@click.option("--cutoff", type=float, default=0.9, show_default=True,
              help="Exemplar cosine at which a matched region counts as preserved.")
@click.option("--format", "fmt", type=Registry("ep_store.analysis.verify", "ROW_FORMATS"), default="tsv",
              show_default=True, help="stdout rows: path, verdict, detail.")
@user_errors
def store_verify(a, b, rtol, preserved, cutoff, fmt) -> None:
    """Compare two stores or output folders (a reproduction A against a reference B) output by
    output: identical, equivalent (the same computation on another machine) or different.
    Exit 0 when nothing is different, 1 when something is (issue 18, E14.2)."""
    from ep_store.analysis.verify import VerifyConfig, listing

    lines, summary = listing(VerifyConfig(a, b, rtol=rtol, preserved=preserved, cutoff=cutoff), fmt)
    echo_listing(lines, summary)
    if summary["different"]:
        raise SystemExit(1)
