"""A dictionary snapshot: the tables and meta of one published build, read together (issue 18, A1).

Every reader of a dictionary (SQL views, ``ep stats``, ``ep report``, ``ep search``,
``Dictionary.load``, match inputs) asks ``Store.dictionary_snapshot(key, as_of)`` for one
object naming what belongs together, instead of choosing Lance versions on its own:

- the exemplars version a build published (meta.json's ``exemplars_version``, or the
  history entry of a tag or version given with ``--as-of``);
- the meta as it was at that build (tokens, regions, stop reason, saturation curve, the
  activations version it read). Calibration (center, theta, scale) is frozen for the life
  of a dictionary: a build with other parameters needs ``--overwrite``, which starts a new
  history, so the top-level values are those of every entry;
- the assignments version written from exactly that exemplars version (``ep assign``
  records it in the assignments' schema metadata), or None with the reason why.

Assignments are never mixed across builds: when none were written from the snapshot's
exemplars version, ``assignments_version`` is None and ``require_assignments`` refuses in
one line. Nothing here opens Lance directly; it reads through the ``Store``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ep_store.errors import UsageError
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.store.layout import DictionaryFiles

if TYPE_CHECKING:
    from ep_store.store.core import Store

SNAPSHOT_FIELDS = ("tokens", "regions", "stop_reason")  # history entry fields that override the top level


@dataclass(frozen=True)
class DictionarySnapshot:
    """One published build of dictionary ``key`` and the tables that belong to it."""

    key: DictionaryKey
    folder: Path
    """The dictionary's folder in the store."""
    meta: dict
    """meta.json as it was when this build was published (tokens, regions, stop_reason,
    saturation_curve, exemplars_version, activations, tags of that build; center and theta)."""
    exemplars_version: int
    """Lance version of exemplars.lance this build wrote."""
    assignments_version: int | None
    """Lance version of assignments.lance written from ``exemplars_version``; None if none was."""
    assignments_missing: str
    """Why ``assignments_version`` is None (empty when it is set)."""
    activations: ActivationKey
    """The activation dataset the dictionary was built from."""
    activations_version: int | None
    """The version of it this build read (None for builds that did not record it)."""
    label: str
    """How the snapshot was asked for: 'latest', a tag or a version number."""

    @property
    def files(self) -> DictionaryFiles:
        return DictionaryFiles(self.folder)

    @property
    def exemplars_path(self) -> Path:
        return self.files.exemplars

    @property
    def assignments_path(self) -> Path:
        return self.files.assignments

    def require_assignments(self) -> int:
        """The assignments version of this snapshot; UsageError (exit 2) naming the fix when none exists."""
        if self.assignments_version is None:
            raise UsageError(self.assignments_missing)
        return self.assignments_version


def dictionary_snapshot(store: Store, key: DictionaryKey, as_of: int | str | None = None,
                        missing_ok: bool = False) -> DictionarySnapshot | None:
    """The snapshot of ``key`` at ``as_of`` (a tag such as tokens-1000, a Lance version number,
    or None for the build meta.json publishes).

    Raises UsageError for an unknown dictionary, or for a tag or version no build of ``key``
    published (returns None then instead when ``missing_ok``).
    """
    files = store.dictionary_files(key)
    if not files.finished:
        known = ", ".join(str(k) for k in store.list_dictionaries()) or "none"
        raise UsageError(f"unknown dictionary {key} (known: {known})")
    meta = store.read_json(files.meta)
    entry = history_entry(meta, as_of)
    if entry is None:
        if missing_ok:
            return None
        published = ", ".join(f"{h['tag']} (version {h['version']})" for h in history(meta))
        raise UsageError(f"{key} has no published version or tag {as_of!r} (published: {published}); "
                         "see: ep store ls")
    at = meta_at(meta, entry)
    version = at["exemplars_version"]
    assignments, missing = assignments_version(store, key, files.assignments, version,
                                               "latest" if as_of is None else str(as_of))
    source = at.get("activations") or {}
    return DictionarySnapshot(key=key, folder=files.folder, meta=at, exemplars_version=version,
                              assignments_version=assignments, assignments_missing=missing,
                              activations=key.activations, activations_version=source.get("version"),
                              label="latest" if as_of is None else str(as_of))


def history(meta: dict) -> list[dict]:
    """One entry per published build, oldest first (a synthesised one for metas without history)."""
    return meta.get("history") or [{"version": meta["exemplars_version"], "tag": f"tokens-{meta['tokens']}",
                                     "tokens": meta["tokens"], "regions": meta["regions"],
                                     "stop_reason": meta["stop_reason"], "batches": len(meta["saturation_curve"])}]


