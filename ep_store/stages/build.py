"""Build an EP dictionary from an activation dataset, or grow one (loading and assigning: ep_store.stages.dictionary).

    ep build --model gemma-3-270m --checkpoint base --layer 6 --percentile 1 --store data/store

A build streams the activation dataset in stored order: a calibration pass over the first
``calibration_tokens`` rows (two streaming passes, bounded memory), then leader clustering
(ep_store.kernels.leader) until saturation, the token budget or the end of the stream. It writes

    dictionaries/<model>/<checkpoint>/L<layer>/p<p>/exemplars.lance   (one Lance version per build, tagged tokens-<n>)
    dictionaries/<model>/<checkpoint>/L<layer>/p<p>/meta.json
    dictionaries/<model>/<checkpoint>/L<layer>/p<p>/assignments.lance (unless assign=False)

Building again with a larger budget, or after the activations grew (ep harvest resumed),
continues from the saved state; the result equals one fresh build of the longer stream under
the same command: regions, statistics to the bit, saturation curve, stop reason, latest tag
(issue 18, A2). The batch a build stopped inside stays open and is filled up first, so batch
boundaries are a fresh build's. Stop reasons:

- ``saturated``: ``saturation_window`` complete batches in a row added no region. Final: the
  same command on any longer stream stops at the same place, so it never resumes (rebuild with
  a larger --saturation-window and --overwrite to go on).
- ``end_of_stream``: every row was consumed (possibly inside a batch); resumes when rows exist.
- ``max_tokens``: the budget ran out; resumes with a larger --max-tokens.

A rerun with nothing new writes nothing: same Lance version, same tag, same digest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

import ep_store
from ep_store.environment import ENVIRONMENT_KEY, cpu_capability, environment
from ep_store.errors import UsageError, options_changed
from ep_store.kernels.calibrate import (
    Calibration,
    CenterAccumulator,
    batch_percentile,
    centered_norms,
    mean_theta,
    median_norm,
    unit_directions_,
)
from ep_store.kernels.leader import LeaderBuilder, LeaderState
from ep_store.kernels.screen import PRECISION_CHOICES
from ep_store.keys import DEFAULT_HOOK, DictionaryKey
from ep_store.stages.dictionary import assign_dataset
from ep_store.stages.models import resolve_device
from ep_store.stages.prefetch import Prefetch
from ep_store.stages.vectors import BuildInputs, rows_from, stream_vectors
from ep_store.store import DictionaryFiles, Store, arrow_to_tensor, vectors_to_arrow

log = logging.getLogger(__name__)

STREAM_ROWS = 16384  # rows per Lance read while building
CALIBRATION_PREFIXES = ("shared", "disjoint")
"""Whether the build stream includes the calibration prefix (BuildConfig.calibration_prefix)."""


@dataclass
class BuildConfig:
    model: str
    """Model of the activation dataset."""
    checkpoint: str
    """Checkpoint of the activation dataset."""
    layer: int
    """Layer of the activation dataset."""
    percentile: float
    """p of theta_p: smaller p, tighter cells, more regions (paper headline: 1)."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    calibration_tokens: int = 200_000
    """Calibrate on this many first rows (all if fewer)."""
    calibration_batch: int = 2048
    """Batch size B_cal of the within-batch distance percentiles (the authors: one extraction
    batch, ~16k tokens; issue 22)."""
    calibration_prefix: str = "shared"
    """shared: the build streams from row 0, the calibration prefix included (ours); disjoint:
    the build streams from the first row after the calibration prefix, as the authors'
    build_partitions.py does (issue 22). Recorded in meta.json's build parameters when disjoint."""
    batch_size: int = 2048
    """Build batch size: the unit of the saturation rule."""
    saturation_window: int = 1
    """Stop after this many consecutive batches with no new exemplar."""
    max_tokens: int | None = None
    """Token budget of the build (None: the whole dataset)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    hook: str = DEFAULT_HOOK
    """Hook point of the activation dataset (issue 21, item 4)."""
    precision: str = "auto"
    """Screening matmul precision: auto (bfloat16 only on a CUDA device or a CPU with native
    bf16, float32 elsewhere; issue 20), float32 or bfloat16. Decisions near theta and near
    ties are re-taken in float64, so every choice gives the same dictionary to the bit."""
    skip_nonfinite: bool = False
    """Drop rows with NaN/inf instead of refusing the dataset."""
    overwrite: bool = False
    """Rebuild from scratch even if a dictionary with other parameters exists."""

    def __post_init__(self):
        if not 0 < self.percentile < 100:
            raise UsageError(f"--percentile must lie in (0, 100), got {self.percentile}")
        for name in ("calibration_tokens", "calibration_batch", "batch_size", "saturation_window"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.calibration_batch < 2:  # theta is a percentile of within-batch pairs (issue 8, item 6)
            raise UsageError("--calibration-batch must be at least 2: theta is a percentile of pairs within a batch")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError("--max-tokens must be at least 1")
        if self.calibration_prefix not in CALIBRATION_PREFIXES:
            raise UsageError(f"unknown calibration prefix {self.calibration_prefix!r}; use "
                             f"{', '.join(CALIBRATION_PREFIXES)}")
        if self.precision not in PRECISION_CHOICES:
            raise UsageError(f"unknown precision {self.precision!r}; use {', '.join(PRECISION_CHOICES)}")

    @property
    def key(self) -> DictionaryKey:
        return DictionaryKey(self.model, self.checkpoint, self.layer, self.percentile, self.hook)

    def defining(self) -> dict:
        """Parameters that define the dictionary (a continued build must match them)."""
        defining = {k: getattr(self, k) for k in ("percentile", "calibration_tokens", "calibration_batch",
                                                  "batch_size", "saturation_window", "skip_nonfinite")}
        if self.calibration_prefix != "shared":  # absent when shared: dictionaries built before it continue
            defining["calibration_prefix"] = self.calibration_prefix
        return defining

    def first_build_row(self, rows: int) -> int:
        """The first stored row the build streams: 0, or (disjoint) the row after the calibration prefix."""
        return 0 if self.calibration_prefix == "shared" else min(self.calibration_tokens, rows)


def calibrate_stream(store: Store, path: Path, cfg: BuildConfig, version: int | None = None) -> Calibration:
    """Two streaming passes over the calibration prefix: center, then per-batch percentiles."""
    def batches():
        return stream_vectors(store, path, cfg.calibration_batch, cfg.calibration_tokens, cfg.skip_nonfinite,
                              version)

    acc = None
    for x, _ in batches():
        acc = acc or CenterAccumulator(x.shape[1])
        acc.add(x)
    if acc is None or acc.count < 2:
        hint = (" once --skip-nonfinite dropped the non-finite rows; re-harvest with finite values "
                "(ep harvest --dtype float32 --storage-dtype float32)" if cfg.skip_nonfinite
                else "; raise --calibration-tokens or harvest more tokens")
        raise UsageError(f"{path} has fewer than two calibration tokens{hint}")
    try:  # the kernels raise ValueError; for a user it is bad input (exit 2)
        center = acc.center()
        thetas, norms = [], []
        for x, _ in batches():
            norms.append(centered_norms(x, center))  # steering's scale (issue 9)
            thetas.append(batch_percentile(unit_directions_(x, center), cfg.percentile))
        theta, used = mean_theta(thetas, cfg.calibration_batch)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return Calibration(center, theta, cfg.percentile, acc.count, used, median_norm(torch.cat(norms)))


# -- saving and loading the builder state ---------------------------------------------------------
def exemplar_table(state: LeaderState, tokens: pa.Table) -> pa.Table:
    """One row per region. ``tokens`` holds doc_id, pos, token of each exemplar's source row."""
    count = state.member_count_K.to(torch.float64)
    norm = state.direction_sum_KD.norm(dim=1)
    mean_dir = state.direction_sum_KD / norm.clamp_min(1e-300)[:, None]
    return pa.table({
        "region_id": pa.array(np.arange(state.regions), pa.int32()),
        "exemplar": vectors_to_arrow(state.exemplars_KD.numpy(), np.float32),
        "mean_direction": vectors_to_arrow(mean_dir.numpy(), np.float32),
        "member_count": pa.array(state.member_count_K.numpy(), pa.int64()),
        "coherence": pa.array((norm / count.clamp_min(1)).numpy(), pa.float32()),
        "direction_norm": pa.array(norm.numpy(), pa.float64()),
        # The builder's float64 sums as they are, so a continued build resumes them exactly.
        "direction_sum": vectors_to_arrow(state.direction_sum_KD.numpy(), np.float64),
        "source_row": pa.array(state.source_row_K.numpy(), pa.int64()),
        "doc_id": tokens.column("doc_id"),
        "pos": tokens.column("pos"),
        "token": tokens.column("token"),
    })


