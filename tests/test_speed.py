"""Issue 12: the prefetching reader, and the torch-only GPU benchmark (run small on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from ep_store.stages.prefetch import Prefetch

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_prefetch_yields_everything_in_order_and_counts_waits():
    def slow():
        for i in range(5):
            time.sleep(0.02)
            yield i

    with Prefetch(slow(), depth=2) as stream:
        assert list(stream) == list(range(5))
    assert stream.items == 5
    assert stream.wait_s > 0.05  # the consumer was starved: it waited for each item
    assert 0 < stream.wait_share <= 1


def test_prefetch_runs_ahead_of_a_slow_consumer():
    produced = []

    def source():
        for i in range(4):
            produced.append(i)
            yield i

    with Prefetch(source(), depth=2) as stream:
        it = iter(stream)
        assert next(it) == 0
        time.sleep(0.2)  # the thread fills the queue meanwhile
        assert len(produced) >= 3
        assert list(it) == [1, 2, 3]
    assert stream.wait_share < 0.5


def test_prefetch_raises_the_producers_error_in_the_consumer():
    def broken():
        yield 1
        raise ValueError("bad row")

    with Prefetch(broken()) as stream:
        it = iter(stream)
        assert next(it) == 1
        with pytest.raises(ValueError, match="bad row"):
            next(it)


def test_prefetch_stops_its_thread_when_left_early():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    before = threading.active_count()
    with Prefetch(endless(), depth=1) as stream:
        for item in stream:
            if item == 3:
                break
    assert closed.wait(5)  # the generator was closed on its own thread
    assert threading.active_count() == before


def test_prefetch_refuses_zero_depth():
    with pytest.raises(ValueError):
        Prefetch([], depth=0)


def test_bench_gpu_small_runs_without_lance_or_duckdb(tiny_store, tmp_path):
    """--small on CPU: every section runs, the builder is exact on real (tiny-model)
    activations exported from the store, and importing Lance or DuckDB would fail."""
    npy = tmp_path / "acts.npy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pipelines.export_activations", "--store", str(tiny_store),
                    "--activations", "tiny/base/L2", "--tokens", "2500", "--out", str(npy)],
                   check=True, env=env, cwd=ROOT)
    x = np.load(npy)
    assert x.shape == (2500, 64) and x.dtype == np.float32 and np.isfinite(x).all()
    blocker = tmp_path / "block"
    blocker.mkdir()
    for name in ("lance", "duckdb"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "bench" / "bench_gpu.py"), "--small", "--device", "cpu",
                    "--npy", str(npy), "--out", str(out)], check=True, env=env, cwd=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    assert result["imported_lance_or_duckdb"] == []
    assert set(result["matmul_peak_tflops"]) == {"bfloat16", "float32"}
    assert len(result["builder_steady_state"]) == 8  # 2 K0 x 2 batch sizes x 2 precisions
    assert all(r["tokens_per_s"] > 0 and r["share_of_peak"] > 0 for r in result["builder_steady_state"])
    for entry in result["exactness"]:
        assert entry["bfloat16"]["identical"] and entry["float32"]["identical"]
    assert result["harvest"]["copy_identical"]


def test_export_activations_refuses_unknown_dataset(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipelines.export_activations", "--store", str(tmp_path),
                           "--activations", "nope/base/L1", "--out", str(tmp_path / "x.npy")],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "no activations" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.npy").exists()


def test_bench_build_batched_loop_is_the_leader_rule():
    """The research-code-style baseline of pipelines/bench_build.py clusters like the rule
    (random directions: no pair within float32 rounding of theta), so the speed ratio compares
    the same work."""
    from ep_store.kernels.calibrate import unit_directions
    from ep_store.kernels.leader import leader_reference
    from pipelines.bench_build import batched_loop_tokens_per_s

    u = unit_directions(torch.randn(3000, 16, generator=torch.Generator().manual_seed(3)), torch.zeros(16))
    for theta in (0.3, 0.6):
        tps, rows = batched_loop_tokens_per_s(u, theta, batch_size=256)
        assert tps > 0 and rows == leader_reference(u, theta, 256, saturation_window=10**9).exemplar_rows
        assert 10 < len(rows) < 3000


def test_bench_build_baseline_accumulates_like_add_at():
    """The baseline's grouped sums (a sort and np.add.reduceat, issue 12: np.add.at made the
    baseline 3x slower than the research code at p=10) add what np.add.at adds: repeated,
    missing and out-of-order regions, and no rows at all."""
    from pipelines.bench_build import _accumulate

    rng = np.random.default_rng(4)
    regions = rng.integers(0, 40, 500)
    rows = rng.standard_normal((500, 8)).astype(np.float32)
    counts, sums = np.zeros(50, np.int64), np.zeros((50, 8))
    want_counts, want_sums = counts.copy(), sums.copy()
    for _ in range(2):
        _accumulate(counts, sums, regions, rows)
        np.add.at(want_counts, regions, 1)
        np.add.at(want_sums, regions, rows)
    _accumulate(counts, sums, regions[:0], rows[:0])
    assert np.array_equal(counts, want_counts) and np.allclose(sums, want_sums, rtol=0, atol=1e-12)


def test_bench_bound_counts_are_a_valid_bound_and_the_rules_pairs():
    """pipelines.bench_bound (issue 20's table): every pair it counts as excluded is truly
    uncovered (exact similarity below 1 - theta), at every d' including D, and the sequential
    pairs are the sum over tokens of the exemplars before each."""
    from ep_store.kernels.calibrate import unit_directions
    from ep_store.kernels.leader import leader_reference
    from pipelines.bench_bound import BOUND_MARGIN, bound_counts, principal_basis, reduced

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 24, generator=g)[torch.randint(0, 6, (900,), generator=g)] + 0.5 * torch.randn(900, 24, generator=g)
    u = unit_directions(x, torch.zeros(24))
    theta = 0.35
    rows = leader_reference(u, theta, 100, 10**9).exemplar_rows
    counts = bound_counts(u, theta, rows, 900, dims=(1, 4, 24), chunk=128)
    assert counts["sequential_pairs"] == sum(sum(1 for r in rows if r < t) for t in range(900))
    assert counts["pca_energy"][24] == pytest.approx(1.0) and counts["pca_energy"][1] < counts["pca_energy"][4]
    assert counts["excluded_share"][24]["member_tokens"] > 0.5  # at d' = D the bound is the dot product
    for d in (1, 4, 24):
        V, _ = principal_basis(u, d)
        bound = reduced(u, V) @ reduced(u[rows], V).T
        exact = u.double() @ u[rows].double().T
        excluded = bound < 1.0 - theta - BOUND_MARGIN
        assert (exact[excluded] < 1.0 - theta).all()
        assert (bound.double() >= exact - 1e-5).all()  # an upper bound, to float32 rounding
