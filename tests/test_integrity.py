"""Issue 8, A: results do not depend on how the store was written; compaction; one writer
per key; a resume proves it continues the same stream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.kernels.calibrate import calibrate
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import Dictionary
from ep_store.store import Store, arrow_to_vectors, rebatch
from tests.conftest import ROOT, make_tiny_model, train_tokenizer, tree_snapshot
from tests.test_cli_errors import assert_refused, harvest_args


def test_rebatch_gives_exact_sizes():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 40, 50)
    start = np.cumsum(np.r_[0, sizes])
    batches = [pa.record_batch({"i": pa.array(np.arange(a, a + n))}) for a, n in zip(start, sizes)]
    for want in (1, 7, 64, 10_000):
        out = list(rebatch(batches, want))
        assert [b.num_rows for b in out[:-1]] == [want] * (len(out) - 1) and 0 < out[-1].num_rows <= want
        assert np.concatenate([b.column("i").to_numpy() for b in out]).tolist() == list(range(sizes.sum()))


def write_layouts(tiny_store: Path, root: Path) -> tuple[Store, pa.Table]:
    """tiny/one/L2: the tiny store's rows in one fragment; tiny/many/L2: the same rows in 40+ uneven ones."""
    src = Store(tiny_store)
    table = src.read_table(src.activation_path(ActivationKey("tiny", "base", 2)))
    store = Store(root)
    store.append_activations(ActivationKey("tiny", "one", 2), table, {"layout": "one"})
    rng = np.random.default_rng(1)
    at = 0
    while at < table.num_rows:
        n = int(rng.integers(1, 120))
        store.append_activations(ActivationKey("tiny", "many", 2), table.slice(at, n), {"layout": "many"})
        at += n
    return store, table


def test_results_do_not_depend_on_fragment_layout(tiny_store, tmp_path):
    store, table = write_layouts(tiny_store, tmp_path / "store")
    assert Store.fragments(store.activation_path(ActivationKey("tiny", "many", 2))) > 40
    dicts = {}
    for checkpoint in ("one", "many"):
        # Batch sizes cut across every fragment boundary of the uneven layout.
        cfg = BuildConfig("tiny", checkpoint, 2, 5.0, calibration_tokens=1700, calibration_batch=333, batch_size=211,
                          saturation_window=3, device="cpu")
        build(cfg, store, progress=False)
        dicts[checkpoint] = Dictionary.load(store, DictionaryKey("tiny", checkpoint, 2, 5.0))
    one, many = dicts["one"], dicts["many"]
    torch.testing.assert_close(one.center, many.center, rtol=0, atol=0)
    assert one.theta == many.theta
    torch.testing.assert_close(one.exemplars, many.exemplars, rtol=0, atol=0)
    assert one.table.column("source_row").equals(many.table.column("source_row"))
    assert one.meta["saturation_curve"] == many.meta["saturation_curve"]
    asg = [store.read_table(store.dictionary_dir(d.key) / "assignments.lance") for d in (one, many)]
    assert asg[0].equals(asg[1]) and asg[0].num_rows == table.num_rows
    # ... and theta is the definition's: batches of exactly 333 rows of the first 1,700.
    x = torch.from_numpy(arrow_to_vectors(table.column("vector")))[:1700]
    ref = calibrate(list(x.split(333)), 5.0)
    assert one.meta["calibration"]["batches"] == ref.batches == 6
    assert one.theta == pytest.approx(ref.theta, rel=1e-9)


