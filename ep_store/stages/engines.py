"""Scale-out engines: harvest and assign as Ray tasks writing Lance fragments (issue 13).

The local engine is the plain path (`ep_store.stages.harvest.harvest`, `ep_store.stages.dictionary.
assign_dataset`). The Ray engine splits the same work into contiguous shards, runs each
shard in a Ray task that writes uncommitted Lance fragments, and commits every dataset's
fragments in **one** commit, in stream order, from the driver:

- harvest: the stream of contexts is planned on the driver exactly as the local path plans
  it (`ep_store.stages.plan.plan`: same corpus, tokenizer, batches, resume offsets), split
  into contiguous runs of batches, and each task loads the model once and runs
  `ep_store.stages.capture.BatchRunner.tables` on its batches: the computation per batch is
  the local one, so rows and vectors are equal. After the commit every dataset is compacted,
  as the local path does (`ep_store.stages.harvest.compact_written`).
- assign: one task per group of activation fragments runs `dictionary.AssignJob.assign_batch`
  on every record batch of its fragments; the assignments dataset is created in one commit.

Why Lance's fragment API inside Ray tasks rather than lance-ray's `LanceDatasink`: one
forward pass of a harvest shard yields rows for several datasets (one per layer), which a
Ray Data sink (one dataset per pipeline) cannot take without running the model once per
layer; and resume needs the driver to skip the rows each layer already holds, which is a
property of our stream, not of a generic sink. The commit protocol is the same one
lance-ray uses (write fragments in tasks, commit once).

A task that dies is retried by Ray (``max_retries``); its half-written files are never
committed. A driver that dies before the commit leaves every dataset at its previous
version; the rerun plans again from what is committed and completes it.

    ep harvest --engine ray --workers 2 --model gemma-3-270m --checkpoint base --layers 6,12
    ep assign --engine ray --workers 2 --dictionary gemma-3-270m/base/L6/p1
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ep_store import jsonio
from ep_store.errors import UsageError, require

log = logging.getLogger(__name__)

FLUSH_ROWS = 65_536
"""Rows a harvest task buffers per layer before writing them as a fragment (bounds memory)."""

FAIL_BEFORE_COMMIT = "EP_FAULT_BEFORE_COMMIT"
"""Fault injection for the crash tests: when set, the driver dies (os._exit) after every
task has written its fragments and before the commit."""


ENGINES = ("local", "ray")  # --engine: run in this process, or as Ray tasks with one commit


@dataclass(kw_only=True)
class RayConfig:
    address: str = "local"
    """`local`: start Ray in this process; `auto`: join the running cluster; or `ray://host:port`."""
    workers: int = 2
    """Tasks (shards) to split the work into; `local` starts Ray with this many CPUs."""
    num_gpus: float = 0.0
    """GPUs each task asks for (harvest on GPU workers: 1)."""
    max_retries: int = 3
    """Times Ray reruns a task whose worker died."""

    def __post_init__(self):
        if self.workers < 1:
            raise UsageError("--workers must be at least 1")
        if not (self.address in ("local", "auto") or self.address.startswith("ray://")):
            raise UsageError(f"--address {self.address!r}: use local, auto or ray://HOST:PORT")


@contextlib.contextmanager
def ray_session(cfg: RayConfig):
    """Connect to (or start) Ray for one job; shut down only what this job started."""
    ray = require("ray", "ray", "--engine ray")  # EnvError (exit 1) with the install hint (issue 18, C7)
    started = False
    if not ray.is_initialized():
        kwargs = {"num_cpus": cfg.workers} if cfg.address == "local" else {"address": cfg.address}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:  # no cluster, no ray[client], ...
            cause = " ".join(str(err).split())[:300]
            raise UsageError(f"cannot start or reach Ray at --address {cfg.address}: {type(err).__name__}: {cause}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def contiguous_shards(items: list, weights: list[int], parts: int) -> list[list]:
    """Split ``items`` into at most ``parts`` contiguous runs of about equal total weight."""
    total, shards, current, acc = sum(weights), [], [], 0
    for item, weight in zip(items, weights):
        current.append(item)
        acc += weight
        if acc >= total * (len(shards) + 1) / parts and len(shards) < parts - 1:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return shards


def run_harvest(cfg, store, models_dir: Path, ray_cfg: RayConfig | None, progress: bool = True) -> dict:
    """Harvest with the local engine (``ray_cfg`` None) or with Ray tasks."""
    from ep_store.stages.harvest import harvest

    if ray_cfg is None:
        return harvest(cfg, store, models_dir, progress)
    return ray_harvest(cfg, store, models_dir, ray_cfg, progress)


def run_assign(store, dictionary: str, activations: str | None, device: str, ray_cfg: RayConfig | None,
               progress: bool = True) -> dict:
    """Assign with the local engine (``ray_cfg`` None) or with Ray tasks (CPU workers).

    Assigning a dictionary over another dataset's activations (``activations``) needs both
    datasets harvested from the same documents: ``dictionary.AssignJob.open``, which both
    engines go through, raises UsageError otherwise (issue 18, A3)."""
    from ep_store.stages.dictionary import assign_dataset

    if ray_cfg is None:
        return assign_dataset(store, dictionary, activations, device, progress=progress)
    return ray_assign(store, dictionary, activations, ray_cfg)


# -- harvest ------------------------------------------------------------------------------------
def harvest_shard(spec: dict) -> dict:
    """One Ray task: load the model once, forward its batches, write fragments per layer.

    ``spec`` holds the harvest config, models dir, dataset paths per layer and the shard's
    work items ``(batch, skip_per_layer)``. Returns fragment metadata per layer in stream
    order and the shard's timings.
    """
    import torch

    from ep_store.stages.capture import BatchRunner
    from ep_store.store import write_fragments

    torch.set_num_threads(spec["threads"])
    cfg = spec["config"]
    runner = BatchRunner(cfg, spec["models_dir"], spec["prefix_ids"])
    fragments = {layer: [] for layer in cfg.layers}
    pending: dict[int, list[pa.Table]] = {layer: [] for layer in cfg.layers}
    forward_s = write_s = 0.0
    tokens = 0

    def flush(layer: int) -> None:
        if pending[layer]:
            fragments[layer] += write_fragments(Path(spec["paths"][layer]), pa.concat_tables(pending[layer]))
            pending[layer] = []

    try:
        for row, batch, skip in spec["work"]:
            t0 = time.perf_counter()
            tables = runner.tables(batch, [layer for layer in cfg.layers if skip[layer] is not None], row)
            t1 = time.perf_counter()
            for layer, table in tables.items():
                pending[layer].append(table.slice(skip[layer]))
                if sum(t.num_rows for t in pending[layer]) >= FLUSH_ROWS:
                    flush(layer)
            write_s += time.perf_counter() - t1
            forward_s += t1 - t0
            tokens += sum(len(c.token_ids) for c in batch)
        t1 = time.perf_counter()
        for layer in cfg.layers:
            flush(layer)
        write_s += time.perf_counter() - t1
    finally:
        runner.close()
    return {"fragments": fragments, "forward_seconds": forward_s, "write_seconds": write_s, "tokens": tokens,
            "fingerprint": runner.fingerprint()}


def ray_harvest(cfg, store, models_dir: Path, ray_cfg: RayConfig, progress: bool = True) -> dict:
    """Harvest ``cfg`` with Ray tasks; one commit per layer. Same rows as the local path.

    Holds every key's writer lock for the whole job, like the local path, and compacts each
    dataset after its commit as the local path does (summary ``compaction``); raises
    UsageError for bad input (before any task starts) or a resume of another stream."""
    from ep_store.stages.harvest import compact_written, writer_locks

    with writer_locks(cfg, store):
        summary = _ray_harvest_locked(cfg, store, models_dir, ray_cfg)
        summary["compaction"] = compact_written(cfg, store)
    return summary


def _ray_harvest_locked(cfg, store, models_dir: Path, ray_cfg: RayConfig) -> dict:
    from ep_store.stages.plan import plan as make_plan

    start = time.perf_counter()
    plan = make_plan(cfg, store, models_dir)
    work = plan.todo()
    if not work:
        return plan.summary(new_tokens=0, seconds=time.perf_counter() - start)
    shards = contiguous_shards(work, [sum(len(c.token_ids) for c in batch) for _, batch, _ in work], ray_cfg.workers)
    paths = {layer: str(store.activation_path(key)) for layer, key in plan.keys.items()}
    with ray_session(ray_cfg) as ray:
        task = ray.remote(harvest_shard).options(num_cpus=1, num_gpus=ray_cfg.num_gpus,
                                                 max_retries=ray_cfg.max_retries)
        specs = [{"config": cfg, "models_dir": models_dir, "paths": paths, "work": shard, "threads": 1,
                  "prefix_ids": plan.prefix_ids} for shard in shards]
        results = ray.get([task.remote(spec) for spec in specs])
    fingerprints = {jsonio.dumps(r["fingerprint"], sort_keys=True) for r in results}
    if len(fingerprints) != 1:
        raise UsageError("Ray workers loaded different models or tokenizers for one harvest; make every worker see "
                         "the same --models-dir (or hub revision) and rerun")
    plan.accept_fingerprint(results[0]["fingerprint"])  # refuses a resume of another model before any commit
    if os.environ.get(FAIL_BEFORE_COMMIT):
        os._exit(137)  # crash test: every fragment written, nothing committed
    versions = {}
    for layer, key in plan.keys.items():
        fragments = [f for result in results for f in result["fragments"][layer]]
        versions[str(key)] = plan.commit(layer, fragments)
    seconds = time.perf_counter() - start
    summary = plan.summary(new_tokens=sum(r["tokens"] for r in results), seconds=seconds)
    summary.update({
        "engine": "ray", "workers": len(shards), "versions": versions,
        "forward_seconds": round(sum(r["forward_seconds"] for r in results), 3),
        "write_seconds": round(sum(r["write_seconds"] for r in results), 3),
    })
    return summary


# -- assign -------------------------------------------------------------------------------------
def assign_shard(spec: dict) -> list[dict]:
    """One Ray task: assign every row of some activation fragments; fragment metadata out."""
    import torch

    from ep_store.stages import dictionary as d
    from ep_store.store import Store, scan_fragment, write_fragments

    torch.set_num_threads(spec["threads"])
    job = d.AssignJob.open(Store(spec["store"]), spec["dictionary"], spec["activations"], "cpu")
    out = Path(spec["out"])
    written = []
    for fragment_id in spec["fragment_ids"]:
        batches = [job.assign_batch(b) for b in scan_fragment(job.source, fragment_id, d.ASSIGN_COLUMNS,
                                                               version=job.source_version)]
        if batches:
            written += write_fragments(out, pa.Table.from_batches(batches, schema=job.schema))
    return written


def ray_assign(store, dictionary: str, activations: str | None, ray_cfg: RayConfig) -> dict:
    """Assign an activation dataset with Ray tasks, one per group of fragments; one commit."""
    from ep_store.stages import dictionary as d
    from ep_store.store import fragment_ids

    start = time.perf_counter()
    job = d.AssignJob.open(store, dictionary, activations, "cpu")
    ids = fragment_ids(job.source, job.source_version)
    shards = contiguous_shards(ids, [1] * len(ids), ray_cfg.workers)
    with ray_session(ray_cfg) as ray:
        task = ray.remote(assign_shard).options(num_cpus=1, max_retries=ray_cfg.max_retries)
        specs = [{"store": str(store.root), "dictionary": str(job.key), "activations": str(job.target),
                  "out": str(job.path), "fragment_ids": shard, "threads": 1} for shard in shards]
        results = ray.get([task.remote(spec) for spec in specs])
    if os.environ.get(FAIL_BEFORE_COMMIT):
        os._exit(137)
    version = job.commit([f for result in results for f in result])
    seconds = time.perf_counter() - start
    return {"dictionary": str(job.key), "activations": str(job.target), "tokens": job.rows, "version": version,
            "engine": "ray", "workers": len(shards), "seconds": round(seconds, 3),
            "tokens_per_s": round(job.rows / max(seconds, 1e-9), 1)}