def state_from_store(table: pa.Table, meta: dict) -> LeaderState:
    """The builder's state as the build that published ``table`` and ``meta`` left it, ready to
    continue: the batch it stopped inside stays open (issue 18, A2), so a continued build closes
    it at the same stream position as one fresh build would."""
    width = table.schema.field("exemplar").type.list_size
    if "direction_sum" in table.column_names:
        direction_sum = arrow_to_tensor(table.column("direction_sum"), torch.float64)
    else:  # built before the sums were stored: float32 mean direction times its float64 norm
        norm = torch.tensor(table.column("direction_norm").to_numpy())
        direction_sum = arrow_to_tensor(table.column("mean_direction"), torch.float64) * norm[:, None]
    closed, open_batch, quiet, stop_reason = resume_point(meta)
    return LeaderState(
        width=width,
        exemplars_KD=arrow_to_tensor(table.column("exemplar")),
        source_row_K=torch.tensor(table.column("source_row").to_numpy()),
        member_count_K=torch.tensor(table.column("member_count").to_numpy()),
        direction_sum_KD=direction_sum,
        tokens=meta["builder"]["tokens"], new_in_open_batch=open_batch, quiet_batches=quiet,
        new_per_batch=closed, stop_reason=stop_reason,
    )


def resume_point(meta: dict) -> tuple[list[int], int, int, str | None]:
    """(closed batches' new regions, new regions in the open batch, trailing quiet batches, stop
    reason) of a published build, derived from its tokens and saturation curve (issue 18, A2).

    Batches are aligned to stream positions, so the closed ones are the first tokens // B entries.
    Only ``saturated`` (a full window of closed quiet batches) stays stopped: the same command on
    a longer stream stops there too. A build that ran out of stream or budget resumes. Metas
    written before issue 18 closed the partial last batch at the end of the stream (and a rerun
    closed it again, appending a spurious 0): the entries past the closed batches are that
    partial batch's count, or none (budget stop: it is ``new_in_open_batch``).
    """
    size, window = meta["build"]["batch_size"], meta["build"]["saturation_window"]
    tokens, curve = meta["builder"]["tokens"], list(meta["saturation_curve"])
    closed = curve[: tokens // size]
    if tokens % size == 0:
        open_batch = 0
    else:
        open_batch = curve[tokens // size] if len(curve) > tokens // size else meta["builder"]["new_in_open_batch"]
    quiet = next((i for i, new in enumerate(reversed(closed)) if new), len(closed))  # trailing quiet batches
    return closed, open_batch, quiet, "saturated" if quiet >= window else None


# -- build ----------------------------------------------------------------------------------------
def build(cfg: BuildConfig, store: Store, assign: bool = True, progress: bool = True) -> dict:
    """Build, or continue, the dictionary ``cfg.key``; returns the run summary.

    Holds the dictionary's writer lock throughout (a second writer gets UsageError, exit 2)
    and reads one pinned version of the activations. The exemplars are one Lance commit and
    meta.json, written after it, names that commit: a build killed in between leaves an
    unpublished version that readers ignore and the rerun supersedes (issue 8, A3 and G).
    """
    key = cfg.key
    source = store.require_activations(key.activations)
    files = store.dictionary_files(key)
    with store.lock(files.folder, f"dictionary {key}"):
        return _build_locked(cfg, store, source, files, assign, progress)


def _build_locked(cfg: BuildConfig, store: Store, source: Path, files: DictionaryFiles, assign: bool,
                  progress: bool) -> dict:
    key = cfg.key
    previous = store.read_json(files.meta) if files.finished and not cfg.overwrite else None
    if previous is not None and previous["build"] != cfg.defining():
        raise options_changed(str(key), previous["build"], cfg.defining())
    device = resolve_device(cfg.device)
    source_info = store.info(source)  # every read below is of this version
    first_row = cfg.first_build_row(source_info.rows)
    if first_row >= source_info.rows:
        raise UsageError(f"{key.activations} has {source_info.rows} rows, all in the calibration prefix: a disjoint "
                         "build has none left; lower --calibration-tokens or harvest more tokens")
    budget = min(cfg.max_tokens or source_info.rows - first_row, source_info.rows - first_row)
    start = time.perf_counter()
    if previous is None:
        calibration = calibrate_stream(store, source, cfg, source_info.version)
        state = LeaderState(width=source_info.width)
    else:
        calibration = Calibration(torch.tensor(previous["center"]), previous["theta"], cfg.percentile,
                                  previous["calibration"]["tokens"], previous["calibration"]["batches"],
                                  previous.get("scale"))
        table = store.read_table(files.exemplars, version=previous["exemplars_version"])
        state = state_from_store(table, previous)  # stopped only if saturated
    calibrated = time.perf_counter()
    builder = LeaderBuilder(calibration.theta, cfg.batch_size, cfg.saturation_window, state, device, cfg.precision)
    consumed_before = state.tokens
    state, wait_share = _cluster(cfg, store, source, source_info.version, builder, calibration, budget, progress,
                                 first_row)
    clustered = time.perf_counter()
    version, tag, published = _publish(cfg, store, files, state, calibration, previous, source_info, builder.precision)
    summary = {
        "dictionary": str(key), "regions": state.regions, "tokens": state.tokens, "theta": round(calibration.theta, 6),
        "seconds": round(clustered - start, 3),
        "tokens_per_s": round((state.tokens - consumed_before) / max(clustered - calibrated, 1e-9), 1),
        "calibration_seconds": round(calibrated - start, 3), "stop_reason": state.stop_reason,
        "version": version, "tag": tag, "precision": builder.precision, "precision_requested": cfg.precision,
        "cpu_capability": cpu_capability(), "device": str(device),
        "screen_gflop": round(builder.screen_flops / 1e9, 3), "rechecked_rows": builder.rechecked,
        "input_wait_share": round(wait_share, 4), "unchanged": not published,
    }
    if assign and (published or not _assignments_current(store, files, version, source_info.version)):
        summary["assign"] = assign_dataset(store, key, progress=progress, device=cfg.device)
    return summary


def _cluster(cfg: BuildConfig, store: Store, source: Path, source_version: int, builder: LeaderBuilder,
             calibration: Calibration, budget: int, progress: bool, first_row: int = 0) -> tuple[LeaderState, float]:
    """Feed the stream from stored row ``first_row`` (past the rows a previous build consumed)
    to the builder; its final state and the share of the time it waited on input."""
    consumed_before = builder.state.tokens
    center = calibration.center_D.to(builder.device)
    bar = tqdm(total=budget, initial=consumed_before, unit="tok", desc=f"build {cfg.key}", disable=not progress)
    # Read in large chunks (fewer Lance calls); the builder cuts them at batch boundaries. A
    # reader thread reads, decodes and normalises ahead of the screening (issue 12).
    read_rows = max(cfg.batch_size, STREAM_ROWS)
    vectors = stream_vectors(store, source, read_rows, None, cfg.skip_nonfinite, source_version)
    inputs = BuildInputs(rows_from(vectors, first_row), center, consumed_before, budget - consumed_before,
                         builder.device)
    stopped = False
    with Prefetch(inputs, depth=2) as prefetched:
        for u, rows in prefetched:
            if builder.state.stop_reason is not None:  # rows are left: a stop, not the end of the stream
                stopped = True
                break
            bar.update(builder.feed(u, rows))
        wait_share = prefetched.wait_share
    bar.close()
    stream_done = not stopped and not inputs.truncated and builder.state.tokens == inputs.seen
    # The batch the stream or budget ended in stays open (finish("max_tokens") does not close it):
    # a rerun, or a continued build once the activations grew, fills it up where it stopped and
    # closes it where a fresh build would; closing it here made every rerun close it again
    # (issue 18, A2). A stream that ends inside a batch is end_of_stream, never saturated.
    state = builder.finish("max_tokens")
    if stream_done and state.stop_reason == "max_tokens":
        state.stop_reason = "end_of_stream"
    return state, wait_share


def published_curve(state: LeaderState, batch_size: int) -> list[int]:
    """New regions per build batch: the closed batches, then the open one if the build stopped inside it."""
    return state.new_per_batch + ([state.new_in_open_batch] if state.tokens % batch_size else [])


def _publish(cfg: BuildConfig, store: Store, files: DictionaryFiles, state: LeaderState, calibration: Calibration,
             previous: dict | None, source_info, precision: str) -> tuple[int, str, bool]:
    """Write the exemplars (one commit), tag it, then meta.json; (version, tag, whether written).

    A rerun that adds nothing to the previous build writes nothing, so a repeated command
    (e.g. after a crash that came after meta.json) leaves one history entry per build.
    """
    key = cfg.key
    tag = f"tokens-{state.tokens}"
    curve = published_curve(state, cfg.batch_size)
    if previous is not None and previous["saturation_curve"] == curve and all(
            previous[k] == getattr(state, k) for k in ("tokens", "regions", "stop_reason")):
        return previous["exemplars_version"], tag, False  # a rerun with nothing new writes nothing
    tokens = _source_tokens(store, store.activation_path(key.activations), state.source_row_K, source_info.version)
    files.folder.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:  # unpublish first: a crash below leaves no meta.json naming removed data
        for path in (files.meta, files.exemplars, files.assignments):
            store.remove(path)
    # A whole-table overwrite (not a merge): rows a crashed, unpublished write left can never survive.
    store.write_table(files.exemplars, exemplar_table(state, tokens))
    version = store.tag(files.exemplars, tag)
    info = store.info(files.exemplars)
    # The machine, libraries and screening precision (auto resolved, issue 20) of this build
    # (issue 18, E14.1); digests skip it.
    env = environment(resolve_device(cfg.device), precision)
    meta = {
        "key": str(key), "model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
        **({"hook": key.hook} if key.hook != DEFAULT_HOOK else {}),  # absent for resid_post: old digests hold
        "percentile": cfg.percentile, "theta": calibration.theta, "center": calibration.center_D.tolist(),
        "scale": calibration.scale,
        "width": state.width, "regions": state.regions, "tokens": state.tokens,
        "stop_reason": state.stop_reason, "saturation_curve": curve,
        "calibration": {"tokens": calibration.tokens, "batches": calibration.batches, "batch": cfg.calibration_batch},
        "build": cfg.defining(),
        "builder": {"tokens": state.tokens, "new_in_open_batch": state.new_in_open_batch,
                    "quiet_batches": state.quiet_batches},
        "activations": {"key": str(key.activations), "version": source_info.version},
        "exemplars_version": version, "tags": info.tags, "ep_store_version": ep_store.__version__,
        ENVIRONMENT_KEY: env,
        # One entry per build: what the dictionary was at each Lance version (for --as-of; read
        # back by ep_store.store.snapshot). Closed batches never change, so the curve at a build is the
        # latest curve's first tokens // batch_size entries plus that build's open batch.
        "history": (previous or {}).get("history", []) + [{
            "version": version, "tag": tag, "tokens": state.tokens, "regions": state.regions,
            "stop_reason": state.stop_reason, "batches": len(curve), "open_batch": state.new_in_open_batch,
            "activations": {"key": str(key.activations), "version": source_info.version}, ENVIRONMENT_KEY: env}],
    }
    store.write_json(files.meta, meta)
    return version, tag, True


def _assignments_current(store: Store, files: DictionaryFiles, exemplars_version: int,
                         activations_version: int) -> bool:
    """Whether assignments.lance was written from this exemplars version and activations version."""
    path = files.assignments
    if not store.exists(path):
        return False
    meta = store.info(path).meta
    return meta.get("exemplars_version") == exemplars_version and meta.get("activations_version") == activations_version


def _source_tokens(store: Store, path: Path, rows_K: torch.Tensor, version: int | None = None) -> pa.Table:
    if rows_K.numel() == 0:
        return pa.table({"doc_id": pa.array([], pa.int64()), "pos": pa.array([], pa.int32()),
                         "token": pa.array([], pa.string())})
    return store.dataset(path, version).take(rows_K.tolist(), columns=["doc_id", "pos", "token"])
