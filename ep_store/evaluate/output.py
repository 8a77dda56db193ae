"""Writing an evaluation's output folder whole: every file lands in a temporary sibling
folder that replaces ``out`` in one rename, so a failed run leaves the old folder as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ep_store import jsonio


def dumps(value) -> str:
    return jsonio.dumps(value, indent=1) + "\n"


@contextlib.contextmanager
def output_folder(out: Path, option: str = "--out"):
    """Yield a temporary folder; on success it becomes ``out`` (replacing an old one)."""
    from ep_store.errors import check_output_folder
    from ep_store.store.layout import check_replaceable

    out = Path(out)
    check_output_folder(out, option)
    check_replaceable(out, option)
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


def check_outputs(out: Path, metrics_path: Path | None, plots_dir: Path | None) -> None:
    """Refuse unwritable ``--out``, ``--metrics`` and ``--plots`` paths before any work (UsageError)."""
    from ep_store.errors import check_output_file, check_output_folder

    check_output_folder(out, "--out")
    check_output_file(metrics_path, "--metrics")
    check_output_folder(plots_dir, "--plots")


def run_environment(run) -> dict:
    """ep_store.environment of an evaluation's forward passes (``run``: features.TextRun; the
    model computes in float32), recorded in its metrics.json (issue 18, E14.1)."""
    from ep_store.environment import environment
    from ep_store.stages import models

    return environment(models.resolve_device(run.device), "float32")


def write_metrics(path: Path | None, metrics: dict) -> None:
    """Also write ``metrics`` to ``path`` (for ``dvc metrics show``), atomically."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dumps(metrics))
    tmp.replace(path)


def copy_images(out: Path, plots_dir: Path | None) -> None:
    """Also put ``out``'s PNGs, alone, in ``plots_dir`` (a DVC ``plots:`` folder), replacing it."""
    if plots_dir is None or Path(plots_dir) == Path(out):
        return
    with output_folder(Path(plots_dir), "--plots") as tmp:
        for png in sorted(Path(out).glob("*.png")):
            shutil.copy2(png, tmp / png.name)


EVALS = ("probe", "concepts", "ood")  # folder names under <reports>/evals/ (the eval_* DVC stages)


def eval_links(out: Path, keys) -> list[tuple[str, str]]:
    """(label, relative href) of the evaluation pages of dictionaries ``keys`` for a report
    written to ``out``: ``<reports>/evals/<eval>/<model>~<checkpoint>/index.html`` where
    ``<reports>`` is the nearest parent of ``out`` named ``reports`` (the pipeline's layout).
    Empty when ``out`` lies under no such folder."""
    out = Path(out).resolve()
    root = next((p for p in [out, *out.parents] if p.name == "reports"), None)
    if root is None:
        return []
    links = []
    for key in keys:
        slug = f"{key.model}~{key.checkpoint}"
        for name in EVALS:
            target = root / "evals" / name / slug / "index.html"
            links.append((f"{name}: {slug}", os.path.relpath(target, out)))
    return list(dict.fromkeys(links))


def _flat(prefix: str, value, rows: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix} / {k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, value))


def write_index(folder: Path, title: str, metrics: dict, images: list[str]) -> None:
    """A small index.html: the headline metrics as a table and the plots."""
    import jinja2

    rows: list = []
    _flat("", jsonio.clean(metrics), rows)
    page = jinja2.Environment(autoescape=True).from_string(
        "<!doctype html><meta charset='utf-8'><title>{{ title }}</title>"
        "<style>body{font:14px system-ui;margin:1.5em auto;max-width:1100px}td{padding:1px 10px}"
        "img{width:48%;min-width:320px;border:1px solid #ddd}</style><h1>{{ title }}</h1>"
        "<p><a href='metrics.json'>metrics.json</a></p><table>{% for k, v in rows %}<tr><td>{{ k }}</td>"
        "<td>{{ v }}</td></tr>{% endfor %}</table>{% for i in images %}<img src='{{ i }}'>{% endfor %}"
    ).render(title=title, rows=rows, images=images)
    (Path(folder) / "index.html").write_text(page, encoding="utf-8")
