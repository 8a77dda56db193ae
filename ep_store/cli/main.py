"""The ``ep`` command: a thin click layer. Each subcommand builds a config and calls one
library function.

Streams (issue 8, item 9): stdout carries only data (query results, listings), so
``ep sql ... --format csv > f.csv`` is exactly the CSV; the one-line JSON summary that ends
every command, progress bars, logs and errors go to stderr. Bad input raises
``UsageError``, which becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from ep_store.errors import EnvError, Terminated, UsageError, failure_line
from ep_store.sql.questions import DEFAULTS as QDEFAULTS

STORE = click.option("--store", "store_path", type=click.Path(path_type=Path), default=Path("data/store"),
                     show_default=True, help="Root folder of the store.")
MODELS = click.option("--models-dir", type=click.Path(path_type=Path), default=Path("data/models"),
                      show_default=True, help="Folder of local model checkpoints.")
DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                      show_default=True, help="Where to compute.")
PROGRESS = click.option("--progress/--no-progress", default=True, help="Show progress bars.")


def engine_options(fn):
    """--engine local|ray and the Ray options (issue 13), shared by harvest and assign."""
    fn = click.option("--num-gpus", type=float, default=0.0, show_default=True,
                      help="Ray: GPUs per task.")(fn)
    fn = click.option("--workers", type=int, default=2, show_default=True, help="Ray: tasks (shards) to run.")(fn)
    fn = click.option("--address", default="local", show_default=True,
                      help="Ray: local (start in-process), auto (running cluster) or ray://HOST:PORT.")(fn)
    fn = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
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


def _fail(err: BaseException, store=None) -> None:
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
            _fail(err, kwargs.get("store_path"))

    return wrapper


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
            _fail(err.__context__ if isinstance(err.__context__, KeyboardInterrupt) else KeyboardInterrupt())
        except (UsageError, EnvError, OSError, KeyboardInterrupt) as err:  # raised outside a command
            _fail(err)
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
    from ep_store.stages import models as m

    if name not in m.OFFLINE_MODELS:
        raise UsageError(f"unknown offline model {name!r}; choose one of: {', '.join(m.OFFLINE_MODELS)}")
    out = m.import_gguf(name, models_dir)
    emit({"model": name, "checkpoint": m.OFFLINE_MODELS[name].checkpoint, "path": str(out)})


@models.command("ls")
@MODELS
@user_errors
def models_ls(models_dir: Path) -> None:
    """List local checkpoints and the offline models that can be imported."""
    from ep_store.stages import models as m

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
@click.option("--layers", required=True, multiple=True,
              help="0-based blocks, comma-separated and/or repeated: 6,12 or --layers 6 --layers 12.")
@click.option("--corpus", default="builtin", show_default=True, help="Comma-separated sources: builtin, chat (the held-out chat prompts), .txt/.jsonl/.csv/.parquet files, "
              "and chat:FILE (a file in Gemma's chat format: its turn markers become control tokens).")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl/.csv/.parquet corpus files.")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Tokens to store.")
@click.option("--ctx", type=int, default=128, show_default=True, help="Tokens per context (BOS not counted).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Contexts per forward pass and commit.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Compute dtype.")
@click.option("--overwrite", is_flag=True, help="Replace existing datasets instead of resuming.")
@click.option("--storage-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored vector dtype (float16 halves bytes; batches beyond its range are refused).")
@click.option("--bos", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="BOS before each context: auto follows the tokenizer's convention.")
@click.option("--writer-depth", type=int, default=2, show_default=True,
              help="Batches queued for the background Lance writer while the next forward pass runs "
                   "(0..64; 0 writes each batch before the next; local engine only).")
@DEVICE
@STORE
@MODELS
@PROGRESS
@engine_options
@user_errors
def harvest(model, checkpoint, layers, corpus, text_field, max_tokens, ctx, batch_size, dtype, overwrite, storage_dtype, bos,
            writer_depth, device, store_path, models_dir, progress, engine, address, workers, num_gpus) -> None:
    """Harvest residual-stream activations into versioned Lance tables."""
    from ep_store.stages.engines import run_harvest
    from ep_store.stages.harvest import HarvestConfig
    from ep_store.store.core import Store

    cfg = HarvestConfig(model=model, checkpoint=checkpoint, layers=parse_layers(",".join(layers)), corpus=corpus,
                        text_field=text_field,
                        max_tokens=max_tokens, ctx=ctx, batch_size=batch_size, device=device, dtype=dtype,
                        overwrite=overwrite, storage_dtype=storage_dtype, bos=bos, writer_depth=writer_depth)
    summary = run_harvest(cfg, Store(store_path), models_dir, ray_config(engine, address, workers, num_gpus), progress)
    summary.pop("config", None)
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
    from ep_store import jsonio
    from ep_store.store.catalog import catalog

    rows = catalog(store_path)
    for row in rows:  # tags as JSON, so the listing parses (a Python repr does not)
        click.echo("\t".join(jsonio.dumps(row[k]) if k == "tags" else str(row[k])
                             for k in ("kind", "key", "rows", "width", "version", "tags")))
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
    from ep_store.stages.build import BuildConfig
    from ep_store.stages.build import build as run
    from ep_store.store.core import Store

    cfg = BuildConfig(model=model, checkpoint=checkpoint, layer=layer, percentile=percentile,
                      calibration_tokens=calibration_tokens, calibration_batch=calibration_batch, batch_size=batch_size,
                      saturation_window=saturation_window, max_tokens=max_tokens, device=device,
                      precision=precision, skip_nonfinite=skip_nonfinite, overwrite=overwrite)
    emit(run(cfg, Store(store_path), assign=assign, progress=progress))


@main.command()
@click.option("--dictionary", "dictionary_key", required=True, help="<model>/<checkpoint>/L<layer>/p<percentile>.")
@click.option("--activations", default=None, help="<model>/<checkpoint>/L<layer> (default: the dictionary's own).")
@DEVICE
@STORE
@PROGRESS
@engine_options
@user_errors
def assign(dictionary_key, activations, device, store_path, progress, engine, address, workers, num_gpus) -> None:
    """Write nearest-exemplar regions and distances for every token of an activation dataset."""
    from ep_store.stages.engines import run_assign
    from ep_store.store.core import Store

    emit(run_assign(Store(store_path), dictionary_key, activations, device,
                    ray_config(engine, address, workers, num_gpus), progress))


# -- SQL -----------------------------------------------------------------------------------------
FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                      show_default=True, help="How to print the result.")
OUTPUT = click.option("--output", type=click.Path(path_type=Path), default=None,
                      help="Also save the result (.parquet, .csv or .json).")
AS_OF = click.option("--as-of", default=None, help="Show dictionaries as of a Lance tag or version (e.g. tokens-10000).")


def show(table, fmt: str, output: Path | None, summary: dict) -> None:
    from ep_store.cli.main import tables

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

    \b
    Views: dictionaries, exemplars, exemplar_vectors, exemplar_vectors_d<width>, assignments, foreign_assignments,
    tokens, saturation, matches, match_overlaps, saes, sae_activations, ep_projections, sae_features,
    searches.
    Data goes to stdout, the summary line to stderr; writes are refused.
    """
    from ep_store.sql.db import StoreDB

    db = StoreDB(store_path, as_of)
    show(db.query(query), fmt, output, {"dictionaries": len(db.keys)})


