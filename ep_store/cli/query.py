"""``ep sql`` (read-only SQL over the store's views), ``ep stats`` (canned questions) and
``ep report`` (static reports: the region browser, the paper table): ep_store.sql, ep_store.analysis.report
and ep_store.analysis.paper."""

from __future__ import annotations

import textwrap
from pathlib import Path

import click

from ep_store.cli.base import AS_OF, FORMAT, OUTPUT, STORE, HelpFrom, emit, show, user_errors
from ep_store.sql.questions import DEFAULTS as QDEFAULTS


def views_help() -> str:
    """The views paragraph of ``ep sql --help`` (ep_store.sql.VIEWS)."""
    from ep_store.sql import VIEWS

    return "\n\n\b\n" + "\n".join(textwrap.wrap("Views: " + ", ".join(VIEWS) + ".", 100))


def questions_help() -> str:
    """The question list of ``ep stats --help``: read from queries/*.sql when help is asked for."""
    from ep_store.sql.questions import questions

    single = "\n".join(f"  {q.usage()}" for q in questions().values() if not q.pair)
    pair = "\n".join(f"  {q.usage()}" for q in questions().values() if q.pair)
    return f"\n\n\b\nQuestions about one dictionary:\n{single}\n\n\b\nPair questions (A = KEY):\n{pair}"


@click.command("sql", cls=HelpFrom, more=views_help)
@click.argument("query")
@FORMAT
@OUTPUT
@AS_OF
@STORE
@user_errors
def sql(query, fmt, output, as_of, store_path) -> None:
    """Run one read-only SQL query over the store's views.

    Data goes to stdout, the summary line to stderr; writes are refused.
    """
    from ep_store.sql.db import StoreDB

    db = StoreDB(store_path, as_of)
    show(db.query(query), fmt, output, {"dictionaries": len(db.keys)})


@click.command("stats", cls=HelpFrom, more=questions_help)
@click.argument("dictionary_key")
@click.argument("question", required=False)
@click.option("--against", default=None, help="Dictionary B of a pair question (KEY is A).")
@click.option("--limit", type=int, default=None, help=f"Regions or rows to show [default: {QDEFAULTS['limit']}].")
@click.option("--context", type=int, default=None, help=f"Tokens of context either side [default: {QDEFAULTS['context']}].")
@click.option("--per-region", type=int, default=None, help=f"Contexts per region [default: {QDEFAULTS['per_region']}].")
@click.option("--top", type=int, default=None, help=f"Top tokens per region [default: {QDEFAULTS['top']}].")
@click.option("--top-n", type=int, default=None,
              help=f"SAE comparison: tokens per binarised feature [default: {QDEFAULTS['top_n']}].")
@click.option("--min-positives", type=int, default=None,
              help=f"SAE comparison: positive tokens for eligibility [default: {QDEFAULTS['min_positives']}].")
@FORMAT
@OUTPUT
@AS_OF
@STORE
@user_errors
def stats(dictionary_key, question, against, limit, context, per_region, top, top_n, min_positives, fmt, output, as_of,
          store_path) -> None:
    """Canned questions about one dictionary (or a pair, with --against); without QUESTION, list them."""
    from ep_store.sql.db import StoreDB, ask_any, question_table
    from ep_store.stages.corpus import dataset_span_labels

    db = StoreDB(store_path, as_of, span_labels=dataset_span_labels)
    key = db.require(dictionary_key)
    if question is None:
        show(question_table(), fmt, output, {"dictionary": str(key)})
        return
    table = ask_any(db, str(key), question, against, limit=limit, context=context, per_region=per_region, top=top,
                    top_n=top_n, min_positives=min_positives)
    show(table, fmt, output, {"dictionary": str(key), "question": question, "against": against})


@click.group()
def report() -> None:
    """Static reports (open from disk, no server): a dictionary's region browser, the paper table."""


@report.command("dictionary")
@click.argument("dictionary_key")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write index.html into.")
@click.option("--context", type=int, default=8, show_default=True, help="Tokens of context either side.")
@click.option("--per-region", type=int, default=3, show_default=True, help="Top contexts per region.")
@AS_OF
@STORE
@user_errors
def report_dictionary(dictionary_key, out, context, per_region, as_of, store_path) -> None:
    """Region browser of one dictionary: summary, plots and a searchable card per region."""
    from ep_store.analysis.report import dictionary_report

    emit(dictionary_report(store=store_path, key=dictionary_key, out=out, context=context, per_region=per_region,
                           as_of=as_of))


def metrics_file(name: str, what: str):
    """An optional metrics JSON input of ``ep report paper`` (a missing file makes its rows say so)."""
    return click.option(f"--{name}", name.replace("-", "_"), type=click.Path(path_type=Path), default=None, help=what)


@report.command("paper")
@metrics_file("refusal", "ep refusal metrics JSON (our protocol), e.g. data/metrics/refusal.json.")
@metrics_file("refusal-paper", "ep refusal --protocol paper metrics JSON.")
@metrics_file("probe", "ep eval probe metrics JSON (our protocol).")
@metrics_file("probe-paper", "ep eval probe --protocol paper metrics JSON.")
@metrics_file("concepts", "ep eval concepts metrics JSON (our protocol).")
@metrics_file("concepts-paper", "ep eval concepts --protocol paper metrics JSON.")
@metrics_file("ood", "ep eval ood metrics JSON.")
@metrics_file("sae", "ep sae summary JSON, e.g. data/metrics/sae_compare.json.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="Store of the evaluated dictionaries, for their token counts.")
@click.option("--refusal-store", type=click.Path(path_type=Path), default=None,
              help="ep refusal --work-store of the --refusal run, for its dictionaries' token counts.")
@click.option("--refusal-paper-store", type=click.Path(path_type=Path), default=None,
              help="ep refusal --work-store of the --refusal-paper run.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write README.md into.")
@click.option("--metrics", type=click.Path(path_type=Path), default=None, help="Also write every claim's numbers here.")
@user_errors
def report_paper(out, metrics, store_path, **inputs) -> None:
    """The paper's claims beside ours (published protocol and ours), one Markdown table."""
    from ep_store.analysis.paper import PaperConfig, paper_report

    emit(paper_report(PaperConfig(out=out, metrics=metrics, store=store_path, **inputs)))
