"""EP dictionaries as built: load one (optionally as of a tag), assign activations with it.

    from ep_store.stages.dictionary import Dictionary
    d = Dictionary.load("data/store", "gemma-3-270m/base/L6/p1")
    region_N, distance_N = d.assign(x_ND)

    ep assign --dictionary gemma-3-270m/base/L6/p1 --store data/store

``assign_dataset`` assigns every token of an activation dataset (the dictionary's own, or
another of the same documents) and writes assignments.lance (or foreign/...) in one commit;
the Ray engine (ep_store.stages.engines) runs ``AssignJob.assign_batch`` over fragments.
The build lives in ep_store.stages.build.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from ep_store import jsonio
from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError
from ep_store.kernels.assign import Assignment, nearest_exemplar
from ep_store.kernels.calibrate import unit_directions, unit_directions_
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.models import resolve_device
from ep_store.store import Store, arrow_to_tensor, commit_fragments
from ep_store.store.snapshot import DictionarySnapshot

log = logging.getLogger(__name__)


class Dictionary:
    """A built EP dictionary: center, theta and exemplars, as stored (optionally as of a tag).

    ``snapshot`` names the build it is (ep_store.store.snapshot): ``meta`` is meta.json as that build
    published it, ``table`` its exemplars version, and ``snapshot.assignments_version`` the
    assignments written from it (issue 18, A1)."""

    def __init__(self, key: DictionaryKey, meta: dict, exemplars: pa.Table, snapshot: DictionarySnapshot | None = None):
        self.key, self.meta, self.table, self.snapshot = key, meta, exemplars, snapshot
        self.center = torch.tensor(meta["center"], dtype=torch.float32)
        self.theta = float(meta["theta"])
        self.exemplars = arrow_to_tensor(exemplars.column("exemplar"))

    @classmethod
    def load(cls, store: Store | str | Path, key: DictionaryKey | str, as_of: int | str | None = None) -> Dictionary:
        """The dictionary as a build published it: the latest (``as_of`` None: the version meta.json
        names; a later, unpublished one is a crashed write) or the build of a tag or version
        number. Raises UsageError for an unknown dictionary or a tag/version no build published."""
        store = store if isinstance(store, Store) else Store(store)
        key = key if isinstance(key, DictionaryKey) else DictionaryKey.parse(key)
        snap = store.dictionary_snapshot(key, as_of)
        return cls(key, snap.meta, store.read_table(snap.exemplars_path, version=snap.exemplars_version), snap)

    @property
    def width(self) -> int:
        return self.exemplars.shape[1]

    @property
    def mean_directions(self) -> torch.Tensor:
        """M_KD: each region's mean-member direction (float32), in region order like ``exemplars``."""
        return arrow_to_tensor(self.table.column("mean_direction"))

    def __len__(self) -> int:
        return self.exemplars.shape[0]

    def unit(self, x_ND: torch.Tensor) -> torch.Tensor:
        return unit_directions(x_ND, self.center.to(x_ND.device))

    def assign(self, x_ND):
        """(region_N, distance_N) of raw activations x_ND; numpy in, numpy out; torch in, torch out.

        region_N is int64, distance_N float32 cosine distance in [0, 2]. A row with NaN/inf
        values or equal to the center gets region -1 (``assign.UNASSIGNED``) and distance NaN,
        exactly as ``ep assign`` stores it (issue 8, item 7). Raises UsageError on a width
        mismatch.
        """
        as_numpy = isinstance(x_ND, np.ndarray)
        x = torch.from_numpy(np.asarray(x_ND, dtype=np.float32)) if as_numpy else x_ND
        if x.shape[-1] != self.width:
            raise UsageError(f"activations of width {x.shape[-1]} cannot be assigned to {self.key} (width {self.width})")
        result = nearest_exemplar(self.unit(x), self.exemplars.to(x.device))
        if as_numpy:
            return Assignment(result.region_N.numpy(), result.distance_N.numpy())
        return result


ASSIGNMENT_SCHEMA = pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()),
                               ("region_id", pa.int32()), ("distance", pa.float32())])


def assignment_path(store: Store, key: DictionaryKey, activations: ActivationKey | None = None) -> Path:
    """Own stream: assignments.lance; another dataset: foreign/<model>/<checkpoint>/L<layer>.lance."""
    files = store.dictionary_files(key)
    if activations is None or activations == key.activations:
        return files.assignments
    return files.foreign(activations)


ASSIGN_COLUMNS = ["doc_id", "pos", "vector"]


