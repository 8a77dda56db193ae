"""``ep build`` (calibrate and leader-cluster a dictionary) and ``ep assign`` (nearest-exemplar
regions for every token), both from ep_store.stages."""

from __future__ import annotations

import click

from ep_store.cli.base import (
    DEVICE,
    DICTIONARY,
    HOOK,
    PROGRESS,
    STORE,
    Registry,
    emit,
    engine_options,
    ray_config,
    user_errors,
)


@click.command("build")
@click.option("--model", required=True, help="Model of the activation dataset.")
@click.option("--checkpoint", required=True, help="Checkpoint of the activation dataset.")
@click.option("--layer", type=int, required=True, help="Layer of the activation dataset.")
@click.option("--percentile", type=float, required=True, help="p of theta_p, in (0, 100).")
@HOOK
@click.option("--calibration-tokens", type=int, default=200_000, show_default=True, help="Calibration prefix length.")
@click.option("--calibration-batch", type=int, default=2048, show_default=True,
              help="Calibration batch size (the authors: one ~16k-token extraction batch).")
@click.option("--calibration-prefix", type=Registry("ep_store.stages.build", "CALIBRATION_PREFIXES"), default="shared",
              show_default=True, help="shared: the build streams from row 0, calibration rows included; disjoint: "
              "from the row after the calibration prefix (the authors' protocol).")
@click.option("--batch-size", type=int, default=2048, show_default=True, help="Build batch size (saturation unit).")
@click.option("--saturation-window", type=int, default=1, show_default=True, help="Quiet batches before stopping.")
@click.option("--max-tokens", type=int, default=None, help="Token budget (default: whole dataset).")
@click.option("--precision", type=Registry("ep_store.kernels.screen", "PRECISION_CHOICES"), default="auto",
              show_default=True, help="Screening precision: auto is bfloat16 on CUDA or a CPU with native bf16 "
              "(AVX512_BF16, AMX), else float32. Same dictionary to the bit either way (float64 re-checks).")
@click.option("--skip-nonfinite", is_flag=True, help="Drop NaN/inf rows instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Rebuild even if built with other parameters.")
@click.option("--assign/--no-assign", default=True, show_default=True, help="Also assign the dictionary's own tokens.")
@DEVICE
@STORE
@PROGRESS
@user_errors
def build(model, checkpoint, layer, percentile, hook, calibration_tokens, calibration_batch, calibration_prefix,
          batch_size,
          saturation_window, max_tokens, precision, skip_nonfinite, overwrite, assign, device, store_path,
          progress) -> None:
    """Calibrate and leader-cluster an activation dataset into an EP dictionary."""
    from ep_store.stages.build import BuildConfig
    from ep_store.stages.build import build as run
    from ep_store.store.core import Store

    cfg = BuildConfig(model=model, checkpoint=checkpoint, layer=layer, percentile=percentile, hook=hook,
                      calibration_tokens=calibration_tokens, calibration_batch=calibration_batch,
                      calibration_prefix=calibration_prefix, batch_size=batch_size,
                      saturation_window=saturation_window, max_tokens=max_tokens, device=device,
                      precision=precision, skip_nonfinite=skip_nonfinite, overwrite=overwrite)
    emit(run(cfg=cfg, store=Store(store_path), assign=assign, progress=progress))


@click.command("assign")
@DICTIONARY
@click.option("--activations", default=None, help="<model>/<checkpoint>/L<layer> (default: the dictionary's own).")
@DEVICE
@STORE
@PROGRESS
@engine_options
@user_errors
def assign(dictionary_key, activations, device, store_path, progress, engine, address, workers, num_gpus) -> None:
    """Write nearest-exemplar regions and distances for every token of an activation dataset."""
    from ep_store.stages.engines import run_assign
    from ep_store.store.core import Store

    emit(run_assign(store=Store(store_path), dictionary=dictionary_key, activations=activations, device=device,
                    ray_cfg=ray_config(engine, address, workers, num_gpus), progress=progress))
