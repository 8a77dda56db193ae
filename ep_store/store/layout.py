"""Where everything lives in a store: the folder of every key and the file name of every artifact.

This is the one place that knows the store's file names (issue 19, item 3). Other modules ask
``Store`` for a key's files (``Store.dictionary_files``, ``match_files``, ``sae_files``,
``sae_compare_files``, ``search_path``) and never spell a ``.lance`` or ``meta.json`` name::

    <store>/
      activations/<model>/<checkpoint>/L<layer>.lance
      dictionaries/<model>/<checkpoint>/L<layer>/p<percentile>/
          meta.json  exemplars.lance  assignments.lance  foreign/<model>/<checkpoint>/L<layer>.lance
      matches/<a slug>__<b slug>/       meta.json  pairs.lance  overlaps.lance
      saes/<model>/<checkpoint>/L<layer>/<name>/          meta.json + the SAE library's own files
      sae_compare/<model>/<checkpoint>/L<layer>/p<percentile>/<sae name>/
          meta.json  sae_activations.lance  ep_projections.lance  ep_exemplars.lance
      indexes/<model>/<checkpoint>/L<layer>/p<percentile>.lance
      searches/<name>.lance
      .locks/                            writer locks while a command writes (ep_store.store.locks)

A folder's ``meta.json`` is written last: a folder without one is unfinished and readers skip it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ep_store.errors import UsageError
from ep_store.keys import ActivationKey, DictionaryKey, from_segment, parse_layer_segment

META_KEY = b"ep_store"  # schema-metadata entry holding the JSON that produced a dataset
STORAGE_VERSION = "2.2"
"""Lance's file format version for every dataset ep_store creates, pinned (issue 21, item 3) so a
pylance release that changes its default does not change what a store writes."""

# top-level folders
ACTIVATIONS_DIR = "activations"
DICTIONARIES_DIR = "dictionaries"
MATCHES_DIR = "matches"
SAES_DIR = "saes"
SAE_COMPARE_DIR = "sae_compare"
INDEXES_DIR = "indexes"
SEARCHES_DIR = "searches"
LOCKS_DIR = ".locks"

# files inside a key's folder
META = "meta.json"
EXEMPLARS = "exemplars.lance"
ASSIGNMENTS = "assignments.lance"
FOREIGN = "foreign"
PAIRS = "pairs.lance"
OVERLAPS = "overlaps.lance"
SAE_ACTIVATIONS = "sae_activations.lance"
EP_PROJECTIONS = "ep_projections.lance"
EP_EXEMPLARS = "ep_exemplars.lance"
LANCE = ".lance"
BUILDING = "-building"  # indexes/.../p1-building.lance: an index being built, renamed to p1.lance when whole


def lance_file(relpath: Path) -> Path:
    """``relpath`` (a key's path, e.g. <model>/<checkpoint>/L6) as the Lance dataset folder it names."""
    return relpath.with_name(relpath.name + LANCE)


def _file(name: str, doc: str) -> property:
    """A read-only attribute: the path of file ``name`` in the artifact's folder."""
    return property(lambda self: self.folder / name, doc=doc)


@dataclass(frozen=True)
class Files:
    """The folder of one artifact; ``meta`` is its meta.json, written last."""

    folder: Path
    meta = _file(META, "The artifact's meta.json (written last: without it the folder is unfinished).")

    @property
    def finished(self) -> bool:
        """Whether the folder's meta.json exists (a folder without one is unfinished)."""
        return self.meta.is_file()


@dataclass(frozen=True)
class DictionaryFiles(Files):
    """A dictionary's folder: meta.json, exemplars, assignments and foreign assignments."""

    exemplars = _file(EXEMPLARS, "The exemplars dataset (one row per region).")
    assignments = _file(ASSIGNMENTS, "The assignments of the dictionary's own activation dataset.")

    def foreign(self, activations: ActivationKey) -> Path:
        """The dictionary's assignments over another activation dataset."""
        return self.folder / FOREIGN / lance_file(activations.relpath())

    def foreign_paths(self) -> list[tuple[ActivationKey, Path]]:
        """(activations, path) of every foreign assignments dataset folder, sorted by path."""
        found = []
        for path in sorted((self.folder / FOREIGN).glob(f"*/*/L*{LANCE}")):
            key = ActivationKey(from_segment(path.parent.parent.name), from_segment(path.parent.name),
                                *parse_layer_segment(path.stem))
            found.append((key, path))
        return found


@dataclass(frozen=True)
class MatchFiles(Files):
    """A match's folder: meta.json, the region pairs and (membership matches) the overlaps."""

    pairs = _file(PAIRS, "One row per region of either side: its partner, cosine and status.")
    overlaps = _file(OVERLAPS, "Membership overlaps of region pairs (membership matches only).")


@dataclass(frozen=True)
class SAECompareFiles(Files):
    """The tables of one ``ep sae compare`` run."""

    sae_activations = _file(SAE_ACTIVATIONS, "The SAE's feature activations on the held-out rows.")
    ep_projections = _file(EP_PROJECTIONS, "The EP regions' projections on the held-out rows.")
    ep_exemplars = _file(EP_EXEMPLARS, "The exemplars EP built on the training prefix.")


def match_name(a: DictionaryKey, b: DictionaryKey | None) -> str:
    """The folder name of the match of ``a`` against ``b`` (``b`` None: a glob of every match of ``a``)."""
    return f"{a.slug()}__{'*' if b is None else b.slug()}"


def check_replaceable(path, option: str) -> None:
    """Refuse an output folder that a command will replace whole: the working folder or one
    above it (an empty name included), or an existing folder that holds a Lance dataset (a
    store, or part of one). Raises UsageError naming ``option``. Found by a helper's attack on
    ``ep export saelens --overwrite`` (issue 21); every whole-folder replacement checks it."""
    path = Path(path)
    here, target = Path.cwd().resolve(), path.resolve()
    if not path.name or target == here or target in here.parents:
        raise UsageError(f"{option} {path} is the working folder or holds it; choose a new folder, e.g. {option} out/NAME")
    if path.is_dir() and (path.suffix == LANCE or next(path.rglob(f"*{LANCE}"), None) is not None):
        raise UsageError(f"{option} {path} holds Lance datasets (a store?) and would be replaced; choose a new folder")
