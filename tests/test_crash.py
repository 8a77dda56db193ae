"""Crash test in the manner of SQLite's (issue 8, G): kill ``ep harvest``, ``ep build``,
``ep assign`` and ``ep match`` with SIGKILL at seeded random moments, rerun, and check that

- after every kill, every Lance version of every dataset reads, activation rows are an
  exact prefix of an uninterrupted run's (none duplicated or missing), and any meta.json
  names a readable version;
- after the final rerun, every table and meta.json equals the uninterrupted run's (Lance
  version numbers aside: killed writes may leave unpublished versions), and no lock is left.

Each command runs in its own process, forked from a server that has already imported
torch, transformers and ep_store (``multiprocessing`` forkserver), so a run starts in
milliseconds instead of the seconds an interpreter needs to import them; the process then
runs ``ep``'s own entry point, exactly as ``python -m ep_store`` does.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, arrow_to_vectors
from tests.conftest import ROOT
from tests.crash_child import run_ep

SEED = 20261201
KILLS = {"harvest": 6, "build L1": 3, "build L2": 3, "assign": 4, "match": 4}  # 20 kills
LAYERS = (1, 2)
DICTS = [DictionaryKey("tiny", "base", layer, 5.0) for layer in LAYERS]


def steps(store: Path, models_dir: Path) -> dict[str, list[str]]:
    common = ["--store", str(store)]
    builds = {
        f"build L{layer}": ["build", "--model", "tiny", "--checkpoint", "base", "--layer", str(layer),
                            "--percentile", "5", "--calibration-tokens", "600", "--calibration-batch", "150",
                            "--batch-size", "128", "--saturation-window", "3", "--device", "cpu", "--no-progress",
                            *common]
        for layer in LAYERS
    }
    return {
        "harvest": ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1,2", "--max-tokens", "1200",
                    "--ctx", "32", "--batch-size", "4", "--device", "cpu", "--no-progress",
                    "--models-dir", str(models_dir), *common],
        **builds,
        "assign": ["assign", "--dictionary", "tiny/base/L1/p5", "--activations", "tiny/base/L2", "--device", "cpu",
                   "--no-progress", *common],
        "match": ["match", "tiny/base/L1/p5", "tiny/base/L2/p5", *common],
    }


@pytest.fixture(scope="module")
def launcher():
    """Forked ``ep`` processes from a server that preloaded the heavy imports."""
    os.environ["PYTHONPATH"] = str(ROOT)  # the server and its children run this checkout
    ctx = multiprocessing.get_context("forkserver")
    # Not lance (not fork-safe) nor anything that imports it: children import it themselves.
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.models.gemma3.modeling_gemma3", "ep_store.cli.main",
                                "tests.crash_child"])
    return ctx


def start(ctx, args: list[str], log: Path):
    proc = ctx.Process(target=run_ep, args=(args, str(log)))
    proc.start()
    return proc


def run_whole(ctx, args: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    proc = start(ctx, args, log)
    proc.join(300)
    assert proc.exitcode == 0, log.read_text()[-3000:]
    return time.perf_counter() - t0


def lance_datasets(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.lance") if (p / "_versions").is_dir())


def check_after_kill(root: Path, ref: Path) -> None:
    store = Store(root)
    for path in lance_datasets(root):
        for v in Store.dataset(path).versions():
            Store.dataset(path, v["version"]).to_table()  # every earlier version reads
    for layer in LAYERS:
        key = ActivationKey("tiny", "base", layer)
        if store.exists(store.activation_path(key)):
            got = store.read_table(store.activation_path(key))
            want = Store(ref).read_table(Store(ref).activation_path(key)).slice(0, got.num_rows)
            assert got.equals(want), f"{key}: rows are not an exact prefix of the uninterrupted run"
    for key in DICTS:
        meta = store.dictionary_dir(key) / "meta.json"
        if meta.is_file():
            assert Dictionary.load(store, key).table.num_rows > 0  # meta.json names a readable version


VOLATILE = {"exemplars_version", "version", "activations_version", "pairs_version", "overlaps_version", "seconds",
            "tags", "ep_store_version"}


def stable(meta):
    """meta.json without Lance version numbers and timings."""
    if isinstance(meta, dict):
        return {k: stable(v) for k, v in meta.items() if k not in VOLATILE}
    if isinstance(meta, list):
        return [stable(v) for v in meta]
    return meta


def check_equal(root: Path, ref: Path) -> None:
    a, b = Store(root), Store(ref)
    for layer in LAYERS:
        key = ActivationKey("tiny", "base", layer)
        got, want = a.read_table(a.activation_path(key)), b.read_table(b.activation_path(key))
        assert got.equals(want), key
        pairs = list(zip(got.column("doc_id").to_pylist(), got.column("pos").to_pylist()))
        assert len(set(pairs)) == len(pairs) == 1200
        np.testing.assert_array_equal(arrow_to_vectors(got.column("vector")), arrow_to_vectors(want.column("vector")))
    for key in DICTS:
        got, want = Dictionary.load(a, key), Dictionary.load(b, key)
        assert got.table.equals(want.table), key
        assert stable(got.meta) == stable(want.meta), key
        assert len(got.meta["history"]) == 1
    rel = [p.relative_to(ref) for p in lance_datasets(ref) if "activations" not in p.parts]
    assert sorted(rel) == sorted(p.relative_to(root) for p in lance_datasets(root) if "activations" not in p.parts)
    for path in rel:
        if path.name != "exemplars.lance":  # exemplars: compared at their published version above
            assert a.read_table(root / path).equals(b.read_table(ref / path)), path
    for meta in ref.glob("matches/*/meta.json"):
        assert stable(Store.read_json(meta)) == stable(Store.read_json(root / meta.relative_to(ref)))
    assert not (root / ".locks").exists(), list((root / ".locks").iterdir())


def test_sigkill_at_random_points_then_rerun(launcher, models_dir, tmp_path):
    ref, root = tmp_path / "ref", tmp_path / "crash"
    log = tmp_path / "log.txt"
    durations = {name: run_whole(launcher, args, log) for name, args in steps(ref, models_dir).items()}
    rng = random.Random(SEED)
    kills = 0
    for name, args in steps(root, models_dir).items():
        done = attempts = 0
        estimate = durations[name]
        while done < KILLS[name] and attempts < 4 * KILLS[name]:
            attempts += 1
            delay = rng.uniform(0.02, 1.0) * estimate
            t0 = time.perf_counter()
            proc = start(launcher, args, log)
            proc.join(delay)
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                done += 1
            else:  # it finished first: what is left to do is shorter now
                assert proc.exitcode == 0, log.read_text()[-3000:]
                estimate = time.perf_counter() - t0
            check_after_kill(root, ref)
        kills += done
        run_whole(launcher, args, log)  # the rerun completes the step
        check_after_kill(root, ref)
    assert kills >= 20
    check_equal(root, ref)
