"""Is a reproduction the same computation? Compare two stores or output folders (issue 18, E14.2).

    ep store verify reproduction/data reference/data --rtol 1e-3 --preserved 0.9

A faithful rerun on another machine (other CPU kernels, other library releases) moves
activations in their last bits and region counts by about 1%: every digest changes, so
``dvc metrics diff`` cannot tell it from a broken run. ``verify`` judges each output of
both trees (a Lance dataset, a dictionary, a file), matched by relative path:

- ``identical``: equal logical digests (ep_store.store.digest);
- ``equivalent``:
  - a Lance dataset (activations, matches, ...): same schema and row count, every
    non-float value equal (doc_id, pos, token_id, token, character spans), every float
    within ``rtol`` (vectors row-wise: |a - b| <= rtol * max(|a|, |b|));
  - a dictionary (a folder with exemplars.lance and meta.json, one output): theta and
    center within ``rtol``, and the exemplars matched one-to-one by cosine (Hungarian,
    ep_store.analysis.match.vector_match) with at least ``preserved`` of the larger dictionary's
    regions at cosine >= ``cutoff``;
  - its assignments.lance: the same tokens, and at least ``preserved`` of them in regions
    that the exemplar matching pairs;
  - a JSON file: the same structure and values, numbers within ``rtol``, ignoring run-time
    keys and ``environment`` (as digests do);
- ``different``: anything else, including an output only one side has. Other files are
  identical or different.

Data rows go to stdout (``path``, ``verdict``, ``detail``); the command exits 1 when any
output is ``different``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ep_store import jsonio
from ep_store.analysis.match import vector_match
from ep_store.errors import UsageError
from ep_store.store import DictionaryFiles, Store, arrow_to_vectors, logical_digest
from ep_store.store.digest import digest, stable
from ep_store.store.layout import ASSIGNMENTS, EXEMPLARS, FOREIGN, META
from ep_store.store.snapshot import assignments_version

VERDICTS = ("identical", "equivalent", "different")
SCAN_ROWS = 65_536  # rows compared at a time (bounded memory)


@dataclass
class VerifyConfig:
    """``ep store verify A B``: what counts as the same computation."""

    a: Path
    """The reproduction: a store root or any folder of outputs (e.g. data/)."""
    b: Path
    """The reference, laid out like ``a``."""
    _: KW_ONLY
    rtol: float = 1e-3
    """Relative tolerance of floats (vectors row-wise, theta, center, JSON numbers)."""
    preserved: float = 0.9
    """Share of the larger dictionary's regions that must match at ``cutoff`` (and of tokens
    whose regions correspond) for a dictionary (its assignments) to be equivalent."""
    cutoff: float = 0.9
    """Exemplar cosine at which a matched region counts as preserved (issue 18, E14.2)."""

    def __post_init__(self):
        self.a, self.b = Path(self.a), Path(self.b)
        for name, path in (("A", self.a), ("B", self.b)):
            if not path.exists():
                raise UsageError(f"{name} {path} does not exist; pass two stores or output folders")
        if not 0 <= self.rtol < 1:
            raise UsageError(f"--rtol must be in [0, 1), got {self.rtol}")
        if not 0 < self.preserved <= 1 or not -1 <= self.cutoff <= 1:
            raise UsageError(f"--preserved must be in (0, 1] and --cutoff in [-1, 1], got "
                             f"{self.preserved} and {self.cutoff}")


class Verdict(NamedTuple):
    path: str
    """Relative path of the output in both trees."""
    verdict: str
    """identical, equivalent or different."""
    detail: str
    """Why, in a few words (the largest difference, the preserved share, what is missing)."""


def verify(cfg: VerifyConfig) -> list[Verdict]:
    """One Verdict per output of either tree, sorted by path. Raises UsageError for a missing
    path (in VerifyConfig)."""
    a, b = _outputs(cfg.a), _outputs(cfg.b)
    rows = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a or rel not in b:
            rows.append(Verdict(rel, "different", f"only in {'B' if rel in b else 'A'}"))
        elif a[rel] != b[rel]:
            rows.append(Verdict(rel, "different", f"a {a[rel]} in A, a {b[rel]} in B"))
        else:
            rows.append(_judge(cfg, rel, a[rel]))
    return rows


def counts(rows: list[Verdict]) -> dict[str, int]:
    """``{verdict: number of outputs}`` for every verdict."""
    return {v: sum(r.verdict == v for r in rows) for v in VERDICTS}


ROW_FORMATS = ("tsv", "jsonl")  # how ep store verify prints its rows


def listing(cfg: VerifyConfig, fmt: str = "tsv") -> tuple[list[str], dict]:
    """``ep store verify``: one line per output (path, verdict, detail as tsv or jsonl) and the
    summary (outputs, and the number of each verdict)."""
    rows = verify(cfg)
    lines = [jsonio.dumps(row._asdict()) if fmt == "jsonl" else "\t".join(row) for row in rows]
    return lines, {"outputs": len(rows), **counts(rows)}


def _outputs(root: Path) -> dict[str, str]:
    """``{relative path: kind}`` of the outputs under ``root`` (kind: dictionary, assignments,
    lance, json, file); ``"."`` when ``root`` itself is one (a dictionary folder is one output
    and holds others: its assignments)."""
    if root.is_file() or Store.exists(root):
        return {".": _kind(root)}
    found = {}
    if _is_dictionary(root):  # exemplars.lance + meta.json are one output; assignments are others
        found["."] = "dictionary"
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or child.name.endswith(".tmp") or \
                ("." in found and child.name in (EXEMPLARS, META)):
            continue
        for rel, kind in _outputs(child).items():
            found[(Path(child.name) / rel).as_posix() if rel != "." else child.name] = kind
    return found


def _is_dictionary(path: Path) -> bool:
    files = DictionaryFiles(path)
    return path.is_dir() and Store.exists(files.exemplars) and files.finished


def _kind(path: Path) -> str:
    if _is_dictionary(path):
        return "dictionary"
    if Store.exists(path):
        return "assignments" if path.name == ASSIGNMENTS or FOREIGN in path.parts else "lance"
    return "json" if path.suffix == ".json" else "file"


def _judge(cfg: VerifyConfig, rel: str, kind: str) -> Verdict:
    pa_, pb = (cfg.a, cfg.b) if rel == "." else (cfg.a / rel, cfg.b / rel)
    if _same_digests(pa_, pb, kind):
        return Verdict(rel, "identical", "equal logical digests")
    if kind == "dictionary":
        ok, detail = compare_dictionaries(pa_, pb, cfg)
    elif kind == "assignments":
        ok, detail = compare_assignments(pa_, pb, cfg)
    elif kind == "lance":
        ok, detail = compare_datasets(pa_, pb, cfg.rtol)
    elif kind == "json":
        ok, detail = compare_json(pa_, pb, cfg.rtol)
    else:
        ok, detail = False, "bytes differ"
    return Verdict(rel, "equivalent" if ok else "different", detail)


def _same_digests(a: Path, b: Path, kind: str) -> bool:
    """Equal logical digests of what readers read: a dictionary's exemplars at the version its
    meta.json publishes, its assignments written from that version (issue 18, A1)."""
    if kind == "assignments" and _dictionary_of(a) is not None and _dictionary_of(b) is not None:
        (va, _), (vb, _) = published_assignments(_dictionary_of(a), a), published_assignments(_dictionary_of(b), b)
        return va is not None and vb is not None and \
            logical_digest(a, va)["digest"] == logical_digest(b, vb)["digest"]
    if kind != "dictionary":
        return digest(a)["digest"] == digest(b)["digest"]
    fa, fb = DictionaryFiles(a), DictionaryFiles(b)
    published = [logical_digest(f.exemplars, Store.read_json(f.meta).get("exemplars_version")) for f in (fa, fb)]
    return published[0]["digest"] == published[1]["digest"] and \
        digest(fa.meta)["digest"] == digest(fb.meta)["digest"]


# -- Lance datasets ---------------------------------------------------------------------------------
def _is_float(kind: pa.DataType) -> bool:
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.types.is_floating(kind.value_type)
    return pa.types.is_floating(kind)


def _relative_difference(x: pa.Array, y: pa.Array) -> float:
    """max |a - b| / max(|a|, |b|) over rows (vectors: row norms; 0 where equal or both NaN);
    inf where variable-length lists differ in length or only one value is NaN."""
    if not pa.types.is_fixed_size_list(x.type) and not pa.types.is_floating(x.type):  # list<float>
        lengths = [pa.compute.list_value_length(v).to_pylist() for v in (x, y)]
        if lengths[0] != lengths[1]:
            return math.inf
        x, y = x.flatten(), y.flatten()
    if pa.types.is_fixed_size_list(x.type):
        a, b = arrow_to_vectors(x, np.float64), arrow_to_vectors(y, np.float64)
        diff, scale = np.linalg.norm(a - b, axis=1), np.maximum(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    else:
        a = np.asarray(x.to_numpy(zero_copy_only=False), dtype=np.float64)
        b = np.asarray(y.to_numpy(zero_copy_only=False), dtype=np.float64)
        diff, scale = np.abs(a - b), np.maximum(np.abs(a), np.abs(b))
    both_nan = (np.isnan(a) & np.isnan(b)).reshape(len(diff), -1).all(axis=1)
    judged = ~((diff == 0) | both_nan)
    if np.isnan(diff[judged]).any():
        return math.inf
    ratio = np.divide(diff, scale, out=np.full(len(diff), np.inf), where=scale > 0)
    return float(ratio[judged].max(initial=0.0))


def compare_datasets(a: Path, b: Path, rtol: float) -> tuple[bool, str]:
    """(equivalent, detail) of two Lance datasets: same schema and rows, non-float values equal,
    floats within ``rtol`` (E14.2). Reads ``SCAN_ROWS`` rows of each at a time."""
    sa, sb = Store.dataset(a).schema, Store.dataset(b).schema
    if [(f.name, f.type) for f in sa] != [(f.name, f.type) for f in sb]:
        return False, "schemas differ"
    rows_a, rows_b = Store.info(a).rows, Store.info(b).rows
    if rows_a != rows_b:
        return False, f"row counts differ ({rows_a} in A, {rows_b} in B)"
    worst, row = 0.0, 0
    for x, y in zip(Store.scan(a, batch_size=SCAN_ROWS), Store.scan(b, batch_size=SCAN_ROWS)):
        for name in sa.names:
            cx, cy = x.column(name), y.column(name)
            if _is_float(cx.type):
                worst = max(worst, _relative_difference(cx, cy))
            elif not cx.equals(cy):
                return False, f"column {name} differs (rows {row}..{row + x.num_rows - 1})"
        if worst > rtol:
            return False, f"floats differ by {worst:.3g} relative (> rtol {rtol:g}) by row {row + x.num_rows - 1}"
        row += x.num_rows
    return True, f"{rows_a} rows; non-float values equal; floats within {worst:.3g} relative"


# -- dictionaries and their assignments ------------------------------------------------------------
class RegionMatch(NamedTuple):
    regions_a: int
    regions_b: int
    a_to_b: np.ndarray
    """B's region for each region of A matched at cosine >= cutoff, else -1."""

    @property
    def preserved(self) -> int:
        return int((self.a_to_b >= 0).sum())

    @property
    def share(self) -> float:
        """Preserved regions as a share of the larger dictionary's."""
        return self.preserved / max(self.regions_a, self.regions_b, 1)


