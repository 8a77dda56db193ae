"""The Store: versioned Lance datasets on disk, laid out by key (see ep_store.store.layout).

Every write is one Lance commit, so a reader never sees half a write and an interrupted
command leaves the last committed version intact. Callers validate their input first and
only then call the writers here.

The store's other concerns live beside this module: Arrow conversion and exact batch sizes
(``arrow``), the file names of every artifact (``layout``), writer locks (``locks``: one writer
per key, issue 8 A; ``Store.lock``), fragments and compaction (``fragments``), logical digests
(``digest``), dictionary snapshots (``snapshot``; ``Store.dictionary_snapshot``) and vector
indexes (``index``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lance
import pyarrow as pa

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import (
    ActivationKey,
    DictionaryKey,
    SAEKey,
    check_inside,
    from_segment,
    parse_layer_segment,
    to_segment,
)
from ep_store.store import layout
from ep_store.store.arrow import check_vector_column, filter_rows, rebatch
from ep_store.store.layout import (
    META_KEY,
    STORAGE_VERSION,
    DictionaryFiles,
    Files,
    MatchFiles,
    SAECompareFiles,
)
from ep_store.store.locks import lock_path, writer_lock


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
    """A folder of Lance datasets laid out by key (see ep_store.store.layout and ep_store.keys)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"store path {self.root} is a file; pass a folder (e.g. data/store)")

    # -- paths -------------------------------------------------------------------------------
    def activation_path(self, key: ActivationKey) -> Path:
        return check_inside(self.root, self.root / layout.ACTIVATIONS_DIR / layout.lance_file(key.relpath()))

    def dictionary_dir(self, key: DictionaryKey) -> Path:
        return check_inside(self.root, self.root / layout.DICTIONARIES_DIR / key.relpath())

    def matches_dir(self, name: str) -> Path:
        return check_inside(self.root, self.root / layout.MATCHES_DIR / name)

    def sae_dir(self, key: SAEKey) -> Path:
        """Folder of an SAE in its library's own format, with ep_store's meta.json beside it."""
        return check_inside(self.root, self.root / layout.SAES_DIR / key.relpath())

    def sae_compare_dir(self, dictionary: DictionaryKey, sae_name: str) -> Path:
        """Tables of one ``ep sae compare`` run (held-out SAE activations, EP projections)."""
        return check_inside(self.root, self.root / layout.SAE_COMPARE_DIR / dictionary.relpath() / to_segment(sae_name))

    def dictionary_files(self, key: DictionaryKey) -> DictionaryFiles:
        """The files of dictionary ``key``: meta, exemplars, assignments, foreign assignments."""
        return DictionaryFiles(self.dictionary_dir(key))

    def match_files(self, a: DictionaryKey, b: DictionaryKey) -> MatchFiles:
        """The files of the match of ``a`` against ``b``: meta, pairs, overlaps."""
        return MatchFiles(self.matches_dir(layout.match_name(a, b)))

    def list_matches(self, a: DictionaryKey | None = None) -> list[MatchFiles]:
        """Every finished match (its meta.json written), sorted by folder; only those of ``a`` if given."""
        name = layout.match_name(a, None) if a is not None else "*"
        metas = sorted((self.root / layout.MATCHES_DIR).glob(f"{name}/{layout.META}"))
        return [MatchFiles(meta.parent) for meta in metas]

    def sae_files(self, key: SAEKey) -> Files:
        """The folder of SAE ``key`` and ep_store's meta.json beside the library's own files."""
        return Files(self.sae_dir(key))

    def sae_compare_files(self, dictionary: DictionaryKey, sae_name: str) -> SAECompareFiles:
        """The tables and meta of one ``ep sae compare`` run."""
        return SAECompareFiles(self.sae_compare_dir(dictionary, sae_name))

    def list_saes(self) -> list[SAEKey]:
        keys = []
        for meta in sorted((self.root / layout.SAES_DIR).glob(f"*/*/L*/*/{layout.META}")):
            folder = meta.parent
            layer, hook = parse_layer_segment(folder.parent.name)
            keys.append(SAEKey(from_segment(folder.parent.parent.parent.name), from_segment(folder.parent.parent.name),
                               layer, from_segment(folder.name), hook))
        return sorted(keys)

    def list_sae_comparisons(self) -> list[tuple[DictionaryKey, str, SAECompareFiles]]:
        """(dictionary, SAE name, its files) of every finished ``ep sae compare``."""
        found = []
        for meta in sorted((self.root / layout.SAE_COMPARE_DIR).glob(f"*/*/L*/p*/*/{layout.META}")):
            folder = meta.parent
            pdir = folder.parent
            key = _dictionary_key(pdir)
            found.append((key, from_segment(folder.name), SAECompareFiles(folder)))
        return found

    # -- generic dataset access ----------------------------------------------------------------
    @staticmethod
    def exists(path: Path) -> bool:
        return (path / "_versions").is_dir()

    @staticmethod
    def info(path: Path) -> DatasetInfo:
        ds = lance.dataset(str(path))
        check_vector_column(ds.schema, path)
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
            raw = filter_rows(raw, keep, row_index, offset or 0)
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

    # -- locks (ep_store.store.locks) ------------------------------------------------------------
    def lock_path(self, target: Path) -> Path:
        """The lock file of a dataset or folder of the store: ``.locks/<its relative path>.lock``."""
        return lock_path(self.root, target)

    def lock(self, target: Path, what: str):
        """Hold the writer lock of ``target`` for a ``with`` block; refuse (UsageError, exit 2, naming
        the holder) if another process holds it. A process may re-enter a lock it holds."""
        return writer_lock(self.root, target, what)

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
        check_vector_column(table.schema, path)
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
            ds = lance.write_dataset(table, str(path), mode="create", data_storage_version=STORAGE_VERSION)
        return ds.version

    def remove(self, path: Path) -> None:
        """Delete a dataset folder or a file inside the store (nothing if absent)."""
        check_inside(self.root, path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def list_activations(self) -> list[ActivationKey]:
        base = self.root / layout.ACTIVATIONS_DIR
        keys = []
        for path in sorted(base.glob(f"*/*/L*{layout.LANCE}")):
            model, checkpoint = path.parent.parent.name, path.parent.name
            keys.append(ActivationKey(from_segment(model), from_segment(checkpoint), *parse_layer_segment(path.stem)))
        return sorted(keys)

    def require_activations(self, key: ActivationKey) -> Path:
        """The path of activation dataset ``key``; UsageError (exit 2) naming the datasets the
        store holds when it has no such dataset (every command that reads activations says so
        the same way; issue 19)."""
        path = self.activation_path(key)
        if not self.exists(path):
            known = ", ".join(str(k) for k in self.list_activations()) or "none"
            raise UsageError(f"no activations {key} in {self.root} (known: {known}); run ep harvest first")
        return path

    # -- dictionaries --------------------------------------------------------------------------
    def dictionary_snapshot(self, key: DictionaryKey, as_of: int | str | None = None, missing_ok: bool = False):
        """The ``DictionarySnapshot`` of ``key`` at a tag or version (None: the published build):
        the exemplars, assignments and meta published together (issue 18, A1). Every reader
        of a dictionary goes through this. Raises UsageError for an unknown dictionary or an
        unpublished tag/version (returns None for the latter when ``missing_ok``)."""
        from ep_store.store.snapshot import dictionary_snapshot

        return dictionary_snapshot(self, key, as_of, missing_ok)

    def list_dictionaries(self) -> list[DictionaryKey]:
        base = self.root / layout.DICTIONARIES_DIR
        keys = []
        for meta in sorted(base.glob(f"*/*/L*/p*/{layout.META}")):
            pdir = meta.parent
            keys.append(_dictionary_key(pdir))
        return sorted(keys)

    def write_table(self, path: Path, table: pa.Table, merge_on: str | None = None) -> int:
        """Write a whole table as one commit: create, overwrite, or merge rows on a key column."""
        check_inside(self.root, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if merge_on is not None and self.exists(path):
            ds = lance.dataset(str(path))
            ds.merge_insert(merge_on).when_matched_update_all().when_not_matched_insert_all().execute(table)
            return lance.dataset(str(path)).version
        ds = lance.write_dataset(table, str(path), mode="overwrite" if self.exists(path) else "create",
                                 data_storage_version=STORAGE_VERSION)
        return ds.version

    def write_stream(self, path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
        """Write a stream of batches as one commit, in bounded memory."""
        check_inside(self.root, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = pa.RecordBatchReader.from_batches(schema, batches)
        mode = "overwrite" if self.exists(path) else "create"
        ds = lance.write_dataset(reader, str(path), schema=schema, mode=mode, data_storage_version=STORAGE_VERSION)
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


def _dictionary_key(pdir: Path) -> DictionaryKey:
    """The key of a dictionary folder ``<model>/<checkpoint>/L<layer>[.<hook>]/p<percentile>``."""
    layer, hook = parse_layer_segment(pdir.parent.name)
    return DictionaryKey(from_segment(pdir.parent.parent.parent.name), from_segment(pdir.parent.parent.name),
                         layer, float(pdir.name[1:]), hook)
