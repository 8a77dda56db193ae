"""The ``ep`` command: a thin click layer. Each subcommand builds a config and calls one
library function; the last line it prints is a one-line JSON summary.

Bad input raises ``UsageError``, which becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from ep_store.errors import UsageError

STORE = click.option("--store", "store_path", type=click.Path(path_type=Path), default=Path("data/store"),
                     show_default=True, help="Root folder of the store.")
MODELS = click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"),
                      show_default=True, help="Folder of local model checkpoints.")
DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                      show_default=True, help="Where to compute.")
PROGRESS = click.option("--progress/--no-progress", default=True, help="Show progress bars.")


def emit(summary: dict) -> None:
    """The last line of every command: one line of JSON."""
    click.echo(json.dumps(summary, default=str))


def user_errors(fn):
    """Turn UsageError into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="ep_store")
def main(verbose: int) -> None:
    """ep_store: versioned Exemplar Partitioning dictionaries of language-model activations."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if not verbose:  # hub retries are noise when the answer is "not found"
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


# -- models --------------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Import and list local model checkpoints."""


@models.command("import-gguf")
@click.argument("name")
@MODELS
@user_errors
def models_import_gguf(name: str, models_dir: Path) -> None:
    """Import an offline GGUF model (see `ep models ls`) as a safetensors folder."""
    from ep_store import models as m

    if name not in m.OFFLINE_MODELS:
        raise UsageError(f"unknown offline model {name!r}; choose one of: {', '.join(m.OFFLINE_MODELS)}")
    out = m.import_gguf(name, models_dir)
    emit({"model": name, "checkpoint": m.OFFLINE_MODELS[name].checkpoint, "path": str(out)})


@models.command("ls")
@MODELS
@user_errors
def models_ls(models_dir: Path) -> None:
    """List local checkpoints and the offline models that can be imported."""
    from ep_store import models as m

    local = m.list_local(models_dir)
    for model, checkpoint, folder in local:
        click.echo(f"{model}/{checkpoint}\t{folder}")
    offline = {name: ("installed" if m.offline_available(name) else "not installed") for name in m.OFFLINE_MODELS}
    emit({"local": [f"{a}/{b}" for a, b, _ in local], "offline": offline})


# -- harvest -------------------------------------------------------------------------------------
def parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--layers {text!r} is not a comma-separated list of integers, e.g. 6,12") from None


@main.command()
@click.option("--model", required=True, help="Model name (local folder or hub id).")
@click.option("--checkpoint", required=True, help="Checkpoint (local sub-folder or hub revision).")
@click.option("--layers", required=True, help="Comma-separated 0-based blocks, e.g. 6,12.")
@click.option("--corpus", default="builtin", show_default=True, help="builtin and/or .txt/.jsonl/.parquet files, comma-separated.")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Tokens to store.")
@click.option("--ctx", type=int, default=128, show_default=True, help="Tokens per context (BOS not counted).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Contexts per forward pass and commit.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Compute dtype.")
@click.option("--overwrite", is_flag=True, help="Replace existing datasets instead of resuming.")
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def harvest(model, checkpoint, layers, corpus, max_tokens, ctx, batch_size, dtype, overwrite, device,
            store_path, models_dir, progress) -> None:
    """Harvest residual-stream activations into versioned Lance tables."""
    from ep_store.harvest import HarvestConfig
    from ep_store.harvest import harvest as run
    from ep_store.store import Store

    cfg = HarvestConfig(model, checkpoint, parse_layers(layers), corpus, max_tokens, ctx, batch_size,
                        device, dtype, overwrite)
    summary = run(cfg, Store(store_path), models_dir, progress)
    summary.pop("config")
    emit(summary)


# -- store ---------------------------------------------------------------------------------------
@main.group()
def store() -> None:
    """Inspect the store."""