@main.command()
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
    from ep_store.analysis.report import dictionary_report

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
    from ep_store.studies.finetune import FinetuneConfig
    from ep_store.studies.finetune import finetune as run

    cfg = FinetuneConfig(model=model, base=base, to=to, steps=steps, save_every=save_every, batch_size=batch_size,
                         lr=lr, seed=seed)
    summary = run(cfg, models_dir, progress)
    if metrics is not None:
        from ep_store import jsonio

        jsonio.write(metrics, summary)
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
    from ep_store.analysis.match import MatchConfig, match
    from ep_store.store.core import Store

    emit(match(MatchConfig(a=a, b=b, method=method, cutoff=cutoff, f1_cutoff=f1_cutoff), Store(store_path)))


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
    from ep_store.analysis.diff import diff_report

    emit(diff_report(store_path, a, b, out, models_dir, top, context, cutoff))


# -- digests (issue 8, item 20) -------------------------------------------------------------------
@store.command("digest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metrics", type=click.Path(path_type=Path), default=None,
              help="Also write the digests to this JSON file (a DVC metric).")
@user_errors
def store_digest(paths, metrics) -> None:
    """Digest of the logical content of Lance datasets, files or folders: rows and values in
    stored order, independent of file names, fragment layout and timestamps."""
    from ep_store.store.digest import digests

    found = digests(list(paths), metrics)
    for path, d in found.items():
        click.echo(f"{d['digest']}\t{d.get('rows', '')}\t{path}")
    emit({"paths": len(found), "metrics": str(metrics) if metrics else None})


