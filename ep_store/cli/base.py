"""What every ``ep`` command file shares: the common options, the choice and list types whose
values come from the library's registries, one-line errors (``user_errors``) and the output
helpers (``emit`` the summary, ``show`` a table, ``echo_listing`` a listing).

Streams (issue 8, item 9): stdout carries only data (query results, listings), so
``ep sql ... --format csv > f.csv`` is exactly the CSV; the one-line JSON summary that ends
every command, progress bars, logs and errors go to stderr.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ep_store.errors import EnvError, UsageError, failure_line
from ep_store.keys import parse_list


class Registry(click.Choice):
    """A click.Choice over a library registry (a module's tuple, or a dict's keys), read when click
    first needs it, so that ``ep`` starts without importing torch (one source of truth per list)."""

    def __init__(self, module: str, name: str):  # click.Choice.__init__ would set the choices now
        self.source = (module, name)
        self.case_sensitive = True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:
        module, name = self.source
        return tuple(getattr(importlib.import_module(module), name))


class Listed(click.ParamType):
    """A comma-separated option value as a tuple of ``cast`` (keys.parse_list: a bad item is a
    UsageError naming the option, one line and exit 2 like every other)."""

    name = "list"

    def __init__(self, cast: type = str):
        self.cast = cast

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        return parse_list(str(value), self.cast, param.opts[0] if param else "value")


class HelpFrom(click.Command):
    """A command whose help ends with ``more()``, made when help is asked for, not at import."""

    def __init__(self, *args, more: Callable[[], str], **kwargs):
        super().__init__(*args, **kwargs)
        self.more = more

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(inspect.cleandoc(self.help or "") + self.more())


STORE = click.option("--store", "store_path", type=click.Path(path_type=Path), default=Path("data/store"),
                     show_default=True, help="Root folder of the store.")
MODEL = click.option("--model", required=True, help="Model name (local folder or hub id).")
CHECKPOINT = click.option("--checkpoint", required=True, help="Checkpoint (local sub-folder or hub revision).")
MODELS = click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"),
                      show_default=True, help="Folder of local model checkpoints.")
DEVICE = click.option("--device", type=Registry("ep_store.stages.models", "DEVICES"), default="auto",
                      show_default=True, help="Where to compute.")
HOOK = click.option("--hook", type=Registry("ep_store.keys", "HOOKS"), default="resid_post", show_default=True,
                    help="Hook point in each block, as TransformerLens names it (blocks.L.hook_<name>); "
                         "part of the key (L6.attn_out) unless resid_post.")
DTYPE = click.option("--dtype", type=Registry("ep_store.stages.models", "DTYPES"), default="float32",
                     show_default=True, help="Compute dtype.")
PROGRESS = click.option("--progress/--no-progress", default=True, help="Show progress bars.")
DICTIONARY = click.option("--dictionary", "dictionary_key", required=True,
                          help="<model>/<checkpoint>/L<layer>/p<percentile>.")
FORMAT = click.option("--format", "fmt", type=Registry("ep_store.tables", "FORMATS"), default="table",
                      show_default=True, help="How to print the result.")
OUTPUT = click.option("--output", type=click.Path(path_type=Path), default=None,
                      help="Also save the result (.parquet, .csv or .json).")
AS_OF = click.option("--as-of", default=None, help="Show dictionaries as of a Lance tag or version (e.g. tokens-10000).")


def engine_options(fn):
    """--engine local|ray and the Ray options (issue 13), shared by harvest and assign."""
    fn = click.option("--num-gpus", type=float, default=0.0, show_default=True,
                      help="Ray: GPUs per task.")(fn)
    fn = click.option("--workers", type=int, default=2, show_default=True, help="Ray: tasks (shards) to run.")(fn)
    fn = click.option("--address", default="local", show_default=True,
                      help="Ray: local (start in-process), auto (running cluster) or ray://HOST:PORT.")(fn)
    fn = click.option("--engine", type=Registry("ep_store.stages.engines", "ENGINES"), default="local",
                      show_default=True,
                      help="Run in this process, or as Ray tasks writing Lance fragments with one commit.")(fn)
    return fn


def ray_config(engine: str, address: str, workers: int, num_gpus: float):
    """The Ray engine's config, or None for the local engine."""
    if engine == "local":
        return None
    from ep_store.stages.engines import RayConfig

    return RayConfig(address=address, workers=workers, num_gpus=num_gpus)


def emit(summary: dict) -> None:
    """The last line of every command: one line of strict JSON, on stderr (stdout is data)."""
    from ep_store import jsonio

    click.echo(jsonio.dumps(summary), err=True)


def print_table(table, fmt: str) -> None:
    """A result table on stdout as ``fmt`` (tables.render); nothing for an empty rendering."""
    from ep_store import tables

    text = tables.render(table, fmt)
    if text:
        click.echo(text)


def show(table, fmt: str, output: Path | None, summary: dict) -> None:
    """Print a result table, also save it to ``output``, and emit its rows with ``summary``."""
    from ep_store import tables

    if output is not None:
        tables.save(table, output)
        summary["output"] = str(output)
    print_table(table, fmt)
    emit({"rows": table.num_rows, **summary})


def echo_listing(lines: list[str], summary: dict) -> None:
    """A listing (one line per item, made by the library) on stdout, then its summary."""
    for line in lines:
        click.echo(line)
    emit(summary)


def fail(err: BaseException, store=None) -> None:
    """Exit with the one line and code of ``err`` (errors.failure_line); re-raise a bug."""
    found = failure_line(err, store)
    if found is None:
        raise err
    line, code = found
    logging.getLogger(__name__).debug("the failure in full", exc_info=err)
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


def user_errors(fn):
    """Turn every failure a user can cause or meet into one line on stderr and an exit code
    (errors.failure_line): UsageError 2; a missing optional package, a full disk, a read-only
    or unwritable store (any OSError) 1, naming the path and the fix; Ctrl-C 130; SIGTERM 143.
    No traceback (``-vv`` logs it). Every write is atomic, so a failed or interrupted command
    leaves only whole commits; rerunning it resumes or redoes the work (issue 18, C7, C8)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, EnvError, OSError, KeyboardInterrupt) as err:
            fail(err, kwargs.get("store_path"))

    return wrapper
