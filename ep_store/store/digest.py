"""Digests of stage outputs' logical content, so a reproduction can be checked (issue 8, item 20).

``dvc repro`` on a fresh clone rewrites every hash in dvc.lock, because Lance files carry
random names and timestamps. Each pipeline stage therefore also records, as a DVC metric,
a digest of what it wrote that depends only on content:

- a Lance dataset: rows and values in stored order, schema without metadata
  (``logical_digest``; fragment layout, file names, timestamps do not count);
- a JSON file: its parsed content without run-time measurements (any key naming
  ``seconds``, e.g. ``cpu_seconds``, ``seconds_ratio_sae_over_ep``; keys
  ``*_seconds``, ``*_per_s``, ``*_wait_share``, ``*_idle_share``, ``write_share``,
  ``peak_mib``) and without the ``environment`` a stage ran with (library versions, CPU
  capability, device: ep_store.environment, issue 18 item E14.1), keys sorted;
- any other file: its bytes (SHA-256);
- a folder: the digests of everything inside by relative path (Lance datasets as one entry).

``dvc metrics diff`` then shows no change wherever the computation is deterministic.

    ep store digest data/store/activations/gemma-3-270m/base --metrics data/metrics/digests/x.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ep_store import jsonio
from ep_store.environment import ENVIRONMENT_KEY
from ep_store.errors import UsageError, check_output_file
from ep_store.store.core import Store
from ep_store.store.layout import BUILDING, LANCE

DIGEST_BATCH = 65_536  # rows per scanned batch; any size gives the same digest


def logical_digest(path: Path, version: int | str | None = None) -> dict:
    """A digest of a Lance dataset's logical content: its schema (names and types, not the
    metadata) and every row's values in stored order.

    Independent of file names, fragment layout, batch boundaries, Lance version numbers and
    timestamps: the same rows written as one fragment or many, today or tomorrow, give the
    same digest; any changed, added, dropped or reordered value changes it. Each column
    feeds its own SHA-256 streams (validity, fixed-width bytes, or lengths + bytes for
    strings and lists), so batch boundaries cannot move bytes between values.

    Returns ``{"rows": int, "digest": "<sha256 hex>"}``. Raises UsageError if ``path`` is not
    a Lance dataset.
    """
    if not Store.exists(Path(path)):
        raise UsageError(f"{path} is not a Lance dataset")
    ds = Store.dataset(Path(path), version)
    schema = pa.schema([pa.field(f.name, f.type) for f in ds.schema])
    streams: dict = {}
    rows = 0
    for batch in ds.scanner(batch_size=DIGEST_BATCH).to_batches():
        rows += batch.num_rows
        for name, column in zip(batch.schema.names, batch.columns):
            _feed_digest(streams, name, column)
    total = hashlib.sha256(str(schema).encode() + b"\0" + str(rows).encode())
    for name in sorted(streams):
        total.update(name.encode() + b"\0" + streams[name].digest())
    return {"rows": rows, "digest": total.hexdigest()}


def _feed_digest(streams: dict, name: str, array: pa.Array) -> None:
    """Add one chunk of a column to its digest streams (see logical_digest)."""

    def feed(stream: str, data: bytes) -> None:
        streams.setdefault(stream, hashlib.sha256()).update(data)

    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), kind.value_type
    feed(f"{name}.valid", np.asarray(array.is_valid(), dtype=np.bool_).tobytes())
    if pa.types.is_fixed_size_list(kind):
        _feed_digest(streams, f"{name}.values", array.flatten())
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.fill_null(pc.list_value_length(array), 0).cast(pa.int64())
        feed(f"{name}.lengths", lengths.to_numpy(zero_copy_only=False).tobytes())
        _feed_digest(streams, f"{name}.values", array.flatten())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        values = pc.fill_null(array.cast(pa.large_binary()), b"")
        lengths = pc.binary_length(values).cast(pa.int64()).to_numpy(zero_copy_only=False)
        feed(f"{name}.lengths", lengths.tobytes())
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset: values.offset + len(values) + 1]
        if len(values):
            feed(f"{name}.bytes", values.buffers()[2].to_pybytes()[offsets[0]: offsets[-1]])
    elif pa.types.is_struct(kind):
        for i in range(kind.num_fields):
            _feed_digest(streams, f"{name}.{kind.field(i).name}", array.field(i))
    elif pa.types.is_boolean(kind):
        feed(f"{name}.values", np.asarray(pc.fill_null(array, False), dtype=np.bool_).tobytes())
    elif pa.types.is_primitive(kind):
        filled = pc.fill_null(array, pa.scalar(0, kind)) if array.null_count else array
        feed(f"{name}.values", np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).tobytes())
    else:  # anything else: a canonical text per value
        feed(f"{name}.text", "\0".join(repr(v) for v in array.to_pylist()).encode() + b"\0")



VOLATILE_KEYS = frozenset({"seconds", "write_share", "peak_mib", ENVIRONMENT_KEY})
VOLATILE_SUFFIXES = ("_seconds", "_per_s", "_wait_share", "_idle_share")


def _is_volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or key.endswith(VOLATILE_SUFFIXES) or "seconds" in key


def stable(value):
    """JSON content without run-time measurements (timings, rates, the machine), recursively."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not _is_volatile(str(k))}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def file_digest(path: Path) -> dict:
    """``{"bytes" or "json": ..., "digest": hex}`` of one file (JSON by content, else bytes)."""
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            content = None
        if content is not None:
            text = jsonio.dumps(stable(content), sort_keys=True)
            return {"kind": "json", "digest": hashlib.sha256(text.encode()).hexdigest()}
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"kind": "bytes", "digest": sha.hexdigest()}


def digest(path: Path) -> dict:
    """The logical digest of a Lance dataset, a file, or a folder of them.

    Returns ``{"kind", "digest", "rows"?, "parts"?}``; a folder's ``parts`` counts the datasets
    and files it combines. Raises UsageError if ``path`` does not exist.
    """
    path = Path(path)
    if Store.exists(path):
        return {"kind": "lance", **logical_digest(path)}
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise UsageError(f"{path} does not exist")
    entries, rows = [], 0
    for part in _parts(path):
        d = digest(part)
        rows += d.get("rows", 0)
        entries.append(f"{part.relative_to(path).as_posix()}\0{d['digest']}")
    total = hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return {"kind": "folder", "rows": rows, "parts": len(entries), "digest": total}


def _parts(folder: Path) -> list[Path]:
    """Lance datasets and files under ``folder`` (not inside datasets), sorted by path."""
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or child.name.endswith(".tmp") or child.name.endswith(BUILDING + LANCE):
            continue
        if Store.exists(child) or child.is_file():
            found.append(child)
        elif child.is_dir():
            found.extend(_parts(child))
    return found


def digests(paths: list[Path], metrics: Path | None = None) -> dict[str, dict]:
    """Digest every path (keys are the paths as given); also write them to ``metrics`` as JSON."""
    check_output_file(metrics, "--metrics")
    result = {str(p): digest(Path(p)) for p in paths}
    if metrics is not None:
        jsonio.write(metrics, result, sort_keys=True)
    return result


def listing(paths: list[Path], metrics: Path | None = None) -> tuple[list[str], dict]:
    """``ep store digest``: one line per path (digest, rows, path; tab-separated) and the summary."""
    found = digests(paths, metrics)
    lines = [f"{d['digest']}\t{d.get('rows', '')}\t{path}" for path, d in found.items()]
    return lines, {"paths": len(found), "metrics": str(metrics) if metrics else None}