@store.command("verify")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--rtol", type=float, default=1e-3, show_default=True,
              help="Relative tolerance of floats: vectors (row-wise), theta, center, JSON numbers.")
@click.option("--preserved", type=float, default=0.9, show_default=True,
              help="Share of the larger dictionary's regions (and of assigned tokens) that must match.")
@click.option("--cutoff", type=float, default=0.9, show_default=True,
              help="Exemplar cosine at which a matched region counts as preserved.")
@click.option("--format", "fmt", type=click.Choice(["tsv", "jsonl"]), default="tsv", show_default=True,
              help="stdout rows: path, verdict, detail.")
@user_errors
def store_verify(a, b, rtol, preserved, cutoff, fmt) -> None:
    """Compare two stores or output folders (a reproduction A against a reference B) output by
    output: identical, equivalent (the same computation on another machine) or different.
    Exit 0 when nothing is different, 1 when something is (issue 18, E14.2)."""
    from ep_store import jsonio
    from ep_store.analysis.verify import VerifyConfig, counts, verify

    rows = verify(VerifyConfig(a, b, rtol=rtol, preserved=preserved, cutoff=cutoff))
    for row in rows:
        click.echo(jsonio.dumps(row._asdict()) if fmt == "jsonl" else "\t".join(row))
    found = counts(rows)
    emit({"outputs": len(rows), **found})
    if found["different"]:
        raise SystemExit(1)

# -- interventions (issue 9) ---------------------------------------------------------------------
@main.command("generate")
@click.option("--model", required=True, help="Model name (local folder or hub id).")
@click.option("--checkpoint", required=True, help="Checkpoint (local sub-folder or hub revision).")
@click.option("--prompts", "prompts_path", type=click.Path(path_type=Path), required=True,
              help=".txt (one prompt per line) or .jsonl/.csv/.parquet (a prompt or instruction field).")
@click.option("--text-field", default=None, help="Field holding the prompt in .jsonl/.csv/.parquet rows "
              "[default: prompt, else instruction].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output .jsonl: prompt, completion, refused.")
@click.option("--chat", is_flag=True, help="Apply the model's chat template (Gemma turn format for our Gemma).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Tokens per completion at most.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per batch (left-padded).")
@click.option("--ablate", multiple=True, help="KEY:ID[,ID...]: ablate these regions' directions (repeatable).")
@click.option("--steer", multiple=True, help="KEY:REGION=ALPHA: add alpha x median|a-c| along the region (repeatable).")
@click.option("--basis", type=click.Choice(["exemplar", "mean"]), default="exemplar", show_default=True,
              help="Region direction: the exemplar or the mean-member direction.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Compute dtype.")
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def generate_cmd(model, checkpoint, prompts_path, text_field, out, chat, max_new_tokens, batch_size, ablate, steer, basis, dtype,
                 device, store_path, models_dir, progress) -> None:
    """Greedy generation, optionally with regions ablated or steered at their layer's output."""
    from ep_store.store.core import Store
    from ep_store.studies.generate import GenerateConfig, generate

    cfg = GenerateConfig(model=model, checkpoint=checkpoint, prompts=prompts_path, out=out, chat=chat,
                         text_field=text_field,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, ablate=ablate, steer=steer, basis=basis,
                         device=device, dtype=dtype)
    summary = generate(cfg, Store(store_path), models_dir, progress)
    summary.pop("config")
    emit(summary)  # data goes to --out; the summary to stderr


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of numbers, e.g. 2,4,8") from None


