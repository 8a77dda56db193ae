"""The store: versioned Lance datasets on disk. This is the only module that imports lance.

Every write is one Lance commit, so a reader never sees half a write and an interrupted
command leaves the last committed version intact. Callers validate their input first and
only then call the writers here.

Three guarantees live here (issue 8, A):
- ``rebatch`` hands out exactly the batch sizes a caller asks for, whatever the fragment
  layout (Lance scanners cut batches at fragment boundaries), so no result depends on how
  a dataset was written.
- ``Store.lock`` gives one writer per key: a second writer is refused (exit 2) with the
  holder's pid, command and start time. The lock is a ``flock`` on a file under
  ``<store>/.locks/`` that holds the owner's pid; the kernel drops it when the owner dies,
  so a lock file left by a killed process is stale and is simply taken over.
- ``Store.compact`` merges small fragments into one commit that holds the same rows in the
  same order (a *compaction version*); earlier versions and tags stay readable.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import torch

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import (
    ActivationKey,
    DictionaryKey,
    SAEKey,
    check_inside,
    from_segment,
    to_segment,
)

log = logging.getLogger(__name__)

META_KEY = b"ep_store"  # schema-metadata entry holding the JSON that produced a dataset


def vectors_to_arrow(x_ND: np.ndarray, dtype=np.float32) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<dtype>[D] (float32 by default: float16 cannot hold
    every model's range, issue 8 item 8; callers that choose float16 check the range first)."""
    x_ND = np.ascontiguousarray(x_ND, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(x_ND.reshape(-1)), x_ND.shape[1])


def _stored_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, D) numpy view of a fixed_size_list[D] column in its stored dtype. A null vector
    (a missing row) becomes a NaN row, so it counts as non-finite and keeps its place:
    Arrow's ``flatten`` drops null slots, which shifted every later row (QA)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if column.null_count == 0:
        return flat
    rows = np.full((len(column), width), np.nan, dtype=flat.dtype)
    rows[column.is_valid().to_numpy(zero_copy_only=False)] = flat
    return rows


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """Arrow fixed_size_list[D] -> (N, D) numpy array of ``dtype`` (null vectors: NaN rows)."""
    return _stored_rows(column).astype(dtype)  # a writable copy torch can wrap