def history_entry(meta: dict, as_of: int | str | None) -> dict | None:
    """The history entry of the build meta.json publishes (None), of a Lance version number, or of
    a tag (the last build that took it, where Lance's tag points); None if no build published it."""
    entries = history(meta)
    if as_of is None:
        wanted = meta["exemplars_version"]
        return next((h for h in reversed(entries) if h["version"] == wanted), entries[-1])
    if isinstance(as_of, int) or str(as_of).isdigit():
        return next((h for h in reversed(entries) if h["version"] == int(as_of)), None)
    entry = next((h for h in reversed(entries) if h.get("tag") == as_of), None)
    if entry is None and as_of in meta.get("tags", {}):
        entry = next((h for h in reversed(entries) if h["version"] == meta["tags"][as_of]), None)
    return entry


def meta_at(meta: dict, entry: dict) -> dict:
    """meta.json as it was when ``entry``'s build was published."""
    at = {**meta, **{k: entry[k] for k in SNAPSHOT_FIELDS if k in entry}}
    at["exemplars_version"] = entry["version"]
    at["saturation_curve"] = curve_at(meta, entry)
    if entry["version"] != meta["exemplars_version"]:  # an earlier build
        at.pop("builder", None)  # the writer's resume state belongs to the latest build only
        at["activations"] = entry.get("activations", {**meta.get("activations", {}), "version": None})
    at["tags"] = {name: v for name, v in meta.get("tags", {}).items() if v <= entry["version"]}
    return at


def curve_at(meta: dict, entry: dict) -> list[int]:
    """New regions per build batch at ``entry``'s build: its closed batches (a prefix of the
    latest curve: batches never change once closed) and, when the build stopped inside a
    batch, that partial batch's count as it was then (issue 18, A2)."""
    curve = meta["saturation_curve"]
    if "open_batch" not in entry:  # recorded before issue 18
        return curve[: entry.get("batches", len(curve))]
    size = meta["build"]["batch_size"]
    closed = curve[: entry["tokens"] // size]
    return closed + ([entry["open_batch"]] if entry["tokens"] % size else [])


def assignments_version(store: Store, key: DictionaryKey, path: Path, exemplars_version: int,
                        label: str) -> tuple[int | None, str]:
    """(version of ``path`` written from ``exemplars_version``, '') or (None, why not in one line).

    The newest such version wins (a reassignment after the activations grew, or a compaction).
    """
    if not store.exists(path):
        return None, f"{key} has no assignments; run: ep assign --dictionary {key}"
    found = []
    for version in sorted(store.versions(path), reverse=True):
        written_from = store.dataset_meta(path, version).get("exemplars_version")
        if written_from == exemplars_version:
            return version, ""
        found.append(written_from)
    if label == "latest":
        return None, (f"the assignments of {key} were written from exemplars version {found[0]}, not the "
                      f"published {exemplars_version}; run: ep assign --dictionary {key}")
    return None, (f"{key} at {label} (exemplars version {exemplars_version}) has no assignments: they were "
                  f"written from exemplars versions {sorted({v for v in found if v is not None})} only; "
                  f"query it without --as-of, or ask only about its exemplars")


# -- what a stored match was computed from (issue 18, A1) -------------------------------------------
def match_record(snap_a: DictionarySnapshot, snap_b: DictionarySnapshot, membership: bool) -> dict:
    """``{"a": {...}, "b": {...}}`` for a match's meta.json: each side's key, exemplars version and
    (for a membership match, which joins the assignments) assignments version; None otherwise."""
    return {side: {"key": str(s.key), "exemplars_version": s.exemplars_version,
                   "assignments_version": s.assignments_version if membership else None}
            for side, s in (("a", snap_a), ("b", snap_b))}


def stale_match(meta: dict, snapshots: dict[DictionaryKey, DictionarySnapshot]) -> str:
    """Why the stored match ``meta`` (its meta.json) does not belong with the snapshots being read,
    in one line; '' when it was computed from exactly those exemplars (and assignments) versions.

    ``snapshots`` maps each key to the snapshot a reader reads (both sides must be present).
    """
    a, b = meta["a"], meta["b"]
    rerun = f"rerun: ep match {a} {b}"
    recorded = meta.get("snapshots")
    if recorded is None:
        return f"match {a} {b} does not record which versions of {a} and {b} it was computed from; {rerun}"
    for side in (recorded["a"], recorded["b"]):
        snap = snapshots[DictionaryKey.parse(side["key"])]
        was = f"exemplars version {side['exemplars_version']}"
        now = f"exemplars version {snap.exemplars_version}"
        differs = side["exemplars_version"] != snap.exemplars_version
        if side["assignments_version"] is not None:
            was += f" (assignments version {side['assignments_version']})"
            now += f" (assignments version {snap.assignments_version})"
            differs = differs or side["assignments_version"] != snap.assignments_version
        if differs:
            if snap.label == "latest":
                return f"match {a} {b} was computed from {side['key']} at {was}, but its published build is {now}; {rerun}"
            return (f"match {a} {b} was computed from {side['key']} at {was}, but {side['key']} at {snap.label} "
                    f"is {now}; query the match without --as-of")
    return ""