@main.command("refusal")
@click.option("--model", default="gemma-3-270m", show_default=True, help="Model under study.")
@click.option("--checkpoint", default="sft", show_default=True, help="Fine-tuned checkpoint studied.")
@click.option("--control", default="base", show_default=True, help="Checkpoint the found direction is also ablated in ('' to skip).")
@click.option("--layers", default="6,12", show_default=True, help="Blocks swept, comma-separated.")
@click.option("--percentiles", default="4", show_default=True, help="Percentiles swept, comma-separated.")
@click.option("--train-harmful", type=int, default=60, show_default=True, help="Harmful training prompts for finding regions.")
@click.option("--train-benign", type=int, default=60, show_default=True, help="Benign training prompts for finding regions.")
@click.option("--heldout-harmful", type=int, default=30, show_default=True, help="Held-out harmful prompts for measuring.")
@click.option("--heldout-benign", type=int, default=30, show_default=True, help="Held-out benign prompts for measuring.")
@click.option("--max-new-tokens", type=int, default=8, show_default=True, help="Greedy tokens per prompt.")
@click.option("--batch-size", type=int, default=80, show_default=True, help="Prompts per generate call.")
@click.option("--k-max", type=int, default=5, show_default=True, help="Ablate the top k = 1..k-max candidates.")
@click.option("--min-members", type=int, default=5, show_default=True, help="Prompts a region needs.")
@click.option("--min-rate", type=float, default=0.3, show_default=True, help="Candidate refusal rate at least.")
@click.option("--null-max-rate", type=float, default=0.05, show_default=True, help="Null region refusal rate at most.")
@click.option("--alphas", default="0.5,1", show_default=True, help="Steering strengths (units of median |a-c|).")
@click.option("--match-percentile", type=float, default=1.0, show_default=True, help="Pipeline dictionaries' p for the match join.")
@click.option("--max-capability-loss", type=float, default=0.10, show_default=True,
              help="The recommended condition raises benign loss by at most this share, if any does.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Compute dtype.")
@click.option("--work-store", type=click.Path(path_type=Path), default=Path("data/store/refusal"), show_default=True,
              help="Store of the study's own activations and dictionaries.")
@click.option("--metrics", type=click.Path(path_type=Path), default=Path("data/metrics/refusal.json"), show_default=True,
              help="Metrics JSON to write.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=Path("data/reports/refusal"),
              show_default=True, help="Folder for index.html, README.md and plots.")
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def refusal_cmd(model, checkpoint, control, layers, percentiles, train_harmful, train_benign, heldout_harmful,
                heldout_benign, max_new_tokens, batch_size, k_max, min_members, min_rate, null_max_rate, alphas,
                match_percentile, max_capability_loss, dtype, work_store, metrics, report_dir, device, store_path, models_dir,
                progress) -> None:
    """The refusal study: find refusal regions, ablate and steer them, write metrics and a report."""
    from ep_store.studies.refusal import RefusalConfig, refusal_study

    cfg = RefusalConfig(model=model, checkpoint=checkpoint, control=control or None, layers=parse_layers(layers),
                        percentiles=parse_floats(percentiles, "--percentiles"), train_harmful=train_harmful,
                        train_benign=train_benign, heldout_harmful=heldout_harmful, heldout_benign=heldout_benign,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, k_max=k_max, min_members=min_members,
                        min_rate=min_rate, null_max_rate=null_max_rate, alphas=parse_floats(alphas, "--alphas"),
                        max_capability_loss=max_capability_loss, match_percentile=match_percentile, device=device,
                        dtype=dtype)
    emit(refusal_study(cfg, work_store, store_path, models_dir, metrics, report_dir, progress))



