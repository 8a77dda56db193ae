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

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa

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
STAGING = ".pull"  # inside the store: same filesystem, so checked folders move in by rename


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
        entries = [_bundle_one(store, key, staging, assignments) for key in dict.fromkeys(keys)]
        env = environment()
        manifest = {"format": FORMAT, "ep_store_version": env["ep_store"], "pylance_version": env["pylance"],
                    "dictionaries": entries}
        (staging / CARD).write_text(card(entries) if card else "", encoding="utf-8")
        manifest["card_sha256"] = sha256(staging / CARD)
        (staging / MANIFEST).write_text(jsonio.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        make_public(staging)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def make_public(folder: Path) -> None:
    """Give a folder built in a private temporary directory (mode 0700) the modes a plain
    ``mkdir`` and file write would have had under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _bundle_one(store: Store, key: DictionaryKey, staging: Path, assignments: bool) -> dict:
    files = store.dictionary_files(key)
    if not files.finished:
        known = ", ".join(str(k) for k in store.list_dictionaries()) or "none"
        raise UsageError(f"no dictionary {key} in {store.root} (built: {known})")
    relpath = Path(entry_folder(key))
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


def check_manifest(src: Path, manifest: dict) -> dict[str, dict]:
    """The manifest's entries by key, each naming the folder its key maps to; UsageError for an
    empty or repeated list, a bad key, or a folder elsewhere (a bundle never writes outside
    the dictionary folder of its key)."""
    listed = manifest.get("dictionaries")
    if not isinstance(listed, list) or not listed:
        raise UsageError(f"{src}/{MANIFEST} lists no dictionaries; publish the bundle again")
    entries = {}
    for entry in listed:
        parsed = DictionaryKey.parse(str(entry.get("key")))
        key, folder = str(parsed), entry_folder(parsed)
        if key in entries:
            raise UsageError(f"{src}/{MANIFEST} lists {key} twice; the bundle is altered, publish it again")
        if entry.get("folder") != folder:
            raise UsageError(f"{src}/{MANIFEST}: {key}'s folder {entry.get('folder')!r} is not its key's "
                             f"({folder}); the bundle is altered, publish it again")
        entries[key] = entry
    verify_listing(src, entries)
    return entries


def entry_folder(key: DictionaryKey) -> str:
    """The folder of dictionary ``key`` inside a bundle (the same relative path as in a store)."""
    return (Path(DICTIONARIES_DIR) / key.relpath()).as_posix()


def verify_listing(src: Path, entries: dict[str, dict]) -> None:
    """Every file in the bundle is the manifest, the card or a file an entry lists; UsageError otherwise."""
    listed = {MANIFEST, CARD} | {f"{e['folder']}/{name}" for e in entries.values() for name in e["files"]}
    extra = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()
                   and p.relative_to(src).as_posix() not in listed)
    if extra:
        raise UsageError(f"{src}: file {extra[0]} is not in the manifest; the bundle is partial or altered, "
                         "publish it again")


def pull_bundle(src: Path, store: Store, keys: list[str] | None = None, overwrite: bool = False) -> list[dict]:
    """Copy the bundle's dictionaries (all, or ``keys``) into ``store``, each checked against the
    manifest before it is moved in; returns one summary per dictionary. Holds every target's
    writer lock throughout. Raises UsageError (and changes nothing) for a bad bundle, an
    unknown key, or a dictionary the store already has without ``overwrite``."""
    src = Path(src)
    manifest = read_manifest(src)
    entries = check_manifest(src, manifest)
    wanted = list(dict.fromkeys(str(DictionaryKey.parse(k)) for k in keys)) if keys else list(entries)
    unknown = [k for k in wanted if k not in entries]
    if unknown:
        raise UsageError(f"{src} holds no dictionary {unknown[0]} (it holds: {', '.join(entries)})")
    card = src / CARD
    if not card.is_file() or sha256(card) != manifest.get("card_sha256"):
        raise UsageError(f"{src}/{CARD} is missing or altered; the bundle is partial or altered, publish it again")
    created_root = not store.root.exists()
    staging = None
    try:
        with contextlib.ExitStack() as locks:
            for key in wanted:  # every target locked before anything is checked or moved
                folder = store.dictionary_files(DictionaryKey.parse(key)).folder
                locks.enter_context(store.lock(folder, f"dictionary {key}"))
                if folder.exists() and not overwrite:
                    raise UsageError(f"the store already has {key}; pass --overwrite to replace it")
            staging = Path(tempfile.mkdtemp(dir=_mkdir(store.root / STAGING)))
            for key in wanted:  # copy and check everything before the first move
                _copy_checked(src, key, entries[key], staging)
            return [_move_in(store, DictionaryKey.parse(key), staging / entries[key]["folder"], entries[key], staging)
                    for key in wanted]
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(store.root / STAGING, store.root if created_root else None)


def _copy_checked(src: Path, key: str, entry: dict, staging: Path) -> None:
    """Copy one dictionary folder into ``staging`` and check it: files, data, and its own key."""
    target = staging / entry["folder"]
    shutil.copytree(src / entry["folder"], target)
    verify_folder(target, entry["files"], f"{src} {key}")
    try:
        found = digest(target)["digest"]
        meta = json.loads((target / META).read_text(encoding="utf-8"))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UsageError(f"{src} {key}: its data cannot be read ({err.__class__.__name__}); "
                         "the bundle is altered, publish it again") from None
    if found != entry["digest"]:
        raise UsageError(f"{src} {key}: the data do not match the manifest's digest")
    if meta.get("key") != key:
        raise UsageError(f"{src} {key}: its meta.json is of {meta.get('key')!r}; the bundle is altered, publish it again")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_empty(staging_root: Path, created_root: Path | None) -> None:
    """Remove the staging folder, and a store root this pull created, where they are empty."""
    for folder in (staging_root, created_root):
        if folder is not None:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _move_in(store: Store, key: DictionaryKey, checked: Path, entry: dict, staging: Path) -> dict:
    """Rename the checked folder into place (a replaced one goes to ``staging``, removed with it);
    the caller holds the dictionary's lock."""
    files = store.dictionary_files(key)
    files.folder.parent.mkdir(parents=True, exist_ok=True)
    if files.folder.exists():
        files.folder.rename(staging / f"replaced-{len(list(staging.iterdir()))}")
    checked.rename(files.folder)
    return {"dictionary": str(key), "path": str(files.folder), "digest": entry["digest"],
            "source_digest": entry["source_digest"], "files": len(entry["files"]),
            "assignments": store.exists(files.assignments)}

