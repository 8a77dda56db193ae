"""Benchmark of `ep search` (issue 14): the Lance IVF index against the exact scan, in one run.

Two parts, each through the library (ep_store.analysis.search, search_index), baseline and index in the same process:
- size: ``--rows`` (default 1,000,000) synthetic activations of width 640 (clustered, off-center,
  like a residual stream), a dictionary calibrated/built on a prefix, the index over all rows;
- recall: a real Gemma 3 270M dictionary (``--real-dictionary`` in ``--real-store``), copied
  into a scratch store with its activations, indexed the same way.
For each: index build seconds and bytes; per query, the exact scan and the indexed search
(both end in the same float64 re-ranking), recall@k of the indexed answer against the exact
one (tie-aware: a row as similar as the exact k-th counts; the strict set overlap is reported
too), and p50/p99 latency of both. Queries are region exemplars and stored tokens, and
``--exclude-members`` (boundary) queries on the real dictionary.

    python -m pipelines.bench.bench_search --out data/metrics/bench_search.json

Timings are wall-clock on whatever else the machine runs: compare the two paths of one run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import torch

from ep_store import jsonio
from ep_store.analysis.search import SearchConfig, search
from ep_store.analysis.search_index import IndexConfig, build_index
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, vectors_to_arrow

log = logging.getLogger(__name__)


def synthetic_store(root: Path, rows: int, width: int, seed: int = 0, chunk: int = 100_000) -> str:
    """``rows`` clustered vectors (4,096 clusters of varied spread) plus a dictionary on a prefix."""
    gen = torch.Generator().manual_seed(seed)
    store = Store(root)
    key = ActivationKey("synthetic", "base", 0)
    centers = torch.randn(4096, width, generator=gen) * 2
    offset = torch.randn(width, generator=gen) * 4  # a common direction, as in real activations
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        cluster = torch.randint(0, 4096, (n,), generator=gen)
        spread = torch.rand(n, 1, generator=gen) * 1.5 + 0.5
        x = (centers[cluster] + spread * torch.randn(n, width, generator=gen) + offset).half().numpy()
        r = np.arange(start, start + n)
        tokens = pa.array(cluster.numpy().astype(np.int32)).cast(pa.string())
        store.append_activations(key, pa.table({
            "doc_id": pa.array(r // 128, pa.int64()), "pos": pa.array(r % 128, pa.int32()),
            "token_id": pa.array(cluster.numpy(), pa.int32()), "token": tokens,
            "char_start": pa.array(np.zeros(n), pa.int32()), "char_end": pa.array(np.zeros(n), pa.int32()),
            "vector": vectors_to_arrow(x, np.float16),
        }), {"synthetic": True})
    build(BuildConfig("synthetic", "base", 0, 10, calibration_tokens=20_000, max_tokens=20_000, device="cpu"),
          store, assign=False, progress=False)
    return "synthetic/base/L0/p10"


def copy_real(real_store: Path, key: str, root: Path) -> str:
    """Copy one dictionary and its activations (read-only source) into a scratch store."""
    dkey = DictionaryKey.parse(key)
    src, dst = Store(real_store), Store(root)
    shutil.copytree(src.activation_path(dkey.activations), dst.activation_path(dkey.activations))
    shutil.copytree(src.dictionary_dir(dkey), dst.dictionary_dir(dkey),
                    ignore=shutil.ignore_patterns("foreign"))
    return key


def queries(store: Store, key: str, n: int, seed: int) -> list[dict]:
    """Half region exemplars (largest regions first), half random stored tokens."""
    d = Dictionary.load(store, key)
    rng = np.random.default_rng(seed)
    sizes = d.table.column("member_count").to_numpy()
    regions = np.argsort(-sizes, kind="stable")[: n // 2]
    source = store.activation_path(d.key.activations)
    table = store.read_table(source, ["doc_id", "pos"])
    picks = rng.choice(table.num_rows, n - len(regions), replace=False)
    tokens = [f"{table.column('doc_id')[int(i)].as_py()}:{table.column('pos')[int(i)].as_py()}" for i in picks]
    return [{"region": int(r)} for r in regions] + [{"token": t} for t in tokens]


def compare(store: Store, key: str, qs: list[dict], k: int, exact_every: int = 1, **extra) -> dict:
    """recall@k and latencies of the indexed search against the exact scan over the queries."""
    recalls, strict, exact_s, index_s = [], [], [], []
    for i, q in enumerate(qs):
        if i % exact_every:
            continue
        t0 = time.perf_counter()
        exact, _ = search(SearchConfig(key, k=k, index="never", context=0, **q, **extra), store)
        t1 = time.perf_counter()
        got, summary = search(SearchConfig(key, k=k, index="always", context=0, **q, **extra), store)
        t2 = time.perf_counter()
        want = set(zip(exact.column("doc_id").to_pylist(), exact.column("pos").to_pylist()))
        have = set(zip(got.column("doc_id").to_pylist(), got.column("pos").to_pylist()))
        strict.append(len(want & have) / max(1, len(want)))
        # Tie-aware: real activations repeat exactly (e.g. a chat marker at the same position), so
        # many rows can share the k-th similarity; any of them is a right answer. Both paths'
        # similarities are the same float64 re-scores, so the comparison is exact.
        kth = exact.column("similarity")[-1].as_py() if exact.num_rows else 0.0
        hits = sum(1 for value in got.column("similarity").to_pylist() if value >= kth - 1e-12)
        recalls.append(min(hits, exact.num_rows) / max(1, exact.num_rows))
        exact_s.append(t1 - t0)
        index_s.append(t2 - t1)
    ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1e3, 2)  # noqa: E731
    return {
        "queries": len(recalls), "k": k, f"recall_at_{k}": round(float(np.mean(recalls)), 4),
        f"min_recall_at_{k}": round(float(np.min(recalls)), 4),
        f"strict_recall_at_{k}": round(float(np.mean(strict)), 4),
        "exact_ms_p50": ms(exact_s, 50), "exact_ms_p99": ms(exact_s, 99),
        "index_ms_p50": ms(index_s, 50), "index_ms_p99": ms(index_s, 99),
        "speedup_p50": round(float(np.median(exact_s) / np.median(index_s)), 1),
        "method": summary["method"],
    }


def index_and_compare(store: Store, key: str, index_type: str, qs: list[dict], k: int, partitions: int | None = None,
                      **extra) -> dict:
    cfg = IndexConfig(key, index_type=index_type, num_partitions=partitions, overwrite=True)
    built = build_index(cfg, store)
    result = {"index": {name: built[name] for name in built if name not in ("index", "dictionary")}}
    result["search"] = compare(store, key, qs, k)
    if extra.get("boundary"):
        result["boundary_search"] = compare(store, key, qs[: len(qs) // 2], k, exclude_members=True)
    return result


@click.command()
@click.option("--rows", type=int, default=1_000_000, help="Synthetic vectors (width --width).")
@click.option("--width", type=int, default=640)
@click.option("--queries", "n_queries", type=int, default=40, help="Queries on the real dictionary.")
@click.option("--synthetic-queries", type=int, default=10, help="Queries on the synthetic table (exact scans are slow).")
@click.option("--real-partitions", type=int, default=32,
              help="IVF partitions for the real table (its 20k rows would get 4 by default: all probed).")
@click.option("--k", type=int, default=20)
@click.option("--index-types", default="IVF_SQ,IVF_PQ", help="Index types compared on the real table.")
@click.option("--synthetic-index-types", default="IVF_SQ",
              help="Index types on the synthetic table (IVF_PQ trains ~6x slower here: minutes per 100k rows).")
@click.option("--real-store", type=click.Path(path_type=Path), default=Path("data/store"))
@click.option("--real-dictionary", default="gemma-3-270m/base/L6/p1")
@click.option("--skip-synthetic", is_flag=True, help="Only the real-activation part.")
@click.option("--skip-real", is_flag=True, help="Only the synthetic part.")
@click.option("--synthetic-store", "synthetic_store_path", type=click.Path(path_type=Path), default=None,
              help="Keep the synthetic store here (reused when it already holds --rows rows).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/metrics/bench_search.json"))
def main(rows, width, n_queries, synthetic_queries, real_partitions, k, index_types, synthetic_index_types,
         real_store, real_dictionary, skip_synthetic, skip_real, synthetic_store_path, out) -> None:
    logging.basicConfig(level=logging.INFO)
    report: dict = {"k": k, "note": "wall-clock on a shared 2-core machine; compare paths within one run"}
    types = [t.strip() for t in index_types.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        tmp = Path(tmp)
        dkey = DictionaryKey.parse(real_dictionary)
        if skip_real:
            report["real"] = "skipped (--skip-real)"
        elif (real_store / "dictionaries" / dkey.relpath() / "meta.json").is_file():
            store = Store(tmp / "real")
            key = copy_real(real_store, real_dictionary, store.root)
            qs = queries(store, key, n_queries, seed=1)
            report["real"] = {"dictionary": key, "rows": store.info(store.activation_path(dkey.activations)).rows,
                              "width": Dictionary.load(store, key).width}
            for index_type in types:
                report["real"][index_type] = index_and_compare(store, key, index_type, qs, k, real_partitions,
                                                                      boundary=True)
                log.info("real %s: %s", index_type, report["real"][index_type])
        else:
            report["real"] = f"skipped: no {real_dictionary} in {real_store}"
        if not skip_synthetic:
            store = Store(synthetic_store_path or tmp / "synthetic")
            t0 = time.perf_counter()
            key = "synthetic/base/L0/p10"
            held = store.activation_path(ActivationKey("synthetic", "base", 0))
            if not (store.exists(held) and store.info(held).rows == rows
                    and (store.dictionary_dir(DictionaryKey.parse(key)) / "meta.json").is_file()):
                store.remove(store.root / "activations")
                store.remove(store.root / "dictionaries")
                key = synthetic_store(store.root, rows, width)
            report["synthetic"] = {"rows": rows, "width": width, "make_seconds": round(time.perf_counter() - t0, 1)}
            qs = queries(store, key, synthetic_queries, seed=2)
            for index_type in [t.strip() for t in synthetic_index_types.split(",") if t.strip()]:
                report["synthetic"][index_type] = index_and_compare(store, key, index_type, qs, k)
                log.info("synthetic %s: %s", index_type, report["synthetic"][index_type])
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(out, report)
    click.echo(jsonio.dumps(report))


if __name__ == "__main__":
    main()