# -- sparse autoencoders (issue 11) ---------------------------------------------------------------
@main.group()
def sae() -> None:
    """Train a TopK SAE (SAELens) on stored activations and compare it with an EP dictionary."""


@sae.command("train")
@click.option("--activations", required=True, help="<model>/<checkpoint>/L<layer> to train on.")
@click.option("--name", required=True, help="Name of the SAE, e.g. topk-8x.")
@click.option("--width", type=int, default=None, help="SAE features (default: 8 x d_model).")
@click.option("--k", type=int, default=32, show_default=True, help="Active features per token (TopK).")
@click.option("--tokens", type=int, default=200_000, show_default=True, help="Training samples, repeats included.")
@click.option("--heldout-tokens", type=int, default=4000, show_default=True,
              help="Last rows of the dataset never trained on (ep sae compare uses them).")
@click.option("--batch-size", type=int, default=512, show_default=True, help="Activations per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--curves", type=click.Path(path_type=Path), default=None, help="Also write the training curves (CSV).")
@click.option("--overwrite", is_flag=True, help="Replace an SAE of the same name.")
@DEVICE
@STORE
@PROGRESS
@user_errors
def sae_train(activations, name, width, k, tokens, heldout_tokens, batch_size, lr, seed, curves, overwrite, device,
              store_path, progress) -> None:
    """Train a TopK SAE with SAELens, streaming batches from the store; saved in SAELens's format."""
    from ep_store.sae.train import SAETrainConfig, train_sae
    from ep_store.store.core import Store

    cfg = SAETrainConfig(activations=activations, name=name, width=width, k=k, tokens=tokens,
                         heldout_tokens=heldout_tokens, batch_size=batch_size, lr=lr, seed=seed, device=device,
                         overwrite=overwrite)
    emit(train_sae(cfg, Store(store_path), progress, curves))


@sae.command("compare")
@click.option("--dictionary", "dictionary_key", required=True, help="<model>/<checkpoint>/L<layer>/p<percentile>.")
@click.option("--sae", "sae_name", required=True, help="SAE name trained on the same activations.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for metrics.json and the report.")
@click.option("--heldout-tokens", type=int, default=4000, show_default=True, help="Compare on the last rows.")
@click.option("--top-n", type=int, default=100, show_default=True, help="Top positive tokens per feature.")
@click.option("--min-positives", type=int, default=20, show_default=True, help="Positive tokens to be eligible.")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Also sparse-probe SAE, EP and raw features on the probe tasks.")
@click.option("--probe-data", default="builtin", show_default=True,
              help="Probe tasks: builtin, built-in task names, or a .jsonl/.csv/.parquet file with text and label.")
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def sae_compare(dictionary_key, sae_name, out, heldout_tokens, top_n, min_positives, probe, probe_data, device,
                store_path, models_dir, progress) -> None:
    """Shared features of EP and an SAE (F1 > 0.5 shares), probe accuracy and build compute."""
    from ep_store.sae.compare import SAECompareConfig, compare
    from ep_store.store.core import Store

    cfg = SAECompareConfig(dictionary=dictionary_key, sae=sae_name, out=str(out), heldout_tokens=heldout_tokens,
                           top_n=top_n, min_positives=min_positives, device=device, probe=probe,
                           models_dir=str(models_dir), probe_data=probe_data)
    m = compare(cfg, Store(store_path), progress)
    emit({k: m[k] for k in ("dictionary", "sae", "ep_to_sae_share_f1_gt_05", "sae_to_ep_share_f1_gt_05",
                            "hungarian_pairs_f1_gt_05", "sql_matches_numpy", "out")}
         | {"flops_ratio_sae_over_ep": m["compute"]["flops_ratio_sae_over_ep"]})


@sae.command("summary")
@click.argument("metrics_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON file to write.")
@user_errors
def sae_summary(metrics_files, out) -> None:
    """Collect the headline figures of several `ep sae compare` metrics.json files into one JSON."""
    from ep_store.sae.report import summarise_files

    emit(summarise_files(list(metrics_files), out))