@dataclass
class AssignJob:
    """One assignment of an activation dataset to a dictionary, validated and pinned to the
    dataset's current version. The local engine streams it in this process; the Ray engine
    (ep_store.stages.engines) runs ``assign_batch`` in tasks over fragments; both commit once."""

    store: Store
    key: DictionaryKey
    target: ActivationKey
    dictionary: Dictionary
    source: Path
    source_version: int
    rows: int
    device: torch.device

    @classmethod
    def open(cls, store: Store, key: DictionaryKey | str, activations: ActivationKey | str | None,
             device: str) -> AssignJob:
        """Raises UsageError for an unknown dictionary or dataset, or widths that differ."""
        key = key if isinstance(key, DictionaryKey) else DictionaryKey.parse(key)
        dictionary = Dictionary.load(store, key)
        target = key.activations if activations is None else (
            activations if isinstance(activations, ActivationKey) else ActivationKey.parse(activations))
        source = store.require_activations(target)
        info = store.info(source)
        if info.width != dictionary.width:
            raise UsageError(f"{target} has width {info.width} but {key} has width {dictionary.width}; "
                             "assign activations of the same model and layer width")
        if target != key.activations:  # (doc_id, pos) name the same tokens only for the same documents (A3)
            from ep_store.store.streams import require_same_stream

            require_same_stream(store, key.activations, target, f"assigning {key} over {target}")
        return cls(store, key, target, dictionary, source, info.version, info.rows, resolve_device(device))

    @property
    def path(self) -> Path:
        return assignment_path(self.store, self.key, self.target)

    @property
    def schema(self) -> pa.Schema:
        provenance = {"dictionary": str(self.key), "activations": str(self.target),
                      "activations_version": self.source_version,
                      "exemplars_version": self.dictionary.meta["exemplars_version"],
                      ENVIRONMENT_KEY: environment(self.device)}  # issue 18, E14.1
        return ASSIGNMENT_SCHEMA.with_metadata({b"ep_store": jsonio.dumps(provenance).encode()})

    def assign_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Assignment rows (doc_id, pos, region_id, distance) of one record batch of activations.

        Degenerate rows (non-finite, or equal to the center) get region -1, distance NaN."""
        x = arrow_to_tensor(batch.column("vector")).to(self.device)  # our own copy: normalised in place
        result = nearest_exemplar(unit_directions_(x, self.dictionary.center.to(self.device)),
                                  self.dictionary.exemplars.to(self.device))
        region = result.region_N.cpu().numpy().astype(np.int32)
        return pa.record_batch([batch.column("doc_id"), batch.column("pos"), pa.array(region),
                                pa.array(result.distance_N.cpu().numpy(), pa.float32())], schema=ASSIGNMENT_SCHEMA)

    def commit(self, fragments: list[dict]) -> int:
        """One commit making ``fragments`` (in order) the whole assignments dataset (Ray engine)."""
        read_version = self.store.info(self.path).version if self.store.exists(self.path) else None
        return commit_fragments(self.path, fragments, self.schema, read_version, append=False)


def assign_dataset(store: Store, key: DictionaryKey | str, activations: ActivationKey | str | None = None,
                   device: str = "auto", batch_rows: int = 16384, progress: bool = True) -> dict:
    """Assign every token of an activation dataset; one Lance commit, bounded memory.

    Holds the dictionary's writer lock (UsageError, exit 2, while another process writes
    it) and reads one pinned version of the activations, in chunks of exactly ``batch_rows``.
    Raises UsageError for an unknown dictionary or dataset, or widths that differ.
    """
    key = key if isinstance(key, DictionaryKey) else DictionaryKey.parse(key)
    with store.lock(store.dictionary_dir(key), f"dictionary {key}"):
        return _assign_locked(AssignJob.open(store, key, activations, device), batch_rows, progress)


def _assign_locked(job: AssignJob, batch_rows: int, progress: bool) -> dict:
    start = time.perf_counter()
    bar = tqdm(total=job.rows, unit="tok", desc=f"assign {job.target}", disable=not progress)

    def batches():
        for batch in job.store.scan(job.source, columns=ASSIGN_COLUMNS, batch_size=batch_rows,
                                    version=job.source_version):
            bar.update(batch.num_rows)
            yield job.assign_batch(batch)

    version = job.store.write_stream(job.path, job.schema, batches())
    bar.close()
    seconds = time.perf_counter() - start
    return {"dictionary": str(job.key), "activations": str(job.target), "tokens": job.rows, "version": version,
            "seconds": round(seconds, 3), "tokens_per_s": round(job.rows / max(seconds, 1e-9), 1)}
