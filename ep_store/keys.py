"""Keys of the store and the paths they map to.

An activation dataset is keyed by (model, checkpoint, layer); a dictionary adds the
percentile. Model names such as ``EleutherAI/pythia-70m`` become one path segment by
percent-encoding, which is reversible, and no key may resolve outside the store.

A key names a hook point too (issue 21, item 4): TransformerLens's names within block
``layer`` (``resid_post``, the block output, is the default and is left out of keys and paths,
so keys and stores from before hook points keep working; ``L6.attn_out`` names another).

Store layout (DESIGN.md):
    activations/<model>/<checkpoint>/L<layer>[.<hook>].lance
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

HOOKS = ("resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_out")
"""Hook points a harvest may read, named as TransformerLens names them (``blocks.L.hook_<name>``)."""
DEFAULT_HOOK = "resid_post"


def layer_segment(layer: int, hook: str = DEFAULT_HOOK) -> str:
    """The layer part of a key and of its paths: ``L6`` for the block output, ``L6.attn_out`` otherwise."""
    return f"L{layer}" if hook == DEFAULT_HOOK else f"L{layer}.{hook}"


def parse_layer_segment(text: str, key: str | None = None) -> tuple[int, str]:
    """(layer, hook) of ``L6`` or ``L6.attn_out``; UsageError naming ``key`` (or ``text``) otherwise."""
    found = re.fullmatch(r"L(\d+)(?:\.(\w+))?", text)
    if not found:
        raise UsageError(f"bad key {key or text!r}: the layer part must look like L6 or L6.attn_out")
    hook = found.group(2) or DEFAULT_HOOK
    if hook not in HOOKS:
        raise UsageError(f"bad key {key or text!r}: unknown hook point {hook!r}; hook points: {', '.join(HOOKS)}")
    return int(found.group(1)), hook


def check_hook(hook: str) -> str:
    """``hook`` if it is a known hook point; UsageError listing them otherwise."""
    if hook not in HOOKS:
        raise UsageError(f"unknown hook point {hook!r}; pass one of {', '.join(HOOKS)}")
    return hook


def hook_name(layer: int, hook: str = DEFAULT_HOOK) -> str:
    """TransformerLens's full hook name, ``blocks.6.hook_resid_post`` (SAELens's ``hook_name``)."""
    return f"blocks.{layer}.hook_{hook}"


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
    """(model, checkpoint, layer, hook): one activation dataset."""

    model: str
    checkpoint: str
    layer: int
    hook: str = DEFAULT_HOOK

    def __post_init__(self):
        check_hook(self.hook)

    def __str__(self) -> str:
        return f"{self.model}/{self.checkpoint}/{layer_segment(self.layer, self.hook)}"

    @classmethod
    def parse(cls, text: str) -> ActivationKey:
        model, checkpoint, layer = _split_key(text, 3, "<model>/<checkpoint>/L<layer>")
        return cls(model, checkpoint, *parse_layer_segment(layer, text))

    def relpath(self) -> Path:
        """<model>/<checkpoint>/L<layer>[.<hook>] as safe path segments (the store adds the file suffix)."""
        return Path(to_segment(self.model), to_segment(self.checkpoint), layer_segment(self.layer, self.hook))


@dataclass(frozen=True, order=True)
class DictionaryKey:
    """(model, checkpoint, layer, percentile, hook): one EP dictionary."""

    model: str
    checkpoint: str
    layer: int
    percentile: float
    hook: str = DEFAULT_HOOK

    def __post_init__(self):
        check_hook(self.hook)

    def __str__(self) -> str:
        return f"{self.activations}/p{format_percentile(self.percentile)}"

    @property
    def activations(self) -> ActivationKey:
        return ActivationKey(self.model, self.checkpoint, self.layer, self.hook)

    @classmethod
    def parse(cls, text: str) -> DictionaryKey:
        model, checkpoint, layer, pct = _split_key(text, 4, "<model>/<checkpoint>/L<layer>/p<percentile>")
        if not re.fullmatch(r"p\d+(\.\d+)?", pct):
            raise UsageError(f"bad dictionary key {text!r}: the last part must look like p1 or p2.5")
        layer_number, hook = parse_layer_segment(layer, text)
        return cls(model, checkpoint, layer_number, float(pct[1:]), hook)

    @classmethod
    def under(cls, activations: ActivationKey, percentile: float) -> DictionaryKey:
        """The dictionary at ``percentile`` built on ``activations``."""
        a = activations
        return cls(a.model, a.checkpoint, a.layer, percentile, a.hook)

    def relpath(self) -> Path:
        return Path(*self.activations.relpath().parts, f"p{format_percentile(self.percentile)}")

    def slug(self) -> str:
        """A single path segment naming this dictionary (for match folders, report files)."""
        return "~".join(self.relpath().parts)


@dataclass(frozen=True, order=True)
class SAEKey:
    """(model, checkpoint, layer, name, hook): one sparse autoencoder trained on an activation dataset (issue 11)."""

    model: str
    checkpoint: str
    layer: int
    name: str
    hook: str = DEFAULT_HOOK

    def __post_init__(self):
        check_hook(self.hook)

    def __str__(self) -> str:
        return f"{self.activations}/{self.name}"

    @property
    def activations(self) -> ActivationKey:
        return ActivationKey(self.model, self.checkpoint, self.layer, self.hook)

    def relpath(self) -> Path:
        return Path(*self.activations.relpath().parts, to_segment(self.name))


def _split_key(text: str, n: int, form: str) -> list[str]:
    # Model names may themselves contain '/', so split from the right.
    parts = text.rsplit("/", n - 1)
    if len(parts) != n or not all(parts):
        raise UsageError(f"bad key {text!r}: expected {form}")
    return parts
