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

from ep_store import jsonio
from ep_store.stages import models
from ep_store.stages.capture import batch_inputs, batched
from ep_store.stages.corpus import iter_contexts, iter_documents
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.stages.plan import take_tokens
from ep_store.store.core import Store


def naive_tokens_per_s(cfg: HarvestConfig, models_dir: Path) -> float:
    """Full forward with all hidden states and logits, keeping layer ``cfg.layers[0]``."""
    net, tok = models.load(cfg.model, cfg.checkpoint, models_dir, "cpu", cfg.dtype)
    contexts = take_tokens(iter_contexts(list(iter_documents(cfg.corpus, cfg.text_field)), tok, cfg.ctx), cfg.max_tokens)
    tokens, seconds = 0, 0.0
    for batch in batched(contexts, cfg.batch_size):
        ids, mask, first = batch_inputs(batch, cfg.prefix_ids(tok), tok.pad_token_id or 0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = net(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            kept = out.hidden_states[cfg.layers[0] + 1][:, first:][mask[:, first:].bool()].float().numpy()
        seconds += time.perf_counter() - start
        tokens += kept.shape[0]
    return tokens / seconds


def ray_figures(cfg: HarvestConfig, models_dir: Path, workers: int, local_tok_s: float) -> dict:
    """The Ray engine on the same tokens: startup, end-to-end tok/s, and its overhead vs local."""
    import ray

    from ep_store.stages.engines import RayConfig, ray_harvest

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - start
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = ray_harvest(cfg, Store(Path(tmp) / "store"), models_dir, RayConfig(workers=workers), progress=False)
    finally:
        ray.shutdown()
    return {
        "workers": workers, "ray_init_seconds": round(startup, 2),
        "tokens_per_s": summary["tokens_per_s"],  # plan + tasks (each loads the model) + commit
        "local_tokens_per_s": local_tok_s,
        "speedup_vs_local": round(summary["tokens_per_s"] / local_tok_s, 2),
        "task_forward_seconds": summary["forward_seconds"], "task_write_seconds": summary["write_seconds"],
        "note": "one task per worker, 1 thread each; local uses every core in one process",
    }


@click.command()
@click.option("--model", default="gemma-3-270m")
@click.option("--checkpoint", default="base")
@click.option("--layer", type=int, default=6)
@click.option("--tokens", type=int, default=6144, help="Tokens per run (same batches for both).")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/metrics/bench_harvest.json"))
@click.option("--ray-workers", type=int, default=2, help="Ray path: tasks (0 skips it).")
def main(model, checkpoint, layer, tokens, models_dir, out, ray_workers):
    """Harvest vs naive full forward on the same batches, and the Ray engine vs local; writes JSON."""
    torch.manual_seed(0)
    cfg = HarvestConfig(model, checkpoint, (layer,), corpus="builtin", max_tokens=tokens, ctx=128, batch_size=16,
                        device="cpu", dtype="float32")
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
        "vector_bytes_per_token": summary["vector_bytes_per_token"],
    }
    if ray_workers:
        result["ray"] = ray_figures(cfg, models_dir, ray_workers, summary["tokens_per_s"])
    jsonio.write(out, result)
    click.echo(jsonio.dumps(result), err=True)


if __name__ == "__main__":
    main()
