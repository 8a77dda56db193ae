"""Fragments: many writers, one commit (issue 13), and compaction (issue 8, A).

Workers (Ray tasks) write data files with ``write_fragments`` and return their metadata as
JSON; one process commits them in stream order with ``commit_fragments``. Until that commit
the files are invisible: an interrupted job leaves the dataset at its previous version, and
the orphaned files are removed by Lance's cleanup (or simply never referenced).

``compact`` merges small fragments into one commit that holds the same rows in the same order
(a *compaction version*); earlier versions and tags stay readable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import lance
import pyarrow as pa

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import ActivationKey, DictionaryKey, check_inside
from ep_store.store.core import Store
from ep_store.store.layout import LANCE, STORAGE_VERSION


def write_fragments(path: Path, table: pa.Table) -> list[dict]:
    """Write ``table`` as uncommitted data files of the dataset at ``path``; their metadata."""
    from lance.fragment import write_fragments as lance_write_fragments

    path.parent.mkdir(parents=True, exist_ok=True)
    return [fragment.to_json() for fragment in lance_write_fragments(table, str(path), schema=table.schema,
                                                                     data_storage_version=STORAGE_VERSION)]


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


def compact(store: Store, path: Path, target_rows: int = 1 << 20) -> dict:
    """Merge small fragments into one new commit (a *compaction version*).

    Lance commits it as two versions (a fragment-id reservation, then the rewrite); both
    hold the same rows, in the same order, as the version before them. Every earlier
    version and tag stays readable: nothing is cleaned up, so the old fragments stay on
    disk beside the merged ones until someone deletes old versions. A dataset with one
    fragment gets no new version. Callers hold the key's writer lock.
    """
    check_inside(store.root, path)
    ds = lance.dataset(str(path))
    before = len(ds.get_fragments())
    if before > 1:
        ds.optimize.compact_files(target_rows_per_fragment=target_rows)
        ds = lance.dataset(str(path))
    return {"path": str(path), "fragments_before": before, "fragments": len(ds.get_fragments()),
            "rows": ds.count_rows(), "version": ds.version}


def compact_keys(store: Store, keys: Sequence[str] = (), every: bool = False) -> list[dict]:
    """Compact the datasets of activation keys (m/c/L6) or dictionary keys (m/c/L6/p1), or with
    ``every`` (and no keys) every dataset of the store (``ep store compact KEYS | --all``).

    Each key is compacted under its writer lock (UsageError while another process writes
    it); a dictionary's exemplars, assignments and foreign assignments are all compacted.
    """
    if bool(keys) == every:
        raise UsageError("pass one or more keys (e.g. gemma-3-270m/base/L6) or --all, not both")
    targets: list[tuple[Path, list[Path], str]] = []
    if every:
        keys = [str(k) for k in store.list_activations()] + [str(k) for k in store.list_dictionaries()]
    for text in keys:
        if text.rsplit("/", 1)[-1].startswith("p"):
            dkey = DictionaryKey.parse(text)
            folder = store.dictionary_dir(dkey)
            paths = sorted(p for p in folder.rglob(f"*{LANCE}") if store.exists(p))
            targets.append((folder, paths, f"dictionary {dkey}"))
        else:
            akey = ActivationKey.parse(text)
            path = store.activation_path(akey)
            targets.append((path, [path] if store.exists(path) else [], f"activations {akey}"))
    missing = [what for _, paths, what in targets if not paths]
    if missing:
        raise UsageError(f"nothing to compact for {', '.join(missing)}; see: ep store ls")
    results = []
    for lock_target, paths, what in targets:
        with store.lock(lock_target, what):
            results += [{"key": what, **compact(store, path)} for path in paths]
    return results
