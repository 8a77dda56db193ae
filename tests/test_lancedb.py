"""LanceDB opens every table ep_store writes, and every dataset ep_store creates is written in
the pinned Lance file format (issue 21, item 3)."""

from __future__ import annotations

import shutil

import lance
import lancedb
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.store.index import lancedb_table
from ep_store.store.layout import STORAGE_VERSION


def lance_datasets(root):
    """Every Lance dataset folder under ``root`` (not inside another one)."""
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        for child in sorted(folder.iterdir()):
            if child.is_dir() and child.name.endswith(".lance"):
                found.append(child)
            elif child.is_dir() and not child.name.startswith("."):
                stack.append(child)
    return sorted(found)


def test_lancedb_opens_every_table_the_store_writes(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    s = ["--store", str(root)]
    for args in (["build", "--model", "tiny", "--checkpoint", "base", "--layer", "1", "--percentile", "5", *s],
                 ["build", "--model", "tiny", "--checkpoint", "base", "--layer", "2", "--percentile", "5", *s],
                 ["assign", "--dictionary", "tiny/base/L1/p5", "--activations", "tiny/base/L2", *s],
                 ["match", "tiny/base/L1/p5", "tiny/base/L2/p5", "--method", "both", *s],
                 ["index", "build", "--dictionary", "tiny/base/L1/p5", "--partitions", "4", *s],
                 ["search", "--dictionary", "tiny/base/L1/p5", "--region", "0", "--k", "5", "--save", "near0", *s]):
        done = CliRunner().invoke(main, args)
        assert done.exit_code == 0, (args, done.output)
    paths = lance_datasets(root)
    kinds = {p.relative_to(root).parts[0] for p in paths}
    assert kinds == {"activations", "dictionaries", "matches", "indexes", "searches"}
    names = {p.name for p in paths}
    assert {"L1.lance", "exemplars.lance", "assignments.lance", "pairs.lance", "p5.lance", "near0.lance"} <= names
    for path in paths:
        table = lancedb_table(path)
        assert table.count_rows() == lance.dataset(str(path)).count_rows() > 0, path
        assert lancedb.connect(str(path.parent)).open_table(path.stem).schema == table.schema
        assert lance.dataset(str(path)).data_storage_version == STORAGE_VERSION, path
    # The index's vector index is LanceDB's, queryable with its own query builder.
    index = lancedb_table(root / "indexes" / "tiny" / "base" / "L1" / "p5.lance")
    assert [i.columns for i in index.list_indices()] == [["u"]]
    first = index.search(index.to_arrow().column("u")[0].values.to_numpy().astype("float32"), vector_column_name="u")
    assert first.distance_type("l2").nprobes(4).limit(1).to_arrow().column("row")[0].as_py() == 0
