"""``ep publish`` and ``ep pull``: dictionaries as checked bundles (ep_store.stages.publish)."""

from __future__ import annotations

import click

from ep_store.cli.base import STORE, emit, user_errors


@click.command("publish")
@click.argument("dictionaries", nargs=-1, required=True, metavar="KEY...")
@click.option("--to", "dest", required=True, help="A new folder, or hf://datasets/ORG/REPO[/PATH].")
@click.option("--with-assignments", is_flag=True, help="Also ship each dictionary's assignments of its own tokens.")
@STORE
@user_errors
def publish_cmd(dictionaries, dest, with_assignments, store_path) -> None:
    """Write dictionaries as a bundle: their folders, a SHA-256 manifest and a model card."""
    from ep_store.stages.publish import PublishConfig, publish
    from ep_store.store.core import Store

    emit(publish(cfg=PublishConfig(dictionaries=list(dictionaries), to=dest, assignments=with_assignments),
                 store=Store(store_path)))


@click.command("pull")
@click.argument("source", metavar="SRC")
@click.argument("dictionaries", nargs=-1, metavar="[KEY...]")
@click.option("--overwrite", is_flag=True, help="Replace dictionaries the store already has.")
@STORE
@user_errors
def pull_cmd(source, dictionaries, overwrite, store_path) -> None:
    """Check a bundle against its manifest and copy its dictionaries (all, or KEY...) into the store."""
    from ep_store.stages.publish import PullConfig, pull
    from ep_store.store.core import Store

    emit(pull(cfg=PullConfig(source=source, dictionaries=list(dictionaries), overwrite=overwrite),
              store=Store(store_path)))