# -- evaluation (issue 10) -----------------------------------------------------------------------
@main.group("eval")
def eval_group() -> None:
    """Evaluate dictionaries with the field's protocols: sparse probes, concept detection, OOD."""


EVAL_DICTS = click.option("--dictionary", "dictionaries", multiple=True, required=True,
                          help="<model>/<checkpoint>/L<layer>/p<p>, or <model>/<checkpoint>/all; repeat (or comma-separate) "
                               "for several of one model: one forward.")
EVAL_RUN = [
    click.option("--model", default=None, help="Run the texts through this model (default: the dictionaries').",),
    click.option("--checkpoint", default=None, help="Run the texts through this checkpoint (default: the dictionaries')."),
    click.option("--max-tokens-per-text", type=int, default=64, show_default=True, help="First tokens kept per text."),
    click.option("--batch-size", type=int, default=16, show_default=True, help="Texts per forward pass."),
    click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for metrics.json and plots."),
    click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=None,
                 help="Also write the headline metrics here (for dvc metrics show)."),
    click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
                 help="Also copy the PNG plots, alone, into this folder (for dvc plots show)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits."),
    DEVICE, STORE, MODELS, PROGRESS,
]


def eval_options(fn):
    for option in reversed(EVAL_RUN):
        fn = option(fn)
    return EVAL_DICTS(fn)


def _keys(dictionaries) -> tuple[str, ...]:
    """--dictionary may repeat and may hold comma-separated keys."""
    return tuple(k.strip() for d in dictionaries for k in d.split(",") if k.strip())


def _text_run(models_dir, max_tokens_per_text, batch_size, device, progress):
    from ep_store.evaluate.features import TextRun

    return TextRun(models_dir=models_dir, max_tokens_per_text=max_tokens_per_text, batch_size=batch_size, device=device,
                   progress=progress)


@eval_group.command("probe")
@click.option("--data", default="builtin", show_default=True,
              help="builtin, built-in task names (harmful_requests,text_source,stdlib_topic) or a .jsonl/.csv/.parquet file.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text.")
@click.option("--label-field", default="label", show_default=True, help="Field holding the class label.")
@click.option("--ks", default="1,2,5,20,all", show_default=True, help="Feature counts k of the sparse probes.")
@eval_options
@user_errors
def eval_probe(dictionaries, data, text_field, label_field, ks, model, checkpoint, max_tokens_per_text, batch_size,
               out, metrics_path, plots_dir, seed, device, store_path, models_dir, progress) -> None:
    """SAEBench sparse probing: raw residual vs EP one-hot vs EP signed projection, per task and k."""
    from ep_store.evaluate.probe import ProbeConfig, ProbeEvalConfig, run_probe_eval
    from ep_store.store.core import Store

    probe = ProbeConfig(ks=tuple(k.strip() for k in ks.split(",") if k.strip()), seed=seed)
    cfg = ProbeEvalConfig(dictionaries=_keys(dictionaries), data=data, text_field=text_field, label_field=label_field,
                          model=model, checkpoint=checkpoint, probe=probe)
    run = _text_run(models_dir, max_tokens_per_text, batch_size, device, progress)
    emit(run_probe_eval(cfg, Store(store_path), run, out, metrics_path, plots_dir))


@eval_group.command("concepts")
@click.option("--data", default="builtin", show_default=True,
              help="builtin, or a .jsonl/.csv/.parquet file with concept/text/label "
                   "(or AxBench's output_concept/output/category).")
@click.option("--test-fraction", type=float, default=0.5, show_default=True, help="Held-out share per concept.")
@eval_options
@user_errors
def eval_concepts(dictionaries, data, test_fraction, model, checkpoint, max_tokens_per_text, batch_size, out,
                  metrics_path, plots_dir, seed, device, store_path, models_dir, progress) -> None:
    """AxBench latent concept detection: AUROC of the best region vs difference of means."""
    from ep_store.evaluate.concepts import ConceptConfig, ConceptEvalConfig, run_concept_eval
    from ep_store.store.core import Store

    cfg = ConceptEvalConfig(dictionaries=_keys(dictionaries), data=data, model=model, checkpoint=checkpoint,
                            concepts=ConceptConfig(test_fraction=test_fraction, seed=seed))
    run = _text_run(models_dir, max_tokens_per_text, batch_size, device, progress)
    emit(run_concept_eval(cfg, Store(store_path), run, out, metrics_path, plots_dir))


