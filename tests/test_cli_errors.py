"""Bad input: exit code 2, one clear line, no traceback, the store exactly as it was."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey
from ep_store.store import Store, vectors_to_arrow
from tests.conftest import tree_snapshot


def run_cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def assert_refused(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert needle in lines[0], lines[0]


@pytest.fixture()
def store_copy(tiny_store, tmp_path):
    import shutil

    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def harvest_args(store, models_dir, **over):
    opts = {"--model": "tiny", "--checkpoint": "base", "--layers": "1", "--max-tokens": "200", "--ctx": "64",
            "--batch-size": "4", "--device": "cpu", "--store": str(store), "--models-dir": str(models_dir)}
    opts.update(over)
    return ["harvest", "--no-progress", *[x for kv in opts.items() for x in kv]]


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"--model": "nosuch-model-xyz"}, "unknown model or checkpoint"),
        ({"--checkpoint": "nosuch"}, "unknown model or checkpoint"),
        ({"--layers": "1,9"}, "layer 9 is out of range"),
        ({"--layers": "one"}, "not a comma-separated list"),
        ({"--model": "../escape"}, "escape"),
        ({"--model": "/abs/path"}, "unknown model or checkpoint"),
        ({"--ctx": "0"}, "--ctx must be positive"),
    ],
)
def test_harvest_refuses(store_copy, models_dir, over, needle):
    before = tree_snapshot(store_copy)
    assert_refused(run_cli(harvest_args(store_copy, models_dir, **over)), needle)
    assert tree_snapshot(store_copy) == before


def test_model_name_with_slash_cannot_escape(tmp_path):
    from ep_store.errors import UsageError
    from ep_store.keys import to_segment

    assert to_segment("EleutherAI/pythia-70m") == "EleutherAI%2Fpythia-70m"
    for bad in ("..", ".", "", " x"):
        with pytest.raises(UsageError):
            to_segment(bad)
    with pytest.raises(UsageError):
        Store(tmp_path).activation_path(ActivationKey("..", "base", 1))


def test_corpus_errors(store_copy, models_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    before = tree_snapshot(store_copy)
    assert_refused(run_cli(harvest_args(store_copy, models_dir, **{"--corpus": str(empty)})), "holds no text")
    assert_refused(run_cli(harvest_args(store_copy, models_dir, **{"--corpus": str(broken)})), "line 2 is not JSON")
    assert_refused(run_cli(harvest_args(store_copy, models_dir, **{"--corpus": str(tmp_path / "missing.txt")})), "does not exist")
    assert tree_snapshot(store_copy) == before


def test_store_path_is_a_file(models_dir, tmp_path):
    path = tmp_path / "store"
    path.write_text("not a folder")
    assert_refused(run_cli(harvest_args(path, models_dir)), "is a file")
    assert path.read_text() == "not a folder"


def test_append_other_width_refused(store_copy):
    store = Store(store_copy)
    key = ActivationKey("tiny", "base", 1)
    path = store.activation_path(key)
    before = tree_snapshot(store_copy)
    rows = 3
    table = pa.table({
        "doc_id": pa.array([0] * rows, pa.int64()), "pos": pa.array(range(rows), pa.int32()),
        "token_id": pa.array([1] * rows, pa.int32()), "token": ["a"] * rows,
        "char_start": pa.array([0] * rows, pa.int32()), "char_end": pa.array([1] * rows, pa.int32()),
        "vector": vectors_to_arrow(np.zeros((rows, 32))),
    })
    from ep_store.errors import UsageError

    with pytest.raises(UsageError, match="width 64, not 32"):
        store.append_activations(key, table, store.info(path).meta)
    assert tree_snapshot(store_copy) == before


def test_resume_with_other_options_refused(store_copy, models_dir):
    before = tree_snapshot(store_copy)
    assert_refused(run_cli(harvest_args(store_copy, models_dir, **{"--ctx": "32"})), "--overwrite")
    assert tree_snapshot(store_copy) == before


def test_store_ls_lists_datasets(store_copy):
    result = run_cli(["store", "ls", "--store", str(store_copy)])
    assert result.exit_code == 0
    assert "tiny/base/L1\t3000\t64" in result.output
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"datasets": 2}
    assert len(result.stdout.strip().splitlines()) == 2  # one line per dataset, nothing else


def test_every_command_has_help():
    def walk(group, prefix):
        for name, cmd in group.commands.items():
            result = run_cli([*prefix, name, "--help"])
            assert result.exit_code == 0 and "Usage:" in result.output, name
            if hasattr(cmd, "commands"):
                walk(cmd, [*prefix, name])

    walk(main, [])
