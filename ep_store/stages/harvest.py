"""Harvest residual-stream activations into the store.

One forward pass per batch of contexts captures every requested layer with forward hooks
on the decoder blocks and stops right after the deepest one (a hook raises), so later
blocks, the final norm and the unembedding are never computed. ``vector`` is the output
of decoder block ``layer`` (0-based), the point TransformerLens calls
``blocks.<layer>.hook_resid_post``; BOS and padding are never stored.

Numbers and tokens (issue 8):
- Vectors are stored as ``storage_dtype``: float32 by default, which holds every value a
  float32 model computes (Gemma 3 270M layer 12 exceeds float16's 65,504) at 4 bytes per
  value, i.e. 4 * d_model bytes per token (2,560 for Gemma 3 270M, 2,304 for SmolLM2-135M);
  float16 halves that and is refused, before the batch is written, for any batch with a
  value beyond its range. Non-finite values from the model's own compute (e.g.
  ``--dtype float16``) are refused with their cause. bfloat16 is not a storage choice:
  Arrow has no bfloat16 type (Lance's extension type is a binary column DuckDB reads as
  bytes) and it keeps 8 significant bits.
- Text is tokenized by ``corpus.encode`` (special-token strings are text); the token column
  is the document slice each token covers; BOS follows the tokenizer's convention
  (``--bos auto``) unless overridden, and is recorded in the dataset metadata.
- Limits are checked up front: ``ctx`` plus the BOS must fit the model's position table.

Each batch is appended as one Lance commit per layer. The stream of rows is deterministic
(corpus, tokenizer, ctx), so a rerun skips the rows each layer already holds and resumes
with no token missing or repeated. A resume first proves it continues the same stream
(issue 8, A4): the tokenizer and weights fingerprints stored with the dataset must match,
and the stored rows' (doc_id, pos, token_id, token, char span) must equal the new stream's
prefix; otherwise it stops with exit 2 and says to pass --overwrite. One harvest per key
at a time (writer locks, exit 2 naming the other process), and each dataset is compacted
into few fragments at the end (a compaction version: same rows, same order).

    ep harvest --model gemma-3-270m --checkpoint base --layers 6,12 --corpus builtin \
        --max-tokens 20000 --ctx 128 --batch-size 16 --store data/store
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ep_store.errors import UsageError
from ep_store.stages.capture import BatchRunner, rows_table
from ep_store.stages.hostcopy import HostBlock
from ep_store.stages.plan import HarvestConfig, HarvestPlan, plan
from ep_store.stages.writer import BackgroundWriter
from ep_store.store import Store
from ep_store.store.fragments import compact


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def harvest(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool = True) -> dict:
    """Harvest ``cfg`` into ``store`` in this process; returns the run summary.

    One Lance commit per layer per batch; a rerun resumes after the rows already held.
    Holds the writer lock of every key it writes (UsageError, exit 2, naming the process
    that holds one), and compacts each dataset at the end (issue 8, A2 and A3). Raises
    UsageError for bad input (before anything is written).
    """
    with writer_locks(cfg, store):
        try:
            summary = _harvest_locked(cfg, store, models_dir, progress)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: compact what was committed (issue 18, C8)
            compact_written(cfg, store)
            raise
        summary["compaction"] = compact_written(cfg, store)
    return summary


def compact_written(cfg: HarvestConfig, store: Store) -> dict:
    """Compact every dataset of ``cfg`` that exists (a compaction version: same rows, same
    order); the caller holds their writer locks."""
    return {str(k): compact(store, store.activation_path(k)) for k in cfg.keys.values()
            if store.exists(store.activation_path(k))}


@contextlib.contextmanager
def writer_locks(cfg: HarvestConfig, store: Store):
    """Hold the writer lock of every activation dataset ``cfg`` writes (both engines; issue 8, A3).
    Raises UsageError naming the process that holds one."""
    with contextlib.ExitStack() as locks:
        for key in cfg.keys.values():
            locks.enter_context(store.lock(store.activation_path(key), f"activations {key}"))
        yield


def _harvest_locked(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool) -> dict:
    plan_ = plan(cfg, store, models_dir)
    runner = BatchRunner(cfg, models_dir, plan_.prefix_ids)
    plan_.accept_fingerprint(runner.fingerprint())
    keys = plan_.keys
    if cfg.overwrite:
        for key in keys.values():
            store.remove(store.activation_path(key))
    bytes_before = sum(_dir_bytes(store.activation_path(k)) for k in keys.values())
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc=f"harvest {cfg.model}/{cfg.checkpoint}", disable=not progress)
    try:
        with BackgroundWriter(cfg.writer_depth) as writer:
            loop = _forward_and_write(plan_, runner, writer, bar)
    finally:
        bar.close()
        runner.close()
    if loop.total == 0:
        raise UsageError(f"corpus {cfg.corpus!r} produced no tokens")
    seconds = time.perf_counter() - start
    bytes_written = sum(_dir_bytes(store.activation_path(k)) for k in keys.values()) - bytes_before
    return {
        **plan_.summary(loop.new_tokens, seconds),
        "tokens_total": loop.total,
        **_timings(loop, writer, seconds),
        "bytes_written": bytes_written,
        "config": asdict(cfg),
    }


@dataclass
class _Loop:
    """What the forward loop did: stream rows seen, rows stored, and where the time went."""

    total: int = 0
    new_tokens: int = 0
    forward_s: float = 0.0
    """Main thread: forward passes, checks, conversion to the storage dtype, copy issue."""
    copy_s: float = 0.0
    """Writer thread: waiting for device-to-host copies to land, building Arrow tables."""


def _forward_and_write(plan_: HarvestPlan, runner: BatchRunner, writer: BackgroundWriter, bar) -> _Loop:
    """Every batch with rows still to store: forward pass here, Lance commits on ``writer``."""
    loop, held = _Loop(), dict(plan_.held)
    for stream_row, batch in plan_.batches():
        n = sum(len(c.token_ids) for c in batch)
        todo = [L for L in plan_.cfg.layers if held[L] < stream_row + n]
        if todo:
            t0 = time.perf_counter()
            columns, blocks = runner.host_blocks(batch, todo, stream_row)
            loop.forward_s += time.perf_counter() - t0
            skips = {L: max(0, held[L] - stream_row) for L in todo}  # rows of this batch already stored
            writer.submit(_write_batch, plan_, columns, blocks, skips, loop)
            held.update({L: stream_row + n for L in todo})
            loop.new_tokens += n - min(skips.values())  # rows of this batch not yet stored by some layer
        bar.update(n)
        loop.total = stream_row + n
    return loop


def _write_batch(plan_: HarvestPlan, columns: dict, blocks: dict[int, HostBlock], skips: dict[int, int],
                 loop: _Loop) -> None:
    """One Lance commit per layer of one batch (runs on the writer thread)."""
    for layer, skip in skips.items():
        t0 = time.perf_counter()
        rows = rows_table(columns, blocks[layer]).slice(skip)
        loop.copy_s += time.perf_counter() - t0
        plan_.store.append_activations(plan_.keys[layer], rows, plan_.meta(layer))


def _timings(loop: _Loop, writer: BackgroundWriter, seconds: float) -> dict:
    """Where a harvest's time went (issue 12): the model's forward passes, the copies, the
    Lance writes, and the time the model sat idle waiting for the writer."""
    write_s = max(writer.busy_s - loop.copy_s, 0.0)
    return {
        "forward_seconds": round(loop.forward_s, 3),
        "copy_seconds": round(loop.copy_s, 3),
        "write_seconds": round(write_s, 3),
        "model_idle_seconds": round(writer.wait_s, 3),
        "model_idle_share": round(writer.wait_s / seconds, 4) if seconds else 0.0,
        "write_share": round(write_s / seconds, 4) if seconds else 0.0,
        "writer_depth": writer.depth,
    }
