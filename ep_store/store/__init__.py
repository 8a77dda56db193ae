"""The store: the only code that imports lance and knows file names and which versions form a snapshot.

Its face, what the layers above use:

- ``Store`` (core): paths of every key, dataset access, writes, tags, locks, compaction;
  ``DatasetInfo``; ``Store.dictionary_snapshot`` -> ``DictionarySnapshot`` (snapshot);
  the files of each artifact: ``DictionaryFiles``, ``MatchFiles``, ``SAECompareFiles`` (layout);
- Arrow conversion (arrow): ``vectors_to_arrow``, ``arrow_to_vectors``, ``arrow_to_tensor``,
  ``finite_rows``, ``rebatch``; ``META_KEY``, the schema-metadata entry of a dataset's JSON;
- fragments (fragments): ``write_fragments``, ``commit_fragments``, ``fragment_ids``, ``scan_fragment``;
- digests (digest): ``logical_digest``, ``digest``, ``digests``;
- vector indexes and saved searches: ``ep_store.store.index``; corpus identity: ``ep_store.store.streams``.
"""

from ep_store.store.arrow import (
    arrow_to_tensor,
    arrow_to_vectors,
    finite_rows,
    rebatch,
    vectors_to_arrow,
)
from ep_store.store.core import DatasetInfo, Store
from ep_store.store.digest import digest, digests, logical_digest
from ep_store.store.fragments import commit_fragments, fragment_ids, scan_fragment, write_fragments
from ep_store.store.layout import META_KEY, DictionaryFiles, Files, MatchFiles, SAECompareFiles
from ep_store.store.snapshot import DictionarySnapshot

__all__ = [
    "META_KEY",
    "DatasetInfo",
    "DictionaryFiles",
    "DictionarySnapshot",
    "Files",
    "MatchFiles",
    "SAECompareFiles",
    "Store",
    "arrow_to_tensor",
    "arrow_to_vectors",
    "commit_fragments",
    "digest",
    "digests",
    "finite_rows",
    "fragment_ids",
    "logical_digest",
    "rebatch",
    "scan_fragment",
    "vectors_to_arrow",
    "write_fragments",
]
