"""``ep publish`` and ``ep pull``: dictionaries as checked bundles in a folder or a hub dataset repo
(issue 21, item 2; the bundle itself: ep_store.store.bundle).

    ep publish gemma-3-270m/base/L6/p1 --to bundles/gemma-L6 --store data/store
    ep pull bundles/gemma-L6 --store my_store
    ep stats --dictionary gemma-3-270m/base/L6/p1 --store my_store

``DEST``/``SRC`` is a folder, ``hf://datasets/ORG/REPO[/PATH]`` or an object-store URI
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``: ep_store.store.remote): a bundle is
written to a temporary folder and uploaded (``huggingface_hub``, or Arrow's filesystems) on
publish, or downloaded and then checked like a folder on pull. A pulled dictionary answers every query a built one does, keeps
its region ids, Lance versions and tags, and its digest equals the manifest's.
"""

from __future__ import annotations

import tempfile
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from ep_store.errors import EnvError, UsageError, require
from ep_store.keys import DEFAULT_HOOK, DictionaryKey, hook_name
from ep_store.store import Store, remote
from ep_store.store.bundle import pull_bundle, write_bundle

HF_PREFIX = "hf://datasets/"


@dataclass
class PublishConfig:
    dictionaries: list[str]
    """Keys <model>/<checkpoint>/L<layer>/p<p> to publish."""
    to: str
    """A new folder, or hf://datasets/ORG/REPO[/PATH]."""
    _: KW_ONLY
    assignments: bool = False
    """Also ship each dictionary's assignments of its own tokens."""

    def __post_init__(self):
        if not self.dictionaries:
            raise UsageError("name at least one dictionary to publish")
        for key in self.dictionaries:  # a bad key is refused here, before anything is read
            DictionaryKey.parse(key)

    @property
    def keys(self) -> list[DictionaryKey]:
        return [DictionaryKey.parse(k) for k in self.dictionaries]


@dataclass
class PullConfig:
    source: str
    """A bundle folder, or hf://datasets/ORG/REPO[/PATH]."""
    dictionaries: list[str] = field(default_factory=list)
    """Keys to take (default: every dictionary in the bundle)."""
    overwrite: bool = False
    """Replace dictionaries the store already has."""