def _exemplars(folder: Path) -> tuple[dict, np.ndarray]:
    """(meta, E_KD float64) of a dictionary folder, at the version its meta.json publishes."""
    files = DictionaryFiles(folder)
    meta = Store.read_json(files.meta)
    table = Store.read_table(files.exemplars, ["exemplar"], version=meta.get("exemplars_version"))
    return meta, arrow_to_vectors(table.column("exemplar"), np.float64)


@functools.cache
def match_regions(a: Path, b: Path, cutoff: float) -> RegionMatch:
    """One-to-one exemplar matching of two dictionary folders (Hungarian on cosine, as
    ep match --method vector does: ep_store.analysis.match.vector_match); pairs below ``cutoff`` drop."""
    (_, E_a), (_, E_b) = _exemplars(a), _exemplars(b)
    a_to_b = np.full(len(E_a), -1, dtype=np.int64)
    if len(E_a) and len(E_b) and E_a.shape[1] == E_b.shape[1]:
        m = vector_match(E_a, E_b)
        keep = m.cosine >= cutoff
        a_to_b[m.rows_a[keep]] = m.rows_b[keep]
    return RegionMatch(len(E_a), len(E_b), a_to_b)


def compare_dictionaries(a: Path, b: Path, cfg: VerifyConfig) -> tuple[bool, str]:
    """(equivalent, detail): theta and center within ``rtol``, and at least ``preserved`` of the
    larger dictionary's regions matched one-to-one at exemplar cosine >= ``cutoff`` (E14.2)."""
    (ma, E_a), (mb, E_b) = _exemplars(a), _exemplars(b)
    if E_a.shape[1:] != E_b.shape[1:]:
        return False, f"widths differ ({E_a.shape[1]} and {E_b.shape[1]})"
    theta = abs(ma["theta"] - mb["theta"]) / max(abs(ma["theta"]), abs(mb["theta"]), 1e-300)
    ca, cb = np.asarray(ma["center"], np.float64), np.asarray(mb["center"], np.float64)
    center = float(np.linalg.norm(ca - cb) / max(np.linalg.norm(ca), np.linalg.norm(cb), 1e-300))
    m = match_regions(a, b, cfg.cutoff)
    detail = (f"regions {m.regions_a} and {m.regions_b}: {m.preserved} matched at cosine >= {cfg.cutoff:g} "
              f"({m.share:.1%} of the larger); theta within {theta:.3g}, center within {center:.3g} relative")
    return theta <= cfg.rtol and center <= cfg.rtol and m.share >= cfg.preserved, detail


