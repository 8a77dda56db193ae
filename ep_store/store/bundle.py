"""Dictionary bundles: a folder that carries dictionaries between stores, checked (issue 21, item 2).

    <bundle>/
      manifest.json     format, ep_store and Lance versions, and per dictionary its key, folder,
                        logical digest and the SHA-256 and size of every file it ships
      README.md         the model card a person reads on a hub page
      <model>/<checkpoint>/L<layer>/p<percentile>/
          meta.json  exemplars.lance/  [assignments.lance/]

A bundle holds each dictionary folder as the store has it (every Lance version and tag, so
``--as-of`` and region ids survive), less what a user asked to leave out. ``pull_bundle``
checks every file against the manifest (and refuses unknown files) in a staging folder
inside the store before anything is moved in, so a tampered, truncated or partial bundle
leaves the store as it was; after the move each dictionary's logical digest must equal the
manifest's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from ep_store import jsonio
from ep_store.environment import environment
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.store.core import Store
from ep_store.store.digest import digest
from ep_store.store.layout import ASSIGNMENTS, DICTIONARIES_DIR, EXEMPLARS, META

FORMAT = "ep_store.bundle/1"
MANIFEST = "manifest.json"
CARD = "README.md"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under ``folder``, sorted."""
    return {p.relative_to(folder).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_bundle(store: Store, keys: list[DictionaryKey], dest: Path, assignments: bool = False,
                 card=None) -> dict:
    """Copy the dictionaries ``keys`` into the new folder ``dest`` with a manifest and model card
    (``card(entries) -> str``, markdown); returns the manifest. The folder appears whole or not at
    all. Raises UsageError for an unknown or unfinished dictionary or an existing ``dest``."""
    dest = Path(dest)
    if dest.exists():
        raise UsageError(f"{dest} exists; publish into a new folder (or remove it first)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        entries = [_bundle_one(store, key, staging, assignments) for key in keys]
        env = environment()
        manifest = {"format": FORMAT, "ep_store_version": env["ep_store"], "pylance_version": env["pylance"],
                    "dictionaries": entries}
        (staging / CARD).write_text(card(entries) if card else "", encoding="utf-8")
        manifest["card_sha256"] = sha256(staging / CARD)
        (staging / MANIFEST).write_text(jsonio.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _bundle_one(store: Store, key: DictionaryKey, staging: Path, assignments: bool) -> dict:
    files = store.dictionary_files(key)
    if not files.finished:
        known = ", ".join(str(k) for k in store.list_dictionaries()) or "none"
        raise UsageError(f"no dictionary {key} in {store.root} (built: {known})")
    relpath = Path(DICTIONARIES_DIR) / files.folder.relative_to(store.root / DICTIONARIES_DIR)
    target = staging / relpath
    target.mkdir(parents=True)
    shutil.copy2(files.meta, target / META)
    shutil.copytree(files.exemplars, target / EXEMPLARS)
    if assignments and store.exists(files.assignments):
        shutil.copytree(files.assignments, target / ASSIGNMENTS)
    meta = store.read_json(files.meta)
    return {"key": str(key), "folder": relpath.as_posix(), "digest": digest(target)["digest"],
            "source_digest": digest(files.folder)["digest"], "meta": {k: meta.get(k) for k in (
                "model", "checkpoint", "layer", "hook", "percentile", "theta", "regions", "tokens", "stop_reason",
                "calibration", "exemplars_version", "tags", "ep_store_version")},
            "corpus_fingerprint": meta.get("activations", {}).get("corpus_fingerprint"),
            "files": _files(target)}


def read_manifest(src: Path) -> dict:
    """The bundle's manifest; UsageError (one line) if it is missing, unreadable or another format."""
    path = Path(src) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{src} is not an ep_store bundle ({MANIFEST} unreadable: {err.__class__.__name__}); "
                         "point at the folder ep publish wrote") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{src}/{MANIFEST} is not a {FORMAT} manifest")
    return manifest


def verify_folder(folder: Path, expected: dict[str, dict], what: str) -> None:
    """Every file of ``expected`` present with its size and SHA-256, and nothing else;
    UsageError naming the first difference."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    extra, missing = sorted(found - set(expected)), sorted(set(expected) - found)
    if missing or extra:
        name = missing[0] if missing else extra[0]
        raise UsageError(f"{what}: file {name} is {'missing' if missing else 'not in the manifest'}; "
                         "the bundle is partial or altered, publish it again")
    for name, want in expected.items():
        path = folder / name
        if path.stat().st_size != want["bytes"] or sha256(path) != want["sha256"]:
            raise UsageError(f"{what}: {name} does not match its checksum; the bundle is altered or truncated")


def pull_bundle(src: Path, store: Store, keys: list[str] | None = None, overwrite: bool = False) -> list[dict]:
    """Copy the bundle's dictionaries (all, or ``keys``) into ``store``, each checked against the
    manifest before it is moved in; returns one summary per dictionary. Raises UsageError (and
    changes nothing) for a bad bundle, an unknown key, or a dictionary the store already has
    without ``overwrite``."""
    src = Path(src)
    manifest = read_manifest(src)
    entries = {e["key"]: e for e in manifest["dictionaries"]}
    wanted = list(keys) if keys else list(entries)
    unknown = [k for k in wanted if k not in entries]
    if unknown:
        raise UsageError(f"{src} holds no dictionary {unknown[0]} (it holds: {', '.join(entries)})")
    card = src / CARD
    if not card.is_file() or sha256(card) != manifest.get("card_sha256"):
        raise UsageError(f"{src}/{CARD} is missing or altered; the bundle is partial or altered, publish it again")
    for key in wanted:
        target = store.dictionary_files(DictionaryKey.parse(key)).folder
        if target.exists() and not overwrite:
            raise UsageError(f"the store already has {key}; pass --overwrite to replace it")
    staging_root = store.root / ".pull"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=staging_root))
    try:
        for key in wanted:  # copy and check everything before the first move
            entry = entries[key]
            shutil.copytree(src / entry["folder"], staging / entry["folder"])
            verify_folder(staging / entry["folder"], entry["files"], f"{src} {key}")
            if digest(staging / entry["folder"])["digest"] != entry["digest"]:
                raise UsageError(f"{src} {key}: the data do not match the manifest's digest")
        return [_move_in(store, DictionaryKey.parse(key), staging / entries[key]["folder"], entries[key], staging)
                for key in wanted]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(store: Store, key: DictionaryKey, checked: Path, entry: dict, staging: Path) -> dict:
    """Rename the checked folder into place (a replaced one goes to ``staging``, removed with it)."""
    files = store.dictionary_files(key)
    with store.lock(files.folder, f"dictionary {key}"):
        files.folder.parent.mkdir(parents=True, exist_ok=True)
        if files.folder.exists():
            files.folder.rename(staging / f"replaced-{len(list(staging.iterdir()))}")
        checked.rename(files.folder)
    return {"dictionary": str(key), "path": str(files.folder), "digest": entry["digest"],
            "source_digest": entry["source_digest"], "files": len(entry["files"])}