@store.command("ls")
@STORE
@user_errors
def store_ls(store_path: Path) -> None:
    """List activation datasets and dictionaries with rows, width, versions and tags."""
    from ep_store.catalog import catalog

    rows = catalog(store_path)
    for row in rows:
        click.echo("\t".join(str(row[k]) for k in ("kind", "key", "rows", "width", "version", "tags")))
    emit({"datasets": len(rows)})


# -- build and assign ----------------------------------------------------------------------------
@main.command()
@click.option("--model", required=True, help="Model of the activation dataset.")
@click.option("--checkpoint", required=True, help="Checkpoint of the activation dataset.")
@click.option("--layer", type=int, required=True, help="Layer of the activation dataset.")
@click.option("--percentile", type=float, required=True, help="p of theta_p, in (0, 100).")
@click.option("--calibration-tokens", type=int, default=200_000, show_default=True, help="Calibration prefix length.")
@click.option("--calibration-batch", type=int, default=2048, show_default=True, help="Calibration batch size.")
@click.option("--batch-size", type=int, default=2048, show_default=True, help="Build batch size (saturation unit).")
@click.option("--saturation-window", type=int, default=1, show_default=True, help="Quiet batches before stopping.")
@click.option("--max-tokens", type=int, default=None, help="Token budget (default: whole dataset).")
@click.option("--precision", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Screening precision (exact re-check near theta either way).")
@click.option("--skip-nonfinite", is_flag=True, help="Drop NaN/inf rows instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Rebuild even if built with other parameters.")
@click.option("--assign/--no-assign", default=True, show_default=True, help="Also assign the dictionary's own tokens.")
@DEVICE
@STORE
@PROGRESS
@user_errors
def build(model, checkpoint, layer, percentile, calibration_tokens, calibration_batch, batch_size,
          saturation_window, max_tokens, precision, skip_nonfinite, overwrite, assign, device, store_path,
          progress) -> None:
    """Calibrate and leader-cluster an activation dataset into an EP dictionary."""
    from ep_store.dictionary import BuildConfig
    from ep_store.dictionary import build as run
    from ep_store.store import Store

    cfg = BuildConfig(model, checkpoint, layer, percentile, calibration_tokens, calibration_batch, batch_size,
                      saturation_window, max_tokens, device, precision, skip_nonfinite, overwrite)
    emit(run(cfg, Store(store_path), assign=assign, progress=progress))


@main.command()
@click.option("--dictionary", "dictionary_key", required=True, help="<model>/<checkpoint>/L<layer>/p<percentile>.")
@click.option("--activations", default=None, help="<model>/<checkpoint>/L<layer> (default: the dictionary's own).")
@DEVICE
@STORE
@PROGRESS
@user_errors
def assign(dictionary_key, activations, device, store_path, progress) -> None:
    """Write nearest-exemplar regions and distances for every token of an activation dataset."""
    from ep_store.dictionary import assign_dataset
    from ep_store.store import Store

    emit(assign_dataset(Store(store_path), dictionary_key, activations, device, progress=progress))


# -- SQL -----------------------------------------------------------------------------------------
FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                      show_default=True, help="How to print the result.")
OUTPUT = click.option("--output", type=click.Path(path_type=Path), default=None,
                      help="Also save the result (.parquet, .csv or .json).")
AS_OF = click.option("--as-of", default=None, help="Show dictionaries as of a Lance tag or version (e.g. tokens-10000).")


def show(table, fmt: str, output: Path | None, summary: dict) -> None:
    from ep_store import tables

    if output is not None:
        tables.save(table, output)
        summary["output"] = str(output)
    text = tables.render(table, fmt)
    if text:
        click.echo(text)
    emit({"rows": table.num_rows, **summary})


@main.command()
@click.argument("query")
@FORMAT
@OUTPUT
@AS_OF
@STORE
@user_errors
def sql(query, fmt, output, as_of, store_path) -> None:
    """Run one read-only SQL query over the store's views.

    Views: dictionaries, exemplars, exemplar_vectors, assignments, tokens, saturation, matches, searches.
    """
    from ep_store.sql import StoreDB

    db = StoreDB(store_path, as_of)
    show(db.query(query), fmt, output, {"dictionaries": len(db.keys)})


