"""Issue 12, item 3: the background Lance writer of the harvest. The same rows as synchronous
writes; a failed write stops the harvest with every dataset at its last good commit, and a
rerun resumes to exactly the rows of an uninterrupted run."""

from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.stages.writer import BackgroundWriter
from ep_store.store import Store, logical_digest


def test_jobs_run_in_order_on_another_thread():
    done, threads = [], set()

    def job(i):
        time.sleep(0.002 * (i % 3))
        done.append(i)
        threads.add(threading.current_thread().name)

    with BackgroundWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(job, i)
    assert done == list(range(20)) and threads == {"ep-writer"} and writer.jobs == 20


def test_a_full_queue_blocks_the_caller_and_is_counted():
    with BackgroundWriter(depth=1) as writer:
        for _ in range(4):
            writer.submit(time.sleep, 0.05)
    assert writer.wait_s >= 0.1 and writer.busy_s >= 0.2


def test_depth_zero_runs_inline():
    seen = []
    writer = BackgroundWriter(depth=0)
    writer.submit(lambda: seen.append(threading.current_thread().name))
    writer.close()
    assert seen == [threading.current_thread().name]


def test_the_first_failure_stops_later_jobs_and_reaches_the_caller():
    done = []

    def job(i):
        if i == 2:
            raise OSError("disk full")
        done.append(i)

    writer = BackgroundWriter(depth=3)
    with pytest.raises(OSError, match="disk full"):
        for i in range(50):
            writer.submit(job, i)
            time.sleep(0.002)
    with pytest.raises(OSError, match="disk full"):  # close reports it too, once the thread is done
        writer.close()
    assert done == [0, 1]  # nothing after the failed job ran
    with pytest.raises(RuntimeError):
        writer.submit(job, 99)


def test_negative_depth_is_refused():
    with pytest.raises(ValueError):
        BackgroundWriter(depth=-1)


CFG = dict(model="tiny", checkpoint="base", layers=(1, 2), max_tokens=700, ctx=32, batch_size=4, device="cpu")


def digests(store: Store) -> dict[int, dict]:
    return {L: logical_digest(store.activation_path(ActivationKey("tiny", "base", L))) for L in (1, 2)}


def test_background_and_synchronous_writes_store_the_same_rows(models_dir, tmp_path):
    found = {}
    for depth in (0, 1, 3):
        store = Store(tmp_path / f"d{depth}")
        summary = harvest(HarvestConfig(**CFG, writer_depth=depth), store, models_dir, progress=False)
        assert summary["writer_depth"] == depth and summary["tokens"] == 700
        assert {"forward_seconds", "copy_seconds", "write_seconds", "model_idle_share"} <= summary.keys()
        found[depth] = digests(store)
    assert found[0] == found[1] == found[3]
    assert found[0][1]["rows"] == 700


def test_a_failed_write_leaves_the_last_commit_and_a_rerun_completes_it(models_dir, tmp_path, monkeypatch):
    clean = Store(tmp_path / "clean")
    harvest(HarvestConfig(**CFG), clean, models_dir, progress=False)

    store = Store(tmp_path / "store")
    real, calls = Store.append_activations, []

    def failing(self, key, table, meta):
        calls.append(key.layer)
        if len(calls) == 7:  # layer 1 of the fourth batch: layer 2 of batch three is committed
            raise OSError("No space left on device")
        return real(self, key, table, meta)

    monkeypatch.setattr(Store, "append_activations", failing)
    with pytest.raises(OSError, match="No space left"):
        harvest(HarvestConfig(**CFG, writer_depth=2), store, models_dir, progress=False)
    assert len(calls) == 7  # the writer stopped at the failure: no commit after it
    rows = {L: store.info(store.activation_path(ActivationKey("tiny", "base", L))).rows for L in (1, 2)}
    assert rows[1] == rows[2] > 0  # three whole batches in each layer, none half-written
    tokens = store.read_table(store.activation_path(ActivationKey("tiny", "base", 1)), columns=["doc_id"]).num_rows
    assert tokens == rows[1]

    monkeypatch.setattr(Store, "append_activations", real)
    harvest(HarvestConfig(**CFG), store, models_dir, progress=False)
    assert digests(store) == digests(clean)


def test_cli_writer_depth_option(models_dir, tmp_path):
    args = ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1", "--max-tokens", "100",
            "--ctx", "32", "--device", "cpu", "--models-dir", str(models_dir), "--store", str(tmp_path / "s"),
            "--no-progress"]
    bad = CliRunner().invoke(main, [*args, "--writer-depth", "-1"])
    assert bad.exit_code == 2 and "--writer-depth" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.lance"))
    ok = CliRunner().invoke(main, [*args, "--writer-depth", "0"])
    assert ok.exit_code == 0, ok.output