@eval_group.command("ood")
@click.option("--in-corpus", default="builtin", show_default=True,
              help="In-distribution corpus (as ep harvest --corpus); its last documents are used.")
@click.option("--ood-corpus", default="", help="Extra OOD sets: .txt/.jsonl/.csv/.parquet files, comma-separated "
                                               "(held-out, word-shuffled and random-token sets are always made).")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl/.csv/.parquet rows of the OOD and in-corpus files.")
@click.option("--documents", type=int, default=40, show_default=True, help="Documents per set.")
@eval_options
@user_errors
def eval_ood(dictionaries, in_corpus, ood_corpus, text_field, documents, model, checkpoint, max_tokens_per_text,
             batch_size, out, metrics_path, plots_dir, seed, device, store_path, models_dir, progress) -> None:
    """Nearest-exemplar distance as an OOD score: within-theta rate, quantiles, AUROC per set."""
    from ep_store.evaluate.ood import OODConfig, run_ood_eval
    from ep_store.store.core import Store

    files = tuple(p.strip() for p in ood_corpus.split(",") if p.strip())
    cfg = OODConfig(dictionaries=_keys(dictionaries), in_corpus=in_corpus, ood_corpus=files, text_field=text_field,
                    documents=documents, seed=seed, model=model, checkpoint=checkpoint)
    run = _text_run(models_dir, max_tokens_per_text, batch_size, device, progress)
    emit(run_ood_eval(cfg, Store(store_path), run, out, metrics_path, plots_dir))


# -- store maintenance (issue 8, A2) -------------------------------------------------------------------
@store.command("compact")
@click.argument("keys", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Compact every dataset of the store.")
@STORE
@user_errors
def store_compact(keys, all_, store_path) -> None:
    """Merge small fragments of KEYS (m/c/L6 or m/c/L6/p1) into few; rows, order, versions and tags kept."""
    from ep_store.store.core import Store

    if bool(keys) == all_:
        raise UsageError("pass one or more keys (e.g. gemma-3-270m/base/L6) or --all, not both")
    results = Store(store_path).compact_keys(None if all_ else list(keys))
    emit({"compacted": results})

# -- vector search (issue 14) ----------------------------------------------------------------------
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
    from ep_store.analysis.search import SearchConfig, search
    from ep_store.cli.main import tables
    from ep_store.store.core import Store

    cfg = SearchConfig(dictionary=dictionary_key, region=region, token=token, text=text, position=position, k=k,
                       exclude_members=exclude_members, index=index_mode, nprobes=nprobes, candidates=candidates,
                       context=context, models_dir=models_dir, save=save)
    table, summary = search(cfg, Store(store_path))
    text_out = tables.render(table, fmt)
    if text_out:
        click.echo(text_out)
    emit(summary)


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
    from ep_store.analysis.search import IndexConfig, build_index
    from ep_store.store.core import Store

    cfg = IndexConfig(dictionary=dictionary_key, index_type=index_type, num_partitions=partitions,
                      num_sub_vectors=sub_vectors, nprobes=nprobes, refine_factor=refine_factor, overwrite=overwrite)
    emit(build_index(cfg, Store(store_path)))


def _list_questions_in_help() -> None:
    from ep_store.sql.questions import questions

    single = "\n".join(f"  {q.usage()}" for q in questions().values() if not q.pair)
    pair = "\n".join(f"  {q.usage()}" for q in questions().values() if q.pair)
    stats.help = f"{stats.help}\n\n\b\nQuestions about one dictionary:\n{single}\n\n\b\nPair questions (A = KEY):\n{pair}"


_list_questions_in_help()
