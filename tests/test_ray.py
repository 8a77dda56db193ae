"""Ray engine (issue 13): harvest and assign as Ray tasks writing Lance fragments, one commit.

Ray runs in-process (`ray.init(num_cpus=2)`), never at a network address. One Ray session
is shared by the module: starting Ray costs seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ep_store.keys import ActivationKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import assign_dataset
from ep_store.stages.engines import (
    FAIL_BEFORE_COMMIT,
    RayConfig,
    contiguous_shards,
    ray_assign,
    ray_harvest,
)
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import Store, fragment_ids

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["doc_id", "pos", "token_id", "token", "char_start", "char_end", "vector"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def config(**over) -> HarvestConfig:
    args = {"model": "tiny", "checkpoint": "base", "layers": (1, 2), "max_tokens": 1500, "ctx": 64,
            "batch_size": 4, "device": "cpu"}
    return HarvestConfig(**{**args, **over})


def rows(store: Store, layer: int, model: str = "tiny") -> dict:
    table = store.read_table(store.activation_path(ActivationKey(model, "base", layer)), columns=COLUMNS)
    return table.to_pydict()


def assert_same_rows(a: dict, b: dict) -> None:
    for column in COLUMNS[:-1]:
        assert a[column] == b[column], column
    np.testing.assert_array_equal(np.array(a["vector"], dtype=np.float32), np.array(b["vector"], dtype=np.float32))


def test_contiguous_shards_cover_the_stream_in_order():
    items = list(range(10))
    shards = contiguous_shards(items, [1, 5, 1, 1, 1, 1, 1, 1, 1, 1], 3)
    assert [i for shard in shards for i in shard] == items
    assert len(shards) == 3
    assert contiguous_shards([1], [1], 4) == [[1]]


def test_ray_harvest_equals_local_row_for_row(ray_local, tmp_path, models_dir):
    local, distributed = Store(tmp_path / "local"), Store(tmp_path / "ray")
    harvest(config(), local, models_dir, progress=False)
    summary = ray_harvest(config(), distributed, models_dir, RayConfig(workers=2), progress=False)
    assert summary["workers"] == 2
    for layer in (1, 2):
        assert_same_rows(rows(local, layer), rows(distributed, layer))
        assert summary["versions"][f"tiny/base/L{layer}"] == 1  # one commit per layer (then its compaction)


def test_ray_harvest_compacts_after_its_commit(ray_local, tmp_path, models_dir):
    """Like the local harvest (compact_written), the Ray harvest compacts each dataset after its
    one commit: the shards' fragments become one, same rows in the same order (issue 19)."""
    store = Store(tmp_path / "ray")
    summary = ray_harvest(config(max_tokens=600, layers=(1,)), store, models_dir, RayConfig(workers=2),
                          progress=False)
    path = store.activation_path(ActivationKey("tiny", "base", 1))
    committed = summary["versions"]["tiny/base/L1"]
    assert len(fragment_ids(path, committed)) == 2  # one per shard
    assert summary["compaction"]["tiny/base/L1"]["fragments_before"] == 2
    assert len(fragment_ids(path)) == 1 and store.info(path).version > committed
    assert store.read_table(path).equals(store.read_table(path, version=committed))


def test_ray_harvest_resumes_a_partial_harvest_as_the_local_path_does(ray_local, tmp_path, models_dir):
    # A 500-token harvest cuts its last context short, so the resumed rows come from the
    # same batches as a local resume (not as one uninterrupted 1,500-token run).
    local, distributed = Store(tmp_path / "local"), Store(tmp_path / "ray")
    for store in (local, distributed):
        harvest(config(max_tokens=500, layers=(1,)), store, models_dir, progress=False)
    harvest(config(), local, models_dir, progress=False)
    ray_harvest(config(), distributed, models_dir, RayConfig(workers=2), progress=False)
    for layer in (1, 2):
        assert_same_rows(rows(local, layer), rows(distributed, layer))


def test_driver_killed_before_commit_leaves_the_previous_version(ray_local, tmp_path, models_dir):
    store = Store(tmp_path / "store")
    harvest(config(max_tokens=500), store, models_dir, progress=False)
    path = store.activation_path(ActivationKey("tiny", "base", 1))
    before = store.info(path)
    before_rows = rows(store, 1)
    args = [sys.executable, "-m", "ep_store", "harvest", "--engine", "ray", "--workers", "2", "--model", "tiny",
            "--checkpoint", "base", "--layers", "1,2", "--max-tokens", "1500", "--ctx", "64", "--batch-size", "4",
            "--device", "cpu", "--store", str(store.root), "--models-dir", str(models_dir), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), FAIL_BEFORE_COMMIT: "1"}
    died = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == 137, died.stderr[-2000:]
    after = store.info(path)
    assert (after.version, after.rows) == (before.version, before.rows)
    assert_same_rows(before_rows, rows(store, 1))
    env.pop(FAIL_BEFORE_COMMIT)
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    local = Store(tmp_path / "local")  # the same two runs, locally
    harvest(config(max_tokens=500), local, models_dir, progress=False)
    harvest(config(), local, models_dir, progress=False)
    for layer in (1, 2):
        assert_same_rows(rows(local, layer), rows(store, layer))


def test_ray_assign_equals_local_assign(ray_local, tmp_path, models_dir, monkeypatch):
    from ep_store.stages import harvest as harvest_module

    # Harvested by Ray with compaction off: one fragment per shard, so two assign tasks.
    monkeypatch.setattr(harvest_module, "compact_written", lambda cfg, store: {})
    store = Store(tmp_path / "store")
    ray_harvest(config(max_tokens=2500, layers=(1,)), store, models_dir, RayConfig(workers=2), progress=False)
    assert len(fragment_ids(store.activation_path(ActivationKey("tiny", "base", 1)))) >= 2
    build(BuildConfig("tiny", "base", 1, 10.0, calibration_batch=256, batch_size=256), store,
          assign=False, progress=False)
    local = assign_dataset(store, "tiny/base/L1/p10", progress=False)
    path = store.dictionary_dir(BuildConfig("tiny", "base", 1, 10.0).key) / "assignments.lance"
    expected = store.read_table(path).to_pydict()
    summary = ray_assign(store, "tiny/base/L1/p10", None, RayConfig(workers=2))
    assert summary["version"] > local["version"]
    got = store.read_table(path).to_pydict()
    assert got["doc_id"] == expected["doc_id"] and got["pos"] == expected["pos"]
    assert got["region_id"] == expected["region_id"]
    np.testing.assert_array_equal(np.array(got["distance"]), np.array(expected["distance"]))


def test_bad_engine_options_are_refused():
    from ep_store.errors import UsageError

    with pytest.raises(UsageError, match="--workers"):
        RayConfig(workers=0)
    with pytest.raises(UsageError, match="ray://"):
        RayConfig(address="http://example.org")