def test_store_compact_keeps_rows_order_and_versions(tiny_store, tmp_path):
    store, table = write_layouts(tiny_store, tmp_path / "store")
    path = store.activation_path(ActivationKey("tiny", "many", 2))
    before = store.info(path)
    result = CliRunner().invoke(main, ["store", "compact", "tiny/many/L2", "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    after = store.info(path)
    # Lance commits a compaction as two versions: a fragment-id reservation, then the rewrite.
    assert Store.fragments(path) == 1 and after.version == before.version + 2
    assert store.read_table(path).equals(table)
    # Every earlier version still reads, and its rows are the same prefix as before.
    assert store.read_table(path, version=before.version).equals(table)
    assert store.read_table(path, version=3).equals(table.slice(0, Store.dataset(path, 3).count_rows()))
    # Nothing left to compact: no new version; --all also compacts dictionaries; a bad key is refused.
    assert CliRunner().invoke(main, ["store", "compact", "--all", "--store", str(store.root)]).exit_code == 0
    assert store.info(path).version == after.version
    assert_refused(CliRunner().invoke(main, ["store", "compact", "tiny/none/L2", "--store", str(store.root)]),
                   "nothing to compact")
    assert not (store.root / ".locks").exists()


def test_harvest_ends_compacted(models_dir, tmp_path):
    result = CliRunner().invoke(main, harvest_args(tmp_path / "s", models_dir, **{"--max-tokens": "700",
                                                                                 "--ctx": "16"}))
    assert result.exit_code == 0, result.output
    path = Store(tmp_path / "s").activation_path(ActivationKey("tiny", "base", 1))
    ds = Store.dataset(path)
    assert len(ds.get_fragments()) == 1 and ds.count_rows() == 700
    # 11 appends, then the compaction: the same rows in the same order as the last append.
    assert ds.version == 13 and len(Store.dataset(path, 11).get_fragments()) == 11
    assert ds.to_table().equals(Store.dataset(path, 11).to_table())


# -- one writer per key -------------------------------------------------------------------------------
def env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_concurrent_harvests_one_refused(models_dir, tmp_path):
    """Two real processes harvest one key: the second exits 2 naming the first; rows are exact.

    The first is paused (SIGSTOP) once it holds the lock, so the second surely runs while it
    does, however fast or loaded the machine; then it goes on and completes.
    """
    store = tmp_path / "store"
    args = [sys.executable, "-m", "ep_store", *harvest_args(store, models_dir, **{"--max-tokens": "600",
                                                                                 "--ctx": "8", "--batch-size": "2"})]
    first = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locks = store / ".locks"
    deadline = time.time() + 300

    def first_holds_lock() -> bool:
        return any(f'"pid": {first.pid}' in p.read_text() for p in locks.glob("*.lock")) if locks.exists() else False

    while not first_holds_lock():
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "ep_store" in second.stderr and "started" in second.stderr
    table = Store(store).read_table(Store(store).activation_path(ActivationKey("tiny", "base", 1)))
    keys = list(zip(table.column("doc_id").to_pylist(), table.column("pos").to_pylist()))
    assert len(keys) == len(set(keys)) == 600
    assert not locks.exists()


def hold_lock(store: Path, target: Path) -> subprocess.Popen:
    """Another process holding the writer lock of ``target`` until its stdin closes."""
    code = ("import sys; from pathlib import Path; from ep_store.store.core import Store\n"
            f"with Store({str(store)!r}).lock(Path({str(target)!r}), 'test'):\n"
            "    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_build_assign_match_refused_while_another_process_writes(tiny_store, tmp_path):
    shutil.copytree(tiny_store, tmp_path / "store")
    store = Store(tmp_path / "store")
    for layer in (1, 2):
        build(BuildConfig("tiny", "base", layer, 5.0, calibration_tokens=500, calibration_batch=100, batch_size=256,
                          device="cpu"), store, progress=False)
    a, b = "tiny/base/L1/p5", "tiny/base/L2/p5"
    holder = hold_lock(store.root, store.dictionary_dir(DictionaryKey.parse(a)))
    try:
        before = tree_snapshot(store.root / "dictionaries")
        runner = CliRunner()
        build_args = ["build", "--model", "tiny", "--checkpoint", "base", "--layer", "1", "--percentile", "5",
                      "--store", str(store.root), "--device", "cpu", "--no-progress"]
        assert_refused(runner.invoke(main, build_args), f"pid {holder.pid}")
        assert_refused(runner.invoke(main, ["assign", "--dictionary", a, "--store", str(store.root), "--no-progress"]),
                       f"pid {holder.pid}")
        assert tree_snapshot(store.root / "dictionaries") == before
    finally:
        holder.communicate("")
    holder = hold_lock(store.root, store.matches_dir("tiny~base~L1~p5__tiny~base~L2~p5"))
    try:
        assert_refused(CliRunner().invoke(main, ["match", a, b, "--store", str(store.root)]), f"pid {holder.pid}")
    finally:
        holder.communicate("")
    assert CliRunner().invoke(main, ["match", a, b, "--store", str(store.root)]).exit_code == 0


def test_stale_lock_of_a_dead_process_is_taken_over(models_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = Store(tmp_path / "store")
    lock = store.lock_path(store.activation_path(ActivationKey("tiny", "base", 1)))
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "command": "ep harvest (killed)", "started": "earlier"}))
    result = CliRunner().invoke(main, harvest_args(store.root, models_dir))
    assert result.exit_code == 0, result.output
    assert store.info(store.activation_path(ActivationKey("tiny", "base", 1))).rows == 200
    assert not lock.exists()


# -- a resume proves it continues the same stream -----------------------------------------------------
@pytest.fixture()
def own_models(tmp_path, tiny_tokenizer):
    root = tmp_path / "models"
    make_tiny_model(root / "tiny" / "base", seed=0, tokenizer=tiny_tokenizer)
    return root


def text_file(path: Path, changed: bool = False) -> Path:
    from ep_store.stages.corpus import builtin_texts

    texts = [t for _, t in list(builtin_texts())[:6]]
    if changed:
        texts[0] = texts[0].replace("the", "a", 1)
    path.write_text("\n\n".join(texts))
    return path


@pytest.mark.parametrize("change", ["text", "tokenizer", "model"])
def test_resume_refuses_another_stream(own_models, tmp_path, change, tiny_tokenizer):
    corpus = text_file(tmp_path / "corpus.txt")
    store = tmp_path / "store"
    args = harvest_args(store, own_models, **{"--corpus": str(corpus), "--max-tokens": "300"})
    assert CliRunner().invoke(main, args).exit_code == 0
    folder = own_models / "tiny" / "base"
    if change == "text":
        text_file(corpus, changed=True)
        needle = "text changed"
    elif change == "tokenizer":
        train_tokenizer(vocab_size=500).save_pretrained(folder)
        needle = "another tokenizer"
    else:
        make_tiny_model(folder, seed=7, tokenizer=tiny_tokenizer)
        needle = "another model weights"
    before = tree_snapshot(store)
    more = harvest_args(store, own_models, **{"--corpus": str(corpus), "--max-tokens": "600"})
    result = CliRunner().invoke(main, more)
    assert_refused(result, needle)
    assert "--overwrite" in result.output
    assert tree_snapshot(store) == before
    assert CliRunner().invoke(main, [*more, "--overwrite"]).exit_code == 0
    # The same stream still resumes.
    assert CliRunner().invoke(main, harvest_args(store, own_models, **{"--corpus": str(corpus),
                                                                        "--max-tokens": "700"})).exit_code == 0


def test_rerun_of_a_finished_build_writes_nothing(tiny_store, tmp_path):
    """Found by the crash test: a rerun of a finished build said max_tokens and published a new version."""
    shutil.copytree(tiny_store, tmp_path / "store")
    store = Store(tmp_path / "store")
    cfg = BuildConfig("tiny", "base", 1, 5.0, calibration_tokens=500, calibration_batch=100, batch_size=256,
                      saturation_window=100, device="cpu")  # runs to the end of the stream
    first = build(cfg, store, progress=False)
    folder = store.dictionary_dir(cfg.key)
    before = tree_snapshot(folder)
    again = build(cfg, store, progress=False)
    assert first["stop_reason"] == again["stop_reason"] == "end_of_stream"
    assert again["unchanged"] and "assign" not in again and tree_snapshot(folder) == before
    assert len(Dictionary.load(store, cfg.key).meta["history"]) == 1