def _dictionary_of(path: Path) -> Path | None:
    """The dictionary folder an assignments dataset belongs to (its nearest ancestor)."""
    return next((p for p in path.parents if _is_dictionary(p)), None)


def compare_assignments(a: Path, b: Path, cfg: VerifyConfig) -> tuple[bool, str]:
    """(equivalent, detail): the same tokens (doc_id, pos) in the same order, and at least
    ``preserved`` of them in regions that the dictionaries' exemplar matching pairs (E14.2).
    Each side's assignments are those written from its published exemplars (the dictionary
    snapshot's, issue 18 A1), not the latest Lance version."""
    da, db = _dictionary_of(a), _dictionary_of(b)
    if da is None or db is None:
        return compare_datasets(a, b, cfg.rtol)
    (va, why_a), (vb, why_b) = published_assignments(da, a), published_assignments(db, b)
    if va is None or vb is None:
        return va == vb, "; ".join(f"{side}: {why}" for side, why in (("A", why_a), ("B", why_b)) if why)
    rows_a, rows_b = Store.dataset(a, va).count_rows(), Store.dataset(b, vb).count_rows()
    if rows_a != rows_b:
        return False, f"row counts differ ({rows_a} in A, {rows_b} in B)"
    a_to_b, agree, row = match_regions(da, db, cfg.cutoff).a_to_b, 0, 0
    columns = ["doc_id", "pos", "region_id"]
    for x, y in zip(Store.scan(a, columns, SCAN_ROWS, va), Store.scan(b, columns, SCAN_ROWS, vb)):
        if not (x.column("doc_id").equals(y.column("doc_id")) and x.column("pos").equals(y.column("pos"))):
            return False, f"tokens differ (rows {row}..{row + x.num_rows - 1})"
        ra = x.column("region_id").to_numpy(zero_copy_only=False)
        rb = y.column("region_id").to_numpy(zero_copy_only=False)
        agree += int((a_to_b[ra] == rb).sum())
        row += x.num_rows
    share = agree / max(rows_a, 1)
    return share >= cfg.preserved, f"{rows_a} tokens: {share:.1%} in matched regions"


