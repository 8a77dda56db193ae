"""``ep match`` (regions of dictionary A matched to B) and ``ep diff`` (the report of B against A):
ep_store.analysis.match and ep_store.analysis.diff."""

from __future__ import annotations

from pathlib import Path

import click

from ep_store.cli.base import MODELS, STORE, Registry, emit, user_errors


@click.command("match")
@click.argument("a")
@click.argument("b")
@click.option("--method", type=Registry("ep_store.analysis.match", "METHODS"), default="both", show_default=True,
              help="Match exemplar vectors (Hungarian), memberships (SQL overlaps), or both.")
@click.option("--cutoff", type=float, default=0.7, show_default=True, help="Cosine for a vector match to count as preserved.")
@click.option("--f1-cutoff", type=float, default=0.3, show_default=True, help="F1 for a membership-only match to count.")
@STORE
@user_errors
def match_cmd(a, b, method, cutoff, f1_cutoff, store_path) -> None:
    """Match dictionary A to B: preserved, introduced and dropped regions."""
    from ep_store.analysis.match import MatchConfig, match
    from ep_store.store.core import Store

    emit(match(MatchConfig(a=a, b=b, method=method, cutoff=cutoff, f1_cutoff=f1_cutoff), Store(store_path)))


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for index.html and README.md.")
@click.option("--top", type=int, default=15, show_default=True, help="Regions per section.")
@click.option("--context", type=int, default=8, show_default=True, help="Tokens of context either side.")
@click.option("--cutoff", type=float, default=0.7, show_default=True, help="Cosine cutoff if the match must be computed.")
@STORE
@MODELS
@user_errors
def diff_cmd(a, b, out, top, context, cutoff, store_path, models_dir) -> None:
    """Diff report (HTML and Markdown) of dictionary B against A; matches them first if needed."""
    from ep_store.analysis.diff import diff_report

    emit(diff_report(store_path=store_path, a=a, b=b, out=out, models_dir=models_dir, top=top, context=context,
                     cutoff=cutoff))
