"""What the store holds: one row per activation dataset (its latest version) and per dictionary
(the build its meta.json publishes: version, rows and tags of that snapshot; issue 18, A1)."""

from __future__ import annotations

from pathlib import Path

from ep_store import jsonio
from ep_store.store.core import Store


def catalog(store_path: Path) -> list[dict]:
    store = Store(store_path)
    rows = []
    for key in store.list_activations():
        info = store.info(store.activation_path(key))
        rows.append({"kind": "activations", "key": str(key), "rows": info.rows, "width": info.width,
                     "version": info.version, "versions": info.versions, "tags": info.tags})
    for key in store.list_dictionaries():
        # The build meta.json publishes, not the latest Lance version: a killed build's or a
        # compaction's version is not what readers read (issue 18, A1).
        snap = store.dictionary_snapshot(key)
        if store.exists(snap.exemplars_path):
            info = store.info(snap.exemplars_path)
            rows.append({"kind": "dictionary", "key": str(key),
                         "rows": store.dataset(snap.exemplars_path, snap.exemplars_version).count_rows(),
                         "width": info.width, "version": snap.exemplars_version, "versions": info.versions,
                         "tags": snap.meta["tags"]})
    return rows


def listing(store_path: Path) -> tuple[list[str], dict]:
    """``ep store ls``: one tab-separated line per dataset (kind, key, rows, width, version,
    tags as JSON so the listing parses; a Python repr does not) and the summary."""
    rows = catalog(store_path)
    lines = ["\t".join(jsonio.dumps(row[k]) if k == "tags" else str(row[k])
                       for k in ("kind", "key", "rows", "width", "version", "tags")) for row in rows]
    return lines, {"datasets": len(rows)}