# -- JSON ---------------------------------------------------------------------------------------
def compare_json(a: Path, b: Path, rtol: float) -> tuple[bool, str]:
    """(equivalent, detail): equal structure and values, numbers within ``rtol``, without the
    keys digests skip (run-time measurements, ``environment``)."""
    try:
        ja, jb = (stable(json.loads(p.read_text(encoding="utf-8"))) for p in (a, b))
    except ValueError:
        return False, "bytes differ (not both JSON)"
    worst = [0.0]
    where = _json_difference(ja, jb, rtol, "", worst)
    if where is not None:
        return False, f"differs at {where or '(top)'}"
    return True, f"numbers within {worst[0]:.3g} relative"


def _json_difference(x, y, rtol: float, at: str, worst: list) -> str | None:
    """The first path where ``x`` and ``y`` differ beyond ``rtol``, else None (``worst[0]``
    keeps the largest relative difference of numbers)."""
    number = (int, float)
    if isinstance(x, number) and isinstance(y, number) and not isinstance(x, bool) and not isinstance(y, bool):
        if x == y or (math.isnan(x) and math.isnan(y)):
            return None
        diff = abs(x - y) / max(abs(x), abs(y))
        worst[0] = max(worst[0], diff)
        return None if diff <= rtol else f"{at} ({x} and {y})"
    if isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            return f"{at} (keys {sorted(set(x) ^ set(y))[:3]} on one side)"
        return next((d for k in sorted(x) if (d := _json_difference(x[k], y[k], rtol, f"{at}.{k}", worst))), None)
    if isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            return f"{at} (lengths {len(x)} and {len(y)})"
        return next((d for i, (u, v) in enumerate(zip(x, y))
                     if (d := _json_difference(u, v, rtol, f"{at}[{i}]", worst))), None)
    return None if x == y else f"{at} ({str(x)[:40]!r} and {str(y)[:40]!r})"


def published_assignments(folder: Path, path: Path) -> tuple[int | None, str]:
    """``assignments_version`` for an assignments dataset ``path`` (its own or a foreign one) of
    the dictionary ``folder``, read outside a store's layout (``ep store verify``): the version
    written from the exemplars the folder's meta.json publishes, or (None, why not in one line)
    (issue 18, A1)."""
    meta = Store.read_json(DictionaryFiles(folder).meta)
    return assignments_version(Store(folder), meta.get("key", folder), path, meta["exemplars_version"], "latest")