def arrow_to_tensor(column: pa.Array | pa.ChunkedArray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Arrow fixed_size_list[D] -> a new (N, D) torch tensor of ``dtype``, converted by torch
    straight from the stored values (issue 12: for float16 about twice numpy's cast);
    null vectors are NaN rows."""
    rows = _stored_rows(column)
    with warnings.catch_warnings():  # read only, and copied below: Arrow's buffers stay untouched
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        stored = torch.from_numpy(rows)
    return stored.to(dtype, copy=True)


def finite_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) bool: rows of a fixed_size_list[D] vector column with no NaN or inf (a null
    vector is not finite), read in the stored dtype (no float32 copy). float16 tests the
    exponent bits: all ones is inf or NaN."""
    rows = _stored_rows(column)
    if rows.dtype == np.float16:
        return ((rows.view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)
    return np.isfinite(rows).all(axis=1)


def rebatch(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Exactly ``batch_rows`` rows per batch (the last may be shorter), rows in order.

    Lance cuts scanner batches at fragment boundaries (harvest writes one fragment per
    commit), so anything that groups rows (calibration, build, assign, statistics) reads
    through this to see the sizes it asks for (issue 8, A1).
    """
    if batch_rows < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_rows}")
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch_rows - count, batch.num_rows)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == batch_rows:
                yield _concat(held)
                held, count = [], 0
    if count:
        yield _concat(held)


def _concat(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def _filter_rows(batches, keep, row_index: bool, row: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        n = batch.num_rows
        if row_index:
            batch = batch.append_column("_row", pa.array(np.arange(row, row + n, dtype=np.int64)))
        row += n
        if keep is not None:
            mask = np.asarray(keep(batch), dtype=bool)
            if not mask.all():  # a filter copies every column, even when it keeps every row
                batch = batch.filter(pa.array(mask))
        yield batch


def _check_vector_column(schema: pa.Schema, path: Path) -> None:
    """Refuse (UsageError) a dataset whose ``vector`` column is not a fixed-size list of
    floats: every reader decodes vectors as fixed_size_list<float16|float32|float64>[d]."""
    if "vector" not in schema.names:
        return
    kind = schema.field("vector").type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise UsageError(f"{path}: column 'vector' is {kind}, not a fixed-size list of floats; write vectors as "
                         "fixed_size_list<halffloat|float>[d], as ep harvest does")


class _Held:
    """Locks this process holds: path -> (fd, depth), so a writer may re-enter its own lock."""

    locks: dict[str, list] = {}


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    rows: int
    width: int | None
    version: int
    versions: int
    tags: dict[str, int]
    meta: dict


class Store:
    """A folder of Lance datasets laid out by key (see ep_store.keys)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"store path {self.root} is a file; pass a folder (e.g. data/store)")

    # -- paths -------------------------------------------------------------------------------
    def activation_path(self, key: ActivationKey) -> Path:
        return check_inside(self.root, self.root / "activations" / key.relpath())

    def dictionary_dir(self, key: DictionaryKey) -> Path:
        return check_inside(self.root, self.root / "dictionaries" / key.relpath())

    def matches_dir(self, name: str) -> Path:
        return check_inside(self.root, self.root / "matches" / name)

    def sae_dir(self, key: SAEKey) -> Path:
        """Folder of an SAE in its library's own format, with ep_store's meta.json beside it."""
        return check_inside(self.root, self.root / "saes" / key.relpath())

    def sae_compare_dir(self, dictionary: DictionaryKey, sae_name: str) -> Path:
        """Tables of one ``ep sae compare`` run (held-out SAE activations, EP projections)."""
        return check_inside(self.root, self.root / "sae_compare" / dictionary.relpath() / to_segment(sae_name))

    def list_saes(self) -> list[SAEKey]:
        keys = []
        for meta in sorted((self.root / "saes").glob("*/*/L*/*/meta.json")):
            folder = meta.parent
            keys.append(SAEKey(from_segment(folder.parent.parent.parent.name), from_segment(folder.parent.parent.name),
                               int(folder.parent.name[1:]), from_segment(folder.name)))
        return sorted(keys)

    def list_sae_comparisons(self) -> list[tuple[DictionaryKey, str, Path]]:
        """(dictionary, SAE name, folder) of every finished ``ep sae compare``."""
        found = []
        for meta in sorted((self.root / "sae_compare").glob("*/*/L*/p*/*/meta.json")):
            folder = meta.parent
            pdir = folder.parent
            key = DictionaryKey(from_segment(pdir.parent.parent.parent.name), from_segment(pdir.parent.parent.name),
                                int(pdir.parent.name[1:]), float(pdir.name[1:]))
            found.append((key, from_segment(folder.name), folder))
        return found

    # -- generic dataset access ----------------------------------------------------------------
    @staticmethod
    def exists(path: Path) -> bool:
        return (path / "_versions").is_dir()

    @staticmethod
    def info(path: Path) -> DatasetInfo:
        ds = lance.dataset(str(path))
        _check_vector_column(ds.schema, path)
        vector = next((f for f in ds.schema if pa.types.is_fixed_size_list(f.type)), None)
        meta = json.loads((ds.schema.metadata or {}).get(META_KEY, b"{}"))
        return DatasetInfo(
            path=path,
            rows=ds.count_rows(),
            width=vector.type.list_size if vector is not None else None,
            version=ds.version,
            versions=len(ds.versions()),
            tags={name: tag["version"] for name, tag in ds.tags.list().items()},
            meta=meta,
        )

    @staticmethod
    def dataset(path: Path, version: int | str | None = None):
        """The Lance dataset at ``path`` (optionally at a version number or tag)."""
        try:
            return lance.dataset(str(path), version=version)
        except (ValueError, OSError) as err:
            if version is not None:
                raise UsageError(f"{path} has no version or tag {version!r}: {err}") from None
            raise

    @staticmethod
    def versions(path: Path) -> list[int]:
        """Every Lance version number of the dataset at ``path`` that is still on disk, ascending."""
        return sorted(v["version"] for v in lance.dataset(str(path)).versions())

    @staticmethod
    def dataset_meta(path: Path, version: int | str | None = None) -> dict:
        """The ep_store JSON in the schema metadata of ``path`` at ``version`` (what produced it)."""
        return json.loads((Store.dataset(path, version).schema.metadata or {}).get(META_KEY, b"{}"))

    @staticmethod
    def scan(
        path: Path,
        columns: list[str] | None = None,
        batch_size: int = 8192,
        version: int | str | None = None,
        offset: int | None = None,
        limit: int | None = None,
        keep=None,
        row_index: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of exactly ``batch_size`` rows (the last may be shorter), in stored
        order, reading only ``columns``, whatever the fragment layout (see ``rebatch``).

        ``keep(batch) -> bool mask`` drops rows *before* batching, so the sizes hold for the
        rows kept; ``row_index`` adds ``_row``, each row's 0-based position in the dataset.
        """
        ds = Store.dataset(path, version)
        raw = ds.scanner(columns=columns, batch_size=max(batch_size, 1024), offset=offset, limit=limit).to_batches()
        if keep is not None or row_index:
            raw = _filter_rows(raw, keep, row_index, offset or 0)
        yield from rebatch(raw, batch_size)

    @staticmethod
    def reader(path: Path, columns: list[str] | None = None, version: int | str | None = None):
        """A projected Arrow RecordBatchReader (what DuckDB scans)."""
        return Store.dataset(path, version).scanner(columns=columns).to_reader()

    @staticmethod
    def read_table(path: Path, columns: list[str] | None = None, version: int | str | None = None) -> pa.Table:
        return Store.dataset(path, version).to_table(columns=columns)

    @staticmethod
    def fragments(path: Path) -> int:
        return len(lance.dataset(str(path)).get_fragments())

    def compact(self, path: Path, target_rows: int = 1 << 20) -> dict:
        """Merge small fragments into one new commit (a *compaction version*).

        Lance commits it as two versions (a fragment-id reservation, then the rewrite); both
        hold the same rows, in the same order, as the version before them. Every earlier
        version and tag stays readable: nothing is cleaned up, so the old fragments stay on
        disk beside the merged ones until someone deletes old versions. A dataset with one
        fragment gets no new version. Callers hold the key's writer lock.
        """
        check_inside(self.root, path)
        ds = lance.dataset(str(path))
        before = len(ds.get_fragments())
        if before > 1:
            ds.optimize.compact_files(target_rows_per_fragment=target_rows)
            ds = lance.dataset(str(path))
        return {"path": str(path), "fragments_before": before, "fragments": len(ds.get_fragments()),
                "rows": ds.count_rows(), "version": ds.version}

    def compact_keys(self, keys: list[str] | None = None) -> list[dict]:
        """Compact the datasets of activation keys (m/c/L6) or dictionary keys (m/c/L6/p1); None: all.

        Each key is compacted under its writer lock (UsageError while another process writes
        it); a dictionary's exemplars, assignments and foreign assignments are all compacted.
        """
        from ep_store.keys import DictionaryKey

        targets: list[tuple[Path, list[Path], str]] = []
        if keys is None:
            keys = [str(k) for k in self.list_activations()] + [str(k) for k in self.list_dictionaries()]
        for text in keys:
            if text.rsplit("/", 1)[-1].startswith("p"):
                dkey = DictionaryKey.parse(text)
                folder = self.dictionary_dir(dkey)
                paths = sorted(p for p in folder.rglob("*.lance") if self.exists(p))
                targets.append((folder, paths, f"dictionary {dkey}"))
            else:
                akey = ActivationKey.parse(text)
                path = self.activation_path(akey)
                targets.append((path, [path] if self.exists(path) else [], f"activations {akey}"))
        missing = [what for _, paths, what in targets if not paths]
        if missing:
            raise UsageError(f"nothing to compact for {', '.join(missing)}; see: ep store ls")
        results = []
        for lock_target, paths, what in targets:
            with self.lock(lock_target, what):
                results += [{"key": what, **self.compact(path)} for path in paths]
        return results

    # -- locks ---------------------------------------------------------------------------------
    def lock_path(self, target: Path) -> Path:
        """The lock file of a dataset or folder of the store: ``.locks/<its relative path>.lock``."""
        root = self.root.resolve()
        rel = check_inside(self.root, target).resolve().relative_to(root)
        return root / ".locks" / (str(rel).replace("/", "~") + ".lock")

    @contextlib.contextmanager
    def lock(self, target: Path, what: str):
        """Hold the writer lock of ``target`` for the ``with`` block; refuse if another process holds it.

        Raises UsageError (exit 2) naming the holder (pid, command, start time). A process
        may re-enter a lock it holds (build takes its dictionary's lock, then assigns).
        """
        path = self.lock_path(target)
        name = str(path)
        held = _Held.locks.get(name)
        if held is not None:
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        created_root = not self.root.exists()
        fd = _acquire(path, what)
        _Held.locks[name] = [fd, 1]
        try:
            yield
        finally:
            del _Held.locks[name]
            # Unlink while still holding the lock; a waiter that opened the old file sees its
            # inode is gone and retries (see _acquire), so no two writers ever hold one key.
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty: leave no trace in a DVC output
            if created_root:  # a refused first write leaves no empty store folder behind
                with contextlib.suppress(OSError):
                    self.root.rmdir()

    @staticmethod
    def tag(path: Path, name: str) -> int:
        """Tag the latest version of ``path`` (moving the tag if it exists)."""
        ds = lance.dataset(str(path))
        if name in ds.tags.list():
            ds.tags.update(name, ds.version)
        else:
            ds.tags.create(name, ds.version)
        return ds.version

    # -- activations ---------------------------------------------------------------------------
    def append_activations(self, key: ActivationKey, table: pa.Table, meta: dict) -> int:
        """Append one chunk of rows as one commit; creates the dataset on first write."""
        path = self.activation_path(key)
        _check_vector_column(table.schema, path)
        table = table.replace_schema_metadata({META_KEY: jsonio.dumps(meta, sort_keys=True).encode()})
        if self.exists(path):
            width = self.info(path).width
            new_width = table.schema.field("vector").type.list_size
            if width != new_width:
                raise UsageError(
                    f"{key} holds vectors of width {width}, not {new_width}; "
                    "harvest into another key or pass --overwrite"
                )
            ds = lance.write_dataset(table, str(path), mode="append")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            ds = lance.write_dataset(table, str(path), mode="create")
        return ds.version

    def remove(self, path: Path) -> None:
        """Delete a dataset folder or a file inside the store (nothing if absent)."""
        check_inside(self.root, path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def list_activations(self) -> list[ActivationKey]:
        base = self.root / "activations"
        keys = []
        for path in sorted(base.glob("*/*/L*.lance")):
            model, checkpoint = path.parent.parent.name, path.parent.name
            keys.append(ActivationKey(from_segment(model), from_segment(checkpoint), int(path.stem[1:])))
        return sorted(keys)

    # -- dictionaries --------------------------------------------------------------------------
    def dictionary_snapshot(self, key: DictionaryKey, as_of: int | str | None = None, missing_ok: bool = False):
        """The ``DictionarySnapshot`` of ``key`` at a tag or version (None: the published build):
        the exemplars, assignments and meta published together (issue 18, A1). Every reader
        of a dictionary goes through this. Raises UsageError for an unknown dictionary or an
        unpublished tag/version (returns None for the latter when ``missing_ok``)."""
        from ep_store.store.snapshot import dictionary_snapshot

        return dictionary_snapshot(self, key, as_of, missing_ok)

    def list_dictionaries(self) -> list[DictionaryKey]:
        base = self.root / "dictionaries"
        keys = []
        for meta in sorted(base.glob("*/*/L*/p*/meta.json")):
            pdir = meta.parent
            keys.append(
                DictionaryKey(
                    from_segment(pdir.parent.parent.parent.name),
                    from_segment(pdir.parent.parent.name),
                    int(pdir.parent.name[1:]),
                    float(pdir.name[1:]),
                )
            )
        return sorted(keys)

    def write_table(self, path: Path, table: pa.Table, merge_on: str | None = None) -> int:
        """Write a whole table as one commit: create, overwrite, or merge rows on a key column."""
        check_inside(self.root, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if merge_on is not None and self.exists(path):
            ds = lance.dataset(str(path))
            ds.merge_insert(merge_on).when_matched_update_all().when_not_matched_insert_all().execute(table)
            return lance.dataset(str(path)).version
        ds = lance.write_dataset(table, str(path), mode="overwrite" if self.exists(path) else "create")
        return ds.version

    def write_stream(self, path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
        """Write a stream of batches as one commit, in bounded memory."""
        check_inside(self.root, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = pa.RecordBatchReader.from_batches(schema, batches)
        mode = "overwrite" if self.exists(path) else "create"
        ds = lance.write_dataset(reader, str(path), schema=schema, mode=mode)
        return ds.version

    @staticmethod
    def write_json(path: Path, payload: dict) -> None:
        """Write JSON atomically: a temp file of this process, flushed to disk, then renamed."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(jsonio.dumps(payload, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    @staticmethod
    def read_json(path: Path) -> dict:
        return json.loads(path.read_text())


# -- logical digests (issue 8, item 20) --------------------------------------------------------------
DIGEST_BATCH = 65_536  # rows per scanned batch; any size gives the same digest


def logical_digest(path: Path, version: int | str | None = None) -> dict:
    """A digest of a Lance dataset's logical content: its schema (names and types, not the
    metadata) and every row's values in stored order.

    Independent of file names, fragment layout, batch boundaries, Lance version numbers and
    timestamps: the same rows written as one fragment or many, today or tomorrow, give the
    same digest; any changed, added, dropped or reordered value changes it. Each column
    feeds its own SHA-256 streams (validity, fixed-width bytes, or lengths + bytes for
    strings and lists), so batch boundaries cannot move bytes between values.

    Returns ``{"rows": int, "digest": "<sha256 hex>"}``. Raises UsageError if ``path`` is not
    a Lance dataset.
    """
    import hashlib

    if not Store.exists(Path(path)):
        raise UsageError(f"{path} is not a Lance dataset")
    ds = Store.dataset(Path(path), version)
    schema = pa.schema([pa.field(f.name, f.type) for f in ds.schema])
    streams: dict = {}
    rows = 0
    for batch in ds.scanner(batch_size=DIGEST_BATCH).to_batches():
        rows += batch.num_rows
        for name, column in zip(batch.schema.names, batch.columns):
            _feed_digest(streams, name, column)
    total = hashlib.sha256(str(schema).encode() + b"\0" + str(rows).encode())
    for name in sorted(streams):
        total.update(name.encode() + b"\0" + streams[name].digest())
    return {"rows": rows, "digest": total.hexdigest()}


def _feed_digest(streams: dict, name: str, array: pa.Array) -> None:
    """Add one chunk of a column to its digest streams (see logical_digest)."""
    import hashlib

    import pyarrow.compute as pc

    def feed(stream: str, data: bytes) -> None:
        streams.setdefault(stream, hashlib.sha256()).update(data)

    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), kind.value_type
    feed(f"{name}.valid", np.asarray(array.is_valid(), dtype=np.bool_).tobytes())
    if pa.types.is_fixed_size_list(kind):
        _feed_digest(streams, f"{name}.values", array.flatten())
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.fill_null(pc.list_value_length(array), 0).cast(pa.int64())
        feed(f"{name}.lengths", lengths.to_numpy(zero_copy_only=False).tobytes())
        _feed_digest(streams, f"{name}.values", array.flatten())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        values = pc.fill_null(array.cast(pa.large_binary()), b"")
        lengths = pc.binary_length(values).cast(pa.int64()).to_numpy(zero_copy_only=False)
        feed(f"{name}.lengths", lengths.tobytes())
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset: values.offset + len(values) + 1]
        if len(values):
            feed(f"{name}.bytes", values.buffers()[2].to_pybytes()[offsets[0]: offsets[-1]])
    elif pa.types.is_struct(kind):
        for i in range(kind.num_fields):
            _feed_digest(streams, f"{name}.{kind.field(i).name}", array.field(i))
    elif pa.types.is_boolean(kind):
        feed(f"{name}.values", np.asarray(pc.fill_null(array, False), dtype=np.bool_).tobytes())
    elif pa.types.is_primitive(kind):
        filled = pc.fill_null(array, pa.scalar(0, kind)) if array.null_count else array
        feed(f"{name}.values", np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).tobytes())
    else:  # anything else: a canonical text per value
        feed(f"{name}.text", "\0".join(repr(v) for v in array.to_pylist()).encode() + b"\0")


# -- fragments: many writers, one commit (issue 13) ------------------------------------------------
# Workers (Ray tasks) write data files with `write_fragments` and return their metadata as
# JSON; one process commits them in stream order with `commit_fragments`. Until that commit
# the files are invisible: an interrupted job leaves the dataset at its previous version, and
# the orphaned files are removed by Lance's cleanup (or simply never referenced).


def write_fragments(path: Path, table: pa.Table) -> list[dict]:
    """Write ``table`` as uncommitted data files of the dataset at ``path``; their metadata."""
    from lance.fragment import write_fragments as lance_write_fragments

    path.parent.mkdir(parents=True, exist_ok=True)
    return [fragment.to_json() for fragment in lance_write_fragments(table, str(path), schema=table.schema)]


def commit_fragments(path: Path, fragments: list[dict], schema: pa.Schema, read_version: int | None,
                     append: bool) -> int:
    """One commit of ``fragments`` in the given order: append them, or make them the
    dataset's whole content (creating it when ``read_version`` is None).

    ``read_version`` is the version the job planned against. Lance retries concurrent
    commits that do not conflict; the per-key writer lock keeps two jobs of one key apart.
    """
    from lance.fragment import FragmentMetadata

    metadata = [FragmentMetadata.from_json(jsonio.dumps(f)) for f in fragments]
    if append and read_version is not None:
        operation = lance.LanceOperation.Append(metadata)
    else:
        operation = lance.LanceOperation.Overwrite(schema, metadata)
    return lance.LanceDataset.commit(str(path), operation, read_version=read_version).version


def fragment_ids(path: Path, version: int | str | None = None) -> list[int]:
    """Ids of the dataset's fragments, in stored order."""
    return [f.fragment_id for f in Store.dataset(path, version).get_fragments()]


def scan_fragment(path: Path, fragment_id: int, columns: list[str], batch_size: int = 16384,
                  version: int | str | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one fragment, in stored order, reading only ``columns``."""
    fragment = Store.dataset(path, version).get_fragment(fragment_id)
    yield from fragment.to_batches(columns=columns, batch_size=batch_size)

def _acquire(path: Path, what: str) -> int:
    """flock ``path`` (created if needed) without waiting; write our pid, command and start."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # another writer removed the empty .locks folder just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UsageError(
                f"{what} is being written by another process (pid {holder.get('pid', '?')}, "
                f"command {holder.get('command', '?')!r}, started {holder.get('started', '?')}); "
                "wait for it to finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder unlinked the file as we opened it: try the new one
    stale = _read_holder(fd)
    if stale:
        log.warning("taking over the stale lock of %s left by pid %s (%s)", what, stale.get("pid"),
                    stale.get("command"))
    me = {"pid": os.getpid(), "command": " ".join(sys.argv), "what": what,
          "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, jsonio.dumps(me).encode(), 0)
    os.fsync(fd)
    return fd


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}


# -- vector search indexes (issue 14) ---------------------------------------------------------------
# An index is a Lance dataset of its own, inside the store:
#     indexes/<model>/<checkpoint>/L<layer>/p<percentile>.lance
#         row (position in the activation dataset), doc_id, pos, region_id, u fixed_size_list<float16>[d]
# with a Lance vector index on ``u`` (the centered unit directions of the dictionary's geometry) and
# schema metadata recording what it was built from, so a reader can tell when it is stale.
INDEX_COLUMN = "u"


def index_path(store: Store, key: DictionaryKey) -> Path:
    """Where the search index of dictionary ``key`` lives (it need not exist)."""
    rel = key.relpath()
    return check_inside(store.root, store.root / "indexes" / rel.parent / f"{rel.name}.lance")


def searches_dir(store: Store) -> Path:
    """Folder of saved search results (one Lance dataset per name), exposed to SQL as ``searches``."""
    return check_inside(store.root, store.root / "searches")


def write_index(store: Store, path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], meta: dict,
                index_type: str, params: dict, metric: str = "L2") -> int:
    """Write the index table as one commit, then add the Lance vector index on ``u``.

    The table is written to a sibling temp folder and renamed into place only once the vector
    index exists, so a reader never sees a half-built index and a failed build leaves the old one.
    ``index_type`` is a Lance vector index type (IVF_PQ, IVF_HNSW_SQ, ...); ``params`` go to
    ``LanceDataset.create_index`` (num_partitions, num_sub_vectors, m, ef_construction, ...);
    ``metric`` is Lance's distance (L2, cosine, dot).
    Returns the Lance version of the finished index dataset.
    """
    check_inside(store.root, path)
    tmp = path.with_name(path.name + ".tmp")
    store.remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    schema = schema.with_metadata({META_KEY: jsonio.dumps(meta, sort_keys=True).encode()})
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    ds = lance.write_dataset(reader, str(tmp), schema=schema, mode="create")
    if ds.count_rows() == 0:
        store.remove(tmp)
        raise UsageError(f"no finite activation rows to index for {path.stem}")
    ds = ds.create_index(INDEX_COLUMN, index_type, metric=metric, **params)
    version = ds.version
    old = path.with_name(path.name + ".old")
    store.remove(old)
    if path.exists():
        path.replace(old)
    tmp.replace(path)
    store.remove(old)
    return version


def index_meta(path: Path) -> dict:
    """The build record of an index dataset (what it indexes, which versions, parameters)."""
    ds = lance.dataset(str(path))
    meta = json.loads((ds.schema.metadata or {}).get(META_KEY, b"{}"))
    meta["lance_version"] = ds.version
    described = [d for d in ds.describe_indices() if INDEX_COLUMN in d.field_names]
    meta["indexed_rows"] = sum(d.num_rows_indexed for d in described)
    meta["index_bytes"] = sum(d.total_size_bytes or 0 for d in described)
    meta["table_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return meta


def index_candidates(path: Path, q_D: np.ndarray, k: int, nprobes: int, refine_factor: int | None,
                     exclude_region: int | None = None) -> np.ndarray:
    """Activation rows of the ``k`` approximate nearest ``u`` to ``q_D`` (the index's metric), best first.

    ``exclude_region`` drops rows of that region before the search (Lance prefilter on
    ``region_id``). Uses ``LanceDataset.to_table(nearest=...)`` with the vector index.
    """
    ds = lance.dataset(str(path))
    nearest = {"column": INDEX_COLUMN, "q": np.asarray(q_D, dtype=np.float32), "k": int(k),
               "minimum_nprobes": int(nprobes), "maximum_nprobes": int(nprobes), "use_index": True}
    if refine_factor:
        nearest["refine_factor"] = int(refine_factor)
    table = ds.to_table(columns=["row"], nearest=nearest, prefilter=exclude_region is not None,
                        filter=None if exclude_region is None else f"region_id != {int(exclude_region)}",
                        disable_scoring_autoprojection=True)
    return table.column("row").to_numpy()


def take_rows(path: Path, rows: np.ndarray | list[int], columns: list[str]) -> pa.Table:
    """Rows of a dataset by position, in the order given (``LanceDataset.take``)."""
    rows = [int(r) for r in rows]
    if not rows:
        return lance.dataset(str(path)).schema.empty_table().select(columns)
    return lance.dataset(str(path)).take(rows, columns=columns)


def find_token(path: Path, doc_id: int, pos: int, columns: list[str]) -> pa.Table:
    """The rows of an activation dataset at (doc_id, pos): zero or one row."""
    return lance.dataset(str(path)).to_table(columns=columns, filter=f"doc_id = {int(doc_id)} AND pos = {int(pos)}")