def hub_location(uri: str) -> tuple[str, str] | None:
    """(repo id, path in repo) of an ``hf://datasets/ORG/REPO[/PATH]`` URI; None for a folder."""
    if not uri.startswith(HF_PREFIX):
        if uri.startswith("hf:") or ("://" in uri and not remote.is_object_uri(uri)):
            raise UsageError(f"{uri}: use a folder, hf://datasets/ORG/REPO[/PATH] (bundles live in dataset repos) "
                             f"or an object-store URI ({', '.join(remote.SCHEMES)})")
        return None
    parts = uri.removeprefix(HF_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise UsageError(f"{uri}: expected hf://datasets/ORG/REPO[/PATH]")
    return "/".join(parts[:2]), "/".join(parts[2:])


def model_card(entries: list[dict]) -> str:
    """The bundle's README.md: what a person reads on the hub page."""
    lines = ["---", "tags: [ep_store, exemplar-partitioning, interpretability]", "---", "",
             "# Exemplar Partitioning dictionaries", "",
             "Built with [ep_store](https://arxiv.org/abs/2605.14347) (Exemplar Partitioning, Rumbelow 2026). "
             "Pull with `ep pull <this location> --store <store>`; every file is checked against `manifest.json`.", ""]
    for e in entries:
        m = e["meta"]
        cal = m.get("calibration") or {}
        lines += [f"## {e['key']}", "",
                  "| | |", "|---|---|",
                  f"| model / checkpoint | {m['model']} / {m['checkpoint']} |",
                  f"| hook | {hook_name(m['layer'], m.get('hook') or DEFAULT_HOOK)} |",
                  f"| percentile p / theta | {m['percentile']} / {m['theta']:.6f} |",
                  f"| regions / tokens | {m['regions']:,} / {m['tokens']:,} ({m['stop_reason']}) |",
                  f"| calibration | {cal.get('tokens')} tokens in batches of {cal.get('batch')} |",
                  f"| corpus fingerprint | {e.get('corpus_fingerprint') or 'not recorded'} |",
                  f"| exemplars version / tags | {m['exemplars_version']} / {', '.join(m.get('tags') or {})} |",
                  f"| built by ep_store | {m.get('ep_store_version')} |",
                  f"| digest | `{e['digest']}` |", ""]
    return "\n".join(lines)


def publish(cfg: PublishConfig, store: Store) -> dict:
    """Write the bundle (and upload it for an hf:// destination); returns the summary."""
    hub = hub_location(cfg.to)
    if remote.is_object_uri(cfg.to):
        with tempfile.TemporaryDirectory() as tmp:
            manifest = write_bundle(store, cfg.keys, Path(tmp) / "bundle", cfg.assignments, model_card)
            remote.upload(Path(tmp) / "bundle", cfg.to)
        return _summary(manifest, cfg.to)
    if hub is None:
        manifest = write_bundle(store, cfg.keys, Path(cfg.to), cfg.assignments, model_card)
        return _summary(manifest, cfg.to)
    hf = require("huggingface_hub", "models", "ep publish hf://")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_bundle(store, cfg.keys, Path(tmp) / "bundle", cfg.assignments, model_card)
        try:
            hf.HfApi().upload_folder(folder_path=str(Path(tmp) / "bundle"), repo_id=hub[0], repo_type="dataset",
                                     path_in_repo=hub[1] or None)
        except Exception as err:  # network, auth, missing repo: one line, the store is untouched
            raise EnvError(f"upload to {cfg.to} failed: {err.__class__.__name__}: {str(err).splitlines()[0]}") from None
    return _summary(manifest, cfg.to)


def pull(cfg: PullConfig, store: Store) -> dict:
    """Check and copy a bundle's dictionaries into ``store``; returns the summary."""
    hub = hub_location(cfg.source)
    if remote.is_object_uri(cfg.source):
        with tempfile.TemporaryDirectory() as tmp:
            local = remote.download(cfg.source, Path(tmp) / "bundle")
            return _pulled(cfg.source, pull_bundle(local, store, cfg.dictionaries, cfg.overwrite))
    if hub is None:
        if not Path(cfg.source).is_dir():
            raise UsageError(f"{cfg.source} is not a folder; give the folder ep publish wrote or an hf:// URI")
        return _pulled(cfg.source, pull_bundle(Path(cfg.source), store, cfg.dictionaries, cfg.overwrite))
    hf = require("huggingface_hub", "models", "ep pull hf://")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = hf.snapshot_download(repo_id=hub[0], repo_type="dataset", local_dir=tmp,
                                         allow_patterns=[f"{hub[1]}/**"] if hub[1] else None)
        except Exception as err:
            raise EnvError(f"download of {cfg.source} failed: {err.__class__.__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'no detail'}") from None
        pulled = pull_bundle(Path(local) / hub[1], store, cfg.dictionaries, cfg.overwrite)
    return _pulled(cfg.source, pulled)


def _pulled(source: str, pulled: list[dict]) -> dict:
    """The pull's summary; names the next step where assignments did not come with a dictionary."""
    bare = [p["dictionary"] for p in pulled if not p["assignments"]]
    hint = {"next": f"no assignments came with {', '.join(bare)}: ep assign --dictionary KEY (on a harvest of the "
                    "same model and hook) before questions about tokens"} if bare else {}
    return {"source": source, "pulled": pulled, **hint}


def _summary(manifest: dict, dest: str) -> dict:
    return {"to": dest, "dictionaries": [{"dictionary": e["key"], "digest": e["digest"], "files": len(e["files"]),
                                          "bytes": sum(f["bytes"] for f in e["files"].values())}
                                         for e in manifest["dictionaries"]]}
