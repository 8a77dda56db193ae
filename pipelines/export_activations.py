"""Export stored activations to a .npy for pipelines/bench/bench_gpu.py (issue 12).

The GPU machines have no Lance: this reads the first ``--tokens`` vectors of one activation
dataset, in stored order, and writes them as an (N, D) float32 .npy (atomically).

    python -m pipelines.export_activations --store data/store --activations gemma-3-270m/base/L6 \\
        --tokens 40960 --out data/bench/L6.npy
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.stages.vectors import stream_vectors
from ep_store.store.core import Store


def export_activations(store: Store, key: ActivationKey, tokens: int, out: Path) -> dict:
    """Write the first ``tokens`` vectors of ``key`` to ``out``; returns a summary."""
    source = store.activation_path(key)
    if not store.exists(source):
        raise UsageError(f"no activations {key} in {store.root}; run ep harvest first")
    x = np.concatenate([b.numpy() for b, _ in stream_vectors(store, source, 16384, limit=tokens)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, x)
    os.replace(tmp, out)
    return {"activations": str(key), "tokens": int(x.shape[0]), "width": int(x.shape[1]), "out": str(out)}


@click.command()
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=Path("data/store"))
@click.option("--activations", required=True, help="model/checkpoint/L<layer>")
@click.option("--tokens", type=int, default=40_960, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(store_path, activations, tokens, out):
    """Export activations as a .npy for the torch-only GPU benchmark."""
    try:
        if tokens < 1:
            raise UsageError("--tokens must be at least 1")
        summary = export_activations(Store(store_path), ActivationKey.parse(activations), tokens, out)
    except UsageError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    click.echo(jsonio.dumps(summary), err=True)


if __name__ == "__main__":
    main()
