"""``ep models``: import offline GGUF models and list local checkpoints (ep_store.stages.models)."""

from __future__ import annotations

from pathlib import Path

import click

from ep_store.cli.base import MODELS, PROGRESS, echo_listing, emit, user_errors


@click.group()
def models() -> None:
    """Import and list local model checkpoints."""


@models.command("import-gguf")
@click.argument("name")
@MODELS
@PROGRESS
@user_errors
def models_import_gguf(name: str, models_dir: Path, progress: bool) -> None:
    """Import an offline GGUF model (see `ep models ls`) as a safetensors folder."""
    from ep_store.stages import models as m

    out = m.import_gguf(name, models_dir, progress=progress)
    emit({"model": name, "checkpoint": m.OFFLINE_MODELS[name].checkpoint, "path": str(out)})


@models.command("ls")
@MODELS
@user_errors
def models_ls(models_dir: Path) -> None:
    """List local checkpoints and the offline models that can be imported."""
    from ep_store.stages.models import listing

    echo_listing(*listing(models_dir))
