"""Benchmark: `ep harvest` at one layer against the naive full forward, on the same batches.

The naive way (what the reference code does) runs every block plus the 262k-wide
unembedding for each batch and then keeps one hidden state. The harvester stops right after
the requested block. Both run here, in one process, over identical batches; the figure is
their ratio, plus the share of harvest time spent writing Lance commits.

    python -m pipelines.bench_harvest --models-dir data/models --out data/metrics/bench_harvest.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from ep_store import jsonio, models
from ep_store.corpus import iter_contexts, iter_documents
from ep_store.harvest import HarvestConfig, batch_inputs, batched, harvest, take_tokens
from ep_store.store import Store


def naive_tokens_per_s(cfg: HarvestConfig, models_dir: Path) -> float:
    """Full forward with all hidden states and logits, keeping layer ``cfg.layers[0]``."""
    net, tok = models.load(cfg.model, cfg.checkpoint, models_dir, "cpu", cfg.dtype)
    contexts = take_tokens(iter_contexts(list(iter_documents(cfg.corpus)), tok, cfg.ctx), cfg.max_tokens)
    tokens, seconds = 0, 0.0
    for batch in batched(contexts, cfg.batch_size):
        ids, mask, first = batch_inputs(batch, tok.bos_token_id, tok.pad_token_id or 0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = net(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            kept = out.hidden_states[cfg.layers[0] + 1][:, first:][mask[:, first:].bool()].half().numpy()
        seconds += time.perf_counter() - start
        tokens += kept.shape[0]
    return tokens / seconds


@click.command()
@click.option("--model", default="gemma-3-270m")
@click.option("--checkpoint", default="base")
@click.option("--layer", type=int, default=6)
@click.option("--tokens", type=int, default=6144, help="Tokens per run (same batches for both).")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/metrics/bench_harvest.json"))
def main(model, checkpoint, layer, tokens, models_dir, out):
    """Harvest vs naive full forward on the same batches; writes JSON."""
    torch.manual_seed(0)
    cfg = HarvestConfig(model, checkpoint, (layer,), "builtin", tokens, 128, 16, "cpu", "float32")
    naive = naive_tokens_per_s(cfg, models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        summary = harvest(cfg, Store(Path(tmp) / "store"), models_dir, progress=False)
    result = {
        "model": f"{model}/{checkpoint}", "layer": layer, "tokens": summary["tokens"],
        "threads": torch.get_num_threads(),
        "harvest_tokens_per_s": summary["tokens_per_s"],
        "naive_full_forward_tokens_per_s": round(naive, 1),
        "speedup": round(summary["tokens_per_s"] / naive, 2),
        "write_share": summary["write_share"],
        "bytes_written": summary["bytes_written"],
    }
    jsonio.write(out, result)
    click.echo(jsonio.dumps(result), err=True)


if __name__ == "__main__":
    main()
