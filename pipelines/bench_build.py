"""Benchmark: `ep build` and `ep assign` on real Gemma 3 270M activations (issues 12 and 20).

Measured in one run, on one harvested stream of 51,200 tokens, for layers 6 and 12 at
p = 1 and 10 (the four columns of issue 20):
- build tokens/s in float32 and bfloat16 screening and which one ``--precision auto``
  takes here, each checked to give exactly the exemplar list of the plain sequential rule
  (timed too: the naive way), and the two precisions checked to store one exemplar table to
  the bit (statistics included). Figures per build: the command's (``ep build`` reading the
  store, as it reports tokens/s, with the share of time it waited on input), its wall clock
  with calibration, and the kernel's alone (LeaderBuilder on the same activations in
  memory), all against the research code's batched float32 loop measured in the same run
  (``batched_loop_tokens_per_s``) and the one-token rule (``leader_reference``, float64);
- the screening step's achieved GFLOP/s as a share of the fp32 and bf16 matmul peak
  measured here, on the same shapes;
- assign tokens/s, the exact kernel against the float32 argmax it replaced (issue 20, item 3);
- issue 20's counts (``pipelines.bench_bound``): pairs of the sequential rule, the builder's
  pairs against them, PCA energy, pairs a PCA bound excludes, and what the bound's reduced
  screen costs per pair here against the full one;
- peak memory of builds to half and to all of the tokens (flat = bounded).
The CPU capability, whether it multiplies bf16 natively, and library versions are recorded.

    python -m pipelines.bench_build --models-dir data/models --out data/metrics/bench_build.json
    python -m pipelines.bench_build --activations data/store/activations/gemma-3-270m/base

``--activations`` reuses a harvested folder (holding L6.lance and L12.lance, copied into a
temporary store) instead of harvesting ``--tokens`` tokens first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import psutil
import torch

from ep_store import jsonio
from ep_store.environment import environment
from ep_store.kernels.assign import nearest_exemplar
from ep_store.kernels.calibrate import unit_directions
from ep_store.kernels.leader import LeaderBuilder, LeaderState, leader_reference
from ep_store.kernels.screen import choose_precision
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import assign_dataset
from ep_store.stages.vectors import stream_vectors
from ep_store.store.core import Store
from pipelines.bench_bound import bound_counts, screen_costs


def matmul_peak_gflops(dtype: torch.dtype, m: int = 2048, k: int = 640, n: int = 4096, repeats: int = 20) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.proc, self.base, self.peak, self.done = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()


MODEL, CHECKPOINT = "gemma-3-270m", "base"
PRECISIONS = ("float32", "bfloat16")


def timed_build(store: Store, key: DictionaryKey, precision: str, max_tokens: int | None = None) -> tuple[dict, float]:
    cfg = BuildConfig(key.model, key.checkpoint, key.layer, key.percentile, device="cpu", precision=precision,
                      max_tokens=max_tokens, overwrite=True)
    with PeakRSS() as mem:
        summary = build(cfg, store, assign=False, progress=False)
    return summary, mem.peak / 2**20


def median_run(repeats: int, measure, *args) -> tuple:
    """Of ``repeats`` calls of ``measure(*args)``, the one with the median first element
    (its tokens/s)."""
    runs = sorted((measure(*args) for _ in range(repeats)), key=lambda run: run[0])
    return runs[len(runs) // 2]


def command_tokens_per_s(store: Store, key: DictionaryKey, precision: str) -> tuple[float, dict, float]:
    """(tokens/s as ``ep build`` reports it, its summary, peak MiB)."""
    summary, mem = timed_build(store, key, precision)
    return summary["tokens_per_s"], summary, mem


def kernel_tokens_per_s(u, theta: float, precision: str, batch_size: int = 2048) -> tuple[float, list[int]]:
    """The builder alone on in-memory unit directions: tokens/s and its exemplar rows."""
    builder = LeaderBuilder(theta, batch_size, 1, LeaderState(width=u.shape[1]), "cpu", precision)
    start = time.perf_counter()
    builder.feed(u)
    state = builder.finish("end_of_stream")
    return state.tokens / (time.perf_counter() - start), state.source_row_K.tolist()


def batched_loop_tokens_per_s(u_ND: torch.Tensor, theta: float, batch_size: int = 2048) -> tuple[float, list[int]]:
    """Tokens/s of the research code's batched loop, in its plain form (the authors' structure,
    our lines; numpy float32, no per-region bookkeeping beyond counts and direction sums):
    per batch, one product against the exemplars and a row max/argmax; the rows left
    uncovered are leader-clustered among themselves with one pairwise product and a Python
    loop. Float32 throughout, so not exact at ties: a speed baseline, not an oracle.
    Returns (tokens/s, the exemplars' stream rows)."""
    import numpy as np

    u = u_ND.numpy().astype(np.float32)
    n, width = u.shape
    E = np.zeros((n, width), np.float32)
    counts, sums = np.zeros(n, np.int64), np.zeros((n, width), np.float64)
    k, cut, rows = 0, np.float32(1.0 - theta), []
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        x = u[lo : lo + batch_size]
        if k:
            sims = x @ E[:k].T
            best, nearest = sims.max(axis=1), sims.argmax(axis=1)
            matched = best >= cut
            _accumulate(counts, sums, nearest[matched], x[matched])
        else:
            matched = np.zeros(len(x), bool)
        loose = np.nonzero(~matched)[0]
        pair = x[loose] @ x[loose].T
        leaders: list[int] = []
        for i in range(len(loose)):
            if leaders and pair[i, leaders].max() >= cut:
                continue
            leaders.append(i)
        new = loose[leaders]
        E[k : k + len(new)] = x[new]
        k += len(new)
        rows += (new + lo).tolist()
    return n / (time.perf_counter() - start), rows


def _accumulate(counts, sums, regions, rows) -> None:
    """counts[r] += 1 and sums[r] += row for each (r, row): grouped by a sort and summed
    with np.add.reduceat (np.add.at on 2-D rows took ~58 ms a batch here, 3x the whole
    research code's per-batch time at p=10: a baseline that slow flatters the builder)."""
    import numpy as np

    if len(regions) == 0:
        return
    order = np.argsort(regions, kind="stable")
    ordered = regions[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts[ordered[starts]] += np.diff(np.r_[starts, len(ordered)])
    sums[ordered[starts]] += np.add.reduceat(rows[order].astype(sums.dtype), starts, axis=0)


def exemplar_table(store: Store, key: DictionaryKey):
    return store.read_table(store.dictionary_dir(key) / "exemplars.lance").sort_by("region_id")


def command_runs(store: Store, key: DictionaryKey, peak: dict, repeats: int) -> tuple[dict, bool]:
    """``ep build`` (reading the store) in each precision: the median of ``repeats`` runs;
    and whether the precisions stored one exemplar table to the bit."""
    runs, tables = {}, {}
    for precision in PRECISIONS:
        _, summary, mem = median_run(repeats, command_tokens_per_s, store, key, precision)
        tables[precision] = exemplar_table(store, key)
        build_s = summary["tokens"] / summary["tokens_per_s"]
        runs[precision] = {
            "tokens_per_s": summary["tokens_per_s"], "regions": summary["regions"],
            # The whole command, calibration included (tokens_per_s is the clustering's).
            "wall_tokens_per_s": round(summary["tokens"] / summary["seconds"], 1),
            "calibration_seconds": summary["calibration_seconds"],
            "screen_gflops": round(summary["screen_gflop"] / build_s, 1),
            "share_of_fp32_peak": round(summary["screen_gflop"] / build_s / peak["float32"], 3),
            "share_of_bf16_peak": round(summary["screen_gflop"] / build_s / peak["bfloat16"], 3),
            "rechecked_rows": summary["rechecked_rows"], "peak_mib": round(mem, 1),
            "screened_pair_dims": summary["screen_gflop"] * 1e9 / 2,  # pairs x D; per pair once D is known
            "input_wait_share": summary.get("input_wait_share"),
            "rows": tables[precision].column("source_row").to_pylist(),
        }
    same = all(t.equals(tables[PRECISIONS[0]]) for t in tables.values())
    return runs, same


def assign_figures(store: Store, key: DictionaryKey, u: torch.Tensor, exemplars: torch.Tensor, repeats: int) -> dict:
    """``ep assign`` as the command reports it, and the exact kernel against the float32
    argmax it replaced (issue 20, item 3), in memory on the same rows."""
    def old_kernel():
        start = time.perf_counter()
        for lo in range(0, u.shape[0], 4096):
            (u[lo : lo + 4096] @ exemplars.T).max(dim=1)
        return (u.shape[0] / (time.perf_counter() - start),)

    def exact_kernel():
        start = time.perf_counter()
        nearest_exemplar(u, exemplars)
        return (u.shape[0] / (time.perf_counter() - start),)

    old = median_run(repeats, old_kernel)[0]
    exact = median_run(repeats, exact_kernel)[0]
    command = assign_dataset(store, key, device="cpu", progress=False)["tokens_per_s"]
    return {"command_tokens_per_s": command, "kernel_tokens_per_s": round(exact, 1),
            "float32_argmax_tokens_per_s": round(old, 1), "kernel_vs_float32_argmax": round(exact / old, 2)}


def measure(store: Store, x: torch.Tensor, layer: int, p: float, peak: dict, repeats: int) -> dict:
    """Every figure of one dictionary: the command, the kernel, both baselines, assign, counts, memory."""
    key = DictionaryKey(MODEL, CHECKPOINT, layer, p)
    runs, same_table = command_runs(store, key, peak, repeats)
    meta = store.read_json(store.dictionary_dir(key) / "meta.json")
    u = unit_directions(x, torch.tensor(meta["center"]))
    start = time.perf_counter()
    ref = leader_reference(u, meta["theta"], 2048, 1, statistics=False)
    ref_tps = meta["tokens"] / (time.perf_counter() - start)
    loop_tps, loop_rows = median_run(repeats, batched_loop_tokens_per_s, u[: meta["tokens"]], meta["theta"])
    for precision, run in runs.items():
        kernel_tps, kernel_rows = median_run(repeats, kernel_tokens_per_s, u, meta["theta"], precision)
        run["kernel_tokens_per_s"] = round(kernel_tps, 1)
        run["kernel_identical_to_reference"] = kernel_rows == ref.exemplar_rows
        for name, value in (("command", run["tokens_per_s"]), ("wall", run["wall_tokens_per_s"]), ("kernel", kernel_tps)):
            run[f"{name}_vs_batched_loop"] = round(value / loop_tps, 2)
            run[f"{name}_vs_reference"] = round(value / ref_tps, 2)
    half, half_mem = timed_build(store, key, "auto", max_tokens=x.shape[0] // 2)
    _, full_mem = timed_build(store, key, "auto")
    exemplars = u[torch.tensor(ref.exemplar_rows)]
    counts = bound_counts(u, meta["theta"], ref.exemplar_rows, meta["tokens"])
    pairs = counts["sequential_pairs"]
    for run in runs.values():
        # The pairs this build screened against the sequential rule's (issue 20's table).
        run["screened_pairs_per_sequential_pair"] = round(run.pop("screened_pair_dims") / x.shape[1] / max(pairs, 1), 2)
    return {
        "layer": layer, "percentile": p, "theta": round(meta["theta"], 4), "tokens": meta["tokens"],
        "regions": meta["regions"], "stop_reason": meta["stop_reason"],
        "precision_auto": choose_precision("auto", "cpu"),
        "reference_tokens_per_s": round(ref_tps, 1),
        "batched_loop_tokens_per_s": round(loop_tps, 1),
        "batched_loop_identical_to_reference": loop_rows == ref.exemplar_rows,
        "identical_to_reference": all(r.pop("rows") == ref.exemplar_rows for r in runs.values()),
        "precisions_store_one_table": same_table,
        "build": runs,
        "assign": assign_figures(store, key, u, exemplars, repeats),
        "bound": counts | {"screen_costs": screen_costs(u[-2048:], exemplars)},
        "peak_mib_half_tokens": round(half_mem, 1), "peak_mib_all_tokens": round(full_mem, 1),
        "half_tokens": half["tokens"],
    }


def copy_or_harvest(store: Store, activations: Path | None, tokens: int, layers: tuple[int, ...], models_dir: Path):
    """The benchmark's activations in ``store``: copied from a harvested folder, or harvested."""
    if activations is not None:
        for layer in layers:
            target = store.activation_path(ActivationKey(MODEL, CHECKPOINT, layer))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(activations / target.name, target)
        return
    subprocess.run([sys.executable, "-m", "ep_store", "harvest", "--model", MODEL, "--checkpoint", CHECKPOINT,
                    *[f"--layers={layer}" for layer in layers], "--max-tokens", str(tokens), "--device", "cpu",
                    "--store", str(store.root), "--models-dir", str(models_dir), "--no-progress"], check=True)


@click.command()
@click.option("--tokens", type=int, default=51_200, help="Activations to harvest and build on.")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/metrics/bench_build.json"))
@click.option("--activations", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A harvested gemma-3-270m/base activations folder (L6.lance, L12.lance) to use instead of harvesting.")
@click.option("--repeats", type=click.IntRange(1, 9), default=3, show_default=True,
              help="Runs of each timed build, kernel and loop; the median is reported.")
def main(tokens, models_dir, out, activations, repeats):
    """Build and assign throughput against the batched loop, the sequential rule and the matmul peak; writes JSON."""
    layers, percentiles = (6, 12), (1.0, 10.0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        copy_or_harvest(store, activations, tokens, layers, models_dir)
        peak = {"float32": matmul_peak_gflops(torch.float32), "bfloat16": matmul_peak_gflops(torch.bfloat16)}
        results = []
        for layer in layers:
            source = store.activation_path(ActivationKey(MODEL, CHECKPOINT, layer))
            x = torch.cat([b for b, _ in stream_vectors(store, source, 8192)])
            results += [measure(store, x, layer, p, peak, repeats) for p in percentiles]
        result = {"tokens": int(x.shape[0]), "width": int(x.shape[1]), "threads": torch.get_num_threads(),
                  "load_average_1m": round(psutil.getloadavg()[0], 2), "cpus": psutil.cpu_count(),
                  "environment": environment(torch.device("cpu")),
                  "repeats": repeats, "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
                  "percentiles": results}
    jsonio.write(out, result)
    click.echo(jsonio.dumps(result), err=True)


if __name__ == "__main__":
    main()