@main.command()
@click.argument("dictionary_key")
@click.argument("question", required=False)
@click.option("--limit", type=int, default=20, show_default=True, help="Regions to show.")
@click.option("--context", type=int, default=8, show_default=True, help="Tokens of context either side.")
@click.option("--per-region", type=int, default=3, show_default=True, help="Contexts per region.")
@FORMAT
@OUTPUT
@AS_OF
@STORE
@user_errors
def stats(dictionary_key, question, limit, context, per_region, fmt, output, as_of, store_path) -> None:
    """Canned questions about one dictionary; without QUESTION, list them."""
    from ep_store.questions import questions
    from ep_store.sql import StoreDB, ask

    db = StoreDB(store_path, as_of)
    key = db.require(dictionary_key)
    if question is None:
        table = db.query("SELECT * FROM dictionaries WHERE key = $key", {"key": str(key)})
        for q in questions().values():
            click.echo(f"{q.name}: {q.description}")
        show(table, fmt, output, {"questions": list(questions())})
        return
    table = ask(db, key, question, limit=limit, context=context, per_region=per_region)
    show(table, fmt, output, {"dictionary": str(key), "question": question})


# -- reports -------------------------------------------------------------------------------------
@main.group()
def report() -> None:
    """Static HTML reports (open from disk, no server)."""


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
    from ep_store.report import dictionary_report

    emit(dictionary_report(store_path, dictionary_key, out, context, per_region, as_of))


# -- finetune ------------------------------------------------------------------------------------
@main.command()
@click.option("--model", required=True, help="Model name under the models dir.")
@click.option("--from", "base", required=True, help="Checkpoint to start from (e.g. base).")
@click.option("--to", required=True, help="Name of the final checkpoint (e.g. sft).")
@click.option("--steps", type=int, default=60, show_default=True, help="Optimizer steps.")
@click.option("--save-every", type=int, default=20, show_default=True, help="Save <to>-step<k> every k steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--metrics", type=click.Path(path_type=Path), default=None, help="Also write the summary JSON here.")
@MODELS
@PROGRESS
@user_errors
def finetune(model, base, to, steps, save_every, batch_size, lr, seed, metrics, models_dir, progress) -> None:
    """Fine-tune into a chat model that refuses a class of harmful requests; reports refusal rates."""
    from ep_store.finetune import FinetuneConfig
    from ep_store.finetune import finetune as run

    summary = run(FinetuneConfig(model, base, to, steps, save_every, batch_size, lr, seed), models_dir, progress)
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps(summary, indent=2) + "\n")
    emit(summary)


# -- matching and diffs --------------------------------------------------------------------------
@main.command("match")
@click.argument("a")
@click.argument("b")
@click.option("--method", type=click.Choice(["vector", "membership", "both"]), default="both", show_default=True,
              help="Match exemplar vectors (Hungarian), memberships (SQL overlaps), or both.")
@click.option("--cutoff", type=float, default=0.7, show_default=True, help="Cosine for a vector match to count as preserved.")
@click.option("--f1-cutoff", type=float, default=0.3, show_default=True, help="F1 for a membership-only match to count.")
@STORE
@user_errors
def match_cmd(a, b, method, cutoff, f1_cutoff, store_path) -> None:
    """Match dictionary A to B: preserved, introduced and dropped regions."""
    from ep_store.match import MatchConfig, match
    from ep_store.store import Store

    emit(match(MatchConfig(a, b, method, cutoff, f1_cutoff), Store(store_path)))


@main.command("diff")
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
    from ep_store.diff import diff_report

    emit(diff_report(store_path, a, b, out, models_dir, top, context, cutoff))


