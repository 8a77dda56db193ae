"""Keys of the store and the paths they map to.

An activation dataset is keyed by (model, checkpoint, layer); a dictionary adds the
percentile. Model names such as ``EleutherAI/pythia-70m`` become one path segment by
percent-encoding, which is reversible, and no key may resolve outside the store.

Store layout (DESIGN.md):
    activations/<model>/<checkpoint>/L<layer>.lance
    dictionaries/<model>/<checkpoint>/L<layer>/p<percentile>/{exemplars.lance, assignments.lance, meta.json}
    matches/<A>__<B>/
    saes/<model>/<checkpoint>/L<layer>/<name>/                 (an SAE in SAELens's own format + meta.json)
    sae_compare/<model>/<checkpoint>/L<layer>/p<percentile>/<name>/   (ep sae compare tables)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from ep_store.errors import UsageError


def to_segment(name: str) -> str:
    """One safe, reversible path segment for a model or checkpoint name."""
    if not name or name.strip() != name:
        raise UsageError(f"invalid name {name!r}: names must be non-empty without surrounding spaces")
    if name in (".", "..") or any(ord(c) < 32 for c in name):
        raise UsageError(f"invalid name {name!r}: it would escape the store; pick a plain name")
    return quote(name, safe="-_.~+")


def from_segment(segment: str) -> str:
    return unquote(segment)


def format_percentile(p: float) -> str:
    """Percentiles print without trailing zeros: 1 -> '1', 2.5 -> '2.5'."""
    text = f"{float(p):.6f}".rstrip("0").rstrip(".")
    return text


def parse_list(text: str, cast: type, option: str) -> tuple:
    """A comma-separated option value as a tuple of ``cast`` ("6, 12" -> (6, 12)); a bad item is a
    UsageError naming ``option``."""
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        kind = "integers, e.g. 6,12" if cast is int else "numbers, e.g. 2,4,8"
        raise UsageError(f"{option} {text!r} is not a comma-separated list of {kind}") from None


def check_inside(root: Path, path: Path) -> Path:
    """Refuse any path that resolves outside ``root`` (``..``, absolute parts, links)."""
    root_r = root.resolve()
    path_r = path.resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise UsageError(f"path {path} resolves outside {root}; use names without '..' or '/'")
    return path


@dataclass(frozen=True, order=True)
class ActivationKey:
    """(model, checkpoint, layer): one activation dataset."""

    model: str
    checkpoint: str
    layer: int

    def __str__(self) -> str:
        return f"{self.model}/{self.checkpoint}/L{self.layer}"

    @classmethod
    def parse(cls, text: str) -> ActivationKey:
        model, checkpoint, layer = _split_key(text, 3, "<model>/<checkpoint>/L<layer>")
        return cls(model, checkpoint, _parse_layer(layer, text))

    def relpath(self) -> Path:
        """<model>/<checkpoint>/L<layer> as safe path segments (the store adds the file suffix)."""
        return Path(to_segment(self.model), to_segment(self.checkpoint), f"L{self.layer}")


@dataclass(frozen=True, order=True)
class DictionaryKey:
    """(model, checkpoint, layer, percentile): one EP dictionary."""

    model: str
    checkpoint: str
    layer: int
    percentile: float

    def __str__(self) -> str:
        return f"{self.activations}/p{format_percentile(self.percentile)}"

    @property
    def activations(self) -> ActivationKey:
        return ActivationKey(self.model, self.checkpoint, self.layer)

    @classmethod
    def parse(cls, text: str) -> DictionaryKey:
        model, checkpoint, layer, pct = _split_key(text, 4, "<model>/<checkpoint>/L<layer>/p<percentile>")
        if not re.fullmatch(r"p\d+(\.\d+)?", pct):
            raise UsageError(f"bad dictionary key {text!r}: the last part must look like p1 or p2.5")
        return cls(model, checkpoint, _parse_layer(layer, text), float(pct[1:]))

    def relpath(self) -> Path:
        return Path(
            to_segment(self.model),
            to_segment(self.checkpoint),
            f"L{self.layer}",
            f"p{format_percentile(self.percentile)}",
        )

    def slug(self) -> str:
        """A single path segment naming this dictionary (for match folders, report files)."""
        return "~".join(self.relpath().parts)


@dataclass(frozen=True, order=True)
class SAEKey:
    """(model, checkpoint, layer, name): one sparse autoencoder trained on an activation dataset (issue 11)."""

    model: str
    checkpoint: str
    layer: int
    name: str

    def __str__(self) -> str:
        return f"{self.activations}/{self.name}"

    @property
    def activations(self) -> ActivationKey:
        return ActivationKey(self.model, self.checkpoint, self.layer)

    def relpath(self) -> Path:
        return Path(to_segment(self.model), to_segment(self.checkpoint), f"L{self.layer}", to_segment(self.name))


def _split_key(text: str, n: int, form: str) -> list[str]:
    # Model names may themselves contain '/', so split from the right.
    parts = text.rsplit("/", n - 1)
    if len(parts) != n or not all(parts):
        raise UsageError(f"bad key {text!r}: expected {form}")
    return parts


def _parse_layer(text: str, key: str) -> int:
    if not re.fullmatch(r"L\d+", text):
        raise UsageError(f"bad key {key!r}: the layer part must look like L6")
    return int(text[1:])
