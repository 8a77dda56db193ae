"""What the store holds: one row per activation dataset and per dictionary."""

from __future__ import annotations

from pathlib import Path

from ep_store.store import Store


def catalog(store_path: Path) -> list[dict]:
    store = Store(store_path)
    rows = []
    for key in store.list_activations():
        info = store.info(store.activation_path(key))
        rows.append({"kind": "activations", "key": str(key), "rows": info.rows, "width": info.width,
                     "version": info.version, "versions": info.versions, "tags": info.tags})
    for key in store.list_dictionaries():
        path = store.dictionary_dir(key) / "exemplars.lance"
        if store.exists(path):
            info = store.info(path)
            rows.append({"kind": "dictionary", "key": str(key), "rows": info.rows, "width": info.width,
                         "version": info.version, "versions": info.versions, "tags": info.tags})
    return rows
