"""Scale on paper, from measurements (issue 13): wall time, storage and cost of harvesting
and building EP dictionaries of 10M, 100M and 1B tokens on 1, 8 and 64 workers/GPUs.

Every input figure is either read from a benchmark JSON of this project (``data/metrics``),
from the saturation curves of the default pipeline's dictionaries (``data/store``), or is a
documented constant with its source (the H200 measurements in shared/DESIGN.md). The
output is ``docs/scale.md`` (Markdown table + the inputs and their sources) and the same
numbers as JSON.

Model (linear in what was measured; the one assumption is the region-growth exponent):
- harvest: embarrassingly parallel over stream shards, ``tokens / (per_worker_tok_s * W)``;
  one Lance commit per layer at the end (negligible, measured as the write share).
- storage: ``bytes_per_token = d * bytes(dtype) + row metadata`` (measured per token).
- build: one ordered pass, so one process; screening costs ``2 * K(n) * d`` FLOPs per
  token, with ``K(n) = a * n^b`` anchored at the regions the default pipeline's p1
  dictionaries reached (b assumed, see fit_region_growth); at ``G`` GPUs the exemplar matrix
  is split into ``G`` K-shards, each device screens its shard and the row max over shards
  keeps the rule exact, so screening time divides by ``G`` (one all-reduce of B floats per
  batch is ignored: 8k floats x 64 GPUs per batch is microseconds on NVLink).

    python -m pipelines.bench.scale_model --metrics data/metrics --store data/store --out docs/scale.md
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from ep_store import jsonio

# H200 figures measured on a lent machine (shared/DESIGN.md, "Measured on a lent NVIDIA
# H200", torch 2.11, 2026-11-30). They are inputs here, cited, not re-measured.
H200 = {
    "bf16_peak_tflops": 790.0,
    "builder_share_of_bf16_peak": 0.17,  # K0=131,072, batch 8,192, width 2,304
    "harvest_tok_s_gemma2_2b_block12": 165_000.0,  # random-init Gemma-2-2B shape, bf16
    "harvest_tok_s_gemma3_270m_layer6": None,  # not measured on the GPU; scaled below
}
GPU_DOLLARS_PER_HOUR = 3.0  # assumption: an on-demand H100/H200-class GPU hour, 2026 list prices
CPU_DOLLARS_PER_HOUR = 0.10  # assumption: one 2-vCPU cloud machine like this one

TOKENS = (10_000_000, 100_000_000, 1_000_000_000)
WORKERS = (1, 8, 64)


@dataclass
class ModelShape:
    name: str
    width: int
    """d_model: floats stored per token per layer."""
    harvest_tok_s_cpu: float
    """Measured (or scaled) harvest tokens/s of one 2-core worker."""
    harvest_tok_s_gpu: float
    """Harvest tokens/s of one GPU worker."""
    sources: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    bytes_per_token_meta: float
    """Row metadata bytes per token (doc_id, pos, token_id, token text, offsets), measured."""
    vector_bytes: int
    """Bytes per stored float (2 for float16/bfloat16, 4 for float32)."""
    cpu_build_gflops: float
    """Screening GFLOP/s achieved by the CPU builder (bench_build, p1)."""
    gpu_build_tflops: float
    """Screening TFLOP/s of the GPU builder (H200 share of peak x peak)."""
    k_fit: tuple[float, float]
    """K(n) = a * n^b, fitted on the default pipeline's p1 saturation curves."""
    models: list[ModelShape]
    sources: dict[str, str]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fit_region_growth(store: Path, percentile: float = 1.0, exponent: float = 0.5) -> tuple[float, float, str]:
    """``K(n) = a n^b`` anchored at the regions the default pipeline's p``percentile``
    dictionaries reached (the mean over them of ``K / n^b`` at their last batch).

    The exponent is an assumption, not a fit: at the pipeline's 20,000 tokens the p1
    saturation curves have not bent yet (they mix chat prompts and library prose), and a
    log-log fit over them gives b > 1, which no leader clustering can sustain (K <= n).
    b = 0.5 is the middle of Heaps' law exponents for vocabulary growth in English text
    (0.4-0.6); pass ``--exponent`` to see the table under another value.
    """
    anchors, used = [], []
    for meta_path in sorted(store.glob(f"dictionaries/*/*/L*/p{percentile:g}/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("tokens") and meta.get("regions"):
            anchors.append(meta["regions"] / meta["tokens"] ** exponent)
            used.append(f"{meta_path.parent.relative_to(store)} ({meta['regions']:,} regions at {meta['tokens']:,} tokens)")
    if not anchors:
        return 5782 / 50_800**exponent, exponent, (f"b = {exponent} assumed, anchored at DESIGN.md's 5,782 regions at 50,800 "
                                                   "tokens (no dictionaries found)")
    return float(np.mean(anchors)), exponent, (f"b = {exponent} assumed (Heaps-like; see fit_region_growth), anchored at "
                                               + "; ".join(used))


def gather_inputs(metrics: Path, store: Path, exponent: float = 0.5) -> Inputs:
    sources = {}
    harvest = _read(metrics / "bench_harvest.json") or {}
    build = _read(metrics / "bench_build.json") or {}
    tok_s = harvest.get("harvest_tokens_per_s", 2977.0)
    sources["harvest_tok_s_cpu"] = ("data/metrics/bench_harvest.json" if harvest
                                    else "README closing note of issue 2 (2,977 tok/s, Gemma 3 270M L6, 2 cores)")
    tokens = harvest.get("tokens") or 6144
    written = harvest.get("bytes_written")
    vector_bytes = int(harvest.get("vector_bytes_per_token", 640 * 4)) // 640  # bench_harvest runs Gemma 3 270M
    meta_bytes = max(written / tokens - 640 * vector_bytes, 0.0) if written else 40.0
    sources["bytes_per_token_meta"] = "bench_harvest bytes_written / tokens minus the vector" if written else "assumed 40 B"
    p1 = next((r for r in build.get("percentiles", []) if r.get("percentile") in (1, 1.0)), None)
    # The precision ``ep build --precision auto`` took on the benchmark's machine (issue 20).
    auto = (p1 or {}).get("build", {}).get((p1 or {}).get("precision_auto"), {})
    cpu_gflops = auto.get("screen_gflops", 210.0)
    sources["cpu_build_gflops"] = (f"data/metrics/bench_build.json (L{p1.get('layer', 6)} p1, {p1['precision_auto']})"
                                   if auto else "issue 3 closing note (210 GFLOP/s)")
    a, b, fit_source = fit_region_growth(store, exponent=exponent)
    sources["k_fit"] = fit_source
    sources["gpu"] = "shared/DESIGN.md: H200 bf16 peak 790 TFLOP/s, builder 17% of it at K=131k, harvest 165k tok/s (Gemma-2-2B shape, block 12)"
    # A 2B model costs about 8x the FLOPs per token of the 270M one (2.6B vs 0.27B params,
    # of which the embeddings are free): scale the measured CPU harvest rate by that ratio.
    gemma2 = ModelShape("Gemma-2-2B shape (d=2304)", 2304, tok_s / 8.0, H200["harvest_tok_s_gemma2_2b_block12"],
                        ["CPU: Gemma 3 270M rate / 8 (FLOPs per token ratio, assumed)", "GPU: DESIGN.md H200 measurement"])
    gemma3 = ModelShape("Gemma 3 270M (d=640)", 640, tok_s, H200["harvest_tok_s_gemma2_2b_block12"],
                        ["CPU: bench_harvest", "GPU: the Gemma-2-2B H200 rate, taken as a lower bound for the 8x smaller model (not measured)"])
    return Inputs(meta_bytes, vector_bytes, cpu_gflops,
                  H200["bf16_peak_tflops"] * H200["builder_share_of_bf16_peak"], (a, b), [gemma3, gemma2], sources)


def build_flops(tokens: float, width: int, a: float, b: float) -> float:
    """Screening FLOPs of one pass: integral of 2 * d * K(n) dn with K(n) = a n^b."""
    return 2.0 * width * a * tokens ** (b + 1) / (b + 1)


def table_rows(inp: Inputs) -> list[dict]:
    a, b = inp.k_fit
    rows = []
    for shape in inp.models:
        for tokens in TOKENS:
            regions = a * tokens**b
            flops = build_flops(tokens, shape.width, a, b)
            storage_gb = tokens * (shape.width * inp.vector_bytes + inp.bytes_per_token_meta) / 1e9
            for workers in WORKERS:
                harvest_gpu_h = tokens / (shape.harvest_tok_s_gpu * workers) / 3600
                harvest_cpu_h = tokens / (shape.harvest_tok_s_cpu * workers) / 3600
                build_gpu_h = flops / (inp.gpu_build_tflops * 1e12 * workers) / 3600  # K-sharded over GPUs
                build_cpu_h = flops / (inp.cpu_build_gflops * 1e9) / 3600  # one process, no sharding
                rows.append({
                    "model": shape.name, "tokens": tokens, "workers": workers,
                    "regions_p1": round(regions), "storage_gb_per_layer": round(storage_gb, 1),
                    "harvest_hours_gpu": harvest_gpu_h, "build_hours_gpu_k_sharded": build_gpu_h,
                    "build_hours_gpu_single": flops / (inp.gpu_build_tflops * 1e12) / 3600,
                    "harvest_hours_cpu": harvest_cpu_h, "build_hours_cpu": build_cpu_h,
                    "gpu_dollars": round((harvest_gpu_h + build_gpu_h) * workers * GPU_DOLLARS_PER_HOUR, 2),
                    "bottleneck_gpu": "build" if flops / (inp.gpu_build_tflops * 1e12) / 3600 > harvest_gpu_h else "harvest",
                })
    return rows


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.0f} d"


def render(inp: Inputs, rows: list[dict]) -> str:
    a, b = inp.k_fit
    lines = [
        "# Scale on paper",
        "",
        "Written by `python -m pipelines.bench.scale_model` from measured figures (sources below).",
        "Harvest scales over workers (Ray tasks writing Lance fragments, one commit per layer);",
        "the build is one ordered pass, so its single-process time is the floor unless the",
        "exemplar matrix is split across GPUs (each screens a K-shard; the max over shards keeps",
        "the sequential rule exact). *single* = one GPU builds however many harvest; *K-sharded*",
        "= the build spread over the same number of GPUs as the harvest.",
        "",
        "| model | tokens | workers | regions (p1) | storage / layer | harvest (GPU) | build, single GPU | build, K-sharded | harvest (2-core CPU) | build (CPU) | GPU cost | GPU bottleneck |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']:,} | {r['workers']} | {r['regions_p1']:,} | {r['storage_gb_per_layer']:,} GB | "
            f"{_hours(r['harvest_hours_gpu'])} | {_hours(r['build_hours_gpu_single'])} | {_hours(r['build_hours_gpu_k_sharded'])} | "
            f"{_hours(r['harvest_hours_cpu'])} | {_hours(r['build_hours_cpu'])} | ${r['gpu_dollars']:,} | {r['bottleneck_gpu']} |")
    crossover = [r for r in rows if r["workers"] == 1 and r["bottleneck_gpu"] == "build"]
    lines += [
        "",
        "## Where the single-process build becomes the bottleneck",
        "",
        f"Regions grow as K(n) = {a:.3g} n^{b:.3g} (b assumed), so screening work per token grows with n and the",
        "total build work grows as n^(1+b), while harvest work is linear in n. "
        + (f"With one GPU the build already dominates from {crossover[0]['tokens']:,} tokens "
           f"({crossover[0]['model']}). " if crossover else "At these sizes the harvest dominates on one GPU. ")
        + "With W harvest workers the single build process is W times further behind; splitting the",
        "exemplar matrix across the same W GPUs divides screening time by W (the column *K-sharded*),",
        "at the price of an all-reduce of one max per row per batch, and keeps the build exact.",
        "",
        "## Inputs and their sources",
        "",
        f"- bytes per token of row metadata: {inp.bytes_per_token_meta:.1f} ({inp.sources['bytes_per_token_meta']});"
        f" vectors stored at {inp.vector_bytes} B per float",
        f"- CPU builder: {inp.cpu_build_gflops:.0f} GFLOP/s of screening ({inp.sources['cpu_build_gflops']})",
        f"- GPU builder: {inp.gpu_build_tflops:.0f} TFLOP/s of screening; {inp.sources['gpu']}",
        f"- region growth: {inp.sources['k_fit']}",
        f"- CPU harvest: {inp.sources['harvest_tok_s_cpu']}",
        f"- cost: ${GPU_DOLLARS_PER_HOUR}/GPU-hour (assumed list price)",
    ]
    for shape in inp.models:
        lines.append(f"- {shape.name}: harvest {shape.harvest_tok_s_cpu:,.0f} tok/s per CPU worker, "
                     f"{shape.harvest_tok_s_gpu:,.0f} per GPU ({'; '.join(shape.sources)})")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--metrics", type=click.Path(path_type=Path), default=Path("data/metrics"), show_default=True)
@click.option("--store", type=click.Path(path_type=Path), default=Path("data/store"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("docs/scale.md"), show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("data/metrics/scale_model.json"), show_default=True)
@click.option("--exponent", type=float, default=0.5, show_default=True, help="b of K(n) = a n^b (an assumption).")
def main(metrics: Path, store: Path, out: Path, json_out: Path, exponent: float) -> None:
    """Write the scale table (Markdown) and its numbers (JSON) from measured inputs."""
    inp = gather_inputs(metrics, store, exponent)
    rows = table_rows(inp)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(inp, rows))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(json_out, {"inputs": asdict(inp), "rows": rows})
    click.echo(jsonio.dumps({"rows": len(rows), "out": str(out)}), err=True)


if __name__ == "__main__":
    main()