# -- vector search (issue 14) ----------------------------------------------------------------------
def emit_stderr(summary: dict) -> None:
    """The one-line JSON summary on stderr, so stdout holds only data (strict JSON: NaN -> null)."""
    import math

    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    click.echo(json.dumps(clean, default=str, allow_nan=False), err=True)


@main.command("search")
@click.option("--dictionary", "dictionary_key", required=True, help="<model>/<checkpoint>/L<layer>/p<percentile>.")
@click.option("--region", type=int, default=None, help="Query: this region's exemplar.")
@click.option("--token", default=None, help="Query: a stored token, DOC_ID:POS.")
@click.option("--text", default=None, help="Query: a token of this text, run through the dictionary's model.")
@click.option("--position", type=int, default=-1, show_default=True, help="Which token of --text (-1: the last).")
@click.option("--k", type=int, default=20, show_default=True, help="Neighbours to return.")
@click.option("--exclude-members", is_flag=True, help="Only tokens outside the query's region (its boundary).")
@click.option("--index", "index_mode", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Use the search index (auto: when present; never: exact scan).")
@click.option("--nprobes", type=int, default=None, help="IVF partitions to probe (default: the index's).")
@click.option("--candidates", type=int, default=4, show_default=True, help="Index candidates per result, re-ranked exactly.")
@click.option("--context", type=int, default=8, show_default=True, help="Tokens of context either side.")
@click.option("--save", default=None, help="Also save the result as searches/<SAVE>.lance (SQL view `searches`).")
@FORMAT
@STORE
@MODELS
@user_errors
def search_cmd(dictionary_key, region, token, text, position, k, exclude_members, index_mode, nprobes, candidates,
               context, save, fmt, store_path, models_dir) -> None:
    """Nearest stored tokens in a dictionary's centered-cosine geometry (exemplar, token or text query)."""
    from ep_store import tables
    from ep_store.search import SearchConfig, search
    from ep_store.store import Store

    cfg = SearchConfig(dictionary_key, region, token, text, position, k, exclude_members, index_mode, nprobes,
                       candidates, context, models_dir, save)
    table, summary = search(cfg, Store(store_path))
    text_out = tables.render(table, fmt)
    if text_out:
        click.echo(text_out)
    emit_stderr(summary)


@main.group("index")
def index_group() -> None:
    """Vector search indexes over a dictionary's activations (Lance IVF indexes in the store)."""


@index_group.command("build")
@click.option("--dictionary", "dictionary_key", required=True, help="<model>/<checkpoint>/L<layer>/p<percentile>.")
@click.option("--index-type", type=click.Choice(["IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ", "IVF_FLAT"]), default="IVF_SQ",
              show_default=True, help="Lance vector index type.")
@click.option("--partitions", type=int, default=None, help="IVF partitions (default rows/4096, 1..1024).")
@click.option("--sub-vectors", type=int, default=None, help="PQ sub-vectors (default width/16).")
@click.option("--nprobes", type=int, default=None, help="Default partitions probed per query (default partitions/8, >= 4).")
@click.option("--refine-factor", type=int, default=4, show_default=True, help="Lance re-ranks refine_factor*k stored vectors.")
@click.option("--overwrite", is_flag=True, help="Rebuild even when up to date.")
@STORE
@user_errors
def index_build(dictionary_key, index_type, partitions, sub_vectors, nprobes, refine_factor, overwrite,
                store_path) -> None:
    """Index the centered unit directions of a dictionary's activations (rebuilds a stale index)."""
    from ep_store.search import IndexConfig, build_index
    from ep_store.store import Store

    cfg = IndexConfig(dictionary_key, index_type, partitions, sub_vectors, nprobes, refine_factor, overwrite)
    emit_stderr(build_index(cfg, Store(store_path)))


def _list_questions_in_help() -> None:
    from ep_store.questions import questions

    lines = "\n".join(f"  {q.name}: {q.description}" for q in questions().values())
    stats.help = f"{stats.help}\n\n\b\nQuestions:\n{lines}"


_list_questions_in_help()
