"""Benchmark: canned SQL questions over >= 1,000,000 assignment rows, and `ep report`.

The store is made here, for real, through the library: a random-init 2-block Gemma-3
model (width 128) with the real Gemma tokenizer harvests the built-in corpus repeated until
there are ``--tokens`` tokens (SQL cost depends on rows, not on vector width), a
dictionary is built on a prefix at a percentile that gives >= 5,000 regions, and every
token is assigned. Baselines in the same run: a full scan of the activation table with its
vectors (what a query would cost if it read them) and the same questions answered by
loading whole columns into numpy.

    python -m pipelines.bench_sql --models-dir data/models --out data/metrics/bench_sql.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from ep_store import jsonio
from ep_store.analysis.report import dictionary_report
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import assign_dataset
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store.core import Store
from pipelines.bench_build import PeakRSS


def make_model(models_dir: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = models_dir / "bench-gemma" / "random"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def timed(fn):
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, round(seconds, 3), round(mem.peak / 2**20, 1)


@click.command()
@click.option("--tokens", type=int, default=1_000_000)
@click.option("--build-tokens", type=int, default=100_000)
@click.option("--percentile", type=float, default=2.0, help="Chosen to give >= 5,000 regions.")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/metrics/bench_sql.json"))
def main(tokens, build_tokens, percentile, models_dir, out):
    """SQL question and report timings over a million-row store; writes JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "models", models_dir / "gemma-3-270m" / "base")
        store = Store(tmp / "store")
        corpus = ",".join(["builtin"] * 8)
        harvest(HarvestConfig("bench-gemma", "random", (1,), corpus=corpus, max_tokens=tokens, ctx=128, batch_size=64,
                              device="cpu"),
                store, tmp / "models", progress=False)
        key = DictionaryKey("bench-gemma", "random", 1, percentile)
        built = build(BuildConfig("bench-gemma", "random", 1, percentile, max_tokens=build_tokens,
                                  saturation_window=10**6, device="cpu"), store, assign=False, progress=False)
        assigned = assign_dataset(store, key, device="cpu", progress=False)

        db = StoreDB(store)
        rows = db.query("SELECT count(*) AS n FROM assignments").column("n")[0].as_py()
        questions = {}
        for name in ("region_sizes", "top_tokens"):
            table, seconds, peak = timed(lambda name=name: ask(db, key, name))
            questions[name] = {"seconds": seconds, "peak_mib": peak, "result_rows": table.num_rows}
        _, report_s, report_peak = timed(lambda: dictionary_report(store, key, tmp / "report"))

        # Baselines, same run: reading the vectors at all, and numpy over whole loaded columns.
        path = store.activation_path(key.activations)
        _, scan_s, scan_peak = timed(lambda: sum(b.num_rows for b in store.scan(path, batch_size=65536)))

        def numpy_region_sizes():
            regions = store.read_table(store.dictionary_dir(key) / "assignments.lance", columns=["region_id"])
            return np.bincount(regions.column(0).to_numpy())

        _, np_s, np_peak = timed(numpy_region_sizes)
        result = {
            "assignment_rows": rows, "regions": built["regions"], "percentile": percentile,
            "activation_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "questions": questions,
            "report": {"seconds": report_s, "peak_mib": report_peak, "regions": built["regions"]},
            "baseline_full_scan_with_vectors": {"seconds": scan_s, "peak_mib": scan_peak},
            "baseline_numpy_region_sizes": {"seconds": np_s, "peak_mib": np_peak},
            "assign_tokens_per_s": assigned["tokens_per_s"],
        }
    jsonio.write(out, result)
    click.echo(jsonio.dumps(result), err=True)


if __name__ == "__main__":
    main()
