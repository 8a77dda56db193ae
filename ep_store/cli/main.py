"""The ``ep`` command: the click group ``main``, one-line errors and SIGTERM handling; the
commands live one file per group beside this one (models, harvest and store, build and
assign, sql/stats/report, match and diff, studies, eval, sae, search and index). Each command
parses its options, builds the library's config by keyword, calls one library function and
``emit``s its summary; its choices come from the library's registries (cli/base.py).

Streams (issue 8, item 9): stdout carries only data, the one-line JSON summary, progress bars,
logs and errors go to stderr. Bad input raises ``UsageError``, which becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

import click

from ep_store.cli import (
    build,
    bundle,
    eval,
    export,
    harvest,
    match,
    models,
    query,
    sae,
    search,
    studies,
)
from ep_store.cli.base import fail
from ep_store.errors import EnvError, Terminated, UsageError


def _on_sigterm(signum, frame) -> None:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, so the cleanup Ctrl-C
    runs (locks released, writer drained, whole commits kept) runs for it too; a second SIGTERM
    during that cleanup is ignored (SIGKILL still ends it). Issue 18, C8."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Install _on_sigterm for the command's duration (main thread only), then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class OneLineErrors(click.Group):
    """Click's own usage errors (a bad option type, a missing option, an unknown command) as
    one line on stderr and exit code 2, like UsageError, instead of usage + hint + error; and
    SIGTERM handled like Ctrl-C (exit 143, one line)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with sigterm_as_interrupt():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort as err:  # click turns a KeyboardInterrupt it sees into Abort
            fail(err.__context__ if isinstance(err.__context__, KeyboardInterrupt) else KeyboardInterrupt())
        except (UsageError, EnvError, OSError, KeyboardInterrupt) as err:  # raised outside a command
            fail(err)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="ep_store")
def main(verbose: int) -> None:
    """ep_store: versioned Exemplar Partitioning dictionaries of language-model activations."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if not verbose:  # hub retries are noise when the answer is "not found"
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


COMMANDS = (
    models.models,
    harvest.harvest, harvest.store,
    build.build, build.assign,
    query.sql, query.stats, query.report,
    match.match_cmd, match.diff_cmd,
    studies.generate_cmd, studies.refusal_cmd, studies.finetune,
    eval.eval_group,
    sae.sae, export.export_group, bundle.publish_cmd, bundle.pull_cmd,
    search.search_cmd, search.index_group,
)
for command in COMMANDS:
    main.add_command(command)
