"""``ep search`` (nearest stored tokens in a dictionary's geometry) and ``ep index`` (the vector
search indexes it uses): ep_store.analysis.search (issue 14)."""

from __future__ import annotations

import click

from ep_store.cli.base import (
    DICTIONARY,
    FORMAT,
    MODELS,
    STORE,
    Registry,
    emit,
    print_table,
    user_errors,
)


@click.command("search")
@DICTIONARY
@click.option("--region", type=int, default=None, help="Query: this region's exemplar.")
@click.option("--token", default=None, help="Query: a stored token, DOC_ID:POS.")
@click.option("--text", default=None, help="Query: a token of this text, run through the dictionary's model.")
@click.option("--position", type=int, default=-1, show_default=True, help="Which token of --text (-1: the last).")
@click.option("--k", type=int, default=20, show_default=True, help="Neighbours to return.")
@click.option("--exclude-members", is_flag=True, help="Only tokens outside the query's region (its boundary).")
@click.option("--index", "index_mode", type=Registry("ep_store.analysis.search", "INDEX_MODES"), default="auto",
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
    from ep_store.store.core import Store

    cfg = SearchConfig(dictionary=dictionary_key, region=region, token=token, text=text, position=position, k=k,
                       exclude_members=exclude_members, index=index_mode, nprobes=nprobes, candidates=candidates,
                       context=context, models_dir=models_dir, save=save)
    table, summary = search(cfg=cfg, store=Store(store_path))
    print_table(table, fmt)
    emit(summary)


@click.group("index")
def index_group() -> None:
    """Vector search indexes over a dictionary's activations (Lance IVF indexes in the store)."""


@index_group.command("build")
@DICTIONARY
@click.option("--index-type", type=Registry("ep_store.analysis.search_index", "INDEX_TYPES"), default="IVF_SQ",
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
    from ep_store.analysis.search_index import IndexConfig, build_index
    from ep_store.store.core import Store

    cfg = IndexConfig(dictionary=dictionary_key, index_type=index_type, num_partitions=partitions,
                      num_sub_vectors=sub_vectors, nprobes=nprobes, refine_factor=refine_factor, overwrite=overwrite)
    emit(build_index(cfg=cfg, store=Store(store_path)))
