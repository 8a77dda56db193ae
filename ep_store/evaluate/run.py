"""What every evaluation runner (``probe``, ``concepts``, ``ood``) does around its protocol:
refuse unwritable outputs and load the dictionaries before any work (``open_evaluation``), then
write the output folder whole (``evaluation_output``: metrics.json and index.html through
``write_record``, the plots), the DVC metrics file and the DVC plots folder."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from ep_store.evaluate.output import (
    check_outputs,
    copy_images,
    dumps,
    output_folder,
    run_environment,
    write_index,
    write_metrics,
)


class Evaluated(NamedTuple):
    """The dictionaries of one evaluation and the (model, checkpoint) its texts run through."""

    dicts: list
    """ep_store.stages.dictionary.Dictionary, one per key."""
    model: str
    checkpoint: str


def open_evaluation(cfg, store, out: Path, metrics_path: Path | None, plots_dir: Path | None) -> Evaluated:
    """Refuse unwritable ``--out``, ``--metrics`` and ``--plots`` (UsageError), then load the
    dictionaries ``cfg.dictionaries`` (``cfg.model``/``cfg.checkpoint`` override where the
    texts run: features.load_dictionaries)."""
    from ep_store.evaluate import features

    check_outputs(out, metrics_path, plots_dir)
    return Evaluated(*features.load_dictionaries(store, cfg.dictionaries, cfg.model, cfg.checkpoint))


@contextlib.contextmanager
def evaluation_output(out: Path, metrics_path: Path | None, plots_dir: Path | None, metrics: dict):
    """Yield the temporary folder the runner writes into; on success it becomes ``out``, then
    ``metrics`` (as filled by then) goes to ``metrics_path`` and the PNGs to ``plots_dir``."""
    with output_folder(out) as tmp:
        yield tmp
    write_metrics(metrics_path, metrics)
    copy_images(out, plots_dir)


def write_record(folder: Path, title: str, record: dict, cfg, run, plots: list | dict,
                 headline: dict | None = None) -> None:
    """``folder``/metrics.json: ``record`` followed by the config, the plots and the environment
    of the forward passes; ``folder``/index.html: ``headline`` (default ``record["metrics"]``)
    as a table and the plots."""
    (folder / "metrics.json").write_text(dumps({**record, "config": asdict(cfg), "plots": plots,
                                                "environment": run_environment(run)}))
    images = list(plots.values()) if isinstance(plots, dict) else plots
    write_index(folder, title, record["metrics"] if headline is None else headline, images)
