"""Writing an evaluation's output folder whole: every file lands in a temporary sibling
folder that replaces ``out`` in one rename, so a failed run leaves the old folder as it was."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path


def strict(value):
    """JSON-safe copy: NaN and inf become null, numpy scalars and arrays plain Python."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "tolist"):
        return strict(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value) -> str:
    return json.dumps(strict(value), indent=1, allow_nan=False, default=str) + "\n"


@contextlib.contextmanager
def output_folder(out: Path):
    """Yield a temporary folder; on success it becomes ``out`` (replacing an old one)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        from ep_store.errors import UsageError

        raise UsageError(f"--out {out} is a file; pass a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_metrics(path: Path | None, metrics: dict) -> None:
    """Also write ``metrics`` to ``path`` (for ``dvc metrics show``), atomically."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dumps(metrics))
    tmp.replace(path)
